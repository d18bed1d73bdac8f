//! The controller's client for copy administration on a storage server: one connection, one
//! request, one response.
//!
//! The server answers admin ops only for peers whose certificate has role `controller`; the
//! caller's `tls` configuration must therefore hold a `controller-<id>` certificate. Every op is
//! idempotent on the server, so a caller that sees [`AdminError::Timeout`], [`AdminError::Connect`]
//! or [`AdminError::Io`] may simply retry. See `docs/protocol.md` ("Copy administration").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::frame::{checksum, DecodeError, Frame, Request, Response};
use crate::io::{connect, read_frame, FrameIoError};
use crate::members::{Grant, MemberList};
use crate::types::{Epoch, MemberRole, Op, Role, Status, VolumeId};

/// How long [`admin_call`] waits for connecting, the TLS handshake and the answer together.
/// Admin ops fsync, so this is generous.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The request id of the single request an [`admin_call`] connection carries.
const ADMIN_REQUEST_ID: u64 = 1;

/// One copy administration request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// Create the copy (`size` bytes, a positive multiple of 512) with `role` at `epoch`.
    /// Idempotent: an existing copy of the same size is kept (and moved to `epoch` and `role`
    /// if `epoch` is not older than its own); a different size is `BadRequest`.
    CreateCopy {
        volume: VolumeId,
        size: u64,
        role: MemberRole,
        epoch: Epoch,
    },
    /// Delete the copy and its file. Deleting an absent copy succeeds.
    DeleteCopy { volume: VolumeId },
    /// Durably set the copy's role, epoch and writer epoch, and for a primary the data-path
    /// addresses of its in-sync mirrors (empty for a mirror); an epoch older than the copy's is
    /// `StaleEpoch`. Once answered, node requests with an epoch below `writer_epoch` are
    /// refused `StaleEpoch`, and replicated requests with an epoch other than `epoch` are
    /// refused. `writer_epoch` (at most `epoch`) is the epoch at which the volume's current
    /// writer attached; it travels in the request's `offset`, the mirrors in its payload (one
    /// `IP:PORT` per line for each in-sync mirror, one `rebuild IP:PORT` per line for each
    /// mirror being rebuilt; see [`crate::members`]).
    ///
    /// A primary forwards node mutations to its `rebuilding` mirrors too, without waiting for
    /// their success, and copies its data to them in the background (R7,
    /// `docs/replication.md`). An address may not be in both lists; a mirror has neither.
    ///
    /// The access list travels in the same payload, for every role (docs/security.md): the
    /// node certificates that may use the copy (`grants`) and the storage server that is the
    /// volume's primary (`primary`: on a mirror, the only peer whose replicated requests it
    /// takes). Once answered, requests from anyone else are refused `Unauthorized`.
    SetMembership {
        volume: VolumeId,
        role: MemberRole,
        epoch: Epoch,
        writer_epoch: Epoch,
        mirrors: Vec<SocketAddr>,
        rebuilding: Vec<SocketAddr>,
        primary: Option<String>,
        grants: Vec<Grant>,
    },
    /// Grow the copy to `size` bytes (a multiple of 512); shrinking is `BadRequest`.
    Resize { volume: VolumeId, size: u64 },
}

impl AdminRequest {
    /// The op carrying this request.
    pub fn op(&self) -> Op {
        match self {
            AdminRequest::CreateCopy { .. } => Op::CreateCopy,
            AdminRequest::DeleteCopy { .. } => Op::DeleteCopy,
            AdminRequest::SetMembership { .. } => Op::SetMembership,
            AdminRequest::Resize { .. } => Op::Resize,
        }
    }

    /// The volume the request is about.
    pub fn volume(&self) -> VolumeId {
        match *self {
            AdminRequest::CreateCopy { volume, .. }
            | AdminRequest::DeleteCopy { volume }
            | AdminRequest::SetMembership { volume, .. }
            | AdminRequest::Resize { volume, .. } => volume,
        }
    }

    /// The wire request: size (set membership: writer epoch) in `offset`, role in `length`,
    /// epoch in `epoch` (0 where unused), set membership's mirrors in the payload.
    pub fn to_request(&self, request_id: u64) -> Request {
        let (epoch, offset, role, payload) = match self {
            AdminRequest::CreateCopy {
                size, role, epoch, ..
            } => (*epoch, *size, *role as u32, Vec::new()),
            AdminRequest::DeleteCopy { .. } => (Epoch(0), 0, 0, Vec::new()),
            AdminRequest::SetMembership {
                role,
                epoch,
                writer_epoch,
                mirrors,
                rebuilding,
                primary,
                grants,
                ..
            } => (
                *epoch,
                writer_epoch.0,
                *role as u32,
                MemberList {
                    in_sync: mirrors.clone(),
                    rebuilding: rebuilding.clone(),
                    primary: primary.clone(),
                    grants: grants.clone(),
                }
                .encode(),
            ),
            AdminRequest::Resize { size, .. } => (Epoch(0), *size, 0, Vec::new()),
        };
        let mut r = Request::new(self.op(), request_id, self.volume(), epoch);
        r.offset = offset;
        r.length = role;
        r.crc = checksum(&payload);
        r.payload = payload.into();
        r
    }

