//! The connection from keel-vhost to a volume's storage server.
//!
//! One task per volume owns the connection and the table of requests in flight. Callers
//! submit wire operations through a channel and are called back exactly once with the outcome.
//! When the connection breaks, times out or the server says it is not (yet) primary, the task
//! reconnects with backoff and resends every request still in flight, in id order: the guest
//! sees a stall, never an error. Only answers that say the request itself is wrong (out of
//! range, I/O error on the copy, fenced by a newer epoch, ...) fail a request.
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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_proto::frame::{checksum, MAX_PAYLOAD};
use keel_proto::io::{connect, read_frame};
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
}

/// The epoch requests carry and the server they go to, shared by the handles and the
/// connection task.
struct EpochCell {
    epoch: AtomicU64,
    /// The attachment was taken away (forced detach or takeover): every request fails.
    revoked: std::sync::atomic::AtomicBool,
    /// Wakes the task to resend parked requests with the new epoch.
    changed: Notify,
    /// The storage server holding the primary copy.
    server: Mutex<SocketAddr>,
    /// Wakes the task to drop its connection and connect to the new server.
    server_changed: Notify,
}

impl EpochCell {
    fn get(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    fn server(&self) -> SocketAddr {
        *self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
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
        let epoch = Arc::new(EpochCell {
            epoch: AtomicU64::new(cfg.epoch.0),
            revoked: std::sync::atomic::AtomicBool::new(false),
            changed: Notify::new(),
            server: Mutex::new(cfg.server),
            server_changed: Notify::new(),
        });
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
            self.epoch.server_changed.notify_one();
        }
        old != server
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
    sent: Instant,
    retries: u32,
    /// Refused with `stale epoch` and waiting in [`Table::parked`] to be resent.
    parked: bool,
}

const MAX_CRC_RETRIES: u32 = 3;
const STALE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const STALE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The requests in flight and what the task needs to answer them.
struct Table {
    inflight: BTreeMap<u64, Pending>,
    /// Requests refused with `stale epoch` on a read-only attachment, to resend at `resend_at`
    /// or as soon as the epoch changes.
    parked: Vec<u64>,
    resend_at: Option<tokio::time::Instant>,
    stale_backoff: Duration,
    /// A `stale epoch` was logged since the last success (keeps the log to one line a stall).
    stale_logged: bool,
    epoch: Arc<EpochCell>,
    retry_stale_epoch: bool,
}

impl Table {
    /// Encodes `id` into `out` with the current epoch and restarts its timeout.
    fn resend(&mut self, id: u64, out: &mut Vec<u8>) {
        let epoch = self.epoch.get();
        if let Some(p) = self.inflight.get_mut(&id) {
            p.req.epoch = epoch;
            p.sent = Instant::now();
            p.parked = false;
            encode(&p.req, out);
        }
    }

    /// Encodes every request in flight (after a reconnect), oldest first.
    fn resend_all(&mut self, out: &mut Vec<u8>) {
        self.parked.clear();
        self.resend_at = None;
        let ids: Vec<u64> = self.inflight.keys().copied().collect();
        for id in ids {
            self.resend(id, out);
        }
    }

