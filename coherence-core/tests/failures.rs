//! Failures are errors at once, not timeouts:
//! - a transport that fails, or is closed under the node, ends every waiting and later
//!   operation with `Error::Transport` naming the cause, within milliseconds;
//! - an operation on an object from inside that object's own `update` closure is refused at
//!   once with `Error::InsideUpdate` (it would wait for the tokens its own update holds);
//! - a name longer than `Config::max_name_len` is refused at `object()` with
//!   `Error::NameTooLong`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coherence_core::{
    Config, DistObj, Error, Node, NodeId, Transport, TransportError, TransportEvent,
};
use transport_local::LocalTransport;

/// Far longer than any check below may take: an operation that waits for it fails the test.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a failure must reach every waiting caller.
const PROMPT: Duration = Duration::from_millis(100);

/// A local transport that can be made to fail (`recv` returns an I/O error) or to go silent
/// (`recv` returns nothing: the node neither hears nor answers its peers).
struct Breakable {
    inner: LocalTransport,
    broken: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
}

impl Breakable {
    fn new(inner: LocalTransport) -> (Breakable, Arc<AtomicBool>, Arc<AtomicBool>) {
        let broken = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let transport = Breakable {
            inner,
            broken: Arc::clone(&broken),
            silent: Arc::clone(&silent),
        };
        (transport, broken, silent)
    }
}

impl Transport for Breakable {
    fn local_id(&self) -> NodeId {
        self.inner.local_id()
    }

    fn peers(&self) -> Vec<NodeId> {
        self.inner.peers()
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        self.inner.send(to, frame)
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(TransportError::Io("injected failure".into()));
        }
        if self.silent.load(Ordering::SeqCst) {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            return Ok(None);
        }
        self.inner.recv(timeout)
    }

    fn close(&self) {
        self.inner.close()
    }
}

fn config() -> Config {
    Config::default().timeout(TIMEOUT)
}

/// Node 0 (over `t0`) writes while node 1 (over `t1`), which holds a token, has gone silent,
/// so the write waits; then `fault` strikes node 0's transport. Checks that the write ends
/// within [`PROMPT`] of the fault with an error `expected` accepts, then hands node 0 and its
/// handle to `after`.
fn write_through_a_fault(
    t0: impl Transport,
    t1: LocalTransport,
    fault: impl FnOnce(),
    expected: impl Fn(&Error) -> bool,
    after: impl FnOnce(Node, DistObj<u64>),
) {
    let (t1, _, silent) = Breakable::new(t1);
    let n0 = Node::start(t0, config()).unwrap();
    let n1 = Node::start(t1, config()).unwrap();
    let x0 = n0.object("x", 0u64).unwrap();
    let x1 = n1.object("x", 0u64).unwrap();
    // Under the default Update policy node 1 keeps a token after this write.
    x1.write(1).unwrap();
    silent.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let waiting = s.spawn(|| x0.write(2));
        // Let the write start and wait for node 1's token.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiting.is_finished(),
            "the write cannot complete without node 1"
        );
        let struck_at = Instant::now();
        fault();
        let result = waiting.join().unwrap();
        let took = struck_at.elapsed();
        assert!(
            result.as_ref().is_err_and(&expected),
            "the waiting write ends with the transport's failure, got {result:?}"
        );
        assert!(
            took < PROMPT,
            "the failure took {took:?} to reach the caller"
        );
    });
    after(n0, x0);
    silent.store(false, Ordering::SeqCst);
    drop(n1);
}

#[test]
fn a_failed_transport_ends_waiting_and_later_operations_at_once() {
    let mut transports = transport_local::cluster(2).into_iter();
    let (t0, broken, _) = Breakable::new(transports.next().unwrap());
    write_through_a_fault(
        t0,
        transports.next().unwrap(),
        || broken.store(true, Ordering::SeqCst),
        |e| matches!(e, Error::Transport { node: 0, cause: TransportError::Io(reason) } if reason == "injected failure"),
        |n0, x0| {
            // Later operations fail at once with the same cause, reads included.
            let started = Instant::now();
            assert!(matches!(
                x0.update(|v| *v += 1),
                Err(Error::Transport { .. })
            ));
            assert!(matches!(x0.read(), Err(Error::Transport { .. })));
            assert!(matches!(n0.object("y", 0u64), Err(Error::Transport { .. })));
            assert!(started.elapsed() < PROMPT);
            let shutdown = n0.shutdown();
            assert!(
                matches!(shutdown, Err(Error::Transport { .. })),
                "shutdown reports the failure, got {shutdown:?}"
            );
        },
    );
}

