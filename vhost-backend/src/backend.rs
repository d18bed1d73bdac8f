//! The vhost-user-blk backend: turns guest requests into wire operations and completions back
//! into used-ring entries.
//!
//! Threads: the vring thread (owned by `vhost-user-backend`) pops every available chain,
//! parses it and submits its wire operations without waiting, so the guest's queue depth
//! reaches the network. Completions run on the tokio runtime: they write read data and the
//! status byte into guest memory and publish the request.
//!
//! **Publication is in order** (per queue, in the order chains were popped). The
//! `vhost-user-backend` crate has no inflight-descriptor region, so if keel-vhost dies, QEMU
//! restarts the ring at the used index it finds in guest memory; publishing in order makes
//! "everything before the used index is complete, everything after is not" exactly true, so
//! the restarted backend re-executes precisely the requests whose completion the guest never
//! saw. See `docs/data-path.md`.
//!
//! **Capacity can grow at run time** ([`KeelBlk::set_capacity`]): the parser's range checks and
//! the config space (`GET_CONFIG`) use the current value, and
//! [`KeelBlk::notify_config_change`] tells the frontend over the backend request channel (see
//! [`crate::config_change`]).
//!
//! When a ring is stopped (GET_VRING_BASE, reset, frontend gone), the backend waits a bounded
//! time for requests in flight; any still running after that are abandoned: their late
//! completions touch neither guest memory nor the ring, and the ring's next-avail index is
//! rewound to the used index so the frontend re-offers them when it restarts the ring.
//!
//! **A broken avail ring ends the session** ([`ring_broken`]): a guest whose `avail.idx` runs
//! more than the queue size ahead, or whose avail ring names a descriptor head the table does
//! not have, could never see that request complete; keel-vhost logs it once and closes the
//! vhost-user connection (as qemu-storage-daemon does), so the frontend sees the backend gone
//! instead of a disk that merely looks slow. The daemon then serves the next frontend.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use keel_proto::{Op, ReqFlags, Status, VolumeId};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::client::{Outcome, VolumeClient, WireOp, MAX_WIRE_DATA};
use crate::config_change::{ConfigChannel, SocketSnapshot};
use crate::virtio::request::{self, BlkRequest, Desc, Kind, MAX_DESCRIPTORS};
use crate::virtio::spec::*;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What the guest is shown.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub volume: VolumeId,
    /// The capacity at first (a multiple of 512); see [`KeelBlk::set_capacity`].
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// Logical block size offered (`VIRTIO_BLK_F_BLK_SIZE`): 512 or 4096. Request offsets are
    /// 512-byte sectors either way.
    pub block_size: u32,
    pub num_queues: u16,
    pub queue_size: u16,
    /// How long a stopping ring waits for requests in flight.
    pub drain_timeout: Duration,
    /// After a queue is empty, how long the vring thread keeps looking at its avail ring
    /// (guest notifications still off) before it turns them on and sleeps. Zero: never.
    pub poll: Duration,
}

/// The GET_ID answer: the volume id in hex, at most 20 bytes.
pub fn serial(volume: VolumeId) -> Vec<u8> {
    let mut s = format!("{:x}", volume.0).into_bytes();
    s.truncate(VIRTIO_BLK_ID_BYTES);
    s
}

#[derive(Default)]
struct Order {
    /// Chains popped and not yet published, in pop order: (head, used length once done).
    entries: VecDeque<(u16, Option<u32>)>,
    /// Sequence number of `entries[0]`.
    front_seq: u64,
    /// Bumped when the ring stops: completions of an older generation are dropped.
    generation: u64,
}

struct QueueState {
    order: Mutex<Order>,
    drained: Condvar,
    vring: Mutex<Option<VringRwLock>>,
}

