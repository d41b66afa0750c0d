//! MPI transport for coherence: ranks are node ids, one progress thread makes every MPI call.
//!
//! [`MpiTransport::init`] starts a progress thread that initializes MPI (asking for
//! `Threading::Funneled`: only that thread, MPI's "main" thread, ever calls MPI), duplicates
//! the world communicator for the protocol's traffic, and then loops. The transport owns MPI:
//! the application makes no MPI calls of its own, and `init` fails with
//! [`MpiError::AlreadyInitialized`] if MPI was initialized before (also by an earlier transport
//! of this process: MPI cannot be initialized twice). The loop:
//! - frames queued by [`Transport::send`] go out as immediate sends (`MPI_Isend`), completed
//!   later by `MPI_Test`, so large frames never rendezvous-deadlock;
//! - incoming frames of any size are received by matched probe (`MPI_Improbe` + `MPI_Mrecv`);
//! - when idle it backs off: spins, then yields, then sleeps in growing steps (up to 1 ms)
//!   while still waking at once for outgoing frames, so 4 ranks on 2 cores do not starve.
//!
//! [`Transport::close`] sends a goodbye to every rank and keeps the loop running until every
//! send completed and every rank said goodbye; then `MPI_Finalize` runs once, on the progress
//! thread. Like `MPI_Finalize`, `close` therefore returns when every rank has closed.
//!
//! ```no_run
//! use coherence_core::{Config, Node};
//! let transport = transport_mpi::MpiTransport::init().expect("MPI starts");
//! let node = Node::start(transport, Config::default()).expect("node starts");
//! let counter = node.object("counter", 0i64).expect("opens");
//! counter.update(|c| *c += 1).expect("updates");
//! node.shutdown().expect("leaves");
//! ```
#![deny(missing_docs)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coherence_core::transport::receive_polling;
use coherence_core::{NodeId, Transport, TransportError, TransportEvent};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use mpi::environment::Threading;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// Tag of protocol frames on the transport's own communicator.
const FRAME_TAG: i32 = 1;
/// Tag of the goodbye a rank sends when it closes.
const GOODBYE_TAG: i32 = 2;
/// Tag of [`MpiTransport::raw_ping_pong`]'s messages (on a communicator of their own).
const PING_TAG: i32 = 3;

/// How long the progress loop keeps spinning after its last activity before it yields.
const SPIN: Duration = Duration::from_micros(50);
/// How long it yields before it starts sleeping.
const YIELD: Duration = Duration::from_micros(500);
/// How long `recv` polls the inbox before it sleeps.
const RECV_SPIN: Duration = Duration::from_micros(20);
/// The longest idle sleep; bounds the latency of an incoming frame on an idle rank.
const MAX_SLEEP: Duration = Duration::from_millis(1);

/// Why the MPI transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum MpiError {
    /// MPI was already initialized in this process (only one transport per process).
    #[error("MPI is already initialized in this process")]
    AlreadyInitialized,
    /// The MPI library cannot give one thread the right to make MPI calls while others run.
    #[error("the MPI library grants only {0:?} threading, Funneled or better is needed")]
    Threading(Threading),
    /// The progress thread could not be started.
    #[error("cannot start the MPI progress thread: {0}")]
    Spawn(String),
    /// The progress thread ended before reporting the rank.
    #[error("the MPI progress thread died during start-up")]
    StartUp,
}

enum Command {
    Send {
        to: NodeId,
        frame: Vec<u8>,
    },
    PingPong {
        peer: NodeId,
        rounds: u32,
        bytes: usize,
        done: Sender<Duration>,
    },
    Close,
}

/// One rank's endpoint. Node ids are MPI ranks of `MPI_COMM_WORLD`; rank 0 founds the cluster.
pub struct MpiTransport {
    rank: NodeId,
    size: u32,
    commands: Sender<Command>,
    inbox: Receiver<TransportEvent>,
    progress: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    /// Per rank: it said goodbye, so frames to it would never be received.
    departed: Arc<[AtomicBool]>,
    frames_sent: AtomicU64,
}

/// What the progress thread reports once MPI runs: this rank, the world's size, and the
/// departed flags it keeps.
type Started = Result<(NodeId, u32, Arc<[AtomicBool]>), MpiError>;

/// MPI counts a message's bytes in a C `int`.
const MAX_FRAME: usize = i32::MAX as usize;

