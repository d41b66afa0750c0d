"""Objects on in-memory clusters: values, copies, updates, codecs and errors."""

import dataclasses
import pickle
import threading
import time
from typing import List

import pytest

import coherence
from conftest import run_python


def test_every_node_sees_the_latest_write(cluster):
    nodes = cluster(3)
    objs = [node.object("counter", 0) for node in nodes]
    assert [obj.read() for obj in objs] == [0, 0, 0]
    objs[1].write(10)
    assert [obj.read() for obj in objs] == [10, 10, 10]
    assert [obj.version for obj in objs] == [1, 1, 1]
    assert objs[2].update(lambda v: v + 1) == 11
    assert [obj.read() for obj in objs] == [11, 11, 11]
    assert objs[0].name == "counter"
    assert objs[0].node is nodes[0]


def test_opening_an_existing_object_gives_its_value_not_the_init(cluster):
    a, b = cluster(2)
    first = a.object("settings", {"mode": "fast"})
    first.write({"mode": "slow"})
    assert b.object("settings", {"mode": "ignored"}).read() == {"mode": "slow"}


def test_a_changed_read_value_changes_nothing(cluster):
    a, b = cluster(2)
    mine, theirs = a.object("table", {"rows": [1, 2]}), b.object("table", None)
    value = mine.read()
    value["rows"].append(3)
    value["new"] = True
    assert mine.read() == {"rows": [1, 2]}
    assert theirs.read() == {"rows": [1, 2]}
    assert mine.version == 0


class Point:
    """A class instance: reads rebuild it as pickle.loads would."""

    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Point) and other.x == self.x


