//! Mutual TLS 1.3 against the cluster CA. There is no plaintext mode.
//!
//! Every certificate the cluster CA issues names its holder in a URI subject-alternative-name
//! `keel://<role>/<id>`; [`peer_identity`] reads it after the handshake, so authorisation
//! decisions are taken on the verified certificate, never on anything the peer says.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};

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
    #[error("certificate revocation list: {0}")]
    Crl(String),
    #[error("CRL number {got} is not newer than the one applied ({have}): a CRL is replaced only by a higher number")]
    CrlNotNewer { have: u64, got: u64 },
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

/// Server side: TLS 1.3 only, client certificates signed by the cluster CA required. The
/// certificate and key are re-read when their files change ([`TlsSource`]).
pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    TlsSource::new(paths)?.server_config()
}

/// Client side: TLS 1.3 only, the server verified against the cluster CA, our certificate sent
/// (re-read when its files change: [`TlsSource`]).
pub fn client_config(paths: &TlsPaths) -> Result<Arc<ClientConfig>, TlsError> {
    TlsSource::new(paths)?.client_config()
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

// ----- reloading certificates and revocation lists -----

/// How often, at most, a [`TlsSource`] looks at its certificate files again.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// A daemon warns when its certificate expires within this many days.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
/// How often, at most, the expiry warning is repeated.
pub const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(24 * 3600);

/// What identifies a version of a file: replacing it (`keelctl pki renew` renames a new file
/// in) changes the inode, and rewriting it in place changes the modification time or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

/// The stamp of `path`, `None` if it cannot be read.
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Stamps of a certificate file and its key file.
pub type PairStamp = (Option<FileStamp>, Option<FileStamp>);

/// The reload rule, apart from the files: looks at most once per `every`; a changed pair is
/// loaded; a pair that fails to load keeps the old one and is warned about once (when it is
/// still the same after the next look: `keelctl pki renew` replaces the key and then the
/// certificate, and a look in between sees a mismatched pair for an instant).
#[derive(Debug, Clone)]
pub struct ReloadRule {
    every: Duration,
    last_look: Instant,
    loaded: PairStamp,
    /// The last pair that failed to load, and whether it was warned about.
    failed: Option<(PairStamp, bool)>,
}

/// What [`ReloadRule::look`] says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Too soon since the last look, or nothing changed.
    Keep,
    /// The files changed: load them.
    Load,
}

impl ReloadRule {
    pub fn new(loaded: PairStamp, every: Duration, now: Instant) -> ReloadRule {
        ReloadRule {
            every,
            last_look: now,
            loaded,
            failed: None,
        }
    }

    /// Whether a look at the files is due at `now` (then it counts as done).
    pub fn due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_look) < self.every {
            return false;
        }
        self.last_look = now;
        true
    }

    /// Given the files' stamps now: keep, or load them.
    pub fn look(&self, current: PairStamp) -> Look {
        if current == self.loaded {
            Look::Keep
        } else {
            Look::Load
        }
    }

    /// The pair `stamp` was loaded.
    pub fn loaded(&mut self, stamp: PairStamp) {
        self.loaded = stamp;
        self.failed = None;
    }

    /// The pair `stamp` failed to load; returns whether to warn now (once per pair, from
    /// its second failed look on).
    pub fn failed(&mut self, stamp: PairStamp) -> bool {
        match &mut self.failed {
            Some((s, warned)) if *s == stamp => {
                let warn = !*warned;
                *warned = true;
                warn
            }
            _ => {
                self.failed = Some((stamp, false));
                false
            }
        }
    }
}

/// Facts of the certificate a [`TlsSource`] presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial, hexadecimal (as `keelctl pki list` shows it).
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub identity: Option<Identity>,
}

struct CertState {
    key: Arc<CertifiedKey>,
    info: CertInfo,
    rule: ReloadRule,
    last_expiry_warning: Option<Instant>,
}

struct CrlState {
    crl: Option<crate::pki::Crl>,
    revoked: HashSet<Vec<u8>>,
    required: Arc<dyn ClientCertVerifier>,
    optional: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

/// What [`TlsSource::set_crl`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlChange {
    /// The CRL was applied: new handshakes are checked against it.
    Applied { number: u64, revoked: usize },
}