impl std::fmt::Debug for MpiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiTransport")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl MpiTransport {
    /// Initializes MPI on a new progress thread and returns this rank's endpoint.
    pub fn init() -> Result<MpiTransport, MpiError> {
        let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
        let (inbox_tx, inbox_rx) = crossbeam_channel::unbounded();
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let progress = std::thread::Builder::new()
            .name("coherence-mpi-progress".into())
            .spawn(move || progress_thread(commands_rx, inbox_tx, started_tx))
            .map_err(|e| MpiError::Spawn(e.to_string()))?;
        let (rank, size, departed) = match started_rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                let _ = progress.join();
                return Err(e);
            }
            Err(_) => return Err(MpiError::StartUp),
        };
        tracing::debug!(rank, size, "MPI transport started");
        Ok(MpiTransport {
            rank,
            size,
            commands: commands_tx,
            inbox: inbox_rx,
            progress: Mutex::new(Some(progress)),
            closed: AtomicBool::new(false),
            departed,
            frames_sent: AtomicU64::new(0),
        })
    }

    /// Number of ranks in the world.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Benchmark floor: `rounds` blocking `MPI_Send`/`MPI_Recv` round trips of `bytes` bytes
    /// with `peer`, made by the progress thread (so still one thread per process calls MPI),
    /// returning the mean round trip. Both ranks must call it at about the same time; the
    /// progress loop pauses meanwhile.
    pub fn raw_ping_pong(&self, peer: NodeId, rounds: u32, bytes: usize) -> Option<Duration> {
        let (done, result) = crossbeam_channel::bounded(1);
        self.commands
            .send(Command::PingPong {
                peer,
                rounds,
                bytes,
                done,
            })
            .ok()?;
        result.recv().ok()
    }

    /// Frames this endpoint handed to MPI.
    pub fn frames_sent(&self) -> u64 {
        self.frames_sent.load(Ordering::Relaxed)
    }
}

impl Transport for MpiTransport {
    fn local_id(&self) -> NodeId {
        self.rank
    }

    fn peers(&self) -> Vec<NodeId> {
        (0..self.size).filter(|&r| r != self.rank).collect()
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        if to >= self.size || to == self.rank || self.departed[to as usize].load(Ordering::Acquire)
        {
            return Err(TransportError::UnknownPeer(to));
        }
        if frame.len() > MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        self.commands
            .send(Command::Send { to, frame })
            .map_err(|_| TransportError::Closed)?;
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        match receive_polling(&self.inbox, RECV_SPIN, timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TransportError::Closed),
        }
    }

    /// Says goodbye and waits until every rank did the same and MPI is finalized.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.commands.send(Command::Close);
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(progress) = progress {
            if progress.join().is_err() {
                tracing::error!(rank = self.rank, "MPI progress thread panicked");
            }
        }
    }
}

