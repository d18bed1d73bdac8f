//! A test VMM that drives a vhost-user-blk back-end socket without QEMU.
//!
//! [`TestVmm`] plays QEMU's part of a vhost-user-blk session: it is the
//! vhost-user front-end (through [`vhost::vhost_user::Frontend`]) *and* the
//! guest's virtio-blk driver for split virtqueues. Guest RAM is a memfd
//! mapped into this process and shared with the back-end by
//! `SET_MEM_TABLE` (one region at guest physical address 0).
//!
//! # Session set-up ([`TestVmm::connect`])
//!
//! Same order as QEMU: `GET_FEATURES`, `GET_PROTOCOL_FEATURES` /
//! `SET_PROTOCOL_FEATURES` (`MQ | CONFIG`, plus `REPLY_ACK` when offered and
//! [`VmmOptions::reply_ack`] is set, plus `BACKEND_REQ` when offered and
//! [`VmmOptions::backend_req`] is set), `GET_QUEUE_NUM`, `SET_BACKEND_REQ_FD`
//! (one end of a socketpair, with `BACKEND_REQ`; the back-end's messages on
//! it are read by [`TestVmm::recv_backend_message`]), `SET_OWNER`,
//! `GET_CONFIG`, `SET_FEATURES`, `SET_MEM_TABLE`, then for every queue
//! `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE` (0), `SET_VRING_CALL`,
//! `SET_VRING_KICK` and finally `SET_VRING_ENABLE` (when
//! `VHOST_USER_F_PROTOCOL_FEATURES` was negotiated). With `REPLY_ACK` every
//! "set" message is sent with `NEED_REPLY`, so a back-end that rejects one
//! makes `connect` fail with an error naming the step.
//!
//! Negotiated virtio features: `VIRTIO_F_VERSION_1` (required), every
//! virtio-blk feature this driver understands that the back-end offers
//! (`SIZE_MAX`, `SEG_MAX`, `GEOMETRY`, `RO`, `BLK_SIZE`, `FLUSH`, `TOPOLOGY`,
//! `CONFIG_WCE`, `MQ`, `DISCARD`, `WRITE_ZEROES`), `RING_EVENT_IDX` /
//! `RING_INDIRECT_DESC` only when asked for in [`VmmOptions`], all further
//! restricted by [`VmmOptions::feature_mask`].
//!
//! # Driver
//!
//! * Descriptors come from a per-queue free list; every chain is remembered
//!   by its head, so completions may arrive in any order and the driver never
//!   follows `next` pointers the device could have changed.
//! * The avail index is published with a release store, the used index read
//!   with an acquire load, and a full fence separates publishing from the
//!   kick decision (`VRING_USED_F_NO_NOTIFY`, or `avail_event` with
//!   `EVENT_IDX`) and `used_event` updates from the final used-ring check.
//! * Completion waits `poll(2)` the call eventfd in slices of at most 100 ms
//!   and re-check the used ring after each slice, so a back-end that forgets
//!   to signal still makes progress; such waits are counted in
//!   [`VmmStats::unsignalled_completions`] so tests can assert on it.
//! * Guest buffers come from a first-fit allocator over guest RAM (the first
//!   page is never handed out, so address 0 is always "unused"). Buffers the
//!   device may still write (request timed out) are leaked on purpose.
//! * Read buffers are filled with [`POISON`] before submission, so a device
//!   that reports success without writing data is caught.
//!
//! # Robustness
//!
//! [`TestVmm::submit_raw`] places an arbitrary descriptor chain;
//! [`hostile_session`] sends one malformed vhost-user message on a fresh
//! connection (after a valid prefix when needed) and reports how the
//! back-end reacted. Afterwards callers check that the back-end still serves
//! a normal [`TestVmm::connect`].
//!
//! # qemu-storage-daemon (the reference back-end used by this module's tests)
//!
//! QEMU 7.2's vhost-user-blk export (libvhost-user) offers virtio features
//! `0x1_7500_7e46`: `SIZE_MAX SEG_MAX BLK_SIZE FLUSH TOPOLOGY CONFIG_WCE MQ
//! DISCARD WRITE_ZEROES NOTIFY_ON_EMPTY LOG_ALL RING_INDIRECT_DESC
//! RING_EVENT_IDX PROTOCOL_FEATURES VERSION_1` (note: `SIZE_MAX` is offered
//! with `size_max` = 0 in config space; the driver then does not split
//! buffers), and protocol features `0x8f2b`: `MQ LOG_SHMFD REPLY_ACK
//! BACKEND_REQ PAGEFAULT CONFIG BACKEND_SEND_FD HOST_NOTIFIER
//! CONFIGURE_MEM_SLOTS` (no `INFLIGHT_SHMFD`). Config: `seg_max` 126,
//! `blk_size` 512, `max_discard_sectors` / `max_write_zeroes_sectors` 32768,
//! one segment each; discard and write-zeroes both return OK; `GET_ID`
//! answers `"vhost_user_blk"`; unknown request types get `UNSUPP`, reads past
//! the end `IOERR`. On a malformed descriptor chain (read-only status, buffer
//! outside RAM, loop, bad `next`) it drops the whole session; a chain with
//! only a header is silently never completed. It acknowledges (REPLY_ACK 0)
//! most malformed vhost-user messages even when it has internally given up on
//! the session, and dies on `SET_VRING_NUM` with an out-of-range vring index
//! (SIGSEGV) and on a memory region larger than its fd once the ring is used
//! (SIGBUS). See the `qsd_*` tests at the end of this file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Bytes per virtio-blk sector (request `sector` fields are always in these units).
pub const SECTOR_SIZE: u64 = 512;

/// Fill byte of device-writable data buffers before submission.
pub const POISON: u8 = 0xA5;

/// Value of the status byte before submission; seeing it after completion
/// means the device did not write the status.
pub const STATUS_UNWRITTEN: u8 = 0xFF;

// Virtio-blk feature bit numbers (virtio spec 5.2.3).
/// Maximum segment size is in `size_max`.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Maximum number of segments is in `seg_max`.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Disk-style geometry is in `geometry`.
pub const VIRTIO_BLK_F_GEOMETRY: u32 = 4;
/// Device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Block size is in `blk_size`.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Cache flush command support.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Topology information is available.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// Writeback mode is configurable.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
/// Multiple queues; count in `num_queues`.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// Discard command support.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Write-zeroes command support.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// vhost-user protocol features are available.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Virtio 1.0 device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

// Virtio-blk request types.
/// Read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Get device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

// Virtio-blk status values.
/// Success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

// Split virtqueue descriptor flags.
/// Chain continues via `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

const VRING_USED_F_NO_NOTIFY: u16 = 1;
const BLK_FEATURES_UNDERSTOOD: u64 = (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_GEOMETRY)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_TOPOLOGY)
    | (1 << VIRTIO_BLK_F_CONFIG_WCE)
    | (1 << VIRTIO_BLK_F_MQ)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
const POLL_SLICE: Duration = Duration::from_millis(100);
const PAGE: u64 = 4096;

/// Options for [`TestVmm::connect`].
#[derive(Clone, Debug)]
pub struct VmmOptions {
    /// Number of virtqueues to set up (queues `0..num_queues`).
    pub num_queues: u16,
    /// Size of every virtqueue (power of two, at most 32768).
    pub queue_size: u16,
    /// Guest RAM in bytes (multiple of 4 KiB, at least 1 MiB).
    pub mem_size: u64,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if the back-end offers it.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` if offered (the built-in
    /// request helpers never use indirect tables; see [`TestVmm::submit_raw`]).
    pub indirect_desc: bool,
    /// Negotiate `REPLY_ACK` if offered, and ask for acks on "set" messages.
    pub reply_ack: bool,
    /// AND-ed into the virtio feature set we would otherwise acknowledge
    /// (clear bits to hide features, e.g. `!(1 << VIRTIO_BLK_F_FLUSH)`).
    pub feature_mask: u64,
    /// Kick after every publish even when the device suppressed notifications.
    pub always_kick: bool,
    /// Maximum wait for one completion in the blocking helpers and `run_load`.
    pub io_timeout: Duration,
    /// Socket send/receive timeout for vhost-user messages.
    pub msg_timeout: Duration,
    /// Negotiate `BACKEND_REQ` if offered and give the back-end a channel
    /// for its requests (as QEMU does); see [`TestVmm::recv_backend_message`].
    pub backend_req: bool,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            num_queues: 1,
            queue_size: 128,
            mem_size: 64 << 20,
            event_idx: false,
            indirect_desc: false,
            reply_ack: true,
            feature_mask: !0,
            always_kick: false,
            io_timeout: Duration::from_secs(10),
            msg_timeout: Duration::from_secs(10),
            backend_req: false,
        }
    }
}

/// Parsed `struct virtio_blk_config` (fields beyond what the back-end
/// returned are 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum segment size (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: u32,
    /// Maximum number of segments (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: u32,
    /// log2(physical blocks per logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// Writeback cache mode (`VIRTIO_BLK_F_CONFIG_WCE`).
    pub writeback: u8,
    /// Number of queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Maximum discard sectors per segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments per request.
    pub max_discard_seg: u32,
    /// Discard sector alignment.
    pub discard_sector_alignment: u32,
    /// Maximum write-zeroes sectors per segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Write zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
    /// The config space bytes as returned by `GET_CONFIG`.
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Parses a (possibly short) little-endian `virtio_blk_config`.
    pub fn parse(raw: &[u8]) -> BlkConfig {
        let get = |off: usize, len: usize| -> u64 {
            let mut v = 0u64;
            for i in 0..len {
                v |= u64::from(raw.get(off + i).copied().unwrap_or(0)) << (8 * i);
            }
            v
        };
        BlkConfig {
            capacity: get(0, 8),
            size_max: get(8, 4) as u32,
            seg_max: get(12, 4) as u32,
            cylinders: get(16, 2) as u16,
            heads: get(18, 1) as u8,
            sectors: get(19, 1) as u8,
            blk_size: get(20, 4) as u32,
            physical_block_exp: get(24, 1) as u8,
            alignment_offset: get(25, 1) as u8,
            min_io_size: get(26, 2) as u16,
            opt_io_size: get(28, 4) as u32,
            writeback: get(32, 1) as u8,
            num_queues: get(34, 2) as u16,
            max_discard_sectors: get(36, 4) as u32,
            max_discard_seg: get(40, 4) as u32,
            discard_sector_alignment: get(44, 4) as u32,
            max_write_zeroes_sectors: get(48, 4) as u32,
            max_write_zeroes_seg: get(52, 4) as u32,
            write_zeroes_may_unmap: get(56, 1) as u8,
            raw: raw.to_vec(),
        }
    }
}

/// Result of a virtio-blk request made with [`TestVmm::request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkResponse {
    /// Status byte written by the device ([`STATUS_UNWRITTEN`] if it wrote none).
    pub status: u8,
    /// Contents of the device-writable data buffer (`in_len` bytes).
    pub data: Vec<u8>,
    /// `len` of the used-ring entry.
    pub used_len: u32,
}

/// Next-pointer of a [`RawDesc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawNext {
    /// Link to the following entry of the slice and add `VIRTQ_DESC_F_NEXT`,
    /// unless this is the last entry (then `next` = 0, flags untouched).
    Auto,
    /// Point at entry `i` of the same slice (flags untouched: set
    /// `VIRTQ_DESC_F_NEXT` yourself), e.g. to build loops.
    Entry(usize),
    /// Literal descriptor-table index (flags untouched), e.g. out of range.
    Table(u16),
}

