//! The records of the controller's JSON API (`/v1/...`). Field names are the stable JSON
//! names scripts rely on; new fields may be added, none are renamed or removed within `v1`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Request bodies must be JSON objects: serde's derived `Deserialize` also reads a struct from
/// an array of its fields in order (`["1GiB"]` would be a create), which the API refuses. Each
/// request record derives with `#[serde(remote = "Self")]` (inherent `serialize` and
/// `deserialize`), and this implements the traits: serialization unchanged, deserialization
/// only from a map.
macro_rules! object_only {
    ($($ty:ident),* $(,)?) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                $ty::serialize(self, s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct ObjectOnly;
                impl<'de> serde::de::Visitor<'de> for ObjectOnly {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(concat!("a JSON object (", stringify!($ty), ")"))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(ObjectOnly)
            }
        }
    )*};
}

object_only!(
    ServerRegistration,
    ServerHeartbeat,
    NodeRegistration,
    NodeHeartbeat,
    CreateVolume,
    ResizeVolume,
    AttachVolume,
    DetachVolume,
    MirrorFailed,
    PrimaryUnreachable,
);

/// A size in a request body: a byte count (`1073741824`) or a human size (`"1GiB"`, `"512MiB"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeInput {
    Bytes(u64),
    Human(String),
}

impl SizeInput {
    /// The size in bytes, or why it is not one.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeInput::Bytes(b) => Ok(*b),
            SizeInput::Human(s) => keel_proto::parse_size(s),
        }
    }

    /// The size as its caller gave it (`10GiB`, or a byte count with its human form), for
    /// error messages.
    pub fn as_typed(&self) -> String {
        match self {
            SizeInput::Bytes(b) if *b < 1024 => format!("{b} bytes"),
            SizeInput::Bytes(b) => format!("{b} bytes ({})", keel_proto::human_size(*b)),
            SizeInput::Human(s) => s.trim().to_string(),
        }
    }
}

/// `POST /v1/servers`: a storage server announces itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct ServerRegistration {
    /// Must equal the id in the caller's certificate (`keel://storage/<id>`).
    pub id: String,
    /// Where nodes and the controller reach its data path, `IP:PORT`.
    pub address: String,
    /// Failure-domain label (zone or rack); copies of a volume prefer distinct zones.
    #[serde(default)]
    pub zone: String,
    /// Bytes this server offers for copies.
    pub capacity_bytes: u64,
}

/// One copy a storage server holds, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    pub volume: String,
    pub size: u64,
    pub epoch: u64,
    pub role: String,
    /// CRC32C of the copy's access list (its grants and named primary; docs/security.md):
    /// the controller pushes the membership again when it differs from the record's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_crc32c: Option<u32>,
    /// Set when the copy is lost (docs/replication.md, R10): why (an I/O error, a file
    /// unreadable at start or removed while the server ran). The controller moves the volume
    /// off it. Its other fields are then 0 and `role` `unknown` if the file could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// Request counters a storage server reports (totals since it started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCounters {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// `POST /v1/servers/{id}/heartbeat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct ServerHeartbeat {
    /// Bytes the server's copies occupy (provisioned sizes).
    pub used_bytes: u64,
    pub copies: Vec<CopyReport>,
    #[serde(default)]
    pub counters: ServerCounters,
    /// Rebuilds this server runs as a primary (docs/replication.md, R7).
    #[serde(default)]
    pub rebuilds: Vec<RebuildReport>,
}

/// One mirror a primary is filling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildReport {
    pub volume: String,
    /// The mirror's data-path address.
    pub mirror: String,
    /// Bytes copied (or found to be holes) in the current pass.
    pub copied: u64,
    /// The volume's size.
    pub total: u64,
}

/// Liveness as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Heartbeats arrive.
    Up,
    /// No heartbeat for longer than the failure timeout.
    Down,
}

/// `GET /v1/servers` entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub id: String,
    pub address: String,
    pub zone: String,
    pub capacity_bytes: u64,
    /// Bytes the controller has placed on this server (sum of its copies' sizes).
    pub allocated_bytes: u64,
    /// Bytes the server last reported in use.
    pub used_bytes: u64,
    pub copies: u64,
    pub health: Health,
    /// Milliseconds since the last heartbeat (or registration).
    pub last_seen_ms_ago: u64,
    pub counters: ServerCounters,
}

