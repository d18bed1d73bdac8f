//! Value types carried on the wire.

use std::fmt;
use std::str::FromStr;

/// A volume's identity: 128 bits, shown as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u128);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Why a volume id could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid volume id {0:?}: expected 1 to 32 hex digits (e.g. 0a1b2c)")]
pub struct VolumeIdError(pub String);

impl FromStr for VolumeId {
    type Err = VolumeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.strip_prefix("vol-").unwrap_or(s);
        if t.is_empty() || t.len() > 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VolumeIdError(s.to_string()));
        }
        u128::from_str_radix(t, 16)
            .map(VolumeId)
            .map_err(|_| VolumeIdError(s.to_string()))
    }
}

/// The fencing number of a volume's membership. Requests carrying an older epoch than the copy
/// serves are refused with [`Status::StaleEpoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Request operations: the data path (1..=7, from node managers) and copy administration
/// (16..=19, from the controller). See `docs/protocol.md` for each op's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Discard = 4,
    WriteZeroes = 5,
    Ping = 6,
    /// A client's new connection claims the volume (`offset` = generation, higher than any
    /// earlier connection of the same client; `length` = the client's key): requests of its
    /// older connections are refused from then on (storage-server `session` module).
    Claim = 7,
    /// Create a copy: `offset` = size in bytes, `length` = [`MemberRole`], `epoch` = its epoch.
    CreateCopy = 16,
    /// Delete a copy and its file.
    DeleteCopy = 17,
    /// Durably set a copy's role (`length`) and epoch (`epoch`): the fencing step.
    SetMembership = 18,
    /// Grow a copy to `offset` bytes.
    Resize = 19,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::Ping,
            7 => Op::Claim,
            16 => Op::CreateCopy,
            17 => Op::DeleteCopy,
            18 => Op::SetMembership,
            19 => Op::Resize,
            _ => return None,
        })
    }

    /// Whether the request carries a payload (`length` bytes of data).
    pub fn request_has_payload(self) -> bool {
        self == Op::Write
    }

    /// Whether a successful response carries a payload (`length` bytes of data).
    pub fn response_has_payload(self) -> bool {
        self == Op::Read
    }

    /// Whether the op names a byte range (offset + length) of the volume.
    pub fn has_range(self) -> bool {
        matches!(self, Op::Read | Op::Write | Op::Discard | Op::WriteZeroes)
    }

    /// Whether the op changes the volume's content.
    pub fn is_mutation(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }

    /// Whether the op administers copies (controller only) rather than moving data.
    pub fn is_admin(self) -> bool {
        matches!(
            self,
            Op::CreateCopy | Op::DeleteCopy | Op::SetMembership | Op::Resize
        )
    }
}

/// A copy's role in its volume's membership, as carried in the `length` field of
/// [`Op::CreateCopy`] and [`Op::SetMembership`] requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MemberRole {
    /// Serves the volume's clients.
    Primary = 0,
    /// Receives the primary's writes.
    Mirror = 1,
}

impl MemberRole {
    pub fn from_u32(v: u32) -> Option<MemberRole> {
        match v {
            0 => Some(MemberRole::Primary),
            1 => Some(MemberRole::Mirror),
            _ => None,
        }
    }
}

impl fmt::Display for MemberRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberRole::Primary => "primary",
            MemberRole::Mirror => "mirror",
        })
    }
}

/// Per-request flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReqFlags(pub u8);

impl ReqFlags {
    /// Force unit access: the write is durable before it is acknowledged.
    pub const FUA: u8 = 1;
    /// Every flag bit this version understands; others are a bad request.
    pub const KNOWN: u8 = Self::FUA;

    pub fn fua(self) -> bool {
        self.0 & Self::FUA != 0
    }
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoError = 1,
    OutOfRange = 2,
    StaleEpoch = 3,
    NotPrimary = 4,
    UnknownVolume = 5,
    Unauthorized = 6,
    BadRequest = 7,
    /// The payload's CRC32C did not match its content.
    ChecksumMismatch = 8,
    /// The version in a hello is not spoken by this peer.
    UnsupportedVersion = 9,
    /// The volume is read-only for this client.
    ReadOnly = 10,
    /// This server's copy of the volume is lost: it failed an I/O, or its file is gone
    /// (docs/replication.md, R10). Another copy takes over; a client waits and resends.
    CopyLost = 11,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::IoError,
            2 => Status::OutOfRange,
            3 => Status::StaleEpoch,
            4 => Status::NotPrimary,
            5 => Status::UnknownVolume,
            6 => Status::Unauthorized,
            7 => Status::BadRequest,
            8 => Status::ChecksumMismatch,
            9 => Status::UnsupportedVersion,
            10 => Status::ReadOnly,
            11 => Status::CopyLost,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Status::Ok => "ok",
            Status::IoError => "I/O error",
            Status::OutOfRange => "out of range",
            Status::StaleEpoch => "stale epoch",
            Status::NotPrimary => "not primary",
            Status::UnknownVolume => "unknown volume",
            Status::Unauthorized => "unauthorized",
            Status::BadRequest => "bad request",
            Status::ChecksumMismatch => "checksum mismatch",
            Status::UnsupportedVersion => "unsupported protocol version",
            Status::ReadOnly => "read-only",
            Status::CopyLost => "copy lost",
        };
        f.write_str(s)
    }
}

/// What a peer is, as stated by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// keel-storage: holds copies.
    Storage,
    /// keel-vhost: the per-host node manager serving guests.
    Node,
    /// keel-controller.
    Controller,
    /// An operator's client (keelctl).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Storage => "storage",
            Role::Node => "node",
            Role::Controller => "controller",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "storage" => Role::Storage,
            "node" => Role::Node,
            "controller" => Role::Controller,
            "admin" => Role::Admin,
            other => {
                return Err(format!(
                    "unknown role {other:?}: expected storage, node, controller or admin"
                ))
            }
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn volume_id_round_trip() {
        let v: VolumeId = "vol-0a1B".parse().expect("parse");
        assert_eq!(v, VolumeId(0xa1b));
        assert_eq!(v.to_string().parse::<VolumeId>().expect("re-parse"), v);
        assert!("".parse::<VolumeId>().is_err());
        assert!("xyz".parse::<VolumeId>().is_err());
        assert!("1".repeat(33).parse::<VolumeId>().is_err());
    }

    #[test]
    fn op_and_status_codes_round_trip() {
        for v in 0..=255u8 {
            if let Some(op) = Op::from_u8(v) {
                assert_eq!(op as u8, v);
            }
            if let Some(s) = Status::from_u8(v) {
                assert_eq!(s as u8, v);
            }
        }
        assert_eq!(Op::from_u8(0), None);
        assert_eq!(Op::from_u8(16), Some(Op::CreateCopy));
        assert_eq!(Op::from_u8(19), Some(Op::Resize));
        assert_eq!(Op::from_u8(20), None);
        for v in 0..=u32::from(u8::MAX) {
            if let Some(r) = MemberRole::from_u32(v) {
                assert_eq!(r as u32, v);
            }
        }
        assert_eq!(MemberRole::from_u32(2), None);
        assert_eq!(Status::from_u8(11), Some(Status::CopyLost));
        assert_eq!(Status::from_u8(12), None);
    }
}
