//! MPI transport for coherence: ranks are node ids, and the thread that waits makes the MPI
//! calls.
//!
//! What this crate is for: moving the protocol's frames between the ranks of an MPI job and
//! reporting when a rank leaves. What it must not do: know anything of tokens or objects, or
//! decide anything for the protocol.
//!
//! Every MPI call is made under the transport's own lock, by the thread that needs it: a
//! [`Transport::send`] starts an immediate send (`MPI_Isend`) itself, and a thread waiting in
//! [`Transport::recv`] probes (`MPI_Improbe` + `MPI_Mrecv`, frames of any size) itself, so the
//! round trip of a write crosses no thread hand-off (a futex wake-up costs tens of
//! microseconds, a shared-memory MPI round trip about one). A background keeper thread drives
//! MPI only when nobody has for a while (so sends still complete and goodbyes are answered on
//! a node that nobody receives from).
//!
//! Two ways to start:
//! - [`MpiTransport::init`]: the transport owns MPI. Its keeper thread initializes MPI, asking
//!   for `MPI_THREAD_MULTIPLE`; `MULTIPLE` or `SERIALIZED` gives the direct calls above. If the
//!   library grants only `FUNNELED`, the keeper makes every MPI call and the other threads
//!   exchange frames with it through queues (slower by a thread hand-off per frame, but
//!   correct). `close` finalizes MPI on the keeper, the thread that initialized it. The program
//!   makes no MPI calls of its own.
//! - [`MpiTransport::attach`]: the program (its own rsmpi `Universe`, or mpi4py) initialized MPI
//!   with `MPI_THREAD_MULTIPLE` and keeps making its own MPI calls. The transport works on a
//!   duplicate of the world communicator, so its traffic never mixes with the program's, and
//!   never initializes or finalizes MPI.
//!
//! [`Transport::close`] sends a goodbye to every rank and returns once every send completed and
//! every rank said goodbye: like `MPI_Finalize`, it returns when every rank has closed.
//!
//! ```no_run
//! use coherence_core::{Config, Node};
//! let transport = transport_mpi::MpiTransport::init().expect("MPI starts");
//! let node = Node::start(transport, Config::default()).expect("node starts");
//! let counter = node.object("counter", 0i64).expect("opens");
//! counter.update(|c| *c += 1).expect("updates");
//! node.shutdown().expect("leaves");
//! ```
//!
//! With MPI initialized by the program:
//!
//! ```no_run
//! use coherence_core::{Config, Node};
//! let (universe, threading) =
//!     mpi::initialize_with_threading(mpi::Threading::Multiple).expect("MPI starts");
//! assert_eq!(threading, mpi::Threading::Multiple);
//! let node = Node::start(transport_mpi::MpiTransport::attach().expect("attaches"), Config::default())
//!     .expect("node starts");
//! // ... the program's own MPI calls on `universe.world()` go on meanwhile ...
//! node.shutdown().expect("leaves");
//! drop(universe); // MPI_Finalize, by the program
//! ```
#![deny(missing_docs)]

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coherence_core::wait::{self, Backoff, Sleeper};
use coherence_core::{NodeId, Transport, TransportError, TransportEvent};
pub use mpi::environment::Threading;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// Tag of protocol frames on the transport's own communicator.
const FRAME_TAG: i32 = 1;
/// Tag of the goodbye a rank sends when it closes.
const GOODBYE_TAG: i32 = 2;

/// MPI counts a message's bytes in a C `int`.
const MAX_FRAME: usize = i32::MAX as usize;

/// The environment variable [`MpiTransport::init`] reads for the threading level to ask for:
/// `multiple` (the default), `serialized` or `funneled`. `funneled` makes one thread do every
/// MPI call, for MPI libraries whose multi-threaded mode is unreliable.
pub const THREADING_ENV: &str = "COHERENCE_MPI_THREADING";

/// Why the MPI transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum MpiError {
    /// [`MpiTransport::init`] found MPI already initialized (by the program, or by an earlier
    /// transport of this process); use [`MpiTransport::attach`] then.
    #[error("MPI is already initialized in this process (use MpiTransport::attach)")]
    AlreadyInitialized,
    /// [`MpiTransport::attach`] found MPI not initialized, or already finalized.
    #[error("MPI is not initialized (or already finalized): nothing to attach to")]
    NotInitialized,
    /// The MPI library grants too little thread support: `init` needs `FUNNELED` or better,
    /// `attach` needs `MULTIPLE` (the program makes MPI calls of its own meanwhile).
    #[error("the MPI library grants {granted:?} threading, {needed} is needed")]
    Threading {
        /// What MPI granted.
        granted: Threading,
        /// What this way of starting needs.
        needed: &'static str,
    },
    /// [`THREADING_ENV`] holds something other than `multiple`, `serialized` or `funneled`.
    #[error("{THREADING_ENV}={0:?}: expected multiple, serialized or funneled")]
    ThreadingEnv(String),
    /// The keeper thread could not be started.
    #[error("cannot start the MPI keeper thread: {0}")]
    Spawn(String),
    /// The keeper thread ended before reporting the rank.
    #[error("the MPI keeper thread died during start-up")]
    StartUp,
}

