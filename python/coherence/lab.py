"""The lab's interface: ``DistObj(initial_value)`` objects shared by the ranks of an MPI job.

For programs written like the lab's ``main.py`` and run as ``mpiexec -n 4 python main.py``::

    from mpi4py import MPI            # optional; if the program uses it, import it first
    from coherence import lab

    rank = lab.node().id
    counter = lab.DistObj(0 if rank == 0 else None)   # on every rank, in the same order
    counter.write(counter.read() + 1)

Importing this module starts the process's node, so every rank imports it (running one
program, they do): under ``mpiexec``, or with mpi4py imported, ``Node.mpi()`` (which uses
mpi4py's MPI when there is one); in a single process without MPI, a cluster of one node. The
node is shut down at interpreter exit, before mpi4py finalizes MPI: the program needs no
explicit shutdown.

Objects are named by the order of their creation: the k-th ``DistObj`` a rank constructs is
the k-th of every other rank, so every rank constructs its objects in the same order. Rank 0's
value is the initial value. Other ranks' values are ignored (the lab passed None): they wait
for rank 0 to create the object, at most ``WAIT_FOR_RANK_0`` seconds, then start from its
current value, which is how a rank that constructs an object late sees what was written
before.
"""

import itertools
import os
import sys
import time
from typing import Any, Callable, Generic, Optional, TypeVar

from . import DistObj as _DistObj
from . import Node, Timeout

T = TypeVar("T")

WAIT_FOR_RANK_0 = 60.0
"""Seconds a rank other than 0 waits for rank 0 to create an object it constructs. Long, since
rank 0 may compute for a while between two objects; bounded, so that a program whose ranks
construct different objects fails instead of hanging."""

_PREFIX = "coherence.lab:"

# Set by mpiexec (MPICH's Hydra, Intel MPI, Slurm's PMI), Open MPI and PMIx launchers.
_MPI_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")


def _under_mpi() -> bool:
    return "mpi4py.MPI" in sys.modules or any(v in os.environ for v in _MPI_LAUNCHER_VARIABLES)


def _start() -> Node:
    if _under_mpi():
        # Node.mpi() registers the node's shutdown with atexit itself.
        return Node.mpi()
    return Node.local_cluster(1)[0]


_node = _start()
# How many objects rank 0 has created: the others wait on it before opening one.
_created: "_DistObj[int]" = _node.object(_PREFIX + "created", 0)
_indices = itertools.count()


def node() -> Node:
    """This process's node (its ``id`` is the MPI rank)."""
    return _node


def _wait_for_rank_0(index: int, name: str) -> None:
    deadline = time.monotonic() + WAIT_FOR_RANK_0
    while _created.read() <= index:
        if time.monotonic() > deadline:
            error = Timeout(
                f"rank 0 did not create lab object number {index} within {WAIT_FOR_RANK_0} s:"
                " does every rank construct its DistObj objects in the same order?"
            )
            error.operation, error.object, error.after = "open", name, WAIT_FOR_RANK_0
            raise error
        # A local read while this node holds a token of the counter: the wait costs rank 0
        # nothing, and sleeping leaves the core to the node's own threads.
        time.sleep(0.0005)


class DistObj(Generic[T]):
    """An object every rank shares, as in the lab: ``read()`` and ``write(value)``.

    Construct it on every rank in the same order; rank 0's ``initial_value`` is the first
    value (other ranks' are ignored). ``read()`` returns a new copy each time: changing it
    changes nothing until it is written.
    """

    def __init__(self, initial_value: Optional[T] = None) -> None:
        index = next(_indices)
        name = f"{_PREFIX}{index}"
        # Holds rank 0's value, which only rank 0 knows to be a T.
        self._obj: "_DistObj[Any]"
        if _node.id == 0:
            self._obj = _node.object(name, initial_value)
            _created.write(index + 1)
        else:
            _wait_for_rank_0(index, name)
            self._obj = _node.object(name, None)

    def read(self) -> T:
        """The current value, as a new object the caller owns."""
        value: T = self._obj.read()
        return value

    def write(self, value: T) -> None:
        """Replaces the value on every rank."""
        self._obj.write(value)

    def update(self, fn: Callable[[T], T]) -> T:
        """Atomic read-modify-write: writes ``fn(current)`` and returns it; no other write
        comes in between (a ``read`` then ``write`` could lose another rank's write)."""
        value: T = self._obj.update(fn)
        return value

    @property
    def version(self) -> int:
        """Writes applied to the value this rank holds."""
        return self._obj.version