/// One descriptor for [`TestVmm::submit_raw`] / [`RawDesc::encode_table`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags (see [`RawNext`] for how `NEXT` is handled).
    pub flags: u16,
    /// Where `next` points.
    pub next: RawNext,
}

impl RawDesc {
    /// Device-readable buffer, auto-linked.
    pub fn ro(addr: u64, len: u32) -> RawDesc {
        RawDesc {
            addr,
            len,
            flags: 0,
            next: RawNext::Auto,
        }
    }

    /// Device-writable buffer, auto-linked.
    pub fn wo(addr: u64, len: u32) -> RawDesc {
        RawDesc {
            addr,
            len,
            flags: VIRTQ_DESC_F_WRITE,
            next: RawNext::Auto,
        }
    }

    /// Descriptor pointing at an indirect table of `len` bytes at `addr`.
    pub fn indirect(addr: u64, len: u32) -> RawDesc {
        RawDesc {
            addr,
            len,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: RawNext::Auto,
        }
    }

    /// Encodes `descs` as an indirect descriptor table (write it with
    /// [`TestVmm::write_mem`]). `Auto`/`Entry` indices refer to the table itself.
    pub fn encode_table(descs: &[RawDesc]) -> Vec<u8> {
        let mut out = Vec::with_capacity(descs.len() * 16);
        for (i, d) in descs.iter().enumerate() {
            let (flags, next) = resolve_next(d, i, descs.len(), |j| j as u16);
            out.extend_from_slice(&encode_desc(d.addr, d.len, flags, next));
        }
        out
    }
}

fn resolve_next(d: &RawDesc, i: usize, n: usize, map: impl Fn(usize) -> u16) -> (u16, u16) {
    match d.next {
        RawNext::Auto if i + 1 < n => (d.flags | VIRTQ_DESC_F_NEXT, map(i + 1)),
        RawNext::Auto => (d.flags, 0),
        RawNext::Entry(j) => (d.flags, if j < n { map(j) } else { j as u16 }),
        RawNext::Table(t) => (d.flags, t),
    }
}

fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

/// Guest addresses of one split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size.
    pub size: u16,
    /// Descriptor table (16 bytes per entry).
    pub desc: u64,
    /// Avail ring: flags u16, idx u16 (at +2), ring[size] u16, used_event u16.
    pub avail: u64,
    /// Used ring: flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16.
    pub used: u64,
}

/// Counters kept by the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmStats {
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Publishes where the device had suppressed the kick.
    pub suppressed_kicks: u64,
    /// Call eventfd wake-ups consumed.
    pub calls: u64,
    /// Waits where new used entries showed up without a call signal within
    /// a 100 ms poll slice (a back-end forgetting to notify).
    pub unsignalled_completions: u64,
    /// Used entries whose id was not the head of a chain we had in flight.
    pub stray_used: u64,
}

/// Operation mix of a [`LoadSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOp {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// Each request is a read with probability `read_percent`%.
    Mixed {
        /// 0..=100.
        read_percent: u8,
    },
}

/// Workload for [`TestVmm::run_load`].
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Read/write mix.
    pub op: LoadOp,
    /// Requests kept in flight.
    pub depth: usize,
    /// Bytes per request (multiple of 512).
    pub block_size: usize,
    /// Random (true) or sequential (wrapping) block-aligned offsets.
    pub random: bool,
    /// `(start_sector, sectors)` to stay within; `None` = whole disk.
    pub region: Option<(u64, u64)>,
    /// Stop submitting after this many requests.
    pub count: Option<u64>,
    /// Stop submitting after this much time (whichever limit comes first).
    pub duration: Option<Duration>,
    /// Seed of offset / op choices.
    pub seed: u64,
    /// If set, writes carry [`pattern`]`(data_seed, sector)` data and reads
    /// are verified against it (counted in [`LoadResult::mismatches`]).
    /// Reads are only meaningful over a region previously written with the
    /// same seed.
    pub data_seed: Option<u64>,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            op: LoadOp::Read,
            depth: 16,
            block_size: 4096,
            random: true,
            region: None,
            count: Some(1000),
            duration: None,
            seed: 1,
            data_seed: None,
        }
    }
}

/// Outcome of [`TestVmm::run_load`].
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Completed requests.
    pub completed: u64,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Completions with a status other than `VIRTIO_BLK_S_OK`.
    pub errors: u64,
    /// First failing request: (sector, status).
    pub first_error: Option<(u64, u8)>,
    /// Reads whose data did not match the pattern (only with `data_seed`).
    pub mismatches: u64,
    /// Payload bytes moved by successful requests.
    pub bytes: u64,
    /// From first submission to last completion.
    pub elapsed: Duration,
    /// Per-request latency in microseconds, in completion order.
    pub latencies_us: Vec<u64>,
}

impl LoadResult {
    /// Completed requests per second.
    pub fn iops(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Successful payload MiB per second.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile in µs (`p` in 0..=100, nearest rank); 0 if empty.
    pub fn percentile_us(&self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }
}

/// Deterministic test data: `len` bytes (multiple of 512) for the sectors
/// starting at `sector`; each 512-byte sector depends only on `(seed, sector)`.
pub fn pattern(seed: u64, sector: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed, sector);
    v
}