/// One rank's endpoint. Node ids are MPI ranks of the world communicator; rank 0 founds the
/// cluster.
pub struct MpiTransport {
    shared: Arc<Shared>,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

/// Who may call MPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Calls {
    /// Any thread, under the engine's lock (`MULTIPLE` or `SERIALIZED`).
    Direct,
    /// Only the keeper thread (`FUNNELED`); others go through the engine's queues.
    Keeper,
}

struct Shared {
    rank: NodeId,
    size: u32,
    /// Ranks on this machine, this one included (`MPI_Comm_split_type` with
    /// `MPI_COMM_TYPE_SHARED`), reported to the wait policy.
    colocated: usize,
    calls: Calls,
    engine: Mutex<Engine>,
    /// `close` was called: sends and receives fail from now on.
    closed: AtomicBool,
    /// Per rank: it said goodbye, so frames to it would never be received.
    departed: Box<[AtomicBool]>,
    /// Counts entries into `recv`; the keeper drives MPI only when it did not move.
    entries: AtomicU64,
    /// A thread waiting in `recv`: woken by a send (direct calls: it should probe for the
    /// answer) or by the keeper's arrivals (keeper calls).
    receiver: Sleeper,
    /// The keeper: woken by a send (keeper calls) and to stop.
    keeper: Sleeper,
    /// Tells the keeper to finish: finalize (if it initialized MPI) and end.
    stop: AtomicBool,
}

/// MPI state; every MPI call happens with this locked.
struct Engine {
    /// The transport's own communicator; `None` once freed at close.
    comm: Option<SimpleCommunicator>,
    in_flight: Vec<InFlight>,
    /// Received, not yet handed out.
    arrived: VecDeque<TransportEvent>,
    /// Keeper calls only: frames the keeper has to send.
    outbox: VecDeque<(NodeId, Vec<u8>)>,
    goodbyes: BTreeSet<NodeId>,
    /// `close` asked for the goodbyes: frames after them would arrive after the `Left` peers
    /// report for us, so they are dropped.
    closing: bool,
    /// The goodbyes are on their way (sent by whichever thread may call MPI).
    goodbyes_sent: bool,
    rank: NodeId,
    size: u32,
}

// SAFETY: the engine holds MPI handles (a communicator, requests) that are plain handles in
// MPICH and pointers in Open MPI. MPI lets any thread use them under `MULTIPLE`, and under
// `SERIALIZED` as long as no two threads call MPI at once: every MPI call on them is made with
// the engine's mutex held. Under `FUNNELED` only the keeper thread makes those calls (other
// threads lock the engine only for its queues).
unsafe impl Send for Engine {}

/// Locks a mutex, ignoring poisoning: the state under these locks stays consistent between
/// statements (a panic under them would be a bug, and going on beats poisoning every caller).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An immediate send in flight, with the frame it reads from.
struct InFlight {
    request: Request<'static, [u8], StaticScope>,
    frame: &'static mut [u8],
}

impl InFlight {
    fn start(comm: &SimpleCommunicator, to: NodeId, frame: Vec<u8>, tag: i32) -> InFlight {
        // MPI reads the buffer until the request completes, so it must outlive this call: it is
        // leaked here and reclaimed in `finish` once `MPI_Test` reports completion.
        let frame: &'static mut [u8] = Box::leak(frame.into_boxed_slice());
        let shared: &'static [u8] = unsafe { &*(frame as *const [u8]) };
        let request =
            comm.process_at_rank(to as i32)
                .immediate_send_with_tag(StaticScope, shared, tag);
        InFlight { request, frame }
    }

    /// Completes the send if MPI is done with it, freeing the frame.
    fn finish(self) -> Result<(), InFlight> {
        match self.request.test() {
            Ok(_) => {
                // SAFETY: the request completed, so MPI no longer reads the buffer, and `frame`
                // came from `Box::leak` in `start` and is reclaimed only here.
                drop(unsafe { Box::from_raw(self.frame as *mut [u8]) });
                Ok(())
            }
            Err(request) => Err(InFlight {
                request,
                frame: self.frame,
            }),
        }
    }
}