/// A daemon's TLS identity and trust, shared by every configuration it makes: the certificate
/// and key are re-read when their files change (looked at, at most once per [`RELOAD_CHECK`],
/// when a handshake needs them: never per request), and the cluster's certificate revocation
/// list, when one is set, is checked on every new handshake, as a server and as a client.
/// Connections already established keep the certificate they were made with.
pub struct TlsSource {
    paths: TlsPaths,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    ca_der: CertificateDer<'static>,
    hints: Vec<DistinguishedName>,
    cert: Mutex<CertState>,
    crl: RwLock<CrlState>,
}

impl fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSource")
            .field("cert", &self.paths.cert)
            .finish_non_exhaustive()
    }
}

fn load_pair(
    paths: &TlsPaths,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let certs = load_certs(&paths.cert)?;
    let key = load_key(&paths.key)?;
    let leaf = certs.first().ok_or_else(|| TlsError::Empty {
        path: paths.cert.clone(),
        what: "certificate",
    })?;
    let s = crate::pki::summarize(leaf.as_ref()).map_err(TlsError::BadCertificate)?;
    let info = CertInfo {
        serial: s.serial,
        not_before: s.not_before,
        not_after: s.not_after,
        identity: s.identity,
    };
    let ck = CertifiedKey::from_der(certs, key, provider)?;
    Ok((Arc::new(ck), info))
}

