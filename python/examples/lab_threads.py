"""The lab's scenario on threads of one process, each with its own node of an in-memory
cluster (``Node.local_cluster``)::

    python python/examples/lab_threads.py [N]

N nodes (default 4): threads 0 to N-2 take turns in the integer and dictionary tests, the last
one opens the objects late and must see the current values. Prints the report, ending with
``coherent: yes``.
"""

import sys
import threading

import coherence
from lab_scenario import Participant, report

n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
if n < 2:
    sys.exit("the scenario needs at least 2 nodes")
nodes = coherence.Node.local_cluster(n)
barrier = threading.Barrier(n)
participants = [Participant(rank, takers=n - 1) for rank in range(n)]


def play(rank: int) -> None:
    me = participants[rank]
    try:
        me.run(nodes[rank].object, barrier.wait)
    except threading.BrokenBarrierError:
        me.problems.append(f"rank {rank} stopped: another rank failed")
    except Exception as e:  # recorded for the report; the other threads must not wait forever
        me.problems.append(f"rank {rank} failed: {e!r}")
        barrier.abort()


threads = [threading.Thread(target=play, args=(rank,)) for rank in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for node in nodes:
    node.shutdown()
if not report([(p.seen, p.problems) for p in participants], n):
    sys.exit(1)
