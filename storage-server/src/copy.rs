//! One volume copy on local disk: a header and the volume's data in one sparse file.
//!
//! ```text
//! offset 0       header slot A (4 KiB)
//! offset 4 KiB   header slot B (4 KiB)
//! offset 1 MiB   data: byte i of the volume lives at 1 MiB + i (data_offset in the header)
//! ```
//! A header update writes the slot not holding the newest header, with a higher sequence
//! number and a CRC32C, then fdatasyncs: a torn update leaves the other slot valid. Data never
//! written are holes and read as zeros; discard and write-zeroes punch holes. Later formats
//! keep per-chunk (`chunk_size`, 4 MiB) state in sidecar files (see `docs/format.md`).
//!
//! **Fencing.** A data request is *admitted* ([`Copy::admit`]) before its I/O: the admission
//! checks the request's epoch against the copy's and holds a shared gate for the duration of
//! the I/O. Membership changes ([`Copy::set_membership`]) and deletion ([`Copy::retire`]) take
//! the gate exclusively, so when they return, every request admitted under the old membership
//! has finished and every later one is checked against the new one.
//!
//! **Epoch rules** ([`admission`]): a node's request at epoch c on a primary is refused
//! `stale epoch` below the copy's writer epoch (its writer was replaced), `not primary` above
//! the copy's epoch (the copy is behind); anything in between is accepted, so a membership
//! change that keeps the writer does not disturb it. A replicated request (from another storage
//! server) is accepted only by a mirror, and only at exactly the mirror's epoch.
//!
//! **Membership list.** A primary keeps the data-path addresses of its in-sync mirrors and of
//! its mirrors being rebuilt in `<id>.members` next to the copy (one `IP:PORT` or
//! `rebuild IP:PORT` per line), replaced atomically before the membership change that carries
//! it is published. Every copy keeps its **access list** there too ([`keel_proto::members`]):
//! the node certificates granted access (and how), and the primary's server id.
//!
//! **Access** ([`authorize`], docs/security.md): before any epoch rule, a node's request is
//! refused `unauthorized` (with no epoch) unless its certificate id was granted, and a granted
//! read-only node's mutation `read-only`; a storage peer's unless it is the primary the list
//! names. The check is part of admission, under the same gate as the epoch: once a membership
//! change that withdraws a grant returns, nothing of that peer is admitted any more.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, TryLockError};

use keel_proto::members::MemberList;
use keel_proto::tls::Identity;
use keel_proto::{Epoch, Op, Role, VolumeId};

pub use crate::admission::{admission, authorize, is_mutation, CopyRole, Refusal};
use crate::dirty::{CopyIdentity, DirtyTracker};
use crate::session::{ClientKey, Session, Sessions};
use crate::sync::GroupSync;

pub const MAGIC: [u8; 8] = *b"KEELCOPY";
pub const FORMAT_VERSION: u32 = 1;
pub const SLOT_SIZE: u64 = 4096;
pub const DATA_OFFSET: u64 = 1 << 20;
pub const CHUNK_SIZE: u32 = 4 << 20;

/// Shards of a copy's per-chunk rebuild locks ([`Copy::chunk_lock`]).
const CHUNK_LOCK_SHARDS: usize = 64;
pub const SECTOR: u64 = 512;
/// Bytes of the header this build writes: the writer-epoch layout plus `incarnation`.
const HEADER_LEN: usize = WRITER_HEADER_LEN + 8;
/// Bytes of the second layout: the first plus `writer_epoch` (no `incarnation`).
const WRITER_HEADER_LEN: usize = OLD_HEADER_LEN + 8;
/// Bytes of the first header layout (no `writer_epoch`; it opens as the header's epoch).
const OLD_HEADER_LEN: usize = 8 + 4 + 4 + 8 + 16 + 8 + 4 + 4 + 1 + 1 + 8 + 8 + 4;

/// Errors of the copy layer.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no valid header (not a Keel copy, or both header slots are damaged)")]
    NoValidHeader { path: PathBuf },
    #[error(
        "{path}: format version {found} is newer than this build understands ({FORMAT_VERSION})"
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("volume size {0} is not a positive multiple of 512 bytes, or too large")]
    BadSize(u64),
    #[error("a copy of volume {0} already exists")]
    Exists(VolumeId),
    #[error("the copy failed an earlier I/O and serves nothing more (another copy takes over)")]
    Failed,
    #[error("epoch {requested} is older than the copy's epoch {current}")]
    StaleEpoch { requested: Epoch, current: Epoch },
    #[error("copies only grow: size {requested} is smaller than the current {current} bytes")]
    Shrink { requested: u64, current: u64 },
    #[error("the copy was deleted")]
    Deleted,
    #[error("{path}: invalid membership list: {reason}")]
    BadMembers { path: PathBuf, reason: String },
}

/// How many withdrawn grants a copy remembers (in memory) to tell a fenced node so.
const MAX_REVOKED: usize = 256;

/// Proof that a data request was admitted at the copy's current membership; I/O done while it
/// is held finishes before any membership change or deletion takes effect.
#[must_use = "the admission lasts as long as the guard"]
pub struct Admitted<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    /// The copy's epoch at admission (what a primary stamps on the requests it replicates).
    pub epoch: Epoch,
    /// The in-sync mirrors at admission (empty unless the copy is primary).
    pub mirrors: Arc<Vec<SocketAddr>>,
    /// The mirrors being rebuilt at admission (empty unless the copy is primary).
    pub rebuilding: Arc<Vec<SocketAddr>>,
}

