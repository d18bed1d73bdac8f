//! The connection from keel-vhost to a volume's storage server.
//!
//! One task per volume owns the connection and the table of requests in flight. Callers
//! submit wire operations through a channel and are called back exactly once with the outcome.
//! When the connection breaks, times out or the server says it is not (yet) primary, the task
//! reconnects with backoff and resends every request still in flight, in id order: the guest
//! sees a stall, never an error. Only answers that say the request itself is wrong (out of
//! range, I/O error on the copy, fenced by a newer epoch, ...) fail a request — and, if
//! [`ClientConfig::io_fail_after`] is set, a request not completed that long after its
//! submission (R9 in docs/replication.md: with no copy answering, the guest waits, then fails).
//!
//! **Epochs.** Every request carries the client's current epoch, which the node manager can
//! change at run time ([`VolumeClient::set_epoch`]); requests sent from then on, resends
//! included, carry the new one. A `stale epoch` answer to a request sent before the epoch moved
//! on (the server's epoch is not newer than ours) is resent at once with the new epoch. Otherwise
//! it fails the request, except on read-only attachments
//! ([`ClientConfig::retry_stale_epoch`]): the controller bumps the epoch when it takes a volume
//! from a writer by force and then pushes the new epoch to the readers, so a reader parks the
//! request and resends it with backoff (50 ms to 2 s) until the new epoch arrives, which resends
//! every parked request at once.
//!
//! **Switching servers.** The storage server is shared and updatable like the epoch
//! ([`VolumeClient::set_server`]): when the node manager names a new primary, the task drops
//! the current connection (or abandons a connection attempt or backoff in progress), connects
//! to the new address with the usual backoff, and resends every request in flight, parked ones
//! included, exactly as after a broken connection. The guest sees a stall, never an error.
//!
//! **An unanswered primary.** The task keeps a *silence clock* ([`Silence`]): it starts when
//! the task begins waiting for the server (a request or ping sent while nothing else was
//! awaited, the connection lost, a new server named), restarts at every answer while something
//! is still awaited, and stops when nothing is. A connection with nothing to say for
//! half of [`ClientConfig::primary_timeout`] sends a ping, so an idle volume notices a dead
//! primary too. Once the clock has run for `primary_timeout`, [`VolumeClient::unanswered`]
//! names the server (the daemon writes it to its status file, the node manager reports it to
//! the controller). That is all it does: reconnecting and resending still wait for
//! [`ClientConfig::request_timeout`], so a slow but living primary is not abandoned early.
//!
//! **Writes to the socket are bounded** by the request timeout too: a stopped server's full
//! socket would otherwise hold the task in a write, with no timeouts, expiries or server
//! switches until it drains. A write given up on drops the connection (a frame may be half
//! sent), and the usual reconnect and resend follow.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_proto::frame::{checksum, MAX_PAYLOAD};
use keel_proto::io::{connect, read_frame, ClientStream, WriteBatch};
use keel_proto::{Epoch, Frame, Op, ReqFlags, Request, Role, Status, VolumeId};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

/// The result of one wire operation.
#[derive(Debug)]
pub enum Outcome {
    /// Success; read data for reads.
    Ok(Vec<u8>),
    /// The storage side refused the request.
    Failed(Status),
    /// Not completed within [`ClientConfig::io_fail_after`] of its submission: an I/O error
    /// for the guest. The client logs these once per burst, so callers need not.
    GaveUp,
}

/// Called once with the outcome.
pub type Done = Box<dyn FnOnce(Outcome) + Send>;

/// One operation to send.
pub struct WireOp {
    pub op: Op,
    pub flags: ReqFlags,
    pub offset: u64,
    pub length: u32,
    pub payload: Vec<u8>,
    pub done: Done,
}

/// Where and how to reach a volume.
#[derive(Clone)]
pub struct ClientConfig {
    /// The server to connect to at first (see [`VolumeClient::set_server`]).
    pub server: SocketAddr,
    pub volume: VolumeId,
    /// The epoch requests carry at first (see [`VolumeClient::set_epoch`]).
    pub epoch: Epoch,
    pub tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// A request unanswered for this long makes the client reconnect and resend.
    pub request_timeout: Duration,
    /// Treat `stale epoch` as retryable: park the request and resend it with backoff until the
    /// node manager gives a newer epoch (read-only attachments). Otherwise it fails the request.
    pub retry_stale_epoch: bool,
    /// The server counts as unanswered ([`VolumeClient::unanswered`]) once it has said nothing
    /// for this long while the client waited for it (or could not connect). An idle connection
    /// is pinged every half of it.
    pub primary_timeout: Duration,
    /// A request not completed this long after its submission fails with
    /// [`Outcome::GaveUp`] (R9). `None`: requests wait forever.
    pub io_fail_after: Option<Duration>,
    /// This client's key in its claims (storage-server `session`): each new connection claims
    /// the volume with a generation above every earlier one, so frames left on an abandoned
    /// connection are refused rather than applied after the requests resent on the new one.
    pub client_key: u32,
}