    /// Encodes every parked request (their backoff ran out, or the epoch changed).
    fn resend_parked(&mut self, out: &mut Vec<u8>) {
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

    /// Whether a request has gone unanswered for longer than `timeout` (parked ones excluded).
    fn timed_out(&self, timeout: Duration) -> bool {
        let now = Instant::now();
        self.inflight
            .values()
            .any(|p| !p.parked && now.duration_since(p.sent) > timeout)
    }
}

fn encode(req: &Request, out: &mut Vec<u8>) {
    req.encode_header(req.payload.len(), out);
    out.extend_from_slice(&req.payload);
}

async fn run(cfg: ClientConfig, epoch: Arc<EpochCell>, mut rx: mpsc::UnboundedReceiver<WireOp>) {
    let mut t = Table {
        inflight: BTreeMap::new(),
        parked: Vec::new(),
        resend_at: None,
        stale_backoff: STALE_BACKOFF_MIN,
        stale_logged: false,
        epoch,
        retry_stale_epoch: cfg.retry_stale_epoch,
    };
    let mut next_id: u64 = 1;
    let mut backoff = Duration::from_millis(50);
    let mut admit = |op: WireOp, t: &mut Table| -> u64 {
        let id = next_id;
        next_id += 1;
        let mut req = Request::new(op.op, id, cfg.volume, t.epoch.get());
        req.flags = op.flags;
        req.offset = op.offset;
        req.length = op.length;
        req.crc = checksum(&op.payload);
        req.payload = op.payload;
        t.inflight.insert(
            id,
            Pending {
                req,
                done: op.done,
                sent: Instant::now(),
                retries: 0,
                parked: false,
            },
        );
        id
    };
    'reconnect: loop {
        let server = t.epoch.server();
        // A server that accepts TCP but does not answer (stopped, overloaded) must not hold
        // the reconnect forever: the handshake gets the request timeout too. A new server
        // named meanwhile abandons the attempt.
        let switch = t.epoch.clone();
        let attempt = tokio::select! {
            r = tokio::time::timeout(
                cfg.request_timeout,
                connect(server, cfg.tls.clone(), Role::Storage),
            ) => r.unwrap_or_else(|_| {
                Err(keel_proto::io::FrameIoError::Handshake(
                    "no answer within the request timeout".into(),
                ))
            }),
            _ = switch.server_changed.notified() => {
                tracing::info!(from = %server, to = %switch.server(), volume = %cfg.volume, "storage server changed while connecting: switching");
                backoff = Duration::from_millis(50);
                continue 'reconnect;
            }
        };
        let stream = match attempt {
            Ok((s, peer)) => {
                tracing::info!(%server, %peer, volume = %cfg.volume, resend = t.inflight.len(), "connected to storage");
                backoff = Duration::from_millis(50);
                s
            }
            Err(e) => {
                tracing::warn!(%server, error = %e, retry_in = ?backoff, "cannot reach storage; requests stall until it answers");
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                let mut switched = false;
                loop {
                    tokio::select! {
                        op = rx.recv() => match op {
                            Some(op) => { admit(op, &mut t); }
                            None => { fail_all(&mut t.inflight); return; }
                        },
                        _ = switch.server_changed.notified() => {
                            if switch.server() != server {
                                tracing::info!(from = %server, to = %switch.server(), volume = %cfg.volume, "storage server changed: switching");
                                switched = true;
                                break;
                            }
                        },
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
        // Resend everything still in flight, oldest first, with the current epoch.
        let mut out = Vec::with_capacity(1 << 20);
        t.resend_all(&mut out);
        if !out.is_empty() && (wr.write_all(&out).await.is_err() || wr.flush().await.is_err()) {
            reader.abort();
            continue 'reconnect;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
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
                    let id = admit(op, &mut t);
                    if let Some(p) = t.inflight.get(&id) { encode(&p.req, &mut out); }
                    // Batch everything already queued into one write.
                    while out.len() < (1 << 20) {
                        match rx.try_recv() {
                            Ok(op) => {
                                let id = admit(op, &mut t);
                                if let Some(p) = t.inflight.get(&id) { encode(&p.req, &mut out); }
                            }
                            Err(_) => break,
                        }
                    }
                    if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                        break "write failed";
                    }
                }
                r = resp_rx.recv() => {
                    let Some(r) = r else { break "connection closed" };
                    out.clear();
                    match complete(&mut t, r, &mut out) {
                        Step::Continue => {}
                        Step::Reconnect(why) => break why,
                    }
                    if !out.is_empty() && (wr.write_all(&out).await.is_err() || wr.flush().await.is_err()) {
                        break "write failed";
                    }
                }
                _ = epoch.changed.notified() => {
                    tracing::info!(volume = %cfg.volume, epoch = %epoch.get(), parked = t.parked.len(), "epoch changed: requests carry the new one from now on");
                    t.stale_backoff = STALE_BACKOFF_MIN;
                    out.clear();
                    t.resend_parked(&mut out);
                    if !out.is_empty() && (wr.write_all(&out).await.is_err() || wr.flush().await.is_err()) {
                        break "write failed";
                    }
                }
                _ = tokio::time::sleep_until(resend_at.unwrap_or_else(far_future)), if resend_at.is_some() => {
                    out.clear();
                    t.resend_parked(&mut out);
                    if !out.is_empty() && (wr.write_all(&out).await.is_err() || wr.flush().await.is_err()) {
                        break "write failed";
                    }
                }
                _ = epoch.server_changed.notified() => {
                    if epoch.server() != server {
                        tracing::info!(from = %server, to = %epoch.server(), volume = %cfg.volume, inflight = t.inflight.len(), "storage server changed: switching and resending");
                        break "switching to another storage server";
                    }
                }
                _ = tick.tick() => {
                    if t.timed_out(cfg.request_timeout) {
                        break "request timed out";
                    }
                }
            }
        };
        reader.abort();
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
fn complete(t: &mut Table, r: keel_proto::Response, out: &mut Vec<u8>) -> Step {
    let id = r.request_id;
    let Some(p) = t.inflight.get_mut(&id) else {
        tracing::warn!(id, "response for an unknown request id; ignored");
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
            t.stale_backoff = STALE_BACKOFF_MIN;
            if let Some(p) = t.inflight.remove(&id) {
                (p.done)(Outcome::Ok(r.payload));
            }
        }
        Status::ChecksumMismatch if p.retries < MAX_CRC_RETRIES => {
            p.retries += 1;
            t.resend(id, out);
        }
        Status::NotPrimary => return Step::Reconnect("server is not primary for this epoch"),
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
