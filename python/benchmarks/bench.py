"""What the Python binding costs on top of the pickling it cannot avoid.

    python python/benchmarks/bench.py [--quick]

(Not from `python/` itself: there `coherence` would be the source directory, which has no
built extension.)

- Read hit: ``DistObj.read()`` of a value whose token is on this node (no message), against
  ``pickle.loads`` of the same value's pickle plus one Python method call, the least any
  Python wrapper handing out a fresh copy of a pickled value costs. Reads share an immutable
  value and copy plain data and default-pickled instances instead of unpickling them.
- Update: ``DistObj.update(fn)`` on one node (every token here: no message) and on two nodes
  of an in-memory cluster whose threads update one object at once (the tokens move between
  the nodes), against the pickling an update needs: ``pickle.loads`` + ``pickle.dumps``.

Every figure is the best of several timed runs, in nanoseconds per operation, all measured in
the same run. Prints a markdown table.
"""

import dataclasses
import pickle
import sys
import threading
import time
import timeit
from typing import Any, Callable, List, Tuple

import coherence

QUICK = "--quick" in sys.argv
REPEATS = 3 if QUICK else 7

@dataclasses.dataclass
class Point:
    """A dataclass instance: it pickles the default way, so reads rebuild it as
    ``pickle.loads`` would (``__new__``, then its ``__dict__``) without decoding."""

    x: float
    y: float
    label: str


VALUES: List[Tuple[str, Any]] = [
    ("int", 42),
    ("dict of 10 str: int", {f"key{i}": i for i in range(10)}),
    ("list of 1000 floats", [i * 0.5 for i in range(1000)]),
    # Nested lists: copied level by level (a shallow copy would share them).
    ("dict of 10 lists of 10 ints", {f"key{i}": list(range(10)) for i in range(10)}),
    ("dataclass instance", Point(1.0, 2.0, "p")),
]


def best_ns(stmt: Callable[[], Any]) -> float:
    """The fastest per-call time of ``stmt`` over ``REPEATS`` runs of about 0.2 s each."""
    timer = timeit.Timer(stmt)
    number, _ = timer.autorange()
    return min(timer.repeat(REPEATS, number)) / number * 1e9


class Wrapper:
    """Stands for the least a Python object wrapper does: one method call."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def read(self) -> Any:
        return pickle.loads(self.payload)


def contended_update_ns(obj_a: coherence.DistObj, obj_b: coherence.DistObj, rounds: int) -> float:
    """Two threads, one per node, each update the object ``rounds`` times at once; the time
    per update."""
    start = threading.Barrier(3)

    def hammer(obj: coherence.DistObj) -> None:
        start.wait()
        for _ in range(rounds):
            obj.update(lambda v: v)

    threads = [threading.Thread(target=hammer, args=(obj,)) for obj in (obj_a, obj_b)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return (time.perf_counter() - began) / (2 * rounds) * 1e9


def main() -> None:
    alone = coherence.Node.local_cluster(1)[0]
    pair = coherence.Node.local_cluster(2)
    rows = []
    for label, value in VALUES:
        payload = pickle.dumps(value, -1)
        obj = alone.object(label, value)
        obj.read()  # the first read of a version decodes it into this thread's cache
        wrapper = Wrapper(payload)
        read_hit = best_ns(obj.read)
        loads_call = best_ns(wrapper.read)
        update_alone = best_ns(lambda: obj.update(lambda v: v))
        pickling = best_ns(lambda: pickle.dumps(pickle.loads(payload), -1))
        a, b = pair[0].object(label, value), pair[1].object(label, value)
        update_pair = min(contended_update_ns(a, b, 200 if QUICK else 2000) for _ in range(REPEATS))
        rows.append((label, read_hit, loads_call, update_alone, update_pair, pickling))
    for node in [alone] + pair:
        node.shutdown()

    print("| value | read hit | pickle.loads + call | update, 1 node | update, 2 nodes contending | pickle.loads + dumps |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, *figures in rows:
        print(f"| {label} | " + " | ".join(f"{ns:,.0f} ns" for ns in figures) + " |")


if __name__ == "__main__":
    main()
