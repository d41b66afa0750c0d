//! The driver and the public handles: [`Node`] owns one transport and one [`Protocol`];
//! [`DistObj`] is a typed handle on one object.
//!
//! The protocol state sits behind one mutex. The driver thread feeds it network input; user
//! threads feed it their operations and wait on a one-shot channel for the outcome. Every step
//! applies the protocol's events (readability, completions) before its messages are sent, and
//! sends happen under the mutex, so per-pair order is the order the protocol produced. A read of
//! an object whose token is here never takes the mutex: it loads the decoded value from a
//! lock-free cell the driver keeps current.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cell::{self, Cell};
use crate::config::Config;
use crate::error::Error;
use crate::protocol::{Event, OpId, Outcome, Protocol};
use crate::transport::{receive_polling, NodeId, Transport, TransportError, TransportEvent};
use crate::wire::{self, Init, Message};

/// Counters of one node's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Frames handed to the transport.
    pub frames_sent: u64,
    /// Protocol messages inside those frames.
    pub messages_sent: u64,
    /// Frames received and decoded.
    pub frames_received: u64,
    /// Frames dropped because they could not be decoded.
    pub frames_rejected: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    messages_sent: AtomicU64,
    frames_received: AtomicU64,
    frames_rejected: AtomicU64,
}

fn encode_value<T: Serialize>(object: &str, value: &T) -> Result<Bytes, Error> {
    rmp_serde::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| Error::Encode {
            object: object.to_string(),
            reason: e.to_string(),
        })
}

/// Everything behind the mutex.
struct Core {
    protocol: Protocol,
    waiters: HashMap<OpId, Sender<Outcome>>,
    cells: HashMap<String, Arc<Cell>>,
    left: Option<Sender<()>>,
}

struct Inner {
    id: NodeId,
    config: Config,
    transport: Arc<dyn Transport>,
    core: Mutex<Core>,
    stopped: AtomicBool,
    /// Tells the driver thread to exit (after the leave completed or timed out).
    halt: AtomicBool,
    next_op: AtomicU64,
    counters: Counters,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the protocol state as it was after the last
        // completed step, so it is safe to go on.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[inline]
    fn check_running(&self) -> Result<(), Error> {
        if self.stopped.load(Ordering::Acquire) {
            Err(Error::Stopped(self.id))
        } else {
            Ok(())
        }
    }

    /// Runs one protocol input, then applies its events and sends its messages.
    fn step(&self, core: &mut Core, input: impl FnOnce(&mut Protocol)) {
        input(&mut core.protocol);
        self.flush(core);
    }

