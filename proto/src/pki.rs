//! A cluster PKI: one CA, and certificates for each daemon naming its role and id.
//!
//! Layout of a PKI directory: `ca.pem` + `ca.key` (the CA), and `<name>.pem` + `<name>.key` per
//! holder. Keys are ECDSA P-256. Certificates carry `keel://<role>/<id>` as a URI SAN, plus the
//! DNS names and IP addresses the holder is reached at (always `localhost`, `127.0.0.1`, `::1`).
//!
//! Validity (docs/security.md, "Certificates"): daemons (storage, node, controller) 1 year,
//! admin 90 days, the CA 10 years; `not_before` is [`CLOCK_SKEW_SECS`] in the past so that a
//! host whose clock is a little behind accepts a fresh certificate. Each certificate gets a
//! random 127-bit serial, listed in `issued.txt` (`<serial> <name> <not_before> <not_after>`).
//!
//! Revocation: [`revoke`] adds serials to `crl.state` (a CRL number and the revoked serials)
//! and writes `crl.pem`, a CRL signed by the CA whose number is one more than the last one.
//! Every file is replaced atomically (a temporary file, fsync, rename); keys are 0600 from
//! their creation.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};

use crate::tls::TlsPaths;
use crate::types::Role;

/// Seconds `not_before` lies in the past (clock skew between hosts).
pub const CLOCK_SKEW_SECS: i64 = 5 * 60;
/// The CA's validity by default.
pub const CA_DAYS: u32 = 3650;
/// A daemon's (storage, node, controller) certificate validity by default.
pub const DAEMON_DAYS: u32 = 365;
/// An admin certificate's validity by default.
pub const ADMIN_DAYS: u32 = 90;
/// Longest validity accepted for `--days` (about 100 years).
pub const MAX_DAYS: u32 = 36_500;
/// A CRL's `nextUpdate`, days after its `thisUpdate` (informational: Keel distributes CRLs
/// itself and does not refuse a CRL past its `nextUpdate`).
pub const CRL_NEXT_UPDATE_DAYS: i64 = 365;

const DAY: i64 = 86_400;

/// Why a certificate could not be made, renewed or revoked.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0} already exists: refusing to overwrite a CA")]
    CaExists(PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("invalid validity: {0}")]
    BadValidity(String),
    #[error("{path}: {why}")]
    BadCertificate { path: PathBuf, why: String },
    #[error("not a CRL: {0}")]
    BadCrl(String),
    #[error("the CRL is not signed by this cluster's CA: {0}")]
    CrlSignature(String),
    #[error("{path}: {why}")]
    BadState { path: PathBuf, why: String },
    #[error("invalid serial {0:?}: give the hexadecimal serial `keelctl pki list` shows")]
    BadSerial(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Replaces `path` with `data` atomically: a temporary file in the same directory (mode 0600
/// for a private key from its creation, 0644 otherwise), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Seconds since the Unix epoch now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn datetime(unix: i64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| PkiError::BadValidity(format!("{unix}: {e}")))
}

/// The default validity of a certificate for `role`, in days.
pub fn default_days(role: Role) -> u32 {
    match role {
        Role::Admin => ADMIN_DAYS,
        Role::Storage | Role::Node | Role::Controller => DAEMON_DAYS,
    }
}

/// When a certificate is valid, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueOptions {
    pub not_before: i64,
    pub not_after: i64,
}

impl IssueOptions {
    /// Valid from [`CLOCK_SKEW_SECS`] ago until `days` days from `now`.
    pub fn days_from(now: i64, days: u32) -> Result<IssueOptions, PkiError> {
        if days == 0 || days > MAX_DAYS {
            return Err(PkiError::BadValidity(format!(
                "{days} days: give 1 to {MAX_DAYS}"
            )));
        }
        Ok(IssueOptions {
            not_before: now - CLOCK_SKEW_SECS,
            not_after: now + i64::from(days) * DAY,
        })
    }

    /// Valid from [`CLOCK_SKEW_SECS`] ago for `days` days.
    pub fn days(days: u32) -> Result<IssueOptions, PkiError> {
        IssueOptions::days_from(now_unix(), days)
    }

