//! In-memory [`Transport`] over crossbeam channels, for tests, benchmarks and single-process demos.
//!
//! It moves frames between the nodes of one process and reports join requests and leaves; it
//! must not know anything of tokens or objects, or decide anything for the protocol. How
//! `recv` waits is the core's wait policy ([`coherence_core::wait::receive`]).
//!
//! Every endpoint owns one unbounded channel, its inbox, which carries frames and membership
//! events alike. One queue per endpoint is what gives the ordering the protocol needs for free:
//! frames from one peer stay in order and [`TransportEvent::Left`] follows a node's last one.
//!
//! A node that joins a running network asks a member ([`TransportEvent::JoinRequest`], its
//! contact naming its inbox) and waits: the members' view change decides its id, and the
//! first member that installs that view binds the inbox to the id
//! ([`Transport::connect_members`]), which is how the joiner learns it.
//!
//! ```
//! use std::time::Duration;
//! use coherence_core::{Transport, TransportEvent};
//!
//! let nodes = transport_local::cluster(2);
//! assert_eq!(nodes[0].peers(), vec![1]);
//! nodes[0].send(1, b"hello".to_vec()).unwrap();
//! let event = nodes[1].recv(Duration::from_secs(1)).unwrap();
//! assert_eq!(event, Some(TransportEvent::Frame { from: 0, bytes: b"hello".to_vec() }));
//! ```
//!
//! Nodes can also join one by one through a [`LocalNetwork`]:
//!
//! ```
//! use std::time::Duration;
//! use coherence_core::{Transport, TransportEvent};
//!
//! let (network, founders) = transport_local::LocalNetwork::founding(1);
//! let founder = &founders[0];
//! let joiner = std::thread::spawn(move || network.join(Duration::from_secs(5)));
//! // The founder's node would decide the view that takes the joiner in; here we play its part.
//! let Some(TransportEvent::JoinRequest(contact)) = founder.recv(Duration::from_secs(5)).unwrap()
//! else { panic!("no join request") };
//! founder.connect_members(&[(1, contact)].into());
//! let joiner = joiner.join().unwrap().unwrap();
//! assert_eq!(joiner.local_id(), 1);
//! assert!(joiner.joins_running_cluster());
//! ```

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use coherence_core::wait::JOIN_RETRY;
use coherence_core::{Contact, NodeId, Transport, TransportError, TransportEvent};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// Why [`LocalNetwork::join`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// No member took the node in within the given time (no member runs a node, or no
    /// majority of the view could decide).
    #[error("no member took this node in within {0:?}")]
    NotAdmitted(Duration),
}

/// Builds `n` endpoints with ids `0..n`, each listing all the others in [`Transport::peers`].
///
/// # Panics
/// If `n` does not fit in a [`NodeId`].
pub fn cluster(n: usize) -> Vec<LocalTransport> {
    LocalNetwork::founding(n).1
}

/// The founding members of `network`, ids `0..n`.
fn found(network: &LocalNetwork, n: usize) -> Vec<LocalTransport> {
    let ids: Vec<NodeId> =
        (0..NodeId::try_from(n).expect("cluster size fits in a NodeId")).collect();
    let mut members = network.lock();
    let inboxes: Vec<Receiver<TransportEvent>> = ids
        .iter()
        .map(|&id| {
            let (tx, rx) = crossbeam_channel::unbounded();
            members.inboxes.insert(id, tx);
            rx
        })
        .collect();
    drop(members);
    ids.iter()
        .zip(inboxes)
        .map(|(&id, inbox)| {
            let peers = ids.iter().copied().filter(|&p| p != id).collect();
            LocalTransport::new(id, peers, inbox, network.clone())
        })
        .collect()
}