/// `POST /v1/nodes`: a node manager announces itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct NodeRegistration {
    /// Must equal the id in the caller's certificate (`keel://node/<id>`).
    pub id: String,
    /// Directory where the node creates vhost-user sockets.
    pub socket_dir: String,
}

/// What a node reports about one attachment it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentReport {
    pub volume: String,
    pub instance: String,
    /// A guest (vhost-user frontend) is connected to the socket.
    pub connected: bool,
    /// keel-vhost listens on the socket: a frontend's connection is accepted (false from
    /// node managers older than the field).
    #[serde(default)]
    pub listening: bool,
}

/// `POST /v1/nodes/{id}/heartbeat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct NodeHeartbeat {
    pub attachments: Vec<AttachmentReport>,
    /// The `version` of the last `GET /v1/nodes/{id}/attachments` answer the node has applied
    /// (started and stopped keel-vhost processes for): `attachments` describes the processes
    /// of that version or later. Absent from node managers older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// `GET /v1/nodes` entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub socket_dir: String,
    pub health: Health,
    pub last_seen_ms_ago: u64,
    pub attachments: u64,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub size: SizeInput,
    /// Copies to keep on distinct servers, 1 to 3 (2 when absent: a primary and one mirror).
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub name: Option<String>,
    /// Logical block size the guest sees, in bytes: 512 (when absent; what firmware boots
    /// from and disk images expect) or 4096. Fixed for the volume's life.
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// A new volume's logical block size when `block_size` is not given.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;

/// The logical block size of volumes recorded before volumes had one: keel-vhost then always
/// offered 4096, and what their guests wrote (partition tables, filesystems) is laid out in it.
pub const LEGACY_BLOCK_SIZE: u32 = 4096;

/// The logical block sizes a volume may have.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];

/// [`LEGACY_BLOCK_SIZE`], for serde defaults.
pub fn legacy_block_size() -> u32 {
    LEGACY_BLOCK_SIZE
}

/// `POST /v1/volumes/{id}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    pub size: SizeInput,
}

/// `POST /v1/volumes/{id}/attach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    pub node: String,
    pub instance: String,
    #[serde(default)]
    pub read_only: bool,
    /// Take the read-write attachment from its current holder, fencing it.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/volumes/{id}/detach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
#[serde(deny_unknown_fields)]
pub struct DetachVolume {
    pub node: String,
    pub instance: String,
    /// Detach even if a guest is still connected (its I/O then fails).
    #[serde(default)]
    pub force: bool,
}

/// Volume lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Copies are being made on the storage servers.
    Creating,
    /// Ready, not attached.
    Available,
    /// At least one attachment.
    Attached,
    /// Copies are being removed.
    Deleting,
}

/// One copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyInfo {
    pub server: String,
    pub address: String,
    /// `primary` or `mirror`.
    pub role: String,
    /// For a `rebuilding` mirror: percent copied, as its primary last reported.
    #[serde(default)]
    pub rebuild_percent: Option<u8>,
    /// `ok` (primary) or `in_sync` (mirror) when the server last reported this copy at the
    /// volume's size and epoch, `stale` for a mirror dropped from the in-sync set,
    /// `pending` while the controller still has to push a change, `server_down` when its
    /// server stopped heartbeating, `lost` when its server reports the copy lost (R10: see
    /// `fault`), `missing` when its live server does not report it at all.
    pub state: String,
    /// Why the server reports the copy lost, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// One attachment of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub node: String,
    pub instance: String,
    /// `read_write` or `read_only`.
    pub mode: String,
    /// The vhost-user socket to give QEMU (`-chardev socket,path=...`).
    pub socket: String,
    /// The epoch this attachment's I/O carries: the writer epoch W of docs/replication.md
    /// (membership changes that keep the writer do not change it).
    pub epoch: u64,
    /// Whether the node last reported a guest connected.
    pub connected: bool,
    /// Whether the node last reported keel-vhost listening on `socket` (a VM may connect).
    #[serde(default)]
    pub ready: bool,
    pub attached_at_unix: u64,
}

