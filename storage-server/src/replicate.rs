//! Synchronous primary → mirror replication (see `docs/replication.md`, rules R4 and R5).
//!
//! A primary copy with in-sync mirrors (its membership list, set by the controller with
//! `SetMembership`) applies every node write, write-zeroes, discard and flush locally **and**
//! sends the same op, stamped with the primary copy's epoch, to every mirror in parallel. The
//! node is acknowledged only when the local op and every mirror answered `ok`.
//!
//! Each mirror (by data-path address) gets one persistent, pipelined mutual-TLS connection,
//! made with this server's own `storage-<id>` certificate and expecting a `storage` peer;
//! requests carry ids of their own and are matched to answers in any order. A broken
//! connection, or one whose request was not answered within the replication timeout, is
//! dropped and made again by the next request.
//!
//! A mirror that fails a request (an error status, a broken connection, no answer in time) is
//! never skipped silently: the primary asks the [`MirrorFailure`] handler to drop it. If the
//! handler succeeds (the controller dropped the mirror at a new epoch and the new membership
//! was applied to this copy), the op is acknowledged without that mirror; otherwise the node is
//! answered `not primary`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_proto::io::{connect, read_frame};
use keel_proto::{Epoch, Frame, Request, Response, Role, Status, VolumeId};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::ClientConfig;

use crate::copy::{Copy, CopyRole};

/// Default time a mirror has to answer one replicated request (connecting included).
pub const DEFAULT_REPLICATION_TIMEOUT: Duration = Duration::from_millis(1000);

/// The membership a primary copy runs at after a [`MirrorFailure`] handler dropped a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMembership {
    /// The new epoch.
    pub epoch: Epoch,
    /// The in-sync mirrors left.
    pub mirrors: Vec<SocketAddr>,
}

/// Why a [`MirrorFailure`] handler did not drop a mirror (e.g. this primary was replaced, or
/// there is no controller to ask).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mirror failure not handled: {reason}")]
pub struct Refused {
    pub reason: String,
}

/// A boxed future, so that [`MirrorFailure`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a primary does when a mirror fails a replicated request.
///
/// `mirror_failed(volume, mirror, epoch)`: the primary copy of `volume`, running at `epoch`,
/// could not get `mirror` (its data-path address) to acknowledge an op. An implementation asks
/// the controller to drop that mirror from the in-sync set at `epoch` (the controller accepts
/// only if `epoch` is the volume's current epoch and the caller its primary, then bumps the
/// epoch and pushes the new membership to the mirrors and to this server). It returns `Ok` only
/// **after** the new membership (without `mirror`) has been applied to the local copy by
/// `SetMembership`; the primary then acknowledges the op without that mirror. `Err` (this
/// primary was replaced, the controller cannot be reached, ...) makes the primary answer the
/// node `not primary`: the op is never acknowledged.
///
/// Calls for one server are serialised; a mirror already dropped by an earlier call is not
/// reported again.
pub trait MirrorFailure: Send + Sync {
    fn mirror_failed(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>>;
}

/// The handler of a server without a controller: always refuses, so a failing mirror makes
/// the primary answer `not primary` and never acknowledge without it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseMirrorFailure;

impl MirrorFailure for RefuseMirrorFailure {
    fn mirror_failed(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(async move {
            Err(Refused {
                reason: format!(
                    "no controller to drop mirror {mirror} of volume {volume} at epoch {epoch}"
                ),
            })
        })
    }
}

/// How a server replicates: its client identity for mirror connections, the timeout and the
/// failure handler.
#[derive(Clone)]
pub struct Replication {
    /// TLS client configuration with this server's `storage-<id>` certificate. `None`: the
    /// server cannot replicate, so a primary with mirrors answers nodes' mutations
    /// `not primary`.
    pub client_tls: Option<Arc<ClientConfig>>,
    /// How long a mirror has to answer one request (connecting included).
    pub timeout: Duration,
    /// Called when a mirror fails.
    pub failure: Arc<dyn MirrorFailure>,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            client_tls: None,
            timeout: DEFAULT_REPLICATION_TIMEOUT,
            failure: Arc::new(RefuseMirrorFailure),
        }
    }
}

/// A server's replication state: the connections to mirrors, shared by all its copies.
pub struct Replicator {
    cfg: Replication,
    mirrors: Mutex<HashMap<SocketAddr, Arc<MirrorConn>>>,
    /// Serialises failure handling (rare), so concurrent failures of one mirror are reported
    /// once.
    failures: tokio::sync::Mutex<()>,
}

impl Replicator {
    pub fn new(cfg: Replication) -> Replicator {
        Replicator {
            cfg,
            mirrors: Mutex::new(HashMap::new()),
            failures: tokio::sync::Mutex::new(()),
        }
    }