impl Engine {
    fn new(comm: SimpleCommunicator) -> Engine {
        Engine {
            rank: comm.rank() as NodeId,
            size: comm.size() as u32,
            goodbyes_sent: false,
            comm: Some(comm),
            in_flight: Vec::new(),
            arrived: VecDeque::new(),
            outbox: VecDeque::new(),
            goodbyes: BTreeSet::new(),
            closing: false,
        }
    }

    /// Starts an immediate send. Only the thread allowed to call MPI gets here. A small frame
    /// usually completes at once (MPI copies it out eagerly): then it is never queued.
    fn start_send(&mut self, to: NodeId, frame: Vec<u8>, tag: i32) {
        if let Some(comm) = &self.comm {
            if let Err(pending) = InFlight::start(comm, to, frame, tag).finish() {
                self.in_flight.push(pending);
            }
        }
    }

    /// Sends a goodbye to every other rank once `close` asked for it: the last frame this rank
    /// sends. What was queued before still goes first.
    fn send_goodbyes(&mut self) {
        if !self.closing || std::mem::replace(&mut self.goodbyes_sent, true) {
            return;
        }
        while let Some((to, frame)) = self.outbox.pop_front() {
            self.start_send(to, frame, FRAME_TAG);
        }
        let rank = self.rank;
        for peer in (0..self.size).filter(|&r| r != rank) {
            self.start_send(peer, Vec::new(), GOODBYE_TAG);
        }
    }

    /// Sends what is queued, completes finished sends and receives every frame that came.
    /// Returns whether anything happened. Only the thread allowed to call MPI gets here.
    fn progress(&mut self, departed: &[AtomicBool]) -> bool {
        self.send_goodbyes();
        let Some(comm) = &self.comm else {
            return false;
        };
        let mut active = false;
        while let Some((to, frame)) = self.outbox.pop_front() {
            active = true;
            self.in_flight
                .push(InFlight::start(comm, to, frame, FRAME_TAG));
        }
        if !self.in_flight.is_empty() {
            let before = self.in_flight.len();
            self.in_flight = std::mem::take(&mut self.in_flight)
                .into_iter()
                .filter_map(|send| send.finish().err())
                .collect();
            active |= self.in_flight.len() != before;
        }
        // A probe that finds nothing may still have moved a frame in that only the next probe
        // reports (MPICH and Open MPI both do: `examples/probe_after_sleep.rs`), so an empty
        // look is followed by one more: the frame is handled now, not a poll (or, after a
        // sleep, a whole sleep) later.
        let received = self.receive_ready(departed) || self.receive_ready(departed);
        active || received
    }

    /// Receives every frame the probes report, any size, in order per sender; whether there
    /// was one.
    fn receive_ready(&mut self, departed: &[AtomicBool]) -> bool {
        let Some(comm) = &self.comm else {
            return false;
        };
        let mut found = false;
        while let Some(probed) = comm.any_process().immediate_matched_probe() {
            found = true;
            let from = probed.1.source_rank() as NodeId;
            let tag = probed.1.tag();
            let (bytes, _) = probed.matched_receive_vec::<u8>();
            let event = if tag == GOODBYE_TAG {
                self.goodbyes.insert(from);
                // Before `Left` is handed out: a send racing it fails instead of being lost.
                departed[from as usize].store(true, Ordering::Release);
                TransportEvent::Left(from)
            } else {
                TransportEvent::Frame { from, bytes }
            };
            self.arrived.push_back(event);
        }
        found
    }

    /// Every send completed and every other rank said goodbye.
    fn closed(&self) -> bool {
        self.goodbyes_sent
            && self.in_flight.is_empty()
            && self.goodbyes.len() + 1 == self.size as usize
    }
}

impl std::fmt::Debug for MpiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiTransport")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size)
            .field("calls", &self.shared.calls)
            .finish()
    }
}

/// What the keeper reports once MPI runs.
type Started = Result<Arc<Shared>, MpiError>;

/// The threading level [`MpiTransport::init`] asks for.
fn threading_from_env() -> Result<Threading, MpiError> {
    match std::env::var(THREADING_ENV) {
        Err(_) => Ok(Threading::Multiple),
        Ok(value) => match value.to_ascii_lowercase().as_str() {
            "" | "multiple" => Ok(Threading::Multiple),
            "serialized" => Ok(Threading::Serialized),
            "funneled" => Ok(Threading::Funneled),
            _ => Err(MpiError::ThreadingEnv(value)),
        },
    }
}

