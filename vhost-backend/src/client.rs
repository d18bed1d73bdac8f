//! The connection from keel-vhost to a volume's storage server.
//!
//! One task per volume owns the connection and the table of requests in flight. Callers
//! submit wire operations through a channel and are called back exactly once with the outcome.
//! When the connection breaks, times out or the server says it is not (yet) primary, the task
//! reconnects with backoff and resends every request still in flight, in id order: the guest
//! sees a stall, never an error. Only answers that say the request itself is wrong (out of
//! range, I/O error on the copy, fenced by a newer epoch, ...) fail a request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::frame::{checksum, MAX_PAYLOAD};
use keel_proto::io::{connect, read_frame};
use keel_proto::{Epoch, Frame, Op, ReqFlags, Request, Role, Status, VolumeId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

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
    pub server: SocketAddr,
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// A request unanswered for this long makes the client reconnect and resend.
    pub request_timeout: Duration,
}

/// Handle to a volume's connection task.
#[derive(Clone)]
pub struct VolumeClient {
    tx: mpsc::UnboundedSender<WireOp>,
}

impl VolumeClient {
    /// Starts the connection task on `rt`.
    pub fn start(cfg: ClientConfig, rt: &tokio::runtime::Handle) -> VolumeClient {
        let (tx, rx) = mpsc::unbounded_channel();
        rt.spawn(run(cfg, rx));
        VolumeClient { tx }
    }

    /// Queues an operation. If the task is gone (shutdown), the operation fails with an I/O
    /// error at once.
    pub fn submit(&self, op: WireOp) {
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
}

const MAX_CRC_RETRIES: u32 = 3;

fn encode(req: &Request, out: &mut Vec<u8>) {
    req.encode_header(req.payload.len(), out);
    out.extend_from_slice(&req.payload);
}

async fn run(cfg: ClientConfig, mut rx: mpsc::UnboundedReceiver<WireOp>) {
    let mut inflight: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut next_id: u64 = 1;
    let mut backoff = Duration::from_millis(50);
    let mut admit = |op: WireOp, inflight: &mut BTreeMap<u64, Pending>| -> u64 {
        let id = next_id;
        next_id += 1;
        let mut req = Request::new(op.op, id, cfg.volume, cfg.epoch);
        req.flags = op.flags;
        req.offset = op.offset;
        req.length = op.length;
        req.crc = checksum(&op.payload);
        req.payload = op.payload;
        inflight.insert(
            id,
            Pending {
                req,
                done: op.done,
                sent: Instant::now(),
                retries: 0,
            },
        );
        id
    };
    'reconnect: loop {
        // A server that accepts TCP but does not answer (stopped, overloaded) must not hold
        // the reconnect forever: the handshake gets the request timeout too.
        let attempt = tokio::time::timeout(
            cfg.request_timeout,
            connect(cfg.server, cfg.tls.clone(), Role::Storage),
        )
        .await
        .unwrap_or_else(|_| {
            Err(keel_proto::io::FrameIoError::Handshake(
                "no answer within the request timeout".into(),
            ))
        });
        let stream = match attempt {
            Ok((s, peer)) => {
                tracing::info!(server = %cfg.server, %peer, volume = %cfg.volume, resend = inflight.len(), "connected to storage");
                backoff = Duration::from_millis(50);
                s
            }
            Err(e) => {
                tracing::warn!(server = %cfg.server, error = %e, retry_in = ?backoff, "cannot reach storage; requests stall until it answers");
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        op = rx.recv() => match op {
                            Some(op) => { admit(op, &mut inflight); }
                            None => { fail_all(&mut inflight); return; }
                        },
                        _ = &mut sleep => break,
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
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
        // Resend everything still in flight, oldest first.
        let mut out = Vec::with_capacity(1 << 20);
        let now = Instant::now();
        for p in inflight.values_mut() {
            encode(&p.req, &mut out);
            p.sent = now;
        }
        if !out.is_empty() && (wr.write_all(&out).await.is_err() || wr.flush().await.is_err()) {
            reader.abort();
            continue 'reconnect;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let broken = loop {
            tokio::select! {
                op = rx.recv() => {
                    let Some(op) = op else {
                        // Shutdown: wait for what is in flight, bounded.
                        let deadline = tokio::time::sleep(cfg.request_timeout);
                        tokio::pin!(deadline);
                        while !inflight.is_empty() {
                            tokio::select! {
                                r = resp_rx.recv() => match r {
                                    Some(r) => { let _ = complete(&mut inflight, r, &mut out); }
                                    None => break,
                                },
                                _ = &mut deadline => break,
                            }
                        }
                        fail_all(&mut inflight);
                        reader.abort();
                        return;
                    };
                    out.clear();
                    let id = admit(op, &mut inflight);
                    if let Some(p) = inflight.get(&id) { encode(&p.req, &mut out); }
                    // Batch everything already queued into one write.
                    while out.len() < (1 << 20) {
                        match rx.try_recv() {
                            Ok(op) => {
                                let id = admit(op, &mut inflight);
                                if let Some(p) = inflight.get(&id) { encode(&p.req, &mut out); }
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
                    match complete(&mut inflight, r, &mut out) {
                        Step::Continue => {}
                        Step::Reconnect(why) => break why,
                    }
                    if !out.is_empty() && (wr.write_all(&out).await.is_err() || wr.flush().await.is_err()) {
                        break "write failed";
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if inflight.values().any(|p| now.duration_since(p.sent) > cfg.request_timeout) {
                        break "request timed out";
                    }
                }
            }
        };
        reader.abort();
        tracing::warn!(server = %cfg.server, volume = %cfg.volume, reason = broken, inflight = inflight.len(), "storage connection lost; reconnecting and resending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

enum Step {
    Continue,
    Reconnect(&'static str),
}

/// Handles one response; may queue a resend into `out`.
fn complete(
    inflight: &mut BTreeMap<u64, Pending>,
    r: keel_proto::Response,
    out: &mut Vec<u8>,
) -> Step {
    let Some(p) = inflight.get_mut(&r.request_id) else {
        tracing::warn!(
            id = r.request_id,
            "response for an unknown request id; ignored"
        );
        return Step::Continue;
    };
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
                    tracing::error!(id = r.request_id, "read data keeps failing its checksum");
                    if let Some(p) = inflight.remove(&r.request_id) {
                        (p.done)(Outcome::Failed(Status::ChecksumMismatch));
                    }
                } else {
                    tracing::warn!(
                        id = r.request_id,
                        "read data failed its checksum; resending"
                    );
                    p.sent = Instant::now();
                    encode(&p.req, out);
                }
                return Step::Continue;
            }
            if let Some(p) = inflight.remove(&r.request_id) {
                (p.done)(Outcome::Ok(r.payload));
            }
        }
        Status::ChecksumMismatch if p.retries < MAX_CRC_RETRIES => {
            p.retries += 1;
            p.sent = Instant::now();
            encode(&p.req, out);
        }
        Status::NotPrimary => return Step::Reconnect("server is not primary for this epoch"),
        failed => {
            if failed == Status::StaleEpoch {
                tracing::error!(volume = %p.req.volume, ours = %p.req.epoch, current = %r.epoch, "this attachment was fenced by a newer epoch: failing its I/O");
            }
            if let Some(p) = inflight.remove(&r.request_id) {
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
