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

    /// Sets the longest object name accepted.
    pub fn max_name_len(mut self, max: usize) -> Self {
        self.max_name_len = max;
        self
    }
}
