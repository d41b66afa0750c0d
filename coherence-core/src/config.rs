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
    /// stop; bounds the extra time `shutdown` takes.
    pub poll_interval: Duration,
    /// How long a caller polls for its operation's outcome before it sleeps, and how long the
    /// driver keeps polling after traffic: waking a sleeping thread costs tens of microseconds
    /// on a VM. With 50 us, writes alternating between two nodes fell into the wake-up path
    /// in about half the runs (25 us instead of 6.5 us); 200 us never did. Zero never polls.
    pub spin: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(10),
            write_policy: WritePolicy::Update,
            poll_interval: Duration::from_millis(10),
            spin: Duration::from_micros(200),
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
}