/// The header's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub volume: VolumeId,
    pub size: u64,
    pub chunk_size: u32,
    pub role: CopyRole,
    pub epoch: Epoch,
    pub data_offset: u64,
    /// The epoch at which the volume's current writer attached: node requests below it are
    /// fenced. A header of the first layout opens with its `epoch` here.
    pub writer_epoch: Epoch,
    /// Random, chosen when the copy is created: a deleted and recreated copy has another, so a
    /// primary's dirty-chunk map of the old one is never used for it. 0 in headers written
    /// before it existed (the copy then picks one when opened, written by its next update).
    pub incarnation: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SLOT_SIZE as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b.extend_from_slice(&self.sequence.to_le_bytes());
        b.extend_from_slice(&self.volume.0.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(SECTOR as u32).to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.push(self.role as u8);
        b.push(0); // state: reserved for replication (in sync, resyncing)
        b.extend_from_slice(&self.epoch.0.to_le_bytes());
        b.extend_from_slice(&self.data_offset.to_le_bytes());
        b.extend_from_slice(&self.writer_epoch.0.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SLOT_SIZE as usize, 0);
        b
    }

    /// Decodes a slot; `None` if it is not a valid header. `Err` if it is a newer format.
    fn decode(slot: &[u8], path: &Path) -> Result<Option<Header>, CopyError> {
        let Some(b) = slot.get(..OLD_HEADER_LEN) else {
            return Ok(None);
        };
        if b[..8] != MAGIC {
            return Ok(None);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        // header_len: the first layout, or the writer-epoch one or longer (a later layout
        // appends fields before the CRC, which always comes last).
        let len = u32_at(12) as usize;
        if len != OLD_HEADER_LEN && len < WRITER_HEADER_LEN {
            return Ok(None);
        }
        let Some(b) = slot.get(..len) else {
            return Ok(None);
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let crc = u32_at(len - 4);
        if crc32c::crc32c(&b[..len - 4]) != crc {
            return Ok(None);
        }
        let version = u32_at(8);
        if version > FORMAT_VERSION {
            return Err(CopyError::NewerFormat {
                path: path.to_owned(),
                found: version,
            });
        }
        let mut vol = [0u8; 16];
        vol.copy_from_slice(&b[24..40]);
        let role = match b[56] {
            1 => CopyRole::Primary,
            2 => CopyRole::Mirror,
            _ => return Ok(None),
        };
        Ok(Some(Header {
            sequence: u64_at(16),
            volume: VolumeId(u128::from_le_bytes(vol)),
            size: u64_at(40),
            chunk_size: u32_at(52),
            role,
            epoch: Epoch(u64_at(58)),
            data_offset: u64_at(66),
            writer_epoch: if len == OLD_HEADER_LEN {
                Epoch(u64_at(58))
            } else {
                Epoch(u64_at(74))
            },
            incarnation: if len >= HEADER_LEN { u64_at(82) } else { 0 },
        }))
    }
}

/// An open copy. All methods take `&self` and are safe to call from many threads.
pub struct Copy {
    path: PathBuf,
    file: File,
    /// The newest header on disk. Held across header updates, so they are serialised.
    header: Mutex<Header>,
    volume: VolumeId,
    /// Mirrored from the header for the per-request range check. Only ever grows, and is
    /// raised only once the file and header hold the new size durably.
    size: AtomicU64,
    data_offset: u64,
    epoch: AtomicU64,
    /// Mirrored from the header: node requests below it are fenced.
    writer_epoch: AtomicU64,
    /// Mirrored from the header (read without the header lock, which fsyncs).
    incarnation: u64,
    /// A primary's in-sync mirrors (empty for a mirror), as in `<id>.members`. Replaced under
    /// the gate, like the epoch.
    mirrors: RwLock<Arc<Vec<SocketAddr>>>,
    /// A primary's mirrors being rebuilt (R7; empty for a mirror), also in `<id>.members`.
    rebuilding: RwLock<Arc<Vec<SocketAddr>>>,
    /// Who may use the copy (its list without mirrors), also in `<id>.members`. Replaced under
    /// the gate, like the epoch.
    access: RwLock<Arc<MemberList>>,
    /// Nodes whose grant a membership change withdrew, newest last (in memory, at most
    /// [`MAX_REVOKED`]): they are answered [`Refusal::Revoked`].
    revoked: Mutex<std::collections::VecDeque<String>>,
    /// Orders a rebuild's chunk copies with node writes to the same chunks (R7): sharded by
    /// chunk index, shared by replicated node mutations, exclusive for one chunk's copy.
    chunk_locks: Vec<Arc<tokio::sync::RwLock<()>>>,
    /// `CopyRole as u8`, mirrored from the header for the per-request check.
    role: AtomicU8,
    /// Shared by admitted data requests for their I/O, exclusive for publishing membership
    /// changes and deletion (see the module documentation). Lock order: `header`, then `gate`.
    gate: RwLock<()>,
    /// Set (under both locks) when the copy is deleted: it then refuses everything.
    deleted: AtomicBool,
    /// Set when an I/O on the copy's file failed (R10): the copy then serves nothing more.
    failed: AtomicBool,
    /// Why [`Copy::failed`] was set (the first error), for the heartbeat and the logs.
    failure: Mutex<Option<String>>,
    /// The filesystem refused an `RWF_NOWAIT` write once: don't try again.
    nowait_write_unsupported: AtomicBool,
    sync: GroupSync,
    /// A primary's dirty-chunk maps of its mirrors (in memory only; see [`crate::dirty`]).
    dirty: DirtyTracker,
    /// Created empty as a primary by this process and primary ever since: a mirror put in
    /// sync while this holds was never written apart from it, so its map starts clean.
    fresh: AtomicBool,
    /// 1 + the epoch of the last membership the controller set on this copy in this process
    /// (0: none since it was opened). Until a primary has been told its current epoch's
    /// membership, it cannot know whether a mirror it is rebuilding was put in sync while it
    /// was down, so a forward that mirror misses must go through the controller (R7).
    membership_known: AtomicU64,
    /// Client sessions ([`crate::session`]).
    sessions: Sessions,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Copy {
    /// Creates a new copy file atomically (temp file, fsync, rename, fsync of the directory).
    pub fn create(
        path: &Path,
        volume: VolumeId,
        size: u64,
        role: CopyRole,
        epoch: Epoch,
    ) -> Result<Copy, CopyError> {
        let total = file_len(size)?;
        if path.exists() {
            return Err(CopyError::Exists(volume));
        }
        let tmp = path.with_extension("creating");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let header = Header {
            sequence: 1,
            volume,
            size,
            chunk_size: CHUNK_SIZE,
            role,
            epoch,
            data_offset: DATA_OFFSET,
            writer_epoch: epoch,
            incarnation: random_nonzero(),
        };
        f.write_all_at(&header.encode(), (header.sequence % 2) * SLOT_SIZE)
            .map_err(io_err(&tmp))?;
        f.set_len(total).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        // A list left behind by an earlier copy of the volume (deleted, with a crash before
        // its list went) does not belong to this one.
        write_members(&members_path(path), &MemberList::default())?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        let c = Copy::open(path)?;
        c.fresh.store(role == CopyRole::Primary, Ordering::Release);
        // Created by the controller with this membership.
        c.membership_known.store(epoch.0 + 1, Ordering::Release);
        Ok(c)
    }

    /// Opens an existing copy, choosing the newest valid header slot.
    pub fn open(path: &Path) -> Result<Copy, CopyError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut slots = vec![0u8; 2 * SLOT_SIZE as usize];
        let n = read_full_at(&file, &mut slots, 0).map_err(io_err(path))?;
        slots.truncate(n);
        let a = Header::decode(slots.get(..SLOT_SIZE as usize).unwrap_or(&[]), path)?;
        let b = Header::decode(slots.get(SLOT_SIZE as usize..).unwrap_or(&[]), path)?;
        let mut header = match (a, b) {
            (Some(a), Some(b)) => {
                if b.sequence > a.sequence {
                    b
                } else {
                    a
                }
            }
            (Some(h), None) | (None, Some(h)) => h,
            (None, None) => {
                return Err(CopyError::NoValidHeader {
                    path: path.to_owned(),
                })
            }
        };
        // The data area must be present in full: a truncated file is a damaged copy.
        let len = file.metadata().map_err(io_err(path))?.len();
        let want = header.data_offset.saturating_add(header.size);
        if len < want {
            file.set_len(want).map_err(io_err(path))?;
        }
        if header.incarnation == 0 {
            // A copy from before incarnations: one for this opening, durable with the next
            // header update (until then a restart picks another: a full resync, never a wrong
            // incremental one).
            header.incarnation = random_nonzero();
        }
        let list = read_members(&members_path(path))?;
        let (mirrors, rebuilding) = if header.role == CopyRole::Primary {
            (list.in_sync.clone(), list.rebuilding.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Copy {
            path: path.to_owned(),
            volume: header.volume,
            size: AtomicU64::new(header.size),
            data_offset: header.data_offset,
            epoch: AtomicU64::new(header.epoch.0),
            writer_epoch: AtomicU64::new(header.writer_epoch.0),
            incarnation: header.incarnation,
            mirrors: RwLock::new(Arc::new(mirrors)),
            rebuilding: RwLock::new(Arc::new(rebuilding)),
            access: RwLock::new(Arc::new(list.access_only())),
            revoked: Mutex::new(std::collections::VecDeque::new()),
            chunk_locks: (0..CHUNK_LOCK_SHARDS)
                .map(|_| Arc::new(tokio::sync::RwLock::new(())))
                .collect(),
            role: AtomicU8::new(header.role as u8),
            header: Mutex::new(header),
            gate: RwLock::new(()),
            deleted: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            nowait_write_unsupported: AtomicBool::new(false),
            sync: GroupSync::new(),
            dirty: DirtyTracker::default(),
            fresh: AtomicBool::new(false),
            membership_known: AtomicU64::new(0),
            sessions: Sessions::default(),
            file,
        })
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }
    pub fn role(&self) -> CopyRole {
        if self.role.load(Ordering::Acquire) == CopyRole::Primary as u8 {
            CopyRole::Primary
        } else {
            CopyRole::Mirror
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The epoch at which the volume's current writer attached.
    pub fn writer_epoch(&self) -> Epoch {
        Epoch(self.writer_epoch.load(Ordering::Acquire))
    }
    /// A primary's in-sync mirrors (empty for a mirror).
    pub fn mirrors(&self) -> Arc<Vec<SocketAddr>> {
        self.mirrors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A primary's mirrors being rebuilt (empty for a mirror).
    pub fn rebuilding(&self) -> Arc<Vec<SocketAddr>> {
        self.rebuilding
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Who may use the copy: its grants and its primary's server id (no mirrors).
    pub fn access(&self) -> Arc<MemberList> {
        self.access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The lock ordering chunk `chunk` (of [`CHUNK_SIZE`] bytes) between a rebuild's copy of
    /// it and node writes to it (R7). Chunks share locks (sharded), so holders must take
    /// several in ascending [`Copy::chunk_lock_shards`] order.
    pub fn chunk_lock(&self, shard: usize) -> Arc<tokio::sync::RwLock<()>> {
        self.chunk_locks[shard % self.chunk_locks.len()].clone()
    }

    /// The lock shards (ascending, distinct) covering `[offset, offset + len)`.
    pub fn chunk_lock_shards(&self, offset: u64, len: u64) -> Vec<usize> {
        let n = self.chunk_locks.len() as u64;
        let first = offset / u64::from(CHUNK_SIZE);
        let last = (offset + len.max(1) - 1) / u64::from(CHUNK_SIZE);
        if last - first + 1 >= n {
            return (0..n as usize).collect();
        }
        let mut v: Vec<usize> = (first..=last).map(|c| (c % n) as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Where the data of `[offset, offset + len)` may be: `false` only if the range is
    /// certainly a hole (reads as zeros), from `SEEK_DATA`.
    pub fn may_have_data(&self, offset: u64, len: u64) -> bool {
        let start = self.data_offset + offset;
        let Ok(off) = libc::off_t::try_from(start) else {
            return true;
        };
        // SAFETY: lseek on a descriptor we own, with plain integer arguments. The file
        // position it moves is never used (all I/O is positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if r < 0 {
            // ENXIO: no data at or after `start`; anything else: assume data.
            return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
        }
        (r as u64) < start + len
    }

    /// The primary's dirty-chunk maps of its mirrors.
    pub fn dirty(&self) -> &DirtyTracker {
        &self.dirty
    }

    /// Whether this process created the copy empty as a primary and it stayed primary.
    /// Whether the controller set this copy's membership at `epoch` since it was opened (see
    /// the field).
    pub fn membership_known_at(&self, epoch: Epoch) -> bool {
        self.membership_known.load(Ordering::Acquire) == epoch.0 + 1
    }

    pub fn fresh(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
    }

    /// What identifies this copy to a primary tracking it: its incarnation and this machine's
    /// boot.
    pub fn identity(&self) -> CopyIdentity {
        CopyIdentity {
            incarnation: self.incarnation,
            instance: instance_id(),
        }
    }

    /// A snapshot of the current header.
    pub fn header(&self) -> Header {
        match self.header.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn lock_header(&self) -> std::sync::MutexGuard<'_, Header> {
        self.header.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `next` (whose sequence is one higher than the current header's) into its slot
    /// and fdatasyncs; the caller then installs it.
    fn write_header(&self, next: &Header) -> Result<(), CopyError> {
        let slot = next.sequence % 2;
        self.file
            .write_all_at(&next.encode(), slot * SLOT_SIZE)
            .map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }

    /// Durably records a new epoch, role, writer epoch and (for a primary) in-sync mirrors
    /// (the controller's membership changes), refusing an epoch older than the copy's with
    /// [`CopyError::StaleEpoch`]: the epoch never goes back, and neither does the writer epoch
    /// (a lower one keeps the current one, so a fenced writer stays fenced). A mirror has no
    /// mirrors (`mirrors` is ignored). Setting the current membership again writes nothing.
    /// When it returns, data requests admitted under the old membership have finished and
    /// later ones see the new one.
    pub fn set_membership(
        &self,
        role: CopyRole,
        epoch: Epoch,
        writer_epoch: Epoch,
        mirrors: &[SocketAddr],
    ) -> Result<(), CopyError> {
        self.set_membership_rebuilding(role, epoch, writer_epoch, mirrors, &[])
    }

    /// [`Copy::set_membership`] with a primary's mirrors being rebuilt (R7) as well; both
    /// lists are durable in `<id>.members`. A mirror has neither. The access list is kept.
    pub fn set_membership_rebuilding(
        &self,
        role: CopyRole,
        epoch: Epoch,
        writer_epoch: Epoch,
        mirrors: &[SocketAddr],
        rebuilding: &[SocketAddr],
    ) -> Result<(), CopyError> {
        let list = MemberList::mirrors(mirrors, rebuilding);
        self.set_members_with(role, epoch, writer_epoch, &list, None)
    }

    /// [`Copy::set_membership_rebuilding`] with the access list as well (what the controller's
    /// set membership carries): mirrors, grants and primary, durable in `<id>.members`. When
    /// it returns, no request is admitted any more from a peer the new list does not allow.
    pub fn set_members(
        &self,
        role: CopyRole,
        epoch: Epoch,
        writer_epoch: Epoch,
        list: &MemberList,
    ) -> Result<(), CopyError> {
        self.set_members_with(role, epoch, writer_epoch, list, Some(list.access_only()))
    }

    /// Sets the membership with `list`'s mirrors and with `access`, or (`None`) keeping the
    /// access list the copy has, read under the header lock so a concurrent change of it is
    /// never overwritten with an older one.
    fn set_members_with(
        &self,
        role: CopyRole,
        epoch: Epoch,
        writer_epoch: Epoch,
        list: &MemberList,
        access: Option<MemberList>,
    ) -> Result<(), CopyError> {
        let (mirrors, rebuilding) = (&list.in_sync[..], &list.rebuilding[..]);
        let mut h = self.lock_header();
        let access = access.unwrap_or_else(|| (*self.access()).clone());
        if self.deleted.load(Ordering::Acquire) {
            return Err(CopyError::Deleted);
        }
        if epoch < h.epoch {
            return Err(CopyError::StaleEpoch {
                requested: epoch,
                current: h.epoch,
            });
        }
        let writer_epoch = writer_epoch.max(h.writer_epoch).min(epoch);
        let (mirrors, rebuilding): (Vec<SocketAddr>, Vec<SocketAddr>) = match role {
            CopyRole::Primary => (mirrors.to_vec(), rebuilding.to_vec()),
            CopyRole::Mirror => (Vec::new(), Vec::new()),
        };
        let header_same = epoch == h.epoch && role == h.role && writer_epoch == h.writer_epoch;
        let mirrors_same = *self.mirrors() == mirrors
            && *self.rebuilding() == rebuilding
            && *self.access() == access;
        if header_same && mirrors_same {
            self.membership_known
                .fetch_max(epoch.0 + 1, Ordering::AcqRel);
            return Ok(());
        }
        // The list first: a crash before the header leaves the old membership with the new
        // list, whose mirrors (already at the new epoch) refuse the old epoch, which makes the
        // primary ask the controller rather than acknowledge without them.
        if !mirrors_same {
            let mut durable = access.clone();
            durable.in_sync = mirrors.clone();
            durable.rebuilding = rebuilding.clone();
            write_members(&members_path(&self.path), &durable)?;
        }
        if !header_same {
            let mut next = h.clone();
            next.sequence += 1;
            next.role = role;
            next.epoch = epoch;
            next.writer_epoch = writer_epoch;
            // Durable first (data I/O goes on meanwhile, under the old membership), then
            // published with the gate held exclusively: that waits for the requests admitted
            // under the old membership, and later ones see the new one.
            self.write_header(&next)?;
            *h = next;
        }
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if role != CopyRole::Primary {
            // Another copy is (or will be) primary: its writes reach the mirrors without this
            // copy's maps, which are void.
            self.fresh.store(false, Ordering::Release);
            self.dirty.forget_all();
        } else if self.fresh.load(Ordering::Acquire) {
            // In sync since both copies were created empty: a clean map, in place before any
            // write admitted under this membership can fail on the mirror.
            for &m in &mirrors {
                self.dirty.track_clean(m, h.size);
            }
        }
        self.role.store(role as u8, Ordering::Release);
        self.epoch.store(epoch.0, Ordering::Release);
        self.writer_epoch.store(writer_epoch.0, Ordering::Release);
        self.membership_known
            .fetch_max(epoch.0 + 1, Ordering::AcqRel);
        *self.mirrors.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(mirrors);
        *self.rebuilding.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rebuilding);
        let old = std::mem::replace(
            &mut *self.access.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(access),
        );
        self.note_revoked(&old, &self.access());
        Ok(())
    }

    /// Grows the copy to `size` bytes durably: the file is extended (sparse) and the header
    /// rewritten and fdatasynced before the new size is served. A smaller size is
    /// [`CopyError::Shrink`]; the current one is a no-op. Safe with concurrent I/O: requests
    /// checked against the old size stay inside the file.
    pub fn resize(&self, size: u64) -> Result<(), CopyError> {
        file_len(size)?;
        let mut h = self.lock_header();
        if self.deleted.load(Ordering::Acquire) {
            return Err(CopyError::Deleted);
        }
        if size < h.size {
            return Err(CopyError::Shrink {
                requested: size,
                current: h.size,
            });
        }
        if size == h.size {
            return Ok(());
        }
        // File first: a crash between the two leaves a longer file under the old header, which
        // opens fine; the fdatasync of the header also makes the new length durable.
        let total = h
            .data_offset
            .checked_add(size)
            .filter(|&t| i64::try_from(t).is_ok())
            .ok_or(CopyError::BadSize(size))?;
        self.file.set_len(total).map_err(io_err(&self.path))?;
        let mut next = h.clone();
        next.sequence += 1;
        next.size = size;
        self.write_header(&next)?;
        *h = next;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Marks the copy deleted, waiting for admitted data requests to finish first: afterwards
    /// it refuses every request and membership change. Used by [`crate::store::Store::delete`].
    pub fn retire(&self) {
        let _h = self.lock_header();
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.deleted.store(true, Ordering::Release);
        self.dirty.forget_all();
    }

    /// Whether the copy was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Checks a data request `op` at `epoch` from `peer` against the copy's access list
    /// ([`authorize`]) and membership ([`admission`]), without admitting it (an early refusal;
    /// the decisive check is [`Copy::admit`]'s).
    pub fn check_request(&self, epoch: Epoch, peer: &Identity, op: Op) -> Result<(), Refusal> {
        self.authorize(peer, op, epoch)?;
        if self.deleted.load(Ordering::Acquire) {
            return Err(Refusal::Deleted);
        }
        admission(
            self.role(),
            self.epoch(),
            self.writer_epoch(),
            epoch,
            peer.role,
        )?;
        // After the epoch rules: a fenced writer still hears `stale epoch`, a request to a
        // demoted copy `not primary`; only an admitted one learns the copy is lost.
        if self.is_failed() {
            return Err(Refusal::Lost(self.epoch()));
        }
        Ok(())
    }

    /// [`authorize`] against the copy's access list for a request at `epoch`; a node whose
    /// grant was withdrawn is [`Refusal::Revoked`] rather than [`Refusal::Unauthorized`]. A
    /// node's request at an epoch above the copy's gets [`Refusal::Unauthorized`] instead of
    /// `Revoked` or `ReadOnly`: it comes from an attachment newer than this copy's membership
    /// (a re-attach, a read-only node made writer) whose push has not arrived yet, so its
    /// client must wait, not fail the guest's I/O.
    pub fn authorize(&self, peer: &Identity, op: Op, epoch: Epoch) -> Result<(), Refusal> {
        let current = self.epoch();
        let ahead = epoch > current;
        // The list under its read lock, not cloned: this runs for every request.
        let verdict = {
            let list = self.access.read().unwrap_or_else(|p| p.into_inner());
            authorize(&list, peer, op, current)
        };
        match verdict {
            Err(Refusal::Revoked | Refusal::ReadOnly(_)) if ahead => Err(Refusal::Unauthorized),
            Err(Refusal::Unauthorized)
                if peer.role == Role::Node && !ahead && self.was_revoked(&peer.id) =>
            {
                Err(Refusal::Revoked)
            }
            r => r,
        }
    }

    fn was_revoked(&self, node: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n == node)
    }

    /// Remembers the nodes `old` granted and `new` does not; forgets those `new` grants.
    fn note_revoked(&self, old: &MemberList, new: &MemberList) {
        let mut r = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|n| new.access_of(n).is_none());
        for g in &old.grants {
            if new.access_of(&g.node).is_none() && !r.contains(&g.node) {
                r.push_back(g.node.clone());
            }
        }
        while r.len() > MAX_REVOKED {
            r.pop_front();
        }
    }

    fn admitted<'a>(
        &'a self,
        gate: RwLockReadGuard<'a, ()>,
        epoch: Epoch,
        peer: &Identity,
        op: Op,
        session: Option<&Session>,
    ) -> Result<Admitted<'a>, Refusal> {
        self.check_request(epoch, peer, op)?;
        if session.is_some_and(|s| !s.current()) {
            return Err(Refusal::Superseded(self.epoch()));
        }
        Ok(Admitted {
            _gate: gate,
            epoch: self.epoch(),
            mirrors: self.mirrors(),
            rebuilding: self.rebuilding(),
        })
    }

    /// Admits data request `op` at `epoch` from `peer`: the returned guard must be held for
    /// the request's I/O. Waits while a membership change or deletion is in progress.
    pub fn admit(&self, epoch: Epoch, peer: &Identity, op: Op) -> Result<Admitted<'_>, Refusal> {
        self.admit_in(epoch, peer, op, None)
    }

    /// [`Copy::admit`] for a connection that claimed the copy: refused once a newer connection
    /// of the same client claimed it.
    pub fn admit_in(
        &self,
        epoch: Epoch,
        peer: &Identity,
        op: Op,
        session: Option<&Session>,
    ) -> Result<Admitted<'_>, Refusal> {
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        self.admitted(gate, epoch, peer, op, session)
    }

    /// A client's new connection claims the copy with `generation` (blocking: waits for the
    /// requests admitted so far, older connections' included, to finish). `None` if a newer
    /// connection of the client claimed it already.
    pub fn claim(&self, client: ClientKey, generation: u64) -> Option<Session> {
        let cell = self.sessions.cell(client);
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        Sessions::claim(cell, generation)
    }

    /// [`Copy::admit`] without waiting: `None` if a membership change or deletion holds (or
    /// waits for) the gate.
    pub fn try_admit(
        &self,
        epoch: Epoch,
        peer: &Identity,
        op: Op,
    ) -> Option<Result<Admitted<'_>, Refusal>> {
        self.try_admit_in(epoch, peer, op, None)
    }

    /// [`Copy::try_admit`] for a connection that claimed the copy.
    pub fn try_admit_in(
        &self,
        epoch: Epoch,
        peer: &Identity,
        op: Op,
        session: Option<&Session>,
    ) -> Option<Result<Admitted<'_>, Refusal>> {
        let gate = match self.gate.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(self.admitted(gate, epoch, peer, op, session))
    }

    fn check_ok(&self) -> Result<(), CopyError> {
        if self.failed.load(Ordering::Acquire) {
            Err(CopyError::Failed)
        } else {
            Ok(())
        }
    }

    /// A failed I/O on the copy's file: the copy is failed from now on (R10; a disk that
    /// returned an error once cannot be trusted to hold what it acknowledged, and after a
    /// failed write-back the page cache may have dropped the data).
    ///
    /// Except a full filesystem (`ENOSPC`, `EDQUOT`) on a read or write: nothing acknowledged
    /// is lost and the copy stays usable, so the request alone fails (`io error`, as a full
    /// disk would for the guest); likewise `EINTR` and `EAGAIN`. A failed flush fails the copy whatever the error
    /// ([`Copy::flush`]).
    fn io(&self, source: std::io::Error) -> CopyError {
        // A full filesystem, or a call interrupted or refused before it reached the disk, is
        // not the copy's fault.
        if !matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EINTR | libc::EAGAIN)
        ) {
            self.fail(&source.to_string());
        }
        CopyError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Marks the copy failed (idempotent; the first reason is kept): every data request is
    /// refused with [`Refusal::Lost`] and the heartbeat reports it, so the controller moves
    /// the volume to another copy (docs/replication.md, R10). The file is left as it is.
    pub fn fail(&self, why: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(volume = %self.volume, path = %self.path.display(), error = %why, "I/O on the copy failed: the copy is lost, it serves nothing more (another copy takes over)");
            *f = Some(format!("I/O error: {why}"));
        }
        self.failed.store(true, Ordering::Release);
    }

    /// Whether the copy failed an I/O ([`Copy::fail`]).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why this copy cannot be trusted any more, if it cannot (R10): it failed an I/O, or
    /// its file was removed or replaced in the data directory (it still serves from the open
    /// file, which no restart can reopen). Checked by every heartbeat (one `fstat`).
    pub fn fault(&self) -> Option<String> {
        if let Some(f) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(f);
        }
        if self.is_deleted() {
            return None;
        }
        match self.file.metadata() {
            Ok(m) if std::os::unix::fs::MetadataExt::nlink(&m) == 0 => Some(format!(
                "its file {} was removed from the data directory while the server ran",
                self.path.display()
            )),
            Ok(_) => None,
            Err(e) => {
                self.fail(&e.to_string());
                self.fault()
            }
        }
    }

    /// Whether `[offset, offset + len)` lies inside the volume.
    pub fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    /// Reads `buf.len()` bytes at `offset` (caller checked the range).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError> {
        self.check_ok()?;
        let n = read_full_at(&self.file, buf, self.data_offset + offset).map_err(|e| self.io(e))?;
        // Past the end of the file (never the case for a healthy copy) reads as zeros.
        buf[n..].fill(0);
        Ok(())
    }

    /// Writes `data` at `offset` (caller checked the range). Durable only after [`Copy::flush`].
    ///
    /// Issued in pieces of at most [`WRITE_PIECE`] bytes aligned to it: see there.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.check_ok()?;
        let mut pos = self.data_offset + offset;
        let mut rest = data;
        while !rest.is_empty() {
            let room = WRITE_PIECE - pos % WRITE_PIECE;
            let n = rest.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let (piece, tail) = rest.split_at(n);
            self.file.write_all_at(piece, pos).map_err(|e| self.io(e))?;
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (caller checked the range) into a new buffer, which is
    /// not zero-filled first (a 1 MiB `memset` per read showed in profiles).
    pub fn read_new(&self, offset: u64, len: usize) -> Result<Vec<u8>, CopyError> {
        self.check_ok()?;
        let mut buf = Vec::with_capacity(len);
        let mut done = 0usize;
        let mut off = self.data_offset + offset;
        while done < len {
            let spare = &mut buf.spare_capacity_mut()[done..len];
            // SAFETY: pread writes at most `spare.len()` bytes into the vector's spare capacity,
            // which is valid for writes; those bytes are only read after `set_len` below.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    i64::try_from(off).unwrap_or(i64::MAX),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io(e));
            }
            if n == 0 {
                // Past the end of the file (never the case for a healthy copy) reads as zeros.
                spare.iter_mut().for_each(|b| {
                    b.write(0);
                });
                break;
            }
            done += n as usize;
            off += n as u64;
        }
        // SAFETY: the first `len` bytes were written by pread or zero-filled above.
        unsafe { buf.set_len(len) };
        Ok(buf)
    }

    /// Like [`Copy::read_new`] without blocking: `Ok(None)` if the range is not all in the
    /// page cache (the caller then uses [`Copy::read_new`] on a thread that may block).
    pub fn try_read_cached_new(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CopyError> {
        self.check_ok()?;
        let mut buf = Vec::with_capacity(len);
        let spare = &mut buf.spare_capacity_mut()[..len];
        let full = nowait_io(
            &self.file,
            spare.as_mut_ptr().cast(),
            len,
            self.data_offset + offset,
            false,
        )
        .map_err(|e| self.io(e))?;
        if !full {
            return Ok(None);
        }
        // SAFETY: `nowait_io` returned true: all `len` bytes were read into the buffer.
        unsafe { buf.set_len(len) };
        Ok(Some(buf))
    }

    /// Reads without blocking: `Ok(true)` if the whole range came from the page cache,
    /// `Ok(false)` if it would have to wait for the disk (the caller then uses [`Copy::read`]
    /// on a thread that may block).
    pub fn try_read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, CopyError> {
        self.check_ok()?;
        nowait_io(
            &self.file,
            buf.as_mut_ptr(),
            buf.len(),
            self.data_offset + offset,
            false,
        )
        .map_err(|e| self.io(e))
    }

    /// Writes into the page cache without blocking: `Ok(true)` if done, `Ok(false)` if the
    /// write would block (or the kernel cannot say), in which case nothing needs undoing: the
    /// caller retries with [`Copy::write`] on a thread that may block.
    pub fn try_write_cached(&self, offset: u64, data: &[u8]) -> Result<bool, CopyError> {
        self.check_ok()?;
        if self.nowait_write_unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let r = nowait_io(
            &self.file,
            data.as_ptr().cast_mut(),
            data.len(),
            self.data_offset + offset,
            true,
        );
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Buffered RWF_NOWAIT writes are not supported by this filesystem (ext4 on
                // Linux 6.x): stop trying, it only costs a syscall.
                self.nowait_write_unsupported.store(true, Ordering::Relaxed);
                Ok(false)
            }
            r => r.map_err(|e| self.io(e)),
        }
    }

    /// Makes the range read as zeros, freeing its space where the filesystem can.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.check_ok()?;
        if len == 0 {
            return Ok(());
        }
        let start = self.data_offset + offset;
        let (Ok(off), Ok(l)) = (i64::try_from(start), i64::try_from(len)) else {
            // Not the disk's fault (the caller checked the range): the copy stays usable.
            return Err(CopyError::Io {
                path: self.path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        };
        let err = loop {
            // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                break e;
            }
        };
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(self.io(err));
        }
        // The filesystem cannot punch holes: write zeros instead.
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], start + done)
                .map_err(|e| self.io(e))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes every write completed before the call durable. Concurrent calls share one
    /// fdatasync. A failed fdatasync fails the copy: the page cache may have dropped the data,
    /// so it must not pretend later flushes cover it.
    pub fn flush(&self) -> Result<(), CopyError> {
        self.check_ok()?;
        self.sync.sync(|| self.file.sync_data()).map_err(|source| {
            self.fail(&format!("write-back failed: {source}"));
            CopyError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// A random non-zero u64 (from the kernel's generator; the time and pid if that fails).
fn random_nonzero() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut x = u64::from_le_bytes(b);
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        x = t ^ (u64::from(std::process::id()) << 32);
    }
    x.max(1)
}

/// This machine's boot (from the kernel's boot id): writes a mirror acknowledged but had not
/// flushed do not survive a reboot, so a primary's map of it is void after one. Without a boot
/// id, a random value per process (any restart then looks like a reboot).
fn instance_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|s| u128::from_str_radix(&s.trim().replace('-', ""), 16).ok())
            .map(|v| (v as u64) ^ ((v >> 64) as u64))
            .filter(|&v| v != 0)
            .unwrap_or_else(random_nonzero)
    })
}

