//! The one wait policy: every spin, yield and park decision of the library lives here.
//!
//! What it trades is latency against CPU, on machines where both are short:
//! - waking a parked thread (a futex wake-up) costs tens of microseconds on a VM, more than a
//!   whole shared-memory round trip (about a microsecond over MPI), so a thread that expects an
//!   answer soon polls rather than sleeps;
//! - there are often more busy threads than cores (4 ranks with a driver and a caller each, on
//!   2 cores), and a thread that spins keeps the very peer it waits for off the core, so
//!   polling threads count themselves and yield once they outnumber the cores, and every
//!   poll ends after a bounded time in a sleep that costs nothing while idle.
//!
//! Each number below carries the one reason it has that value; the measurements behind the
//! reasons are in `docs/BENCHMARKS.md` ("The wait policy"). Transports take what they need
//! from here (or only block in their own `recv(timeout)`), so there is one place to tune.
//!
//! Callers and drivers: a caller waiting for its operation's reply gets it fastest by polling
//! without giving up its core. That only pays while every polling thread has a core of its
//! own: with more polling threads than cores, callers that always spun kept the drivers they
//! waited for off the cores until the scheduler's tick, and writes took milliseconds. So the
//! process counts its polling threads (callers and drivers) in a `Budget`, and a caller
//! spins only while they fit the cores. Drivers always yield between polls: they poll for long stretches after traffic, and
//! threads of other processes (peers on the same machine) may need the core meanwhile.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::Thread;

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

/// Default of [`crate::Config::spin`]: how long a caller polls for its reply before it sleeps,
/// and how long a driver keeps polling after traffic. A quarter of it let writes alternating
/// between two nodes fall into the wake-up path in about half the runs; this never did.
pub const CALLER_POLL: Duration = Duration::from_micros(200);

/// Default of [`crate::Config::view_retry`]: how long a member waits for a view change it
/// proposed or froze for before it proposes again (twice as long after each attempt). A view
/// change takes a few round trips, milliseconds over TCP even with reports of megabytes;
/// retrying much sooner would only make proposals cut each other short.
pub const VIEW_RETRY: Duration = Duration::from_millis(200);

/// Default of [`crate::Config::lease`] where members may be cut off from each other: how
/// long a member's grant keeps the others from removing the member it granted to. A member
/// cut off from the majority stops serving reads within this time, and the majority waits
/// for it before removing that member; shorter than the ZeroMQ transport's default loss
/// detection (3 s), so recovering from a crash takes no longer than detecting it. Renewed
/// every quarter of it: a lease survives a few lost or late rounds.
pub const LEASE: Duration = Duration::from_secs(2);

/// How often a read that found no lease tries again: the lease comes back with the next
/// renewal's answers, a quarter of [`LEASE`] away at most, and a read only waits like this
/// while the node is cut off or right after a view change.
pub const LEASE_RETRY: Duration = Duration::from_millis(2);

/// How long a member waits before proposing a view again after `attempts` proposals since
/// the last view was installed: `base` doubled per attempt (up to 32 times), plus a sixteenth
/// of it per step of the node id (mod 8), so that two proposers that keep colliding drift
/// apart.
pub(crate) fn view_retry_after(base: Duration, attempts: u32, node: u32) -> Duration {
    base * (1 << attempts.min(5)) + base / 16 * (node % 8)
}

/// Default of [`crate::Config::poll_interval`]: the longest a driver blocks in the transport
/// before it looks whether it should leave or stop; bounds the extra time `shutdown` takes.
pub const DRIVER_BLOCK: Duration = Duration::from_millis(10);

/// How long a driver stays runnable (yielding) while callers poll: a quick operation ends
/// before this, and the driver takes over without being woken, which would cost the caller a
/// futex wake-up on every operation (in-process writes took about twice as long with none).
pub(crate) const DRIVER_YIELDS_FOR: Duration = Duration::from_micros(50);

/// How long a driver then sleeps at a time while callers still poll; the last poller wakes it,
/// so this only bounds a lost wake-up.
pub(crate) const DRIVER_NAP: Duration = Duration::from_millis(1);

/// How long a transport's `recv` busy-polls before it yields: the reply to a frame just sent
/// usually comes within microseconds, and spinning costs a fraction of a wake-up.
pub const RECV_SPIN: Duration = Duration::from_micros(20);

/// How many yields follow the spin before a `recv` blocks: cheap when other threads want the
/// core, and they give a sender on the same core a chance to run before we park.
pub const RECV_YIELDS: usize = 4;