impl MpiTransport {
    /// Initializes MPI (on the transport's keeper thread, which also finalizes it at close)
    /// and returns this rank's endpoint. Asks for `MPI_THREAD_MULTIPLE`, or what
    /// [`THREADING_ENV`] names. Fails with [`MpiError::AlreadyInitialized`] if MPI already runs.
    pub fn init() -> Result<MpiTransport, MpiError> {
        let threading = threading_from_env()?;
        let (started_tx, started_rx) = crossbeam_channel::bounded::<Started>(1);
        let keeper = std::thread::Builder::new()
            .name("coherence-mpi-keeper".into())
            .spawn(move || {
                let Some((universe, granted)) = mpi::initialize_with_threading(threading) else {
                    let _ = started_tx.send(Err(MpiError::AlreadyInitialized));
                    return;
                };
                let calls = match granted {
                    Threading::Multiple | Threading::Serialized => Calls::Direct,
                    Threading::Funneled => Calls::Keeper,
                    Threading::Single => {
                        let _ = started_tx.send(Err(MpiError::Threading {
                            granted,
                            needed: "FUNNELED or better",
                        }));
                        return;
                    }
                };
                let shared = Shared::new(universe.world().duplicate(), calls);
                tracing::debug!(rank = shared.rank, ?granted, ?calls, "MPI initialized");
                let _ = started_tx.send(Ok(Arc::clone(&shared)));
                shared.keep();
                // Every rank closed: free the communicator, then finalize, on this thread.
                drop(lock(&shared.engine).comm.take());
                drop(universe);
            })
            .map_err(|e| MpiError::Spawn(e.to_string()))?;
        match started_rx.recv() {
            Ok(Ok(shared)) => Ok(MpiTransport {
                shared,
                keeper: Mutex::new(Some(keeper)),
            }),
            Ok(Err(e)) => {
                let _ = keeper.join();
                Err(e)
            }
            Err(_) => Err(MpiError::StartUp),
        }
    }

    /// Uses an MPI that the program already initialized with `MPI_THREAD_MULTIPLE` (its own
    /// rsmpi `Universe`, or mpi4py), on a duplicate of the world communicator. Every rank must
    /// call it at about the same time (duplicating a communicator is collective). Never
    /// finalizes MPI: the program does, after [`Transport::close`] returned.
    pub fn attach() -> Result<MpiTransport, MpiError> {
        if !mpi::environment::is_initialized() || mpi::environment::is_finalized() {
            return Err(MpiError::NotInitialized);
        }
        let granted = mpi::environment::threading_support();
        if granted != Threading::Multiple {
            return Err(MpiError::Threading {
                granted,
                needed: "MULTIPLE",
            });
        }
        let shared = Shared::new(SimpleCommunicator::world().duplicate(), Calls::Direct);
        tracing::debug!(rank = shared.rank, "MPI transport attached");
        let keeper_shared = Arc::clone(&shared);
        let keeper = std::thread::Builder::new()
            .name("coherence-mpi-keeper".into())
            .spawn(move || keeper_shared.keep())
            .map_err(|e| MpiError::Spawn(e.to_string()))?;
        Ok(MpiTransport {
            shared,
            keeper: Mutex::new(Some(keeper)),
        })
    }

    /// Number of ranks in the world.
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Whether threads make MPI calls themselves (`true`), or funnel them through the keeper
    /// because MPI granted only `FUNNELED`.
    pub fn direct_calls(&self) -> bool {
        self.shared.calls == Calls::Direct
    }
}

impl Shared {
    fn new(comm: SimpleCommunicator, calls: Calls) -> Arc<Shared> {
        let rank = comm.rank() as NodeId;
        let size = comm.size() as u32;
        // Ranks that share this machine's memory (and cores): collective, like the duplicate.
        let colocated = comm.split_shared(0).size().max(1) as usize;
        Arc::new(Shared {
            rank,
            size,
            colocated,
            calls,
            engine: Mutex::new(Engine::new(comm)),
            closed: AtomicBool::new(false),
            departed: (0..size).map(|_| AtomicBool::new(false)).collect(),
            entries: AtomicU64::new(0),
            receiver: Sleeper::default(),
            keeper: Sleeper::default(),
            stop: AtomicBool::new(false),
        })
    }