    /// Whether the server would accept the request's fields (the same check its decoder makes;
    /// a malformed request would only make it close the connection).
    pub fn validate(&self) -> Result<(), DecodeError> {
        let bytes = Frame::Request(self.to_request(ADMIN_REQUEST_ID)).to_bytes();
        Frame::decode(&bytes).map(|_| ())
    }
}

/// Why an [`admin_call`] did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request's fields are malformed (e.g. a size of 0 or not a multiple of 512); nothing
    /// was sent.
    #[error("invalid admin request: {0}")]
    Invalid(#[source] DecodeError),
    /// TCP connect, TLS handshake (including the server's role check) or hello failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: FrameIoError,
    },
    /// The connection failed after it was set up, or the server answered with something that
    /// is not the response to the request (it closed the connection, or sent another frame).
    #[error("talking to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: FrameIoError,
    },
    /// No answer within the time limit. The op may or may not have been done: retry it.
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    /// The server refused or failed the request. `epoch` is the copy's current epoch (0 if
    /// there is no copy, or the caller may not know it).
    #[error("{addr} answered {status} (copy epoch {epoch})")]
    Status {
        addr: SocketAddr,
        status: Status,
        epoch: Epoch,
    },
}

impl AdminError {
    /// The server's status, if it answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            AdminError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Connects to the storage server at `addr` (whose certificate must have role `storage`),
/// sends `req`, and returns the server's `Ok` response (its `epoch` is the copy's current
/// epoch). Any other status is [`AdminError::Status`]. The whole exchange is bounded by
/// [`ADMIN_TIMEOUT`].
pub async fn admin_call(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    req: AdminRequest,
) -> Result<Response, AdminError> {
    admin_call_with_timeout(addr, tls, req, ADMIN_TIMEOUT).await
}

/// [`admin_call`] with a caller-chosen time limit.
pub async fn admin_call_with_timeout(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    req: AdminRequest,
    limit: Duration,
) -> Result<Response, AdminError> {
    req.validate().map_err(AdminError::Invalid)?;
    match tokio::time::timeout(limit, exchange(addr, tls, req)).await {
        Ok(r) => r,
        Err(_) => Err(AdminError::Timeout { addr, after: limit }),
    }
}

async fn exchange(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    req: AdminRequest,
) -> Result<Response, AdminError> {
    let (mut s, _peer) = connect(addr, tls, Role::Storage)
        .await
        .map_err(|source| AdminError::Connect { addr, source })?;
    let io = |source: FrameIoError| AdminError::Io { addr, source };
    let bytes = Frame::Request(req.to_request(ADMIN_REQUEST_ID)).to_bytes();
    s.write_all(&bytes).await.map_err(|e| io(e.into()))?;
    s.flush().await.map_err(|e| io(e.into()))?;
    let mut buf = Vec::new();
    let resp = match read_frame(&mut s, &mut buf).await.map_err(io)? {
        Some(Frame::Response(r)) if r.request_id == ADMIN_REQUEST_ID => r,
        Some(other) => {
            return Err(io(FrameIoError::Handshake(format!(
                "expected the response to request {ADMIN_REQUEST_ID}, got {other:?}"
            ))))
        }
        None => {
            return Err(io(FrameIoError::Handshake(
                "server closed the connection without answering".into(),
            )))
        }
    };
    // Best effort: the answer is what counts.
    let _ = s.shutdown().await;
    match resp.status {
        Status::Ok => Ok(resp),
        status => Err(AdminError::Status {
            addr,
            status,
            epoch: resp.epoch,
        }),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn requests_encode_their_fields_and_decode() {
        let v = VolumeId(9);
        let cases = [
            (
                AdminRequest::CreateCopy {
                    volume: v,
                    size: 1 << 30,
                    role: MemberRole::Mirror,
                    epoch: Epoch(4),
                },
                (Op::CreateCopy, Epoch(4), 1 << 30, 1),
            ),
            (
                AdminRequest::DeleteCopy { volume: v },
                (Op::DeleteCopy, Epoch(0), 0, 0),
            ),
            (
                AdminRequest::SetMembership {
                    volume: v,
                    role: MemberRole::Primary,
                    epoch: Epoch(7),
                    writer_epoch: Epoch(5),
                    mirrors: Vec::new(),
                    rebuilding: Vec::new(),
                    primary: None,
                    grants: Vec::new(),
                },
                (Op::SetMembership, Epoch(7), 5, 0),
            ),
            (
                AdminRequest::Resize {
                    volume: v,
                    size: 2 << 30,
                },
                (Op::Resize, Epoch(0), 2 << 30, 0),
            ),
        ];
        for (req, (op, epoch, offset, length)) in cases {
            let r = req.to_request(3);
            assert_eq!(
                (r.op, r.epoch, r.offset, r.length, r.volume, r.request_id),
                (op, epoch, offset, length, v, 3)
            );
            assert!(r.payload.is_empty());
            req.validate().expect("valid");
            assert_eq!(req.volume(), v);
        }
        // A primary's mirrors travel in the payload, checksummed.
        let mirrors: Vec<SocketAddr> = vec![
            "10.1.0.1:7500".parse().expect("addr"),
            "10.1.0.2:7500".parse().expect("addr"),
        ];
        let req = AdminRequest::SetMembership {
            volume: v,
            role: MemberRole::Primary,
            epoch: Epoch(9),
            writer_epoch: Epoch(9),
            mirrors: mirrors.clone(),
            rebuilding: Vec::new(),
            primary: None,
            grants: Vec::new(),
        };
        req.validate().expect("valid");
        let r = req.to_request(4);
        assert_eq!(r.payload, b"10.1.0.1:7500\n10.1.0.2:7500".to_vec());
        assert!(r.crc_ok());
        assert_eq!(
            crate::frame::parse_members(&r.payload).expect("parse"),
            mirrors
        );
        // Mirrors being rebuilt follow, marked.
        let r3: SocketAddr = "10.1.0.3:7500".parse().expect("addr");
        let req = AdminRequest::SetMembership {
            volume: v,
            role: MemberRole::Primary,
            epoch: Epoch(9),
            writer_epoch: Epoch(9),
            mirrors: mirrors.clone(),
            rebuilding: vec![r3],
            primary: None,
            grants: Vec::new(),
        };
        req.validate().expect("valid");
        let r = req.to_request(5);
        assert_eq!(
            r.payload,
            b"10.1.0.1:7500\n10.1.0.2:7500\nrebuild 10.1.0.3:7500".to_vec()
        );
        assert!(r.crc_ok());
        assert_eq!(
            crate::frame::parse_membership(&r.payload).expect("parse"),
            (mirrors.clone(), vec![r3])
        );
        // The access list travels in the same payload, on a mirror too.
        let req = AdminRequest::SetMembership {
            volume: v,
            role: MemberRole::Mirror,
            epoch: Epoch(9),
            writer_epoch: Epoch(9),
            mirrors: Vec::new(),
            rebuilding: Vec::new(),
            primary: Some("s1".into()),
            grants: vec![Grant {
                node: "n1".into(),
                access: crate::members::Access::ReadOnly,
            }],
        };
        req.validate().expect("valid");
        let r = req.to_request(6);
        assert_eq!(r.payload, b"primary s1\nnode n1 ro".to_vec());
        // A writer epoch above the epoch, mirrors on a mirror, or an address both in sync and
        // being rebuilt are refused before sending.
        for bad in [
            AdminRequest::SetMembership {
                volume: v,
                role: MemberRole::Primary,
                epoch: Epoch(3),
                writer_epoch: Epoch(4),
                mirrors: Vec::new(),
                rebuilding: Vec::new(),
                primary: None,
                grants: Vec::new(),
            },
            AdminRequest::SetMembership {
                volume: v,
                role: MemberRole::Mirror,
                epoch: Epoch(3),
                writer_epoch: Epoch(3),
                mirrors: mirrors.clone(),
                rebuilding: Vec::new(),
                primary: None,
                grants: Vec::new(),
            },
            AdminRequest::SetMembership {
                volume: v,
                role: MemberRole::Mirror,
                epoch: Epoch(3),
                writer_epoch: Epoch(3),
                mirrors: Vec::new(),
                rebuilding: vec![r3],
                primary: None,
                grants: Vec::new(),
            },
            AdminRequest::SetMembership {
                volume: v,
                role: MemberRole::Primary,
                epoch: Epoch(3),
                writer_epoch: Epoch(3),
                mirrors: mirrors.clone(),
                rebuilding: vec![mirrors[1]],
                primary: None,
                grants: Vec::new(),
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_requests_are_refused_before_connecting() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // No server listens on port 9 of a TEST-NET address: validation must come first.
        let addr: SocketAddr = "192.0.2.1:9".parse().expect("addr");
        let d = tempfile::tempdir().expect("tmp");
        crate::pki::init_ca(d.path()).expect("ca");
        let paths = crate::pki::issue(d.path(), Role::Controller, "c1", &[]).expect("issue");
        let tls = crate::tls::client_config(&paths).expect("tls");
        for req in [
            AdminRequest::CreateCopy {
                volume: VolumeId(1),
                size: 0,
                role: MemberRole::Primary,
                epoch: Epoch(1),
            },
            AdminRequest::Resize {
                volume: VolumeId(1),
                size: 1000,
            },
        ] {
            let r = rt.block_on(admin_call(addr, tls.clone(), req));
            assert!(matches!(r, Err(AdminError::Invalid(_))), "{r:?}");
        }
    }
}