    /// The default validity of `role` ([`default_days`]).
    pub fn for_role(role: Role) -> IssueOptions {
        let now = now_unix();
        IssueOptions {
            not_before: now - CLOCK_SKEW_SECS,
            not_after: now + i64::from(default_days(role)) * DAY,
        }
    }

    fn check(&self) -> Result<(), PkiError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::BadValidity(format!(
                "not_after {} is not after not_before {}",
                self.not_after, self.not_before
            )));
        }
        Ok(())
    }
}

/// A random positive serial of 16 bytes (the first nonzero, its top bit clear: no DER padding).
fn random_serial() -> Result<Vec<u8>, PkiError> {
    let rng = rustls::crypto::ring::default_provider().secure_random;
    let mut s = [0u8; 16];
    rng.fill(&mut s)
        .map_err(|_| PkiError::BadValidity("no randomness for a serial".into()))?;
    s[0] = (s[0] & 0x7f).max(1);
    Ok(s.to_vec())
}

/// Hexadecimal, lower case, without leading zero bytes (how serials are shown and given).
pub fn serial_hex(serial: &[u8]) -> String {
    let start = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    let s: String = serial[start..].iter().map(|b| format!("{b:02x}")).collect();
    if s.is_empty() {
        "00".into()
    } else {
        s
    }
}

/// Parses a serial as `keelctl pki list` shows it (`:` separators and a `0x` prefix allowed).
pub fn parse_serial(s: &str) -> Result<Vec<u8>, PkiError> {
    let bad = || PkiError::BadSerial(s.to_string());
    let t: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|&c| c != ':')
        .collect();
    if t.is_empty() || t.len() > 40 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let t = if t.len() % 2 == 1 { format!("0{t}") } else { t };
    let mut out: Vec<u8> = (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    while out.len() > 1 && out[0] == 0 {
        out.remove(0);
    }
    Ok(out)
}

/// Creates `ca.pem` and `ca.key` in `dir` (which is created), valid [`CA_DAYS`]. Refuses to
/// overwrite.
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
    init_ca_with(dir, IssueOptions::days(CA_DAYS)?)
}

