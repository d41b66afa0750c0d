"""coherence: named Python objects replicated on every process of a cluster and kept
coherent by counting tokens.

A read needs one of an object's tokens and is local while this node holds one; a write needs
all of them (about one round trip). The same objects work between threads
(``Node.local_cluster``), across hosts (``Node.zmq``) and between MPI ranks (``Node.mpi``)::

    import coherence

    with coherence.Node.local_cluster(1)[0] as node:
        counter = node.object("counter", 0)
        counter.write(counter.read() + 10)
        counter.update(lambda c: c + 1)      # atomic read-modify-write
        assert counter.read() == 11

``coherence.lab`` has the lab's interface for ``mpiexec -n 4 python main.py`` programs.
"""

from ._errors import (
    CoherenceError,
    CutOff,
    DecodeError,
    EncodeError,
    InsideUpdate,
    Interrupted,
    NameTooLong,
    NoMajority,
    Removed,
    SpawnError,
    StartError,
    Stopped,
    Timeout,
    TransportError,
    TypeMismatch,
    ValueTooLarge,
)
from ._native import HAS_MPI, RUST_TYPES, DistObj, Node

__all__ = [
    "HAS_MPI",
    "RUST_TYPES",
    "CoherenceError",
    "CutOff",
    "DecodeError",
    "DistObj",
    "EncodeError",
    "InsideUpdate",
    "Interrupted",
    "NameTooLong",
    "NoMajority",
    "Node",
    "Removed",
    "SpawnError",
    "StartError",
    "Stopped",
    "Timeout",
    "TransportError",
    "TypeMismatch",
    "ValueTooLarge",
]
