"""Python programs under mpiexec: the lab's scenario, with and without mpi4py, and how the
node and MPI start and end together."""

import os
import subprocess
import sys
from typing import List

import pytest

import coherence
from conftest import EXAMPLES, need, need_tool


def mpi4py_library(python: str) -> str:
    """Which MPI library the mpi4py of ``python`` uses ("" without mpi4py)."""
    done = subprocess.run(
        [python, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
        capture_output=True, text=True, timeout=60,
    )
    return done.stdout if done.returncode == 0 else ""


@pytest.fixture(scope="module")
def mpich() -> List[str]:
    """The command that starts MPICH ranks of this interpreter, with coherence built with MPI
    and mpi4py built against MPICH."""
    need(coherence.HAS_MPI, "the MPI transport in this build (MATURIN_PEP517_ARGS=\"--features mpi\")")
    mpiexec = need_tool("mpiexec.mpich")
    need("MPICH" in mpi4py_library(sys.executable), "mpi4py built against MPICH")
    return [mpiexec]


# Open MPI runs as another interpreter (a virtual environment) whose mpi4py and coherence are
# built against Open MPI: one process cannot hold both MPI libraries. CI sets this variable.
OPENMPI_PYTHON = os.environ.get("COHERENCE_OPENMPI_PYTHON")


@pytest.fixture(scope="module")
def openmpi() -> List[str]:
    """The command that starts Open MPI ranks of ``COHERENCE_OPENMPI_PYTHON``."""
    mpiexec = need_tool("mpiexec.openmpi")
    need(OPENMPI_PYTHON is not None, "COHERENCE_OPENMPI_PYTHON, a Python with mpi4py and coherence built against Open MPI")
    need("Open MPI" in mpi4py_library(OPENMPI_PYTHON), f"mpi4py built against Open MPI in {OPENMPI_PYTHON}")
    return [mpiexec, "--oversubscribe", "--allow-run-as-root"]


def run(mpiexec: List[str], ranks: int, args: List[str], python: str = sys.executable) -> subprocess.CompletedProcess:
    # Open MPI's single-copy transfers use cross-memory attach, which containers often forbid.
    env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
    return subprocess.run(
        mpiexec + ["-n", str(ranks), python] + args,
        capture_output=True, text=True, timeout=120, env=env,
    )


def check_lab(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "coherent: yes"
    assert "Traceback" not in done.stderr and "coherence" not in done.stderr, done.stderr


def test_the_lab_example_with_mpi4py_under_mpich(mpich):
    check_lab(run(mpich, 4, [str(EXAMPLES / "lab_mpi.py")]))


def test_the_lab_example_with_mpi4py_under_openmpi(openmpi):
    check_lab(run(openmpi, 4, [str(EXAMPLES / "lab_mpi.py")], python=OPENMPI_PYTHON))


LAB_WITHOUT_MPI4PY = r"""
import sys, time
from coherence import lab
rank = lab.node().id
counter = lab.DistObj(0 if rank == 0 else None)
counter.update(lambda n: n + 1)
deadline = time.monotonic() + 60
while counter.read() < RANKS and time.monotonic() < deadline:
    time.sleep(0.001)
sys.stdout.write(f"{rank} {counter.read()}\n")
"""


def test_lab_without_mpi4py_initializes_and_finalizes_mpi_itself(mpich):
    done = run(mpich, 3, ["-c", LAB_WITHOUT_MPI4PY.replace("RANKS", "3")])
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert sorted(done.stdout.splitlines()) == ["0 3", "1 3", "2 3"]


def test_lab_imported_before_mpi4py(mpich):
    script = r"""
import sys
from coherence import lab
from mpi4py import MPI
comm = MPI.COMM_WORLD
counter = lab.DistObj(0 if comm.rank == 0 else None)
counter.update(lambda n: n + 1)
comm.Barrier()
sys.stdout.write(f"{comm.rank} {counter.read()} {MPI.Query_thread() == MPI.THREAD_MULTIPLE}\n")
"""
    done = run(mpich, 2, ["-c", script])
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert sorted(done.stdout.splitlines()) == ["0 2 True", "1 2 True"]


def test_a_node_on_mpi4py_leaves_mpi_to_mpi4py(mpich):
    script = r"""
import sys
from mpi4py import MPI
import coherence
with coherence.Node.mpi() as node:
    counter = node.object("counter", 0)
    counter.update(lambda n: n + 1)
    MPI.COMM_WORLD.Barrier()
    total = counter.read()
# The node is gone; MPI is still mpi4py's, and still running.
MPI.COMM_WORLD.Barrier()
sys.stdout.write(f"{node.id} {total} {MPI.Is_finalized()}\n")
"""
    done = run(mpich, 2, ["-c", script])
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert sorted(done.stdout.splitlines()) == ["0 2 False", "1 2 False"]


def test_a_second_node_after_mpi_was_finalized_is_refused(mpich):
    script = r"""
import sys
import coherence
first = coherence.Node.mpi()
first.shutdown()  # it initialized MPI, so it finalized it
try:
    coherence.Node.mpi()
except coherence.StartError as e:
    sys.stdout.write(f"refused: {e}\n")
"""
    done = run(mpich, 2, ["-c", script])
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("refused: MPI: MPI is not initialized" in line for line in lines), lines


def test_mpi4py_with_too_little_thread_support_is_refused(mpich):
    script = r"""
import sys
import mpi4py
mpi4py.rc.thread_level = "funneled"
from mpi4py import MPI
import coherence
try:
    coherence.Node.mpi()
except coherence.StartError as e:
    sys.stdout.write(f"refused: {e}\n")
"""
    done = run(mpich, 2, ["-c", script])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused: MPI: the MPI library grants Funneled threading, MULTIPLE is needed"] * 2
