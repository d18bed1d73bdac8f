//! The records the controller keeps in its metadata store, one record per key:
//! `server/<id>`, `node/<id>`, `volume/<hex id>`. A volume record holds its copies and
//! attachments, so every volume change (attach, takeover, resize, delete) is one
//! compare-and-swap of one record. Two kinds of keys make multi-record decisions atomic (one
//! store transaction with the volume record):
//! * `name/<name>` → the JSON string of the id of the volume with that name (created only if
//!   absent, together with the volume; removed with it). `""` marks a name several volumes
//!   created before the index held: it resolves only while one of them is left.
//! * `alloc/<server>` → a reservation fence: every change that adds bytes to a server's copies
//!   rewrites it, comparing the version read *before* counting the server's allocation, so two
//!   reservations counted against the same allocation cannot both commit.

use serde::{Deserialize, Serialize};

pub const SERVER_PREFIX: &str = "server/";
pub const NODE_PREFIX: &str = "node/";
pub const VOLUME_PREFIX: &str = "volume/";
pub const NAME_PREFIX: &str = "name/";
pub const ALLOC_PREFIX: &str = "alloc/";

pub fn server_key(id: &str) -> String {
    format!("{SERVER_PREFIX}{id}")
}
pub fn node_key(id: &str) -> String {
    format!("{NODE_PREFIX}{id}")
}
pub fn volume_key(id: &str) -> String {
    format!("{VOLUME_PREFIX}{id}")
}
pub fn name_key(name: &str) -> String {
    format!("{NAME_PREFIX}{name}")
}
pub fn alloc_key(server: &str) -> String {
    format!("{ALLOC_PREFIX}{server}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub address: String,
    pub zone: String,
    pub capacity_bytes: u64,
    pub registered_at_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub socket_dir: String,
    pub registered_at_unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyRole {
    Primary,
    Mirror,
}

impl CopyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyRole::Primary => "primary",
            CopyRole::Mirror => "mirror",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    pub server: String,
    pub role: CopyRole,
    /// Mirrors only: whether it holds every acknowledged write (docs/replication.md, R5).
    #[serde(default = "in_sync_default")]
    pub in_sync: bool,
    /// Mirrors only: being filled from the primary (R7); joins the in-sync set when done.
    #[serde(default)]
    pub rebuilding: bool,
}

fn in_sync_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    ReadWrite,
    ReadOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ReadWrite => "read_write",
            Mode::ReadOnly => "read_only",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub node: String,
    pub instance: String,
    pub mode: Mode,
    pub socket: String,
    pub attached_at_unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeRecordState {
    Creating,
    Ready,
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: Option<String>,
    pub size: u64,
    pub replicas: u32,
    /// Logical block size the guest sees (512 or 4096). Records written before it existed
    /// read 4096: keel-vhost offered only that, and their guests' partition tables and
    /// filesystems are laid out in it.
    #[serde(default = "keel_api::types::legacy_block_size")]
    pub block_size: u32,
    pub state: VolumeRecordState,
    /// Bumped by every read-write attach and every forced detach: the storage servers refuse
    /// I/O that carries an older epoch, so whoever held the volume before is fenced.
    pub epoch: u64,
    /// The epoch of the current writer's attach (docs/replication.md, W): requests carrying an
    /// older epoch are fenced. 0 in records written before it existed: read as `epoch`.
    #[serde(default)]
    pub writer_epoch: u64,
    pub copies: Vec<CopyRecord>,
    pub attachments: Vec<AttachmentRecord>,
    pub created_at_unix: u64,
}

impl VolumeRecord {
    pub fn writer(&self) -> Option<&AttachmentRecord> {
        self.attachments.iter().find(|a| a.mode == Mode::ReadWrite)
    }

    /// W: requests with an older epoch are refused.
    pub fn writer_floor(&self) -> u64 {
        if self.writer_epoch == 0 {
            self.epoch
        } else {
            self.writer_epoch
        }
    }

    pub fn primary(&self) -> Option<&CopyRecord> {
        self.copies.iter().find(|c| c.role == CopyRole::Primary)
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Names (node ids, instance names, volume names): 1–64 of `[A-Za-z0-9._-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The id an argument names if it has the shape of a volume id: 1 to 32 hex digits
/// (case-insensitive), optionally after `vol-` — what `keel_proto::VolumeId` parses. Returned
/// as stored: lowercase, without the prefix. Volume names never have this shape (see
/// [`volume_name_problem`]), so an argument is either an id or a name, never both.
pub fn id_shape(s: &str) -> Option<String> {
    let t = s.strip_prefix("vol-").unwrap_or(s);
    (!t.is_empty() && t.len() <= 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| t.to_ascii_lowercase())
}

/// Why `s` cannot be a volume name, if it cannot: a name is 1 to 64 of `[A-Za-z0-9._-]`, not
/// only hex digits, and not starting with `vol-` (any case) — the shapes of volume ids.
pub fn volume_name_problem(s: &str) -> Option<&'static str> {
    if !valid_name(s) {
        Some("use 1 to 64 letters, digits, '.', '_' or '-'")
    } else if s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some("a name of hex digits only has the shape of a volume id; add a letter beyond a-f or another character")
    } else if s.len() >= 4 && s[..4].eq_ignore_ascii_case("vol-") {
        Some("names starting with \"vol-\" are reserved for volume ids")
    } else {
        None
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn ids_and_names_do_not_overlap() {
        assert_eq!(
            id_shape("8453725B2D48D218").as_deref(),
            Some("8453725b2d48d218")
        );
        assert_eq!(
            id_shape("vol-8453725b2d48d218").as_deref(),
            Some("8453725b2d48d218")
        );
        assert_eq!(id_shape("deadbeef").as_deref(), Some("deadbeef"));
        assert_eq!(id_shape("data1"), None);
        assert_eq!(id_shape("vol-"), None);
        for bad in [
            "deadbeef",
            "8453725b2d48d218",
            "vol-8453725b2d48d218",
            "VOL-x",
            "vol-data",
            "",
            "a b",
            "0123456789abcdef0123456789abcdef0",
        ] {
            assert!(volume_name_problem(bad).is_some(), "{bad:?} accepted");
        }
        for good in ["data1", "race-2", "vm.disk_0", "volume-1", "x"] {
            assert_eq!(volume_name_problem(good), None, "{good:?} refused");
            assert_eq!(id_shape(good), None, "{good:?} is id-shaped");
        }
        // Every id shape is refused as a name.
        for id in [
            "a",
            "0",
            "vol-0",
            "vol-ABC",
            "ffffffffffffffffffffffffffffffff",
        ] {
            assert!(id_shape(id).is_some());
            assert!(
                volume_name_problem(id).is_some(),
                "{id:?} accepted as a name"
            );
        }
    }

    /// A volume recorded before volumes had a block size was always served with 4096-byte
    /// blocks, and its guest's partition table and filesystems are laid out in them: it keeps
    /// 4096 (new volumes default to 512 at create, not here).
    #[test]
    fn records_without_a_block_size_keep_4096() {
        let old = r#"{"id":"00000000000000ab","name":null,"size":1048576,"replicas":1,
            "state":"ready","epoch":1,"copies":[],"attachments":[],"created_at_unix":1}"#;
        let rec: VolumeRecord = serde_json::from_str(old).expect("old record");
        assert_eq!(rec.block_size, 4096);
        let new = VolumeRecord {
            block_size: 512,
            ..rec
        };
        let back: VolumeRecord =
            serde_json::from_str(&serde_json::to_string(&new).expect("json")).expect("parse");
        assert_eq!(back.block_size, 512);
    }
}
