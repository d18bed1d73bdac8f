//! A copy's membership list: the payload of [`crate::Op::SetMembership`] and the content of a
//! copy's `<id>.members` file. Besides a primary's mirrors it carries the copy's **access
//! list** (docs/security.md): which node certificates may use the copy and how, and which
//! storage server is the volume's primary (the only peer that may replicate into a mirror).
//!
//! UTF-8 text, one entry per line (a final newline is allowed), at most
//! [`MAX_MEMBERSHIP_PAYLOAD`] bytes; an empty payload is an empty list:
//!
//! ```text
//! IP:PORT               an in-sync mirror (a primary's list only)
//! rebuild IP:PORT       a mirror being rebuilt (a primary's list only)
//! primary <id>          the storage server id of the volume's primary (at most once)
//! node <id> rw|ro       node certificate <id> may read and write (rw) or only read (ro)
//! ```
//!
//! Ids are those of `keel://<role>/<id>` certificate names: 1 to 64 letters, digits, `-`,
//! `_` or `.`. No address or node may appear twice.

use std::net::SocketAddr;

use crate::frame::DecodeError;

/// Largest membership list in bytes.
pub const MAX_MEMBERSHIP_PAYLOAD: usize = 64 << 10;
/// The line prefix marking a mirror being rebuilt.
pub const REBUILD_PREFIX: &str = "rebuild ";
const PRIMARY_PREFIX: &str = "primary ";
const NODE_PREFIX: &str = "node ";

/// What a node may do with a copy it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Reads and flushes only: writes, discards and write-zeroes are refused.
    ReadOnly,
    /// Every data op.
    ReadWrite,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        }
    }
}

/// One node certificate's access to a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The id of the node's certificate (`keel://node/<id>`).
    pub node: String,
    pub access: Access,
}

/// A copy's membership list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberList {
    /// A primary's in-sync mirrors, in order.
    pub in_sync: Vec<SocketAddr>,
    /// A primary's mirrors being rebuilt (R7), in order.
    pub rebuilding: Vec<SocketAddr>,
    /// The storage server id of the volume's primary: on a mirror, the only storage peer whose
    /// replicated requests (and rebuild) it takes.
    pub primary: Option<String>,
    /// The node certificates that may use the copy, one entry per node.
    pub grants: Vec<Grant>,
}

