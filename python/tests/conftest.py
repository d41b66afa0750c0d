"""Shared helpers of the coherence Python tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

import coherence

PYTHON_DIR = Path(__file__).resolve().parents[1]
EXAMPLES = PYTHON_DIR / "examples"

# CI runs every test: a missing tool there is a failure, not a skip.
IN_CI = os.environ.get("CI") == "true"


def need(present: bool, what: str) -> None:
    """Skips the test when ``what`` is missing, except in CI, where it fails."""
    if not present:
        if IN_CI:
            pytest.fail(f"{what} is missing, and CI runs every test")
        pytest.skip(f"{what} is missing")


def need_tool(name: str) -> str:
    """The path of the program ``name``; skips (fails in CI) without it."""
    path = shutil.which(name)
    need(path is not None, name)
    return path


def run_python(code: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new interpreter, as a script would run (so its exit is tested)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture
def cluster() -> Iterator[Callable[..., List[coherence.Node]]]:
    """Starts in-memory clusters (``cluster(n, **options)``) and shuts them down after the
    test."""
    started: List[coherence.Node] = []

    def start(n: int, **options) -> List[coherence.Node]:
        nodes = coherence.Node.local_cluster(n, **options)
        started.extend(nodes)
        return nodes

    yield start
    for node in started:
        node.shutdown()
