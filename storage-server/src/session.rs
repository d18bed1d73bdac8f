//! Client sessions: which connection of a client may still change a copy.
//!
//! keel-vhost abandons a connection it got no answer on (its request timeout, a server switch,
//! or its own restart) and resends what was in flight on a new one. Frames it already wrote to
//! the old connection may still sit in a frozen server's socket buffer; were they applied after
//! the resent write completed and the guest wrote the same blocks again, an acknowledged write
//! would be overwritten by an older one. So each new connection first **claims** the volume
//! ([`keel_proto::Op::Claim`]) with a generation higher than any before it (keel-vhost uses the
//! wall clock in milliseconds, so a restarted keel-vhost claims above its predecessor). The
//! claim waits for the copy's admitted requests to finish (the copy's gate), then records the
//! generation; from then on every request of an older connection of the same client is refused
//! at admission, under the same gate. Clients that never claim (tests' raw clients, peers) are
//! not checked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Who a session belongs to: the peer's certificate id and the client's key (keel-vhost: a
/// hash of its attachment, so two attachments of one volume on one node do not fence each
/// other).
pub type ClientKey = (String, u32);

/// Clients remembered per copy before those without a live session are forgotten.
const MAX_IDLE_CLIENTS: usize = 1024;

/// A connection's claim on a copy: admitted only while its generation is the client's latest.
#[derive(Debug, Clone)]
pub struct Session {
    latest: Arc<AtomicU64>,
    generation: u64,
}

impl Session {
    /// Whether no newer connection of the same client claimed the copy since.
    pub fn current(&self) -> bool {
        self.latest.load(Ordering::Acquire) == self.generation
    }
}

/// A copy's clients' latest generations (in memory: after a server restart, connections from
/// before it are gone).
#[derive(Debug, Default)]
pub struct Sessions {
    latest: Mutex<HashMap<ClientKey, Arc<AtomicU64>>>,
}

impl Sessions {
    /// The cell holding `client`'s latest generation. Claims are peer input: past
    /// [`MAX_IDLE_CLIENTS`] entries, the clients no connection holds a session of are
    /// forgotten (nothing is left for them to fence), so the map stays as small as the live
    /// sessions.
    pub fn cell(&self, client: ClientKey) -> Arc<AtomicU64> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if latest.len() >= MAX_IDLE_CLIENTS && !latest.contains_key(&client) {
            latest.retain(|_, cell| Arc::strong_count(cell) > 1);
        }
        latest.entry(client).or_default().clone()
    }

    /// Records `generation` for the client whose cell this is, if it is not older than the
    /// latest; the caller holds the copy's gate exclusively. `None` if a newer connection of
    /// the client claimed already.
    pub fn claim(cell: Arc<AtomicU64>, generation: u64) -> Option<Session> {
        if generation < cell.load(Ordering::Acquire) {
            return None;
        }
        cell.store(generation, Ordering::Release);
        Some(Session {
            latest: cell,
            generation,
        })
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn a_newer_claim_supersedes_an_older_one_and_not_the_other_way() {
        let s = Sessions::default();
        let a = Sessions::claim(s.cell(("node-1".into(), 7)), 100).expect("first");
        assert!(a.current());
        let b = Sessions::claim(s.cell(("node-1".into(), 7)), 200).expect("newer");
        assert!(!a.current() && b.current());
        assert!(Sessions::claim(s.cell(("node-1".into(), 7)), 150).is_none());
        assert!(b.current());
        // Another client of the same node, or the same key from another node: independent.
        let c = Sessions::claim(s.cell(("node-1".into(), 8)), 1).expect("other key");
        let d = Sessions::claim(s.cell(("node-2".into(), 7)), 1).expect("other node");
        assert!(b.current() && c.current() && d.current());
    }

    #[test]
    fn clients_without_a_live_session_are_forgotten_past_the_bound() {
        let s = Sessions::default();
        let held = Sessions::claim(s.cell(("node-1".into(), 0)), 5).expect("held");
        for key in 1..=(MAX_IDLE_CLIENTS as u32 + 10) {
            assert!(Sessions::claim(s.cell(("node-1".into(), key)), 1).is_some());
        }
        let n = s.latest.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert!(n <= MAX_IDLE_CLIENTS, "{n} clients remembered");
        // The one with a live session is still fenced correctly.
        assert!(held.current());
        assert!(Sessions::claim(s.cell(("node-1".into(), 0)), 4).is_none());
    }
}