/// Someone closes the transport under the node (not through `shutdown`).
#[test]
fn a_transport_closed_under_the_node_is_an_error_not_a_timeout() {
    let mut transports = transport_local::cluster(2).into_iter();
    let t0 = Arc::new(transports.next().unwrap());
    write_through_a_fault(
        Arc::clone(&t0),
        transports.next().unwrap(),
        || t0.close(),
        |e| {
            matches!(
                e,
                Error::Transport {
                    cause: TransportError::Closed,
                    ..
                }
            )
        },
        |_, x0| assert!(matches!(x0.read(), Err(Error::Transport { .. }))),
    );
}

#[test]
fn operations_inside_an_objects_own_update_are_refused_at_once() {
    let node = Node::start(transport_local::cluster(1).pop().unwrap(), config()).unwrap();
    let x = node.object("x", 0u64).unwrap();
    let other = node.object("other", 0u64).unwrap();
    let started = Instant::now();
    let inner = x
        .update(|v| {
            *v += 1;
            (
                x.read().map(|v| *v),
                x.write(7),
                x.update(|v| *v),
                x.try_read().map(|v| v.map(|v| *v)),
                // Another object is fine.
                other.update(|o| {
                    *o += 1;
                    *o
                }),
            )
        })
        .unwrap();
    assert!(started.elapsed() < PROMPT, "refused at once");
    let (read, write, update, try_read, other_update) = inner;
    for result in [
        read.map(|_| ()),
        write,
        update.map(|_| ()),
        try_read.map(|_| ()),
    ] {
        assert!(
            matches!(&result, Err(Error::InsideUpdate { object, .. }) if object == "x"),
            "got {result:?}"
        );
    }
    assert_eq!(other_update.unwrap(), 1);
    // The update itself went through, and the guard is gone afterwards.
    assert_eq!(*x.read().unwrap(), 1);
    x.write(5).unwrap();
    assert_eq!(*x.read().unwrap(), 5);
    node.shutdown().unwrap();
}

#[test]
fn a_name_longer_than_the_limit_is_refused_at_open() {
    let config = config().max_name_len(16);
    let node = Node::start(transport_local::cluster(1).pop().unwrap(), config).unwrap();
    let long = "n".repeat(17);
    let result = node.object(&long, 0u64);
    assert!(
        matches!(result, Err(Error::NameTooLong { len: 17, max: 16 })),
        "got {result:?}"
    );
    // At the limit it opens, and the default limit is a few hundred bytes.
    node.object(&"n".repeat(16), 0u64).unwrap();
    assert_eq!(Config::default().max_name_len, 256);
    node.shutdown().unwrap();
}

#[test]
fn an_update_whose_closure_refuses_writes_nothing() {
    let node = Node::start(transport_local::cluster(1).pop().unwrap(), config()).unwrap();
    let x = node.object("x", 1u64).unwrap();
    let refused = x
        .try_update(|v| {
            *v = 99;
            Err::<(), _>("no")
        })
        .unwrap();
    assert_eq!(refused, Err("no"));
    assert_eq!(
        (*x.read().unwrap(), x.version()),
        (1, 0),
        "nothing was written"
    );
    assert_eq!(x.try_update(|v| Ok::<_, ()>(*v + 1)).unwrap(), Ok(2));
    // The closure's change is written only when it returns Ok.
    x.try_update(|v| {
        *v = 5;
        Ok::<_, ()>(())
    })
    .unwrap()
    .unwrap();
    assert_eq!(*x.read().unwrap(), 5);
    node.shutdown().unwrap();
}
