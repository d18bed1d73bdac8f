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
//!
//! **Rebuild (R7).** Mirrors the membership lists as being rebuilt get every replicated op as
//! well, but their failures never block the acknowledgement: they mark the op's chunks dirty
//! and void the mirror's current copy pass, which starts again over the dirty chunks after a
//! backoff. A background task per rebuilding mirror ([`Replicator::reconcile_rebuilds`])
//! copies chunks at the primary's epoch, each under its lock ([`Copy::chunk_lock`]) held
//! exclusively from the local read until the mirror acknowledged it (node mutations hold the
//! same locks shared around their local I/O, forwarding and dirty marking), throttled per
//! server (concurrency, bandwidth). Which chunks: the copy's dirty-chunk map of the mirror
//! ([`crate::dirty`]) if the mirror still holds the copy the map was started for (asked with a
//! ping at the start and again after the final flush), every chunk otherwise. A clean pass
//! ends with [`MirrorFailure::mirror_synced`]; progress is [`Replicator::rebuild_progress`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_proto::io::{connect, read_frame, WriteBatch};
use keel_proto::{Epoch, Frame, Request, Response, Role, Status, VolumeId};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::ClientConfig;

use crate::copy::{Copy, CopyRole, CHUNK_SIZE};
use crate::dirty::CopyIdentity;

/// Default time a mirror has to answer one replicated request (connecting included).
pub const DEFAULT_REPLICATION_TIMEOUT: Duration = Duration::from_millis(1000);

/// Default number of rebuilds a server runs at once.
pub const DEFAULT_REBUILD_CONCURRENCY: usize = 1;