/// [`init_ca`] with an explicit validity.
pub fn init_ca_with(dir: &Path, validity: IssueOptions) -> Result<(), PkiError> {
    validity.check()?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join("ca.pem");
    if cert_path.exists() {
        return Err(PkiError::CaExists(cert_path));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Keel cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = datetime(validity.not_before)?;
    params.not_after = datetime(validity.not_after)?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_atomic(&dir.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The CA of `dir` as an issuer: its certificate (re-made from `ca.pem`'s parameters, same
/// name and key) and key.
fn load_ca(dir: &Path) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let ca_params = CertificateParams::from_ca_cert_pem(&read(&dir.join("ca.pem"))?)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    Ok((ca_cert, ca_key))
}

/// Issues a certificate for `role`/`id` signed by the CA in `dir`, written as
/// `<role>-<id>.pem` / `.key`, valid for the role's default ([`default_days`]). `hosts` are
/// extra DNS names or IP addresses.
pub fn issue(dir: &Path, role: Role, id: &str, hosts: &[String]) -> Result<TlsPaths, PkiError> {
    issue_with(dir, role, id, hosts, IssueOptions::for_role(role))
}

/// [`issue`] with an explicit validity (tests make expired and not-yet-valid certificates
/// with it).
pub fn issue_with(
    dir: &Path,
    role: Role,
    id: &str,
    hosts: &[String],
    validity: IssueOptions,
) -> Result<TlsPaths, PkiError> {
    if !valid_name(id) {
        return Err(PkiError::BadName(id.to_string()));
    }
    validity.check()?;
    let (ca_cert, ca_key) = load_ca(dir)?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("keel {role} {id}"));
    params
        .subject_alt_names
        .push(SanType::URI(format!("keel://{role}/{id}").try_into()?));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.not_before = datetime(validity.not_before)?;
    params.not_after = datetime(validity.not_after)?;
    let serial = random_serial()?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    let name = format!("{role}-{id}");
    let paths = TlsPaths::in_dir(dir, &name);
    // The key first: a daemon reloading between the two renames sees a mismatched pair,
    // keeps its old one and looks again a second later.
    write_atomic(&paths.key, key.serialize_pem().as_bytes(), true)?;
    write_atomic(&paths.cert, cert.pem().as_bytes(), false)?;
    record_issued(
        dir,
        &serial_hex(&serial),
        &name,
        validity.not_before,
        validity.not_after,
    )?;
    Ok(paths)
}

fn record_issued(
    dir: &Path,
    serial: &str,
    name: &str,
    not_before: i64,
    not_after: i64,
) -> Result<(), PkiError> {
    let p = dir.join("issued.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(io_err(&p))?;
    writeln!(f, "{serial} {name} {not_before} {not_after}").map_err(io_err(&p))?;
    f.sync_all().map_err(io_err(&p))
}

/// An issued certificate, as read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// `keel://<role>/<id>`, when the certificate has one.
    pub identity: Option<crate::tls::Identity>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// DNS names and IP addresses of its subject alternative names.
    pub hosts: Vec<String>,
}

/// Reads the facts of a DER certificate.
pub fn summarize(der: &[u8]) -> Result<CertSummary, String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => hosts.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => hosts.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => hosts.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertSummary {
        identity: crate::tls::identity_from_cert(der).ok(),
        serial: serial_hex(&cert.serial.to_bytes_be()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        hosts,
    })
}

/// [`summarize`] of the (first) certificate of a PEM file.
pub fn summarize_file(path: &Path) -> Result<CertSummary, PkiError> {
    let certs = crate::tls::load_certs(path).map_err(|e| PkiError::BadCertificate {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let first = certs.first().ok_or_else(|| PkiError::BadCertificate {
        path: path.to_owned(),
        why: "no certificate".into(),
    })?;
    summarize(first.as_ref()).map_err(|why| PkiError::BadCertificate {
        path: path.to_owned(),
        why,
    })
}

/// Renews `<name>.pem` in `dir` (`name` is `<role>-<id>`): a new key and certificate with the
/// same role, id and hosts, valid `days` (default: the role's). Both files are replaced
/// atomically; daemons pick them up within about a second (`tls::TlsSource`).
pub fn renew(dir: &Path, name: &str, days: Option<u32>) -> Result<CertSummary, PkiError> {
    let path = dir.join(format!("{name}.pem"));
    let old = summarize_file(&path)?;
    let id = old
        .identity
        .clone()
        .ok_or_else(|| PkiError::BadCertificate {
            path: path.clone(),
            why: "no keel://<role>/<id> name: not a certificate keelctl issued".into(),
        })?;
    if format!("{}-{}", id.role, id.id) != name {
        return Err(PkiError::BadCertificate {
            path,
            why: format!(
                "names {} but the file is {name}.pem",
                format_args!("keel://{}/{}", id.role, id.id)
            ),
        });
    }
    let validity = match days {
        Some(d) => IssueOptions::days(d)?,
        None => IssueOptions::for_role(id.role),
    };
    let p = issue_with(dir, id.role, &id.id, &old.hosts, validity)?;
    summarize_file(&p.cert)
}

/// A line of `issued.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedEntry {
    pub serial: String,
    pub name: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Every certificate `dir`'s CA issued (from `issued.txt`; lines it cannot read are skipped).
pub fn issued(dir: &Path) -> Result<Vec<IssuedEntry>, PkiError> {
    let p = dir.join("issued.txt");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&p)(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(IssuedEntry {
                serial: w.next()?.to_string(),
                name: w.next()?.to_string(),
                not_before: w.next()?.parse().ok()?,
                not_after: w.next()?.parse().ok()?,
            })
        })
        .collect())
}

// ----- revocation -----

/// The CA's revocation state (`crl.state`): the number of the last CRL made, and the revoked
/// serials with the name they were issued to and when they were revoked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationState {
    pub crl_number: u64,
    /// serial (hex) -> (name, revoked at)
    pub revoked: BTreeMap<String, (String, i64)>,
}