/// How long a thread that can only poll (no blocking receive exists, as with MPI's probe)
/// keeps yielding after its spin before it starts to sleep: covers a peer that needs one time
/// slice to answer on a machine with more busy threads than cores.
pub const POLL_YIELD: Duration = Duration::from_micros(500);

/// The first sleep of a thread that can only poll; it doubles up to [`POLL_SLEEP_MAX`].
pub const POLL_SLEEP_MIN: Duration = Duration::from_micros(10);

/// The longest sleep of a thread that can only poll: bounds the latency of a frame reaching an
/// idle node, while an idle node costs about a thousand cheap polls a second.
pub const POLL_SLEEP_MAX: Duration = Duration::from_millis(1);

/// How often a transport's keeper thread looks whether anyone drove its IO since its last
/// look: only a transport nobody receives from needs it, and then a few milliseconds of delay
/// on a background send or an acknowledgement cost nothing.
pub const KEEPER_LOOK: Duration = Duration::from_millis(5);

/// How long a keeper drives at a time before it looks again whether a thread wants to drive.
pub const KEEPER_SLICE: Duration = Duration::from_millis(50);

/// How often a joiner repeats its request until a view takes it in (a request can be lost when
/// the member it asked dies while it is in flight): a few times a second finds a new member
/// soon without flooding a cluster that is busy admitting.
pub const JOIN_RETRY: Duration = Duration::from_millis(500);

/// First delay before reconnecting a broken connection; doubles up to [`RECONNECT_MAX`]. Short
/// enough that a restarted peer is found at once, long enough not to spin on a dead address.
pub const RECONNECT_MIN: Duration = Duration::from_millis(20);

/// Longest delay between reconnection attempts: bounds how long a peer that came back waits
/// to be noticed.
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// How long a listener pauses after a failed accept, typically a full file table (EMFILE): the
/// connection that could not be taken stays queued, so accepting again at once fails again and
/// spins a core. A few dozen attempts a second cost nothing, and a connection is still taken
/// soon after a file descriptor frees up.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// How many times a zero-timeout receive lets an async runtime run what became ready: a frame
/// that arrived needs two rounds (one wakes the socket's reader, the next passes it on).
pub const RUNTIME_ROUNDS: usize = 2;

