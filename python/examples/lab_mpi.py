"""The lab's scenario on the ranks of an MPI job, written as the lab wrote it: mpi4py for the
ranks and their barriers, ``coherence.lab.DistObj`` for the shared objects::

    mpiexec -n 4 python python/examples/lab_mpi.py

Ranks 0 to N-2 take turns in the integer and dictionary tests; the last rank is the lab's "new
process": it constructs the objects only after the others wrote them and must see the current
values. Rank 0 gathers what every rank saw and prints the report, ending with
``coherent: yes``. Nobody shuts anything down: ``coherence.lab`` does at exit, before mpi4py
finalizes MPI.
"""

import sys
import time

from mpi4py import MPI  # first: it initializes MPI (MPI_THREAD_MULTIPLE); coherence uses it

from coherence import lab
from lab_scenario import Participant, report

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
if size < 2:
    if rank == 0:
        print("the scenario needs at least 2 ranks: mpiexec -n 4 python lab_mpi.py", file=sys.stderr)
    sys.exit(2)
assert lab.node().id == rank, "coherence's node ids are MPI ranks"



def barrier() -> None:
    """``comm.Barrier()``, but waiting outside MPI: a rank in ``MPI_Barrier`` spins inside MPI,
    taking the core from the node threads that answer the other ranks' token requests."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.0002)


me = Participant(rank, takers=size - 1)
# As in the lab, only rank 0's value is the initial one; the others pass None.
me.run(lambda name, init: lab.DistObj(init if rank == 0 else None), barrier)

results = comm.gather((me.seen, me.problems), root=0)
coherent = report(results, size) if results is not None else None
if not comm.bcast(coherent, root=0):
    sys.exit(1)
