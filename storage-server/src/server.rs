//! The request server: mutual-TLS connections, pipelined requests answered out of order.
//!
//! Per connection, one task reads frames and checks each request (authorisation, volume,
//! epoch, range, checksum) before starting it; the disk work runs on the blocking pool, and one
//! writer task batches finished responses into as few TLS writes as possible. In-flight work
//! per connection is bounded by a byte budget, so a client that floods requests is slowed by
//! TCP back-pressure instead of growing the server's memory.
//!
//! Data ops are for `node` peers the copy's access list grants (on primaries) and for the
//! `storage` peer it names as primary (replicating, on mirrors); copy administration
//! ([`Op::is_admin`]) for `controller` peers; ping for anyone, but only those the copy knows
//! learn its epoch (docs/security.md). Everyone else is refused `unauthorized` with epoch 0,
//! whether or not the volume exists here.
//! A data request is admitted on its copy ([`Copy::admit`]) for the duration of its I/O, so a
//! membership change or deletion answered to the controller fences every later request (see
//! `docs/protocol.md`). A node's mutation or flush on a primary with mirrors is also sent to
//! every mirror and acknowledged only when all of them answered (see [`crate::replicate`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use keel_proto::frame::checksum;
use keel_proto::io::{accept, read_body, read_head, FrameIoError, WriteBatch};
use keel_proto::limits::{Acceptor, ConnLimits};
use keel_proto::tls::Identity;
use keel_proto::{Epoch, Frame, MemberRole, Op, Request, Response, Role, Status, VolumeId};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::admission::is_mutation;
use crate::copy::{Copy, CopyError, CopyRole, Refusal, SECTOR};
use crate::replicate::{Replication, Replicator};
use crate::session::Session;
use crate::store::Store;

/// Request counters of one server, shared with whoever reports them (a heartbeat). Updated
/// with relaxed atomics when each response is produced.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads answered `ok`.
    pub reads: AtomicU64,
    /// Writes answered `ok`.
    pub writes: AtomicU64,
    /// Bytes returned by reads answered `ok`.
    pub bytes_read: AtomicU64,
    /// Bytes stored by writes answered `ok`.
    pub bytes_written: AtomicU64,
    /// Requests of any op answered `io error` (the disk failed them).
    pub errors: AtomicU64,
    /// Requests answered with any other refusal (stale epoch, out of range, unauthorized, ...).
    pub refused: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub refused: u64,
}

impl Stats {
    /// The counters now (each read on its own: not one atomic cut across them).
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            reads: r(&self.reads),
            writes: r(&self.writes),
            bytes_read: r(&self.bytes_read),
            bytes_written: r(&self.bytes_written),
            errors: r(&self.errors),
            refused: r(&self.refused),
        }
    }

    /// Counts one answered request.
    fn record(&self, op: Op, length: u32, status: Status) {
        let add = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        match (status, op) {
            (Status::Ok, Op::Read) => {
                add(&self.reads, 1);
                add(&self.bytes_read, u64::from(length));
            }
            (Status::Ok, Op::Write) => {
                add(&self.writes, 1);
                add(&self.bytes_written, u64::from(length));
            }
            (Status::Ok, _) => {}
            (Status::IoError | Status::CopyLost, _) => add(&self.errors, 1),
            _ => add(&self.refused, 1),
        }
    }
}

/// Sends responses to a connection's writer task, counting them. Each answer carries its
/// request's budget charge until it is written: a client that does not read its answers stops
/// having its requests read (docs/protocol.md, "Limits and back-pressure").
#[derive(Clone)]
struct Responder {
    tx: mpsc::UnboundedSender<(Response, Charge)>,
    stats: Arc<Stats>,
}

impl Responder {
    /// Queues the answer to a request with `op` and `length`; false once the writer is gone.
    fn send(&self, op: Op, length: u32, resp: Response, charge: Charge) -> bool {
        self.stats.record(op, length, resp.status);
        self.tx.send((resp, charge)).is_ok()
    }
}

/// In-flight budget per connection, in 4 KiB units (128 MiB): request payloads from their
/// first byte, the work, and the answers until written.
const BUDGET_UNITS: u32 = 32 * 1024;
const UNIT: usize = 4096;

/// What the server holds against clients that hold connections or memory without using them
/// (docs/security.md, "Denial of service").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections at once, overall and per peer address; excess ones are closed before TLS.
    pub conns: ConnLimits,
    /// Time for the TLS handshake and the hello together.
    pub handshake: Duration,
    /// Time for a frame to complete once its first byte arrived, and for a batch of answers
    /// to be written (a client that does not read them).
    pub frame: Duration,
    /// A connection that sent nothing for this long and has nothing in flight is closed,
    /// unless it holds a claim (a node's attachment) or is a storage server's (replication).
    pub idle: Duration,
    /// Bytes in flight across all connections (payloads, work, unwritten answers).
    pub memory: u64,
    /// How often the allocator's free memory is returned to the system while little is in
    /// flight (see `keel_proto::tuning::keep_large_buffers`); zero: never.
    pub trim_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            conns: ConnLimits::default(),
            handshake: Duration::from_secs(10),
            frame: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            memory: 1 << 30,
            trim_interval: Duration::from_secs(30),
        }
    }
}

/// The daemon-wide budget, in units: a lock-free counter (a semaphore's release takes a
/// lock); waiters, rare, are woken through a [`Notify`] only when there are some.
#[derive(Debug)]
struct GlobalBudget {
    units: u64,
    used: AtomicU64,
    waiting: AtomicU64,
    freed: Notify,
}

impl GlobalBudget {
    fn new(units: u64) -> Arc<GlobalBudget> {
        Arc::new(GlobalBudget {
            units,
            used: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            freed: Notify::new(),
        })
    }