    fn conn(&self, addr: SocketAddr, tls: &Arc<ClientConfig>) -> Arc<MirrorConn> {
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(MirrorConn {
                    addr,
                    tls: tls.clone(),
                    session: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    /// Sends `req` to every mirror in parallel; returns the mirrors that did not answer `ok`.
    pub async fn send_all(&self, mirrors: &[SocketAddr], req: &Request) -> Vec<SocketAddr> {
        let Some(tls) = self.cfg.client_tls.clone() else {
            return mirrors.to_vec();
        };
        let timeout = self.cfg.timeout;
        let calls: Vec<_> = mirrors
            .iter()
            .map(|&m| {
                let conn = self.conn(m, &tls);
                let req = req.clone();
                (
                    m,
                    tokio::spawn(async move { conn.call(req, timeout).await }),
                )
            })
            .collect();
        let mut failed = Vec::new();
        for (m, h) in calls {
            let outcome = match h.await {
                Ok(Ok(resp)) if resp.status == Status::Ok => continue,
                Ok(Ok(resp)) => format!("answered {} (mirror epoch {})", resp.status, resp.epoch),
                Ok(Err(e)) => e,
                Err(e) => format!("task failed: {e}"),
            };
            tracing::warn!(volume = %req.volume, mirror = %m, op = ?req.op, epoch = %req.epoch, error = %outcome, "mirror failed a replicated request");
            failed.push(m);
        }
        failed
    }

    /// Handles the failure of `mirror` for an op admitted on `copy` at `epoch`: true if the op
    /// may be acknowledged without it (the mirror is no longer in the copy's in-sync set, at a
    /// newer epoch, and the copy is still primary).
    pub async fn mirror_failed(&self, copy: &Copy, mirror: SocketAddr, epoch: Epoch) -> bool {
        let _one_at_a_time = self.failures.lock().await;
        let dropped = |copy: &Copy| {
            !copy.is_deleted()
                && copy.role() == CopyRole::Primary
                && copy.epoch() > epoch
                && !copy.mirrors().contains(&mirror)
        };
        if dropped(copy) {
            // An earlier failure (of this or another op) already had it dropped.
            return true;
        }
        match self
            .cfg
            .failure
            .mirror_failed(copy.volume(), mirror, epoch)
            .await
        {
            Ok(m) if dropped(copy) => {
                tracing::info!(volume = %copy.volume(), %mirror, epoch = %m.epoch, "mirror dropped; acknowledging without it");
                true
            }
            Ok(m) => {
                tracing::error!(volume = %copy.volume(), %mirror, new_epoch = %m.epoch, copy_epoch = %copy.epoch(), "failure handler returned before the copy left the mirror out; not acknowledging");
                false
            }
            Err(e) => {
                tracing::warn!(volume = %copy.volume(), %mirror, %epoch, error = %e, "mirror failure refused; answering not primary");
                false
            }
        }
    }
}

/// One mirror's connection, made on first use and again after it broke.
struct MirrorConn {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

/// A live pipelined connection: a writer task fed by `tx`, a reader task answering `pending`.
struct Session {
    tx: mpsc::UnboundedSender<Request>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    /// The reader and writer tasks, stopped by [`Session::kill`] (a hung mirror would keep
    /// the reader waiting forever).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Session {
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        // Waiting callers see their answer channel closed.
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl MirrorConn {
    async fn session(&self) -> Result<Arc<Session>, String> {
        let mut s = self.session.lock().await;
        if let Some(live) = s.as_ref() {
            if !live.dead.load(Ordering::Acquire) {
                return Ok(live.clone());
            }
        }
        if let Some(old) = s.take() {
            old.kill();
        }
        let (stream, _peer) = connect(self.addr, self.tls.clone(), Role::Storage)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        tracing::info!(mirror = %self.addr, "replication connection up");
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let session = Arc::new(Session {
            tx,
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            dead: dead.clone(),
            tasks: Mutex::new(Vec::new()),
        });
        let addr = self.addr;
        let wdead = dead.clone();
        let wpending = pending.clone();
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1 << 20);
            while let Some(first) = rx.recv().await {
                buf.clear();
                Frame::Request(first).encode(&mut buf);
                while buf.len() < (1 << 20) {
                    match rx.try_recv() {
                        Ok(r) => Frame::Request(r).encode(&mut buf),
                        Err(_) => break,
                    }
                }
                if let Err(e) = async {
                    wr.write_all(&buf).await?;
                    wr.flush().await
                }
                .await
                {
                    tracing::warn!(mirror = %addr, error = %e, "replication connection write failed");
                    break;
                }
                if wdead.load(Ordering::Acquire) {
                    break;
                }
            }
            wdead.store(true, Ordering::Release);
            wpending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let _ = wr.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                match read_frame(&mut rd, &mut buf).await {
                    Ok(Some(Frame::Response(r))) => {
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&r.request_id);
                        if let Some(w) = waiter {
                            let _ = w.send(r);
                        }
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(mirror = %addr, frame = ?other, "unexpected frame from mirror");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(mirror = %addr, error = %e, "replication connection read failed");
                        break;
                    }
                }
                if dead.load(Ordering::Acquire) {
                    break;
                }
            }
            dead.store(true, Ordering::Release);
            pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        session
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([writer.abort_handle(), reader.abort_handle()]);
        *s = Some(session.clone());
        Ok(session)
    }

    /// Sends one request and waits for its answer, all within `timeout`. On a timeout the
    /// connection is dropped (it is stuck, or the mirror is), so the next call reconnects.
    async fn call(&self, mut req: Request, timeout: Duration) -> Result<Response, String> {
        let attempt = async {
            let s = self.session().await?;
            let id = s.next_id.fetch_add(1, Ordering::Relaxed);
            req.request_id = id;
            let (tx, rx) = oneshot::channel();
            s.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, tx);
            if s.dead.load(Ordering::Acquire) || s.tx.send(req).is_err() {
                s.kill();
                return Err("connection closed".to_string());
            }
            match rx.await {
                Ok(resp) => Ok(resp),
                Err(_) => {
                    s.kill();
                    Err("connection closed before the answer".to_string())
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                // Drop the connection unless another caller is busy making a new one.
                if let Ok(mut slot) = self.session.try_lock() {
                    if let Some(s) = slot.take() {
                        s.kill();
                    }
                }
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}