@dataclasses.dataclass
class Tagged:
    """A dataclass holding mutable data."""

    x: float
    tags: List[str]


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A frozen dataclass holding a mutable one: pickle fills it without `__setattr__`."""

    n: int
    inner: Tagged


class Restored:
    """Unpickled through `__setstate__`, which reads must call too."""

    def __init__(self):
        self.items = [1]

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.restored = True


class Slotted:
    """State in slots, not in a `__dict__`."""

    __slots__ = ("items",)

    def __init__(self):
        self.items = [1]


class MadeByNew:
    """`__new__` sets an attribute that the pickled state then overwrites."""

    def __new__(cls):
        made = super().__new__(cls)
        made.origin = "new"
        return made

    def __init__(self):
        self.origin = "init"
        self.table = {"k": [1, 2]}


class Reduced:
    """Pickles through its own `__reduce__`, which a read must run."""

    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        return (Reduced, ([9],))


@pytest.mark.parametrize(
    "value",
    [
        {"rows": [1, 2], "meta": {"tags": {"a", "b"}, "pair": (1, [2])}},
        [[1, 2], [3, 4]],
        ([1], (2, [3])),
        {"flat": 1, "also": "flat"},
        [0.5] * 100,
        {1, 2, 3},
        [Point(1), {"p": Point(2)}],
        Frozen(3, Tagged(1.0, ["a", "b"])),
        bytearray(b"mutable bytes"),
    ],
    ids=["nested dict", "list of lists", "tuple holding lists", "flat dict", "flat list",
         "set", "class instances", "dataclasses", "bytearray"],
)
def test_every_read_is_a_value_of_its_own(cluster, value):
    (node,) = cluster(1)
    obj = node.object("value", value)
    first, second = obj.read(), obj.read()
    assert first == value and second == value
    assert type(first) is type(value)

    def change(v):
        # Change everything reachable that can change.
        if isinstance(v, dict):
            for item in v.values():
                change(item)
            v["added"] = True
        elif isinstance(v, (list, bytearray)):
            for item in list(v):
                change(item)
            v.append(7)
        elif isinstance(v, set):
            v.add(99)
        elif isinstance(v, tuple):
            for item in v:
                change(item)
        elif isinstance(v, Point):
            v.x = -1
        elif isinstance(v, Frozen):
            change(v.inner)
        elif isinstance(v, Tagged):
            v.x = -1.0
            change(v.tags)

    change(first)
    assert obj.read() == value
    assert second == value


def state(value):
    """What pickle restores of an instance: its `__dict__` and slots."""
    slots = {name: getattr(value, name) for name in getattr(type(value), "__slots__", ())}
    return type(value), getattr(value, "__dict__", {}), slots


@pytest.mark.parametrize("make", [Restored, Slotted, MadeByNew, lambda: Reduced([1])],
                         ids=["__setstate__", "__slots__", "__new__", "__reduce__"])
def test_reads_rebuild_instances_as_pickle_loads_does(cluster, make):
    (node,) = cluster(1)
    value = make()
    obj = node.object("instance", value)
    expected = state(pickle.loads(pickle.dumps(value, -1)))
    first, second = obj.read(), obj.read()
    assert state(first) == expected and state(second) == expected
    assert first is not second
    for item in list(state(first)[1].values()) + list(state(first)[2].values()):
        if isinstance(item, (list, dict)):
            item.clear()
    assert state(obj.read()) == expected


def test_immutable_values_are_shared_between_reads(cluster):
    (node,) = cluster(1)
    for value in [42, "text", b"bytes", 1.5, (1, ("a", None)), frozenset({1, 2}), None]:
        obj = node.object(f"immutable {value!r}", value)
        assert obj.read() == value
        assert obj.read() is obj.read()


def test_reads_keep_shared_and_cyclic_parts_as_pickle_does(cluster):
    (node,) = cluster(1)
    inner = [1]
    shared = node.object("shared", [inner, inner]).read()
    assert shared == [[1], [1]] and shared[0] is shared[1]
    cyclic = []
    cyclic.append(cyclic)
    again = node.object("cyclic", cyclic).read()
    assert again[0] is again
    assert node.object("cyclic", None).read() is not again
    point = Tagged(1.0, ["a"])
    twice = node.object("one instance twice", [point, point]).read()
    assert twice == [point, point] and twice[0] is twice[1]


def test_concurrent_updates_from_four_nodes_lose_nothing(cluster):
    nodes = cluster(4)
    objs = [node.object("hits", 0) for node in nodes]
    errors = []

    def hammer(obj):
        try:
            for _ in range(200):
                obj.update(lambda v: v + 1)
        except Exception as e:  # reported below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(obj,)) for obj in objs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [obj.read() for obj in objs] == [800] * 4
    assert objs[0].version == 800


def test_an_update_that_raises_writes_nothing(cluster):
    a, b = cluster(2)
    obj, other = a.object("x", 5), b.object("x", 5)

    def fail(value):
        raise KeyError("no")

    with pytest.raises(KeyError):
        other.update(fail)
    assert (obj.read(), obj.version) == (5, 0)
    assert (other.read(), other.version) == (5, 0)
    assert other.update(lambda v: v * 2) == 10


def test_using_the_object_inside_its_own_update_is_refused(cluster):
    (node,) = cluster(1)
    obj = node.object("x", 1)
    other = node.object("y", 2)
    # Other objects are fine inside the function.
    assert obj.update(lambda v: v + other.read()) == 3
    with pytest.raises(coherence.InsideUpdate) as caught:
        obj.update(lambda v: obj.read())
    assert (caught.value.operation, caught.value.object) == ("read", "x")
    assert (obj.read(), obj.version) == (3, 1)


def test_codecs_and_rust_types_of_one_name_do_not_mix(cluster):
    a, b = cluster(2)
    a.object("pickled", 1)
    with pytest.raises(coherence.TypeMismatch) as caught:
        b.object("pickled", 1, codec="msgpack")
    assert caught.value.object == "pickled"
    assert caught.value.found.endswith("Pickle")
    assert caught.value.expected == "rmpv::Value"

    a.object("packed", 1, codec="msgpack", rust_type="i64")
    with pytest.raises(coherence.TypeMismatch):
        b.object("packed", 1)
    with pytest.raises(coherence.TypeMismatch):
        b.object("packed", 1, codec="msgpack")
    with pytest.raises(coherence.TypeMismatch) as caught:
        b.object("packed", 1, codec="msgpack", rust_type="u64")
    assert (caught.value.expected, caught.value.found) == ("u64", "i64")
    assert isinstance(caught.value, TypeError)
    assert b.object("packed", 0, codec="msgpack", rust_type="i64").read() == 1


def test_msgpack_keeps_plain_data(cluster):
    a, b = cluster(2)
    value = {"none": None, "yes": True, "int": -(2**63), "big": 2**64 - 1, "float": 0.5,
             "str": "é", "bytes": b"\x00\xff", "list": [1, [2, {"k": "v"}]], 3: "int key"}
    obj = a.object("plain", value, codec="msgpack")
    assert b.object("plain", None, codec="msgpack").read() == value
    obj.write((1, 2))  # msgpack has no tuples: they come back as lists
    assert obj.read() == [1, 2]
    typed = a.object("scores", {"a": 1}, codec="msgpack", rust_type="BTreeMap<String, i64>")
    typed.update(lambda m: {**m, "b": 2})
    assert b.object("scores", {}, codec="msgpack", rust_type="BTreeMap<String, i64>").read() == {
        "a": 1,
        "b": 2,
    }


def test_values_a_codec_refuses_are_encode_errors(cluster):
    (node,) = cluster(1)
    with pytest.raises(coherence.EncodeError) as caught:
        node.object("s", {1, 2}, codec="msgpack")
    assert isinstance(caught.value.__cause__, TypeError)

    obj = node.object("f", 0)
    with pytest.raises(coherence.EncodeError) as caught:
        obj.write(lambda: 0)
    assert caught.value.object == "f"
    assert isinstance(caught.value.__cause__, (pickle.PicklingError, AttributeError, TypeError))

    n = node.object("n", 1, codec="msgpack", rust_type="i64")
    with pytest.raises(coherence.EncodeError) as caught:
        n.write("one")
    assert "i64" in str(caught.value)
    with pytest.raises(coherence.EncodeError):
        n.update(lambda v: 2**64)
    with pytest.raises(coherence.EncodeError):
        node.object("m", {"k": "not a number"}, codec="msgpack", rust_type="BTreeMap<String, i64>")
    assert (n.read(), n.version) == (1, 0)


class BreaksOnLoad:
    """Pickles fine, fails to unpickle: as a class missing on the reading node would."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("cannot be rebuilt here")