impl QueueState {
    fn new() -> Self {
        QueueState {
            order: Mutex::new(Order::default()),
            drained: Condvar::new(),
            vring: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vring(&self) -> Option<VringRwLock> {
        self.vring.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A ticket for one popped chain.
#[derive(Clone, Copy)]
struct Ticket {
    queue: usize,
    seq: u64,
    generation: u64,
}

/// The backend request channel of the current frontend (`SET_BACKEND_REQ_FD`).
struct BackendReq {
    /// Kept so the channel stays open; never used to send (see [`crate::config_change`]).
    _backend: Backend,
    /// Where config-change messages go; `None` if the socket could not be found.
    channel: Option<ConfigChannel>,
}

struct Inner {
    cfg: DiskConfig,
    /// The limits with the capacity at creation; [`Inner::limits`] adds the current one.
    base_limits: Limits,
    capacity_sectors: AtomicU64,
    client: VolumeClient,
    /// Sockets open before the frontend connected, to tell its backend request channel apart.
    sockets_before: SocketSnapshot,
    backend_req: Mutex<Option<BackendReq>>,
    /// A config-change message was sent when the frontend (re)started the device.
    announced: AtomicBool,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    queues: Vec<QueueState>,
    /// Bytes of guest data the volume may still take in flight. A guest can queue far more
    /// than memory allows (every queue full of maximal requests), so popping stops when this
    /// runs out and resumes when completions give it back.
    budget: AtomicI64,
    /// Popping stopped for lack of budget; the next refund must wake the vring thread.
    throttled: AtomicBool,
    /// Wakes the vring thread to pop again (registered with the epoll loop as RESUME_EVENT).
    resume: EventFd,
    /// What the guest and the backend did, for diagnosis (see [`KeelBlk::counters`]).
    kicks: AtomicU64,
    requests: AtomicU64,
    /// Shared with the deferred signals (see [`crate::batch`]).
    signals: Arc<AtomicU64>,
    /// An unreadable avail ring was logged (once: a hostile guest may kick forever).
    unreadable_ring_logged: AtomicBool,
    /// The guest broke an avail ring ([`ring_broken`]): the session is over, nothing more is
    /// popped, and the connection is closed as soon as [`Inner::session_end`] is known.
    broken: AtomicBool,
    /// Closes this session's vhost-user connection; given by the daemon once it accepted the
    /// frontend ([`KeelBlk::set_session_end`]).
    session_end: Mutex<Option<ShutdownHandle>>,
}

/// How a guest broke its avail ring; either way the request it made available could never be
/// completed, so the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// `avail.idx` is `pending` entries ahead of the next one to pop, more than the queue
    /// holds: virtio-queue refuses to pop anything (`InvalidAvailRingIndex`).
    AvailIdxAhead { pending: u16 },
    /// The avail entry names descriptor `head`, outside the table: virtio-queue pops it as a
    /// chain with no descriptors and then refuses to put it in the used ring.
    HeadOutOfRange { head: u16 },
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::AvailIdxAhead { pending } => write!(
                f,
                "avail index {pending} entries ahead, more than the queue holds"
            ),
            Broken::HeadOutOfRange { head } => {
                write!(f, "avail entry names descriptor {head}, outside the table")
            }
        }
    }
}

/// Whether a split ring is broken: `avail_idx` is the guest's avail index, `next_avail` the
/// next entry to pop, `size` the queue size and `head` the descriptor index the entry at
/// `next_avail` holds (`None`: not read yet; only the index is checked). An empty ring is
/// never broken; a full one (`size` entries pending) is fine.
pub fn ring_broken(
    avail_idx: u16,
    next_avail: u16,
    size: u16,
    head: Option<u16>,
) -> Option<Broken> {
    let pending = avail_idx.wrapping_sub(next_avail);
    if pending > size {
        return Some(Broken::AvailIdxAhead { pending });
    }
    match head {
        Some(head) if pending > 0 && head >= size => Some(Broken::HeadOutOfRange { head }),
        _ => None,
    }
}

/// The descriptor index in queue `q`'s avail ring entry `at` (taken modulo the size), if the
/// ring can be read there. For the log only: the check uses what virtio-queue popped.
fn avail_entry(q: &Queue, mem: &GuestMemoryMmap, at: u16) -> Option<u16> {
    let slot = at.checked_rem(q.size())?;
    let addr = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(slot))?;
    mem.load::<u16>(addr, Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

/// Totals since the device was created: a guest's kicks (queue events the vring thread
/// handled), the requests it popped, and the interrupts it sent the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub kicks: u64,
    pub requests: u64,
    pub signals: u64,
}

/// In-flight data budget per volume.
pub const BUDGET_BYTES: i64 = 64 << 20;

/// The backend; cheap to clone (one per frontend connection).
#[derive(Clone)]
pub struct KeelBlk {
    inner: Arc<Inner>,
}

impl KeelBlk {
    pub fn new(cfg: DiskConfig, client: VolumeClient) -> std::io::Result<KeelBlk> {
        let base_limits = Limits::new(cfg.capacity_bytes, cfg.read_only);
        let queues = (0..cfg.num_queues).map(|_| QueueState::new()).collect();
        Ok(KeelBlk {
            inner: Arc::new(Inner {
                cfg,
                capacity_sectors: AtomicU64::new(base_limits.capacity_sectors),
                base_limits,
                client,
                sockets_before: SocketSnapshot::take(),
                backend_req: Mutex::new(None),
                announced: AtomicBool::new(false),
                mem: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                queues,
                budget: AtomicI64::new(BUDGET_BYTES),
                throttled: AtomicBool::new(false),
                resume: EventFd::new(libc::EFD_NONBLOCK)?,
                kicks: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                signals: Arc::new(AtomicU64::new(0)),
                unreadable_ring_logged: AtomicBool::new(false),
                broken: AtomicBool::new(false),
                session_end: Mutex::new(None),
            }),
        })
    }