/// Connects and claims the volume at `generation` before anything else is sent (the answer
/// comes first: the server handles the claim before it reads the next frame). A server that
/// does not hold the volume, or holds no grant for this node, answers `unauthorized`: an
/// error, retried with backoff while the guest stalls (the grant may be on its way). `not
/// primary` means a newer connection of this client claimed already (a clock that went back):
/// an error, retried with a new generation. Any other answer: the connection is used, and its
/// requests get that answer's error as before.
async fn connect_and_claim(
    cfg: &ClientConfig,
    server: SocketAddr,
    epoch: Epoch,
    generation: u64,
) -> Result<Option<(ClientStream, keel_proto::tls::Identity)>, keel_proto::io::FrameIoError> {
    let (mut s, peer) = connect(server, cfg.tls.clone(), Role::Storage).await?;
    let mut claim = Request::new(Op::Claim, 0, cfg.volume, epoch);
    claim.offset = generation;
    claim.length = cfg.client_key;
    s.write_all(&Frame::Request(claim).to_bytes()).await?;
    s.flush().await?;
    let mut buf = Vec::new();
    match read_frame(&mut s, &mut buf).await? {
        Some(Frame::Response(r)) if r.request_id == 0 && r.status == Status::NotPrimary => {
            Err(keel_proto::io::FrameIoError::Handshake(format!(
                "claim at generation {generation} refused: a newer connection of this client exists"
            )))
        }
        // No grant for this node there (yet): retried with backoff, the guest stalls.
        Some(Frame::Response(r)) if r.request_id == 0 && r.status == Status::Unauthorized => {
            Ok(None)
        }
        Some(Frame::Response(r)) if r.request_id == 0 => Ok(Some((s, peer))),
        Some(other) => Err(keel_proto::io::FrameIoError::Handshake(format!(
            "expected the claim's answer, got {other:?}"
        ))),
        None => Err(keel_proto::io::FrameIoError::Handshake(
            "server closed the connection after the claim".into(),
        )),
    }
}

/// The generation of a new connection's claim: the wall clock in milliseconds (so a restarted
/// keel-vhost claims above its predecessor), and above the previous one.
fn next_generation(previous: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.max(previous.saturating_add(1))
}

/// The silence clock: since when the client has been waiting for its server without an answer.
///
/// Pure bookkeeping (the caller passes the time), shared between the connection task, which
/// moves it, and [`VolumeClient::unanswered`], which reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Silence {
    since: Option<Instant>,
}

impl Silence {
    /// Something was sent (or a connection is being sought): the clock starts unless it runs.
    pub fn waiting(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// The server answered: the clock restarts if something is still awaited, else stops.
    pub fn answered(&mut self, now: Instant, still_waiting: bool) {
        self.since = still_waiting.then_some(now);
    }

    /// A new server: the clock restarts for it.
    pub fn restart(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// Since when the client has waited, if it has.
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// How long the client has waited, once that reaches `timeout`.
    pub fn unanswered_for(&self, now: Instant, timeout: Duration) -> Option<Duration> {
        let waited = now.saturating_duration_since(self.since?);
        (waited >= timeout).then_some(waited)
    }
}

/// The server the connection task talks to and its silence clock.
#[derive(Debug, Clone, Copy)]
struct Liveness {
    server: SocketAddr,
    silence: Silence,
}

/// What [`VolumeClient::unanswered`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unanswered {
    /// The server that has not answered.
    pub server: SocketAddr,
    /// The epoch requests carry.
    pub epoch: Epoch,
    /// Since when the client has waited for it.
    pub since: Instant,
    /// How long, at the time of the call.
    pub waited: Duration,
}

/// The epoch requests carry and the server they go to, shared by the handles and the
/// connection task.
struct EpochCell {
    epoch: AtomicU64,
    /// The attachment was taken away (forced detach or takeover): every request fails.
    revoked: AtomicBool,
    /// Wakes the task to resend parked requests with the new epoch.
    changed: Notify,
    /// The storage server holding the primary copy.
    server: Mutex<SocketAddr>,
    /// Wakes the task to drop its connection and connect to the new server.
    server_changed: Notify,
    /// The server the task talks to, and for how long it has not answered.
    liveness: Mutex<Liveness>,
    primary_timeout: Duration,
    /// Requests failed with [`Outcome::GaveUp`] since the start.
    gave_up: AtomicU64,
}

impl EpochCell {
    fn new(server: SocketAddr, epoch: Epoch, primary_timeout: Duration) -> EpochCell {
        EpochCell {
            epoch: AtomicU64::new(epoch.0),
            revoked: AtomicBool::new(false),
            changed: Notify::new(),
            server: Mutex::new(server),
            server_changed: Notify::new(),
            // Not connected yet: waiting for the server from the start.
            liveness: Mutex::new(Liveness {
                server,
                silence: Silence {
                    since: Some(Instant::now()),
                },
            }),
            primary_timeout,
            gave_up: AtomicU64::new(0),
        }
    }

