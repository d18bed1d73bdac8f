//! The records the controller keeps in its metadata store, one record per key:
//! `server/<id>`, `node/<id>`, `volume/<hex id>`. A volume record holds its copies and
//! attachments, so every volume change (attach, takeover, resize, delete) is one
//! compare-and-swap of one record.

use serde::{Deserialize, Serialize};

pub const SERVER_PREFIX: &str = "server/";
pub const NODE_PREFIX: &str = "node/";
pub const VOLUME_PREFIX: &str = "volume/";

pub fn server_key(id: &str) -> String {
    format!("{SERVER_PREFIX}{id}")
}
pub fn node_key(id: &str) -> String {
    format!("{NODE_PREFIX}{id}")
}
pub fn volume_key(id: &str) -> String {
    format!("{VOLUME_PREFIX}{id}")
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
