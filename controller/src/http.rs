//! The HTTPS JSON API: routes, authentication, and the TLS accept loop.
//!
//! Authentication: a client certificate from the cluster CA (`keel://<role>/<id>`: `admin`
//! may do everything, `storage` and `node` only what concerns themselves), or
//! `Authorization: Bearer <token>` with a token from the controller's token file (an
//! operator). Unauthenticated calls get 401, authenticated calls outside their role 403.
//! A certificate from another CA fails the TLS handshake.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keel_api::HealthInfo;
use keel_proto::tls::{identity_from_cert, Identity};
use keel_proto::Role;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::service::{Caller, Controller};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;
/// Largest heartbeat: one entry per copy or attachment, so it grows with the daemon's load
/// (about 100 bytes a copy: 8 MiB is some 80,000 copies).
pub const MAX_HEARTBEAT: usize = 8 << 20;
/// Longest long poll.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Largest CRL accepted by `PUT /v1/pki/crl`.
pub const MAX_CRL: usize = keel_proto::pki::MAX_CRL_BYTES;

/// Shared state of the handlers.
pub struct AppState {
    pub controller: Arc<Controller>,
    /// Bearer tokens that authenticate operators.
    pub tokens: HashSet<String>,
    /// The certificate revocation list in force.
    pub revocations: Arc<crate::pki::Revocations>,
}

/// The client certificate of the connection a request came on: its identity (or why it has
/// none) and its serial, checked against the CRL on every request so that a connection made
/// before a revocation is refused from then on too.
#[derive(Clone)]
enum ConnPeer {
    Anonymous,
    Cert {
        identity: Result<Identity, String>,
        serial: Vec<u8>,
    },
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Caller, ApiError> {
        if let Some(h) = parts.headers.get(http::header::AUTHORIZATION) {
            let token = h
                .to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    ApiError::unauthorized("Authorization header must be `Bearer <token>`")
                })?;
            if state
                .tokens
                .iter()
                .any(|t| ct_eq(t.as_bytes(), token.as_bytes()))
            {
                return Ok(Caller::Admin("token".into()));
            }
            return Err(ApiError::unauthorized("bearer token not recognised"));
        }
        let peer = match parts.extensions.get::<ConnPeer>() {
            None | Some(ConnPeer::Anonymous) => None,
            Some(ConnPeer::Cert { identity, serial }) => {
                if state.revocations.is_revoked(serial) {
                    return Err(ApiError::unauthorized(format!(
                        "certificate serial {} has been revoked",
                        keel_proto::pki::serial_hex(serial)
                    )));
                }
                match identity {
                    Ok(id) => Some(id.clone()),
                    Err(why) => {
                        return Err(ApiError::forbidden(format!(
                            "the client certificate names no valid keel://<role>/<id>: {why}"
                        )))
                    }
                }
            }
        };
        match peer {
            Some(Identity { role: Role::Admin, id }) => Ok(Caller::Admin(id)),
            Some(Identity { role: Role::Storage, id }) => Ok(Caller::Storage(id)),
            Some(Identity { role: Role::Node, id }) => Ok(Caller::Node(id)),
            Some(other) => Err(ApiError::forbidden(format!(
                "certificate {other} has no access to the API"
            ))),
            None => Err(ApiError::unauthorized(
                "no credentials: present a client certificate made by `keelctl pki issue` or a bearer token",
            )),
        }
    }
}

fn admin(c: &Caller) -> Result<(), ApiError> {
    match c {
        Caller::Admin(_) => Ok(()),
        Caller::Storage(id) => Err(ApiError::forbidden(format!(
            "storage server {id} may only register and heartbeat; this call needs an admin certificate or token"
        ))),
        Caller::Node(id) => Err(ApiError::forbidden(format!(
            "node {id} may only register, heartbeat and watch; this call needs an admin certificate or token"
        ))),
    }
}

fn json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