/// Where a copy's membership list lives: `<id>.members` next to `<id>.keel`.
pub fn members_path(copy: &Path) -> PathBuf {
    copy.with_extension("members")
}

/// Reads a membership list; a missing file is an empty list.
fn read_members(path: &Path) -> Result<MemberList, CopyError> {
    match std::fs::read(path) {
        Ok(b) => MemberList::parse(&b).map_err(|e| CopyError::BadMembers {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MemberList::default()),
        Err(source) => Err(CopyError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces a membership list durably: a temporary file, fsync, rename, fsync of the
/// directory. An empty list removes the file (and fsyncs the directory).
fn write_members(path: &Path, list: &MemberList) -> Result<(), CopyError> {
    if list.is_empty() {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path)(e)),
        }
    } else {
        let tmp = path.with_extension("members-tmp");
        let mut text = list.encode();
        text.push(b'\n');
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all_at(&text, 0).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
    }
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// The length of a copy file holding `size` bytes of volume, or [`CopyError::BadSize`] if
/// `size` is not a positive multiple of 512 or the file could not be that long.
fn file_len(size: u64) -> Result<u64, CopyError> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(CopyError::BadSize(size));
    }
    DATA_OFFSET
        .checked_add(size)
        .filter(|&t| i64::try_from(t).is_ok())
        .ok_or(CopyError::BadSize(size))
}