    /// The keeper thread's loop. With direct calls it drives MPI only when no thread entered
    /// `recv` since its last look; with keeper calls it is the only thread that calls MPI and
    /// polls all the time (backing off while idle). Ends once `stop` is set.
    fn keep(&self) {
        let mut backoff = Backoff::new();
        let mut seen = self.entries.load(Ordering::Relaxed);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            match self.calls {
                Calls::Direct => {
                    std::thread::park_timeout(wait::KEEPER_LOOK);
                    let entries = self.entries.load(Ordering::Relaxed);
                    if std::mem::replace(&mut seen, entries) != entries {
                        continue;
                    }
                    let arrived = self.engine.try_lock().is_ok_and(|mut engine| {
                        engine.progress(&self.departed);
                        !engine.arrived.is_empty()
                    });
                    if arrived {
                        // A thread that entered `recv` since may be asleep.
                        self.receiver.wake();
                    }
                }
                Calls::Keeper => {
                    let (active, arrived) = {
                        let mut engine = lock(&self.engine);
                        let active = engine.progress(&self.departed);
                        (active, !engine.arrived.is_empty())
                    };
                    if arrived {
                        self.receiver.wake();
                    }
                    if active {
                        backoff.reset();
                    } else {
                        self.keeper
                            .pause(&mut backoff, Instant::now() + wait::KEEPER_LOOK);
                    }
                }
            }
        }
    }
}

impl Transport for MpiTransport {
    fn local_id(&self) -> NodeId {
        self.shared.rank
    }

    fn peers(&self) -> Vec<NodeId> {
        (0..self.shared.size)
            .filter(|&r| r != self.shared.rank)
            .collect()
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn colocated_processes(&self) -> usize {
        self.shared.colocated
    }

    /// A dead rank ends the MPI job.
    fn members_fail_together(&self) -> bool {
        true
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        if to >= shared.size
            || to == shared.rank
            || shared.departed[to as usize].load(Ordering::Acquire)
        {
            return Err(TransportError::UnknownPeer(to));
        }
        if frame.len() > MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let mut engine = lock(&shared.engine);
        if engine.closing {
            // A frame after our goodbyes would arrive after the `Left` the peer reports for us.
            tracing::debug!(to, "frame dropped: this rank already said goodbye");
            return Ok(());
        }
        match shared.calls {
            Calls::Direct => {
                engine.start_send(to, frame, FRAME_TAG);
                drop(engine);
                // A thread asleep in `recv` should probe for the answer now.
                shared.receiver.wake();
            }
            Calls::Keeper => {
                engine.outbox.push_back((to, frame));
                drop(engine);
                shared.keeper.wake();
            }
        }
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        shared.entries.fetch_add(1, Ordering::Relaxed);
        if timeout.is_zero() {
            // The polling caller's path: one look, no clock.
            let mut engine = lock(&shared.engine);
            if shared.calls == Calls::Direct {
                engine.progress(&shared.departed);
            }
            return Ok(engine.arrived.pop_front());
        }
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        loop {
            if shared.closed.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            {
                let mut engine = lock(&shared.engine);
                if shared.calls == Calls::Direct {
                    engine.progress(&shared.departed);
                }
                if let Some(event) = engine.arrived.pop_front() {
                    return Ok(Some(event));
                }
            }
            if !shared.receiver.pause(&mut backoff, deadline) {
                return Ok(None);
            }
        }
    }

    /// Says goodbye and waits until every rank did the same (and, for a transport that
    /// initialized MPI, MPI is finalized).
    fn close(&self) {
        let shared = &*self.shared;
        if shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut backoff = Backoff::new();
        loop {
            let done = {
                let mut engine = lock(&shared.engine);
                engine.closing = true;
                if shared.calls == Calls::Direct && engine.progress(&shared.departed) {
                    backoff.reset();
                }
                // After close nobody reads what arrives; frames that still come are dropped.
                engine.arrived.clear();
                engine.closed()
            };
            if done {
                break;
            }
            shared.keeper.nudge();
            shared
                .receiver
                .pause(&mut backoff, Instant::now() + wait::KEEPER_LOOK);
        }
        shared.stop.store(true, Ordering::Release);
        shared.keeper.nudge();
        let keeper = lock(&self.keeper).take();
        if let Some(keeper) = keeper {
            keeper.thread().unpark();
            if keeper.join().is_err() {
                tracing::error!(rank = shared.rank, "MPI keeper thread panicked");
            }
        }
        // Attached: the communicator is ours to free, MPI the program's to finalize.
        drop(lock(&shared.engine).comm.take());
        tracing::debug!(rank = shared.rank, "MPI transport closed");
    }
}

impl Drop for MpiTransport {
    fn drop(&mut self) {
        self.close();
    }
}