    /// The event id under which [`KeelBlk::resume_fd`] must be registered with the vring
    /// epoll loop (`VringEpollHandler::register_listener`).
    pub fn resume_event(&self) -> u16 {
        self.inner.cfg.num_queues + 1
    }

    /// The eventfd that wakes the vring thread when in-flight budget comes back.
    pub fn resume_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.inner.resume.as_raw_fd()
    }

    /// Stops every ring (the frontend is gone): waits for requests in flight, bounded.
    pub fn shutdown(&self) {
        for q in 0..self.inner.queues.len() {
            self.inner.stop_queue(q);
        }
        // The session is over: let its connection go.
        self.inner
            .session_end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Gives the device the means to end its session (the daemon, once it accepted the
    /// frontend). A ring found broken before this closes the connection now.
    pub fn set_session_end(&self, handle: ShutdownHandle) {
        let mut slot = self
            .inner
            .session_end
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.inner.broken.load(Ordering::SeqCst) {
            handle.shutdown();
        }
        *slot = Some(handle);
    }

    /// The guest broke a ring and the device ended (or is ending) the session.
    pub fn ring_was_broken(&self) -> bool {
        self.inner.broken.load(Ordering::SeqCst)
    }

    /// The capacity the guest is shown, in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_sectors.load(Ordering::Acquire) * SECTOR_SIZE
    }

    /// Changes the capacity (rounded down to whole sectors): requests are checked against it
    /// and `GET_CONFIG` reports it from now on. The guest learns of it through
    /// [`KeelBlk::notify_config_change`] (or when it next reads the config space).
    pub fn set_capacity(&self, bytes: u64) {
        self.inner
            .capacity_sectors
            .store(bytes / SECTOR_SIZE, Ordering::Release);
    }

    /// Sends the frontend a config-change message (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`), on
    /// which QEMU re-reads the config space and interrupts the guest. `Ok(false)` if there is
    /// no channel to send it on (no frontend, or one without `BACKEND_REQ`).
    pub fn notify_config_change(&self) -> std::io::Result<bool> {
        let req = self
            .inner
            .backend_req
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match req.as_ref().and_then(|r| r.channel.as_ref()) {
            Some(ch) => ch.notify().map(|()| true),
            None => Ok(false),
        }
    }

    /// Kicks, requests and interrupts so far.
    pub fn counters(&self) -> Counters {
        Counters {
            kicks: self.inner.kicks.load(Ordering::Relaxed),
            requests: self.inner.requests.load(Ordering::Relaxed),
            signals: self.inner.signals.load(Ordering::Relaxed),
        }
    }

    /// Requests popped and not yet published, over all queues.
    pub fn in_flight(&self) -> usize {
        self.inner
            .queues
            .iter()
            .map(|q| q.lock().entries.len())
            .sum()
    }
}

impl Inner {
    /// The limits with the current capacity.
    fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity_sectors.load(Ordering::Acquire),
            ..self.base_limits
        }
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn register(&self, queue: usize, head: u16) -> Ticket {
        let mut o = self.queues[queue].lock();
        let seq = o.front_seq + o.entries.len() as u64;
        o.entries.push_back((head, None));
        Ticket {
            queue,
            seq,
            generation: o.generation,
        }
    }