    /// Takes `n` units if they are free (never over the budget, not even for a moment: a
    /// failed try gives nothing back, so it wakes no one).
    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                (u + n <= self.units).then_some(u + n)
            })
            .is_ok()
    }

    /// Takes `n` units, waiting until they are free. A waiter counts itself and arms its
    /// wake-up before trying again, and `give` frees before it looks for waiters: either the
    /// second try sees the units freed, or the giver sees the waiter and wakes it.
    async fn take(&self, n: u64) {
        while !self.try_take(n) {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let got = self.try_take(n);
            if !got {
                freed.await;
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if got {
                return;
            }
        }
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    fn idle(&self) -> bool {
        self.used.load(Ordering::Relaxed) == 0
    }
}

/// Units of the daemon-wide budget, given back when dropped.
struct GlobalCharge {
    budget: Arc<GlobalBudget>,
    units: u64,
}

impl Drop for GlobalCharge {
    fn drop(&mut self) {
        if self.units > 0 {
            self.budget.give(self.units);
        }
    }
}

/// Budget held by one request from its payload's first byte until its answer is written: a
/// share of its connection's budget and of the daemon's.
struct Charge {
    conn: OwnedSemaphorePermit,
    global: GlobalCharge,
}

impl Charge {
    fn merge(&mut self, mut other: Charge) {
        self.conn.merge(other.conn);
        self.global.units += std::mem::take(&mut other.global.units);
    }
}

/// The budgets a connection's requests are charged to.
struct Budget {
    conn: Arc<Semaphore>,
    global: Arc<GlobalBudget>,
}

impl Budget {
    /// Charges `units` (clamped to what a budget holds); `None` once the budget is closed.
    /// Waiting (the connection's reads stop meanwhile) is flagged for the watchdog.
    async fn charge(&self, units: usize, progress: &Progress) -> Option<Charge> {
        let max = u64::from(BUDGET_UNITS).min(self.global.units);
        let units = (units as u64).clamp(1, max) as u32;
        let n = u64::from(units);
        let global = |units| GlobalCharge {
            budget: self.global.clone(),
            units,
        };
        if let Ok(conn) = self.conn.clone().try_acquire_many_owned(units) {
            if self.global.try_take(n) {
                return Some(Charge {
                    conn,
                    global: global(n),
                });
            }
            drop(conn);
        }
        progress.waiting.store(true, Ordering::Relaxed);
        let conn = self.conn.clone().acquire_many_owned(units).await.ok();
        if conn.is_some() {
            self.global.take(n).await;
        }
        progress.waiting.store(false, Ordering::Relaxed);
        Some(Charge {
            conn: conn?,
            global: global(n),
        })
    }
}

/// A connection's progress, for its watchdog (plain relaxed stores on the data path).
#[derive(Default)]
struct Progress {
    /// Bytes read from the connection.
    read: AtomicU64,
    /// `read` when the last complete frame ended.
    boundary: AtomicU64,
    /// The reader waits for budget (the stall is the server's, not the client's).
    waiting: AtomicBool,
    /// Batches of answers written.
    written: AtomicU64,
    /// A batch is being written.
    writing: AtomicBool,
    /// Exempt from the idle timeout: holds a claim, or is a storage server's connection.
    attached: AtomicBool,
}

/// The read half of a connection, counting the bytes read.
struct Counted<R> {
    inner: R,
    progress: Arc<Progress>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            // Only this connection's reader writes it.
            let p = &self.progress.read;
            p.store(p.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        }
        r
    }
}

/// Watches a connection with one timer; returns why it should be closed: a frame started and
/// not finished within `limits.frame`, a batch of answers not written within it, or nothing
/// sent for `limits.idle` with nothing in flight (unless attached).
async fn watchdog(progress: Arc<Progress>, budget: Arc<Semaphore>, limits: Limits) -> &'static str {
    let tick = (limits.frame.min(limits.idle) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_read, mut read_at) = (progress.read.load(Ordering::Relaxed), Instant::now());
    let mut frame_since: Option<(u64, Instant)> = None;
    let mut write_since: Option<(u64, Instant)> = None;
    loop {
        timer.tick().await;
        let now = Instant::now();
        let read = progress.read.load(Ordering::Relaxed);
        if read != last_read {
            (last_read, read_at) = (read, now);
        }
        let boundary = progress.boundary.load(Ordering::Relaxed);
        if read == boundary || progress.waiting.load(Ordering::Relaxed) {
            frame_since = None;
        } else {
            match frame_since {
                Some((b, since)) if b == boundary => {
                    if now.duration_since(since) >= limits.frame {
                        return "a frame did not complete in time";
                    }
                }
                _ => frame_since = Some((boundary, now)),
            }
        }
        let written = progress.written.load(Ordering::Relaxed);
        if progress.writing.load(Ordering::Relaxed) {
            match write_since {
                Some((w, since)) if w == written => {
                    if now.duration_since(since) >= limits.frame {
                        return "its answers were not read in time";
                    }
                }
                _ => write_since = Some((written, now)),
            }
        } else {
            write_since = None;
        }
        if !progress.attached.load(Ordering::Relaxed)
            && budget.available_permits() == BUDGET_UNITS as usize
            && now.duration_since(read_at) >= limits.idle
        {
            return "idle";
        }
    }
}