type Answer<T> = Result<Json<T>, ApiError>;

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/health", get(health))
        .route("/v1/servers", get(list_servers).post(register_server))
        .route(
            "/v1/servers/{id}/heartbeat",
            post(server_heartbeat).layer(DefaultBodyLimit::max(MAX_HEARTBEAT)),
        )
        .route("/v1/nodes", get(list_nodes).post(register_node))
        .route(
            "/v1/nodes/{id}/heartbeat",
            post(node_heartbeat).layer(DefaultBodyLimit::max(MAX_HEARTBEAT)),
        )
        .route("/v1/nodes/{id}/attachments", get(node_attachments))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{id}",
            get(describe_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{id}/resize", post(resize_volume))
        .route("/v1/volumes/{id}/attach", post(attach_volume))
        .route("/v1/volumes/{id}/detach", post(detach_volume))
        .route("/v1/volumes/{id}/mirror-failed", post(mirror_failed))
        .route("/v1/volumes/{id}/mirror-synced", post(mirror_synced))
        .route(
            "/v1/volumes/{id}/primary-unreachable",
            post(primary_unreachable),
        )
        .route("/v1/pki/crl", get(get_crl).put(put_crl))
        .fallback(|| async { ApiError::not_found("no such API path; see /openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn openapi() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
}

async fn health(State(s): State<Arc<AppState>>) -> Json<HealthInfo> {
    Json(HealthInfo {
        status: "ok".into(),
        revision: s.controller.store().revision(),
    })
}

async fn list_servers(
    State(s): State<Arc<AppState>>,
    c: Caller,
) -> Answer<Vec<keel_api::ServerInfo>> {
    admin(&c)?;
    Ok(Json(s.controller.list_servers()?))
}

async fn register_server(
    State(s): State<Arc<AppState>>,
    c: Caller,
    body: Bytes,
) -> Answer<keel_api::ServerInfo> {
    Ok(Json(s.controller.register_server(&c, json(&body)?)?))
}

async fn server_heartbeat(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::HeartbeatAnswer> {
    s.controller.server_heartbeat(&c, &id, json(&body)?)?;
    Ok(Json(keel_api::HeartbeatAnswer {
        crl_number: s.revocations.number(),
    }))
}

async fn list_nodes(State(s): State<Arc<AppState>>, c: Caller) -> Answer<Vec<keel_api::NodeInfo>> {
    admin(&c)?;
    Ok(Json(s.controller.list_nodes()?))
}

async fn register_node(
    State(s): State<Arc<AppState>>,
    c: Caller,
    body: Bytes,
) -> Answer<keel_api::NodeInfo> {
    Ok(Json(s.controller.register_node(&c, json(&body)?)?))
}

async fn node_heartbeat(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::HeartbeatAnswer> {
    s.controller.node_heartbeat(&c, &id, json(&body)?)?;
    Ok(Json(keel_api::HeartbeatAnswer {
        crl_number: s.revocations.number(),
    }))
}

/// The CRL in force: every authenticated caller (storage servers and node managers fetch it
/// when a heartbeat answer names a newer number than theirs).
async fn get_crl(State(s): State<Arc<AppState>>, _c: Caller) -> Answer<keel_api::CrlInfo> {
    Ok(Json(s.revocations.get()?))
}

/// A new CRL (PEM or DER, at most [`MAX_CRL`] bytes), admin only: checked (the cluster CA
/// signed it, its number is above the one in force), stored, applied at once.
async fn put_crl(
    State(s): State<Arc<AppState>>,
    c: Caller,
    body: axum::body::Body,
) -> Answer<keel_api::CrlInfo> {
    admin(&c)?;
    let body = axum::body::to_bytes(body, MAX_CRL).await.map_err(|_| {
        ApiError::bad_request(format!(
            "the CRL is larger than {MAX_CRL} bytes, or its upload failed"
        ))
    })?;
    Ok(Json(s.revocations.put(&body)?))
}

/// `after` and `wait_ms` from the query string.
fn watch_params(q: Option<&str>) -> Result<(u64, Duration), ApiError> {
    let mut after = 0;
    let mut wait = Duration::ZERO;
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n: u64 = v.parse().map_err(|_| {
            ApiError::bad_request(format!("query parameter {k}={v:?} is not a number"))
        })?;
        match k {
            "after" => after = n,
            "wait_ms" => wait = Duration::from_millis(n).min(MAX_WAIT),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?}; use after and wait_ms"
                )))
            }
        }
    }
    Ok((after, wait))
}

async fn node_attachments(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer<keel_api::NodeAttachments> {
    let (after, wait) = watch_params(q.as_deref())?;
    Ok(Json(
        s.controller.node_attachments(&c, &id, after, wait).await?,
    ))
}

async fn list_volumes(
    State(s): State<Arc<AppState>>,
    c: Caller,
) -> Answer<Vec<keel_api::VolumeInfo>> {
    admin(&c)?;
    Ok(Json(s.controller.list_volumes()?))
}

async fn create_volume(
    State(s): State<Arc<AppState>>,
    c: Caller,
    body: Bytes,
) -> Answer<keel_api::VolumeInfo> {
    admin(&c)?;
    Ok(Json(s.controller.create_volume(json(&body)?).await?))
}

async fn describe_volume(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
) -> Answer<keel_api::VolumeInfo> {
    admin(&c)?;
    Ok(Json(s.controller.describe(&id)?))
}

async fn delete_volume(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
) -> Answer<keel_api::DeleteResult> {
    admin(&c)?;
    Ok(Json(s.controller.delete_volume(&id).await?))
}

async fn resize_volume(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::VolumeInfo> {
    admin(&c)?;
    Ok(Json(s.controller.resize_volume(&id, json(&body)?).await?))
}

/// `wait_ms` of an attach: absent, answer once recorded; else wait up to it (at most
/// [`MAX_WAIT`]) for the node to serve the socket.
fn attach_params(q: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let mut wait = None;
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "wait_ms" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}; use wait_ms"
            )));
        }
        let n: u64 = v.parse().map_err(|_| {
            ApiError::bad_request(format!("query parameter {k}={v:?} is not a number"))
        })?;
        wait = Some(Duration::from_millis(n).min(MAX_WAIT));
    }
    Ok(wait)
}