/// The largest buffered write [`Copy::write`] issues at once (aligned to its size in the file).
///
/// The kernel sizes a new page-cache folio by the write that creates it, and ext4 walks every
/// block (buffer head) of a folio on each later write into it. After 1 MiB writes had made
/// 1 MiB folios, each 4 KiB write walked 256 buffer heads: 6.5 µs of kernel time per write on
/// an idle host, about 30 µs with a TCG guest sharing the caches (22 % of all CPU in
/// `ext4_block_write_begin` during the benchmark). With 16 KiB pieces a 4 KiB write costs
/// 2 µs and a 1 MiB write no more than before (docs/performance.md).
pub const WRITE_PIECE: u64 = 16 << 10;

/// One `preadv2`/`pwritev2` with `RWF_NOWAIT`: true if it moved every byte. A short transfer,
/// `EAGAIN` or `EOPNOTSUPP` mean "would block": false, and the caller redoes the whole range
/// with a blocking call (re-writing the same bytes at the same place is harmless).
fn nowait_io(f: &File, ptr: *mut u8, len: usize, off: u64, write: bool) -> std::io::Result<bool> {
    let Ok(off) = i64::try_from(off) else {
        return Ok(false);
    };
    let iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    // SAFETY: `iov` describes `len` bytes the caller owns (mutably for reads) for the duration
    // of the call; the file descriptor is open for reading and writing.
    let n = unsafe {
        if write {
            libc::pwritev2(f.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT)
        } else {
            libc::preadv2(f.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT)
        }
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // Not the disk's answer: the caller takes the blocking path (a kernel without
            // preadv2 says ENOSYS; a signal, EINTR).
            Some(libc::EAGAIN | libc::EINVAL | libc::ENOSYS | libc::EINTR) => Ok(false),
            Some(libc::EOPNOTSUPP) if !write => Ok(false),
            _ => Err(e),
        };
    }
    Ok(n as usize == len)
}

