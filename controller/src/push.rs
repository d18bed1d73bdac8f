//! Pushes the controller's decisions to the storage servers with the copy administration ops
//! of the data-path protocol (see docs/protocol.md, "Copy administration").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::admin::{admin_call_with_timeout, AdminError, AdminRequest};
use keel_proto::frame::{Frame, Request};
use keel_proto::io::{connect, read_frame};
use keel_proto::{Epoch, MemberRole, Op, Role, Status, VolumeId};
use tokio::io::AsyncWriteExt;

use crate::model::CopyRole;

/// What a copy is told by `set_membership` (docs/replication.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub role: CopyRole,
    pub epoch: u64,
    pub writer_epoch: u64,
    /// A primary's in-sync mirrors (empty for a mirror).
    pub mirrors: Vec<SocketAddr>,
    /// A primary's mirrors being rebuilt (empty for a mirror).
    pub rebuilding: Vec<SocketAddr>,
    /// The primary's server id (what a mirror takes replicated requests from).
    pub primary: Option<String>,
    /// The node certificates that may use the copy (docs/security.md).
    pub grants: Vec<keel_proto::members::Grant>,
}

/// Storage server administration, as this controller (its `controller-<id>` certificate).
#[derive(Clone)]
pub struct Pusher {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

/// Why a push did not take.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("volume id {0:?} is not hex")]
    BadId(String),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("ping of {addr} not answered within {after:?}")]
    PingTimeout { addr: SocketAddr, after: Duration },
    #[error("ping of {addr} failed: {why}")]
    Ping { addr: SocketAddr, why: String },
}

fn vid(id: &str) -> Result<VolumeId, PushError> {
    id.parse().map_err(|_| PushError::BadId(id.to_string()))
}

fn role(r: CopyRole) -> MemberRole {
    match r {
        CopyRole::Primary => MemberRole::Primary,
        CopyRole::Mirror => MemberRole::Mirror,
    }
}

impl Pusher {
    pub fn new(tls: Arc<rustls::ClientConfig>, timeout: Duration) -> Pusher {
        Pusher { tls, timeout }
    }

    async fn call(&self, addr: SocketAddr, req: AdminRequest) -> Result<(), PushError> {
        admin_call_with_timeout(addr, self.tls.clone(), req, self.timeout).await?;
        Ok(())
    }

    pub async fn create_copy(
        &self,
        addr: SocketAddr,
        volume: &str,
        size: u64,
        r: CopyRole,
        epoch: u64,
    ) -> Result<(), PushError> {
        let req = AdminRequest::CreateCopy {
            volume: vid(volume)?,
            size,
            role: role(r),
            epoch: Epoch(epoch),
        };
        self.call(addr, req).await
    }

    pub async fn delete_copy(&self, addr: SocketAddr, volume: &str) -> Result<(), PushError> {
        self.call(
            addr,
            AdminRequest::DeleteCopy {
                volume: vid(volume)?,
            },
        )
        .await
    }

    /// Sets a copy's role, epochs and (for a primary) its in-sync and rebuilding mirrors.
    pub async fn set_membership(
        &self,
        addr: SocketAddr,
        volume: &str,
        m: Membership,
    ) -> Result<(), PushError> {
        let req = AdminRequest::SetMembership {
            volume: vid(volume)?,
            role: role(m.role),
            epoch: Epoch(m.epoch),
            writer_epoch: Epoch(m.writer_epoch),
            mirrors: m.mirrors,
            rebuilding: m.rebuilding,
            primary: m.primary,
            grants: m.grants,
        };
        self.call(addr, req).await
    }

    pub async fn resize(&self, addr: SocketAddr, volume: &str, size: u64) -> Result<(), PushError> {
        self.call(
            addr,
            AdminRequest::Resize {
                volume: vid(volume)?,
                size,
            },
        )
        .await
    }

    /// The controller's own probe of a storage server (docs/replication.md, R6): a data-path
    /// `Ping` on a fresh TLS connection, answered within `limit`. A hung (stopped) server
    /// accepts the TCP connection in its kernel but never completes the handshake. A server
    /// that answers for its other copies but not for this one (R10) fails the probe too.
    pub async fn ping(
        &self,
        addr: SocketAddr,
        volume: &str,
        limit: Duration,
    ) -> Result<(), PushError> {
        let volume = vid(volume)?;
        let tls = self.tls.clone();
        let exchange = async move {
            let (mut s, _peer) = connect(addr, tls, Role::Storage)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let bytes = Frame::Request(Request::new(Op::Ping, 1, volume, Epoch(0))).to_bytes();
            s.write_all(&bytes).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            match read_frame(&mut s, &mut buf).await {
                Ok(Some(Frame::Response(r))) if r.request_id == 1 => {
                    let _ = s.shutdown().await;
                    // Per copy (R10): `copy lost`, or `unknown volume` for a copy the server
                    // does not hold, is a primary that cannot serve.
                    match r.status {
                        Status::Ok => Ok(()),
                        status => Err(format!("the server answered {status} for the volume")),
                    }
                }
                Ok(Some(_)) => Err("unexpected frame in answer to a ping".to_string()),
                Ok(None) => Err("connection closed without an answer".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(PushError::Ping { addr, why }),
            Err(_) => Err(PushError::PingTimeout { addr, after: limit }),
        }
    }
}