/// Waits up to `timeout` for `rx`: spins for [`RECV_SPIN`], yields [`RECV_YIELDS`] times, then
/// blocks. A zero timeout only looks.
pub fn receive<T>(rx: &Receiver<T>, timeout: Duration) -> Result<T, RecvTimeoutError> {
    if timeout.is_zero() {
        return rx.try_recv().map_err(|e| match e {
            crossbeam_channel::TryRecvError::Empty => RecvTimeoutError::Timeout,
            crossbeam_channel::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
        });
    }
    let start = Instant::now();
    let spin = RECV_SPIN.min(timeout);
    loop {
        match rx.try_recv() {
            Ok(value) => return Ok(value),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Err(RecvTimeoutError::Disconnected)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if start.elapsed() >= spin {
            break;
        }
        std::hint::spin_loop();
    }
    for _ in 0..RECV_YIELDS {
        std::thread::yield_now();
        if let Ok(value) = rx.try_recv() {
            return Ok(value);
        }
    }
    rx.recv_timeout(timeout.saturating_sub(start.elapsed()))
}

/// The pauses of a thread that polls a source it cannot block on: spin, then yield, then sleep
/// in growing steps. The sleep is a park, so [`std::thread::Thread::unpark`] ends it early;
/// a [`Sleeper`] pauses in it so that whoever hands the thread work can wake it.
#[derive(Debug)]
pub struct Backoff {
    idle_since: Instant,
    sleep: Duration,
    /// More processes poll on this machine than it has cores (see [`Budget::crowded`]): spinning
    /// or yielding would keep the peer that must answer off the cores, so pauses sleep at once.
    crowded: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    /// Starts idle now.
    pub fn new() -> Backoff {
        Backoff {
            idle_since: Instant::now(),
            sleep: POLL_SLEEP_MIN,
            crowded: Budget::of_process().crowded(),
        }
    }

    /// Something happened: poll hard again.
    pub fn reset(&mut self) {
        self.idle_since = Instant::now();
        self.sleep = POLL_SLEEP_MIN;
    }

    /// Pauses once, never past `deadline`; `false` once the deadline has passed.
    pub fn pause(&mut self, deadline: Instant) -> bool {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let idle = now - self.idle_since;
        if self.crowded {
            std::thread::park_timeout(self.sleep.min(deadline - now));
            self.sleep = (self.sleep * 2).min(POLL_SLEEP_MAX);
        } else if idle < RECV_SPIN {
            std::hint::spin_loop();
        } else if idle < RECV_SPIN + POLL_YIELD {
            std::thread::yield_now();
        } else {
            std::thread::park_timeout(self.sleep.min(deadline - now));
            self.sleep = (self.sleep * 2).min(POLL_SLEEP_MAX);
        }
        true
    }

    /// Whether the next pauses sleep (so a thread handing work should wake this one).
    pub fn sleeping(&self) -> bool {
        self.crowded || self.idle_since.elapsed() >= RECV_SPIN + POLL_YIELD
    }
}

/// A thread that may be asleep in a [`Backoff`], and the ways to wake it: whoever hands it
/// work wakes it for traffic, and it then polls hard again, since the answer to a frame just
/// sent comes a round trip later; a closing or stopping owner only nudges it, and its sleeps go
/// on growing, so repeated nudges keep no thread busy.
#[derive(Debug, Default)]
pub struct Sleeper {
    /// [`AWAKE`], [`ASLEEP`] or [`CALLED`].
    state: AtomicU8,
    thread: Mutex<Option<Thread>>,
}

/// The sleeper is not asleep, or was woken only to look once.
const AWAKE: u8 = 0;
/// The sleeper sleeps in its backoff.
const ASLEEP: u8 = 1;
/// The sleeper was woken for traffic.
const CALLED: u8 = 2;

impl Sleeper {
    /// Pauses the current thread once in `backoff` (see [`Backoff::pause`]); while the pause
    /// sleeps, [`Sleeper::wake`] and [`Sleeper::nudge`] end it.
    pub fn pause(&self, backoff: &mut Backoff, deadline: Instant) -> bool {
        if !backoff.sleeping() {
            return backoff.pause(deadline);
        }
        *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(std::thread::current());
        self.state.store(ASLEEP, Ordering::SeqCst);
        let more = backoff.pause(deadline);
        if self.state.swap(AWAKE, Ordering::SeqCst) == CALLED {
            // Sleeping on in growing steps would leave the answer waiting up to the longest
            // sleep.
            backoff.reset();
        }
        more
    }

    /// Wakes the thread if it sleeps, for traffic (a frame to send, one sent whose answer
    /// comes a round trip later, or one that arrived): it polls hard again. Costs one load
    /// otherwise.
    pub fn wake(&self) {
        self.rouse(CALLED);
    }

    /// Wakes the thread if it sleeps, to look once; its sleeps go on growing.
    pub fn nudge(&self) {
        self.rouse(AWAKE);
    }

    fn rouse(&self, to: u8) {
        let state = &self.state;
        if state.load(Ordering::SeqCst) == ASLEEP
            && state
                .compare_exchange(ASLEEP, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            if let Some(thread) = self
                .thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                thread.unpark();
            }
        }
    }
}

/// The polling threads of a process and the cores they share.
pub(crate) struct Budget {
    polling: AtomicUsize,
    cores: usize,
    /// Processes (this one included) whose pollers share these cores, as the transport
    /// reports them ([`crate::Transport::colocated_processes`]).
    sharers: AtomicUsize,
}

impl Budget {
    pub(crate) const fn new(cores: usize) -> Budget {
        Budget {
            polling: AtomicUsize::new(0),
            cores,
            sharers: AtomicUsize::new(1),
        }
    }

    /// The budget shared by every node of this process.
    pub(crate) fn of_process() -> &'static Budget {
        static PROCESS: OnceLock<Budget> = OnceLock::new();
        PROCESS.get_or_init(|| {
            Budget::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
        })
    }

    /// Notes that `processes` processes (this one included) poll on these cores: each is
    /// assumed to have as many pollers as this one.
    pub(crate) fn share_with(&self, processes: usize) {
        self.sharers.fetch_max(processes.max(1), Ordering::Relaxed);
    }

    /// Whether more processes poll on this machine than it has cores.
    fn crowded(&self) -> bool {
        self.sharers.load(Ordering::Relaxed) > self.cores
    }

    /// Whether a counted poller may spin: no more pollers, counted over every process that
    /// shares the cores, than cores. Past that, a spinning thread keeps the very peer it waits
    /// for (a thread of this process or of another) off the cores until the scheduler's tick.
    fn spinning_pays(&self) -> bool {
        self.polling.load(Ordering::Relaxed) * self.sharers.load(Ordering::Relaxed) <= self.cores
    }
}

/// One polling thread's place in a [`Budget`]; counted from its first pause until released
/// or dropped.
pub(crate) struct Poller<'a> {
    budget: &'a Budget,
    counted: bool,
}

