//! Keel's control-plane API: the JSON records the controller serves under `/v1`, and an
//! HTTPS client for them used by `keelctl`, storage servers and node managers.

pub mod client;
pub mod types;

use std::path::Path;
use std::sync::Arc;

pub use client::{ApiClient, ClientError};
use keel_proto::tls::{load_certs, load_key, TlsError, TlsPaths};
pub use types::*;

/// TLS settings for talking to the controller: its certificate is checked against the
/// cluster CA in `ca`; `identity` (a certificate and key made by `keelctl pki`) is presented
/// when given, otherwise the caller must authenticate with a bearer token.
pub fn client_tls(
    ca: &Path,
    identity: Option<&TlsPaths>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots);
    let cfg = match identity {
        Some(p) => builder.with_client_auth_cert(load_certs(&p.cert)?, load_key(&p.key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}