    fn flush(&self, core: &mut Core) {
        for event in core.protocol.take_events() {
            match event {
                Event::Readable { object, value } => {
                    core.cells.entry(object).or_default().publish(&value);
                }
                Event::Unreadable { object } => {
                    if let Some(cell) = core.cells.get(&object) {
                        cell.invalidate();
                    }
                }
                Event::Completed { op, outcome } => {
                    if let Some(waiter) = core.waiters.remove(&op) {
                        // The waiter may have timed out and gone; nothing to do then.
                        let _ = waiter.send(outcome);
                    }
                }
                Event::Left => {
                    if let Some(done) = core.left.take() {
                        let _ = done.send(());
                    }
                }
            }
        }
        let sends = core.protocol.take_sends();
        if sends.is_empty() {
            return;
        }
        // One frame per destination; a BTreeMap keeps the order of messages to each peer.
        let mut batches: BTreeMap<NodeId, Vec<Message>> = BTreeMap::new();
        for (to, message) in sends {
            tracing::trace!(node = self.id, to, msg = ?message, "send");
            batches.entry(to).or_default().push(message);
        }
        for (to, messages) in batches {
            let count = messages.len() as u64;
            match self.transport.send(to, wire::encode(&messages)) {
                Ok(()) => {
                    self.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .messages_sent
                        .fetch_add(count, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(node = self.id, to, error = %e, "frame not sent"),
            }
        }
    }

    /// Starts operation `start` and waits for its outcome, cancelling it on timeout.
    fn run_op(
        &self,
        operation: &'static str,
        object: &str,
        start: impl FnOnce(&mut Protocol, OpId),
    ) -> Result<Outcome, Error> {
        self.run_op_with_id(operation, object, start)
            .map(|(_, outcome)| outcome)
    }

    /// [`Inner::run_op`], also returning the operation's id.
    fn run_op_with_id(
        &self,
        operation: &'static str,
        object: &str,
        start: impl FnOnce(&mut Protocol, OpId),
    ) -> Result<(OpId, Outcome), Error> {
        self.check_running()?;
        let op = self.next_op.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let mut core = self.lock();
            core.waiters.insert(op, tx);
            self.step(&mut core, |p| start(p, op));
        }
        Ok((op, self.wait(operation, object, op, &rx)?))
    }

    fn wait(
        &self,
        operation: &'static str,
        object: &str,
        op: OpId,
        rx: &Receiver<Outcome>,
    ) -> Result<Outcome, Error> {
        let outcome = match receive_polling(rx, self.config.spin, self.config.timeout) {
            Ok(outcome) => outcome,
            Err(_) => {
                let mut core = self.lock();
                core.waiters.remove(&op);
                let mut cancelled = false;
                self.step(&mut core, |p| cancelled = p.cancel(op));
                drop(core);
                if cancelled {
                    tracing::warn!(node = self.id, operation, object, "operation timed out");
                    return Err(Error::Timeout {
                        operation,
                        object: object.to_string(),
                        after: self.config.timeout,
                    });
                }
                // It completed while we gave up: the outcome is in the channel.
                rx.try_recv().map_err(|_| Error::Stopped(self.id))?
            }
        };
        match outcome {
            Outcome::Aborted => Err(Error::Stopped(self.id)),
            outcome => Ok(outcome),
        }
    }

    /// The driver thread: feeds network input to the protocol until halted. It also starts the
    /// leave `shutdown` asked for, after handling everything the transport already delivered:
    /// a `Joined` queued before the leave must be seen, or the leaver could believe itself
    /// alone and take the objects with it.
    fn drive(self: Arc<Self>) {
        let mut leave_started = false;
        while !self.halt.load(Ordering::Acquire) {
            if !leave_started && self.stopped.load(Ordering::Acquire) {
                while let Ok(Some(event)) = self.transport.recv(Duration::ZERO) {
                    self.handle_event(event);
                }
                let mut core = self.lock();
                self.step(&mut core, Protocol::leave);
                leave_started = true;
                continue;
            }
            match self.transport.recv(self.config.poll_interval) {
                Ok(Some(event)) => self.handle_event(event),
                Ok(None) => {}
                Err(TransportError::Closed) => break,
                Err(e) => {
                    tracing::error!(node = self.id, error = %e, "transport failed");
                    break;
                }
            }
        }
    }

    fn handle_event(&self, event: TransportEvent) {
        let mut core = self.lock();
        match event {
            TransportEvent::Frame { from, bytes } => match wire::decode(&bytes) {
                Ok(messages) => {
                    self.counters
                        .frames_received
                        .fetch_add(1, Ordering::Relaxed);
                    for message in messages {
                        tracing::trace!(node = self.id, from, msg = ?message, "receive");
                        self.step(&mut core, |p| p.handle(from, message));
                    }
                }
                Err(e) => {
                    self.counters
                        .frames_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = self.id, from, error = %e, "frame rejected");
                }
            },
            TransportEvent::Joined(peer) => {
                tracing::debug!(node = self.id, peer, "peer joined");
                self.step(&mut core, |p| p.peer_joined(peer));
            }
            TransportEvent::Left(peer) => {
                tracing::debug!(node = self.id, peer, "peer left");
                self.step(&mut core, |p| p.peer_left(peer));
            }
        }
    }

    fn cell(&self, object: &str) -> Arc<Cell> {
        Arc::clone(self.lock().cells.entry(object.to_string()).or_default())
    }
}

/// One member of a cluster: owns a transport, runs the protocol on a driver thread, and opens
/// objects. `Send + Sync`: share it (or its handles) between threads.
pub struct Node {
    inner: Arc<Inner>,
    driver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).finish()
    }
}

impl Node {
    /// Joins the cluster `transport` belongs to and starts the driver thread.
    pub fn start<T: Transport>(transport: T, config: Config) -> Result<Node, Error> {
        let id = transport.local_id();
        let protocol = Protocol::new(id, transport.peers(), config.write_policy);
        tracing::debug!(node = id, peers = ?protocol.members(), "node starting");
        let inner = Arc::new(Inner {
            id,
            config,
            transport: Arc::new(transport),
            core: Mutex::new(Core {
                protocol,
                waiters: HashMap::new(),
                cells: HashMap::new(),
                left: None,
            }),
            stopped: AtomicBool::new(false),
            halt: AtomicBool::new(false),
            next_op: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let driver_inner = Arc::clone(&inner);
        let driver = std::thread::Builder::new()
            .name(format!("coherence-node-{id}"))
            .spawn(move || driver_inner.drive())
            .map_err(|e| Error::Spawn(e.to_string()))?;
        Ok(Node {
            inner,
            driver: Some(driver),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Traffic counters.
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        NodeStats {
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            messages_sent: c.messages_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            frames_rejected: c.frames_rejected.load(Ordering::Relaxed),
        }
    }

    /// Opens the object `name`: joins it with its current value if it exists anywhere in the
    /// cluster, otherwise creates it with `init` (when several nodes create a name at once,
    /// exactly one `init` wins).
    pub fn object<T>(&self, name: &str, init: T) -> Result<DistObj<T>, Error>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let type_name = std::any::type_name::<T>();
        let init = Init {
            type_name: type_name.to_string(),
            bytes: encode_value(name, &init)?,
        };
        let outcome = self
            .inner
            .run_op("open", name, |p, op| p.open(op, name, init))?;
        let Outcome::Opened(value) = outcome else {
            unreachable!("open completes with Opened, got {outcome:?}")
        };
        if value.type_name != type_name {
            return Err(Error::TypeMismatch {
                object: name.to_string(),
                expected: type_name.to_string(),
                found: value.type_name,
            });
        }
        Ok(DistObj {
            name: name.into(),
            cell: self.inner.cell(name),
            node: Arc::clone(&self.inner),
            _type: PhantomData,
        })
    }

    /// Leaves the cluster: hands every token on so the remaining nodes lose nothing, waits for
    /// every peer to acknowledge, then stops the driver and closes the transport. Handles of
    /// this node return [`Error::Stopped`] afterwards.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        let Some(driver) = self.driver.take() else {
            return Ok(());
        };
        let inner = &self.inner;
        let (tx, rx) = crossbeam_channel::bounded(1);
        // New operations fail from now on; the driver thread starts the leave.
        inner.lock().left = Some(tx);
        inner.stopped.store(true, Ordering::Release);
        let acknowledged = rx.recv_timeout(inner.config.timeout).is_ok();
        inner.lock().left = None;
        inner.halt.store(true, Ordering::Release);
        inner.transport.close();
        if driver.join().is_err() {
            tracing::error!(node = inner.id, "driver thread panicked");
        }
        tracing::debug!(node = inner.id, acknowledged, "node stopped");
        if acknowledged {
            Ok(())
        } else {
            Err(Error::Timeout {
                operation: "shutdown",
                object: String::new(),
                after: inner.config.timeout,
            })
        }
    }
}

impl Drop for Node {
    /// A node dropped without `shutdown` still leaves properly, so no token is lost.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(node = self.inner.id, error = %e, "shutdown on drop failed");
        }
    }
}