def test_a_value_that_does_not_unpickle_is_a_decode_error(cluster):
    a, b = cluster(2)
    mine, theirs = a.object("odd", 0), b.object("odd", 0)
    mine.write(BreaksOnLoad())
    with pytest.raises(coherence.DecodeError) as caught:
        theirs.read()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert caught.value.object == "odd"


def test_bad_arguments_are_value_errors(cluster):
    (node,) = cluster(1)
    with pytest.raises(ValueError, match="codec"):
        node.object("x", 1, codec="json")
    with pytest.raises(ValueError, match="rust_type"):
        node.object("x", 1, rust_type="i64")
    with pytest.raises(ValueError, match="RUST_TYPES|not one of"):
        node.object("x", 1, codec="msgpack", rust_type="i32")
    with pytest.raises(coherence.NameTooLong):
        node.object("x" * 100_000, 1)
    for options in ({"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")},
                    {"write_policy": "eager"}):
        with pytest.raises(ValueError):
            coherence.Node.local_cluster(1, **options)
    with pytest.raises(ValueError):
        coherence.Node.local_cluster(0)


def test_a_shut_down_node_raises_stopped(cluster):
    a, b = cluster(2)
    obj = a.object("x", 1)
    a.shutdown()
    a.shutdown()  # again: nothing to do
    for call in (obj.read, lambda: obj.write(2), lambda: obj.update(lambda v: v),
                 lambda: a.object("y", 1), a.stats):
        with pytest.raises(coherence.Stopped) as caught:
            call()
        assert caught.value.node == 0
    # What node 0 had went to node 1 on the way out.
    assert b.object("x", 0).read() == 1