/// Who is in the cluster, shared by every endpoint of one network.
#[derive(Debug, Default)]
struct Members {
    /// Inbox of every current member; an id absent here never joined or has left.
    inboxes: BTreeMap<NodeId, Sender<TransportEvent>>,
    /// Inboxes of joiners no view took in yet, by the incarnation in their contact.
    waiting: BTreeMap<u64, Sender<TransportEvent>>,
    /// The ids views gave joiners, by incarnation, until the joiner picks its id up.
    admitted: BTreeMap<u64, NodeId>,
    /// Incarnation of the next joiner.
    next_incarnation: u64,
    /// Whether the network was founded (a join on an empty network founds it as node 0).
    founded: bool,
}

/// A shared in-memory network that endpoints join one at a time.
///
/// Cloning is cheap and every clone is the same network, so it can be handed to threads that
/// each join their own node.
#[derive(Debug, Clone, Default)]
pub struct LocalNetwork {
    members: Arc<Mutex<Members>>,
    /// Wakes joiners when a view took someone in.
    admitted: Arc<Condvar>,
}

impl LocalNetwork {
    /// An empty network; its first joiner founds the cluster as node 0.
    pub fn new() -> LocalNetwork {
        LocalNetwork::default()
    }

    /// A network founded by `n` members with ids `0..n` (each listing the others in
    /// [`Transport::peers`]), which later nodes may [`LocalNetwork::join`].
    ///
    /// # Panics
    /// If `n` does not fit in a [`NodeId`].
    pub fn founding(n: usize) -> (LocalNetwork, Vec<LocalTransport>) {
        let network = LocalNetwork::new();
        let founders = found(&network, n);
        network.lock().founded = true;
        (network, founders)
    }

