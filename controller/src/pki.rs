//! The cluster's certificate revocation list at the controller (docs/security.md,
//! "Certificates"): `PUT /v1/pki/crl` (admin) hands it a CRL made by `keelctl pki revoke`; the
//! controller checks that its CA signed it and that its number is above the one it holds,
//! stores it (record `pki/crl`, the PEM), applies it to its own TLS at once (new handshakes,
//! and every request of a connection made with a now-revoked certificate), and tells storage
//! servers and node managers its number in every heartbeat answer; they fetch it with
//! `GET /v1/pki/crl` when theirs is older.

use std::sync::{Arc, Mutex};

use keel_api::CrlInfo;
use keel_proto::pki::{self, Crl};
use keel_proto::tls::{TlsError, TlsSource};

use crate::error::ApiError;
use crate::store::MetaStore;

/// The store record holding the CRL (PEM).
pub const CRL_KEY: &str = "pki/crl";

/// The controller's CRL: in its store and applied to its TLS.
pub struct Revocations {
    source: Arc<TlsSource>,
    store: Arc<dyn MetaStore>,
    /// One PUT at a time (check, store, apply).
    put_lock: Mutex<()>,
}

fn info(crl: &Crl) -> CrlInfo {
    CrlInfo {
        number: crl.number,
        revoked: crl.revoked.iter().map(|s| pki::serial_hex(s)).collect(),
        this_update: u64::try_from(crl.this_update).unwrap_or(0),
        pem: crl.pem(),
    }
}

impl Revocations {
    /// Applies the stored CRL, if any, to `source` (the controller's TLS). A stored CRL that
    /// does not check out (another CA's after a CA change) is logged and left unapplied.
    pub fn new(source: Arc<TlsSource>, store: Arc<dyn MetaStore>) -> Revocations {
        match store.get(CRL_KEY) {
            Ok(Some(v)) => match source.set_crl(&v.value) {
                Ok(change) => tracing::info!(?change, "certificate revocation list applied"),
                Err(e) => {
                    tracing::error!(error = %e, "the stored certificate revocation list does not apply")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "reading the certificate revocation list from the store")
            }
        }
        Revocations {
            source,
            store,
            put_lock: Mutex::new(()),
        }
    }

    /// The number of the CRL in force, if any.
    pub fn number(&self) -> Option<u64> {
        self.source.crl_number()
    }

    /// Whether the CRL in force revokes `serial`.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.source.is_revoked(serial)
    }

    /// The CRL in force.
    pub fn get(&self) -> Result<CrlInfo, ApiError> {
        self.source.crl().map(|c| info(&c)).ok_or_else(|| {
            ApiError::not_found(
                "no certificate revocation list yet (`keelctl pki revoke` makes one)",
            )
        })
    }

    /// Checks, stores and applies a CRL (PEM or DER).
    pub fn put(&self, body: &[u8]) -> Result<CrlInfo, ApiError> {
        let _one = self.put_lock.lock().unwrap_or_else(|p| p.into_inner());
        let crl = pki::parse_crl(body, self.source.ca_der().as_ref()).map_err(|e| match e {
            pki::PkiError::CrlSignature(_) => ApiError::bad_request(format!(
                "{e}: make CRLs with `keelctl pki revoke` where this cluster's ca.key is"
            )),
            other => ApiError::bad_request(format!("{other}")),
        })?;
        let have = self.number();
        if !pki::crl_is_newer(have, crl.number) {
            return Err(ApiError::conflict(format!(
                "CRL number {} is not newer than the controller's ({}): a CRL replaces only a lower-numbered one; make a new one with `keelctl pki revoke`",
                crl.number,
                have.unwrap_or(0)
            )));
        }
        let pem = crl.pem();
        let expected = self.store.get(CRL_KEY)?.map_or(0, |v| v.version);
        self.store.cas(CRL_KEY, expected, Some(pem.as_bytes()))?;
        match self.source.set_crl(&crl.der) {
            Ok(change) => tracing::warn!(
                ?change,
                "certificate revocation list applied: revoked certificates are refused from now on"
            ),
            Err(TlsError::CrlNotNewer { have, got }) => {
                return Err(ApiError::conflict(format!(
                    "CRL number {got} is not newer than the controller's ({have})"
                )))
            }
            Err(e) => return Err(ApiError::internal(format!("applying the CRL: {e}"))),
        }
        Ok(info(&crl))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::store::RedbStore;
    use keel_proto::tls::TlsPaths;
    use keel_proto::Role;

    #[test]
    fn a_crl_is_checked_stored_applied_and_kept_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki_dir = dir.path().join("pki");
        pki::init_ca(&pki_dir).expect("ca");
        let paths: TlsPaths = pki::issue(&pki_dir, Role::Controller, "main", &[]).expect("issue");
        let node = pki::issue(&pki_dir, Role::Node, "n1", &[]).expect("issue");
        let serial = pki::summarize_file(&node.cert).expect("summary").serial;
        let db = dir.path().join("meta.redb");
        let store: Arc<dyn MetaStore> = Arc::new(RedbStore::open(&db).expect("store"));
        let r = Revocations::new(TlsSource::new(&paths).expect("source"), store.clone());
        assert_eq!(r.number(), None);
        assert_eq!(r.get().expect_err("none yet").status, 404);

        let first = pki::revoke(&pki_dir, &[(serial.clone(), "node-n1".into())]).expect("revoke");
        let info = r.put(first.crl_pem.as_bytes()).expect("put");
        assert_eq!(
            (info.number, info.revoked.clone()),
            (1, vec![serial.clone()])
        );
        assert!(r.is_revoked(&pki::parse_serial(&serial).expect("serial")));
        assert_eq!(r.get().expect("get"), info);

        // The same number again: conflict; another CA's CRL and garbage: bad request.
        let e = r.put(first.crl_pem.as_bytes()).expect_err("same number");
        assert_eq!(e.code, "conflict");
        assert!(e.message.contains("not newer"), "{e}");
        let other = dir.path().join("other");
        pki::init_ca(&other).expect("ca");
        let foreign = pki::revoke(&other, &[("0a".into(), "x".into())]).expect("revoke");
        let e = r.put(foreign.crl_pem.as_bytes()).expect_err("foreign");
        assert_eq!(e.code, "bad_request");
        assert!(e.message.contains("not signed"), "{e}");
        assert_eq!(
            r.put(b"\x30\x03\x02\x01").expect_err("junk").code,
            "bad_request"
        );
        assert_eq!(r.number(), Some(1));

        let second = pki::revoke(&pki_dir, &[("0b".into(), "x".into())]).expect("revoke");
        assert_eq!(r.put(second.crl_pem.as_bytes()).expect("put").number, 2);
        // A restarted controller applies the stored CRL before serving.
        drop(r);
        let again = Revocations::new(TlsSource::new(&paths).expect("source"), store);
        assert_eq!(again.number(), Some(2));
        assert!(again.is_revoked(&[0x0b]));
    }
}