/// Returns free heap memory to the system now and then while nothing is in flight: the
/// allocator keeps freed buffers (`keel_proto::tuning`), which after a burst (or a flood of
/// partial frames) would otherwise stay resident. `malloc_trim` releases free chunks inside
/// the arenas, not the free top of a thread arena's heap: that part stays up to glibc's
/// trim threshold (docs/protocol.md, "Limits and back-pressure").
async fn trim_heap(global: Arc<GlobalBudget>, every: Duration) {
    if every.is_zero() {
        return std::future::pending().await;
    }
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        if global.idle() {
            // SAFETY: malloc_trim only returns free memory of the allocator's arenas.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Accepts connections forever, counting requests in `stats`, without the means to replicate
/// (a primary with mirrors answers nodes' mutations `not primary`): see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    stats: Arc<Stats>,
) -> std::io::Result<()> {
    serve_with(listener, store, tls, stats, Replication::default()).await
}

/// Accepts connections forever, counting requests in `stats`; primaries replicate to their
/// mirrors as `replication` says (client certificate, timeout, failure handler).
pub async fn serve_with(
    listener: TcpListener,
    store: Arc<Store>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    stats: Arc<Stats>,
    replication: Replication,
) -> std::io::Result<()> {
    serve_shared(
        listener,
        store,
        tls,
        stats,
        Arc::new(Replicator::new(replication)),
    )
    .await
}

/// [`serve_with`] with a replicator the caller keeps (e.g. to report rebuild progress with
/// [`Replicator::rebuild_progress`]). Rebuilds recorded in the copies' membership lists start
/// at once.
pub async fn serve_shared(
    listener: TcpListener,
    store: Arc<Store>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    stats: Arc<Stats>,
    repl: Arc<Replicator>,
) -> std::io::Result<()> {
    serve_limited(listener, store, tls, stats, repl, Limits::default()).await
}

/// [`serve_shared`] under `limits`. Never returns: accept errors (out of file descriptors
/// included) are logged and waited out.
pub async fn serve_limited(
    listener: TcpListener,
    store: Arc<Store>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    stats: Arc<Stats>,
    repl: Arc<Replicator>,
    limits: Limits,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    for c in store.list() {
        repl.reconcile_rebuilds(&c);
    }
    let global = GlobalBudget::new((limits.memory / UNIT as u64).max(1));
    tokio::spawn(trim_heap(global.clone(), limits.trim_interval));
    let mut listener = Acceptor::new(listener, limits.conns);
    loop {
        let (tcp, addr, guard) = listener.next().await;
        let store = store.clone();
        let acceptor = acceptor.clone();
        let stats = stats.clone();
        let repl = repl.clone();
        let limits = limits.clone();
        let global = global.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let accepted =
                match tokio::time::timeout(limits.handshake, accept(tcp, &acceptor)).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(%addr, "handshake timed out (TLS and hello)");
                        return;
                    }
                };
            match accepted {
                Ok((stream, peer)) => {
                    tracing::info!(%addr, %peer, "client connected");
                    // A CRL that revokes the peer's certificate ends the connection
                    // (docs/security.md, "Certificates").
                    let serial = keel_proto::tls::peer_serial(stream.get_ref().1);
                    let fd = std::os::fd::AsRawFd::as_raw_fd(stream.get_ref().0);
                    let progress = Arc::new(Progress::default());
                    progress
                        .attached
                        .store(peer.role == Role::Storage, Ordering::Relaxed);
                    let budget = Budget {
                        conn: Arc::new(Semaphore::new(BUDGET_UNITS as usize)),
                        global,
                    };
                    let dog = watchdog(progress.clone(), budget.conn.clone(), limits.clone());
                    let conn =
                        serve_conn(stream, peer.clone(), store, stats, repl, budget, progress);
                    tokio::pin!(conn);
                    let revoked = async {
                        match serial {
                            Some(serial) => keel_proto::tls::revoked(serial).await,
                            None => std::future::pending().await,
                        }
                    };
                    let why = tokio::select! {
                        r = &mut conn => Err(r),
                        () = revoked => Ok("the peer's certificate was revoked"),
                        why = dog => Ok(why),
                    };
                    let done = match why {
                        Err(r) => r,
                        Ok(why) => {
                            tracing::warn!(%addr, %peer, reason = why, "closing the connection");
                            // SAFETY: `fd` is the socket of the stream `conn` owns, and
                            // `conn` has not returned, so the fd is open and still this
                            // connection's. shutdown(2) only ends the connection: reads
                            // see its end and serve_conn finishes as after a disconnect.
                            unsafe {
                                libc::shutdown(fd, libc::SHUT_RDWR);
                            }
                            conn.await
                        }
                    };
                    match done {
                        Ok(()) => tracing::info!(%addr, %peer, "client disconnected"),
                        Err(e) => tracing::warn!(%addr, %peer, error = %e, "connection closed"),
                    }
                }
                // A client that exits (or a daemon that stops) mid-handshake: expected.
                Err(keel_proto::io::FrameIoError::Io(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    tracing::debug!(%addr, "the client closed the connection during the handshake")
                }
                Err(e) => tracing::warn!(%addr, error = %e, "handshake failed"),
            }
        });
    }
}

