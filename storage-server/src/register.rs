//! Registration with the controller and the heartbeat loop: the server announces its id,
//! address, zone and capacity, then reports every second what copies it holds (size, epoch,
//! role) and its request counters. A `404` answer (the controller lost or never had the
//! registration) makes it register again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_api::{ApiClient, CopyReport, ServerCounters, ServerHeartbeat, ServerRegistration};

use crate::copy::CopyRole;
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
}

async fn register(r: &Registration) {
    let reg = ServerRegistration {
        id: r.id.clone(),
        address: r.address.to_string(),
        zone: r.zone.clone(),
        capacity_bytes: r.capacity_bytes,
    };
    let mut delay = Duration::from_millis(100);
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
            Err(e) => {
                tracing::warn!(error = %e, "registering with the controller failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn heartbeat(store: &Store, stats: &Stats) -> ServerHeartbeat {
    let s = stats.snapshot();
    ServerHeartbeat {
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
            })
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
pub async fn run(r: Registration, store: Arc<Store>, stats: Arc<Stats>) {
    register(&r).await;
    let path = format!("/v1/servers/{}/heartbeat", r.id);
    loop {
        let hb = heartbeat(&store, &stats);
        match r.api.post::<_, serde_json::Value>(&path, &hb).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => register(&r).await,
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        tokio::time::sleep(r.interval).await;
    }
}