    /// Finishes a request: `fill` writes its data and status into guest memory (called under
    /// the queue's lock, only if the ticket is still current), then the request is published
    /// with every earlier finished one.
    fn finish(&self, t: Ticket, fill: impl FnOnce(&GuestMemoryMmap) -> u32) {
        let q = &self.queues[t.queue];
        let mut o = q.lock();
        if o.generation != t.generation {
            return; // the ring was stopped and this request abandoned
        }
        let Some(mem) = self.memory() else { return };
        let used_len = fill(&mem.memory());
        let Some(idx) = t.seq.checked_sub(o.front_seq) else {
            return;
        };
        let Some(slot) = o.entries.get_mut(idx as usize) else {
            return;
        };
        slot.1 = Some(used_len);
        let Some(vring) = q.vring() else { return };
        let mut published = 0;
        while let Some(&(head, Some(len))) = o.entries.front() {
            if let Err(e) = vring.add_used(head, len) {
                tracing::error!(queue = t.queue, head, error = ?e, "add_used failed");
            }
            o.entries.pop_front();
            o.front_seq += 1;
            published += 1;
        }
        if published > 0 {
            // At the end of the client's batch of answers (see `batch`), or now.
            let queue = t.queue;
            let signals = self.signals.clone();
            crate::batch::defer(move || {
                let notify = vring.needs_notification().unwrap_or(true);
                if notify {
                    signals.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = vring.signal_used_queue() {
                        tracing::warn!(queue, error = %e, "cannot signal the guest");
                    }
                }
            });
            if o.entries.is_empty() {
                q.drained.notify_all();
            }
        }
    }