fn fill_pattern(buf: &mut [u8], seed: u64, sector: u64) {
    for (i, chunk) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
        let mut st = splitmix(seed ^ (sector + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for w in chunk.chunks_mut(8) {
            st = splitmix(st);
            w.copy_from_slice(&st.to_le_bytes()[..w.len()]);
        }
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }
}

/// `vring_need_event` from the virtio spec.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

// ---------------------------------------------------------------------------
// Guest memory

struct GuestMem {
    file: File,
    base: *mut u8,
    size: u64,
}

// SAFETY: the mapping is owned exclusively by this struct (unmapped on drop)
// and only accessed through its methods; nothing ties it to one thread.
unsafe impl Send for GuestMem {}

impl GuestMem {
    fn new(size: u64) -> Result<GuestMem> {
        ensure!(
            size >= (1 << 20) && size & (PAGE - 1) == 0,
            "guest memory size {size} must be >= 1 MiB and a multiple of 4 KiB"
        );
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"keel-test-vmm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).context("ftruncate guest memory")?;
        // SAFETY: maps `size` bytes of a file that is `size` bytes long at a
        // kernel-chosen address; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mmap guest memory");
        }
        Ok(GuestMem {
            file,
            base: p as *mut u8,
            size,
        })
    }

    fn check(&self, gpa: u64, len: usize) -> Result<()> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => bail!(
                "guest range {gpa:#x}+{len:#x} outside guest memory (size {:#x})",
                self.size
            ),
        }
    }

    fn hva(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.check(gpa, data.len())?;
        // SAFETY: the destination range was checked to lie inside the mapping,
        // which cannot overlap `data` (a Rust-owned buffer).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(gpa as usize), data.len())
        };
        Ok(())
    }

    fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        self.check(gpa, len)?;
        // SAFETY: the range was checked to lie inside the mapping.
        unsafe { std::ptr::write_bytes(self.base.add(gpa as usize), byte, len) };
        Ok(())
    }

    fn read_into(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        // SAFETY: the source range was checked to lie inside the mapping,
        // which cannot overlap `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_into(gpa, &mut v)?;
        Ok(v)
    }

    fn read_u32(&self, gpa: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_into(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Atomic view of a ring index; only used for addresses of our own rings.
    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert!(
            gpa & 1 == 0 && gpa + 2 <= self.size,
            "bad ring index address {gpa:#x}"
        );
        // SAFETY: the address is inside the mapping (which outlives `&self`)
        // and 2-byte aligned (the mapping is page aligned); the location is
        // only ever accessed atomically by us and by the device.
        unsafe { AtomicU16::from_ptr(self.base.add(gpa as usize) as *mut u16) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no references
        // into it outlive `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

/// First-fit allocator over guest physical addresses.
struct Alloc {
    free: BTreeMap<u64, u64>,
    used: HashMap<u64, u64>,
}

impl Alloc {
    fn new(start: u64, end: u64) -> Alloc {
        let mut free = BTreeMap::new();
        free.insert(start, end - start);
        Alloc {
            free,
            used: HashMap::new(),
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = len.max(1).next_multiple_of(16);
        let align = align.max(16);
        let (s, l, a) = self.free.iter().find_map(|(&s, &l)| {
            let a = s.next_multiple_of(align);
            (a + len <= s + l).then_some((s, l, a))
        })?;
        self.free.remove(&s);
        if a > s {
            self.free.insert(s, a - s);
        }
        if a + len < s + l {
            self.free.insert(a + len, s + l - a - len);
        }
        self.used.insert(a, len);
        Some(a)
    }

    fn release(&mut self, addr: u64) {
        let Some(len) = self.used.remove(&addr) else {
            return;
        };
        let (mut start, mut end) = (addr, addr + len);
        if let Some((&ps, &pl)) = self.free.range(..addr).next_back() {
            if ps + pl == addr {
                self.free.remove(&ps);
                start = ps;
            }
        }
        if let Some(nl) = self.free.remove(&end) {
            end += nl;
        }
        self.free.insert(start, end - start);
    }
}

// ---------------------------------------------------------------------------
// Virtqueue

struct Vq {
    layout: QueueLayout,
    free: Vec<u16>,
    next_avail: u16,
    published: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
    chains: HashMap<u16, Vec<u16>>,
}

#[derive(Clone, Copy, Debug)]
struct Used {
    id: u32,
    len: u32,
}

struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

/// One message the back-end sent on the backend request channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendMessage {
    /// Request code (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` is 2).
    pub request: u32,
    /// Header flags (bit 0..1: version 1; bit 3: `NEED_REPLY`).
    pub flags: u32,
    pub payload: Vec<u8>,
}

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// A vhost-user front-end plus virtio-blk driver for tests; see the module docs.
pub struct TestVmm {
    // Dropped first: closing the socket ends the session before RAM goes away.
    frontend: Frontend,
    /// Our end of the backend request channel (`SET_BACKEND_REQ_FD`).
    backend_channel: Option<UnixStream>,
    mem: GuestMem,
    alloc: Alloc,
    queues: Vec<Vq>,
    features: u64,
    device_features: u64,
    protocol_features: u64,
    device_protocol_features: u64,
    max_queues: u64,
    config: BlkConfig,
    opts: VmmOptions,
    stats: VmmStats,
    peer_closed: bool,
}

fn set_socket_timeouts(fd: RawFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: passes a valid timeval of the advertised size for a socket option.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Polls `fds` for readability; returns per-fd "has events" flags.
fn poll_fds(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    if ms == 0 && !timeout.is_zero() {
        ms = 1;
    }
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

enum PeerState {
    Closed,
    Data,
    Quiet,
}

/// Peeks at a connected stream socket to tell whether the peer closed it.
fn peer_state(fd: RawFd) -> PeerState {
    let mut b = [0u8; 1];
    // SAFETY: peeks at most one byte into a valid one-byte buffer.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => PeerState::Closed,
        n if n > 0 => PeerState::Data,
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => PeerState::Quiet,
            _ => PeerState::Closed,
        },
    }
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl TestVmm {
    /// Connects to `socket`, negotiates, sets up guest RAM and `opts.num_queues`
    /// started and enabled virtqueues; ready for I/O.
    pub fn connect(socket: &Path, opts: VmmOptions) -> Result<TestVmm> {
        ensure!(opts.num_queues >= 1, "num_queues must be >= 1");
        ensure!(
            opts.queue_size.is_power_of_two() && opts.queue_size <= 32768,
            "queue_size {} must be a power of two <= 32768",
            opts.queue_size
        );
        let mem = GuestMem::new(opts.mem_size)?;
        let mut fe = Frontend::connect(socket, u64::from(opts.num_queues))
            .map_err(|e| anyhow!("connect to {}: {e}", socket.display()))?;
        set_socket_timeouts(fe.as_raw_fd(), opts.msg_timeout).context("socket timeouts")?;

        let step = |what: &str, e: vhost::Error| anyhow!("vhost-user {what}: {e}");
        let device_features = fe.get_features().map_err(|e| step("GET_FEATURES", e))?;
        ensure!(
            device_features & bit(VIRTIO_F_VERSION_1) != 0,
            "back-end does not offer VIRTIO_F_VERSION_1 (features {device_features:#x})"
        );
        let mut want = bit(VIRTIO_F_VERSION_1) | BLK_FEATURES_UNDERSTOOD;
        want |= bit(VHOST_USER_F_PROTOCOL_FEATURES);
        if opts.event_idx {
            want |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        if opts.indirect_desc {
            want |= bit(VIRTIO_RING_F_INDIRECT_DESC);
        }
        let features = device_features & want & opts.feature_mask;

        let mut protocol_features = 0u64;
        let mut device_protocol_features = 0u64;
        let mut max_queues = 1u64;
        if features & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(|e| step("GET_PROTOCOL_FEATURES", e))?;
            let mut pwant = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
            if opts.reply_ack {
                pwant |= VhostUserProtocolFeatures::REPLY_ACK;
            }
            if opts.backend_req {
                pwant |= VhostUserProtocolFeatures::BACKEND_REQ;
            }
            device_protocol_features = offered.bits();
            let acked = offered & pwant;
            fe.set_protocol_features(acked)
                .map_err(|e| step("SET_PROTOCOL_FEATURES", e))?;
            protocol_features = acked.bits();
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                max_queues = fe.get_queue_num().map_err(|e| step("GET_QUEUE_NUM", e))?;
            }
        }
        ensure!(
            u64::from(opts.num_queues) <= max_queues,
            "asked for {} queues, back-end supports {max_queues}",
            opts.num_queues
        );
        let acks = protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        let need_reply = |fe: &Frontend, on: bool| {
            fe.set_hdr_flags(if on && acks {
                VhostUserHeaderFlag::NEED_REPLY
            } else {
                VhostUserHeaderFlag::empty()
            })
        };

        let mut backend_channel = None;
        if protocol_features & VhostUserProtocolFeatures::BACKEND_REQ.bits() != 0 {
            let (ours, theirs) = UnixStream::pair().context("backend channel socketpair")?;
            need_reply(&fe, true);
            fe.set_backend_request_fd(&theirs)
                .map_err(|e| step("SET_BACKEND_REQ_FD", e))?;
            need_reply(&fe, false);
            backend_channel = Some(ours);
        }

        need_reply(&fe, true);
        fe.set_owner().map_err(|e| step("SET_OWNER", e))?;
        need_reply(&fe, false);

        let mut config = BlkConfig::default();
        if protocol_features & VhostUserProtocolFeatures::CONFIG.bits() != 0 {
            let mut last_err = None;
            for size in [60u32, 36, 24, 8] {
                let buf = vec![0u8; size as usize];
                match fe.get_config(0, size, VhostUserConfigFlags::empty(), &buf) {
                    Ok((_, payload)) => {
                        config = BlkConfig::parse(&payload);
                        last_err = None;
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if let Some(e) = last_err {
                return Err(step("GET_CONFIG", e));
            }
        }

        need_reply(&fe, true);
        fe.set_features(features)
            .map_err(|e| step("SET_FEATURES", e))?;
        // `..Default::default()` covers the fields of vhost's optional `xen` feature.
        #[allow(clippy::needless_update)]
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size,
            userspace_addr: mem.hva(0),
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
            ..Default::default()
        };
        fe.set_mem_table(&[region])
            .map_err(|e| step("SET_MEM_TABLE", e))?;

        let mut alloc = Alloc::new(PAGE, mem.size);
        let qs = u64::from(opts.queue_size);
        let mut queues = Vec::new();
        for q in 0..opts.num_queues {
            let desc = alloc
                .alloc(16 * qs, PAGE)
                .context("guest memory too small for rings")?;
            let avail = alloc
                .alloc(6 + 2 * qs, PAGE)
                .context("guest memory too small")?;
            let used = alloc
                .alloc(6 + 8 * qs, PAGE)
                .context("guest memory too small")?;
            mem.fill(desc, 16 * qs as usize, 0)?;
            mem.fill(avail, 6 + 2 * qs as usize, 0)?;
            mem.fill(used, 6 + 8 * qs as usize, 0)?;
            let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
            let call = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
            let qi = usize::from(q);
            fe.set_vring_num(qi, opts.queue_size)
                .map_err(|e| step("SET_VRING_NUM", e))?;
            let cfg = VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: mem.hva(desc),
                used_ring_addr: mem.hva(used),
                avail_ring_addr: mem.hva(avail),
                log_addr: None,
            };
            fe.set_vring_addr(qi, &cfg)
                .map_err(|e| step("SET_VRING_ADDR", e))?;
            fe.set_vring_base(qi, 0)
                .map_err(|e| step("SET_VRING_BASE", e))?;
            fe.set_vring_call(qi, &call)
                .map_err(|e| step("SET_VRING_CALL", e))?;
            fe.set_vring_kick(qi, &kick)
                .map_err(|e| step("SET_VRING_KICK", e))?;
            queues.push(Vq {
                layout: QueueLayout {
                    size: opts.queue_size,
                    desc,
                    avail,
                    used,
                },
                free: (0..opts.queue_size).rev().collect(),
                next_avail: 0,
                published: 0,
                last_used: 0,
                kick,
                call,
                chains: HashMap::new(),
            });
        }
        if features & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            for q in 0..usize::from(opts.num_queues) {
                fe.set_vring_enable(q, true)
                    .map_err(|e| step("SET_VRING_ENABLE", e))?;
            }
        }
        need_reply(&fe, false);

        Ok(TestVmm {
            frontend: fe,
            backend_channel,
            mem,
            alloc,
            queues,
            features,
            device_features,
            protocol_features,
            device_protocol_features,
            max_queues,
            config,
            opts,
            stats: VmmStats::default(),
            peer_closed: false,
        })
    }

    /// Device configuration read at connect time (or by the last
    /// [`TestVmm::reread_config`]).
    pub fn config(&self) -> BlkConfig {
        self.config.clone()
    }

    /// Reads the device configuration again with `GET_CONFIG` (as QEMU does
    /// on a config-change message) and returns it.
    pub fn reread_config(&mut self) -> Result<BlkConfig> {
        let buf = vec![0u8; 60];
        let (_, payload) = self
            .frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &buf)
            .map_err(|e| anyhow!("vhost-user GET_CONFIG: {e}"))?;
        self.config = BlkConfig::parse(&payload);
        Ok(self.config.clone())
    }

    /// Waits up to `timeout` for a message from the back-end on the backend
    /// request channel; `None` if none came. Errors if no channel was set up
    /// or the back-end closed it. Messages asking for a reply get none.
    pub fn recv_backend_message(&mut self, timeout: Duration) -> Result<Option<BackendMessage>> {
        let ch = self
            .backend_channel
            .as_mut()
            .context("no backend request channel (BACKEND_REQ not negotiated)")?;
        if !poll_fds(&[ch.as_raw_fd()], timeout)?[0] {
            return Ok(None);
        }
        ch.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut hdr = [0u8; 12];
        ch.read_exact(&mut hdr)
            .context("reading a backend message header")?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let size = word(8);
        ensure!(size <= 4096, "backend message claims a {size}-byte payload");
        let mut payload = vec![0u8; size as usize];
        ch.read_exact(&mut payload)
            .context("reading a backend message payload")?;
        Ok(Some(BackendMessage {
            request: word(0),
            flags: word(4),
            payload,
        }))
    }

    /// Negotiated (acknowledged) virtio feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Virtio feature bits the back-end offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Negotiated vhost-user protocol feature bits.
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// vhost-user protocol feature bits the back-end offered.
    pub fn device_protocol_features(&self) -> u64 {
        self.device_protocol_features
    }

    /// True once a completion wait noticed that the back-end closed the
    /// vhost-user connection (outstanding requests will never complete).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Queue count reported by `GET_QUEUE_NUM` (1 without the MQ protocol feature).
    pub fn max_queues(&self) -> u64 {
        self.max_queues
    }

    /// Whether virtio feature bit `b` (e.g. [`VIRTIO_BLK_F_FLUSH`]) was negotiated.
    pub fn has_feature(&self, b: u32) -> bool {
        self.features & bit(b) != 0
    }

    /// Driver counters.
    pub fn stats(&self) -> VmmStats {
        self.stats
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Guest addresses of queue `q`'s rings.
    pub fn queue_layout(&self, q: u16) -> Result<QueueLayout> {
        Ok(self.vq(q)?.layout)
    }

    /// The underlying vhost-user front-end, for messages not wrapped here.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Guest RAM size in bytes (addresses `>= mem_size()` are outside RAM).
    pub fn mem_size(&self) -> u64 {
        self.mem.size
    }

    /// Allocates `len` bytes of zeroed scratch guest memory (4 KiB aligned if
    /// `len >= 512`, else 16-byte aligned); returns its guest address.
    pub fn alloc(&mut self, len: usize) -> Result<u64> {
        let align = if len >= 512 { PAGE } else { 16 };
        let a = self
            .alloc
            .alloc(len as u64, align)
            .ok_or_else(|| anyhow!("out of guest memory allocating {len} bytes"))?;
        self.mem.fill(a, len, 0)?;
        Ok(a)
    }

    /// Returns memory obtained from [`TestVmm::alloc`] (unknown addresses are ignored).
    pub fn free(&mut self, addr: u64) {
        self.alloc.release(addr);
    }

    /// Writes guest memory at `addr`.
    pub fn write_mem(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem.write(addr, data)
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        self.mem.read(addr, len)
    }

    /// Writes queue `q`'s kick eventfd unconditionally.
    pub fn kick(&mut self, q: u16) -> Result<()> {
        self.vq(q)?.kick.write(1)?;
        self.stats.kicks += 1;
        Ok(())
    }

    /// Makes an avail entry naming descriptor `head` available on queue `q` as it is (no
    /// descriptor is written, and `head` may lie outside the table: a broken or hostile
    /// guest), publishes it and kicks unless the device suppressed the kick. Nothing is
    /// reserved for it and no completion is awaited.
    pub fn push_raw_head(&mut self, q: u16, head: u16) -> Result<()> {
        self.vq(q)?;
        let qi = usize::from(q);
        Self::push_avail(&self.mem, &mut self.queues[qi], head)?;
        self.notify(qi)
    }

    /// Waits up to `timeout` for the back-end to close the vhost-user connection (end of file
    /// on the socket); true once it has (then [`TestVmm::peer_closed`] is too). A message the
    /// back-end sends unasked meanwhile is an error.
    pub fn wait_peer_closed(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let fd = self.frontend.as_raw_fd();
        while !self.peer_closed {
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let ready = poll_fds(&[fd], (deadline - now).min(POLL_SLICE))?;
            if ready.first().copied().unwrap_or(false) {
                match peer_state(fd) {
                    PeerState::Closed => self.peer_closed = true,
                    PeerState::Data => {
                        bail!("the back-end sent an unrequested message on the vhost-user socket")
                    }
                    PeerState::Quiet => {}
                }
            }
        }
        Ok(true)
    }

    /// True if the back-end still answers a `GET_FEATURES` round trip.
    pub fn alive(&mut self) -> bool {
        self.frontend.get_features().is_ok()
    }

    /// Stops all queues with `GET_VRING_BASE` (as QEMU does on VM stop) and
    /// returns the back-end's next avail index per queue.
    pub fn stop(&mut self) -> Result<Vec<u32>> {
        (0..self.queues.len())
            .map(|q| {
                self.frontend
                    .get_vring_base(q)
                    .map_err(|e| anyhow!("GET_VRING_BASE({q}): {e}"))
            })
            .collect()
    }

    fn vq(&self, q: u16) -> Result<&Vq> {
        self.queues
            .get(usize::from(q))
            .ok_or_else(|| anyhow!("queue {q} not set up ({} queues)", self.queues.len()))
    }

    fn data_chunk(&self) -> usize {
        if self.has_feature(VIRTIO_BLK_F_SIZE_MAX) && self.config.size_max > 0 {
            self.config.size_max as usize
        } else {
            usize::MAX
        }
    }

    fn add_chain(&mut self, q: usize, segs: &[Seg]) -> Result<u16> {
        let vq = &mut self.queues[q];
        ensure!(!segs.is_empty(), "empty chain");
        ensure!(
            segs.len() <= vq.free.len(),
            "queue {q}: {} descriptors needed, {} free",
            segs.len(),
            vq.free.len()
        );
        let idxs: Vec<u16> = (0..segs.len()).map(|_| vq.free.pop().unwrap()).collect();
        for (i, s) in segs.iter().enumerate() {
            let mut flags = if s.write { VIRTQ_DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < segs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                next = idxs[i + 1];
            }
            let at = vq.layout.desc + 16 * u64::from(idxs[i]);
            self.mem
                .write(at, &encode_desc(s.addr, s.len, flags, next))?;
        }
        let head = idxs[0];
        vq.chains.insert(head, idxs);
        Self::push_avail(&self.mem, vq, head)?;
        Ok(head)
    }

    fn push_avail(mem: &GuestMem, vq: &mut Vq, head: u16) -> Result<()> {
        let slot = vq.next_avail % vq.layout.size;
        mem.write(
            vq.layout.avail + 4 + 2 * u64::from(slot),
            &head.to_le_bytes(),
        )?;
        vq.next_avail = vq.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publishes pending avail entries and kicks unless the device suppressed it.
    fn notify(&mut self, q: usize) -> Result<()> {
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        let vq = &mut self.queues[q];
        let (old, new) = (vq.published, vq.next_avail);
        if old == new {
            return Ok(());
        }
        self.mem
            .atomic_u16(vq.layout.avail + 2)
            .store(new, Ordering::Release);
        vq.published = new;
        fence(Ordering::SeqCst);
        let size = u64::from(vq.layout.size);
        let kick = self.opts.always_kick
            || if event_idx {
                let ev = self
                    .mem
                    .atomic_u16(vq.layout.used + 4 + 8 * size)
                    .load(Ordering::Acquire);
                need_event(ev, new, old)
            } else {
                let flags = self.mem.atomic_u16(vq.layout.used).load(Ordering::Acquire);
                flags & VRING_USED_F_NO_NOTIFY == 0
            };
        if kick {
            vq.kick.write(1)?;
            self.stats.kicks += 1;
        } else {
            self.stats.suppressed_kicks += 1;
        }
        Ok(())
    }

    /// Collects new used entries of queue `q`, returning their descriptors to the free list.
    fn reap(&mut self, q: usize) -> Result<Vec<Used>> {
        let vq = &mut self.queues[q];
        let idx = self
            .mem
            .atomic_u16(vq.layout.used + 2)
            .load(Ordering::Acquire);
        let pending = idx.wrapping_sub(vq.last_used);
        ensure!(
            pending <= vq.layout.size,
            "queue {q}: device moved used idx from {} to {idx} (queue size {})",
            vq.last_used,
            vq.layout.size
        );
        let mut out = Vec::with_capacity(usize::from(pending));
        for _ in 0..pending {
            let slot = u64::from(vq.last_used % vq.layout.size);
            let at = vq.layout.used + 4 + 8 * slot;
            let id = self.mem.read_u32(at)?;
            let len = self.mem.read_u32(at + 4)?;
            vq.last_used = vq.last_used.wrapping_add(1);
            let chain = u16::try_from(id).ok().and_then(|h| vq.chains.remove(&h));
            match chain {
                Some(c) => vq.free.extend(c),
                None => self.stats.stray_used += 1,
            }
            out.push(Used { id, len });
        }
        Ok(out)
    }

    /// Waits until any of `qs` has used entries or `deadline` passes (then returns empty).
    fn wait_any(&mut self, qs: &[usize], deadline: Instant) -> Result<Vec<(usize, Used)>> {
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        let reap_all = |s: &mut Self| -> Result<Vec<(usize, Used)>> {
            let mut out = Vec::new();
            for &q in qs {
                out.extend(s.reap(q)?.into_iter().map(|u| (q, u)));
            }
            Ok(out)
        };
        let mut watch_socket = !self.peer_closed;
        loop {
            let got = reap_all(self)?;
            if !got.is_empty() || self.peer_closed {
                return Ok(got);
            }
            if event_idx {
                for &q in qs {
                    let vq = &self.queues[q];
                    let at = vq.layout.avail + 4 + 2 * u64::from(vq.layout.size);
                    self.mem
                        .atomic_u16(at)
                        .store(vq.last_used, Ordering::Release);
                }
                fence(Ordering::SeqCst);
                let got = reap_all(self)?;
                if !got.is_empty() {
                    return Ok(got);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut fds: Vec<RawFd> = qs
                .iter()
                .map(|&q| self.queues[q].call.as_raw_fd())
                .collect();
            if watch_socket {
                fds.push(self.frontend.as_raw_fd());
            }
            let ready = poll_fds(&fds, (deadline - now).min(POLL_SLICE))?;
            if watch_socket && ready[qs.len()] {
                match peer_state(self.frontend.as_raw_fd()) {
                    PeerState::Closed => {
                        self.peer_closed = true;
                        return reap_all(self);
                    }
                    // Unexpected data on the main socket: stop watching it
                    // (the vhost-user front-end will see it on its next call).
                    PeerState::Data => watch_socket = false,
                    PeerState::Quiet => {}
                }
            }
            if ready[..qs.len()].iter().any(|&r| r) {
                for (i, &q) in qs.iter().enumerate() {
                    if ready[i] && self.queues[q].call.read().is_ok() {
                        self.stats.calls += 1;
                    }
                }
                continue;
            }
            let got = reap_all(self)?;
            if !got.is_empty() {
                // A late signal is fine; only count completions with none at all.
                let ready = poll_fds(&fds[..qs.len()], Duration::ZERO)?;
                if !ready.iter().any(|&r| r) {
                    self.stats.unsignalled_completions += 1;
                }
                return Ok(got);
            }
        }
    }

    /// Waits for the chain with head `head` on queue `q`.
    fn wait_head(&mut self, q: usize, head: u16, timeout: Duration) -> Result<Option<u32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.wait_any(&[q], deadline)?;
            if got.is_empty() {
                return Ok(None);
            }
            if let Some((_, u)) = got.iter().find(|(_, u)| u.id == u32::from(head)) {
                return Ok(Some(u.len));
            }
        }
    }

    fn blk_segments(
        &self,
        hdr: u64,
        out: Option<(u64, usize)>,
        inp: Option<(u64, usize)>,
    ) -> Vec<Seg> {
        let chunk = self.data_chunk();
        let mut segs = vec![Seg {
            addr: hdr,
            len: 16,
            write: false,
        }];
        for (buf, write) in [(out, false), (inp, true)] {
            if let Some((addr, len)) = buf {
                let mut off = 0;
                while off < len {
                    let n = (len - off).min(chunk).min(u32::MAX as usize);
                    segs.push(Seg {
                        addr: addr + off as u64,
                        len: n as u32,
                        write,
                    });
                    off += n;
                }
            }
        }
        segs.push(Seg {
            addr: hdr + 16,
            len: 1,
            write: true,
        });
        segs
    }

    fn write_header(&self, hdr: u64, req_type: u32, sector: u64) -> Result<()> {
        let mut h = [0u8; 17];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h[16] = STATUS_UNWRITTEN;
        self.mem.write(hdr, &h)
    }

    /// Generic blocking virtio-blk request on queue `q`: header
    /// `{req_type, 0, sector}`, then `out` as device-readable data (if not
    /// empty), then `in_len` bytes of device-writable data (if > 0, pre-filled
    /// with [`POISON`]), then the status byte. Data buffers are split at
    /// `size_max` when that feature was negotiated. Errors on timeout
    /// ([`VmmOptions::io_timeout`]) or a full queue; a non-OK status is not an error.
    pub fn request(
        &mut self,
        q: u16,
        req_type: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> Result<BlkResponse> {
        self.vq(q)?;
        let qi = usize::from(q);
        let hdr = self.alloc.alloc(32, 16).context("out of guest memory")?;
        let mut bufs = vec![hdr];
        let result = (|| -> Result<Option<BlkResponse>> {
            self.write_header(hdr, req_type, sector)?;
            let out_buf = if out.is_empty() {
                None
            } else {
                let a = self.alloc(out.len())?;
                bufs.push(a);
                self.mem.write(a, out)?;
                Some((a, out.len()))
            };
            let in_buf = if in_len == 0 {
                None
            } else {
                let a = self.alloc(in_len)?;
                bufs.push(a);
                self.mem.fill(a, in_len, POISON)?;
                Some((a, in_len))
            };
            let segs = self.blk_segments(hdr, out_buf, in_buf);
            let head = self.add_chain(qi, &segs)?;
            self.notify(qi)?;
            let Some(used_len) = self.wait_head(qi, head, self.opts.io_timeout)? else {
                return Ok(None);
            };
            let status = self.mem.read(hdr + 16, 1)?[0];
            let data = match in_buf {
                Some((a, n)) => self.mem.read(a, n)?,
                None => Vec::new(),
            };
            Ok(Some(BlkResponse {
                status,
                data,
                used_len,
            }))
        })();
        match result {
            Ok(Some(r)) => {
                for b in bufs {
                    self.alloc.release(b);
                }
                Ok(r)
            }
            // Buffers stay allocated: the device may still write them.
            Ok(None) if self.peer_closed => bail!(
                "queue {q}: request type {req_type} sector {sector}: back-end closed the connection"
            ),
            Ok(None) => bail!(
                "queue {q}: request type {req_type} sector {sector} not completed within {:?}",
                self.opts.io_timeout
            ),
            Err(e) => Err(e),
        }
    }

    /// Reads `len` bytes at `sector`; returns (status, data).
    pub fn read(&mut self, q: u16, sector: u64, len: usize) -> Result<(u8, Vec<u8>)> {
        let r = self.request(q, VIRTIO_BLK_T_IN, sector, &[], len)?;
        Ok((r.status, r.data))
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, q: u16, sector: u64, data: &[u8]) -> Result<u8> {
        Ok(self.request(q, VIRTIO_BLK_T_OUT, sector, data, 0)?.status)
    }

    /// Flush; returns the status.
    pub fn flush(&mut self, q: u16) -> Result<u8> {
        Ok(self.request(q, VIRTIO_BLK_T_FLUSH, 0, &[], 0)?.status)
    }

    /// Encodes one discard / write-zeroes segment
    /// (`{sector u64, num_sectors u32, flags u32}`; flag bit 0 = unmap).
    pub fn discard_segment(sector: u64, sectors: u32, unmap: bool) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&u32::from(unmap).to_le_bytes());
        s
    }

    /// Discards `sectors` sectors at `sector` (one segment); returns the status.
    pub fn discard(&mut self, q: u16, sector: u64, sectors: u32) -> Result<u8> {
        let seg = Self::discard_segment(sector, sectors, false);
        Ok(self.request(q, VIRTIO_BLK_T_DISCARD, 0, &seg, 0)?.status)
    }

    /// Zeroes `sectors` sectors at `sector` (one segment, optional unmap); returns the status.
    pub fn write_zeroes(&mut self, q: u16, sector: u64, sectors: u32, unmap: bool) -> Result<u8> {
        let seg = Self::discard_segment(sector, sectors, unmap);
        Ok(self
            .request(q, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0)?
            .status)
    }

    /// GET_ID with a 20-byte buffer; returns (status, id cut at the first NUL).
    pub fn get_id(&mut self, q: u16) -> Result<(u8, Vec<u8>)> {
        let r = self.request(q, VIRTIO_BLK_T_GET_ID, 0, &[], 20)?;
        let mut id = r.data;
        if let Some(p) = id.iter().position(|&b| b == 0) {
            id.truncate(p);
        }
        Ok((r.status, id))
    }

    /// Places `chain` in queue `q`'s descriptor table (entries take free
    /// table slots; see [`RawNext`] for `next`), publishes entry 0 as head,
    /// kicks, and waits up to `timeout` for the used entry with that head.
    /// Returns `Some((head, used_len))`, or `None` on timeout or when the
    /// back-end closed the connection ([`TestVmm::peer_closed`]); the slots
    /// then stay reserved until the device returns the head. Other used entries
    /// seen meanwhile are consumed (unknown ids count as `stray_used`).
    pub fn submit_raw(
        &mut self,
        q: u16,
        chain: &[RawDesc],
        timeout: Duration,
    ) -> Result<Option<(u16, u32)>> {
        self.vq(q)?;
        let qi = usize::from(q);
        let vq = &mut self.queues[qi];
        ensure!(!chain.is_empty(), "empty chain");
        ensure!(
            chain.len() <= vq.free.len(),
            "queue {q}: {} descriptors needed, {} free",
            chain.len(),
            vq.free.len()
        );
        let idxs: Vec<u16> = (0..chain.len()).map(|_| vq.free.pop().unwrap()).collect();
        for (i, d) in chain.iter().enumerate() {
            let (flags, next) = resolve_next(d, i, chain.len(), |j| idxs[j]);
            let at = vq.layout.desc + 16 * u64::from(idxs[i]);
            self.mem
                .write(at, &encode_desc(d.addr, d.len, flags, next))?;
        }
        let head = idxs[0];
        vq.chains.insert(head, idxs);
        Self::push_avail(&self.mem, vq, head)?;
        self.notify(qi)?;
        Ok(self.wait_head(qi, head, timeout)?.map(|len| (head, len)))
    }

    /// Runs a pipelined workload on queue `q`; see [`LoadSpec`].
    pub fn run_load(&mut self, q: u16, spec: LoadSpec) -> Result<LoadResult> {
        Ok(self.run_load_multi(&[(q, spec)])?.remove(0))
    }

    /// Runs one workload per (distinct) queue concurrently, from this thread;
    /// returns one result per job, in order.
    pub fn run_load_multi(&mut self, jobs: &[(u16, LoadSpec)]) -> Result<Vec<LoadResult>> {
        struct Slot {
            hdr: u64,
            data: u64,
            busy: Option<(u16, Instant, u64, bool)>,
        }
        struct Job {
            q: usize,
            spec: LoadSpec,
            rng: Rng,
            slots: Vec<Slot>,
            by_head: HashMap<u16, usize>,
            submitted: u64,
            next_block: u64,
            region: (u64, u64),
            blocks: u64,
            start: Instant,
            deadline: Option<Instant>,
            res: LoadResult,
            scratch: Vec<u8>,
        }
        let capacity = self.config.capacity;
        let mut st: Vec<Job> = Vec::new();
        for (q, spec) in jobs {
            self.vq(*q)?;
            let qi = usize::from(*q);
            ensure!(st.iter().all(|j| j.q != qi), "queue {q} used by two jobs");
            let bs = spec.block_size;
            ensure!(
                bs > 0 && bs % SECTOR_SIZE as usize == 0,
                "block_size must be a multiple of 512"
            );
            ensure!(spec.depth > 0, "depth must be > 0");
            ensure!(
                spec.count.is_some() || spec.duration.is_some(),
                "need count or duration"
            );
            let per_req = self.blk_segments(0, Some((0, bs)), None).len();
            ensure!(
                spec.depth * per_req <= self.queues[qi].free.len(),
                "depth {} x {per_req} descriptors exceeds free descriptors of queue {q} ({})",
                spec.depth,
                self.queues[qi].free.len()
            );
            let region = spec.region.unwrap_or((0, capacity));
            let bsec = bs as u64 / SECTOR_SIZE;
            let blocks = region.1 / bsec;
            ensure!(
                blocks > 0,
                "region {region:?} smaller than one block of {bs} bytes"
            );
            let mut slots = Vec::new();
            for _ in 0..spec.depth {
                let hdr = self.alloc.alloc(32, 16).context("out of guest memory")?;
                let data = self.alloc(bs)?;
                let init = pattern(spec.seed ^ 0x5EED, hdr, bs);
                self.mem.write(data, &init)?;
                slots.push(Slot {
                    hdr,
                    data,
                    busy: None,
                });
            }
            st.push(Job {
                q: qi,
                spec: spec.clone(),
                rng: Rng(spec.seed),
                slots,
                by_head: HashMap::new(),
                submitted: 0,
                next_block: 0,
                region,
                blocks,
                start: Instant::now(),
                deadline: None,
                res: LoadResult::default(),
                scratch: vec![0u8; bs],
            });
        }

        let fill = |s: &mut Self, j: &mut Job| -> Result<()> {
            for si in 0..j.slots.len() {
                if j.slots[si].busy.is_some() {
                    continue;
                }
                if j.spec.count.is_some_and(|c| j.submitted >= c)
                    || j.deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break;
                }
                let bs = j.spec.block_size;
                let bsec = bs as u64 / SECTOR_SIZE;
                let block = if j.spec.random {
                    j.rng.next() % j.blocks
                } else {
                    let b = j.next_block;
                    j.next_block = (b + 1) % j.blocks;
                    b
                };
                let sector = j.region.0 + block * bsec;
                let is_read = match j.spec.op {
                    LoadOp::Read => true,
                    LoadOp::Write => false,
                    LoadOp::Mixed { read_percent } => j.rng.next() % 100 < u64::from(read_percent),
                };
                let (hdr, data) = (j.slots[si].hdr, j.slots[si].data);
                let t = if is_read {
                    VIRTIO_BLK_T_IN
                } else {
                    VIRTIO_BLK_T_OUT
                };
                s.write_header(hdr, t, sector)?;
                if is_read {
                    if j.spec.data_seed.is_some() {
                        s.mem.fill(data, bs, POISON)?;
                    }
                } else if let Some(seed) = j.spec.data_seed {
                    fill_pattern(&mut j.scratch, seed, sector);
                    s.mem.write(data, &j.scratch)?;
                }
                let segs = if is_read {
                    s.blk_segments(hdr, None, Some((data, bs)))
                } else {
                    s.blk_segments(hdr, Some((data, bs)), None)
                };
                let head = s.add_chain(j.q, &segs)?;
                j.slots[si].busy = Some((head, Instant::now(), sector, is_read));
                j.by_head.insert(head, si);
                j.submitted += 1;
            }
            s.notify(j.q)
        };

        let t0 = Instant::now();
        for j in st.iter_mut() {
            j.start = t0;
            j.deadline = j.spec.duration.map(|d| t0 + d);
            fill(self, j)?;
        }
        loop {
            let active: Vec<usize> = st
                .iter()
                .filter(|j| !j.by_head.is_empty())
                .map(|j| j.q)
                .collect();
            if active.is_empty() {
                break;
            }
            let got = self.wait_any(&active, Instant::now() + self.opts.io_timeout)?;
            if got.is_empty() {
                let inflight: usize = st.iter().map(|j| j.by_head.len()).sum();
                ensure!(
                    !self.peer_closed,
                    "run_load: back-end closed the connection ({inflight} requests in flight)"
                );
                bail!(
                    "run_load: no completion within {:?} ({inflight} requests in flight)",
                    self.opts.io_timeout
                );
            }
            let now = Instant::now();
            let mut touched = Vec::new();
            for (q, u) in got {
                let Some(j) = st.iter_mut().find(|j| j.q == q) else {
                    continue;
                };
                let Some(si) = u16::try_from(u.id).ok().and_then(|h| j.by_head.remove(&h)) else {
                    continue;
                };
                let (_, started, sector, is_read) = j.slots[si].busy.take().unwrap();
                let bs = j.spec.block_size;
                j.res
                    .latencies_us
                    .push(now.duration_since(started).as_micros() as u64);
                j.res.completed += 1;
                j.res.elapsed = now.duration_since(j.start);
                if is_read {
                    j.res.reads += 1;
                } else {
                    j.res.writes += 1;
                }
                let status = self.mem.read(j.slots[si].hdr + 16, 1)?[0];
                if status != VIRTIO_BLK_S_OK {
                    j.res.errors += 1;
                    j.res.first_error.get_or_insert((sector, status));
                } else {
                    j.res.bytes += bs as u64;
                    if let (true, Some(seed)) = (is_read, j.spec.data_seed) {
                        let got = self.mem.read(j.slots[si].data, bs)?;
                        fill_pattern(&mut j.scratch, seed, sector);
                        if got != j.scratch {
                            j.res.mismatches += 1;
                        }
                    }
                }
                if !touched.contains(&q) {
                    touched.push(q);
                }
            }
            for q in touched {
                let ji = st.iter().position(|j| j.q == q).unwrap();
                fill(self, &mut st[ji])?;
            }
        }
        let mut out = Vec::new();
        for j in st {
            for s in &j.slots {
                self.alloc.release(s.hdr);
                self.alloc.release(s.data);
            }
            out.push(j.res);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Hostile vhost-user sessions

/// One malformed vhost-user message for [`hostile_session`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostileCase {
    /// Fresh connection: `SET_FEATURES` header claiming a 256 MiB body, 64 bytes sent.
    OversizedHeader,
    /// Fresh connection: `SET_FEATURES` header (size 8) + 4 body bytes, then close.
    TruncatedMessage,
    /// Fresh connection: `GET_FEATURES` with version 0 and reserved flag bits set.
    BadVersionFlags,
    /// After negotiation: request code 0xdead with an 8-byte body.
    UnknownRequest,
    /// After negotiation: `SET_FEATURES` with all 64 bits set.
    SetFeaturesUnknownBits,
    /// After negotiation: `SET_MEM_TABLE` describing 2 regions with 1 fd attached.
    MemTableMoreRegionsThanFds,
    /// After negotiation: `SET_MEM_TABLE` with `num_regions` = 0, no fds.
    MemTableZeroRegions,
    /// After negotiation: `SET_MEM_TABLE` claiming 8 regions, payload and fds for 1.
    MemTablePayloadMismatch,
    /// After negotiation: one region with `memory_size` 0.
    MemTableRegionZeroSize,
    /// After negotiation: one region whose guest address + size overflows u64.
    MemTableRegionOverflow,
    /// After negotiation: one 1 TiB region backed by a 1 MiB memfd; if
    /// accepted, queue 0's rings are then placed beyond the end of the file
    /// and kicked (a back-end that does not check the fd size gets SIGBUS).
    MemTableRegionBeyondFile,
    /// After a valid memory table: `SET_VRING_NUM` for vring index 1024.
    VringNumIndexOutOfRange,
    /// After a valid memory table: `SET_VRING_NUM` for vring index u32::MAX.
    VringNumIndexU32Max,
    /// After a valid memory table: `SET_VRING_NUM` size 0.
    VringNumZero,
    /// After a valid memory table: `SET_VRING_NUM` size 100.
    VringNumNotPowerOfTwo,
    /// After a valid memory table: `SET_VRING_NUM` size 65536 (> u16).
    VringNumTooLarge,
    /// After a valid memory table and `SET_VRING_NUM(0, 16)`: `SET_VRING_ADDR`
    /// with addresses outside every region; if accepted, the ring is then
    /// started (base, call, kick, enable) and kicked.
    VringAddrOutsideMemory,
    /// After a valid memory table: `SET_VRING_KICK` for vring index 200 (with an fd).
    VringKickIndexOutOfRange,
    /// After a valid memory table: `SET_VRING_KICK` for vring 0 without an fd
    /// and without the "no fd" flag (bit 8).
    VringKickWithoutFd,
    /// After negotiation: `GET_CONFIG` header claiming 4000 config bytes but 12 sent.
    GetConfigOversized,
}

impl HostileCase {
    /// Every case, for iteration.
    pub const ALL: &'static [HostileCase] = &[
        HostileCase::OversizedHeader,
        HostileCase::TruncatedMessage,
        HostileCase::BadVersionFlags,
        HostileCase::UnknownRequest,
        HostileCase::SetFeaturesUnknownBits,
        HostileCase::MemTableMoreRegionsThanFds,
        HostileCase::MemTableZeroRegions,
        HostileCase::MemTablePayloadMismatch,
        HostileCase::MemTableRegionZeroSize,
        HostileCase::MemTableRegionOverflow,
        HostileCase::MemTableRegionBeyondFile,
        HostileCase::VringNumIndexOutOfRange,
        HostileCase::VringNumIndexU32Max,
        HostileCase::VringNumZero,
        HostileCase::VringNumNotPowerOfTwo,
        HostileCase::VringNumTooLarge,
        HostileCase::VringAddrOutsideMemory,
        HostileCase::VringKickIndexOutOfRange,
        HostileCase::VringKickWithoutFd,
        HostileCase::GetConfigOversized,
    ];

    fn stage(self) -> u8 {
        use HostileCase::*;
        match self {
            OversizedHeader | TruncatedMessage | BadVersionFlags => 0,
            UnknownRequest
            | SetFeaturesUnknownBits
            | MemTableMoreRegionsThanFds
            | MemTableZeroRegions
            | MemTablePayloadMismatch
            | MemTableRegionZeroSize
            | MemTableRegionOverflow
            | MemTableRegionBeyondFile
            | GetConfigOversized => 1,
            VringNumIndexOutOfRange
            | VringNumIndexU32Max
            | VringNumZero
            | VringNumNotPowerOfTwo
            | VringNumTooLarge
            | VringAddrOutsideMemory
            | VringKickIndexOutOfRange
            | VringKickWithoutFd => 2,
        }
    }
}

/// How the back-end reacted to the hostile message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostileOutcome {
    /// The back-end closed (or reset) the connection.
    Closed,
    /// The back-end sent a reply: its request code, flags and body. For
    /// messages sent with `NEED_REPLY` (when `REPLY_ACK` was negotiated) the
    /// body is a u64: 0 = accepted, anything else = rejected.
    Reply {
        /// Request code of the reply.
        request: u32,
        /// Header flags of the reply.
        flags: u32,
        /// Reply body.
        payload: Vec<u8>,
    },
    /// Nothing within the wait (500 ms) and the connection is still open.
    NoReply,
}

impl HostileOutcome {
    /// True if the back-end replied with a REPLY_ACK value of 0 (it accepted the message).
    pub fn accepted(&self) -> bool {
        matches!(self, HostileOutcome::Reply { payload, .. } if payload.len() == 8 && payload.iter().all(|&b| b == 0))
    }
}

const REQ_GET_FEATURES: u32 = 1;
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_MEM_TABLE: u32 = 5;
const REQ_SET_VRING_NUM: u32 = 8;
const REQ_SET_VRING_ADDR: u32 = 9;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_GET_CONFIG: u32 = 24;
const HOSTILE_USER_ADDR: u64 = 0x7e00_0000_0000;

fn raw_header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&request.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v
}

fn raw_msg(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut v = raw_header(request, flags, body.len() as u32);
    v.extend_from_slice(body);
    v
}

fn mem_region_bytes(gpa: u64, size: u64, uaddr: u64, offset: u64) -> Vec<u8> {
    [gpa, size, uaddr, offset]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// Sends `data` on a stream socket with `fds` attached to the first byte.
fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut off = 0;
    let mut first = true;
    while off < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[off..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - off,
        };
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: an all-zero msghdr is a valid "no name, no control" value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at a zeroed, 8-byte aligned buffer of
            // CMSG_SPACE(fd_bytes) bytes, so the first header and its data fit.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr() as *const u8,
                    libc::CMSG_DATA(c),
                    fd_bytes as usize,
                );
            }
        }
        // SAFETY: `msg` references live buffers (iov, control) for the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += n as usize;
        first = false;
    }
    Ok(())
}

