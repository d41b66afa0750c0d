"""Type stubs of the extension module; ``coherence`` re-exports everything here."""

from os import PathLike
from types import TracebackType
from typing import Callable, Dict, Generic, List, Literal, Optional, Tuple, Type, TypeVar, Union, final

_T = TypeVar("_T")

__all__ = ["HAS_MPI", "RUST_TYPES", "DistObj", "Node"]

RUST_TYPES: Tuple[str, ...]
"""The values ``Node.object(..., codec="msgpack", rust_type=...)`` accepts: Rust types, as a
Rust program spells them, that a Rust node opens the same object as."""

HAS_MPI: bool
"""Whether this build has the MPI transport (``Node.mpi``)."""

_WritePolicy = Literal["update", "invalidate"]

@final
class Node:
    """One member of a cluster: it keeps the objects it opens coherent with every other
    member. Node 0 founds the cluster. ``with node:`` shuts it down at the end of the block."""

    @staticmethod
    def local_cluster(
        n: int, *, timeout: float = 10.0, write_policy: _WritePolicy = "update"
    ) -> List["Node"]:
        """Starts ``n`` nodes connected by in-memory channels (ids 0 to n-1), for threads of
        this process. Give each thread its own node."""
    @staticmethod
    def zmq(
        listen: str = "tcp://127.0.0.1:0",
        join: Optional[str] = None,
        *,
        secret_file: Optional[Union[str, "PathLike[str]"]] = None,
        cluster_id: str = "coherence",
        advertise: Optional[str] = None,
        timeout: float = 10.0,
        write_policy: _WritePolicy = "update",
    ) -> "Node":
        """Starts a ZeroMQ node: founds a cluster without ``join``, else joins through the
        address of any member. The secret comes from ``secret_file``, else from
        ``COHERENCE_SECRET``. Raises ``StartError`` or ``ValueError``."""
    @staticmethod
    def mpi(*, timeout: float = 10.0, write_policy: _WritePolicy = "update") -> "Node":
        """Starts this rank's node of an MPI job. Uses the MPI mpi4py initialized, or
        initializes (and later finalizes) MPI itself. Shut down at exit at the latest.
        Raises ``StartError`` if this build has no MPI transport."""
    @property
    def id(self) -> int:
        """This node's id: 0 for the founder, the rank under MPI."""
    @property
    def address(self) -> Optional[str]:
        """The address other ZeroMQ nodes join through, or None for other transports."""
    def object(
        self,
        name: str,
        init: _T,
        codec: Literal["pickle", "msgpack"] = "pickle",
        rust_type: Optional[str] = None,
    ) -> "DistObj[_T]":
        """Opens the object ``name``, or creates it with ``init`` if it exists nowhere.
        ``codec="msgpack"`` with ``rust_type`` (one of ``RUST_TYPES``) shares it with Rust
        nodes. Raises ``TypeMismatch`` if it exists with another codec or Rust type."""
    def stats(self) -> Dict[str, int]:
        """Traffic counters: frames_sent, messages_sent (of those, lease_frames_sent and
        lease_messages_sent: the lease's background renewals), frames_received,
        frames_rejected, messages_rejected, messages_fenced; and epoch, the number of the view
        installed."""
    def shutdown(self) -> None:
        """Leaves the cluster, handing every token on; idempotent."""
    def __enter__(self) -> "Node": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

@final
class DistObj(Generic[_T]):
    """A replicated object. ``read()`` returns a new copy each time, locally while this node
    holds a token; ``write`` and ``update`` gather every token first."""

    @property
    def name(self) -> str:
        """The object's name."""
    @property
    def version(self) -> int:
        """Writes applied to the value this node holds (or last held)."""
    @property
    def node(self) -> Node:
        """The node this object was opened on."""
    def read(self) -> _T:
        """The current value, as a new object the caller owns (an immutable value is shared:
        nobody can change it)."""
    def write(self, value: _T) -> None:
        """Replaces the value once this node holds every token."""
    def update(self, fn: Callable[[_T], _T]) -> _T:
        """Atomic read-modify-write: writes ``fn(current)`` and returns it; if ``fn`` raises,
        nothing is written."""
    def __enter__(self) -> "DistObj[_T]": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