/// A typed handle on one replicated object. Cheap to clone; usable from any thread.
pub struct DistObj<T> {
    name: Arc<str>,
    cell: Arc<Cell>,
    node: Arc<Inner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DistObj<T> {
    fn clone(&self) -> Self {
        DistObj {
            name: Arc::clone(&self.name),
            cell: Arc::clone(&self.cell),
            node: Arc::clone(&self.node),
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for DistObj<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistObj")
            .field("name", &self.name)
            .field("node", &self.node.id)
            .finish()
    }
}

impl<T> DistObj<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current value. Local (no message, no lock, no decoding after the first read of a
    /// version) while this node holds a token; otherwise fetches a token and the value.
    #[inline]
    pub fn read(&self) -> Result<Arc<T>, Error> {
        if let Some(value) = self.try_read()? {
            return Ok(value);
        }
        let outcome = self
            .node
            .run_op("read", &self.name, |p, op| p.read(op, &self.name))?;
        let (Outcome::Read(value) | Outcome::Opened(value)) = outcome else {
            unreachable!("read completes with Read, got {outcome:?}")
        };
        self.cell.saw_version(value.version);
        Ok(Arc::new(cell::decode(&self.name, &value.bytes)?))
    }

    /// The current value if this node holds a token, without waiting; `Ok(None)` otherwise.
    #[inline]
    pub fn try_read(&self) -> Result<Option<Arc<T>>, Error> {
        self.node.check_running()?;
        self.cell.read(&self.name)
    }

    /// Replaces the value once this node holds every token.
    pub fn write(&self, value: T) -> Result<(), Error> {
        let bytes = encode_value(&self.name, &value)?;
        let outcome = self
            .node
            .run_op("write", &self.name, |p, op| p.write(op, &self.name, bytes))?;
        let Outcome::Written { version } = outcome else {
            unreachable!("write completes with Written, got {outcome:?}")
        };
        self.cell.saw_version(version);
        Ok(())
    }

    /// Atomic read-modify-write: gathers every token, runs `f` on the current value, writes the
    /// result. No other write can come between the read and the write.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, Error> {
        let (op, outcome) = self
            .node
            .run_op_with_id("update", &self.name, |p, op| p.lock(op, &self.name))?;
        let Outcome::Granted(value) = outcome else {
            unreachable!("lock completes with Granted, got {outcome:?}")
        };
        // Released without a write if anything below fails or `f` panics.
        let lock = Lock {
            node: &self.node,
            op,
        };
        let mut current: T = cell::decode(&self.name, &value.bytes)?;
        let result = f(&mut current);
        let bytes = encode_value(&self.name, &current)?;
        self.cell.saw_version(lock.commit(bytes)?);
        Ok(result)
    }

    /// Number of writes applied to the value this node holds (or last held).
    pub fn version(&self) -> u64 {
        self.cell.last_version()
    }
}

/// A granted update. Dropped without [`Lock::commit`] (decoding, the closure or encoding
/// failed), it releases the object unchanged.
struct Lock<'a> {
    node: &'a Inner,
    op: OpId,
}

impl Lock<'_> {
    /// Writes `bytes` and releases the object; fails if the node stopped meanwhile.
    fn commit(self, bytes: Bytes) -> Result<u64, Error> {
        let node = self.node;
        let op = self.op;
        std::mem::forget(self);
        let mut version = None;
        let mut core = node.lock();
        node.step(&mut core, |p| version = p.commit(op, Some(bytes)));
        version.ok_or(Error::Stopped(node.id))
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        let mut core = self.node.lock();
        self.node.step(&mut core, |p| {
            p.commit(self.op, None);
        });
    }
}