/// Whether `s` is a valid certificate id: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl MemberList {
    /// A list of mirrors only (no access entries).
    pub fn mirrors(in_sync: &[SocketAddr], rebuilding: &[SocketAddr]) -> MemberList {
        MemberList {
            in_sync: in_sync.to_vec(),
            rebuilding: rebuilding.to_vec(),
            ..MemberList::default()
        }
    }

    /// The access node `id` was granted, if any.
    pub fn access_of(&self, node: &str) -> Option<Access> {
        self.grants
            .iter()
            .find(|g| g.node == node)
            .map(|g| g.access)
    }

    /// Whether the list names any mirror.
    pub fn has_mirrors(&self) -> bool {
        !self.in_sync.is_empty() || !self.rebuilding.is_empty()
    }

    /// The list without its mirrors (what a mirror keeps of a primary's list).
    pub fn access_only(&self) -> MemberList {
        MemberList {
            in_sync: Vec::new(),
            rebuilding: Vec::new(),
            primary: self.primary.clone(),
            grants: self.grants.clone(),
        }
    }

    /// A digest of the access list (primary and grants, not the mirrors): what a storage
    /// server reports for each copy, so the controller can tell a copy whose access list
    /// differs from the volume record's and push it again.
    pub fn access_digest(&self) -> u32 {
        crc32c::crc32c(&self.access_only().encode())
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        !self.has_mirrors() && self.primary.is_none() && self.grants.is_empty()
    }

    /// Parses a list (see the module documentation).
    pub fn parse(payload: &[u8]) -> Result<MemberList, DecodeError> {
        let bad = |line: usize, reason: String| DecodeError::InvalidMembership { line, reason };
        if payload.len() > MAX_MEMBERSHIP_PAYLOAD {
            return Err(bad(
                0,
                format!(
                    "list of {} bytes exceeds {MAX_MEMBERSHIP_PAYLOAD}",
                    payload.len()
                ),
            ));
        }
        let text =
            std::str::from_utf8(payload).map_err(|e| bad(0, format!("not UTF-8 text: {e}")))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let mut list = MemberList::default();
        if text.is_empty() {
            return Ok(list);
        }
        for (i, l) in text.split('\n').enumerate() {
            let line = i + 1;
            if let Some(id) = l.strip_prefix(PRIMARY_PREFIX) {
                if !valid_id(id) {
                    return Err(bad(line, format!("{id:?} is not a valid server id")));
                }
                if list.primary.is_some() {
                    return Err(bad(line, "the primary is named twice".into()));
                }
                list.primary = Some(id.to_string());
                continue;
            }
            if let Some(rest) = l.strip_prefix(NODE_PREFIX) {
                let (node, access) = rest
                    .split_once(' ')
                    .ok_or_else(|| bad(line, format!("{l:?} is not `node <id> rw|ro`")))?;
                let access = match access {
                    "rw" => Access::ReadWrite,
                    "ro" => Access::ReadOnly,
                    other => {
                        return Err(bad(line, format!("access {other:?} is not rw or ro")));
                    }
                };
                if !valid_id(node) {
                    return Err(bad(line, format!("{node:?} is not a valid node id")));
                }
                if list.access_of(node).is_some() {
                    return Err(bad(line, format!("node {node} is listed twice")));
                }
                list.grants.push(Grant {
                    node: node.to_string(),
                    access,
                });
                continue;
            }
            let (addr, rebuild) = match l.strip_prefix(REBUILD_PREFIX) {
                Some(rest) => (rest, true),
                None => (l, false),
            };
            let a: SocketAddr = addr.parse().map_err(|_| {
                bad(
                    line,
                    format!("{l:?} is not an IP:PORT, rebuild IP:PORT, primary or node entry"),
                )
            })?;
            if list.in_sync.contains(&a) || list.rebuilding.contains(&a) {
                return Err(bad(line, format!("{a} is listed twice")));
            }
            if rebuild {
                list.rebuilding.push(a);
            } else {
                list.in_sync.push(a);
            }
        }
        Ok(list)
    }

    /// Encodes the list: in-sync mirrors, mirrors being rebuilt, the primary, the grants.
    pub fn encode(&self) -> Vec<u8> {
        self.in_sync
            .iter()
            .map(|a| a.to_string())
            .chain(
                self.rebuilding
                    .iter()
                    .map(|a| format!("{REBUILD_PREFIX}{a}")),
            )
            .chain(self.primary.iter().map(|p| format!("{PRIMARY_PREFIX}{p}")))
            .chain(
                self.grants
                    .iter()
                    .map(|g| format!("{NODE_PREFIX}{} {}", g.node, g.access.as_str())),
            )
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn grant(node: &str, access: Access) -> Grant {
        Grant {
            node: node.into(),
            access,
        }
    }

    #[test]
    fn access_entries_round_trip_with_mirrors() {
        let a: SocketAddr = "10.0.0.1:7500".parse().expect("addr");
        let b: SocketAddr = "[fd00::2]:7501".parse().expect("addr");
        let list = MemberList {
            in_sync: vec![a],
            rebuilding: vec![b],
            primary: Some("s-1".into()),
            grants: vec![
                grant("n1", Access::ReadWrite),
                grant("n.2", Access::ReadOnly),
            ],
        };
        let text = list.encode();
        assert_eq!(
            text,
            b"10.0.0.1:7500\nrebuild [fd00::2]:7501\nprimary s-1\nnode n1 rw\nnode n.2 ro".to_vec()
        );
        assert_eq!(MemberList::parse(&text).expect("parse"), list);
        assert_eq!(list.access_of("n1"), Some(Access::ReadWrite));
        assert_eq!(list.access_of("n.2"), Some(Access::ReadOnly));
        assert_eq!(list.access_of("n3"), None);
        assert_eq!(list.access_only().in_sync, Vec::<SocketAddr>::new());
        assert_eq!(list.access_only().grants.len(), 2);
        assert!(MemberList::parse(b"").expect("empty").is_empty());
        // The old format (mirrors only) still parses, with no access entries.
        let old = MemberList::parse(b"10.0.0.1:7500\n").expect("old");
        assert_eq!(old, MemberList::mirrors(&[a], &[]));
    }

    #[test]
    fn malformed_access_entries_are_refused_with_their_line() {
        for (text, line) in [
            (&b"node n1"[..], 1),
            (b"node n1 rwx", 1),
            (b"node n1  rw", 1),
            (b"node n/1 rw", 1),
            (b"node  rw", 1),
            (b"node n1 rw\nnode n1 ro", 2),
            (b"primary s1\nprimary s2", 2),
            (b"primary ", 1),
            (b"primary a b", 1),
            (b"10.0.0.1:1\nnodes n1 rw", 2),
        ] {
            match MemberList::parse(text) {
                Err(DecodeError::InvalidMembership { line: l, reason }) => {
                    assert_eq!(l, line, "{:?}: {reason}", String::from_utf8_lossy(text));
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(text)),
            }
        }
        let long = format!("node {} rw", "a".repeat(65));
        assert!(MemberList::parse(long.as_bytes()).is_err());
        assert!(valid_id("a.b-c_D9"));
        assert!(!valid_id(""));
        assert!(!valid_id("*"));
    }
}
