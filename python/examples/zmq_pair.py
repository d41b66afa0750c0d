"""Two Python processes share a counter over ZeroMQ, on one machine or on two hosts.

    python python/examples/zmq_pair.py          # on this machine: it starts its partner itself

    # One process per host, with the same secret file on both:
    head -c 32 /dev/urandom | base64 > secret
    python zmq_pair.py --listen tcp://10.0.0.1:7000 --secret-file secret
    python zmq_pair.py --listen tcp://10.0.0.2:7000 --join tcp://10.0.0.1:7000 --secret-file secret

Once both processes are there, each adds 1 to the shared counter ``--rounds`` times with
``update``, their updates interleaving, then counts itself done. The founder (the process
without ``--join``) waits for both, checks that no update was lost and prints
``coherent: yes``.
"""

import argparse
import base64
import os
import subprocess
import sys
import time

import coherence

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--listen", default="tcp://127.0.0.1:0", help="address to bind")
parser.add_argument("--join", help="address of the founder; without it, found the cluster")
parser.add_argument("--secret-file", help="shared secret (else COHERENCE_SECRET)")
parser.add_argument("--cluster-id", default="zmq-pair")
parser.add_argument("--rounds", type=int, default=1000)
args = parser.parse_args()

alone = args.join is None and args.listen.startswith("tcp://127.0.0.1:")
if alone and args.secret_file is None and "COHERENCE_SECRET" not in os.environ:
    # Both processes on this machine: a fresh secret, which the partner inherits.
    os.environ["COHERENCE_SECRET"] = base64.b64encode(os.urandom(32)).decode()

node = coherence.Node.zmq(
    args.listen, args.join, secret_file=args.secret_file, cluster_id=args.cluster_id
)
counter = node.object("counter", 0)
started = node.object("started", 0)
finished = node.object("finished", 0)


def wait_for(obj: coherence.DistObj, count: int) -> None:
    """Waits until ``obj`` counts both processes; reads are local, the sleep yields the core."""
    deadline = time.monotonic() + 60
    while obj.read() < count:
        if time.monotonic() > deadline:
            sys.exit(f"node {node.id}: the other process did not come within 60 s")
        time.sleep(0.001)


partner = None
if alone:
    partner = subprocess.Popen(
        [sys.executable, __file__, "--join", node.address, "--cluster-id", args.cluster_id,
         "--rounds", str(args.rounds)]
    )
elif args.join is None:
    print(f"node 0 listening on {node.address}; start the partner with --join {node.address}")

started.update(lambda n: n + 1)
wait_for(started, 2)
for _ in range(args.rounds):
    counter.update(lambda n: n + 1)
finished.update(lambda n: n + 1)
print(f"node {node.id}: {args.rounds} updates done")

if args.join is not None:
    node.shutdown()  # hands its tokens to the founder: nothing is lost
    sys.exit(0)

wait_for(finished, 2)
if partner is not None and partner.wait(60) != 0:
    sys.exit("the partner process failed")
total, version, expected = counter.read(), counter.version, 2 * args.rounds
node.shutdown()
print(f"counter: {total} after {expected} updates by 2 processes (version {version})")
print(f"coherent: {'yes' if total == expected else 'no'}")
sys.exit(0 if total == expected else 1)