    fn get(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    fn server(&self) -> SocketAddr {
        *self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to a volume's connection task.
#[derive(Clone)]
pub struct VolumeClient {
    tx: mpsc::UnboundedSender<WireOp>,
    epoch: Arc<EpochCell>,
}

impl VolumeClient {
    /// Starts the connection task on `rt`.
    pub fn start(cfg: ClientConfig, rt: &tokio::runtime::Handle) -> VolumeClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let epoch = Arc::new(EpochCell::new(cfg.server, cfg.epoch, cfg.primary_timeout));
        rt.spawn(run(cfg, epoch.clone(), rx));
        VolumeClient { tx, epoch }
    }

    /// The epoch requests are sent with now.
    pub fn epoch(&self) -> Epoch {
        self.epoch.get()
    }

    /// Sets the epoch every request sent from now on carries (resends of requests already in
    /// flight included); requests parked on a `stale epoch` answer are resent at once.
    pub fn set_epoch(&self, epoch: Epoch) {
        let old = self.epoch.epoch.swap(epoch.0, Ordering::AcqRel);
        if old != epoch.0 {
            self.epoch.changed.notify_one();
        }
    }

    /// The storage server requests go to (or will, once connected).
    pub fn server(&self) -> SocketAddr {
        self.epoch.server()
    }

    /// Switches to another storage server (a new primary): the connection task drops its
    /// connection, connects to `server` with the usual backoff and resends every request in
    /// flight (parked ones included). Returns whether the address changed.
    pub fn set_server(&self, server: SocketAddr) -> bool {
        let old = std::mem::replace(
            &mut *self.epoch.server.lock().unwrap_or_else(|p| p.into_inner()),
            server,
        );
        if old != server {
            // The old server's silence is no longer ours to report.
            *self.epoch.liveness() = Liveness {
                server,
                silence: Silence {
                    since: Some(Instant::now()),
                },
            };
            self.epoch.server_changed.notify_one();
        }
        old != server
    }

    /// The server has not answered for at least [`ClientConfig::primary_timeout`] while the
    /// client waited for it (requests, a ping, or a connection).
    pub fn unanswered(&self) -> Option<Unanswered> {
        let live = *self.epoch.liveness();
        let now = Instant::now();
        let waited = live
            .silence
            .unanswered_for(now, self.epoch.primary_timeout)?;
        Some(Unanswered {
            server: live.server,
            epoch: self.epoch.get(),
            since: live.silence.since()?,
            waited,
        })
    }

    /// How many requests failed because they were not completed within
    /// [`ClientConfig::io_fail_after`].
    pub fn gave_up(&self) -> u64 {
        self.epoch.gave_up.load(Ordering::Acquire)
    }

    /// Fails every request from now on with an I/O error, including read-only requests
    /// waiting for a newer epoch: the node manager says the attachment was taken away.
    pub fn revoke(&self) {
        if !self.epoch.revoked.swap(true, Ordering::AcqRel) {
            self.epoch.changed.notify_one();
        }
    }

    /// Whether [`VolumeClient::revoke`] was called.
    pub fn is_revoked(&self) -> bool {
        self.epoch.revoked()
    }

    /// Queues an operation. If the task is gone (shutdown) or the attachment was revoked, the
    /// operation fails with an I/O error at once.
    pub fn submit(&self, op: WireOp) {
        if self.epoch.revoked() {
            (op.done)(Outcome::Failed(Status::IoError));
            return;
        }
        if let Err(mpsc::error::SendError(op)) = self.tx.send(op) {
            (op.done)(Outcome::Failed(Status::IoError));
        }
    }
}

struct Pending {
    req: Request,
    done: Done,
    /// When the request was admitted: [`ClientConfig::io_fail_after`] counts from here.
    submitted: Instant,
    /// When it was last sent: [`ClientConfig::request_timeout`] counts from here.
    sent: Instant,
    retries: u32,
    /// Refused with `stale epoch` and waiting in [`Table::parked`] to be resent.
    parked: bool,
}

const MAX_CRC_RETRIES: u32 = 3;
const STALE_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// A claim refused for want of a grant for this long is logged as a warning.
const GRANT_WARN_AFTER: Duration = Duration::from_secs(10);
const STALE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The requests in flight and what the task needs to answer them.
struct Table {
    /// In id order, which is admission order: the first entry is the oldest submission.
    inflight: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Requests refused with `stale epoch` on a read-only attachment, to resend at `resend_at`
    /// or as soon as the epoch changes.
    parked: Vec<u64>,
    resend_at: Option<tokio::time::Instant>,
    stale_backoff: Duration,
    /// A `stale epoch` was logged since the last success (keeps the log to one line a stall).
    stale_logged: bool,
    /// `unauthorized` was logged since the last success (the server holds no grant for this
    /// node yet: logged once).
    unauthorized_logged: bool,
    /// `copy lost` was logged since the last success (logged once a stall).
    lost_logged: bool,
    /// Answers other than `copy lost` received on this connection: a batch of answers that
    /// leaves it unchanged does not stop the silence clock (R10: a server whose copy is lost
    /// counts as unanswered, so the node reports it and the controller moves the volume).
    answers: u64,
    epoch: Arc<EpochCell>,
    retry_stale_epoch: bool,
    /// The ping awaiting its answer on this connection: id and when it was sent.
    ping: Option<(u64, Instant)>,
    /// When this connection last heard from the server (an answer, or the handshake).
    last_heard: Instant,
    /// Ids given up on ([`Outcome::GaveUp`]) whose answers may still come on this connection.
    given_up: HashSet<u64>,
    io_fail_after: Option<Duration>,
    /// Requests given up on since the server last completed one (one log line per burst).
    burst: u64,
}

impl Table {
    fn new(
        retry_stale_epoch: bool,
        io_fail_after: Option<Duration>,
        epoch: Arc<EpochCell>,
    ) -> Table {
        Table {
            inflight: BTreeMap::new(),
            next_id: 1,
            parked: Vec::new(),
            resend_at: None,
            stale_backoff: STALE_BACKOFF_MIN,
            stale_logged: false,
            unauthorized_logged: false,
            lost_logged: false,
            answers: 0,
            epoch,
            retry_stale_epoch,
            ping: None,
            last_heard: Instant::now(),
            given_up: HashSet::new(),
            io_fail_after,
            burst: 0,
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Registers a new operation; returns its id. It is sent by the caller (connected) or by
    /// the resend after the next connection.
    fn admit(&mut self, op: WireOp, volume: VolumeId, now: Instant) -> u64 {
        let id = self.take_id();
        let mut req = Request::new(op.op, id, volume, self.epoch.get());
        req.flags = op.flags;
        req.offset = op.offset;
        req.length = op.length;
        req.crc = checksum(&op.payload);
        req.payload = op.payload.into();
        self.inflight.insert(
            id,
            Pending {
                req,
                done: op.done,
                submitted: now,
                sent: now,
                retries: 0,
                parked: false,
            },
        );
        id
    }

    /// Encodes `id` into `out` with the current epoch and restarts its timeout.
    fn resend(&mut self, id: u64, out: &mut WriteBatch) {
        let epoch = self.epoch.get();
        if let Some(p) = self.inflight.get_mut(&id) {
            p.req.epoch = epoch;
            p.sent = Instant::now();
            p.parked = false;
            out.push_request_ref(&p.req);
        }
    }

    /// Encodes every request in flight (after a reconnect), oldest first.
    fn resend_all(&mut self, out: &mut WriteBatch) {
        self.parked.clear();
        self.resend_at = None;
        let ids: Vec<u64> = self.inflight.keys().copied().collect();
        for id in ids {
            self.resend(id, out);
        }
    }

    /// Encodes every parked request (their backoff ran out, or the epoch changed).
    fn resend_parked(&mut self, out: &mut WriteBatch) {
        self.resend_at = None;
        for id in std::mem::take(&mut self.parked) {
            self.resend(id, out);
        }
    }

    fn park(&mut self, id: u64) {
        if let Some(p) = self.inflight.get_mut(&id) {
            p.parked = true;
            self.parked.push(id);
        }
        if self.resend_at.is_none() {
            self.resend_at = Some(tokio::time::Instant::now() + self.stale_backoff);
            self.stale_backoff = (self.stale_backoff * 2).min(STALE_BACKOFF_MAX);
        }
    }

    /// Whether a request (parked ones excluded) or the ping has gone unanswered for longer
    /// than `timeout`.
    fn timed_out(&self, timeout: Duration) -> bool {
        let now = Instant::now();
        self.ping
            .is_some_and(|(_, sent)| now.duration_since(sent) > timeout)
            || self
                .inflight
                .values()
                .any(|p| !p.parked && now.duration_since(p.sent) > timeout)
    }

    /// Whether an answer from the server is awaited (a request not parked, or the ping).
    fn awaiting(&self) -> bool {
        self.ping.is_some() || self.inflight.values().any(|p| !p.parked)
    }

    /// Something was sent to the server (or is about to be): the silence clock runs.
    fn note_sent(&self, now: Instant) {
        self.epoch.liveness().silence.waiting(now);
    }

    /// The server answered: the silence clock restarts, or stops if nothing else is awaited.
    fn note_answer(&mut self, now: Instant) {
        self.last_heard = now;
        let waiting = self.awaiting();
        self.epoch.liveness().silence.answered(now, waiting);
    }

    /// When the oldest request runs out of [`ClientConfig::io_fail_after`], if one is set.
    fn next_expiry(&self) -> Option<Instant> {
        let after = self.io_fail_after?;
        self.inflight.values().next().map(|p| p.submitted + after)
    }

    /// Fails every request submitted at least [`ClientConfig::io_fail_after`] before `now`
    /// with [`Outcome::GaveUp`]; returns how many.
    fn expire(&mut self, now: Instant) -> u64 {
        let Some(after) = self.io_fail_after else {
            return 0;
        };
        let mut n = 0u64;
        while let Some(entry) = self.inflight.first_entry() {
            if now.saturating_duration_since(entry.get().submitted) < after {
                break;
            }
            let (id, p) = entry.remove_entry();
            self.given_up.insert(id);
            (p.done)(Outcome::GaveUp);
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        let inflight = &self.inflight;
        self.parked.retain(|id| inflight.contains_key(id));
        if self.burst == 0 {
            tracing::warn!(
                server = %self.epoch.liveness().server,
                io_fail_after = ?after,
                failed = n,
                "storage did not complete requests within --io-fail-after-ms: failing them with an I/O error for the guest (logged once until storage completes a request again)"
            );
        }
        self.burst += n;
        self.epoch.gave_up.fetch_add(n, Ordering::AcqRel);
        n
    }

    /// A request completed: ends a burst of requests given up on.
    fn completed_one(&mut self) {
        if self.burst > 0 {
            tracing::info!(
                failed = self.burst,
                "storage completes requests again; requests failed for lack of an answer in the meantime"
            );
            self.burst = 0;
        }
    }
}

/// How often a connected task checks its timeouts and whether to ping.
fn tick_period(primary_timeout: Duration) -> Duration {
    (primary_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Writes `out` to the server. A stopped server's full socket makes the write wait, so it is
/// bounded by `timeout` (the request timeout), and meanwhile requests still run out of
/// [`ClientConfig::io_fail_after`] and a new server named ends the wait. `Err` says why the
/// connection must be dropped (a partly written frame is never continued).
async fn send<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut WriteBatch,
    t: &mut Table,
    server: SocketAddr,
    timeout: Duration,
) -> Result<(), &'static str> {
    let write = async { out.write_to(wr).await };
    tokio::pin!(write);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let epoch = t.epoch.clone();
    loop {
        let expiry = t.next_expiry();
        tokio::select! {
            r = &mut write => return r.map_err(|_| "write failed"),
            _ = &mut deadline => return Err("the server took no data within the request timeout"),
            _ = sleep_until_opt(expiry) => { t.expire(Instant::now()); }
            _ = epoch.server_changed.notified() => {
                if epoch.server() != server {
                    return Err("switching to another storage server");
                }
            }
        }
    }
}

async fn run(cfg: ClientConfig, epoch: Arc<EpochCell>, mut rx: mpsc::UnboundedReceiver<WireOp>) {
    let mut t = Table::new(cfg.retry_stale_epoch, cfg.io_fail_after, epoch);
    let mut backoff = Duration::from_millis(50);
    let ping_every = (cfg.primary_timeout / 2).max(Duration::from_millis(5));
    let mut generation = 0u64;
    // Since when the server has refused the claim for want of a grant (logged once at
    // INFO: expected right after an attach; at WARN once it lasts GRANT_WARN_AFTER).
    let mut no_grant_since: Option<Instant> = None;
    'reconnect: loop {
        let server = t.epoch.server();
        {
            let mut live = t.epoch.liveness();
            if live.server != server {
                *live = Liveness {
                    server,
                    silence: Silence {
                        since: Some(Instant::now()),
                    },
                };
            }
        }
        // A server that accepts TCP but does not answer (stopped, overloaded) must not hold
        // the reconnect forever: the handshake gets the request timeout too. A new server
        // named meanwhile abandons the attempt. Requests submitted meanwhile are admitted (and
        // sent once connected), and those too old are given up on (R9).
        let switch = t.epoch.clone();
        generation = next_generation(generation);
        let connecting = tokio::time::timeout(
            cfg.request_timeout,
            connect_and_claim(&cfg, server, t.epoch.get(), generation),
        );
        tokio::pin!(connecting);
        let attempt = loop {
            let expiry = t.next_expiry();
            tokio::select! {
                r = &mut connecting => break r.unwrap_or_else(|_| {
                    Err(keel_proto::io::FrameIoError::Handshake(
                        "no answer within the request timeout".into(),
                    ))
                }),
                _ = switch.server_changed.notified() => {
                    if switch.server() != server {
                        tracing::info!(from = %server, to = %switch.server(), volume = %cfg.volume, "storage server changed while connecting: switching");
                        backoff = Duration::from_millis(50);
                        continue 'reconnect;
                    }
                }
                op = rx.recv() => match op {
                    Some(op) => { t.admit(op, cfg.volume, Instant::now()); }
                    None => { fail_all(&mut t.inflight); return; }
                },
                _ = sleep_until_opt(expiry) => { t.expire(Instant::now()); }
            }
        };
        let stream = match attempt {
            Ok(Some((s, peer))) => {
                tracing::info!(%server, %peer, volume = %cfg.volume, resend = t.inflight.len(), "connected to storage");
                backoff = Duration::from_millis(50);
                s
            }
            failed => {
                match failed {
                    Err(e) => {
                        tracing::warn!(%server, error = %e, retry_in = ?backoff, "cannot reach storage; requests stall until it answers")
                    }
                    Ok(_) => {
                        // The server answered: it is alive, it just holds no grant for this
                        // node yet (docs/security.md).
                        t.note_answer(Instant::now());
                        if !t.unauthorized_logged {
                            t.unauthorized_logged = true;
                            no_grant_since = Some(Instant::now());
                            tracing::info!(%server, volume = %cfg.volume, "the storage server holds no grant for this node on the volume yet (the controller's push follows the attachment): requests wait and the claim is retried");
                        } else if no_grant_since.is_some_and(|s| s.elapsed() >= GRANT_WARN_AFTER) {
                            no_grant_since = None;
                            tracing::warn!(%server, volume = %cfg.volume, after = ?GRANT_WARN_AFTER, "the storage server still holds no grant for this node on the volume (not attached there, or the controller cannot reach the server): requests stall and the claim is retried");
                        }
                    }
                }
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                let mut switched = false;
                loop {
                    let expiry = t.next_expiry();
                    tokio::select! {
                        op = rx.recv() => match op {
                            Some(op) => { t.admit(op, cfg.volume, Instant::now()); }
                            None => { fail_all(&mut t.inflight); return; }
                        },
                        _ = switch.server_changed.notified() => {
                            if switch.server() != server {
                                tracing::info!(from = %server, to = %switch.server(), volume = %cfg.volume, "storage server changed: switching");
                                switched = true;
                                break;
                            }
                        },
                        _ = sleep_until_opt(expiry) => { t.expire(Instant::now()); }
                        _ = &mut sleep => break,
                    }
                }
                backoff = if switched {
                    Duration::from_millis(50)
                } else {
                    (backoff * 2).min(Duration::from_secs(2))
                };
                continue 'reconnect;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (resp_tx, mut resp_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                match read_frame(&mut rd, &mut buf).await {
                    Ok(Some(Frame::Response(r))) => {
                        if resp_tx.send(r).is_err() {
                            return;
                        }
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(frame = ?std::mem::discriminant(&other), "unexpected frame from storage");
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "storage connection read failed");
                        return;
                    }
                }
            }
        });
        // The handshake was an answer: a new connection, nothing awaited on it yet, and the
        // answers to requests given up on will not come on it.
        t.ping = None;
        t.given_up.clear();
        t.note_answer(Instant::now());
        // Resend everything still in flight, oldest first, with the current epoch.
        let mut out = WriteBatch::new();
        t.resend_all(&mut out);
        if !out.is_empty() {
            t.note_sent(Instant::now());
            if let Err(why) = send(&mut wr, &mut out, &mut t, server, cfg.request_timeout).await {
                tracing::warn!(%server, volume = %cfg.volume, reason = why, "resending after a reconnect failed");
                reader.abort();
                t.note_sent(Instant::now());
                continue 'reconnect;
            }
        }
        let mut tick = tokio::time::interval(tick_period(cfg.primary_timeout));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let epoch = t.epoch.clone();
        let broken = loop {
            let resend_at = t.resend_at;
            tokio::select! {
                op = rx.recv() => {
                    let Some(op) = op else {
                        // Shutdown: wait for what is in flight, bounded.
                        let deadline = tokio::time::sleep(cfg.request_timeout);
                        tokio::pin!(deadline);
                        while !t.inflight.is_empty() {
                            tokio::select! {
                                r = resp_rx.recv() => match r {
                                    Some(r) => { let _ = complete(&mut t, r, &mut out); }
                                    None => break,
                                },
                                _ = &mut deadline => break,
                            }
                        }
                        fail_all(&mut t.inflight);
                        reader.abort();
                        return;
                    };
                    out.clear();
                    let now = Instant::now();
                    let id = t.admit(op, cfg.volume, now);
                    if let Some(p) = t.inflight.get(&id) { out.push_request_ref(&p.req); }
                    // Batch everything already queued into one write.
                    while out.len() < (1 << 20) {
                        match rx.try_recv() {
                            Ok(op) => {
                                let id = t.admit(op, cfg.volume, now);
                                if let Some(p) = t.inflight.get(&id) { out.push_request_ref(&p.req); }
                            }
                            Err(_) => break,
                        }
                    }
                    t.note_sent(now);
                    if let Err(why) = send(&mut wr, &mut out, &mut t, server, cfg.request_timeout).await {
                        break why;
                    }
                }
                r = resp_rx.recv() => {
                    let Some(r) = r else { break "connection closed" };
                    out.clear();
                    let answers = t.answers;
                    // Every answer already here is one batch: the guest is signalled once.
                    let step = crate::batch::run(|| {
                        let mut step = complete(&mut t, r, &mut out);
                        while matches!(step, Step::Continue) {
                            match resp_rx.try_recv() {
                                Ok(r) => step = complete(&mut t, r, &mut out),
                                Err(_) => break,
                            }
                        }
                        step
                    });
                    let now = Instant::now();
                    if !out.is_empty() {
                        t.note_sent(now);
                    }
                    if t.answers != answers {
                        t.note_answer(now);
                    }
                    match step {
                        Step::Continue => {}
                        Step::Reconnect(why) => break why,
                    }
                    if !out.is_empty() {
                        if let Err(why) = send(&mut wr, &mut out, &mut t, server, cfg.request_timeout).await {
                            break why;
                        }
                    }
                }
                _ = epoch.changed.notified() => {
                    tracing::info!(volume = %cfg.volume, epoch = %epoch.get(), parked = t.parked.len(), "epoch changed: requests carry the new one from now on");
                    t.stale_backoff = STALE_BACKOFF_MIN;
                    out.clear();
                    t.resend_parked(&mut out);
                    if !out.is_empty() {
                        t.note_sent(Instant::now());
                        if let Err(why) = send(&mut wr, &mut out, &mut t, server, cfg.request_timeout).await {
                            break why;
                        }
                    }
                }
                _ = tokio::time::sleep_until(resend_at.unwrap_or_else(far_future)), if resend_at.is_some() => {
                    out.clear();
                    t.resend_parked(&mut out);
                    if !out.is_empty() {
                        t.note_sent(Instant::now());
                        if let Err(why) = send(&mut wr, &mut out, &mut t, server, cfg.request_timeout).await {
                            break why;
                        }
                    }
                }
                _ = epoch.server_changed.notified() => {
                    if epoch.server() != server {
                        tracing::info!(from = %server, to = %epoch.server(), volume = %cfg.volume, inflight = t.inflight.len(), "storage server changed: switching and resending");
                        break "switching to another storage server";
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    t.expire(now);
                    if t.timed_out(cfg.request_timeout) {
                        break "request timed out";
                    }
                    if t.ping.is_none() && now.saturating_duration_since(t.last_heard) >= ping_every {
                        let id = t.take_id();
                        let mut ping = Request::new(Op::Ping, id, cfg.volume, epoch.get());
                        ping.crc = checksum(&[]);
                        out.clear();
                        out.push_request_ref(&ping);
                        t.ping = Some((id, now));
                        t.note_sent(now);
                        if let Err(why) = send(&mut wr, &mut out, &mut t, server, cfg.request_timeout).await {
                            break why;
                        }
                    }
                }
            }
        };
        reader.abort();
        t.ping = None;
        // Waiting for a connection now: the silence clock runs on (or starts).
        t.note_sent(Instant::now());
        tracing::warn!(%server, volume = %cfg.volume, reason = broken, inflight = t.inflight.len(), "storage connection lost; reconnecting and resending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

enum Step {
    Continue,
    Reconnect(&'static str),
}

/// Handles one response; may queue a resend into `out`.
fn complete(t: &mut Table, r: keel_proto::Response, out: &mut WriteBatch) -> Step {
    let id = r.request_id;
    if r.status != Status::CopyLost {
        t.answers += 1;
    }
    if t.ping.is_some_and(|(ping, _)| ping == id) {
        t.ping = None;
        return Step::Continue;
    }
    let Some(p) = t.inflight.get_mut(&id) else {
        if t.given_up.remove(&id) {
            // The late answer to a request already failed for lack of one (R9).
            tracing::debug!(id, "late answer to a request given up on; ignored");
        } else {
            tracing::warn!(id, "response for an unknown request id; ignored");
        }
        return Step::Continue;
    };
    if p.parked {
        // A late answer to a request already parked (a duplicate): the resend will answer it.
        return Step::Continue;
    }
    match r.status {
        Status::Ok => {
            let want = if p.req.op.response_has_payload() {
                p.req.length as usize
            } else {
                0
            };
            if r.payload.len() != want || !r.crc_ok() {
                p.retries += 1;
                if p.retries > MAX_CRC_RETRIES {
                    tracing::error!(id, "read data keeps failing its checksum");
                    if let Some(p) = t.inflight.remove(&id) {
                        (p.done)(Outcome::Failed(Status::ChecksumMismatch));
                    }
                } else {
                    tracing::warn!(id, "read data failed its checksum; resending");
                    t.resend(id, out);
                }
                return Step::Continue;
            }
            t.stale_logged = false;
            t.unauthorized_logged = false;
            t.lost_logged = false;
            t.stale_backoff = STALE_BACKOFF_MIN;
            t.completed_one();
            if let Some(p) = t.inflight.remove(&id) {
                (p.done)(Outcome::Ok(r.payload));
            }
        }
        Status::ChecksumMismatch if p.retries < MAX_CRC_RETRIES => {
            p.retries += 1;
            t.resend(id, out);
        }
        Status::NotPrimary => return Step::Reconnect("server is not primary for this epoch"),
        Status::Unauthorized => {
            // The server holds no grant for this node (docs/security.md): the controller's
            // push of the attachment has not reached it yet, or this node was detached (then
            // the node manager stops this process). The guest stalls; `io_fail_after` ends it.
            if !t.unauthorized_logged {
                t.unauthorized_logged = true;
                tracing::warn!(volume = %p.req.volume, "the storage server refuses this node (no grant for the volume there yet): requests wait and are resent");
            }
            t.park(id);
        }
        Status::CopyLost => {
            // The server's copy failed (docs/replication.md, R10): another copy takes over.
            // The request waits and is resent (to the new primary once the node manager names
            // it); the silence clock runs on, so the node reports this server unanswered.
            if !t.lost_logged {
                t.lost_logged = true;
                tracing::warn!(volume = %p.req.volume, "the storage server's copy of the volume is lost: requests wait for another copy to take over");
            }
            t.park(id);
        }
        Status::StaleEpoch => {
            let ours = t.epoch.get();
            let sent = p.req.epoch;
            if sent < ours && r.epoch <= ours {
                // Sent before the epoch moved on: the new one is enough.
                t.resend(id, out);
            } else if t.retry_stale_epoch && !t.epoch.revoked() {
                if !t.stale_logged {
                    t.stale_logged = true;
                    tracing::warn!(volume = %p.req.volume, ours = %ours, current = %r.epoch, "read-only attachment behind the volume's epoch: reads wait for the new epoch");
                }
                t.park(id);
            } else {
                tracing::error!(volume = %p.req.volume, ours = %sent, current = %r.epoch, "this attachment was fenced by a newer epoch: failing its I/O");
                if let Some(p) = t.inflight.remove(&id) {
                    (p.done)(Outcome::Failed(Status::StaleEpoch));
                }
            }
        }
        failed => {
            if let Some(p) = t.inflight.remove(&id) {
                (p.done)(Outcome::Failed(failed));
            }
        }
    }
    Step::Continue
}

fn fail_all(inflight: &mut BTreeMap<u64, Pending>) {
    for (_, p) in std::mem::take(inflight) {
        (p.done)(Outcome::Failed(Status::IoError));
    }
}

/// Largest data one wire operation carries.
pub const MAX_WIRE_DATA: usize = MAX_PAYLOAD;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_silence_clock_runs_while_waiting_and_restarts_at_answers() {
        let t0 = Instant::now();
        let timeout = 1000 * MS;
        let mut s = Silence::default();
        assert_eq!(
            s.unanswered_for(t0 + 5000 * MS, timeout),
            None,
            "not waiting"
        );
        s.waiting(t0);
        // Later sends do not move it: the oldest wait counts.
        s.waiting(t0 + 400 * MS);
        assert_eq!(s.since(), Some(t0));
        assert_eq!(s.unanswered_for(t0 + 999 * MS, timeout), None);
        assert_eq!(s.unanswered_for(t0 + 1000 * MS, timeout), Some(1000 * MS));
        // An answer while more is awaited restarts it.
        s.answered(t0 + 1200 * MS, true);
        assert_eq!(s.unanswered_for(t0 + 2100 * MS, timeout), None);
        assert_eq!(s.unanswered_for(t0 + 2300 * MS, timeout), Some(1100 * MS));
        // An answer with nothing else awaited stops it.
        s.answered(t0 + 2400 * MS, false);
        assert_eq!(s.since(), None);
        assert_eq!(s.unanswered_for(t0 + 9000 * MS, timeout), None);
        // A new server restarts it even if it ran.
        s.waiting(t0 + 3000 * MS);
        s.restart(t0 + 3500 * MS);
        assert_eq!(s.since(), Some(t0 + 3500 * MS));
        // A time before the start (clock read races) is no wait at all.
        assert_eq!(s.unanswered_for(t0, Duration::ZERO), Some(Duration::ZERO));
        assert_eq!(s.unanswered_for(t0, MS), None);
    }

    fn cell() -> Arc<EpochCell> {
        Arc::new(EpochCell::new(
            "127.0.0.1:7500".parse().expect("addr"),
            Epoch(3),
            1000 * MS,
        ))
    }

    type Seen = Arc<Mutex<Vec<(u64, &'static str)>>>;

    fn op(tag: u64, seen: &Seen) -> WireOp {
        let seen = seen.clone();
        WireOp {
            op: Op::Write,
            flags: ReqFlags::default(),
            offset: tag * 4096,
            length: 4096,
            payload: vec![tag as u8; 4096],
            done: Box::new(move |o| {
                let what = match o {
                    Outcome::Ok(_) => "ok",
                    Outcome::Failed(_) => "failed",
                    Outcome::GaveUp => "gave up",
                };
                seen.lock().expect("lock").push((tag, what));
            }),
        }
    }

    fn ok(id: u64) -> keel_proto::Response {
        keel_proto::Response::status(Status::Ok, id, Epoch(3))
    }

    #[test]
    fn requests_fail_after_io_fail_after_counted_from_submission_not_resend() {
        let t0 = Instant::now();
        let seen = Seen::default();
        let mut t = Table::new(false, Some(5000 * MS), cell());
        let a = t.admit(op(1, &seen), VolumeId(1), t0);
        let b = t.admit(op(2, &seen), VolumeId(1), t0 + 2000 * MS);
        assert_eq!(t.next_expiry(), Some(t0 + 5000 * MS));
        // A resend (reconnect) does not restart the guest's clock.
        let mut out = WriteBatch::new();
        t.resend_all(&mut out);
        assert!(!out.is_empty());
        assert_eq!(t.expire(t0 + 4999 * MS), 0);
        assert_eq!(t.expire(t0 + 5000 * MS), 1);
        assert_eq!(*seen.lock().expect("lock"), vec![(1, "gave up")]);
        assert_eq!(t.next_expiry(), Some(t0 + 7000 * MS));
        assert_eq!((t.burst, t.epoch.gave_up.load(Ordering::Acquire)), (1, 1));
        // The late answer to the request given up on is ignored; it does not complete twice.
        assert!(matches!(complete(&mut t, ok(a), &mut out), Step::Continue));
        assert_eq!(seen.lock().expect("lock").len(), 1);
        assert!(!t.given_up.contains(&a));
        // A request completing normally is unaffected and ends the burst.
        assert!(matches!(complete(&mut t, ok(b), &mut out), Step::Continue));
        assert_eq!(*seen.lock().expect("lock"), vec![(1, "gave up"), (2, "ok")]);
        assert_eq!(t.burst, 0);
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn without_io_fail_after_requests_wait_forever() {
        let t0 = Instant::now();
        let seen = Seen::default();
        let mut t = Table::new(false, None, cell());
        t.admit(op(1, &seen), VolumeId(1), t0);
        assert_eq!(t.next_expiry(), None);
        assert_eq!(t.expire(t0 + Duration::from_secs(86_400)), 0);
        assert!(seen.lock().expect("lock").is_empty());
        assert_eq!(t.inflight.len(), 1);
    }

    #[test]
    fn parked_requests_expire_too_and_leave_the_parked_list() {
        let t0 = Instant::now();
        let seen = Seen::default();
        let mut t = Table::new(true, Some(1000 * MS), cell());
        let a = t.admit(op(1, &seen), VolumeId(1), t0);
        let b = t.admit(op(2, &seen), VolumeId(1), t0 + 800 * MS);
        t.park(a);
        t.park(b);
        assert!(
            !t.awaiting(),
            "parked requests wait for an epoch, not for the server"
        );
        assert_eq!(t.expire(t0 + 1000 * MS), 1);
        assert_eq!(t.parked, vec![b]);
        let mut out = WriteBatch::new();
        t.resend_parked(&mut out);
        assert!(t.awaiting());
        assert_eq!(*seen.lock().expect("lock"), vec![(1, "gave up")]);
    }

    #[test]
    fn answers_and_pings_move_the_shared_silence_clock() {
        let t0 = Instant::now();
        let seen = Seen::default();
        let c = cell();
        let mut t = Table::new(false, None, c.clone());
        let client = VolumeClient {
            tx: mpsc::unbounded_channel().0,
            epoch: c.clone(),
        };
        // At the start nothing is connected: the clock runs.
        assert!(c.liveness().silence.since().is_some());
        t.note_answer(t0); // the handshake
        assert_eq!(c.liveness().silence.since(), None);
        assert_eq!(client.unanswered(), None);
        let a = t.admit(op(1, &seen), VolumeId(1), t0);
        t.note_sent(t0);
        t.ping = Some((t.take_id(), t0 + 500 * MS));
        t.note_sent(t0 + 500 * MS);
        assert_eq!(
            c.liveness().silence.since(),
            Some(t0),
            "the oldest wait counts"
        );
        // The ping's answer proves the server alive: the clock restarts for the request.
        let ping = t.ping.map(|(id, _)| id).expect("ping");
        let mut out = WriteBatch::new();
        assert!(matches!(
            complete(&mut t, ok(ping), &mut out),
            Step::Continue
        ));
        assert_eq!(t.ping, None);
        t.note_answer(t0 + 600 * MS);
        assert_eq!(c.liveness().silence.since(), Some(t0 + 600 * MS));
        assert_eq!(t.last_heard, t0 + 600 * MS);
        // The request's answer, with nothing else awaited, stops it.
        assert!(matches!(complete(&mut t, ok(a), &mut out), Step::Continue));
        t.note_answer(t0 + 700 * MS);
        assert_eq!(c.liveness().silence.since(), None);
        // A ping unanswered past the request timeout counts as a timed-out request.
        t.ping = Some((t.take_id(), Instant::now() - 3000 * MS));
        assert!(t.timed_out(2000 * MS));
        assert!(!t.timed_out(4000 * MS));
        // Long silence: unanswered names the server and the epoch.
        c.liveness().silence.restart(Instant::now() - 1500 * MS);
        let u = client.unanswered().expect("unanswered");
        assert_eq!(u.server, "127.0.0.1:7500".parse().expect("addr"));
        assert_eq!(u.epoch, Epoch(3));
        assert!(u.waited >= 1500 * MS);
        // A new server clears it: its clock starts now.
        assert!(client.set_server("127.0.0.1:7501".parse().expect("addr")));
        assert_eq!(client.unanswered(), None);
        assert_eq!(c.liveness().server, "127.0.0.1:7501".parse().expect("addr"));
    }

    /// R10: `copy lost` parks the request without failing it, and is no answer: the count
    /// the connection task compares before and after a batch does not move, so the silence
    /// clock runs on and the server is reported unanswered.
    #[test]
    fn a_lost_copy_parks_requests_and_is_not_an_answer() {
        let t0 = Instant::now();
        let seen = Seen::default();
        let mut t = Table::new(false, None, cell());
        let a = t.admit(op(1, &seen), VolumeId(1), t0);
        let b = t.admit(op(2, &seen), VolumeId(1), t0);
        let mut out = WriteBatch::new();
        let lost = |id| keel_proto::Response::status(Status::CopyLost, id, Epoch(3));
        let before = t.answers;
        assert!(matches!(
            complete(&mut t, lost(a), &mut out),
            Step::Continue
        ));
        assert_eq!(t.answers, before, "a lost copy's answer is no answer");
        assert_eq!(t.parked, vec![a]);
        assert!(t.inflight.contains_key(&a), "parked, not failed");
        assert!(seen.lock().expect("lock").is_empty());
        // A ping answered `copy lost` is no answer either.
        t.ping = Some((t.take_id(), t0));
        let ping = t.ping.map(|(id, _)| id).expect("ping");
        assert!(matches!(
            complete(&mut t, lost(ping), &mut out),
            Step::Continue
        ));
        assert_eq!(t.answers, before);
        // Any other answer is one.
        assert!(matches!(complete(&mut t, ok(b), &mut out), Step::Continue));
        assert_eq!(t.answers, before + 1);
        assert_eq!(*seen.lock().expect("lock"), vec![(2, "ok")]);
    }

    #[test]
    fn the_tick_is_fine_enough_for_short_primary_timeouts() {
        assert_eq!(tick_period(Duration::from_secs(1)), 250 * MS);
        assert_eq!(tick_period(200 * MS), 50 * MS);
        assert_eq!(tick_period(MS), 10 * MS);
    }
}