    /// A new node: on an empty network it founds the cluster as node 0 at once. Otherwise it
    /// asks a member to be taken in (again every [`JOIN_RETRY`], the member may have left) and waits
    /// up to `timeout` for the members' nodes to decide a view with it, which gives its id.
    pub fn join(&self, timeout: Duration) -> Result<LocalTransport, JoinError> {
        let mut members = self.lock();
        if !members.founded {
            members.founded = true;
            drop(members);
            return Ok(found(self, 1).remove(0));
        }
        let incarnation = members.next_incarnation;
        members.next_incarnation += 1;
        let (tx, rx) = crossbeam_channel::unbounded();
        members.waiting.insert(incarnation, tx);
        let contact = Contact {
            incarnation,
            addr: format!("local inbox {incarnation}"),
        };
        let deadline = Instant::now() + timeout;
        let mut ask_at = Instant::now();
        loop {
            if let Some(id) = members.admitted.remove(&incarnation) {
                drop(members);
                let mut transport = LocalTransport::new(id, Vec::new(), rx, self.clone());
                transport.joining = true;
                return Ok(transport);
            }
            let now = Instant::now();
            if now >= deadline {
                members.waiting.remove(&incarnation);
                return Err(JoinError::NotAdmitted(timeout));
            }
            if now >= ask_at {
                if let Some(inbox) = members.inboxes.values().next() {
                    // Cannot fail: a member's receiver outlives its entry (drop closes first).
                    let _ = inbox.send(TransportEvent::JoinRequest(contact.clone()));
                }
                ask_at = now + JOIN_RETRY;
            }
            // Woken early when a view took someone in.
            let wait = ask_at.min(deadline) - now;
            members = self
                .admitted
                .wait_timeout(members, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Locks the membership. Every critical section leaves the map consistent, so a panic
    /// elsewhere while holding it (poisoning) is safe to ignore, and `Drop` never panics here.
    fn lock(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One node's endpoint on a [`LocalNetwork`]. Closing or dropping it leaves the network.
#[derive(Debug)]
pub struct LocalTransport {
    id: NodeId,
    /// Members at the time this node started; later changes arrive as events.
    peers: Vec<NodeId>,
    inbox: Receiver<TransportEvent>,
    network: LocalNetwork,
    closed: AtomicBool,
    /// Joined a cluster that was already running (see [`Transport::joins_running_cluster`]).
    joining: bool,
}

impl LocalTransport {
    fn new(
        id: NodeId,
        peers: Vec<NodeId>,
        inbox: Receiver<TransportEvent>,
        network: LocalNetwork,
    ) -> LocalTransport {
        LocalTransport {
            id,
            peers,
            inbox,
            network,
            closed: AtomicBool::new(false),
            joining: false,
        }
    }
}

impl Transport for LocalTransport {
    fn local_id(&self) -> NodeId {
        self.id
    }

    fn peers(&self) -> Vec<NodeId> {
        self.peers.clone()
    }

    fn joins_running_cluster(&self) -> bool {
        self.joining
    }

    /// Binds the inbox of each joiner the view names to the id the view gave it.
    fn connect_members(&self, members: &BTreeMap<NodeId, Contact>) {
        let mut network = self.network.lock();
        let mut bound = false;
        for (&id, contact) in members {
            if let Some(inbox) = network.waiting.remove(&contact.incarnation) {
                network.inboxes.insert(id, inbox);
                network.admitted.insert(contact.incarnation, id);
                bound = true;
            }
        }
        if bound {
            self.network.admitted.notify_all();
        }
    }

    /// Threads of one process.
    fn members_fail_together(&self) -> bool {
        true
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        // Pushing under the lock orders this frame against a concurrent `close` of either end:
        // it lands before our `Left`, or fails once we or `to` have left.
        let members = self.network.lock();
        if !members.inboxes.contains_key(&self.id) {
            return Err(TransportError::Closed);
        }
        // Like the other transports: a node is not its own peer.
        if to == self.id {
            return Err(TransportError::UnknownPeer(to));
        }
        let inbox = members
            .inboxes
            .get(&to)
            .ok_or(TransportError::UnknownPeer(to))?;
        inbox
            .send(TransportEvent::Frame {
                from: self.id,
                bytes: frame,
            })
            .map_err(|_| TransportError::UnknownPeer(to))?;
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        // The reply to a frame we just sent usually comes within microseconds: the core's
        // wait policy spins, yields, then blocks.
        match coherence_core::wait::receive(&self.inbox, timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TransportError::Closed),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut members = self.network.lock();
        // Only the first close finds us still a member, which makes it idempotent.
        if members.inboxes.remove(&self.id).is_some() {
            for inbox in members.inboxes.values() {
                let _ = inbox.send(TransportEvent::Left(self.id));
            }
        }
    }
}

impl Drop for LocalTransport {
    /// A dropped node leaves, so peers are not left sending into a dead inbox.
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const SECOND: Duration = Duration::from_secs(1);

    fn frame(from: NodeId, bytes: &[u8]) -> Option<TransportEvent> {
        Some(TransportEvent::Frame {
            from,
            bytes: bytes.to_vec(),
        })
    }

    fn expect_empty(node: &LocalTransport) {
        assert_eq!(node.recv(Duration::ZERO).unwrap(), None);
    }

    #[test]
    fn cluster_ids_and_peers() {
        let nodes = cluster(4);
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(node.local_id() as usize, i);
            let expected: Vec<NodeId> = (0..4).filter(|&p| p as usize != i).collect();
            assert_eq!(node.peers(), expected);
            expect_empty(node);
        }
        assert!(cluster(0).is_empty());
    }

    #[test]
    fn frames_arrive_in_order_per_pair() {
        let nodes = cluster(3);
        for seq in 0u32..1000 {
            nodes[0].send(2, seq.to_le_bytes().to_vec()).unwrap();
            nodes[1].send(2, seq.to_le_bytes().to_vec()).unwrap();
        }
        let mut next = [0u32; 2];
        for _ in 0..2000 {
            match nodes[2].recv(SECOND).unwrap() {
                Some(TransportEvent::Frame { from, bytes }) => {
                    let seq = u32::from_le_bytes(bytes.try_into().unwrap());
                    assert_eq!(seq, next[from as usize]);
                    next[from as usize] += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(next, [1000, 1000]);
        expect_empty(&nodes[2]);
    }

    /// Plays the members' part for `founder`: takes in every joiner that asks, in order, until
    /// `count` were taken in; returns the other events it received meanwhile.
    fn admit(founder: &LocalTransport, count: usize) -> Vec<TransportEvent> {
        let mut view = BTreeMap::new();
        let mut others = Vec::new();
        while view.len() < count {
            match founder.recv(SECOND).unwrap() {
                Some(TransportEvent::JoinRequest(contact)) => {
                    if view
                        .values()
                        .any(|c: &Contact| c.incarnation == contact.incarnation)
                    {
                        continue; // asked again
                    }
                    view.insert(view.len() as NodeId + 1, contact);
                    founder.connect_members(&view);
                }
                Some(other) => others.push(other),
                None => panic!("no join request within a second"),
            }
        }
        others
    }

    #[test]
    fn first_join_founds_and_later_ones_wait_for_a_view() {
        let network = LocalNetwork::new();
        let founder = network.join(Duration::ZERO).unwrap();
        assert_eq!((founder.local_id(), founder.peers()), (0, vec![]));
        assert!(!founder.joins_running_cluster());
        let joiner = std::thread::scope(|s| {
            let joiner = s.spawn(|| network.join(10 * SECOND));
            assert_eq!(admit(&founder, 1), vec![]);
            joiner.join().unwrap().unwrap()
        });
        assert_eq!((joiner.local_id(), joiner.peers()), (1, vec![]));
        assert!(joiner.joins_running_cluster());
        joiner.send(0, b"hi".to_vec()).unwrap();
        founder.send(1, b"yo".to_vec()).unwrap();
        assert_eq!(founder.recv(SECOND).unwrap(), frame(1, b"hi"));
        assert_eq!(joiner.recv(SECOND).unwrap(), frame(0, b"yo"));
    }

    #[test]
    fn a_join_nobody_answers_times_out() {
        let (network, founders) = LocalNetwork::founding(2);
        let timeout = JOIN_RETRY * 2 + JOIN_RETRY / 2;
        assert_eq!(
            network.join(timeout).err(),
            Some(JoinError::NotAdmitted(timeout))
        );
        // The lowest member was asked, again every `JOIN_RETRY`; the transport decided nothing.
        let mut asked = 0;
        while let Some(event) = founders[0].recv(Duration::ZERO).unwrap() {
            assert!(matches!(event, TransportEvent::JoinRequest(_)), "{event:?}");
            asked += 1;
        }
        assert!((2..=4).contains(&asked), "asked {asked} times");
        expect_empty(&founders[1]);
    }

    #[test]
    fn network_is_shared_across_threads() {
        let (network, mut founders) = LocalNetwork::founding(1);
        let founder = founders.remove(0);
        let (mut ids, seen): (Vec<NodeId>, _) = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let network = network.clone();
                    s.spawn(move || {
                        let node = network.join(10 * SECOND).unwrap();
                        node.send(0, vec![]).unwrap();
                        node.local_id()
                    })
                })
                .collect();
            let seen = admit(&founder, 4);
            (
                handles.into_iter().map(|h| h.join().unwrap()).collect(),
                seen,
            )
        });
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3, 4]);
        // Each joiner's frame came, then its `Left` (its endpoint was dropped), in that order.
        let mut state = [0u8; 5];
        let later = std::iter::from_fn(|| founder.recv(Duration::ZERO).unwrap());
        for event in seen.into_iter().chain(later) {
            let (id, expected) = match event {
                TransportEvent::JoinRequest(_) => continue,
                TransportEvent::Frame { from, .. } => (from, 0),
                TransportEvent::Left(id) => (id, 1),
            };
            assert_eq!(state[id as usize], expected, "{event:?} out of order");
            state[id as usize] += 1;
        }
        assert_eq!(state[1..], [2; 4]);
    }

    #[test]
    fn close_sends_left_after_last_frame() {
        let nodes = cluster(3);
        nodes[1].send(0, b"a".to_vec()).unwrap();
        nodes[1].send(0, b"b".to_vec()).unwrap();
        nodes[1].send(2, b"c".to_vec()).unwrap();
        nodes[1].close();
        nodes[1].close();

        assert_eq!(nodes[0].recv(SECOND).unwrap(), frame(1, b"a"));
        assert_eq!(nodes[0].recv(SECOND).unwrap(), frame(1, b"b"));
        assert_eq!(
            nodes[0].recv(SECOND).unwrap(),
            Some(TransportEvent::Left(1))
        );
        assert_eq!(nodes[2].recv(SECOND).unwrap(), frame(1, b"c"));
        assert_eq!(
            nodes[2].recv(SECOND).unwrap(),
            Some(TransportEvent::Left(1))
        );
        expect_empty(&nodes[0]);
        expect_empty(&nodes[2]);

        assert_eq!(
            nodes[0].send(1, vec![]),
            Err(TransportError::UnknownPeer(1))
        );
        assert_eq!(
            nodes[0].send(7, vec![]),
            Err(TransportError::UnknownPeer(7))
        );
        assert_eq!(nodes[1].send(0, vec![]), Err(TransportError::Closed));
        assert_eq!(nodes[1].recv(SECOND), Err(TransportError::Closed));
    }

    #[test]
    fn drop_leaves_the_network() {
        let mut nodes = cluster(2);
        nodes.pop();
        assert_eq!(
            nodes[0].recv(SECOND).unwrap(),
            Some(TransportEvent::Left(1))
        );
        assert_eq!(
            nodes[0].send(1, vec![]),
            Err(TransportError::UnknownPeer(1))
        );
    }

    #[test]
    fn recv_times_out_with_none() {
        let node = cluster(1).pop().unwrap();
        for timeout in [Duration::from_micros(5), Duration::from_millis(50)] {
            let start = Instant::now();
            assert_eq!(node.recv(timeout).unwrap(), None);
            let elapsed = start.elapsed();
            assert!(elapsed >= timeout, "returned early: {elapsed:?}");
            assert!(elapsed < timeout + SECOND / 2, "returned late: {elapsed:?}");
        }
    }

    #[test]
    fn recv_wakes_when_a_frame_arrives_while_parked() {
        let nodes = cluster(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                nodes[0].send(1, b"late".to_vec()).unwrap();
            });
            assert_eq!(nodes[1].recv(10 * SECOND).unwrap(), frame(0, b"late"));
        });
    }

    #[test]
    fn concurrent_senders_lose_nothing() {
        const THREADS_PER_NODE: u32 = 2;
        const FRAMES: u32 = 5000;
        let nodes = cluster(4);
        let (receiver, senders) = nodes.split_first().unwrap();
        std::thread::scope(|s| {
            for node in senders {
                for thread in 0..THREADS_PER_NODE {
                    s.spawn(move || {
                        for seq in 0..FRAMES {
                            let mut bytes = thread.to_le_bytes().to_vec();
                            bytes.extend_from_slice(&seq.to_le_bytes());
                            node.send(0, bytes).unwrap();
                        }
                    });
                }
            }
            // Frames from one sending thread keep their order.
            let mut next = vec![0u32; 4 * THREADS_PER_NODE as usize];
            let total = senders.len() as u32 * THREADS_PER_NODE * FRAMES;
            for _ in 0..total {
                let Some(TransportEvent::Frame { from, bytes }) =
                    receiver.recv(10 * SECOND).unwrap()
                else {
                    panic!("expected a frame");
                };
                let thread = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                let seq = u32::from_le_bytes(bytes[4..].try_into().unwrap());
                let slot = &mut next[(from * THREADS_PER_NODE + thread) as usize];
                assert_eq!(seq, *slot);
                *slot += 1;
            }
        });
        expect_empty(receiver);
    }
}