/// Default rebuild bandwidth per server: 200 MiB/s.
pub const DEFAULT_REBUILD_BYTES_PER_SEC: u64 = 200 << 20;

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
///
/// `mirror_synced(volume, mirror, epoch)` (R7): the primary copy of `volume`, at `epoch`, has
/// copied all its data to `mirror` (one of its mirrors being rebuilt) and forwarded every write
/// since. An implementation asks the controller to move the mirror into the in-sync set (the
/// controller bumps the epoch and pushes the new membership, mirrors first). `Err` (no
/// controller, the epoch moved on, ...) leaves the mirror being rebuilt: it keeps receiving
/// forwarded writes and the primary asks again later. The default refuses.
pub trait MirrorFailure: Send + Sync {
    fn mirror_failed(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>>;

    /// Whether [`MirrorFailure::mirror_synced`] can put a mirror in sync (a controller is
    /// asked). While a primary asks, a write at that epoch is acknowledged only if the mirror
    /// acknowledged it too (the controller may already have put the mirror in sync). The
    /// default (no controller) is false.
    fn syncs(&self) -> bool {
        false
    }

    fn mirror_synced(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(async move {
            Err(Refused {
                reason: format!(
                    "no controller to put rebuilt mirror {mirror} of volume {volume} in sync at epoch {epoch}"
                ),
            })
        })
    }
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
    /// Called when a mirror fails (and when a rebuilt mirror is in sync).
    pub failure: Arc<dyn MirrorFailure>,
    /// How many rebuilds (R7) this server runs at once (at least 1).
    pub rebuild_concurrency: usize,
    /// Bandwidth for rebuild copies, in bytes per second, shared by all rebuilds (0:
    /// unlimited).
    pub rebuild_bytes_per_sec: u64,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            client_tls: None,
            timeout: DEFAULT_REPLICATION_TIMEOUT,
            failure: Arc::new(RefuseMirrorFailure),
            rebuild_concurrency: DEFAULT_REBUILD_CONCURRENCY,
            rebuild_bytes_per_sec: DEFAULT_REBUILD_BYTES_PER_SEC,
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
    /// Running rebuilds, by volume and mirror.
    rebuilds: Mutex<HashMap<(VolumeId, SocketAddr), Arc<RebuildState>>>,
    /// Rebuild copy passes running at once.
    rebuild_slots: Arc<tokio::sync::Semaphore>,
    /// When the rebuild bandwidth is next free (a token bucket without burst).
    rebuild_bucket: tokio::sync::Mutex<Instant>,
}

impl Replicator {
    pub fn new(cfg: Replication) -> Replicator {
        let slots = cfg.rebuild_concurrency.max(1);
        Replicator {
            cfg,
            mirrors: Mutex::new(HashMap::new()),
            failures: tokio::sync::Mutex::new(()),
            rebuilds: Mutex::new(HashMap::new()),
            rebuild_slots: Arc::new(tokio::sync::Semaphore::new(slots)),
            rebuild_bucket: tokio::sync::Mutex::new(Instant::now()),
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
        self.send_all_status(mirrors, req)
            .await
            .into_iter()
            .map(|(m, _)| m)
            .collect()
    }

    /// [`Replicator::send_all`], with the status each failed mirror answered (`None`: no
    /// answer).
    pub async fn send_all_status(
        &self,
        mirrors: &[SocketAddr],
        req: &Request,
    ) -> Vec<(SocketAddr, Option<Status>)> {
        let Some(tls) = self.cfg.client_tls.clone() else {
            return mirrors.iter().map(|&m| (m, None)).collect();
        };
        let timeout = self.cfg.timeout;
        if let [m] = mirrors {
            // The common case (two copies): no task of its own.
            let r = self.conn(*m, &tls).call(req.clone(), timeout).await;
            return mirror_outcome(*m, req, r).into_iter().collect();
        }
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
            let r = h.await.unwrap_or_else(|e| Err(format!("task failed: {e}")));
            failed.extend(mirror_outcome(m, req, r));
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

/// A mirror's answer to a replicated request: `None` if it succeeded, else the mirror and the
/// status it answered (`None` if it did not answer), logged.
fn mirror_outcome(
    m: SocketAddr,
    req: &Request,
    r: Result<Response, String>,
) -> Option<(SocketAddr, Option<Status>)> {
    let (outcome, status) = match r {
        Ok(resp) if resp.status == Status::Ok => return None,
        Ok(resp) => (
            format!("answered {} (mirror epoch {})", resp.status, resp.epoch),
            Some(resp.status),
        ),
        Err(e) => (e, None),
    };
    tracing::warn!(volume = %req.volume, mirror = %m, op = ?req.op, epoch = %req.epoch, error = %outcome, "mirror failed a replicated request");
    Some((m, status))
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
            let mut batch = WriteBatch::new();
            while let Some(first) = rx.recv().await {
                batch.push_request(first);
                while batch.len() < (1 << 20) {
                    match rx.try_recv() {
                        Ok(r) => batch.push_request(r),
                        Err(_) => break,
                    }
                }
                if let Err(e) = batch.write_to(&mut wr).await {
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
    async fn call(&self, req: Request, timeout: Duration) -> Result<Response, String> {
        self.call_with(req, timeout, true).await
    }

    /// [`MirrorConn::call`]; `kill_on_timeout` false leaves the connection alone after a
    /// timeout (a background query must not fail the writes sharing it early: they have
    /// timeouts of their own).
    async fn call_with(
        &self,
        mut req: Request,
        timeout: Duration,
        kill_on_timeout: bool,
    ) -> Result<Response, String> {
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
                if !kill_on_timeout {
                    return Err(format!("no answer within {timeout:?}"));
                }
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

/// Progress of one rebuild (R7), for reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    pub volume: VolumeId,
    pub mirror: SocketAddr,
    /// The epoch of the current copy pass.
    pub epoch: Epoch,
    /// Bytes of the volume copied (or found to be holes, or, in an incremental pass, already
    /// on the mirror) in the current pass: the pass walks the volume in order.
    pub copied: u64,
    /// The volume's size.
    pub total: u64,
    /// Every byte copied and every later write forwarded: waiting to be put in sync.
    pub done: bool,
    /// The current pass copies only the chunks dirtied since the mirror's copy last held the
    /// primary's data (its dirty-chunk map), not every chunk.
    pub incremental: bool,
    /// Chunks the current pass must copy (all of them in a full pass).
    pub chunks_to_copy: u64,
    /// Of those, chunks copied so far.
    pub chunks_copied: u64,
}

/// One rebuild's shared state: the copy task updates it, replicated writes flag failures.
#[derive(Debug, Default)]
struct RebuildState {
    epoch: AtomicU64,
    copied: AtomicU64,
    total: AtomicU64,
    done: AtomicBool,
    /// A forwarded write failed on the mirror in the current pass: the mirror missed it (its
    /// chunks are dirty), so the pass stops and starts again over the dirty chunks (forwarding
    /// pauses until then; writes not sent mark their chunks dirty).
    failed: AtomicBool,
    incremental: AtomicBool,
    /// 1 + the epoch at which this primary asked to put the mirror in sync (0: never): ops
    /// admitted at that epoch are acknowledged only with the mirror's acknowledgement.
    syncing_at: AtomicU64,
    chunks_to_copy: AtomicU64,
    chunks_copied: AtomicU64,
}

impl RebuildState {
    /// Whether this primary asked to put the mirror in sync at `epoch` or later: an op
    /// admitted at `epoch` must then reach the mirror to be acknowledged.
    fn syncing_covers(&self, epoch: Epoch) -> bool {
        let at = self.syncing_at.load(Ordering::SeqCst);
        at != 0 && epoch.0 < at
    }
}

impl Replicator {
    /// The rebuilds running now.
    pub fn rebuild_progress(&self) -> Vec<RebuildProgress> {
        let map = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<RebuildProgress> = map
            .iter()
            .map(|(&(volume, mirror), st)| RebuildProgress {
                volume,
                mirror,
                epoch: Epoch(st.epoch.load(Ordering::Acquire)),
                copied: st.copied.load(Ordering::Acquire),
                total: st.total.load(Ordering::Acquire),
                done: st.done.load(Ordering::Acquire),
                incremental: st.incremental.load(Ordering::Acquire),
                chunks_to_copy: st.chunks_to_copy.load(Ordering::Acquire),
                chunks_copied: st.chunks_copied.load(Ordering::Acquire),
            })
            .collect();
        v.sort_by_key(|p| (p.volume.0, p.mirror));
        v
    }

    /// Whether a forwarded op admitted at `epoch` should go to the rebuilding `mirror`: not
    /// while its pass is void (the op marks its chunks dirty instead), unless this primary
    /// asked at `epoch` to put the mirror in sync (then the op must reach it).
    pub fn forward_to_rebuilding(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> bool {
        let map = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(volume, mirror))
            .is_none_or(|st| !st.failed.load(Ordering::SeqCst) || st.syncing_covers(epoch))
    }

    /// An op admitted at `epoch` was applied here but not by the rebuilding `mirror` (not sent
    /// to it while its pass was void, or it failed there); its chunks are already marked
    /// dirty. The current pass (if at `epoch` or older) is void and starts again over the
    /// dirty chunks. True if the op must not be acknowledged: this primary asked at `epoch` to
    /// put the mirror in sync, and the controller may have done so already (the mirror, at
    /// the new epoch, lacks the op). Sets `failed` before reading `syncing_at` (the rebuild
    /// task stores `syncing_at` before reading `failed`), both sequentially consistent.
    pub fn rebuild_missed(&self, volume: VolumeId, mirror: SocketAddr, epoch: Epoch) -> bool {
        let map = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = map.get(&(volume, mirror)) else {
            return false;
        };
        if epoch.0 >= st.epoch.load(Ordering::Acquire) {
            if !st.failed.swap(true, Ordering::SeqCst) {
                tracing::warn!(%volume, %mirror, %epoch, "rebuilding mirror missed a write; its rebuild starts again over the dirty chunks");
            }
            st.done.store(false, Ordering::Release);
        }
        st.syncing_covers(epoch)
    }

    /// Starts a rebuild task for every mirror `copy` is rebuilding that has none (after a
    /// membership change, and at startup). A task ends when its mirror leaves the list.
    pub fn reconcile_rebuilds(self: &Arc<Self>, copy: &Arc<Copy>) {
        if copy.is_deleted() || copy.role() != CopyRole::Primary {
            return;
        }
        if copy.fresh() {
            self.track_fresh_mirrors(copy);
        }
        let mut map = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        for &m in copy.rebuilding().iter() {
            let key = (copy.volume(), m);
            if map.contains_key(&key) {
                continue;
            }
            let st = Arc::new(RebuildState::default());
            map.insert(key, st.clone());
            let (repl, copy) = (self.clone(), copy.clone());
            tokio::spawn(async move { repl.rebuild_task(copy, m, st).await });
        }
    }

    /// A copy created empty here as a primary, with in-sync mirrors (created with it): their
    /// maps started clean when the membership was applied ([`Copy::set_membership_rebuilding`]);
    /// each mirror's identity is asked for in the background (a map without one is never used,
    /// nor one that was marked before the answer came).
    fn track_fresh_mirrors(self: &Arc<Self>, copy: &Arc<Copy>) {
        let Some(tls) = self.cfg.client_tls.clone() else {
            return;
        };
        for &m in copy.mirrors().iter() {
            if copy.dirty().identity(m).is_some() || copy.dirty().dirty_count(m) != Some(0) {
                continue;
            }
            let conn = self.conn(m, &tls);
            let (copy, timeout) = (copy.clone(), self.cfg.timeout.max(Duration::from_secs(2)));
            tokio::spawn(async move {
                match query_identity(&conn, copy.volume(), copy.epoch(), timeout).await {
                    Ok(Some(id)) => {
                        let kept = copy.dirty().learned(m, id);
                        tracing::info!(volume = %copy.volume(), mirror = %m, kept, "tracking mirror for incremental resync");
                    }
                    Ok(None) => {
                        tracing::info!(volume = %copy.volume(), mirror = %m, "mirror did not say which copy it holds; its resync will be full")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %copy.volume(), mirror = %m, error = %e, "could not ask the mirror which copy it holds; its resync will be full")
                    }
                }
            });
        }
    }

    fn still_rebuilding(copy: &Copy, mirror: SocketAddr) -> bool {
        !copy.is_deleted()
            && copy.role() == CopyRole::Primary
            && copy.rebuilding().contains(&mirror)
    }

    async fn rebuild_task(
        self: Arc<Self>,
        copy: Arc<Copy>,
        mirror: SocketAddr,
        st: Arc<RebuildState>,
    ) {
        let volume = copy.volume();
        let mut backoff = Duration::from_millis(100);
        loop {
            if !Self::still_rebuilding(&copy, mirror) {
                // Under the map lock, so a membership adding it back either sees this task
                // or starts a new one.
                let mut map = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
                if !Self::still_rebuilding(&copy, mirror) {
                    if map
                        .get(&(volume, mirror))
                        .is_some_and(|x| Arc::ptr_eq(x, &st))
                    {
                        map.remove(&(volume, mirror));
                    }
                    tracing::info!(%volume, %mirror, "rebuild ended: the mirror is no longer being rebuilt");
                    return;
                }
            }
            let Ok(_slot) = self.rebuild_slots.clone().acquire_owned().await else {
                return;
            };
            if !Self::still_rebuilding(&copy, mirror) {
                continue;
            }
            let epoch = copy.epoch();
            st.epoch.store(epoch.0, Ordering::Release);
            st.copied.store(0, Ordering::Release);
            st.total.store(copy.size(), Ordering::Release);
            st.done.store(false, Ordering::Release);
            st.chunks_copied.store(0, Ordering::Release);
            let started = Instant::now();
            let pass = self.copy_pass(&copy, mirror, &st, epoch).await;
            drop(_slot);
            let left = copy.dirty().dirty_count(mirror).unwrap_or(u64::MAX);
            let clean = pass.is_ok()
                && !st.failed.load(Ordering::Acquire)
                && copy.epoch() == epoch
                && copy.size() == st.total.load(Ordering::Acquire)
                && left == 0;
            if !clean {
                let why = pass.err().unwrap_or_else(|| {
                    format!("membership changed or a forwarded write failed ({left} chunks dirty)")
                });
                tracing::warn!(%volume, %mirror, %epoch, error = %why, retry_in = ?backoff, "rebuild pass failed; starting again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            backoff = Duration::from_millis(100);
            st.done.store(true, Ordering::Release);
            let secs = started.elapsed().as_secs_f64();
            let chunks = st.chunks_copied.load(Ordering::Acquire);
            let mib =
                (chunks * u64::from(CHUNK_SIZE)).min(copy.size()) as f64 / f64::from(1u32 << 20);
            tracing::info!(%volume, %mirror, %epoch, incremental = st.incremental.load(Ordering::Acquire), chunks, seconds = secs, mib_per_sec = mib / secs.max(1e-9), "rebuild copy complete");
            // Ask to be put in sync; while the answer is no, keep forwarding and ask again.
            let mut ask_in = Duration::ZERO;
            loop {
                tokio::time::sleep(ask_in).await;
                if copy.epoch() != epoch
                    || st.failed.load(Ordering::Acquire)
                    || !Self::still_rebuilding(&copy, mirror)
                {
                    break;
                }
                if ask_in.is_zero() || ask_in >= Duration::from_secs(5) {
                    if self.cfg.failure.syncs() {
                        // From here a write at `epoch` the mirror misses is not acknowledged
                        // (checked against `failed` in the other order by the writes).
                        st.syncing_at.store(epoch.0 + 1, Ordering::SeqCst);
                        if st.failed.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    match self.cfg.failure.mirror_synced(volume, mirror, epoch).await {
                        Ok(m) => {
                            tracing::info!(%volume, %mirror, new_epoch = %m.epoch, "rebuilt mirror put in sync")
                        }
                        Err(e) => {
                            tracing::warn!(%volume, %mirror, %epoch, error = %e, "rebuilt mirror not put in sync yet; it stays rebuilding")
                        }
                    }
                    ask_in = Duration::from_millis(100);
                    continue;
                }
                ask_in = (ask_in * 2).min(Duration::from_secs(5));
            }
        }
    }

    /// Waits until `bytes` may be sent under the rebuild bandwidth.
    async fn throttle(&self, bytes: u64) {
        let rate = self.cfg.rebuild_bytes_per_sec;
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let start = {
            let mut next = self.rebuild_bucket.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    /// Copies the chunks of `copy` that `mirror` needs at `epoch` (the dirty ones, if the
    /// mirror holds the copy its map was started for; every one otherwise), each under its
    /// chunk lock held exclusively from the local read until the mirror acknowledged it, then
    /// flushes the mirror and checks its copy is still the same one.
    async fn copy_pass(
        &self,
        copy: &Arc<Copy>,
        mirror: SocketAddr,
        st: &RebuildState,
        epoch: Epoch,
    ) -> Result<(), String> {
        let Some(tls) = self.cfg.client_tls.clone() else {
            return Err("this server cannot replicate (no client certificate)".into());
        };
        let conn = self.conn(mirror, &tls);
        let volume = copy.volume();
        let timeout = self.cfg.timeout.max(Duration::from_secs(10));
        let identity = query_identity(&conn, volume, epoch, timeout)
            .await
            .map_err(|e| format!("asking the mirror which copy it holds: {e}"))?;
        // Forwarding resumes now: from here every write reaches the mirror or marks its
        // chunks dirty, and the plan below includes every chunk dirty so far.
        st.failed.store(false, Ordering::Release);
        let size = copy.size();
        let plan = copy.dirty().start_pass(mirror, identity, size);
        st.incremental.store(plan.incremental, Ordering::Release);
        st.chunks_to_copy.store(plan.len(), Ordering::Release);
        tracing::info!(
            %volume, %mirror, %epoch, size,
            incremental = plan.incremental,
            chunks_to_copy = plan.len(),
            chunks_in_volume = crate::dirty::chunks_of(size),
            "rebuild started"
        );
        let chunk = u64::from(CHUNK_SIZE);
        let mut id = 0u64;
        for c in plan.chunks.iter() {
            let off = c * chunk;
            if off >= size {
                break;
            }
            if copy.epoch() != epoch || st.failed.load(Ordering::Acquire) || copy.is_deleted() {
                return Err("membership changed or a forwarded write failed".into());
            }
            st.copied.store(off, Ordering::Release);
            let len = (size - off).min(chunk);
            let data = copy.may_have_data(off, len);
            if data {
                self.throttle(len).await;
            }
            let shard = copy.chunk_lock_shards(off, len)[0];
            let lock = copy.chunk_lock(shard);
            let guard = lock.write_owned().await;
            // Clean before the read: a write landing after it marks the chunk again.
            copy.dirty().take_chunk(mirror, c);
            id += 1;
            let sent = self
                .copy_chunk(copy, &conn, epoch, id, off, len, data, timeout)
                .await;
            if let Err(e) = sent {
                copy.dirty().mark_chunk(mirror, c);
                return Err(e);
            }
            drop(guard);
            st.chunks_copied.fetch_add(1, Ordering::AcqRel);
            st.copied.store(off + len, Ordering::Release);
        }
        st.copied.store(size, Ordering::Release);
        // Make the copy durable on the mirror before it counts as in sync.
        let req = Request::new(keel_proto::Op::Flush, id + 1, volume, epoch);
        match conn.call(req, timeout).await {
            Ok(r) if r.status == Status::Ok => {}
            Ok(r) => {
                if matches!(r.status, Status::IoError | Status::CopyLost) {
                    copy.dirty().forget(mirror);
                }
                return Err(format!("mirror answered flush with {}", r.status));
            }
            Err(e) => return Err(format!("flush: {e}")),
        }
        // The copy written is the one the pass was planned for (not deleted and recreated, nor
        // its server rebooted, meanwhile).
        let after = query_identity(&conn, volume, epoch, timeout)
            .await
            .map_err(|e| format!("asking the mirror which copy it holds: {e}"))?;
        if after.is_none() || after != identity {
            copy.dirty().forget(mirror);
            return Err("the mirror's copy changed during the pass; copying it whole".into());
        }
        Ok(())
    }

    /// Sends one chunk (`[off, off + len)`, read now) to the mirror as a write, or as
    /// write-zeroes if it is all hole.
    #[allow(clippy::too_many_arguments)]
    async fn copy_chunk(
        &self,
        copy: &Arc<Copy>,
        conn: &MirrorConn,
        epoch: Epoch,
        id: u64,
        off: u64,
        len: u64,
        data: bool,
        timeout: Duration,
    ) -> Result<(), String> {
        let op = if data {
            keel_proto::Op::Write
        } else {
            keel_proto::Op::WriteZeroes
        };
        let mut req = Request::new(op, id, copy.volume(), epoch);
        req.offset = off;
        req.length = len as u32;
        if data {
            let c = copy.clone();
            let buf = tokio::task::spawn_blocking(move || {
                let mut b = vec![0u8; len as usize];
                c.read(off, &mut b).map(|()| b)
            })
            .await
            .map_err(|e| format!("read task failed: {e}"))?
            .map_err(|e| format!("reading chunk at {off}: {e}"))?;
            req.crc = keel_proto::frame::checksum(&buf);
            req.payload = buf.into();
        }
        match conn.call(req, timeout).await {
            Ok(r) if r.status == Status::Ok => Ok(()),
            Ok(r) => {
                if matches!(r.status, Status::IoError | Status::CopyLost) {
                    // Its disk failed: what it acknowledged before may be lost.
                    copy.dirty().forget(conn.addr);
                }
                Err(format!(
                    "mirror answered {} (mirror epoch {}) at offset {off}",
                    r.status, r.epoch
                ))
            }
            Err(e) => Err(format!("at offset {off}: {e}")),
        }
    }
}

/// Asks the mirror which copy of `volume` it holds (a ping from a storage peer, answered with
/// the copy's identity): `Ok(None)` if it does not say (an older server, or no such copy).
async fn query_identity(
    conn: &MirrorConn,
    volume: VolumeId,
    epoch: Epoch,
    timeout: Duration,
) -> Result<Option<CopyIdentity>, String> {
    let req = Request::new(keel_proto::Op::Ping, 0, volume, epoch);
    let r = conn.call_with(req, timeout, false).await?;
    if r.status != Status::Ok || !r.crc_ok() {
        return Ok(None);
    }
    Ok(CopyIdentity::decode(&r.payload))
}
