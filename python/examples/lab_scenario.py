"""The lab's scenario, shared by ``lab_mpi.py`` (ranks of an MPI job) and ``lab_threads.py``
(threads of one process).

``takers`` participants with ranks ``0..takers`` take turns: in the integer test each writes a
distinct value to one object, in the dictionary test each inserts its own key into another,
and after every turn every participant reads and checks that it sees exactly what was written,
at the right version. Every read returns a copy: a participant changes the copy it read and
checks that the object did not change (the lab's bug was handing out the live object). Then
the late opener, which took no part so far, opens both objects with other initial values and
must see the current ones.
"""

from typing import Any, Callable, Dict, List, Tuple

# Steps of the report, in scenario order.
INT_OPENED, INT_WRITE, DICT_OPENED, DICT_INSERT, LATE = range(5)

_INT_TEST = 'integer test: each rank writes "int" in turn, every rank reads it'
_DICT_TEST = 'dictionary test: each rank inserts its key into "dict" in turn, every rank reads it'
SECTION = {
    INT_OPENED: _INT_TEST,
    INT_WRITE: _INT_TEST,
    DICT_OPENED: _DICT_TEST,
    DICT_INSERT: _DICT_TEST,
    LATE: "late opener: a rank that took no part opens both objects with other initial values",
}

# (step, turn, rank, text)
Observation = Tuple[int, int, int, str]


def int_value(turn: int) -> int:
    """What the rank with this turn writes to "int"."""
    return (turn + 1) * 10


def dict_after(turns: int) -> Dict[str, int]:
    """ "dict" once the ranks 0..turns inserted their keys."""
    return {f"node{t}": (t + 1) * 100 for t in range(turns)}


class Participant:
    """One rank's part: what it saw and what was wrong."""

    def __init__(self, rank: int, takers: int) -> None:
        self.rank = rank
        self.takers = takers
        self.seen: List[Observation] = []
        self.problems: List[str] = []

    def check(self, step: int, turn: int, name: str, obj: Any, expected: Any, version: int, when: str) -> None:
        """Reads ``obj``, records what it saw, and checks the value, the version and that
        changing the copy read leaves the object alone."""
        value = obj.read()
        self.seen.append((step, turn, self.rank, f"{name}: read {value!r} {when} (version {obj.version})"))
        if value != expected:
            self.problems.append(f"rank {self.rank} read {value!r} from {name!r} {when}, expected {expected!r}")
        if obj.version != version:
            self.problems.append(
                f"rank {self.rank} holds version {obj.version} of {name!r} {when}, expected {version}"
            )
        if isinstance(value, dict):
            value["changed by the reader"] = -1
            if obj.read() != expected:
                self.problems.append(f"rank {self.rank} changed {name!r} by changing a copy it read")

    def run(self, open_object: Callable[[str, Any], Any], barrier: Callable[[], object]) -> None:
        """The whole scenario for this rank. ``open_object(name, init)`` opens an object;
        ``barrier()`` returns once every participant, the late opener included, called it."""
        late = self.rank == self.takers

        number = None
        if not late:
            number = open_object("int", 0)
            self.check(INT_OPENED, 0, "int", number, 0, 0, "on open")
        barrier()
        for turn in range(self.takers):
            if turn == self.rank:
                number.write(int_value(turn))
            barrier()
            if not late:
                when = f"after rank {turn}'s write"
                self.check(INT_WRITE, turn, "int", number, int_value(turn), turn + 1, when)
            barrier()

        table = None
        if not late:
            table = open_object("dict", {})
            self.check(DICT_OPENED, 0, "dict", table, {}, 0, "on open")
        barrier()
        for turn in range(self.takers):
            if turn == self.rank:
                key, value = f"node{turn}", (turn + 1) * 100
                table.update(lambda d: {**d, key: value})
            barrier()
            if not late:
                when = f"after rank {turn}'s insert"
                self.check(DICT_INSERT, turn, "dict", table, dict_after(turn + 1), turn + 1, when)
            barrier()

        if late:
            n = self.takers
            number = open_object("int", -1)
            self.check(LATE, 0, "int", number, int_value(n - 1), n, "on open, not its init -1")
            table = open_object("dict", {"late": -1})
            self.check(LATE, 1, "dict", table, dict_after(n), n, "on open, not its init {'late': -1}")


def report(results: List[Tuple[List[Observation], List[str]]], ranks: int) -> bool:
    """Prints every rank's observations in scenario order, then the verdict as the last line;
    returns whether the run was coherent."""
    seen = sorted(o for observations, _ in results for o in observations)
    problems = [p for _, found in results for p in found]
    if len(results) != ranks:
        problems.append(f"only {len(results)} of {ranks} ranks reported")
    section = None
    for step, _, rank, text in seen:
        heading = SECTION[step]
        if heading != section:
            section = heading
            print(f"\n{heading}")
        print(f"  rank {rank}: {text}")
    print()
    for problem in problems:
        print(f"problem: {problem}")
    print(f"coherent: {'no' if problems else 'yes'}", flush=True)
    return not problems