/// A volume as `describe` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// 16-hex-digit id; also the disk's serial number in the guest.
    pub id: String,
    pub name: Option<String>,
    pub size: u64,
    pub replicas: u32,
    /// Logical block size the guest sees (512 or 4096 bytes).
    #[serde(default = "legacy_block_size")]
    pub block_size: u32,
    pub state: VolumeState,
    /// Fencing number: I/O carrying an older epoch is refused by the storage servers.
    pub epoch: u64,
    pub copies: Vec<CopyInfo>,
    pub attachments: Vec<AttachmentInfo>,
    pub created_at_unix: u64,
}

/// What a node must serve: its attachments, with everything needed to start each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAttachment {
    pub volume: String,
    pub instance: String,
    pub socket: String,
    pub read_only: bool,
    pub epoch: u64,
    pub size: u64,
    /// The primary copy's data-path address.
    pub server: String,
    /// Logical block size to offer the guest (keel-vhost `--block-size`); 4096 from
    /// controllers older than the field, as keel-vhost offered then.
    #[serde(default = "legacy_block_size")]
    pub block_size: u32,
}

/// `GET /v1/nodes/{id}/attachments?after=V&wait_ms=T`: a node's attachments once their
/// version exceeds `after` (long poll).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAttachments {
    pub version: u64,
    pub attachments: Vec<NodeAttachment>,
}

/// Every error the API returns has this body, with an HTTP status that matches `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code: `not_found`, `bad_request`, `conflict`, `unauthorized`,
    /// `forbidden`, `insufficient_capacity`, `unavailable`, `internal`.
    pub code: String,
    /// What was wrong and what to do.
    pub message: String,
}

/// `DELETE /v1/volumes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResult {
    pub id: String,
    /// Every copy is gone; `false` while a storage server is unreachable (the controller
    /// keeps retrying and removes the volume when done).
    pub complete: bool,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    pub status: String,
    /// The metadata store's revision.
    pub revision: u64,
}

/// `POST /v1/volumes/{id}/mirror-failed`: the volume's primary could not replicate to one of
/// its in-sync mirrors (docs/replication.md, R5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct MirrorFailed {
    /// The mirror's data-path address, `IP:PORT`, as in the primary's membership.
    pub mirror: String,
    /// The epoch the primary serves: the report is refused if the volume moved on.
    pub epoch: u64,
}

/// The answer to a membership change: the volume's new epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipInfo {
    pub epoch: u64,
}

/// A node's report that a volume's primary did not answer keel-vhost within its timeout
/// (`POST /v1/volumes/{id}/primary-unreachable`, node certificate or admin token). The
/// controller probes the primary itself before it promotes a mirror, so one node's broken
/// link cannot flap the volume (docs/replication.md, R6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct PrimaryUnreachable {
    /// The data-path address (`IP:PORT`) keel-vhost was sending to.
    pub server: String,
    /// The epoch keel-vhost's requests carried.
    pub epoch: u64,
    /// How long the oldest request had gone unanswered, in milliseconds.
    pub unanswered_ms: u64,
}

/// The controller's answer to [`PrimaryUnreachable`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryReport {
    /// `promoted` (a mirror took over), `primary_answers` (the controller's probe reached the
    /// primary: nothing changed), `already_moved` (the named server is no longer the primary),
    /// or `no_in_sync_mirror` (nothing to promote: the volume waits for its primary).
    pub outcome: String,
    /// The volume's epoch after the report.
    pub epoch: u64,
    /// The primary's data-path address after the report, if it has one.
    pub primary: Option<String>,
}

/// The answer to a heartbeat (`POST /v1/servers/{id}/heartbeat`, `POST /v1/nodes/{id}/heartbeat`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeartbeatAnswer {
    /// The number of the certificate revocation list the controller holds (none yet: `null`).
    /// A daemon that has applied a lower one fetches it from `GET /v1/pki/crl`.
    pub crl_number: Option<u64>,
}

/// `GET /v1/pki/crl` and the answer to `PUT /v1/pki/crl`: the cluster's certificate
/// revocation list, signed by the cluster CA (docs/security.md, "Certificates").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrlInfo {
    /// Its CRL number: a CRL replaces only a lower-numbered one.
    pub number: u64,
    /// Serials it revokes (hexadecimal, as `keelctl pki list` shows them).
    pub revoked: Vec<String>,
    /// Its `thisUpdate`, seconds since the Unix epoch.
    pub this_update: u64,
    /// The CRL, PEM (`-----BEGIN X509 CRL-----`).
    pub pem: String,
}
