"""The exceptions of coherence: one class per way an operation can fail.

Where a built-in exception fits, each also derives from it, so that callers catch it naturally
(``Timeout`` is a ``TimeoutError``); each carries its details as attributes (``object``,
``operation``...).
"""


class CoherenceError(Exception):
    """Base class of every error coherence raises."""


class Timeout(CoherenceError, TimeoutError):
    """An operation did not complete within the node's timeout (a node holding tokens
    vanished, or node 0 is not running). Attributes: ``operation``, ``object``, ``after``
    (seconds)."""

    operation: str
    object: str
    after: float


class TypeMismatch(CoherenceError, TypeError):
    """The object exists with another codec or Rust type than the one asked for.
    Attributes: ``object``, ``expected``, ``found`` (Rust type names)."""

    object: str
    expected: str
    found: str


class EncodeError(CoherenceError, ValueError):
    """A value could not be encoded: its codec refused it (unpicklable, not plain data for
    msgpack), or it does not fit the object's Rust type. Attributes: ``object``, ``reason``."""

    object: str
    reason: str


class ValueTooLarge(CoherenceError, ValueError):
    """The encoded value does not fit in one frame of the transport; nothing was written.
    Attributes: ``object``, ``size``, ``limit`` (bytes)."""

    object: str
    size: int
    limit: int


class NameTooLong(CoherenceError, ValueError):
    """The object name is longer than the node allows; nothing was opened. Attributes:
    ``size``, ``limit`` (bytes)."""

    size: int
    limit: int


class DecodeError(CoherenceError, ValueError):
    """A value received could not be decoded (for a pickle: its class cannot be imported
    here). Attributes: ``object``, ``reason``."""

    object: str
    reason: str


class Stopped(CoherenceError):
    """The node was shut down; its objects no longer work. Attribute: ``node``."""

    node: int


class TransportError(CoherenceError):
    """The node's transport failed, so the node stopped: every waiting and later operation
    raises this at once. Attributes: ``node``, ``reason``."""

    node: int
    reason: str


class InsideUpdate(CoherenceError, RuntimeError):
    """An operation on an object from inside that object's own ``update`` function, which
    would wait for the tokens the update holds. Use the function's argument instead.
    Attributes: ``operation``, ``object``."""

    operation: str
    object: str


class Removed(CoherenceError):
    """The other members went on without this node (it was cut off or stalled while they
    decided a view without it); it serves nothing more. Start a new node to join again.
    Attribute: ``node``."""

    node: int


class CutOff(CoherenceError):
    """This node lost a majority of the cluster for good (it was cut off or stalled for longer
    than the failure detection, and the others most likely went on without it; or most of
    the cluster crashed); it serves nothing more. An operation under way when that happened
    may or may not have taken effect. Start a new node to join again. Attribute: ``node``."""

    node: int


class NoMajority(CoherenceError):
    """This node has not heard from a majority of the cluster for longer than its lease (it
    is cut off, or was stalled): the others may have gone on without it, so it serves no read
    until they renew its lease. Raised once that did not happen within the operation timeout.
    Attributes: ``node``, ``operation``, ``object``."""

    node: int
    operation: str
    object: str


class Interrupted(CoherenceError):
    """A change of the cluster's members came while this ``update`` held the object, and
    its write did not take effect; nothing was written, and the update may be tried again.
    Attributes: ``operation``, ``object``."""

    operation: str
    object: str


class SpawnError(CoherenceError):
    """The node's driver thread could not be started. Attribute: ``reason``."""

    reason: str


class StartError(CoherenceError):
    """A transport could not start: an address in use, no member answering a join, MPI
    missing from this build or granting too little thread support."""