impl<'a> Poller<'a> {
    pub(crate) fn new(budget: &'a Budget) -> Poller<'a> {
        Poller {
            budget,
            counted: false,
        }
    }

    fn count(&mut self) {
        if !self.counted {
            self.counted = true;
            self.budget.polling.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A caller's wait between polls: a busy-wait hint while the pollers fit the cores, a
    /// yield otherwise. Returns whether it spun.
    pub(crate) fn pause(&mut self) -> bool {
        self.count();
        if self.budget.spinning_pays() {
            std::hint::spin_loop();
            true
        } else {
            std::thread::yield_now();
            false
        }
    }

    /// A driver's wait between polls: always a yield, but counted, so callers know the
    /// driver wants a core.
    pub(crate) fn yield_now(&mut self) {
        self.count();
        std::thread::yield_now();
    }

    /// Stops counting this thread: it stops polling, stands aside or blocks.
    pub(crate) fn release(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.budget.polling.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Poller<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backoff past its spinning and yielding, whose next sleep lasts `sleep`.
    fn asleep_for(sleep: Duration) -> Backoff {
        Backoff {
            idle_since: Instant::now() - (RECV_SPIN + POLL_YIELD),
            sleep,
            crowded: false,
        }
    }

    /// `rouse` once `sleeper` sleeps, while this thread pauses in `backoff` (again after a
    /// spurious wake-up, until roused); how long the pauses took.
    fn roused(sleeper: &Sleeper, backoff: &mut Backoff, rouse: fn(&Sleeper)) -> Duration {
        let done = std::sync::atomic::AtomicBool::new(false);
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                while sleeper.state.load(Ordering::SeqCst) != ASLEEP {
                    std::thread::yield_now();
                }
                rouse(sleeper);
                done.store(true, Ordering::SeqCst);
            });
            while !done.load(Ordering::SeqCst) {
                assert!(sleeper.pause(backoff, Instant::now() + Duration::from_secs(60)));
            }
        });
        start.elapsed()
    }

    #[test]
    fn a_wake_for_traffic_restarts_the_backoff_and_a_nudge_does_not() {
        let sleeper = Sleeper::default();
        // Each pause sleeps this long unless something wakes it.
        let long = Duration::from_secs(30);
        let mut woken = asleep_for(long);
        let took = roused(&sleeper, &mut woken, Sleeper::wake);
        assert!(took < long / 3, "the wake ended the sleep (took {took:?})");
        assert_eq!(
            woken.sleep, POLL_SLEEP_MIN,
            "woken for traffic: starts over"
        );
        let mut nudged = asleep_for(long);
        let took = roused(&sleeper, &mut nudged, Sleeper::nudge);
        assert!(took < long / 3, "the nudge ended the sleep (took {took:?})");
        assert_eq!(
            nudged.sleep, POLL_SLEEP_MAX,
            "nudged: sleeps on, in growing steps"
        );
        sleeper.wake();
        assert_eq!(
            sleeper.state.load(Ordering::SeqCst),
            AWAKE,
            "a wake while awake leaves no mark"
        );
    }

    #[test]
    fn pollers_of_other_processes_on_the_machine_count_too() {
        let budget = Budget::new(2);
        budget.share_with(2);
        let mut caller = Poller::new(&budget);
        assert!(
            caller.pause(),
            "one poller in each of two processes fits two cores"
        );
        let mut driver = Poller::new(&budget);
        driver.yield_now();
        assert!(!caller.pause(), "two in each do not");
        assert!(!budget.crowded());
        budget.share_with(3);
        assert!(budget.crowded(), "three processes on two cores");
        budget.share_with(1);
        assert!(budget.crowded(), "the largest report stays");
    }

    #[test]
    fn callers_spin_only_while_the_pollers_fit_the_cores() {
        let budget = Budget::new(2);
        let mut caller = Poller::new(&budget);
        let mut driver = Poller::new(&budget);
        assert!(caller.pause(), "one poller on two cores spins");
        driver.yield_now();
        assert!(caller.pause(), "two pollers on two cores spin");
        let mut other_caller = Poller::new(&budget);
        assert!(!other_caller.pause(), "a third poller yields");
        assert!(
            !caller.pause(),
            "so does every caller while there are three"
        );
        driver.release();
        assert!(
            caller.pause(),
            "a driver that stands aside no longer counts"
        );
        drop(other_caller);
        assert_eq!(budget.polling.load(Ordering::Relaxed), 1);
        caller.release();
        caller.release();
        assert_eq!(
            budget.polling.load(Ordering::Relaxed),
            0,
            "release is idempotent"
        );
    }
}
