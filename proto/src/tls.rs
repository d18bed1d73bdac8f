//! Mutual TLS 1.3 against the cluster CA. There is no plaintext mode.
//!
//! Every certificate the cluster CA issues names its holder in a URI subject-alternative-name
//! `keel://<role>/<id>`; [`peer_identity`] reads it after the handshake, so authorisation
//! decisions are taken on the verified certificate, never on anything the peer says.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::types::Role;

/// Why TLS could not be set up or a peer identified.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate: {0}")]
    BadCertificate(String),
}

/// The files a daemon needs for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// The conventional layout of a PKI directory: `ca.pem`, `<name>.pem`, `<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// A peer's verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub id: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.id)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Loads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
        })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(paths: &TlsPaths) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(&paths.ca)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// Server side: TLS 1.3 only, client certificates signed by the cluster CA required.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(paths)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    Ok(Arc::new(cfg))
}

/// Client side: TLS 1.3 only, the server verified against the cluster CA, our certificate sent.
pub fn client_config(paths: &TlsPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let root_store = Arc::try_unwrap(roots(paths)?).unwrap_or_else(|a| (*a).clone());
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store)
        .with_client_auth_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    Ok(Arc::new(cfg))
}

/// Reads `keel://<role>/<id>` from a certificate's subject alternative names.
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, TlsError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?
        .ok_or_else(|| TlsError::BadCertificate("no subject alternative name".into()))?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(rest) = uri.strip_prefix("keel://") {
                let (role, id) = rest.split_once('/').ok_or_else(|| {
                    TlsError::BadCertificate(format!("malformed keel URI {uri:?}"))
                })?;
                let role = role.parse::<Role>().map_err(TlsError::BadCertificate)?;
                if id.is_empty() {
                    return Err(TlsError::BadCertificate(format!("empty id in {uri:?}")));
                }
                return Ok(Identity {
                    role,
                    id: id.to_string(),
                });
            }
        }
    }
    Err(TlsError::BadCertificate(
        "no keel://<role>/<id> name: not issued by keelctl pki".into(),
    ))
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity, TlsError> {
    let certs = conn
        .peer_certificates()
        .ok_or(TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    identity_from_cert(leaf.as_ref())
}