impl RevocationState {
    fn parse(text: &str, path: &Path) -> Result<RevocationState, PkiError> {
        let bad = |why: String| PkiError::BadState {
            path: path.to_owned(),
            why,
        };
        let mut st = RevocationState::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["number", n] => {
                    st.crl_number = n.parse().map_err(|_| bad(format!("bad number {n:?}")))?
                }
                ["revoked", serial, name, at] => {
                    let at = at
                        .parse()
                        .map_err(|_| bad(format!("line {}: bad time", n + 1)))?;
                    st.revoked
                        .insert(serial.to_string(), (name.to_string(), at));
                }
                _ => return Err(bad(format!("line {}: {line:?}", n + 1))),
            }
        }
        Ok(st)
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "# Keel CA revocation state (keelctl pki revoke): the last CRL's number, then\n\
             # `revoked <serial> <name> <unix time>` per revoked certificate.\n",
        );
        s.push_str(&format!("number {}\n", self.crl_number));
        for (serial, (name, at)) in &self.revoked {
            s.push_str(&format!("revoked {serial} {name} {at}\n"));
        }
        s
    }

    /// `dir/crl.state`, or the empty state when there is none yet.
    pub fn load(dir: &Path) -> Result<RevocationState, PkiError> {
        let p = dir.join("crl.state");
        match std::fs::read_to_string(&p) {
            Ok(t) => RevocationState::parse(&t, &p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationState::default()),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    fn save(&self, dir: &Path) -> Result<(), PkiError> {
        write_atomic(&dir.join("crl.state"), self.render().as_bytes(), false)
    }
}

/// What [`revoke`] did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Serials newly revoked (hex), with their names.
    pub added: Vec<(String, String)>,
    /// Serials that were revoked already.
    pub already: Vec<String>,
    /// The new CRL's number.
    pub crl_number: u64,
    /// Serials the CRL lists.
    pub listed: usize,
    /// Where the CRL was written (`dir/crl.pem`).
    pub crl_path: PathBuf,
    /// The CRL, PEM.
    pub crl_pem: String,
}

/// Adds `serials` (hex, with the name each was issued to) to the CA's revoked list and writes
/// a new CRL (`crl.pem`, number one above the last) signed by the CA of `dir`. The state is
/// saved before the CRL, so a number is never used twice.
pub fn revoke(dir: &Path, serials: &[(String, String)]) -> Result<Revocation, PkiError> {
    let (ca_cert, ca_key) = load_ca(dir)?;
    let mut st = RevocationState::load(dir)?;
    let now = now_unix();
    let mut added = Vec::new();
    let mut already = Vec::new();
    for (serial, name) in serials {
        let serial = serial_hex(&parse_serial(serial)?);
        if st.revoked.contains_key(&serial) {
            already.push(serial);
        } else {
            st.revoked.insert(serial.clone(), (name.clone(), now));
            added.push((serial, name.clone()));
        }
    }
    st.crl_number = st.crl_number.saturating_add(1);
    let revoked_certs = st
        .revoked
        .iter()
        .map(|(serial, (_, at))| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&parse_serial(serial)?),
                revocation_time: datetime(*at)?,
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let params = CertificateRevocationListParams {
        this_update: datetime(now - CLOCK_SKEW_SECS)?,
        next_update: datetime(now + CRL_NEXT_UPDATE_DAYS * DAY)?,
        crl_number: SerialNumber::from_slice(&st.crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca_cert, &ca_key)?;
    let pem = crl.pem()?;
    st.save(dir)?;
    let crl_path = dir.join("crl.pem");
    write_atomic(&crl_path, pem.as_bytes(), false)?;
    Ok(Revocation {
        added,
        already,
        crl_number: st.crl_number,
        listed: st.revoked.len(),
        crl_path,
        crl_pem: pem,
    })
}

/// A CRL checked against the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// Its CRL number (larger is newer).
    pub number: u64,
    /// The serials it revokes, big-endian without leading zeros.
    pub revoked: Vec<Vec<u8>>,
    /// `thisUpdate`, seconds since the Unix epoch.
    pub this_update: i64,
    /// The CRL, DER.
    pub der: Vec<u8>,
}