impl Drop for MpiTransport {
    fn drop(&mut self) {
        self.close();
    }
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

fn progress_thread(
    commands: Receiver<Command>,
    inbox: Sender<TransportEvent>,
    started: Sender<Started>,
) {
    let Some((universe, granted)) = mpi::initialize_with_threading(Threading::Funneled) else {
        let _ = started.send(Err(MpiError::AlreadyInitialized));
        return;
    };
    if matches!(granted, Threading::Single) {
        let _ = started.send(Err(MpiError::Threading(granted)));
        return;
    }
    let comm = universe.world().duplicate();
    // The benchmark's raw round trips get their own communicator, so the progress loop's
    // any-tag probe can never take one of them for a frame.
    let ping_comm = universe.world().duplicate();
    let rank = comm.rank() as NodeId;
    let size = comm.size() as u32;
    let departed: Arc<[AtomicBool]> = (0..size).map(|_| AtomicBool::new(false)).collect();
    let _ = started.send(Ok((rank, size, Arc::clone(&departed))));

    let mut in_flight: Vec<InFlight> = Vec::new();
    let mut goodbyes: BTreeSet<NodeId> = BTreeSet::new();
    let mut closing = false;
    let mut last_activity = Instant::now();
    let mut sleep = Duration::from_micros(10);
    loop {
        let mut active = false;
        // Outgoing frames.
        loop {
            match commands.try_recv() {
                Ok(command) => {
                    active = true;
                    run_command(&comm, &ping_comm, command, &mut closing, &mut in_flight);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    run_command(
                        &comm,
                        &ping_comm,
                        Command::Close,
                        &mut closing,
                        &mut in_flight,
                    );
                    break;
                }
            }
        }
        // Sends MPI has finished with.
        let before = in_flight.len();
        in_flight = in_flight
            .into_iter()
            .filter_map(|send| send.finish().err())
            .collect();
        active |= in_flight.len() != before;
        // Incoming frames, any size, in order per sender.
        while let Some(probed) = comm.any_process().immediate_matched_probe() {
            active = true;
            let from = probed.1.source_rank() as NodeId;
            let tag = probed.1.tag();
            let (bytes, _) = probed.matched_receive_vec::<u8>();
            let event = if tag == GOODBYE_TAG {
                goodbyes.insert(from);
                // Before `Left` is queued: a send racing it fails instead of being lost.
                departed[from as usize].store(true, Ordering::Release);
                TransportEvent::Left(from)
            } else {
                TransportEvent::Frame { from, bytes }
            };
            // After close nobody reads the inbox; frames that still come are dropped.
            let _ = inbox.send(event);
        }
        if closing && in_flight.is_empty() && goodbyes.len() + 1 == size as usize {
            break;
        }
        // Idle backoff: poll hard while there is work, then yield, then sleep in growing steps
        // (but wake at once for an outgoing frame).
        if active {
            last_activity = Instant::now();
            sleep = Duration::from_micros(10);
            continue;
        }
        let idle = last_activity.elapsed();
        if idle < SPIN {
            std::hint::spin_loop();
        } else if idle < SPIN + YIELD {
            std::thread::yield_now();
        } else {
            match commands.recv_timeout(sleep) {
                Ok(command) => {
                    last_activity = Instant::now();
                    run_command(&comm, &ping_comm, command, &mut closing, &mut in_flight);
                }
                Err(RecvTimeoutError::Timeout) => sleep = (sleep * 2).min(MAX_SLEEP),
                Err(RecvTimeoutError::Disconnected) => {
                    run_command(
                        &comm,
                        &ping_comm,
                        Command::Close,
                        &mut closing,
                        &mut in_flight,
                    );
                    sleep = (sleep * 2).min(MAX_SLEEP);
                }
            }
        }
    }
    tracing::debug!(rank, "MPI transport closed, finalizing");
    drop(ping_comm);
    drop(comm);
    drop(universe);
}

/// Blocking round trips with `peer`; the lower rank sends first.
fn ping_pong(comm: &SimpleCommunicator, peer: NodeId, rounds: u32, bytes: usize) -> Duration {
    let other = comm.process_at_rank(peer as i32);
    let first = comm.rank() < peer as i32;
    let mut buffer = vec![0u8; bytes];
    let start = Instant::now();
    for _ in 0..rounds {
        if first {
            other.send_with_tag(&buffer[..], PING_TAG);
            other.receive_into_with_tag(&mut buffer[..], PING_TAG);
        } else {
            other.receive_into_with_tag(&mut buffer[..], PING_TAG);
            other.send_with_tag(&buffer[..], PING_TAG);
        }
    }
    start.elapsed() / rounds.max(1)
}

/// Starts a send, or on the first `Close` a goodbye to every other rank.
fn run_command(
    comm: &SimpleCommunicator,
    ping_comm: &SimpleCommunicator,
    command: Command,
    closing: &mut bool,
    in_flight: &mut Vec<InFlight>,
) {
    match command {
        // A frame after our goodbyes would arrive after the `Left` the peer reports for us.
        Command::Send { to, .. } if *closing => {
            tracing::debug!(to, "frame dropped: this rank already said goodbye");
        }
        Command::Send { to, frame } => in_flight.push(InFlight::start(comm, to, frame, FRAME_TAG)),
        Command::PingPong {
            peer,
            rounds,
            bytes,
            done,
        } => {
            let _ = done.send(ping_pong(ping_comm, peer, rounds, bytes));
        }
        Command::Close if !*closing => {
            *closing = true;
            let rank = comm.rank();
            for peer in (0..comm.size()).filter(|&r| r != rank) {
                in_flight.push(InFlight::start(
                    comm,
                    peer as NodeId,
                    Vec::new(),
                    GOODBYE_TAG,
                ));
            }
        }
        Command::Close => {}
    }
}