fn recv_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: writes at most `buf.len() - off` bytes into `buf[off..]`.
        let n = unsafe {
            libc::recv(
                fd,
                buf[off..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - off,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        off += n as usize;
    }
    Ok(off)
}

fn read_outcome(fd: RawFd, wait: Duration) -> Result<HostileOutcome> {
    if !poll_fds(&[fd], wait)?[0] {
        return Ok(HostileOutcome::NoReply);
    }
    let mut hdr = [0u8; 12];
    match recv_exact(fd, &mut hdr) {
        Ok(12) => {}
        Ok(_) => return Ok(HostileOutcome::Closed),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(HostileOutcome::Closed),
        Err(e) => return Err(e).context("reading reply"),
    }
    let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; size.min(4096)];
    let n = recv_exact(fd, &mut payload).unwrap_or(0);
    payload.truncate(n);
    Ok(HostileOutcome::Reply {
        request,
        flags,
        payload,
    })
}

fn memfd(size: u64) -> Result<File> {
    // SAFETY: valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"keel-hostile".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// Starts queue 0 with rings at `ring_uaddr` (front-end addresses) and kicks it.
fn start_ring_and_kick(fe: &mut Frontend, ring_uaddr: u64) {
    let cfg = VringConfigData {
        queue_max_size: 16,
        queue_size: 16,
        flags: 0,
        desc_table_addr: ring_uaddr,
        avail_ring_addr: ring_uaddr + 0x1000,
        used_ring_addr: ring_uaddr + 0x2000,
        log_addr: None,
    };
    let (Ok(kick), Ok(call)) = (
        EventFd::new(libc::EFD_NONBLOCK),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return;
    };
    let _ = fe.set_vring_num(0, 16);
    let _ = fe.set_vring_addr(0, &cfg);
    let _ = fe.set_vring_base(0, 0);
    let _ = fe.set_vring_call(0, &call);
    let _ = fe.set_vring_kick(0, &kick);
    let _ = fe.set_vring_enable(0, true);
    let _ = kick.write(1);
    std::thread::sleep(Duration::from_millis(300));
}

/// Opens a new connection to `socket`, performs the valid prefix the case
/// needs (none; feature/protocol negotiation + `SET_OWNER`; plus a valid
/// 1 MiB memory table), sends the malformed message (with `NEED_REPLY` when
/// `REPLY_ACK` was negotiated and the message has no reply of its own),
/// waits up to 500 ms for a reaction, does the case's follow-up (see
/// [`HostileCase`]), and closes. Errors only on local failures or if the
/// back-end breaks during the valid prefix.
pub fn hostile_session(socket: &Path, case: HostileCase) -> Result<HostileOutcome> {
    use HostileCase::*;
    let mut fe = Frontend::connect(socket, 8)
        .map_err(|e| anyhow!("connect to {}: {e}", socket.display()))?;
    let fd = fe.as_raw_fd();
    set_socket_timeouts(fd, Duration::from_secs(5))?;
    let stage = case.stage();
    let mut need_reply = 0u32;
    let mut _keep: Vec<File> = Vec::new();
    let mut keep_ev: Vec<EventFd> = Vec::new();
    if stage >= 1 {
        let offered = fe
            .get_features()
            .map_err(|e| anyhow!("GET_FEATURES: {e}"))?;
        if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let pf = fe
                .get_protocol_features()
                .map_err(|e| anyhow!("GET_PROTOCOL_FEATURES: {e}"))?;
            let acked = pf
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK);
            fe.set_protocol_features(acked)
                .map_err(|e| anyhow!("SET_PROTOCOL_FEATURES: {e}"))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                need_reply = VhostUserHeaderFlag::NEED_REPLY.bits();
            }
        }
        fe.set_owner().map_err(|e| anyhow!("SET_OWNER: {e}"))?;
        let f = offered & (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES));
        fe.set_features(f)
            .map_err(|e| anyhow!("SET_FEATURES: {e}"))?;
    }
    if stage >= 2 {
        let m = memfd(1 << 20)?;
        // `..Default::default()` covers the fields of vhost's optional `xen` feature.
        #[allow(clippy::needless_update)]
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: HOSTILE_USER_ADDR,
            mmap_offset: 0,
            mmap_handle: m.as_raw_fd(),
            ..Default::default()
        };
        fe.set_mem_table(&[region])
            .map_err(|e| anyhow!("SET_MEM_TABLE: {e}"))?;
        _keep.push(m);
        if case == VringAddrOutsideMemory {
            fe.set_vring_num(0, 16)
                .map_err(|e| anyhow!("SET_VRING_NUM: {e}"))?;
        }
    }

    let flags = 1 | need_reply;
    let vring_state = |index: u32, num: u32| -> Vec<u8> {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        b
    };
    let mut fds: Vec<RawFd> = Vec::new();
    let mut close_after_send = false;
    let bytes = match case {
        OversizedHeader => {
            let mut v = raw_header(REQ_SET_FEATURES, 1, 0x1000_0000);
            v.extend_from_slice(&[0u8; 64]);
            v
        }
        TruncatedMessage => {
            close_after_send = true;
            let mut v = raw_header(REQ_SET_FEATURES, 1, 8);
            v.extend_from_slice(&[0u8; 4]);
            v
        }
        BadVersionFlags => raw_header(REQ_GET_FEATURES, 0xf0, 0),
        UnknownRequest => raw_msg(0xdead, flags, &[0u8; 8]),
        SetFeaturesUnknownBits => raw_msg(REQ_SET_FEATURES, flags, &u64::MAX.to_le_bytes()),
        MemTableMoreRegionsThanFds
        | MemTableZeroRegions
        | MemTablePayloadMismatch
        | MemTableRegionZeroSize
        | MemTableRegionOverflow
        | MemTableRegionBeyondFile => {
            let m = memfd(1 << 20)?;
            let mut body = Vec::new();
            let (n, regions): (u32, Vec<Vec<u8>>) = match case {
                MemTableMoreRegionsThanFds => (
                    2,
                    vec![
                        mem_region_bytes(0, 1 << 19, HOSTILE_USER_ADDR, 0),
                        mem_region_bytes(1 << 19, 1 << 19, HOSTILE_USER_ADDR + (1 << 19), 1 << 19),
                    ],
                ),
                MemTableZeroRegions => (0, vec![]),
                MemTablePayloadMismatch => {
                    (8, vec![mem_region_bytes(0, 1 << 20, HOSTILE_USER_ADDR, 0)])
                }
                MemTableRegionZeroSize => (1, vec![mem_region_bytes(0, 0, HOSTILE_USER_ADDR, 0)]),
                MemTableRegionOverflow => (
                    1,
                    vec![mem_region_bytes(
                        u64::MAX - 0xfff,
                        1 << 20,
                        HOSTILE_USER_ADDR,
                        0,
                    )],
                ),
                _ => (1, vec![mem_region_bytes(0, 1 << 40, HOSTILE_USER_ADDR, 0)]),
            };
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            for r in regions {
                body.extend_from_slice(&r);
            }
            if case != MemTableZeroRegions {
                fds.push(m.as_raw_fd());
            }
            _keep.push(m);
            raw_msg(REQ_SET_MEM_TABLE, flags, &body)
        }
        VringNumIndexOutOfRange => raw_msg(REQ_SET_VRING_NUM, flags, &vring_state(1024, 16)),
        VringNumIndexU32Max => raw_msg(REQ_SET_VRING_NUM, flags, &vring_state(u32::MAX, 16)),
        VringNumZero => raw_msg(REQ_SET_VRING_NUM, flags, &vring_state(0, 0)),
        VringNumNotPowerOfTwo => raw_msg(REQ_SET_VRING_NUM, flags, &vring_state(0, 100)),
        VringNumTooLarge => raw_msg(REQ_SET_VRING_NUM, flags, &vring_state(0, 65536)),
        VringAddrOutsideMemory => {
            let outside = HOSTILE_USER_ADDR + (64 << 20);
            let mut body = Vec::new();
            body.extend_from_slice(&0u32.to_le_bytes()); // index
            body.extend_from_slice(&0u32.to_le_bytes()); // flags
            for a in [outside, outside + 0x2000, outside + 0x1000, 0] {
                // descriptor, used, available, log
                body.extend_from_slice(&a.to_le_bytes());
            }
            raw_msg(REQ_SET_VRING_ADDR, flags, &body)
        }
        VringKickIndexOutOfRange => {
            let e = EventFd::new(libc::EFD_NONBLOCK)?;
            fds.push(e.as_raw_fd());
            keep_ev.push(e);
            raw_msg(REQ_SET_VRING_KICK, flags, &200u64.to_le_bytes())
        }
        VringKickWithoutFd => raw_msg(REQ_SET_VRING_KICK, flags, &0u64.to_le_bytes()),
        GetConfigOversized => {
            let mut body = Vec::new();
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(&4000u32.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            let mut v = raw_header(REQ_GET_CONFIG, 1, 4012);
            v.extend_from_slice(&body);
            v
        }
    };

    match send_with_fds(fd, &bytes, &fds) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(HostileOutcome::Closed)
        }
        Err(e) => return Err(e).context("sending hostile message"),
    }
    if close_after_send {
        // SAFETY: shuts down the write side of our own connected socket.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    }
    let outcome = read_outcome(fd, Duration::from_millis(500))?;
    if outcome != HostileOutcome::Closed {
        match case {
            MemTableRegionBeyondFile => {
                start_ring_and_kick(&mut fe, HOSTILE_USER_ADDR + (64 << 20))
            }
            VringAddrOutsideMemory => start_ring_and_kick(&mut fe, HOSTILE_USER_ADDR + (64 << 20)),
            _ => {}
        }
    }
    drop(fe);
    drop(keep_ev);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};

    #[test]
    fn alloc_first_fit_and_merge() {
        let mut a = Alloc::new(4096, 4096 + 65536);
        let x = a.alloc(100, 16).unwrap();
        let y = a.alloc(5000, 4096).unwrap();
        let z = a.alloc(16, 16).unwrap();
        assert_eq!(x, 4096);
        assert_eq!(y % 4096, 0);
        assert!(z >= x + 112 && (z + 16 <= y || z >= y + 5008));
        a.release(y);
        a.release(x);
        a.release(z);
        assert_eq!(a.free.len(), 1, "{:?}", a.free);
        assert_eq!(a.free.get(&4096), Some(&65536));
        assert!(a.alloc(65536, 16).is_some());
        assert!(a.alloc(16, 16).is_none());
    }

    #[test]
    fn need_event_matches_spec() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 2));
        assert!(need_event(2, 3, 2));
        assert!(need_event(0xffff, 1, 0xfffe));
    }

    #[test]
    fn raw_table_encoding() {
        let t = RawDesc::encode_table(&[RawDesc::ro(0x1000, 16), RawDesc::wo(0x2000, 1)]);
        assert_eq!(t.len(), 32);
        assert_eq!(u16::from_le_bytes([t[12], t[13]]), VIRTQ_DESC_F_NEXT);
        assert_eq!(u16::from_le_bytes([t[14], t[15]]), 1);
        assert_eq!(u16::from_le_bytes([t[28], t[29]]), VIRTQ_DESC_F_WRITE);
    }

    #[test]
    fn pattern_is_per_sector() {
        let a = pattern(7, 10, 1024);
        let b = pattern(7, 11, 512);
        assert_eq!(&a[512..], &b[..]);
        assert_ne!(&a[..512], &b[..]);
    }

    // --- qemu-storage-daemon reference back-end -------------------------

    const DISK: u64 = 64 << 20;

    struct Qsd {
        child: Child,
        sock: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Drop for Qsd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Qsd {
        fn alive(&mut self) -> bool {
            matches!(self.child.try_wait(), Ok(None))
        }
    }

    fn qsd() -> Option<Qsd> {
        if Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("qemu-storage-daemon not installed; skipping");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(DISK).unwrap();
        let sock = dir.path().join("vhost.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={}", img.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
                sock.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut q = Qsd {
            child,
            sock,
            _dir: dir,
        };
        let t0 = Instant::now();
        while !q.sock.exists() {
            assert!(q.alive(), "qemu-storage-daemon exited early");
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "qsd socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(q)
    }

    fn opts() -> VmmOptions {
        VmmOptions {
            num_queues: 2,
            ..Default::default()
        }
    }

    #[test]
    fn qsd_basic_io() {
        let Some(d) = qsd() else { return };
        let mut vmm = TestVmm::connect(&d.sock, opts()).unwrap();
        let cfg = vmm.config();
        eprintln!(
            "qsd device features {:#x}, negotiated {:#x}, protocol offered {:#x} acked {:#x}, max queues {}",
            vmm.device_features(),
            vmm.features(),
            vmm.device_protocol_features(),
            vmm.protocol_features(),
            vmm.max_queues()
        );
        eprintln!("qsd config {cfg:?}");
        assert_eq!(cfg.capacity, DISK / SECTOR_SIZE);
        assert_eq!(cfg.num_queues, 2);

        for (i, &sector) in [0u64, 1, 8, 1000, cfg.capacity - 8].iter().enumerate() {
            for q in 0..2 {
                let data = pattern(i as u64 * 2 + q as u64, sector, 4096);
                assert_eq!(vmm.write(q, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
                let (st, back) = vmm.read(q ^ 1, sector, 4096).unwrap();
                assert_eq!(st, VIRTIO_BLK_S_OK);
                assert!(back == data, "data mismatch at sector {sector}");
            }
        }
        // Large request (split at size_max if advertised).
        let big = pattern(99, 2048, 1 << 20);
        assert_eq!(vmm.write(0, 2048, &big).unwrap(), VIRTIO_BLK_S_OK);
        assert!(vmm.read(1, 2048, 1 << 20).unwrap().1 == big);

        assert_eq!(vmm.flush(0).unwrap(), VIRTIO_BLK_S_OK);

        assert_eq!(
            vmm.write_zeroes(0, 2048, 16, false).unwrap(),
            VIRTIO_BLK_S_OK
        );
        let (st, z) = vmm.read(0, 2048, 8192).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(z.iter().all(|&b| b == 0));
        assert!(vmm.read(0, 2064, 512).unwrap().1 == big[8192..8704]);

        let st = vmm.discard(0, 4096, 64).unwrap();
        eprintln!("qsd discard status {st}");
        assert!(st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_UNSUPP);

        let (st, id) = vmm.get_id(0).unwrap();
        eprintln!(
            "qsd get_id status {st} id {:?}",
            String::from_utf8_lossy(&id)
        );
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(!id.is_empty());

        // Beyond capacity: IOERR.
        let (st, _) = vmm.read(0, cfg.capacity, 512).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        let (st, _) = vmm.read(0, cfg.capacity - 1, 1024).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_IOERR);

        // Unknown request type.
        let r = vmm.request(0, 0x7777, 0, &[], 0).unwrap();
        eprintln!("qsd unknown request status {}", r.status);
        assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP);
        assert!(vmm.alive());
        eprintln!("stats {:?}", vmm.stats());
    }

    #[test]
    fn qsd_load() {
        let Some(d) = qsd() else { return };
        for event_idx in [false, true] {
            let mut vmm = TestVmm::connect(
                &d.sock,
                VmmOptions {
                    event_idx,
                    ..opts()
                },
            )
            .unwrap();
            assert_eq!(vmm.has_feature(VIRTIO_RING_F_EVENT_IDX), event_idx);
            // Sequential write of a region with a pattern, then verified random reads.
            let region = Some((0, 8192));
            let w = vmm
                .run_load(
                    0,
                    LoadSpec {
                        op: LoadOp::Write,
                        random: false,
                        region,
                        count: Some(1024),
                        data_seed: Some(42),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!((w.completed, w.errors), (1024, 0));
            let r = vmm
                .run_load(
                    1,
                    LoadSpec {
                        region,
                        count: Some(1000),
                        data_seed: Some(42),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!((r.completed, r.errors, r.mismatches), (1000, 0, 0));
            eprintln!(
                "event_idx={event_idx}: write {:.0} IOPS, read {:.0} IOPS p50 {} us p99 {} us; {:?}",
                w.iops(),
                r.iops(),
                r.percentile_us(50.0),
                r.percentile_us(99.0),
                vmm.stats()
            );
            // Both queues at once, mixed, time-limited.
            let res = vmm
                .run_load_multi(&[
                    (
                        0,
                        LoadSpec {
                            op: LoadOp::Mixed { read_percent: 70 },
                            region: Some((16384, 65536)),
                            count: None,
                            duration: Some(Duration::from_millis(300)),
                            ..Default::default()
                        },
                    ),
                    (
                        1,
                        LoadSpec {
                            region,
                            depth: 32,
                            count: Some(2000),
                            data_seed: Some(42),
                            ..Default::default()
                        },
                    ),
                ])
                .unwrap();
            assert!(res[0].completed > 0 && res[0].errors == 0);
            assert_eq!(
                (res[1].completed, res[1].errors, res[1].mismatches),
                (2000, 0, 0)
            );
            assert_eq!(vmm.stats().stray_used, 0);
        }
    }

    #[test]
    fn qsd_raw_chains() {
        let Some(mut d) = qsd() else { return };
        let o = VmmOptions {
            indirect_desc: true,
            ..Default::default()
        };
        let mut vmm = TestVmm::connect(&d.sock, o.clone()).unwrap();
        let data = pattern(5, 0, 512);
        assert_eq!(vmm.write(0, 0, &data).unwrap(), VIRTIO_BLK_S_OK);
        // Well-formed raw read, direct and through an indirect table.
        let hdr = vmm.alloc(32).unwrap();
        let buf = vmm.alloc(512).unwrap();
        vmm.write_mem(hdr, &[0u8; 16]).unwrap();
        for indirect in [false, true] {
            if indirect && !vmm.has_feature(VIRTIO_RING_F_INDIRECT_DESC) {
                continue;
            }
            vmm.write_mem(hdr + 16, &[STATUS_UNWRITTEN]).unwrap();
            vmm.write_mem(buf, &[POISON; 512]).unwrap();
            let descs = [
                RawDesc::ro(hdr, 16),
                RawDesc::wo(buf, 512),
                RawDesc::wo(hdr + 16, 1),
            ];
            let r = if indirect {
                let table = RawDesc::encode_table(&descs);
                let t = vmm.alloc(table.len()).unwrap();
                vmm.write_mem(t, &table).unwrap();
                let chain = [RawDesc::indirect(t, table.len() as u32)];
                vmm.submit_raw(0, &chain, Duration::from_secs(5)).unwrap()
            } else {
                vmm.submit_raw(0, &descs, Duration::from_secs(5)).unwrap()
            };
            assert!(
                matches!(r, Some((_, n)) if n >= 1),
                "indirect={indirect}: {r:?}"
            );
            assert_eq!(vmm.read_mem(hdr + 16, 1).unwrap()[0], VIRTIO_BLK_S_OK);
            assert!(
                vmm.read_mem(buf, 512).unwrap() == data,
                "indirect={indirect}"
            );
        }
        drop(vmm);

        // Malformed chains, each on a fresh session: qsd may answer or drop
        // the session; the daemon must survive and serve the next session.
        type Build = fn(u64, u64, u64) -> Vec<RawDesc>;
        let cases: &[(&str, Build)] = &[
            ("read-only status", |h, b, _| {
                vec![
                    RawDesc::ro(h, 16),
                    RawDesc::wo(b, 512),
                    RawDesc::ro(h + 16, 1),
                ]
            }),
            ("data outside guest memory", |h, _, m| {
                vec![
                    RawDesc::ro(h, 16),
                    RawDesc::wo(m + 4096, 512),
                    RawDesc::wo(h + 16, 1),
                ]
            }),
            ("descriptor loop", |h, b, _| {
                let mut d0 = RawDesc::ro(h, 16);
                d0.flags |= VIRTQ_DESC_F_NEXT;
                d0.next = RawNext::Entry(1);
                let mut d1 = RawDesc::ro(b, 512);
                d1.flags |= VIRTQ_DESC_F_NEXT;
                d1.next = RawNext::Entry(0);
                vec![d0, d1]
            }),
            ("next index out of range", |h, b, _| {
                let mut l = RawDesc::wo(b, 512);
                l.flags |= VIRTQ_DESC_F_NEXT;
                l.next = RawNext::Table(4000);
                vec![RawDesc::ro(h, 16), l]
            }),
            ("header only", |h, _, _| vec![RawDesc::ro(h, 16)]),
        ];
        for (name, build) in cases {
            let mut vmm = TestVmm::connect(&d.sock, o.clone()).unwrap();
            let hdr = vmm.alloc(32).unwrap();
            let buf = vmm.alloc(512).unwrap();
            vmm.write_mem(hdr + 16, &[STATUS_UNWRITTEN]).unwrap();
            let chain = build(hdr, buf, vmm.mem_size());
            let t0 = Instant::now();
            let r = vmm.submit_raw(0, &chain, Duration::from_secs(2)).unwrap();
            eprintln!(
                "qsd raw {name}: {r:?} after {:?}, status byte {:#x}, peer closed {}, alive {}",
                t0.elapsed(),
                vmm.read_mem(hdr + 16, 1).unwrap()[0],
                vmm.peer_closed(),
                vmm.alive()
            );
            drop(vmm);
            assert!(d.alive(), "qsd died after {name}");
            let mut vmm = TestVmm::connect(&d.sock, o.clone()).unwrap();
            assert!(vmm.read(0, 0, 512).unwrap() == (VIRTIO_BLK_S_OK, data.clone()));
        }
    }

    #[test]
    fn qsd_hostile_messages() {
        if qsd().is_none() {
            return;
        }
        // A fresh daemon per case, so every case starts from a clean state.
        // Cases that take qemu-storage-daemon down are reported, not failed:
        // that is a finding about qsd (7.2), not about this driver.
        let mut crashed = Vec::new();
        for &case in HostileCase::ALL {
            let mut d = qsd().unwrap();
            let outcome = hostile_session(&d.sock, case)
                .unwrap_or_else(|e| panic!("hostile_session({case:?}) failed locally: {e:#}"));
            eprintln!("qsd hostile {case:?}: {outcome:?}");
            std::thread::sleep(Duration::from_millis(100));
            if !d.alive() {
                let status = d.child.try_wait().ok().flatten();
                crashed.push((case, status));
                continue;
            }
            let mut vmm = TestVmm::connect(&d.sock, VmmOptions::default())
                .unwrap_or_else(|e| panic!("connect after {case:?}: {e:#}"));
            let data = pattern(3, 8, 4096);
            assert_eq!(
                vmm.write(0, 8, &data).unwrap(),
                VIRTIO_BLK_S_OK,
                "after {case:?}"
            );
            assert!(vmm.read(0, 8, 4096).unwrap().1 == data, "after {case:?}");
        }
        eprintln!("hostile cases that killed qemu-storage-daemon: {crashed:?}");
    }
}
