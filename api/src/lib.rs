//! Keel's control-plane API: the JSON records the controller serves under `/v1`, and an
//! HTTPS client for them used by `keelctl`, storage servers and node managers.

pub mod client;
pub mod types;

use std::path::Path;
use std::sync::Arc;

pub use client::{ApiClient, ClientError};
use keel_proto::tls::{load_certs, TlsError, TlsPaths, TlsSource};
pub use types::*;

/// Daemons start with (or before) their controller: a registration that fails for this long
/// from a daemon's start is expected and logged at INFO, later failures at WARN.
pub const REGISTER_QUIET: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS settings for talking to the controller: its certificate is checked against the
/// cluster CA in `ca`; `identity` (a certificate and key made by `keelctl pki`) is presented
/// when given (re-read when its files change: [`keel_proto::tls::TlsSource`]), otherwise the
/// caller must authenticate with a bearer token.
pub fn client_tls(
    ca: &Path,
    identity: Option<&TlsPaths>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if let Some(p) = identity {
        let paths = TlsPaths {
            ca: ca.to_path_buf(),
            cert: p.cert.clone(),
            key: p.key.clone(),
        };
        return TlsSource::new(&paths)?.client_config();
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// TLS settings for talking to the controller as the daemon `source` describes: its current
/// certificate, its CRL (a revoked controller certificate is refused).
pub fn client_tls_from(source: &Arc<TlsSource>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    source.client_config()
}

/// Brings a daemon's CRL up to the controller's: when a heartbeat answer names a CRL number
/// above the one `source` applied, fetches `GET /v1/pki/crl`, applies it (checked against the
/// cluster CA: a controller cannot make a daemon accept a CRL the CA did not sign) and, with
/// `keep`, saves it there (atomically) so that a restart applies it before the first
/// connection. Returns the number applied, if it changed.
pub async fn sync_crl(
    api: &ApiClient,
    source: &TlsSource,
    controller_number: Option<u64>,
    keep: Option<&Path>,
) -> Result<Option<u64>, String> {
    let Some(n) = controller_number else {
        return Ok(None);
    };
    if !keel_proto::pki::crl_is_newer(source.crl_number(), n) {
        return Ok(None);
    }
    let info: CrlInfo = api
        .get("/v1/pki/crl")
        .await
        .map_err(|e| format!("fetching CRL number {n}: {e}"))?;
    match source.set_crl(info.pem.as_bytes()) {
        Ok(_) => {}
        // A newer one arrived meanwhile.
        Err(TlsError::CrlNotNewer { .. }) => return Ok(None),
        Err(e) => return Err(format!("applying CRL number {}: {e}", info.number)),
    }
    tracing::warn!(
        number = info.number,
        revoked = info.revoked.len(),
        "certificate revocation list applied: revoked certificates are refused from now on"
    );
    if let Some(p) = keep {
        if let Err(e) = keel_proto::pki::write_atomic(p, info.pem.as_bytes(), false) {
            tracing::warn!(error = %e, "saving the certificate revocation list");
        }
    }
    Ok(Some(info.number))
}

/// Applies the CRL a daemon saved with [`sync_crl`], if there is one.
pub fn load_saved_crl(source: &TlsSource, path: &Path) {
    match std::fs::read(path) {
        Ok(b) => match source.set_crl(&b) {
            Ok(change) => {
                tracing::info!(?change, file = %path.display(), "saved certificate revocation list applied")
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "the saved certificate revocation list does not apply")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(error = %e, file = %path.display(), "reading the saved certificate revocation list")
        }
    }
}