def test_with_blocks():
    with coherence.Node.local_cluster(1)[0] as node:
        with node.object("x", [1]) as obj:
            obj.write([2])
            assert obj.read() == [2]
    with pytest.raises(coherence.Stopped):
        obj.read()


def test_write_policies_and_stats(cluster):
    for policy in ("update", "invalidate"):
        a, b = cluster(2, write_policy=policy)
        mine, theirs = a.object("x", 0), b.object("x", 0)
        for i in range(1, 4):
            mine.write(i)
            assert theirs.read() == i
        stats = a.stats()
        assert set(stats) == {"frames_sent", "messages_sent", "lease_frames_sent",
                              "lease_messages_sent", "frames_received", "frames_rejected",
                              "messages_rejected", "messages_fenced", "epoch"}
        assert stats["frames_sent"] > 0 and stats["frames_rejected"] == 0


def test_waiting_calls_let_other_python_threads_run(cluster):
    """A write that waits for tokens releases the GIL: here the update holding them needs the
    GIL to finish, so a write holding it would wait for its own timeout and fail."""
    a, b = cluster(2)
    holder, writer = a.object("x", 0), b.object("x", 0)
    holding, release = threading.Event(), threading.Event()
    outcome = []

    def hold(value):
        holding.set()
        release.wait(30)
        return value + 1

    def write():
        try:
            writer.write(100)
            outcome.append("written")
        except Exception as e:
            outcome.append(e)

    updater = threading.Thread(target=holder.update, args=(hold,))
    updater.start()
    holding.wait(30)
    sent = b.stats()["frames_sent"]
    waiting = threading.Thread(target=write)
    waiting.start()
    # The writer asked for the tokens and waits; this thread still runs Python meanwhile.
    while b.stats()["frames_sent"] == sent and waiting.is_alive():
        time.sleep(0.001)
    assert outcome == []
    release.set()
    updater.join()
    waiting.join()
    assert outcome == ["written"]
    assert (holder.read(), holder.version) == (100, 2)


def test_a_wait_longer_than_the_timeout_raises_timeout(cluster):
    a, b = cluster(2, timeout=0.3)
    holder, writer = a.object("x", 0), b.object("x", 0)
    holding, release = threading.Event(), threading.Event()

    def hold(value):
        holding.set()
        release.wait(30)
        return value + 1

    updater = threading.Thread(target=holder.update, args=(hold,))
    updater.start()
    holding.wait(30)
    try:
        with pytest.raises(coherence.Timeout) as caught:
            writer.write(5)
    finally:
        release.set()
        updater.join()
    assert (caught.value.operation, caught.value.object) == ("write", "x")
    assert caught.value.after == pytest.approx(0.3)
    assert isinstance(caught.value, TimeoutError)
    assert writer.read() == 1


def test_ctrl_c_during_a_wait_raises_keyboard_interrupt_when_it_ends():
    script = """
import os, signal, threading, coherence
a, b = coherence.Node.local_cluster(2, timeout=2)
holder, writer = a.object("x", 0), b.object("x", 0)
holding, release = threading.Event(), threading.Event()
def hold(value):
    holding.set()
    release.wait(30)
    return value
updater = threading.Thread(target=holder.update, args=(hold,))
updater.start()
holding.wait(30)
# SIGINT arrives while the write waits for the tokens the update holds.
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    writer.write(1)
    print("written")
except KeyboardInterrupt:
    print("interrupted")
finally:
    release.set()
    updater.join()
"""
    done = run_python(script)
    assert done.stdout.strip() == "interrupted", done.stderr
    assert done.returncode == 0


def test_a_script_exits_without_shutting_its_nodes_down():
    script = """
import threading, coherence
nodes = coherence.Node.local_cluster(3)
objs = [node.object("x", 0) for node in nodes]
threads = [threading.Thread(target=obj.update, args=(lambda v: v + 1,)) for obj in objs]
for t in threads: t.start()
for t in threads: t.join()
print(objs[0].read())
"""
    done = run_python(script)
    assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", "")
