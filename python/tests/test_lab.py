"""``coherence.lab`` in one process without MPI, and the lab's scenario on threads."""

import os
import subprocess
import sys

from conftest import EXAMPLES, run_python

# Variables that make coherence.lab believe it runs under mpiexec.
MPI_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")


def test_lab_objects_in_a_single_process_without_mpi():
    script = """
from coherence import lab
assert lab.node().id == 0
counter = lab.DistObj(0)
table = lab.DistObj({"a": [1]})
counter.write(counter.read() + 1)
assert counter.update(lambda n: n * 10) == 10
copy = table.read()
copy["a"].append(2)
print(counter.read(), counter.version, table.read(), table.version)
"""
    env = {k: v for k, v in os.environ.items() if k not in MPI_VARIABLES}
    done = run_python(script, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "10 2 {'a': [1]} 0\n"


def test_the_lab_scenario_on_threads_is_coherent():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "lab_threads.py"), "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[-1] == "coherent: yes"
    assert "  rank 4: int: read 40 on open, not its init -1 (version 4)" in lines
    assert not [line for line in lines if line.startswith("problem")]
