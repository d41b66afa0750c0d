//! Node configuration.

use std::time::Duration;

pub use crate::protocol::WritePolicy;

/// How a [`crate::Node`] behaves. Build with `Config::default()` and the builder methods, or set
/// the public fields directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Longest any operation (open, read, write, update, shutdown) may wait before it returns
    /// [`crate::Error::Timeout`].
    pub timeout: Duration,
    /// What a writer does with its tokens after a write.
    pub write_policy: WritePolicy,
    /// How long the driver waits for network input before checking whether it should leave or
    /// stop; bounds the extra time `shutdown` takes. Default [`crate::wait::DRIVER_BLOCK`].
    pub poll_interval: Duration,
    /// How long a caller polls for its operation's outcome before it sleeps, and how long the
    /// driver keeps polling after traffic: waking a sleeping thread costs more than a reply
    /// takes to come. Zero never polls. Default [`crate::wait::CALLER_POLL`].
    pub spin: Duration,
    /// The longest object name (in bytes) [`crate::Node::object`] accepts. A name travels in
    /// every message about its object, so an unbounded one would make every operation on it
    /// as slow as copying it. Default [`DEFAULT_MAX_NAME_LEN`].
    pub max_name_len: usize,
    /// How many other members must hold a write's value before the write returns, so that a
    /// write that returned survives the crash of its writer (of up to that many members in
    /// all). Never more than the other members there are. `None` (the default) chooses by
    /// transport: 1 where members fail one by one (processes over ZeroMQ), 0 where they fail
    /// together (threads of one process, ranks of one MPI job: see
    /// [`crate::Transport::members_fail_together`]), where a copy would only cost time.
    pub durability: Option<u32>,
    /// How long a member waits for a view change it proposed (or froze for) before it
    /// proposes again: the proposer may have crashed, or a member it keeps may not answer.
    /// Default [`crate::wait::VIEW_RETRY`].
    pub view_retry: Duration,
    /// How long a lease binds (see [`crate::lease`]): a member serves reads only while a
    /// majority of its view granted it one, so a member cut off from the majority stops
    /// serving before the majority may remove it and write. `None` (the default) chooses by
    /// transport: [`crate::wait::LEASE`] where members may be cut off one by one (processes
    /// over ZeroMQ), none where they fail together ([`crate::Transport::members_fail_together`]).
    /// `Some(Duration::ZERO)` turns leases off: a cut-off member then keeps serving values a
    /// majority may have replaced.
    pub lease: Option<Duration>,
}

/// Default of [`Config::max_name_len`]: room for any path-like name people use, while a
/// name stays a small share of a message.
pub const DEFAULT_MAX_NAME_LEN: usize = 256;

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(10),
            write_policy: WritePolicy::Update,
            poll_interval: crate::wait::DRIVER_BLOCK,
            spin: crate::wait::CALLER_POLL,
            max_name_len: DEFAULT_MAX_NAME_LEN,
            durability: None,
            view_retry: crate::wait::VIEW_RETRY,
            lease: None,
        }
    }
}

impl Config {
    /// Sets the operation timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the write policy.
    pub fn write_policy(mut self, policy: WritePolicy) -> Self {
        self.write_policy = policy;
        self
    }

    /// Sets how many other members hold a write's value before it returns.
    pub fn durability(mut self, copies: u32) -> Self {
        self.durability = Some(copies);
        self
    }

    /// Sets how long a lease binds (zero: no leases).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Sets the longest object name accepted.
    pub fn max_name_len(mut self, max: usize) -> Self {
        self.max_name_len = max;
        self
    }
}
