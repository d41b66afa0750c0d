"""Nodes over ZeroMQ: in one process, as two processes, and with a Rust node."""

import ast
import json
import subprocess
import sys

import pytest

import coherence
from conftest import EXAMPLES, PYTHON_DIR, need_tool


def test_two_nodes_in_one_process_share_objects(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not a real secret\n")
    founder = coherence.Node.zmq(secret_file=secret, cluster_id="in-process")
    assert founder.id == 0 and founder.address.startswith("tcp://127.0.0.1:")
    joiner = coherence.Node.zmq(join=founder.address, secret_file=str(secret), cluster_id="in-process")
    with founder, joiner:
        assert joiner.id == 1
        mine = founder.object("x", {"a": 1})
        theirs = joiner.object("x", None)
        theirs.update(lambda d: {**d, "b": 2})
        assert mine.read() == {"a": 1, "b": 2}
        assert mine.version == 1


def test_a_value_larger_than_a_frame_is_refused_before_anything_moves():
    with coherence.Node.zmq(cluster_id="large") as node:
        blob = node.object("blob", b"")
        with pytest.raises(coherence.ValueTooLarge) as caught:
            blob.write(bytes(65 << 20))  # ZeroMQ frames carry at most 64 MiB
        assert caught.value.object == "blob"
        assert caught.value.size > caught.value.limit
        assert (blob.read(), blob.version) == (b"", 0)


def test_bad_addresses_and_ports_in_use_are_refused():
    with pytest.raises(ValueError):
        coherence.Node.zmq("not an address")
    with coherence.Node.zmq() as node:
        with pytest.raises(coherence.StartError):
            coherence.Node.zmq(node.address)


def test_the_zmq_pair_example_loses_no_update():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "zmq_pair.py"), "--rounds", "300"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-2:] == [
        "counter: 600 after 600 updates by 2 processes (version 600)",
        "coherent: yes",
    ]


@pytest.fixture(scope="module")
def rust_peer() -> str:
    """Builds ``examples/rust_peer.rs`` and returns its path."""
    cargo = need_tool("cargo")
    built = subprocess.run(
        [cargo, "build", "--release", "--example", "rust_peer", "--message-format=json",
         "--manifest-path", str(PYTHON_DIR / "Cargo.toml")],
        capture_output=True, text=True, timeout=1800,
    )
    assert built.returncode == 0, built.stderr
    for line in built.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "rust_peer":
            return message["executable"]
    raise AssertionError("cargo built no rust_peer executable")


class Peer:
    """The Rust node: one command per line in, one answer per line out."""

    def __init__(self, executable: str, address: str, cluster_id: str) -> None:
        self.process = subprocess.Popen(
            [executable, address, cluster_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.hello = self.process.stdout.readline().strip()

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def value(self, command: str):
        answer = self.ask(command)
        assert answer.startswith("ok "), answer
        return ast.literal_eval(answer[3:])


def test_a_rust_node_shares_msgpack_objects_with_python(rust_peer):
    node = coherence.Node.zmq(cluster_id="py-rust")
    number = node.object("number", 41, codec="msgpack", rust_type="i64")
    table = node.object("table", {"py": 1}, codec="msgpack", rust_type="BTreeMap<String, i64>")
    node.object("pickled", 7)
    node.object("untyped", 7, codec="msgpack")
    peer = Peer(rust_peer, node.address, "py-rust")
    try:
        assert peer.hello == "ok node 1"
        assert peer.ask("open-i64 number 0") == "ok"
        assert peer.value("read number") == 41
        assert peer.value("add number 1") == 42
        assert (number.read(), number.version) == (42, 1)
        number.write(100)
        assert peer.value("read number") == 100

        assert peer.ask("open-map table") == "ok"
        assert peer.value("insert table rust 2") == {"py": 1, "rust": 2}
        assert table.update(lambda t: {**t, "py": 5}) == {"py": 5, "rust": 2}
        assert peer.value("read table") == {"py": 5, "rust": 2}

        # Another type on either side is a mismatch, named in the error.
        for name in ("pickled", "untyped", "table"):
            answer = peer.ask(f"open-i64 {name} 0")
            assert answer.startswith("error ") and "opened as i64" in answer, answer
        with pytest.raises(coherence.TypeMismatch):
            node.object("number", 0)
        assert peer.ask("bye") == "ok"
        assert peer.process.wait(30) == 0
        # The peer handed its tokens on when it left: nothing was lost.
        assert (number.read(), table.read()) == (100, {"py": 5, "rust": 2})
    finally:
        if peer.process.poll() is None:
            peer.process.kill()
        node.shutdown()