async fn serve_conn(
    stream: keel_proto::io::ServerStream,
    peer: Identity,
    store: Arc<Store>,
    stats: Arc<Stats>,
    repl: Arc<Replicator>,
    budget: Budget,
    progress: Arc<Progress>,
) -> Result<(), FrameIoError> {
    let peer = Arc::new(peer);
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = Counted {
        inner: rd,
        progress: progress.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<(Response, Charge)>();
    let tx = Responder { tx, stats };
    let wprogress = progress.clone();
    let writer = tokio::spawn(async move {
        // Everything answered meanwhile goes out in one vectored write (payloads are not
        // copied into a send buffer first). The answers' charges are released once written.
        let mut batch = WriteBatch::new();
        let mut held: Vec<Charge> = Vec::new();
        while let Some((first, charge)) = rx.recv().await {
            batch.push_response(first);
            held.push(charge);
            while batch.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok((r, c)) => {
                        batch.push_response(r);
                        held.push(c);
                    }
                    Err(_) => break,
                }
            }
            wprogress.writing.store(true, Ordering::Relaxed);
            let r = batch.write_to(&mut wr).await;
            wprogress.writing.store(false, Ordering::Relaxed);
            let w = &wprogress.written;
            w.store(w.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            held.clear();
            if r.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = Vec::new();
    // The copies this connection claimed (a client's newer connection supersedes it).
    let mut sessions: HashMap<VolumeId, Session> = HashMap::new();
    let result = loop {
        // The payload is charged to the budgets before it is read (a partial frame's buffer
        // counts), the rest of the request's cost (a read's answer) once it is decoded.
        let head = match read_head(&mut rd, &mut buf).await {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let early = head.payload_len() / UNIT;
        let mut charge = if early > 0 {
            match budget.charge(early, &progress).await {
                Some(c) => Some(c),
                None => break Ok(()),
            }
        } else {
            None
        };
        let frame = match read_body(&mut rd, &buf, head).await {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        progress
            .boundary
            .store(progress.read.load(Ordering::Relaxed), Ordering::Relaxed);
        let req = match frame {
            Frame::Request(r) => r,
            other => {
                break Err(FrameIoError::Handshake(format!(
                    "unexpected {} frame after the hello",
                    frame_name(&other)
                )))
            }
        };
        let units = (req.payload.len().max(req.length as usize) / UNIT).max(1);
        let permit = match charge.take() {
            Some(mut c) if units > early => match budget.charge(units - early, &progress).await {
                Some(more) => {
                    c.merge(more);
                    c
                }
                None => break Ok(()),
            },
            Some(c) => c,
            None => match budget.charge(units, &progress).await {
                Some(c) => c,
                None => break Ok(()),
            },
        };
        let (op, length) = (req.op, req.length);
        match check(&store, &peer, &req) {
            Err(resp) => {
                if !tx.send(op, length, resp, permit) {
                    break Ok(());
                }
            }
            Ok(Next::Ping) => {
                let resp = ping(&store, &peer, &req);
                if !tx.send(op, length, resp, permit) {
                    break Ok(());
                }
            }
            Ok(Next::Admin) => {
                // Admin ops fsync: always on the blocking pool.
                let (tx, store, repl) = (tx.clone(), store.clone(), repl.clone());
                let (volume, request_id) = (req.volume, req.request_id);
                tokio::spawn(async move {
                    let st = store.clone();
                    let resp = tokio::task::spawn_blocking(move || administer(&st, &req)).await;
                    let resp = match resp {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(%volume, error = %e, "admin task failed");
                            Response::status(Status::IoError, request_id, Epoch(0))
                        }
                    };
                    if op == Op::SetMembership && resp.status == Status::Ok {
                        if let Some(c) = store.get(volume) {
                            repl.reconcile_rebuilds(&c);
                        }
                    }
                    tx.send(op, length, resp, permit);
                });
            }
            Ok(Next::Claim(copy)) => {
                // Done before the next frame is read: the connection's later requests are
                // admitted under its claim.
                let client = (peer.id.clone(), req.length);
                let generation = req.offset;
                let c = copy.clone();
                let claimed = tokio::task::spawn_blocking(move || c.claim(client, generation))
                    .await
                    .ok()
                    .flatten();
                let status = match claimed {
                    Some(s) => {
                        sessions.insert(req.volume, s);
                        progress.attached.store(true, Ordering::Relaxed);
                        Status::Ok
                    }
                    None => {
                        tracing::warn!(volume = %req.volume, %peer, generation, "claim refused: a newer connection of this client claimed the volume");
                        Status::NotPrimary
                    }
                };
                if !tx.send(
                    op,
                    length,
                    Response::status(status, req.request_id, copy.epoch()),
                    permit,
                ) {
                    break Ok(());
                }
            }
            Ok(Next::Replicate(copy)) => {
                let (tx, repl, peer) = (tx.clone(), repl.clone(), peer.clone());
                let session = sessions.get(&req.volume).cloned();
                tokio::spawn(async move {
                    let resp = replicate(&repl, copy, req, peer, session).await;
                    tx.send(op, length, resp, permit);
                });
            }
            Ok(Next::Data(copy)) => {
                // Reads and writes the page cache can take without waiting are done right here
                // (a thread hand-off costs more than a 4 KiB copy); everything else runs on the
                // blocking pool so a slow disk never stalls the connection.
                let session = sessions.get(&req.volume).cloned();
                let req = match try_cached(&copy, req, &peer, session.as_ref()) {
                    Ok(resp) => {
                        if !tx.send(op, length, resp, permit) {
                            break Ok(());
                        }
                        continue;
                    }
                    Err(req) => req,
                };
                let (tx, peer) = (tx.clone(), peer.clone());
                tokio::task::spawn_blocking(move || {
                    let resp = execute(&copy, req, &peer, session.as_ref());
                    tx.send(op, length, resp, permit);
                });
            }
        }
    };
    drop(tx);
    // Let in-flight work finish and its responses go out before the socket closes.
    let _ = writer.await;
    result
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::HelloReply(_) => "hello reply",
        Frame::Request(_) => "request",
        Frame::Response(_) => "response",
    }
}

/// The answer to a ping, per copy (R10). Only a peer the copy knows hears its epoch and
/// whether it is lost (and, for its primary, who the copy is: incremental resync, R7); the
/// controller also hears `unknown volume` for a copy this server does not hold. Anyone else
/// hears `ok` whether or not the copy exists (learning that the server is up, and nothing
/// about the volume: a copy without a grant for it and no copy answer alike).
fn ping(store: &Store, peer: &Identity, req: &Request) -> Response {
    let mut resp = Response::status(Status::Ok, req.request_id, Epoch(0));
    match store.get(req.volume) {
        Some(c) if ping_may_see(&c, peer) => {
            resp.epoch = c.epoch();
            if c.is_failed() {
                resp.status = Status::CopyLost;
            } else if peer.role == Role::Storage && !c.is_deleted() {
                resp.payload = c.identity().encode();
                resp.crc = checksum(&resp.payload);
            }
        }
        Some(_) => {}
        None if peer.role == Role::Controller => resp.status = Status::UnknownVolume,
        None => {}
    }
    resp
}

/// Whether a ping from `peer` may learn the copy's epoch: the controller, or a peer the copy's
/// access list allows (docs/security.md).
fn ping_may_see(copy: &Copy, peer: &Identity) -> bool {
    peer.role == Role::Controller
        || crate::copy::authorize(&copy.access(), peer, Op::Ping, Epoch(0)).is_ok()
}

/// What to do with a request that passed [`check`].
enum Next {
    /// Answer `ok` at once.
    Ping,
    /// Copy administration, on the blocking pool.
    Admin,
    /// A data op on this copy (admitted again, decisively, when it runs).
    Data(Arc<Copy>),
    /// A node's mutation or flush on a primary with mirrors: done here and on every mirror.
    Replicate(Arc<Copy>),
    /// A node's new connection claims the copy ([`crate::session`]).
    Claim(Arc<Copy>),
}

/// A node's mutation applied on the local path only (the copy had no mirror to send it to):
/// dirty for every mirror the copy tracks (a dropped mirror, R7).
fn mark_local(copy: &Copy, req_op: Op, offset: u64, len: u32, peer: Role) {
    if peer == Role::Node && is_mutation(req_op) {
        copy.dirty().mark_unacked(offset, u64::from(len), &[]);
    }
}

/// Whether a node's op must reach the primary's mirrors before it is acknowledged.
fn replicated_op(op: Op) -> bool {
    matches!(op, Op::Write | Op::WriteZeroes | Op::Discard | Op::Flush)
}

/// The answer refusing a data request.
fn refusal(req: &Request, r: Refusal) -> Response {
    let (status, epoch) = match r {
        Refusal::Deleted => (Status::UnknownVolume, Epoch(0)),
        Refusal::Stale(e) => (Status::StaleEpoch, e),
        Refusal::NotPrimary(e) => (Status::NotPrimary, e),
        Refusal::Unauthorized => (Status::Unauthorized, Epoch(0)),
        Refusal::ReadOnly(e) => (Status::ReadOnly, e),
        Refusal::Revoked => (Status::StaleEpoch, Epoch(0)),
        Refusal::Lost(e) => (Status::CopyLost, e),
        // Only an abandoned connection hears this; its client moved to a newer one.
        Refusal::Superseded(e) => (Status::NotPrimary, e),
    };
    Response::status(status, req.request_id, epoch)
}

/// Checks a request before any work: `Err` is the answer.
#[allow(clippy::result_large_err)]
fn check(store: &Store, peer: &Identity, req: &Request) -> Result<Next, Response> {
    let fail = |s: Status, e: Epoch| Err(Response::status(s, req.request_id, e));
    if req.op == Op::Ping {
        return Ok(Next::Ping);
    }
    if req.op.is_admin() {
        return if peer.role == Role::Controller {
            Ok(Next::Admin)
        } else {
            fail(Status::Unauthorized, Epoch(0))
        };
    }
    if !matches!(peer.role, Role::Node | Role::Storage) {
        return fail(Status::Unauthorized, Epoch(0));
    }
    // A copy this server does not hold is refused as one the peer may not use: a peer
    // without a grant learns nothing, not even whether the volume exists here.
    let Some(copy) = store.get(req.volume) else {
        return fail(Status::Unauthorized, Epoch(0));
    };
    if req.op == Op::Claim {
        if peer.role != Role::Node {
            return fail(Status::Unauthorized, Epoch(0));
        }
        copy.authorize(peer, Op::Claim, req.epoch)
            .map_err(|r| refusal(req, r))?;
        return Ok(Next::Claim(copy));
    }
    copy.check_request(req.epoch, peer, req.op)
        .map_err(|r| refusal(req, r))?;
    let epoch = copy.epoch();
    if req.op.has_range() {
        if !req.offset.is_multiple_of(SECTOR) || !u64::from(req.length).is_multiple_of(SECTOR) {
            return fail(Status::BadRequest, epoch);
        }
        if !copy.in_range(req.offset, u64::from(req.length)) {
            return fail(Status::OutOfRange, epoch);
        }
    }
    if req.op == Op::Write && !req.crc_ok() {
        return fail(Status::ChecksumMismatch, epoch);
    }
    if peer.role == Role::Node
        && replicated_op(req.op)
        && (!copy.mirrors().is_empty() || !copy.rebuilding().is_empty())
    {
        return Ok(Next::Replicate(copy));
    }
    Ok(Next::Data(copy))
}

/// Whether an op admitted on the local path only must be refused because the copy gained
/// mirrors after [`check`] (a membership change in between): the node resends it and it then
/// takes the replicated path.
fn needs_mirrors(req: &Request, peer: Role, a: &crate::copy::Admitted<'_>) -> bool {
    peer == Role::Node
        && replicated_op(req.op)
        && (!a.mirrors.is_empty() || !a.rebuilding.is_empty())
}

/// The primary's own part of a replicated op.
enum LocalOp {
    Done(Response),
    Running(tokio::task::JoinHandle<Response>),
}

/// Runs a node's mutation or flush on a primary and on its mirrors (in parallel), and answers
/// `ok` only if the local op and every mirror succeeded, or every failed mirror was dropped by
/// the failure handler; `not primary` if a failed mirror could not be dropped.
///
/// Mirrors being rebuilt (R7) get the op too, but their failures never block the answer: the
/// rebuild's pass is voided and starts again over the dirty chunks. Every mirror the copy
/// tracks ([`crate::dirty`]) that did not acknowledge the op (failed, or not sent to) gets its
/// chunks marked dirty. The op holds its chunks' rebuild locks (shared) from before the local
/// I/O until every mirror answered and the marks are made, so a rebuild's copy of a chunk is
/// never older than a write forwarded to the same chunk, and never clears a newer mark.
async fn replicate(
    repl: &Replicator,
    copy: Arc<Copy>,
    req: Request,
    peer: Arc<Identity>,
    session: Option<Session>,
) -> Response {
    let mut chunk_guards = Vec::new();
    if req.op.has_range() {
        for shard in copy.chunk_lock_shards(req.offset, u64::from(req.length)) {
            chunk_guards.push(copy.chunk_lock(shard).read_owned().await);
        }
    }
    // The payload is shared with the mirrors' copy of the request, not copied.
    let mut mirror_req = req.clone();
    let (snap_tx, snap_rx) = tokio::sync::oneshot::channel();
    // A small write is done right here, before the mirrors are sent to (a few µs into the
    // page cache; a hand-off to the blocking pool cost more than the write). Anything larger,
    // or an admission that would have to wait for a membership change, runs on the blocking
    // pool while the mirrors are sent to.
    let inline = req.op == Op::Write && req.length <= INLINE_WRITE_MAX && !req.flags.fua();
    let mut local_done = None;
    let mut snap_tx = Some(snap_tx);
    if inline {
        match copy.try_admit_in(req.epoch, &peer, req.op, session.as_ref()) {
            None => {}
            Some(Err(r)) => {
                // No snapshot: the mirrors are not sent to.
                snap_tx = None;
                local_done = Some(refusal(&req, r));
            }
            Some(Ok(admitted)) => {
                let _ = snap_tx.take().map(|tx| {
                    tx.send((
                        admitted.epoch,
                        admitted.mirrors.clone(),
                        admitted.rebuilding.clone(),
                    ))
                });
                let resp = perform(&copy, &req);
                drop(admitted);
                local_done = Some(resp);
            }
        }
    }
    let local = match local_done {
        Some(resp) => LocalOp::Done(resp),
        None => {
            let local_copy = copy.clone();
            LocalOp::Running(tokio::task::spawn_blocking(move || {
                match local_copy.admit_in(req.epoch, &peer, req.op, session.as_ref()) {
                    Err(r) => refusal(&req, r),
                    Ok(admitted) => {
                        // What the mirrors get: the membership this op was admitted under.
                        let _ = snap_tx.map(|tx| {
                            tx.send((
                                admitted.epoch,
                                admitted.mirrors.clone(),
                                admitted.rebuilding.clone(),
                            ))
                        });
                        let resp = perform(&local_copy, &req);
                        drop(admitted);
                        resp
                    }
                }
            }))
        }
    };
    let mut acked: Option<Vec<std::net::SocketAddr>> = None;
    let mut disk_failed = Vec::new();
    // The rebuilding mirrors of the membership the op was admitted under.
    let mut snapshot_rebuilding = Arc::new(Vec::new());
    let (epoch, failed) = match snap_rx.await {
        Ok((epoch, mirrors, rebuilding)) => {
            snapshot_rebuilding = rebuilding.clone();
            let rebuilding: Vec<_> = rebuilding
                .iter()
                .copied()
                .filter(|&m| {
                    // Until this primary is told this epoch's membership, a rebuilding mirror
                    // may be in sync already (see below): every op must reach it.
                    repl.forward_to_rebuilding(copy.volume(), m, epoch)
                        || !copy.membership_known_at(epoch)
                })
                .collect();
            let targets: Vec<_> = mirrors.iter().chain(rebuilding.iter()).copied().collect();
            mirror_req.epoch = epoch;
            let failed = if targets.is_empty() {
                Vec::new()
            } else {
                repl.send_all_status(&targets, &mirror_req).await
            };
            // A mirror answering `io error` may have lost writes it acknowledged (a failed
            // write-back fails its copy, and a restart clears that): its map is void.
            disk_failed = failed
                .iter()
                .filter(|(_, st)| matches!(st, Some(Status::IoError | Status::CopyLost)))
                .map(|&(m, _)| m)
                .collect();
            let failed: Vec<_> = failed.into_iter().map(|(m, _)| m).collect();
            acked = Some(
                targets
                    .iter()
                    .copied()
                    .filter(|m| !failed.contains(m))
                    .collect(),
            );
            // Rebuilding mirrors that failed are handled below, with those not sent to.
            let failed: Vec<_> = failed
                .into_iter()
                .filter(|m| !rebuilding.contains(m))
                .collect();
            (epoch, failed)
        }
        Err(_) => (Epoch(0), Vec::new()),
    };
    let resp = match local {
        LocalOp::Done(r) => r,
        LocalOp::Running(task) => match task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(volume = %copy.volume(), error = %e, "local I/O task failed");
                Response::status(Status::IoError, mirror_req.request_id, copy.epoch())
            }
        },
    };
    // Applied here (or maybe partly, if it failed): every tracked mirror that did not
    // acknowledge it has these chunks dirty, before the chunk locks go (a resync pass copies
    // a chunk under its lock, clearing its bit first).
    // Then every rebuilding mirror that missed the op (not sent to, or it failed) is told so,
    // after the mark: its rebuild pass is void (it starts again over the dirty chunks, which
    // now include this op's), and the op blocks (R7's rejoin window) if this primary asked to
    // put that mirror in sync at the op's epoch, or has not been told this epoch's membership
    // since it started (it may have asked before a crash, and the controller may have said
    // yes). The order matters: mark, then `rebuild_missed` (sets the pass's `failed`, then
    // reads `syncing_at`), against the rebuild task's store of `syncing_at` then read of
    // `failed` before it asks: either the task sees the miss and does not ask, or the op sees
    // the ask and blocks.
    let mut refuse_for = Vec::new();
    if let Some(acked) = &acked {
        if is_mutation(mirror_req.op) {
            copy.dirty()
                .mark_unacked(mirror_req.offset, u64::from(mirror_req.length), acked);
        }
        for &m in snapshot_rebuilding.iter().filter(|m| !acked.contains(m)) {
            if repl.rebuild_missed(copy.volume(), m, epoch) || !copy.membership_known_at(epoch) {
                refuse_for.push(m);
            }
        }
    }
    for m in disk_failed {
        copy.dirty().forget(m);
    }
    drop(chunk_guards);
    if resp.status != Status::Ok {
        return resp;
    }
    // A rebuilding mirror that may already be in the controller's in-sync set missed the op:
    // like an in-sync mirror's failure, the op is acknowledged only once the controller
    // dropped it at a newer epoch; if the controller moved on (it put the mirror in sync), the
    // answer is `not primary` and the node retries once this primary has the new membership.
    for m in refuse_for {
        tracing::warn!(volume = %copy.volume(), mirror = %m, %epoch, "a mirror that may be in sync missed a write; asking the controller to drop it");
        if !repl.mirror_failed(&copy, m, epoch).await {
            return Response::status(Status::NotPrimary, resp.request_id, copy.epoch());
        }
    }
    for m in failed {
        if !repl.mirror_failed(&copy, m, epoch).await {
            return Response::status(Status::NotPrimary, resp.request_id, copy.epoch());
        }
    }
    resp
}

/// Reads up to this size may be served inline from the page cache.
const INLINE_MAX: u32 = 256 << 10;

/// Buffered writes up to this size are done on the connection's task, without a thread
/// hand-off. ext4 refuses `RWF_NOWAIT` buffered writes, so the kernel cannot tell beforehand
/// whether one would wait; in practice a small write is a copy into the page cache (2–5 µs),
/// and only dirty-page throttling (far past the background writeback threshold) makes it
/// sleep, stalling this worker and not the other. `block_in_place` was tried first: it hands
/// the worker's scheduler to another thread on every call, which cost as much as the
/// blocking pool (docs/performance.md).
const INLINE_WRITE_MAX: u32 = 64 << 10;

/// Serves a checked read or plain write without blocking if the page cache allows; gives the
/// request back otherwise.
#[allow(clippy::result_large_err)]
fn try_cached(
    copy: &Copy,
    req: Request,
    peer: &Identity,
    session: Option<&Session>,
) -> Result<Response, Request> {
    if req.length > INLINE_MAX || req.flags.fua() || !matches!(req.op, Op::Read | Op::Write) {
        return Err(req);
    }
    // Never wait for the gate on the connection's task: a membership change holds it across
    // an fdatasync.
    let _admitted = match copy.try_admit_in(req.epoch, peer, req.op, session) {
        None => return Err(req),
        Some(Err(r)) => return Ok(refusal(&req, r)),
        Some(Ok(a)) if needs_mirrors(&req, peer.role, &a) => {
            return Ok(Response::status(
                Status::NotPrimary,
                req.request_id,
                a.epoch,
            ))
        }
        Some(Ok(a)) => a,
    };
    let epoch = copy.epoch();
    match req.op {
        Op::Read => match copy.try_read_cached_new(req.offset, req.length as usize) {
            Ok(Some(data)) => Ok(Response {
                status: Status::Ok,
                request_id: req.request_id,
                epoch,
                crc: checksum(&data),
                payload: data,
            }),
            _ => Err(req),
        },
        Op::Write => {
            let (offset, len) = (req.offset, req.length);
            let resp = match copy.try_write_cached(req.offset, &req.payload) {
                Ok(true) => Response::status(Status::Ok, req.request_id, epoch),
                // Where the filesystem cannot tell whether a write would block, a small
                // buffered write into the page cache is still done here (see
                // `INLINE_WRITE_MAX`); larger ones go to the blocking pool.
                _ if req.length <= INLINE_WRITE_MAX => perform(copy, &req),
                _ => return Err(req),
            };
            mark_local(copy, Op::Write, offset, len, peer.role);
            Ok(resp)
        }
        _ => Err(req),
    }
}

/// Admits a checked request on its copy and runs it (blocking).
fn execute(copy: &Copy, req: Request, peer: &Identity, session: Option<&Session>) -> Response {
    match copy.admit_in(req.epoch, peer, req.op, session) {
        Ok(a) if needs_mirrors(&req, peer.role, &a) => {
            Response::status(Status::NotPrimary, req.request_id, a.epoch)
        }
        Ok(_admitted) => {
            let (op, offset, len) = (req.op, req.offset, req.length);
            let resp = perform(copy, &req);
            mark_local(copy, op, offset, len, peer.role);
            resp
        }
        Err(r) => refusal(&req, r),
    }
}

/// Runs an admitted request (blocking).
fn perform(copy: &Copy, req: &Request) -> Response {
    let epoch = copy.epoch();
    let result: Result<Vec<u8>, CopyError> = match req.op {
        Op::Read => copy.read_new(req.offset, req.length as usize),
        Op::Write => copy
            .write(req.offset, &req.payload)
            .and_then(|()| {
                if req.flags.fua() {
                    copy.flush()
                } else {
                    Ok(())
                }
            })
            .map(|()| Vec::new()),
        Op::Flush => copy.flush().map(|()| Vec::new()),
        Op::Discard | Op::WriteZeroes => copy
            .zero_range(req.offset, u64::from(req.length))
            .map(|()| Vec::new()),
        // Routed elsewhere by `check`.
        Op::Ping | Op::Claim => Ok(Vec::new()),
        Op::CreateCopy | Op::DeleteCopy | Op::SetMembership | Op::Resize => {
            // Routed to `administer` by `check`; never reaches here.
            return Response::status(Status::BadRequest, req.request_id, epoch);
        }
    };
    match result {
        Ok(payload) => Response {
            status: Status::Ok,
            request_id: req.request_id,
            epoch,
            crc: checksum(&payload),
            payload,
        },
        Err(e) => {
            // A failed I/O failed the copy (R10): the client waits for another copy.
            let status = if copy.is_failed() {
                Status::CopyLost
            } else {
                Status::IoError
            };
            tracing::warn!(volume = %req.volume, op = ?req.op, offset = req.offset, len = req.length, error = %e, %status, "request failed");
            Response::status(status, req.request_id, epoch)
        }
    }
}

/// The copy role of a wire role code (the decoder already refused unknown ones).
fn copy_role(code: u32) -> Option<CopyRole> {
    Some(match MemberRole::from_u32(code)? {
        MemberRole::Primary => CopyRole::Primary,
        MemberRole::Mirror => CopyRole::Mirror,
    })
}

/// The status answering a failed admin op.
fn admin_status(e: &CopyError) -> Status {
    match e {
        CopyError::BadSize(_) | CopyError::Shrink { .. } | CopyError::Exists(_) => {
            Status::BadRequest
        }
        CopyError::StaleEpoch { .. } => Status::StaleEpoch,
        CopyError::Deleted => Status::UnknownVolume,
        CopyError::Io { .. }
        | CopyError::NoValidHeader { .. }
        | CopyError::NewerFormat { .. }
        | CopyError::BadMembers { .. }
        | CopyError::Failed => Status::IoError,
    }
}

/// Runs a controller's copy administration request (blocking: it fsyncs) and answers with the
/// copy's epoch after it (0 if there is no copy). Every op is idempotent, so the controller
/// may retry any of them.
fn administer(store: &Store, req: &Request) -> Response {
    let v = req.volume;
    let ok = |c: &Copy| Response::status(Status::Ok, req.request_id, c.epoch());
    let current = || store.get(v).map(|c| c.epoch()).unwrap_or_default();
    let failed = |e: CopyError| {
        let status = admin_status(&e);
        let epoch = match e {
            CopyError::StaleEpoch { current, .. } => current,
            _ => current(),
        };
        tracing::warn!(volume = %v, op = ?req.op, %status, error = %e, "admin request refused");
        Response::status(status, req.request_id, epoch)
    };
    let result = match req.op {
        Op::CreateCopy => {
            let Some(role) = copy_role(req.length) else {
                return Response::status(Status::BadRequest, req.request_id, current());
            };
            store
                .create(v, req.offset, role, req.epoch)
                .and_then(|c| {
                    // An existing copy of the same size moves to the requested membership,
                    // unless that is older than its own (a late retry): then it stays.
                    // A new copy has no mirrors; an existing one keeps its list.
                    match c.set_membership_rebuilding(
                        role,
                        req.epoch,
                        req.epoch,
                        &c.mirrors(),
                        &c.rebuilding(),
                    ) {
                        Ok(()) | Err(CopyError::StaleEpoch { .. }) => Ok(c),
                        Err(e) => Err(e),
                    }
                })
                .map(|c| {
                    tracing::info!(volume = %v, size = c.size(), role = ?c.role(), epoch = %c.epoch(), "copy created");
                    ok(&c)
                })
        }
        Op::DeleteCopy => store.delete(v).map(|gone| {
            tracing::info!(volume = %v, existed = gone.is_some(), "copy deleted");
            match gone {
                Some(c) => ok(&c),
                None => Response::status(Status::Ok, req.request_id, Epoch(0)),
            }
        }),
        Op::SetMembership => {
            let Some(role) = copy_role(req.length) else {
                return Response::status(Status::BadRequest, req.request_id, current());
            };
            let Some(c) = store.get(v) else {
                return Response::status(Status::UnknownVolume, req.request_id, Epoch(0));
            };
            // The decoder checked the list; a list it refused never gets here.
            let list = match keel_proto::members::MemberList::parse(&req.payload) {
                Ok(m) => m,
                Err(_) => return Response::status(Status::BadRequest, req.request_id, current()),
            };
            c.set_members(role, req.epoch, Epoch(req.offset), &list)
                .map(|()| {
                    let grants: Vec<String> = list
                        .grants
                        .iter()
                        .map(|g| format!("{} {}", g.node, g.access.as_str()))
                        .collect();
                    tracing::info!(volume = %v, role = ?role, epoch = %req.epoch, writer_epoch = %c.writer_epoch(), mirrors = ?list.in_sync, rebuilding = ?list.rebuilding, primary = ?list.primary, grants = ?grants, "membership set");
                    ok(&c)
                })
        }
        Op::Resize => {
            let Some(c) = store.get(v) else {
                return Response::status(Status::UnknownVolume, req.request_id, Epoch(0));
            };
            c.resize(req.offset).map(|()| {
                tracing::info!(volume = %v, size = req.offset, "copy resized");
                ok(&c)
            })
        }
        Op::Read | Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes | Op::Ping | Op::Claim => {
            // Routed to the data path by `check`; never reaches here.
            return Response::status(Status::BadRequest, req.request_id, current());
        }
    };
    result.unwrap_or_else(failed)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn stats_count_answers_by_op_and_status() {
        let s = Stats::default();
        s.record(Op::Read, 4096, Status::Ok);
        s.record(Op::Read, 512, Status::Ok);
        s.record(Op::Write, 8192, Status::Ok);
        s.record(Op::Write, 8192, Status::IoError);
        s.record(Op::Write, 512, Status::StaleEpoch);
        s.record(Op::Read, 512, Status::OutOfRange);
        s.record(Op::Flush, 0, Status::Ok);
        s.record(Op::CreateCopy, 0, Status::Ok);
        s.record(Op::Resize, 0, Status::BadRequest);
        assert_eq!(
            s.snapshot(),
            StatsSnapshot {
                reads: 2,
                writes: 1,
                bytes_read: 4608,
                bytes_written: 8192,
                errors: 1,
                refused: 3,
            }
        );
    }

    /// The daemon-wide budget never goes over, and a waiter is woken when units come back.
    #[test]
    fn global_budget_waits_and_wakes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let b = GlobalBudget::new(4);
            assert!(b.try_take(3));
            assert!(!b.try_take(2));
            let b2 = b.clone();
            let waiter = tokio::spawn(async move { b2.take(2).await });
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            b.give(3);
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .expect("task");
            assert_eq!(b.used.load(Ordering::Relaxed), 2);
            b.give(2);
            assert!(b.idle());
        });
    }

    #[test]
    fn admin_errors_map_to_statuses() {
        assert_eq!(admin_status(&CopyError::BadSize(1)), Status::BadRequest);
        assert_eq!(
            admin_status(&CopyError::Shrink {
                requested: 1,
                current: 2
            }),
            Status::BadRequest
        );
        assert_eq!(
            admin_status(&CopyError::Exists(keel_proto::VolumeId(1))),
            Status::BadRequest
        );
        assert_eq!(
            admin_status(&CopyError::StaleEpoch {
                requested: Epoch(1),
                current: Epoch(2)
            }),
            Status::StaleEpoch
        );
        assert_eq!(admin_status(&CopyError::Deleted), Status::UnknownVolume);
        assert_eq!(admin_status(&CopyError::Failed), Status::IoError);
        assert_eq!(copy_role(0), Some(CopyRole::Primary));
        assert_eq!(copy_role(1), Some(CopyRole::Mirror));
        assert_eq!(copy_role(2), None);
    }
}