fn verifiers(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    crl: Option<&crate::pki::Crl>,
) -> Result<CrlState, TlsError> {
    let crls: Vec<CertificateRevocationListDer<'static>> = crl
        .map(|c| CertificateRevocationListDer::from(c.der.clone()))
        .into_iter()
        .collect();
    let v = |e: rustls::server::VerifierBuilderError| TlsError::Verifier(e.to_string());
    let required = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.clone())
        .build()
        .map_err(v)?;
    let optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.clone())
        .allow_unauthenticated()
        .build()
        .map_err(v)?;
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(v)?;
    Ok(CrlState {
        crl: crl.cloned(),
        revoked: crl
            .map(|c| c.revoked.iter().cloned().collect())
            .unwrap_or_default(),
        required,
        optional,
        server,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsSource {
    /// Loads the CA, certificate and key of `paths`; looks for changed files at most once per
    /// [`RELOAD_CHECK`].
    pub fn new(paths: &TlsPaths) -> Result<Arc<TlsSource>, TlsError> {
        TlsSource::with_check_interval(paths, RELOAD_CHECK)
    }

    /// [`TlsSource::new`] with another interval between looks at the files (tests).
    pub fn with_check_interval(
        paths: &TlsPaths,
        every: Duration,
    ) -> Result<Arc<TlsSource>, TlsError> {
        let provider = provider();
        let ca = load_certs(&paths.ca)?;
        let roots = roots(paths)?;
        let hints = roots.subjects();
        let stamp = (file_stamp(&paths.cert), file_stamp(&paths.key));
        let (key, info) = load_pair(paths, &provider)?;
        let crl = verifiers(&roots, &provider, None)?;
        let src = TlsSource {
            paths: paths.clone(),
            ca_der: ca[0].clone(),
            provider,
            roots,
            hints,
            cert: Mutex::new(CertState {
                key,
                info,
                rule: ReloadRule::new(stamp, every, Instant::now()),
                last_expiry_warning: None,
            }),
            crl: RwLock::new(crl),
        };
        src.warn_if_expiring(&mut lock(&src.cert));
        Ok(Arc::new(src))
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// The cluster CA's certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    fn warn_if_expiring(&self, st: &mut CertState) {
        let left = st.info.not_after - crate::pki::now_unix();
        if left >= EXPIRY_WARNING_DAYS * 86_400 {
            return;
        }
        if st
            .last_expiry_warning
            .is_some_and(|t| t.elapsed() < EXPIRY_WARNING_EVERY)
        {
            return;
        }
        st.last_expiry_warning = Some(Instant::now());
        if left <= 0 {
            tracing::error!(
                cert = %self.paths.cert.display(),
                serial = %st.info.serial,
                "this daemon's certificate has EXPIRED: peers refuse it; renew it with `keelctl pki renew --name <role>-<id>` (picked up without a restart)"
            );
        } else {
            tracing::warn!(
                cert = %self.paths.cert.display(),
                serial = %st.info.serial,
                days_left = left / 86_400,
                "this daemon's certificate expires within {EXPIRY_WARNING_DAYS} days: renew it with `keelctl pki renew --name <role>-<id>` (picked up without a restart)"
            );
        }
    }

    /// Looks at the files if a look is due and reloads them if they changed. A pair that does
    /// not load (unreadable, key not matching, another identity) keeps the old one.
    fn refresh(&self, st: &mut CertState) {
        if !st.rule.due(Instant::now()) {
            return;
        }
        self.warn_if_expiring(st);
        let stamp = (file_stamp(&self.paths.cert), file_stamp(&self.paths.key));
        if st.rule.look(stamp) == Look::Keep {
            return;
        }
        let loaded = load_pair(&self.paths, &self.provider).and_then(|(key, info)| {
            if info.identity != st.info.identity {
                return Err(TlsError::BadCertificate(format!(
                    "the new certificate names {}, not {} as before",
                    info.identity
                        .as_ref()
                        .map_or("no keel identity".to_string(), |i| i.to_string()),
                    st.info
                        .identity
                        .as_ref()
                        .map_or("no keel identity".to_string(), |i| i.to_string()),
                )));
            }
            Ok((key, info))
        });
        match loaded {
            Ok((key, info)) => {
                tracing::info!(
                    cert = %self.paths.cert.display(),
                    old_serial = %st.info.serial,
                    serial = %info.serial,
                    not_after = info.not_after,
                    "certificate reloaded: new connections use it"
                );
                st.key = key;
                st.info = info;
                st.rule.loaded(stamp);
                st.last_expiry_warning = None;
                self.warn_if_expiring(st);
            }
            Err(e) => {
                if st.rule.failed(stamp) {
                    tracing::warn!(
                        cert = %self.paths.cert.display(),
                        error = %e,
                        serial = %st.info.serial,
                        "the certificate files changed but do not load; keeping the current certificate"
                    );
                }
            }
        }
    }

    /// The certificate and key to present now (reloaded if due and changed).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        let mut st = lock(&self.cert);
        self.refresh(&mut st);
        st.key.clone()
    }

    /// Facts of the certificate presented now (reloaded if due and changed).
    pub fn cert_info(&self) -> CertInfo {
        let mut st = lock(&self.cert);
        self.refresh(&mut st);
        st.info.clone()
    }

    fn crl_state(&self) -> std::sync::RwLockReadGuard<'_, CrlState> {
        self.crl.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The CRL applied, if any.
    pub fn crl(&self) -> Option<crate::pki::Crl> {
        self.crl_state().crl.clone()
    }

    /// The number of the CRL applied, if any.
    pub fn crl_number(&self) -> Option<u64> {
        self.crl_state().crl.as_ref().map(|c| c.number)
    }

    /// Whether the CRL applied revokes `serial` (big-endian, leading zeros allowed).
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        let start = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
        self.crl_state().revoked.contains(&serial[start..])
    }

    /// Checks a CRL (PEM or DER): signed by the cluster CA, numbered above the one applied;
    /// then applies it to every configuration made from this source, for new handshakes.
    pub fn set_crl(&self, data: &[u8]) -> Result<CrlChange, TlsError> {
        let crl = crate::pki::parse_crl(data, self.ca_der.as_ref())
            .map_err(|e| TlsError::Crl(e.to_string()))?;
        let mut cur = self.crl.write().unwrap_or_else(|p| p.into_inner());
        let have = cur.crl.as_ref().map(|c| c.number);
        if !crate::pki::crl_is_newer(have, crl.number) {
            return Err(TlsError::CrlNotNewer {
                have: have.unwrap_or(0),
                got: crl.number,
            });
        }
        let next = verifiers(&self.roots, &self.provider, Some(&crl))?;
        let change = CrlChange::Applied {
            number: crl.number,
            revoked: crl.revoked.len(),
        };
        revocations().send_replace(Arc::new(next.revoked.clone()));
        *cur = next;
        Ok(change)
    }

    /// A server configuration: TLS 1.3 only, client certificates from the cluster CA required
    /// (and checked against the CRL), this source's certificate. No session resumption: every
    /// connection is verified in full.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(false, Vec::new())
    }

    /// [`TlsSource::server_config`]; `optional_client_cert`: a client may also come without a
    /// certificate (the controller's API, where a bearer token is the alternative); `alpn`:
    /// the protocols offered.
    pub fn server_config_with(
        self: &Arc<Self>,
        optional_client_cert: bool,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(ClientVerifier {
                src: self.clone(),
                optional: optional_client_cert,
            }))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        cfg.alpn_protocols = alpn;
        Ok(Arc::new(cfg))
    }

    /// A client configuration: TLS 1.3 only, the server verified against the cluster CA (and
    /// the CRL), this source's certificate presented. No session resumption.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier { src: self.clone() }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }
}

