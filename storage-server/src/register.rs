//! Registration with the controller and the heartbeat loop: the server announces its id,
//! address, zone and capacity, then reports every second what copies it holds (size, epoch,
//! role) and its request counters. A `404` answer (the controller lost or never had the
//! registration) makes it register again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_api::{ApiClient, CopyReport, ServerCounters, ServerHeartbeat, ServerRegistration};

use keel_proto::{Epoch, VolumeId};

use crate::copy::CopyRole;
use crate::replicate::{BoxFuture, MirrorFailure, NewMembership, Refused, Replicator};
use crate::server::Stats;
use crate::store::Store;

/// What the loop needs.
pub struct Registration {
    pub api: ApiClient,
    pub id: String,
    pub address: SocketAddr,
    pub zone: String,
    pub capacity_bytes: u64,
    pub interval: Duration,
    /// The server's TLS (certificate, CRL): a heartbeat answer naming a newer CRL than the one
    /// applied makes the server fetch and apply it (docs/security.md, "Certificates").
    pub tls: Option<Arc<keel_proto::tls::TlsSource>>,
    /// Where the applied CRL is kept across restarts.
    pub crl_file: Option<std::path::PathBuf>,
}

async fn register(r: &Registration) {
    let reg = ServerRegistration {
        id: r.id.clone(),
        address: r.address.to_string(),
        zone: r.zone.clone(),
        capacity_bytes: r.capacity_bytes,
    };
    let mut delay = Duration::from_millis(100);
    let start = std::time::Instant::now();
    loop {
        match r
            .api
            .post::<_, keel_api::ServerInfo>("/v1/servers", &reg)
            .await
        {
            Ok(_) => {
                tracing::info!(controller = %r.api.url(), "registered with the controller");
                return;
            }
            Err(e) if start.elapsed() < keel_api::REGISTER_QUIET => {
                tracing::info!(error = %e, "registering with the controller failed (it may be starting); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "registering with the controller failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn heartbeat(store: &Store, stats: &Stats, repl: &Replicator) -> ServerHeartbeat {
    let s = stats.snapshot();
    ServerHeartbeat {
        rebuilds: repl
            .rebuild_progress()
            .into_iter()
            .map(|r| keel_api::RebuildReport {
                volume: format!("{:016x}", r.volume.0),
                mirror: r.mirror.to_string(),
                copied: r.copied,
                total: r.total,
            })
            .collect(),
        used_bytes: store.used_bytes(),
        copies: store
            .list()
            .iter()
            .map(|c| CopyReport {
                volume: format!("{:016x}", c.volume().0),
                size: c.size(),
                epoch: c.epoch().0,
                role: match c.role() {
                    CopyRole::Primary => "primary".into(),
                    CopyRole::Mirror => "mirror".into(),
                },
                access_crc32c: Some(c.access().access_digest()),
                fault: c.fault(),
            })
            // Copies whose file could not be opened: lost, nothing else known (R10).
            .chain(store.broken().into_iter().map(|(v, b)| CopyReport {
                volume: format!("{:016x}", v.0),
                size: 0,
                epoch: 0,
                role: "unknown".into(),
                access_crc32c: None,
                fault: Some(b.why),
            }))
            .collect(),
        counters: ServerCounters {
            reads: s.reads,
            writes: s.writes,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            errors: s.errors,
        },
    }
}

/// Registers, then heartbeats forever.
pub async fn run(r: Registration, store: Arc<Store>, stats: Arc<Stats>, repl: Arc<Replicator>) {
    register(&r).await;
    let path = format!("/v1/servers/{}/heartbeat", r.id);
    loop {
        let hb = heartbeat(&store, &stats, &repl);
        match r.api.post::<_, keel_api::HeartbeatAnswer>(&path, &hb).await {
            Ok(answer) => {
                if let Some(tls) = &r.tls {
                    if let Err(e) =
                        keel_api::sync_crl(&r.api, tls, answer.crl_number, r.crl_file.as_deref())
                            .await
                    {
                        tracing::warn!(error = %e, "certificate revocation list not applied");
                    }
                }
            }
            Err(e) if e.status() == Some(404) => register(&r).await,
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        tokio::time::sleep(r.interval).await;
    }
}

/// The controller-backed [`MirrorFailure`] handler: asks the controller to drop the mirror
/// (`POST /v1/volumes/{id}/mirror-failed`), which answers only after it pushed the new
/// membership to this server (docs/replication.md, R5); and to put a rebuilt mirror in sync
/// (`POST /v1/volumes/{id}/mirror-synced`, R7).
pub struct ControllerMirrorFailure {
    pub api: ApiClient,
}

impl ControllerMirrorFailure {
    /// `POST /v1/volumes/{volume}/{action}` with `{"mirror", "epoch"}`; the controller answers
    /// `{"epoch"}` once it pushed the new membership to this server.
    async fn report(
        &self,
        action: &str,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> Result<NewMembership, Refused> {
        let path = format!("/v1/volumes/{:016x}/{action}", volume.0);
        let body = keel_api::MirrorFailed {
            mirror: mirror.to_string(),
            epoch: epoch.0,
        };
        match self
            .api
            .post::<_, keel_api::MembershipInfo>(&path, &body)
            .await
        {
            Ok(m) => Ok(NewMembership {
                epoch: Epoch(m.epoch),
                // The copy's own lists (pushed by the controller) are what count.
                mirrors: Vec::new(),
            }),
            Err(e) => Err(Refused {
                reason: format!("the controller refused {action} for mirror {mirror}: {e}"),
            }),
        }
    }
}

impl MirrorFailure for ControllerMirrorFailure {
    fn mirror_failed(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(self.report("mirror-failed", volume, mirror, epoch))
    }

    fn syncs(&self) -> bool {
        true
    }

    /// Asks the controller to put a rebuilt mirror in sync (R7).
    fn mirror_synced(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(self.report("mirror-synced", volume, mirror, epoch))
    }
}