async fn attach_volume(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Answer<keel_api::VolumeInfo> {
    admin(&c)?;
    let wait = attach_params(q.as_deref())?;
    Ok(Json(
        s.controller.attach_waiting(&id, json(&body)?, wait).await?,
    ))
}

async fn detach_volume(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::VolumeInfo> {
    admin(&c)?;
    Ok(Json(s.controller.detach(&id, json(&body)?).await?))
}

async fn mirror_failed(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::MembershipInfo> {
    Ok(Json(
        s.controller.mirror_failed(&c, &id, json(&body)?).await?,
    ))
}

async fn mirror_synced(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::MembershipInfo> {
    Ok(Json(
        s.controller.mirror_synced(&c, &id, json(&body)?).await?,
    ))
}

/// A node's report that keel-vhost got no answer from a volume's primary (R6): nodes holding
/// an attachment of the volume and admins only (checked by the controller).
async fn primary_unreachable(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<keel_api::PrimaryReport> {
    Ok(Json(
        s.controller
            .primary_unreachable(&c, &id, json(&body)?)
            .await?,
    ))
}

/// TLS for the API: the controller's certificate (re-read when its files change); client
/// certificates from the cluster CA are verified (and checked against the CRL) when
/// presented and optional (bearer tokens are the alternative).
pub fn server_tls(
    source: &Arc<keel_proto::tls::TlsSource>,
) -> Result<Arc<rustls::ServerConfig>, keel_proto::tls::TlsError> {
    source.server_config_with(true, vec![b"http/1.1".to_vec()])
}

/// What the API server holds against clients that hold connections without using them
/// (docs/security.md, "Denial of service").
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Connections at once, overall and per peer address; excess ones are closed before TLS.
    pub conns: keel_proto::limits::ConnLimits,
    /// Time for the TLS handshake.
    pub handshake: Duration,
    /// Time for a request's headers to arrive (also how long an idle keep-alive connection
    /// stays open).
    pub headers: Duration,
    /// Time for a request's body to arrive once its headers did.
    pub body: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            conns: keel_proto::limits::ConnLimits::default(),
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(10),
            body: Duration::from_secs(30),
        }
    }
}

/// A request body that fails once its deadline passes.
struct TimedBody {
    inner: hyper::body::Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl axum::body::HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(r) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(r.map(|r| r.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err("the request body did not arrive in time".into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts HTTPS connections forever, under the default [`ApiLimits`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) -> std::io::Result<()> {
    serve_limited(listener, tls, app, ApiLimits::default()).await
}

/// Accepts HTTPS connections forever under `limits`. Never returns: accept errors (out of
/// file descriptors included) are logged and waited out.
pub async fn serve_limited(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: ApiLimits,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let mut listener = keel_proto::limits::Acceptor::new(listener, limits.conns);
    loop {
        let (tcp, addr, guard) = listener.next().await;
        let acceptor = acceptor.clone();
        let app = app.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                // A client that exits (or a daemon that stops) mid-handshake: expected.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%addr, "the client closed the connection during the TLS handshake");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%addr, error = %e, "API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%addr, "API TLS handshake timed out");
                    return;
                }
            };
            let conn = stream.get_ref().1;
            let peer = match conn.peer_certificates().and_then(|c| c.first()) {
                None => ConnPeer::Anonymous,
                Some(c) => ConnPeer::Cert {
                    identity: identity_from_cert(c.as_ref()).map_err(|e| e.to_string()),
                    serial: keel_proto::tls::peer_serial(conn).unwrap_or_default(),
                },
            };
            let body_timeout = limits.body;
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(|inner| TimedBody {
                        inner,
                        deadline: Box::pin(tokio::time::sleep(body_timeout)),
                    });
                    req.extensions_mut().insert(peer.clone());
                    app.clone().oneshot(req)
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.headers)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%addr, error = %e, "API connection ended");
            }
        });
    }
}