/// Hands out the source's current certificate, as a server and as a client.
#[derive(Debug)]
struct Resolver(Arc<TlsSource>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The handshake signature checks both verifiers share: the source's crypto provider's.
impl TlsSource {
    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        tls13: bool,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        if tls13 {
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        } else {
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }
    }

    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies client certificates with the source's current (CRL-aware) verifier.
#[derive(Debug)]
struct ClientVerifier {
    src: Arc<TlsSource>,
    optional: bool,
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.src.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let v = {
            let st = self.src.crl_state();
            if self.optional {
                st.optional.clone()
            } else {
                st.required.clone()
            }
        };
        v.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.src.signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.src.signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.src.schemes()
    }
}

/// Verifies server certificates with the source's current (CRL-aware) verifier.
#[derive(Debug)]
struct ServerVerifier {
    src: Arc<TlsSource>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v = self.src.crl_state().server.clone();
        v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.src.signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.src.signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.src.schemes()
    }
}

/// The serials revoked by the last CRL any [`TlsSource`] of this process applied (a daemon has
/// one source; every CRL of a cluster lists every serial revoked so far).
fn revocations() -> &'static tokio::sync::watch::Sender<Arc<HashSet<Vec<u8>>>> {
    static REVOKED: std::sync::OnceLock<tokio::sync::watch::Sender<Arc<HashSet<Vec<u8>>>>> =
        std::sync::OnceLock::new();
    REVOKED.get_or_init(|| tokio::sync::watch::channel(Arc::new(HashSet::new())).0)
}

/// Resolves once a CRL applied in this process revokes `serial` (big-endian, as
/// [`peer_serial`] gives it): a server ends the established connections of a revoked peer.
pub async fn revoked(serial: Vec<u8>) {
    let mut rx = revocations().subscribe();
    loop {
        if rx.borrow_and_update().contains(&serial) {
            return;
        }
        if rx.changed().await.is_err() {
            // The sender is a static: never dropped.
            std::future::pending::<()>().await;
        }
    }
}