/// pread until `buf` is full or end of file; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn new_copy(dir: &Path) -> Copy {
        let c = Copy::create(
            &dir.join("v.keel"),
            VolumeId(7),
            8 << 20,
            CopyRole::Primary,
            Epoch(1),
        )
        .expect("create");
        grant_n1(&c);
        c
    }

    /// Grants node `n1` read-write access at the copy's current membership.
    fn grant_n1(c: &Copy) {
        let list = MemberList {
            grants: vec![keel_proto::members::Grant {
                node: "n1".into(),
                access: keel_proto::members::Access::ReadWrite,
            }],
            ..MemberList::default()
        };
        c.set_members(c.role(), c.epoch(), c.writer_epoch(), &list)
            .expect("grant");
    }

    fn n1() -> Identity {
        Identity {
            role: Role::Node,
            id: "n1".into(),
        }
    }

    #[test]
    fn unwritten_reads_zero_and_writes_read_back_after_reopen() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        let mut buf = vec![1u8; 4096];
        c.read(0, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        c.write(4096, &data).expect("write");
        c.flush().expect("flush");
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(c.size(), 8 << 20);
        let mut back = vec![0u8; 8192];
        c.read(4096, &mut back).expect("read");
        assert_eq!(back, data);
    }

    #[test]
    fn pieced_writes_and_uninitialised_reads_keep_every_byte() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        // Unaligned start, spanning several 16 KiB pieces, ending mid-piece.
        let off = 5 * WRITE_PIECE - 1000;
        let data: Vec<u8> = (0..(3 * WRITE_PIECE as u32 + 777))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        c.write(off, &data).expect("write");
        assert_eq!(c.read_new(off, data.len()).expect("read"), data);
        let cached = c
            .try_read_cached_new(off, data.len())
            .expect("nowait read")
            .expect("just written, so cached");
        assert_eq!(cached, data);
        // Around it: still zeros.
        assert!(c
            .read_new(off - 100, 100)
            .expect("read")
            .iter()
            .all(|&b| b == 0));
        let end = off + data.len() as u64;
        assert!(c.read_new(end, 4096).expect("read").iter().all(|&b| b == 0));
    }

    #[test]
    fn cached_fast_path_reads_and_writes_the_same_bytes() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 241) as u8).collect();
        if !c.try_write_cached(8192, &data).expect("nowait write") {
            c.write(8192, &data).expect("write");
        }
        let mut back = vec![0u8; 8192];
        if !c.try_read_cached(8192, &mut back).expect("nowait read") {
            c.read(8192, &mut back).expect("read");
        }
        assert_eq!(back, data);
        // Just written, so it is in the page cache: the fast path must have served it.
        let mut again = vec![0u8; 8192];
        assert!(c.try_read_cached(8192, &mut again).expect("nowait read"));
        assert_eq!(again, data);
    }

    #[test]
    fn zero_range_reads_zero() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        c.write(0, &vec![0xffu8; 1 << 20]).expect("write");
        c.zero_range(4096, 8192).expect("zero");
        let mut b = vec![0u8; 1 << 20];
        c.read(0, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 0xff));
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[12288..].iter().all(|&x| x == 0xff));
    }

    #[test]
    fn membership_update_survives_reopen_and_torn_slot() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        c.set_membership(CopyRole::Mirror, Epoch(5), Epoch(5), &[])
            .expect("update");
        let seq = c.header().sequence;
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(c.epoch(), Epoch(5));
        assert_eq!(c.header().role, CopyRole::Mirror);
        drop(c);
        // Damage the newest slot: the older one (epoch 1) must be used.
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join("v.keel"))
            .expect("open");
        f.write_all_at(&[0xaa; 64], (seq % 2) * SLOT_SIZE + 20)
            .expect("damage");
        drop(f);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(c.epoch(), Epoch(1));
    }

    #[test]
    fn membership_never_goes_back_and_fences_admission() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        assert!(c.admit(Epoch(1), &n1(), Op::Write).is_ok());
        c.set_membership(CopyRole::Primary, Epoch(3), Epoch(3), &[])
            .expect("raise");
        let seq = c.header().sequence;
        // The same membership again writes nothing; an older epoch is refused.
        c.set_membership(CopyRole::Primary, Epoch(3), Epoch(3), &[])
            .expect("same");
        assert_eq!(c.header().sequence, seq);
        assert!(matches!(
            c.set_membership(CopyRole::Primary, Epoch(2), Epoch(2), &[]),
            Err(CopyError::StaleEpoch {
                requested: Epoch(2),
                current: Epoch(3)
            })
        ));
        assert_eq!(
            c.admit(Epoch(1), &n1(), Op::Write).err(),
            Some(Refusal::Stale(Epoch(3)))
        );
        assert_eq!(
            c.admit(Epoch(4), &n1(), Op::Write).err(),
            Some(Refusal::NotPrimary(Epoch(3)))
        );
        assert!(c.admit(Epoch(3), &n1(), Op::Write).is_ok());
        c.set_membership(CopyRole::Mirror, Epoch(3), Epoch(3), &[])
            .expect("role");
        assert_eq!(
            c.admit(Epoch(3), &n1(), Op::Write).err(),
            Some(Refusal::NotPrimary(Epoch(3)))
        );
    }

    #[test]
    fn membership_change_waits_for_admitted_io() {
        let d = tempfile::tempdir().expect("tmp");
        let c = std::sync::Arc::new(new_copy(d.path()));
        let admitted = c.admit(Epoch(1), &n1(), Op::Write).expect("admit");
        let (tx, rx) = std::sync::mpsc::channel();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            c2.set_membership(CopyRole::Primary, Epoch(2), Epoch(2), &[])
                .expect("set");
            tx.send(()).expect("send");
        });
        // While a request is admitted, the change cannot complete, and nothing new is admitted
        // without waiting.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        c.write(0, &[1u8; 512]).expect("admitted write");
        drop(admitted);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("change completes");
        t.join().expect("join");
        assert_eq!(
            c.admit(Epoch(1), &n1(), Op::Write).err(),
            Some(Refusal::Stale(Epoch(2)))
        );
        assert!(c
            .try_admit(Epoch(2), &n1(), Op::Write)
            .expect("free")
            .is_ok());
    }

    #[test]
    fn resize_grows_durably_and_never_shrinks() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        assert!(!c.in_range(8 << 20, 4096));
        c.resize(16 << 20).expect("grow");
        assert!(c.in_range(8 << 20, 4096));
        c.write(12 << 20, &[7u8; 4096])
            .expect("write past the old end");
        c.resize(16 << 20).expect("same size");
        assert!(matches!(c.resize(4 << 20), Err(CopyError::Shrink { .. })));
        assert!(matches!(c.resize(1000), Err(CopyError::BadSize(1000))));
        assert!(matches!(
            c.resize(u64::MAX - 511),
            Err(CopyError::BadSize(_))
        ));
        c.flush().expect("flush");
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(c.size(), 16 << 20);
        assert_eq!(c.header().size, 16 << 20);
        let mut b = vec![0u8; 4096];
        c.read(12 << 20, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 7));
        let len = std::fs::metadata(d.path().join("v.keel"))
            .expect("stat")
            .len();
        assert_eq!(len, DATA_OFFSET + (16 << 20));
    }

    #[test]
    fn a_retired_copy_refuses_everything() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        c.retire();
        assert!(c.is_deleted());
        assert_eq!(
            c.admit(Epoch(1), &n1(), Op::Write).err(),
            Some(Refusal::Deleted)
        );
        assert!(matches!(
            c.set_membership(CopyRole::Primary, Epoch(2), Epoch(2), &[]),
            Err(CopyError::Deleted)
        ));
        assert!(matches!(c.resize(16 << 20), Err(CopyError::Deleted)));
    }

    #[test]
    fn a_withdrawn_grant_refuses_at_admission_after_the_change_returns() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        assert!(c.admit(Epoch(1), &n1(), Op::Write).is_ok());
        // The grant goes (a detach): the change waits for the admitted request, and nothing
        // of n1 is admitted after it, whatever the epoch; the refusal names no epoch.
        let admitted = c.admit(Epoch(1), &n1(), Op::Read).expect("admit");
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                c.set_members(
                    CopyRole::Primary,
                    Epoch(2),
                    Epoch(1),
                    &MemberList::default(),
                )
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(
                !h.is_finished(),
                "the change waits for the admitted request"
            );
            drop(admitted);
            h.join().expect("join").expect("set members");
        });
        let evil = Identity {
            role: Role::Node,
            id: "evil".into(),
        };
        for epoch in 0..6 {
            for op in [Op::Read, Op::Write, Op::Flush] {
                // The fenced node is told so (no epoch) up to the copy's epoch (2); above it, a
                // request may come from a newer attachment of the same node (a re-attach whose
                // push is on its way): it waits (`unauthorized`) rather than failing. One never
                // granted learns nothing.
                let want = if epoch <= 2 {
                    Refusal::Revoked
                } else {
                    Refusal::Unauthorized
                };
                assert_eq!(c.admit(Epoch(epoch), &n1(), op).err(), Some(want));
                assert_eq!(
                    c.admit(Epoch(epoch), &evil, op).err(),
                    Some(Refusal::Unauthorized)
                );
            }
        }
        // Durable: a reopened copy refuses n1 too (as a stranger: the withdrawn grants are
        // remembered in memory only).
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(
            c.admit(Epoch(2), &n1(), Op::Read).err(),
            Some(Refusal::Unauthorized)
        );
        grant_n1(&c);
        assert!(c.admit(Epoch(2), &n1(), Op::Read).is_ok());
        // A read-only node's write is refused `read-only` at the copy's epoch, but waits when
        // it comes from a newer attachment (the node made writer, the push on its way).
        let ro = MemberList::parse(b"node n1 ro").expect("list");
        c.set_members(CopyRole::Primary, Epoch(2), Epoch(1), &ro)
            .expect("read-only");
        assert_eq!(
            c.admit(Epoch(2), &n1(), Op::Write).err(),
            Some(Refusal::ReadOnly(Epoch(2)))
        );
        assert_eq!(
            c.admit(Epoch(3), &n1(), Op::Write).err(),
            Some(Refusal::Unauthorized)
        );
    }

    #[test]
    fn writer_epoch_fences_while_membership_bumps_do_not() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        assert_eq!(c.writer_epoch(), Epoch(1));
        // A mirror dropped: epoch 2, same writer (1).
        c.set_membership(CopyRole::Primary, Epoch(2), Epoch(1), &[])
            .expect("bump");
        assert!(c.admit(Epoch(1), &n1(), Op::Write).is_ok());
        assert!(c.admit(Epoch(2), &n1(), Op::Write).is_ok());
        // A new writer at epoch 3 fences the old one.
        c.set_membership(CopyRole::Primary, Epoch(3), Epoch(3), &[])
            .expect("new writer");
        assert_eq!(
            c.admit(Epoch(2), &n1(), Op::Write).err(),
            Some(Refusal::Stale(Epoch(3)))
        );
        // The writer epoch never goes back, and survives a reopen.
        c.set_membership(CopyRole::Primary, Epoch(4), Epoch(1), &[])
            .expect("lower writer epoch");
        assert_eq!(c.writer_epoch(), Epoch(3));
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!((c.epoch(), c.writer_epoch()), (Epoch(4), Epoch(3)));
        assert_eq!(c.header().writer_epoch, Epoch(3));
    }

    /// A header of the first layout (78 bytes, no writer epoch) opens with its epoch as the
    /// writer epoch; the next update writes the new layout.
    #[test]
    fn old_header_layout_opens_with_writer_epoch_equal_to_epoch() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("old.keel");
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(OLD_HEADER_LEN as u32).to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // sequence
        b.extend_from_slice(&9u128.to_le_bytes()); // volume
        b.extend_from_slice(&(4u64 << 20).to_le_bytes()); // size
        b.extend_from_slice(&512u32.to_le_bytes());
        b.extend_from_slice(&CHUNK_SIZE.to_le_bytes());
        b.push(CopyRole::Primary as u8);
        b.push(0);
        b.extend_from_slice(&6u64.to_le_bytes()); // epoch
        b.extend_from_slice(&DATA_OFFSET.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(b.len(), OLD_HEADER_LEN);
        let f = File::create(&p).expect("create");
        f.write_all_at(&b, SLOT_SIZE).expect("write"); // sequence 1 lives in slot 1
        f.set_len(DATA_OFFSET + (4 << 20)).expect("len");
        drop(f);
        let c = Copy::open(&p).expect("open old layout");
        assert_eq!(
            (c.volume(), c.epoch(), c.writer_epoch()),
            (VolumeId(9), Epoch(6), Epoch(6))
        );
        assert_eq!(c.size(), 4 << 20);
        assert!(c.mirrors().is_empty());
        c.set_membership(CopyRole::Primary, Epoch(8), Epoch(6), &[])
            .expect("update");
        drop(c);
        let c = Copy::open(&p).expect("reopen");
        assert_eq!((c.epoch(), c.writer_epoch()), (Epoch(8), Epoch(6)));
        let h = c.header();
        assert_eq!(h.sequence, 2);
        // The new header is the new layout.
        let mut slot = vec![0u8; 16];
        let f = File::open(&p).expect("open");
        f.read_exact_at(&mut slot, 0).expect("read");
        assert_eq!(
            u32::from_le_bytes([slot[12], slot[13], slot[14], slot[15]]) as usize,
            HEADER_LEN
        );
        assert_eq!(HEADER_LEN, 94);
        assert_ne!(h.incarnation, 0, "an old copy gets an incarnation");
        assert_eq!(c.identity().incarnation, h.incarnation);
    }

    /// Each created copy has its own incarnation, kept across reopening; a fresh primary's
    /// in-sync mirrors get clean maps, and every map goes when the copy stops being primary.
    #[test]
    fn incarnation_is_per_creation_and_maps_follow_the_role() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        let inc = c.identity().incarnation;
        assert_ne!(inc, 0);
        assert!(c.fresh());
        let a: SocketAddr = "127.0.0.1:7501".parse().expect("addr");
        c.set_membership(CopyRole::Primary, Epoch(2), Epoch(1), &[a])
            .expect("membership");
        assert_eq!(c.dirty().dirty_count(a), Some(0), "tracked from the start");
        c.dirty().mark_unacked(0, 512, &[]);
        assert_eq!(c.dirty().dirty_count(a), Some(1));
        c.set_membership(CopyRole::Mirror, Epoch(3), Epoch(1), &[])
            .expect("demoted");
        assert_eq!(
            c.dirty().dirty_count(a),
            None,
            "maps are void once not primary"
        );
        assert!(!c.fresh());
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(c.identity().incarnation, inc);
        assert_eq!(c.header().incarnation, inc);
        assert!(!c.fresh(), "opened, not created here");
        std::fs::remove_file(d.path().join("v.keel")).expect("rm");
        let again = new_copy(d.path());
        assert_ne!(
            again.identity().incarnation,
            inc,
            "recreated: another incarnation"
        );
        assert_eq!(
            again.identity().instance,
            c.identity().instance,
            "same machine"
        );
    }

    #[test]
    fn rebuilding_mirrors_are_durable_and_chunk_locks_cover_ranges() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        let a: SocketAddr = "127.0.0.1:7501".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:7502".parse().expect("addr");
        c.set_membership_rebuilding(CopyRole::Primary, Epoch(2), Epoch(1), &[a], &[b])
            .expect("membership");
        assert_eq!(
            (c.mirrors().to_vec(), c.rebuilding().to_vec()),
            (vec![a], vec![b])
        );
        let adm = c.admit(Epoch(1), &n1(), Op::Write).expect("admit");
        assert_eq!(adm.rebuilding.to_vec(), vec![b]);
        drop(adm);
        assert_eq!(
            std::fs::read_to_string(members_path(c.path())).expect("members file"),
            "127.0.0.1:7501\nrebuild 127.0.0.1:7502\nnode n1 rw\n"
        );
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(
            (c.mirrors().to_vec(), c.rebuilding().to_vec()),
            (vec![a], vec![b])
        );
        // Only rebuilding: still a list; a plain set_membership clears it.
        c.set_membership_rebuilding(CopyRole::Primary, Epoch(3), Epoch(1), &[], &[b])
            .expect("membership");
        assert_eq!(
            std::fs::read_to_string(members_path(c.path())).expect("members file"),
            "rebuild 127.0.0.1:7502\nnode n1 rw\n"
        );
        c.set_membership(CopyRole::Primary, Epoch(3), Epoch(1), &[a])
            .expect("membership");
        assert!(c.rebuilding().is_empty());
        // A mirror has neither list, but keeps its access list.
        c.set_membership_rebuilding(CopyRole::Mirror, Epoch(4), Epoch(1), &[a], &[b])
            .expect("membership");
        assert!(c.mirrors().is_empty() && c.rebuilding().is_empty());
        assert_eq!(
            std::fs::read_to_string(members_path(c.path())).expect("members file"),
            "node n1 rw\n"
        );
        // An empty list leaves no file.
        c.set_members(CopyRole::Mirror, Epoch(4), Epoch(1), &MemberList::default())
            .expect("membership");
        assert!(!members_path(c.path()).exists());
        // Chunk lock shards: ascending, distinct, covering the range.
        let ch = u64::from(CHUNK_SIZE);
        assert_eq!(c.chunk_lock_shards(0, 512), vec![0]);
        assert_eq!(c.chunk_lock_shards(ch - 512, 1024), vec![0, 1]);
        assert_eq!(c.chunk_lock_shards(65 * ch, ch), vec![1]);
        assert_eq!(c.chunk_lock_shards(63 * ch, 2 * ch), vec![0, 63]);
        assert_eq!(c.chunk_lock_shards(0, 1 << 40).len(), CHUNK_LOCK_SHARDS);
        // Holes: a fresh copy has no data; a written chunk has.
        let size = c.size();
        assert!(!c.may_have_data(0, size.min(ch)) || cfg!(not(target_os = "linux")));
        c.write(0, &[1u8; 4096]).expect("write");
        assert!(c.may_have_data(0, 4096));
    }

    #[test]
    fn mirrors_are_durable_next_to_the_copy_and_a_mirror_has_none() {
        let d = tempfile::tempdir().expect("tmp");
        let c = new_copy(d.path());
        let list: Vec<SocketAddr> = vec![
            "127.0.0.1:7501".parse().expect("addr"),
            "[::1]:7502".parse().expect("addr"),
        ];
        let mp = members_path(c.path());
        c.set_members(
            CopyRole::Primary,
            Epoch(1),
            Epoch(1),
            &MemberList::default(),
        )
        .expect("no access list");
        assert!(!mp.exists());
        grant_n1(&c);
        c.set_membership(CopyRole::Primary, Epoch(1), Epoch(1), &list)
            .expect("list at the same epoch");
        assert_eq!(*c.mirrors(), list);
        let a = c.admit(Epoch(1), &n1(), Op::Write).expect("admit");
        assert_eq!((a.epoch, a.mirrors.to_vec()), (Epoch(1), list.clone()));
        drop(a);
        assert_eq!(
            std::fs::read_to_string(&mp).expect("members file"),
            "127.0.0.1:7501\n[::1]:7502\nnode n1 rw\n"
        );
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(*c.mirrors(), list);
        // One dropped at a new epoch.
        c.set_membership(CopyRole::Primary, Epoch(2), Epoch(1), &list[1..])
            .expect("drop one");
        drop(c);
        let c = Copy::open(&d.path().join("v.keel")).expect("reopen");
        assert_eq!(*c.mirrors(), list[1..].to_vec());
        // Demoted: no mirrors, only the access list is left.
        c.set_membership(CopyRole::Mirror, Epoch(3), Epoch(1), &list)
            .expect("demote");
        assert!(c.mirrors().is_empty());
        assert_eq!(
            std::fs::read_to_string(&mp).expect("members file"),
            "node n1 rw\n"
        );
        // A damaged list is a clear error at open.
        c.set_membership(CopyRole::Primary, Epoch(4), Epoch(1), &list)
            .expect("promote");
        drop(c);
        std::fs::write(&mp, "not an address\n").expect("damage");
        assert!(matches!(
            Copy::open(&d.path().join("v.keel")),
            Err(CopyError::BadMembers { .. })
        ));
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("junk.keel");
        std::fs::write(&p, b"not a copy").expect("write");
        assert!(matches!(
            Copy::open(&p),
            Err(CopyError::NoValidHeader { .. })
        ));
        assert!(matches!(
            Copy::create(
                &d.path().join("x.keel"),
                VolumeId(1),
                1000,
                CopyRole::Primary,
                Epoch(1)
            ),
            Err(CopyError::BadSize(1000))
        ));
    }
}
