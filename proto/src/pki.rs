//! A cluster PKI: one CA, and certificates for each daemon naming its role and id.
//!
//! Layout of a PKI directory: `ca.pem` + `ca.key` (the CA), and `<name>.pem` + `<name>.key` per
//! holder. Keys are ECDSA P-256. Certificates carry `keel://<role>/<id>` as a URI SAN, plus the
//! DNS names and IP addresses the holder is reached at (always `localhost`, `127.0.0.1`, `::1`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::tls::TlsPaths;
use crate::types::Role;

/// Why a certificate could not be made.
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
}

fn write(path: &Path, data: &str, private: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, data).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates `ca.pem` and `ca.key` in `dir` (which is created). Refuses to overwrite.
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
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
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Issues a certificate for `role`/`id` signed by the CA in `dir`, written as
/// `<role>-<id>.pem` / `.key`. `hosts` are extra DNS names or IP addresses.
pub fn issue(dir: &Path, role: Role, id: &str, hosts: &[String]) -> Result<TlsPaths, PkiError> {
    if !valid_name(id) {
        return Err(PkiError::BadName(id.to_string()));
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let ca_params = CertificateParams::from_ca_cert_pem(&read(&dir.join("ca.pem"))?)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(hosts.iter().cloned());
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
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    let name = format!("{role}-{id}");
    let paths = TlsPaths::in_dir(dir, &name);
    write(&paths.key, &key.serialize_pem(), true)?;
    write(&paths.cert, &cert.pem(), false)?;
    Ok(paths)
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
    }
}