impl Crl {
    /// The CRL as PEM.
    pub fn pem(&self) -> String {
        pem_encode("X509 CRL", &self.der)
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for c in der.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Largest CRL accepted (about 20,000 revoked certificates).
pub const MAX_CRL_BYTES: usize = 1 << 20;

/// Reads a CRL (PEM or DER) and checks that `ca_der` (the cluster CA's certificate) signed it
/// and that it has a CRL number. Never panics on bad input.
pub fn parse_crl(data: &[u8], ca_der: &[u8]) -> Result<Crl, PkiError> {
    use x509_parser::prelude::FromDer;
    if data.len() > MAX_CRL_BYTES {
        return Err(PkiError::BadCrl(format!(
            "{} bytes, more than the {MAX_CRL_BYTES} accepted",
            data.len()
        )));
    }
    let der: Vec<u8> = if data.starts_with(b"-----") || data.trim_ascii_start().starts_with(b"-") {
        let mut r = data;
        match rustls_pemfile::read_one(&mut r) {
            Ok(Some(rustls_pemfile::Item::Crl(c))) => c.as_ref().to_vec(),
            Ok(_) => return Err(PkiError::BadCrl("the PEM holds no X509 CRL".into())),
            Err(e) => return Err(PkiError::BadCrl(format!("PEM: {e}"))),
        }
    } else {
        data.to_vec()
    };
    let (rest, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(|e| PkiError::BadCrl(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCrl("trailing bytes after the CRL".into()));
    }
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(ca_der)
        .map_err(|e| PkiError::CrlSignature(format!("the CA certificate: {e}")))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(PkiError::CrlSignature(format!(
            "issued by {:?}, the CA is {:?}",
            crl.issuer().to_string(),
            ca.subject().to_string()
        )));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| PkiError::CrlSignature(e.to_string()))?;
    let number = crl
        .crl_number()
        .ok_or_else(|| PkiError::BadCrl("no CRL number".into()))?;
    let number = u64::try_from(number)
        .map_err(|_| PkiError::BadCrl("CRL number larger than 2^64".into()))?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| r.serial().to_bytes_be())
        .collect();
    let this_update = crl.last_update().timestamp();
    Ok(Crl {
        number,
        revoked,
        this_update,
        der,
    })
}

/// Whether a CRL numbered `new` replaces the one numbered `current` (none: any does). Equal
/// numbers do not: a CA never signs two different CRLs with one number.
pub fn crl_is_newer(current: Option<u64>, new: u64) -> bool {
    match current {
        None => true,
        Some(c) => new > c,
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::tls;

    #[test]
    fn issued_certificate_names_role_and_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path()).expect("ca");
        assert!(matches!(init_ca(dir.path()), Err(PkiError::CaExists(_))));
        let p = issue(dir.path(), Role::Storage, "s1", &["10.1.2.3".into()]).expect("issue");
        let certs = tls::load_certs(&p.cert).expect("load");
        let id = tls::identity_from_cert(certs[0].as_ref()).expect("identity");
        assert_eq!(id.role, Role::Storage);
        assert_eq!(id.id, "s1");
        assert!(tls::server_config(&p).is_ok());
        assert!(tls::client_config(&p).is_ok());
        assert!(matches!(
            issue(dir.path(), Role::Node, "a/b", &[]),
            Err(PkiError::BadName(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p.key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");
    }

    #[test]
    fn validity_defaults_are_an_operators() {
        assert_eq!(default_days(Role::Storage), 365);
        assert_eq!(default_days(Role::Node), 365);
        assert_eq!(default_days(Role::Controller), 365);
        assert_eq!(default_days(Role::Admin), 90);
        assert_eq!(CA_DAYS, 3650);
        let o = IssueOptions::days_from(1_000_000_000, 10).expect("days");
        assert_eq!(o.not_before, 1_000_000_000 - 300);
        assert_eq!(o.not_after, 1_000_000_000 + 10 * 86_400);
        assert!(IssueOptions::days(0).is_err());
        assert!(IssueOptions::days(MAX_DAYS + 1).is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path()).expect("ca");
        let now = now_unix();
        let ca = summarize_file(&dir.path().join("ca.pem")).expect("ca");
        assert!((ca.not_after - (now + 3650 * DAY)).abs() < 120, "{ca:?}");
        for (role, days) in [(Role::Admin, 90), (Role::Node, 365)] {
            let p = issue(dir.path(), role, "x", &[]).expect("issue");
            let s = summarize_file(&p.cert).expect("summary");
            assert!(
                (s.not_after - (now + days * DAY)).abs() < 120,
                "{role}: {s:?}"
            );
            assert!(
                (s.not_before - (now - CLOCK_SKEW_SECS)).abs() < 120,
                "{role}: {s:?}"
            );
        }
    }

    #[test]
    fn renew_keeps_role_id_and_hosts_with_a_new_key_and_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path()).expect("ca");
        let p = issue(dir.path(), Role::Storage, "s1", &["10.9.8.7".into()]).expect("issue");
        let before = summarize_file(&p.cert).expect("summary");
        let key_before = std::fs::read(&p.key).expect("key");
        let after = renew(dir.path(), "storage-s1", Some(30)).expect("renew");
        assert_eq!(after.identity, before.identity);
        assert_eq!(after.hosts, before.hosts);
        assert!(after.hosts.contains(&"10.9.8.7".to_string()), "{after:?}");
        assert_ne!(after.serial, before.serial);
        assert_ne!(std::fs::read(&p.key).expect("key"), key_before);
        assert!((after.not_after - (now_unix() + 30 * DAY)).abs() < 120);
        let log = issued(dir.path()).expect("issued");
        assert_eq!(log.len(), 2);
        assert!(log.iter().all(|e| e.name == "storage-s1"));
        assert!(renew(dir.path(), "storage-nope", None).is_err());
    }

    #[test]
    fn serials_parse_as_shown() {
        assert_eq!(parse_serial("0a:ff").expect("serial"), vec![0x0a, 0xff]);
        assert_eq!(parse_serial("0x00ff").expect("serial"), vec![0xff]);
        assert_eq!(parse_serial("abc").expect("serial"), vec![0x0a, 0xbc]);
        assert_eq!(serial_hex(&[0, 0x0a, 0xbc]), "0abc");
        assert!(parse_serial("").is_err());
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial(&"f".repeat(41)).is_err());
    }

    #[test]
    fn crl_numbers_only_grow() {
        assert!(crl_is_newer(None, 1));
        assert!(crl_is_newer(Some(1), 2));
        assert!(!crl_is_newer(Some(2), 2));
        assert!(!crl_is_newer(Some(3), 2));
    }

    #[test]
    fn revoke_makes_a_signed_crl_with_a_growing_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path()).expect("ca");
        let p = issue(dir.path(), Role::Node, "n1", &[]).expect("issue");
        let s = summarize_file(&p.cert).expect("summary");
        let ca = tls::load_certs(&dir.path().join("ca.pem")).expect("ca");
        let r1 = revoke(dir.path(), &[(s.serial.clone(), "node-n1".into())]).expect("revoke");
        assert_eq!(r1.crl_number, 1);
        assert_eq!(r1.added.len(), 1);
        let crl = parse_crl(r1.crl_pem.as_bytes(), ca[0].as_ref()).expect("parse");
        assert_eq!(crl.number, 1);
        assert_eq!(crl.revoked, vec![parse_serial(&s.serial).expect("serial")]);
        assert_eq!(parse_crl(&crl.der, ca[0].as_ref()).expect("der"), crl);
        assert_eq!(crl.pem(), r1.crl_pem, "PEM round trip");
        let r2 = revoke(dir.path(), &[(s.serial.clone(), "node-n1".into())]).expect("again");
        assert_eq!(r2.crl_number, 2);
        assert_eq!(r2.already, vec![s.serial.clone()]);
        assert_eq!(r2.listed, 1);
        let st = RevocationState::load(dir.path()).expect("state");
        assert_eq!(st.crl_number, 2);
        assert_eq!(
            RevocationState::parse(&st.render(), Path::new("x")).expect("parse"),
            st
        );

        // Another CA's CRL, garbage, a truncated CRL: refused, no panic.
        let other = tempfile::tempdir().expect("tempdir");
        init_ca(other.path()).expect("ca");
        let foreign = revoke(other.path(), &[("01".into(), "x".into())]).expect("revoke");
        assert!(matches!(
            parse_crl(foreign.crl_pem.as_bytes(), ca[0].as_ref()),
            Err(PkiError::CrlSignature(_))
        ));
        assert!(parse_crl(b"hello", ca[0].as_ref()).is_err());
        assert!(parse_crl(&crl.der[..crl.der.len() / 2], ca[0].as_ref()).is_err());
        let mut flipped = crl.der.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        assert!(parse_crl(&flipped, ca[0].as_ref()).is_err());
    }
}
