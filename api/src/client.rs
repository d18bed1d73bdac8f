//! An HTTPS client for the controller's API: one TLS connection per call (calls are rare and
//! small; a long poll holds its own connection), the controller's certificate checked against
//! the cluster CA, and authentication by client certificate or bearer token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::types::ErrorBody;

/// Largest answer body accepted from the controller (a volume list of many thousands of
/// volumes fits).
pub const MAX_RESPONSE: usize = 64 << 20;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("controller URL {0:?} is not https://IP:PORT")]
    BadUrl(String),
    // The I/O error is in the message and not a `source`: a report of the error chain
    // (`{:#}`) would otherwise say it twice.
    #[error(
        "cannot reach the controller at {addr}: {error} (is it running? `keelctl up` starts one)"
    )]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS with the controller at {addr} failed: {error}")]
    Tls {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("HTTP exchange with the controller failed: {0}")]
    Http(String),
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{}", .body.message)]
    Api { status: u16, body: ErrorBody },
    #[error("the controller's answer is not the expected JSON: {0}")]
    Decode(String),
}

impl ClientError {
    /// The API's error code (`not_found`, `conflict`, ...) when the controller refused the call.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }

    /// The HTTP status when the controller answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A controller endpoint plus credentials.
#[derive(Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
    timeout: Duration,
}

/// Parses `https://IP:PORT` (a trailing `/` is allowed).
pub fn parse_url(url: &str) -> Result<SocketAddr, ClientError> {
    url.strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'))
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| ClientError::BadUrl(url.to_string()))
}

impl ApiClient {
    /// `tls` verifies the controller against the cluster CA and may carry a client
    /// certificate; `token` is sent as `Authorization: Bearer` when set.
    pub fn new(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        token: Option<String>,
    ) -> Result<ApiClient, ClientError> {
        Ok(ApiClient {
            addr: parse_url(url)?,
            tls,
            token,
            timeout: Duration::from_secs(30),
        })
    }

    /// Bounds each call (connect, TLS, request and answer); long polls add their wait.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>, Duration::ZERO)
            .await
    }

    /// A GET that the controller may hold for up to `wait` (long poll).
    pub async fn get_wait<T: DeserializeOwned>(
        &self,
        path: &str,
        wait: Duration,
    ) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>, wait).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body), Duration::ZERO)
            .await
    }

    /// A POST that the controller may hold for up to `wait` (an attach with `?wait_ms=`).
    pub async fn post_wait<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        wait: Duration,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body), wait).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>, Duration::ZERO)
            .await
    }

    /// Raw call for tests: returns the status and body bytes without interpreting them.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let limit = self.timeout;
        tokio::time::timeout(limit, self.exchange(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout(limit))?
            .map(|(s, b)| (s.as_u16(), b))
    }

    /// `PUT path` with a body that is not JSON (`content_type`, e.g. a PEM CRL); the answer
    /// is JSON.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> Result<T, ClientError> {
        let limit = self.timeout;
        let (status, bytes) = tokio::time::timeout(
            limit,
            self.exchange_typed(Method::PUT, path, Some((body, content_type))),
        )
        .await
        .map_err(|_| ClientError::Timeout(limit))??;
        Self::answer(status, bytes)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        wait: Duration,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let limit = self.timeout + wait;
        let (status, bytes) = tokio::time::timeout(limit, self.exchange(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout(limit))??;
        Self::answer(status, bytes)
    }

    fn answer<T: DeserializeOwned>(status: StatusCode, bytes: Vec<u8>) -> Result<T, ClientError> {
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
        } else {
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                code: "http".into(),
                message: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            });
            Err(ClientError::Api {
                status: status.as_u16(),
                body,
            })
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        self.exchange_typed(method, path, body.map(|b| (b, "application/json")))
            .await
    }

    async fn exchange_typed(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|error| ClientError::Connect { addr, error })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|error| ClientError::Tls { addr, error })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, "application/json");
        let body = match body {
            Some((b, ct)) => {
                req = req.header(http::header::CONTENT_TYPE, ct);
                Some(b)
            }
            None => None,
        };
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status();
        // A controller's answer is small JSON; a bounded read keeps a bad peer from making
        // the caller allocate without limit.
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    /// The controller-down message names the I/O error once: it has no `source` that a
    /// report of the chain (`{:#}`, keelctl's `error: ...`) would print again.
    #[test]
    fn an_unreachable_controller_is_reported_once() {
        let e = ClientError::Connect {
            addr: "127.0.0.1:7000".parse().expect("address"),
            error: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let text = e.to_string();
        assert!(
            text.contains("connection refused") && text.contains("keelctl up"),
            "{text}"
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