    fn stop_queue(&self, queue: usize) {
        let Some(q) = self.queues.get(queue) else {
            return;
        };
        let o = q.lock();
        let (mut o, timeout) = q
            .drained
            .wait_timeout_while(o, self.cfg.drain_timeout, |o| !o.entries.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() && !o.entries.is_empty() {
            tracing::warn!(queue, abandoned = o.entries.len(), "ring stopped with requests in flight: abandoning them; the frontend will re-offer them");
            if let Some(vring) = q.vring() {
                let used = vring.get_ref().get_queue().next_used();
                vring.set_queue_next_avail(used);
            }
        }
        o.entries.clear();
        o.generation += 1;
        o.front_seq = 0;
    }

    /// The guest broke queue `queue`'s avail ring: logs it (once per session) and closes the
    /// vhost-user connection. Requests in flight are then finished or abandoned as on any
    /// disconnect (the daemon calls [`KeelBlk::shutdown`]).
    fn end_session(
        &self,
        queue: usize,
        broken: Broken,
        avail_idx: u16,
        next_avail: u16,
        size: u16,
        head: Option<u16>,
    ) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            tracing::error!(
                queue,
                avail_idx,
                next_avail,
                queue_size = size,
                head = ?head,
                problem = %broken,
                "the guest's avail ring is broken: ending the vhost-user session (logged once per session)"
            );
        }
        let slot = self.session_end.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = slot.as_ref() {
            handle.shutdown();
        }
    }

    fn process_queue(self: &Arc<Self>, queue: usize, vring: &VringRwLock) -> std::io::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Ok(()); // the session is ending: nothing more is taken from the guest
        }
        let Some(atomic) = self.memory() else {
            return Ok(());
        };
        {
            let mut slot = self.queues[queue]
                .vring
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        // Rounds in a row that popped nothing although the ring said it had more (an avail
        // ring whose entries cannot be read) would keep this loop spinning forever; after two
        // such rounds the queue waits for its next kick.
        let mut empty_rounds = 0;
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            }
            let mem = atomic.memory();
            loop {
                if self.budget.load(Ordering::Acquire) <= 0 {
                    // Out of budget: leave the rest in the ring; a refund resumes us. Re-check
                    // after raising the flag so a refund in between is not missed.
                    self.throttled.store(true, Ordering::SeqCst);
                    if self.budget.load(Ordering::SeqCst) <= 0 {
                        tracing::debug!(queue, "in-flight budget used up: pausing the ring");
                        return Ok(());
                    }
                    self.throttled.store(false, Ordering::SeqCst);
                }
                // The ring's state, checked before popping: virtio-queue would log and refuse
                // an avail index too far ahead on every kick, never completing anything.
                let (avail_idx, next_avail, size) = {
                    let q = vring.get_ref();
                    let q = q.get_queue();
                    (
                        q.avail_idx(&*mem, Ordering::Acquire),
                        q.next_avail(),
                        q.size(),
                    )
                };
                // An unreadable index: popping fails the same way (below, the empty rounds).
                let avail_idx = avail_idx.map(|i| i.0).unwrap_or(next_avail);
                if avail_idx == next_avail {
                    break;
                }
                if let Some(broken) = ring_broken(avail_idx, next_avail, size, None) {
                    let head = avail_entry(vring.get_ref().get_queue(), &mem, next_avail);
                    self.end_session(queue, broken, avail_idx, next_avail, size, head);
                    return Ok(());
                }
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                // The head virtio-queue popped (not a second read the guest could race): one
                // outside the table would yield no descriptors and could never be published.
                if let Some(broken) = ring_broken(avail_idx, next_avail, size, Some(head)) {
                    self.end_session(queue, broken, avail_idx, next_avail, size, Some(head));
                    return Ok(());
                }
                empty_rounds = 0;
                self.requests.fetch_add(1, Ordering::Relaxed);
                let descs: Vec<Desc> = chain.take(MAX_DESCRIPTORS + 1).map(Desc::from).collect();
                let ticket = self.register(queue, head);
                match request::parse(&descs, &*mem, &self.limits()) {
                    Ok(req) => self.dispatch(ticket, req),
                    Err(rej) => {
                        tracing::warn!(queue, head, error = %rej.error, "refused a guest request");
                        let status = rej.error.status();
                        self.finish(ticket, |m| match rej.status {
                            Some(addr) if m.write_obj(status, addr).is_ok() => 1,
                            _ => 0,
                        });
                    }
                }
            }
            if !event_idx {
                break;
            }
            empty_rounds += 1;
            if empty_rounds > 2 {
                if !self.unreadable_ring_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(queue, "the guest's avail ring cannot be read: waiting for its next kick (logged once)");
                }
                break;
            }
            if self.poll_avail(vring, &mem) {
                continue;
            }
            let more = vring
                .enable_notification()
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// Polls the queue's avail ring for up to `cfg.poll`: whether the guest made a request
    /// available meanwhile (it did not kick: its notifications are off).
    fn poll_avail(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
        if self.cfg.poll.is_zero() {
            return false;
        }
        let deadline = std::time::Instant::now() + self.cfg.poll;
        loop {
            let q = vring.get_ref();
            let q = q.get_queue();
            match q.avail_idx(mem, Ordering::Acquire) {
                // New entries, or a broken ring: both go back to `process_queue` (which ends
                // the session on the latter).
                Ok(idx) => {
                    if idx.0 != q.next_avail() {
                        return true;
                    }
                }
                Err(_) => return false,
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn dispatch(self: &Arc<Self>, t: Ticket, req: BlkRequest) {
        let me = self.clone();
        match &req.kind {
            Kind::GetId => {
                // The serial, NUL-padded to the 20 bytes of the answer (or the buffer, if shorter).
                let mut id = serial(self.cfg.volume);
                id.resize(VIRTIO_BLK_ID_BYTES, 0);
                let n = (req.data_len as usize).min(id.len());
                self.finish(t, |m| {
                    let ok = request::write_segments(m, &req.data, 0, &id[..n]);
                    let status = if ok {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    };
                    if m.write_obj(status, req.status).is_ok() {
                        n as u32 + 1
                    } else {
                        0
                    }
                });
            }
            Kind::Flush => {
                let agg = Agg::new(me, t, req, 1);
                agg.submit(Op::Flush, ReqFlags::default(), 0, 0, Vec::new(), None);
            }
            Kind::In { offset } | Kind::Out { offset } => {
                let offset = *offset;
                let write = matches!(req.kind, Kind::Out { .. });
                let len = req.data_len;
                let parts = len.div_ceil(MAX_WIRE_DATA as u64).max(1) as usize;
                let mem = self.memory();
                let agg = Agg::new(me, t, req, parts);
                agg.charge(len);
                for i in 0..parts {
                    let start = i as u64 * MAX_WIRE_DATA as u64;
                    let plen = (len - start).min(MAX_WIRE_DATA as u64) as u32;
                    if write {
                        let mut buf = vec![0u8; plen as usize];
                        let ok = mem.as_ref().is_some_and(|m| {
                            request::read_segments(&*m.memory(), &agg.req.data, start, &mut buf)
                        });
                        if !ok {
                            agg.part_done(None, Outcome::Failed(Status::IoError));
                            continue;
                        }
                        agg.submit(
                            Op::Write,
                            ReqFlags::default(),
                            offset + start,
                            plen,
                            buf,
                            None,
                        );
                    } else {
                        agg.submit(
                            Op::Read,
                            ReqFlags::default(),
                            offset + start,
                            plen,
                            Vec::new(),
                            Some(start),
                        );
                    }
                }
            }
            Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => {
                let op = if matches!(req.kind, Kind::Discard(_)) {
                    Op::Discard
                } else {
                    Op::WriteZeroes
                };
                // Wire lengths are u32: split ranges into pieces of at most 1 GiB.
                const PIECE: u64 = 1 << 30;
                let pieces: Vec<(u64, u32)> = ranges
                    .iter()
                    .flat_map(|r| {
                        (0..r.len.div_ceil(PIECE)).map(move |i| {
                            let off = i * PIECE;
                            (r.offset + off, (r.len - off).min(PIECE) as u32)
                        })
                    })
                    .collect();
                let agg = Agg::new(me, t, req, pieces.len().max(1));
                if pieces.is_empty() {
                    agg.part_done(None, Outcome::Ok(Vec::new()));
                }
                for (offset, len) in pieces {
                    agg.submit(op, ReqFlags::default(), offset, len, Vec::new(), None);
                }
            }
        }
    }
}

/// One guest request split into wire operations; completes when the last part does.
struct Agg {
    inner: Arc<Inner>,
    ticket: Ticket,
    req: BlkRequest,
    remaining: AtomicUsize,
    /// The first failure's virtio status (OK while none).
    status: AtomicU8,
    /// Bytes taken from the volume's budget, given back on completion.
    charged: AtomicU64,
}

impl Agg {
    fn new(inner: Arc<Inner>, ticket: Ticket, req: BlkRequest, parts: usize) -> Arc<Agg> {
        Arc::new(Agg {
            inner,
            ticket,
            req,
            remaining: AtomicUsize::new(parts),
            status: AtomicU8::new(VIRTIO_BLK_S_OK),
            charged: AtomicU64::new(0),
        })
    }

    fn charge(&self, bytes: u64) {
        let b = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.charged.store(bytes, Ordering::Relaxed);
        self.inner.budget.fetch_sub(b, Ordering::AcqRel);
    }

    fn refund(&self) {
        let bytes = self.charged.swap(0, Ordering::AcqRel);
        if bytes == 0 {
            return;
        }
        let b = i64::try_from(bytes).unwrap_or(i64::MAX);
        let now = self.inner.budget.fetch_add(b, Ordering::SeqCst) + b;
        if now > 0 && self.inner.throttled.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.inner.resume.write(1) {
                tracing::error!(error = %e, "cannot wake the vring thread");
            }
        }
    }

    fn submit(
        self: &Arc<Self>,
        op: Op,
        flags: ReqFlags,
        offset: u64,
        length: u32,
        payload: Vec<u8>,
        read_at: Option<u64>,
    ) {
        let me = self.clone();
        self.inner.client.submit(WireOp {
            op,
            flags,
            offset,
            length,
            payload,
            done: Box::new(move |outcome| me.part_done(read_at, outcome)),
        });
    }

    /// One part finished. Read data is written into guest memory under the queue lock (so an
    /// abandoned request never touches memory); the last part writes the status and publishes.
    fn part_done(self: &Arc<Self>, read_at: Option<u64>, outcome: Outcome) {
        let data = match outcome {
            Outcome::Ok(data) => data,
            Outcome::Failed(status) => {
                tracing::warn!(?status, kind = ?self.req.kind, "volume request failed: I/O error to the guest");
                self.status.store(VIRTIO_BLK_S_IOERR, Ordering::Release);
                Vec::new()
            }
            // No answer within --io-fail-after-ms: the client logs these once per burst.
            Outcome::GaveUp => {
                self.status.store(VIRTIO_BLK_S_IOERR, Ordering::Release);
                Vec::new()
            }
        };
        let last = self.remaining.fetch_sub(1, Ordering::AcqRel) == 1;
        let me = self.clone();
        if read_at.is_none() && !last {
            return;
        }
        // Reads write their data now; the last part also writes the status and publishes.
        let req = &me.req;
        let ticket = me.ticket;
        if !last {
            // A read part that is not the last: copy its data without publishing.
            let q = &me.inner.queues[ticket.queue];
            let o = q.lock();
            if o.generation == ticket.generation {
                if let (Some(at), Some(mem)) = (read_at, me.inner.memory()) {
                    if !data.is_empty()
                        && !request::write_segments(&*mem.memory(), &req.data, at, &data)
                    {
                        me.status.store(VIRTIO_BLK_S_IOERR, Ordering::Release);
                    }
                }
            }
            return;
        }
        me.inner.finish(ticket, |m| {
            // (the budget is refunded after publication, below)
            if let Some(at) = read_at {
                if !data.is_empty() && !request::write_segments(m, &req.data, at, &data) {
                    me.status.store(VIRTIO_BLK_S_IOERR, Ordering::Release);
                }
            }
            let status = me.status.load(Ordering::Acquire);
            let written = if matches!(req.kind, Kind::In { .. }) && status == VIRTIO_BLK_S_OK {
                req.data_len as u32
            } else {
                0
            };
            if m.write_obj(status, req.status).is_ok() {
                written + 1
            } else {
                0
            }
        });
        me.refund();
    }
}

/// Checks that every file-backed region fits inside its file.
fn check_regions(mem: &GuestMemoryMmap) -> std::io::Result<()> {
    for region in mem.iter() {
        if let Some(fo) = region.file_offset() {
            let file_len = fo.file().metadata()?.len();
            let end = fo.start().checked_add(region.len());
            if end.is_none_or(|end| end > file_len) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "memory region of {} bytes at file offset {} exceeds its file ({} bytes)",
                        region.len(),
                        fo.start(),
                        file_len
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl VhostUserBackend for KeelBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.inner.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.cfg.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the frontend gives a channel for config-change messages (resize).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let channel = match ConfigChannel::find(&self.inner.sockets_before) {
            Ok(ch) => Some(ch),
            Err(e) => {
                tracing::warn!(error = %e, "cannot find the backend request channel: a resize reaches the guest only when it reconnects");
                None
            }
        };
        *self
            .inner
            .backend_req
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(BackendReq {
            _backend: backend,
            channel,
        });
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cs = config_space(
            &self.inner.limits(),
            self.inner.cfg.num_queues,
            self.inner.cfg.block_size,
        );
        let start = (offset as usize).min(cs.len());
        let end = start.saturating_add(size as usize).min(cs.len());
        cs[start..end].to_vec()
    }

    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        // A region larger than the file behind it would be mapped fine and then fault (SIGBUS)
        // on the first access past the file's end: refuse such a table, and put an empty
        // memory map in its place so nothing (the ring code included) can touch it.
        if let Err(e) = check_regions(&mem.memory()) {
            tracing::warn!(error = %e, "refusing the frontend's memory table");
            mem.lock()
                .map_err(|_| std::io::Error::other("guest memory lock poisoned"))?
                .replace(GuestMemoryMmap::new());
            *self.inner.mem.write().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(e);
        }
        *self.inner.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        // The frontend is starting the device. QEMU reads the config space only when the device
        // is created and on config-change messages, so a QEMU reconnecting to a restarted
        // keel-vhost would keep the capacity it read from an earlier process: tell it once per
        // session to read it again (it interrupts the guest only if something changed).
        if !self.inner.announced.swap(true, Ordering::AcqRel) {
            match self.notify_config_change() {
                Ok(sent) => tracing::debug!(sent, "config-change message at device start"),
                Err(e) => tracing::warn!(error = %e, "cannot send the config-change message"),
            }
        }
        Ok(())
    }

    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        // Without an exit event the vring worker threads never end, and dropping a finished
        // session's daemon (which joins them) would block the next frontend forever.
        match vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK,
        ) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a vring thread exit event");
                None
            }
        }
    }

    fn reset_device(&self) {
        self.shutdown();
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.inner.stop_queue(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        if device_event == self.resume_event() {
            let _ = self.inner.resume.read();
            for (q, vring) in vrings.iter().enumerate() {
                if vring.get_ref().get_queue().ready() {
                    self.inner.process_queue(q, vring)?;
                }
            }
            return Ok(());
        }
        let q = device_event as usize;
        self.inner.kicks.fetch_add(1, Ordering::Relaxed);
        let Some(vring) = vrings.get(q) else {
            return Err(std::io::Error::other(format!(
                "event for unknown queue {q}"
            )));
        };
        self.inner.process_queue(q, vring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_broken_spots_an_index_too_far_ahead_and_a_head_outside_the_table() {
        // Empty, one entry, a full ring: fine, whatever the head (not read yet).
        assert_eq!(ring_broken(0, 0, 256, None), None);
        assert_eq!(
            ring_broken(5, 5, 256, Some(9999)),
            None,
            "empty: head ignored"
        );
        assert_eq!(ring_broken(1, 0, 256, Some(255)), None);
        assert_eq!(
            ring_broken(256, 0, 256, Some(0)),
            None,
            "a full ring is fine"
        );
        // The index across the u16 wrap.
        assert_eq!(ring_broken(3, 65533, 8, Some(7)), None);
        assert_eq!(
            ring_broken(3, 65533, 4, None),
            Some(Broken::AvailIdxAhead { pending: 6 })
        );
        // One past full, far ahead, or behind (a guest moving its index back).
        assert_eq!(
            ring_broken(257, 0, 256, None),
            Some(Broken::AvailIdxAhead { pending: 257 })
        );
        assert_eq!(
            ring_broken(100 + 256 + 7, 100, 256, Some(0)),
            Some(Broken::AvailIdxAhead { pending: 263 }),
            "the index is checked before the head"
        );
        assert_eq!(
            ring_broken(9, 10, 256, None),
            Some(Broken::AvailIdxAhead { pending: 65535 })
        );
        // Heads at and past the size.
        assert_eq!(
            ring_broken(1, 0, 256, Some(256)),
            Some(Broken::HeadOutOfRange { head: 256 })
        );
        assert_eq!(
            ring_broken(40, 30, 128, Some(u16::MAX)),
            Some(Broken::HeadOutOfRange { head: u16::MAX })
        );
        // A zero-sized queue (vhost-user refuses one) is broken as soon as anything is pending.
        assert_eq!(ring_broken(0, 0, 0, Some(0)), None);
        assert_eq!(
            ring_broken(1, 0, 0, Some(0)),
            Some(Broken::AvailIdxAhead { pending: 1 })
        );
    }

    /// What virtio-queue 0.18 itself does with the two broken rings, which is why
    /// `process_queue` checks them: an index too far ahead pops nothing (forever), and a head
    /// outside the table pops a chain with no descriptors that `add_used` then refuses.
    #[test]
    fn virtio_queue_neither_pops_nor_completes_a_broken_ring() {
        const SIZE: u16 = 16;
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)])
            .expect("guest memory");
        let mut q = Queue::new(SIZE).expect("queue");
        q.set_size(SIZE);
        q.try_set_desc_table_address(GuestAddress(desc))
            .expect("desc");
        q.try_set_avail_ring_address(GuestAddress(avail))
            .expect("avail");
        q.try_set_used_ring_address(GuestAddress(used))
            .expect("used");
        q.set_ready(true);
        let set_avail_idx = |i: u16| {
            mem.write_obj(i.to_le(), GuestAddress(avail + 2))
                .expect("avail idx")
        };
        let set_entry = |slot: u64, head: u16| {
            mem.write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * slot))
                .expect("avail entry")
        };

        // avail.idx more than SIZE ahead: nothing pops, next_avail stays.
        set_entry(0, 0);
        set_avail_idx(SIZE + 1);
        assert!(q.pop_descriptor_chain(&mem).is_none());
        assert_eq!(q.next_avail(), 0);
        let idx = q.avail_idx(&mem, Ordering::Acquire).expect("idx").0;
        assert_eq!(
            ring_broken(idx, q.next_avail(), q.size(), None),
            Some(Broken::AvailIdxAhead { pending: SIZE + 1 })
        );
        assert_eq!(avail_entry(&q, &mem, q.next_avail()), Some(0));

        // A head outside the table: popped, with no descriptor, and never publishable.
        set_entry(0, SIZE + 3);
        set_avail_idx(1);
        assert_eq!(ring_broken(1, 0, SIZE, None), None, "the index is fine");
        let chain = q.pop_descriptor_chain(&mem).expect("a chain is popped");
        assert_eq!(chain.head_index(), SIZE + 3);
        assert_eq!(chain.clone().count(), 0, "no descriptors");
        assert_eq!(q.next_avail(), 1);
        assert!(q.add_used(&mem, chain.head_index(), 0).is_err());
        assert_eq!(q.next_used(), 0, "the guest never sees it completed");
        assert_eq!(
            ring_broken(1, 0, SIZE, Some(chain.head_index())),
            Some(Broken::HeadOutOfRange { head: SIZE + 3 })
        );
        assert_eq!(avail_entry(&q, &mem, 0), Some(SIZE + 3));
    }
}