/// The serial of the peer's certificate of an established connection (big-endian).
pub fn peer_serial(conn: &rustls::CommonState) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf.as_ref()).ok()?;
    Some(cert.serial.to_bytes_be())
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::pki;

    fn stamp(n: u64) -> PairStamp {
        let s = FileStamp {
            ino: n,
            size: n,
            mtime_ns: i128::from(n),
        };
        (Some(s), Some(s))
    }

    #[test]
    fn reload_rule_looks_once_per_interval_and_warns_once_per_change() {
        let t0 = Instant::now();
        let mut r = ReloadRule::new(stamp(1), Duration::from_secs(1), t0);
        assert!(!r.due(t0 + Duration::from_millis(500)));
        assert!(r.due(t0 + Duration::from_millis(1000)));
        assert!(!r.due(t0 + Duration::from_millis(1500)));
        assert!(r.due(t0 + Duration::from_millis(2100)));
        assert_eq!(r.look(stamp(1)), Look::Keep);
        assert_eq!(r.look(stamp(2)), Look::Load);
        assert_eq!(r.look((None, None)), Look::Load);
        // A broken pair: silent at the first look (a renewal half done), warned at the second,
        // then silent while it stays the same; a further change is warned about again.
        assert!(!r.failed(stamp(2)));
        assert!(r.failed(stamp(2)));
        assert!(!r.failed(stamp(2)));
        assert!(!r.failed(stamp(3)));
        assert!(r.failed(stamp(3)));
        r.loaded(stamp(4));
        assert_eq!(r.look(stamp(4)), Look::Keep);
        assert!(
            !r.failed(stamp(3)),
            "a new failure after a load starts over"
        );
    }

    #[test]
    fn a_source_picks_up_a_renewed_certificate_and_keeps_it_through_a_broken_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(dir.path()).expect("ca");
        let p = pki::issue(dir.path(), Role::Storage, "s1", &[]).expect("issue");
        let src = TlsSource::with_check_interval(&p, Duration::from_millis(50)).expect("source");
        let first = src.cert_info();
        assert_eq!(
            first.identity.as_ref().map(|i| i.id.as_str()),
            Some("s1"),
            "{first:?}"
        );
        let renewed = pki::renew(dir.path(), "storage-s1", None).expect("renew");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(src.cert_info().serial, renewed.serial);
        let key = src.certified_key();
        // A key that does not match, then garbage: the renewed pair stays.
        let other = pki::issue(dir.path(), Role::Storage, "s2", &[]).expect("issue");
        std::fs::copy(&other.key, &p.key).expect("copy");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(src.cert_info().serial, renewed.serial);
        std::fs::write(&p.cert, b"garbage").expect("write");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(src.cert_info().serial, renewed.serial);
        assert!(Arc::ptr_eq(&key, &src.certified_key()));
        // Another identity's certificate in its place is refused too.
        std::fs::copy(&other.cert, &p.cert).expect("copy");
        std::fs::copy(&other.key, &p.key).expect("copy");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(src.cert_info().serial, renewed.serial);
    }

    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<Option<Vec<u8>>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (a, b) = tokio::io::duplex(1 << 16);
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            let connector = tokio_rustls::TlsConnector::from(client);
            let name = ServerName::try_from("localhost").expect("name");
            let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
            let s = s.map_err(|e| format!("server: {e}"))?;
            let c = c.map_err(|e| format!("client: {e}"))?;
            // TLS 1.3: the client learns of a refused certificate with the first read.
            let mut c = c;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = s;
            let srv = tokio::spawn(async move {
                let _ = s.write_all(b"x").await;
                let _ = s.flush().await;
                s
            });
            let mut b = [0u8; 1];
            c.read_exact(&mut b)
                .await
                .map_err(|e| format!("client read: {e}"))?;
            let s = srv.await.map_err(|e| e.to_string())?;
            Ok(peer_serial(c.get_ref().1).filter(|_| s.get_ref().1.peer_certificates().is_some()))
        })
    }

    #[test]
    fn a_crl_refuses_revoked_peers_for_new_handshakes_and_only_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(dir.path()).expect("ca");
        let sp = pki::issue(dir.path(), Role::Storage, "s1", &[]).expect("issue");
        let np = pki::issue(dir.path(), Role::Node, "n1", &[]).expect("issue");
        let server = TlsSource::new(&sp).expect("server source");
        let client = TlsSource::new(&np).expect("client source");
        let serial = handshake(
            server.server_config().expect("cfg"),
            client.client_config().expect("cfg"),
        )
        .expect("handshake before revocation");
        assert_eq!(
            serial.map(|s| pki::serial_hex(&s)),
            Some(server.cert_info().serial)
        );

        let n = pki::summarize_file(&np.cert).expect("summary");
        let r1 = pki::revoke(dir.path(), &[(n.serial.clone(), "node-n1".into())]).expect("revoke");
        assert_eq!(
            server.set_crl(r1.crl_pem.as_bytes()).expect("apply"),
            CrlChange::Applied {
                number: 1,
                revoked: 1
            }
        );
        assert!(server.is_revoked(&pki::parse_serial(&n.serial).expect("serial")));
        assert_eq!(server.crl_number(), Some(1));
        let e = handshake(
            server.server_config().expect("cfg"),
            client.client_config().expect("cfg"),
        )
        .expect_err("a revoked client is refused");
        assert!(e.contains("revoked") || e.contains("Revoked"), "{e}");
        // The same CRL again, or an older one: refused, the applied one stays.
        assert!(matches!(
            server.set_crl(r1.crl_pem.as_bytes()),
            Err(TlsError::CrlNotNewer { have: 1, got: 1 })
        ));
        assert!(matches!(server.set_crl(b"junk"), Err(TlsError::Crl(_))));
        assert_eq!(server.crl_number(), Some(1));

        // As a client, a revoked server is refused too.
        let s = pki::summarize_file(&sp.cert).expect("summary");
        let r2 = pki::revoke(dir.path(), &[(s.serial, "storage-s1".into())]).expect("revoke");
        client.set_crl(r2.crl_pem.as_bytes()).expect("apply");
        let fresh_server = TlsSource::new(&sp).expect("source");
        let e = handshake(
            fresh_server.server_config().expect("cfg"),
            client.client_config().expect("cfg"),
        )
        .expect_err("a revoked server is refused");
        assert!(e.contains("Revoked"), "{e}");
    }
}
