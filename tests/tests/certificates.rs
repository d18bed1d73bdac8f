//! Certificates (docs/security.md, "Certificates") against a whole `keelctl up` cluster, with
//! real TLS and real daemons:
//!
//! * a matrix of bad client certificates, each refused by the controller's API and by a
//!   storage server before any state change and without disturbing the daemon (the next, valid
//!   client is served; same pid): expired, not yet valid, signed by another CA, wrong role for
//!   the endpoint, revoked (after `keelctl pki revoke`, within a bound), no certificate, TLS 1.2
//!   only, and identity URIs that are malformed or missing;
//! * `keelctl pki renew` picked up without a restart: new connections see the new serial, the
//!   daemon keeps its pid, and a guest's keel-vhost connection keeps working.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use http::Method;
use keel_api::ApiClient;
use keel_proto::admin::{admin_call_with_timeout, AdminRequest};
use keel_proto::frame::checksum;
use keel_proto::io::{connect, read_frame};
use keel_proto::pki::{self, IssueOptions};
use keel_proto::tls::{load_certs, load_key, TlsPaths};
use keel_proto::{Epoch, Frame, MemberRole, Op, Request, Role, Status, VolumeId};
use keel_tests::keel_up::{alive, Cluster};
use keel_tests::vmm::{TestVmm, VmmOptions};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const DAY: i64 = 86_400;
/// What a refused client tried to write; must never appear in a copy file.
const BAD_MARKER: &[u8] = b"KEEL-CERT-TEST-REFUSED-WRITE-0001";
/// What the real guest writes (the positive control of the scan).
const GOOD_MARKER: &[u8] = b"KEEL-CERT-TEST-GUEST-WRITE-0002";
/// A volume id no copy has: an admin op creating it must not leave a file.
const PHANTOM: VolumeId = VolumeId(0x00c0_ffee_0bad_cafe);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        r.add(c)?;
    }
    Ok(r)
}

/// A client that offers only TLS 1.2, with a valid certificate.
fn tls12_client(paths: &TlsPaths) -> Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])?
            .with_root_certificates(roots(&paths.ca)?)
            .with_client_auth_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?,
    ))
}

/// A TLS 1.3 client that presents no certificate.
fn anonymous_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
    ))
}

fn client(paths: &TlsPaths) -> Result<Arc<rustls::ClientConfig>> {
    Ok(keel_proto::tls::client_config(paths)?)
}

/// A certificate signed by the cluster CA of `pki_dir` with `uri` as its only URI name (none:
/// no URI at all), written to `out/<name>.pem`/`.key`: rcgen directly, as keelctl never
/// makes such a certificate.
fn malformed(pki_dir: &Path, out: &Path, name: &str, uri: Option<&str>) -> Result<TlsPaths> {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki_dir.join("ca.key"))?)?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(
        pki_dir.join("ca.pem"),
    )?)?
    .self_signed(&ca_key)?;
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    if let Some(u) = uri {
        p.subject_alt_names
            .push(rcgen::SanType::URI(u.to_string().try_into()?));
    }
    let now = pki::now_unix();
    p.not_before = time::OffsetDateTime::from_unix_timestamp(now - 3600)?;
    p.not_after = time::OffsetDateTime::from_unix_timestamp(now + DAY)?;
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = rcgen::KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    let paths = TlsPaths {
        ca: pki_dir.join("ca.pem"),
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}.key")),
    };
    std::fs::write(&paths.cert, cert.pem())?;
    std::fs::write(&paths.key, key.serialize_pem())?;
    Ok(paths)
}

/// `POST /v1/volumes` (a mutation) with `tls`: `Ok` if the controller created something.
fn api_create(url: &str, tls: Arc<rustls::ClientConfig>, name: &str) -> Result<(), String> {
    let api = ApiClient::new(url, tls, None)
        .map_err(|e| e.to_string())?
        .with_timeout(Duration::from_secs(10));
    let body = serde_json::to_vec(&serde_json::json!({"size": "64MiB", "name": name}))
        .map_err(|e| e.to_string())?;
    match rt().block_on(api.raw(Method::POST, "/v1/volumes", Some(body))) {
        Ok((s, _)) if (200..300).contains(&s) => Ok(()),
        Ok((s, b)) => Err(format!("HTTP {s} {}", String::from_utf8_lossy(&b))),
        Err(e) => Err(format!("{e}")),
    }
}

/// A data-path write of [`BAD_MARKER`] and an admin op (create a copy of [`PHANTOM`]) with
/// `tls`: `Ok(what was answered)` if either was accepted, `Err(how it was refused)`.
fn storage_attempt(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    volume: VolumeId,
    epoch: u64,
) -> Result<String, String> {
    rt().block_on(async move {
        let mut refused = Vec::new();
        match connect(addr, tls.clone(), Role::Storage).await {
            Err(e) => refused.push(format!("write: connection refused: {e}")),
            Ok((mut s, _)) => {
                let mut payload = vec![0u8; 4096];
                payload[..BAD_MARKER.len()].copy_from_slice(BAD_MARKER);
                let mut r = Request::new(Op::Write, 7, volume, Epoch(epoch));
                r.offset = 0;
                r.length = 4096;
                r.crc = checksum(&payload);
                r.payload = payload.into();
                let sent = async {
                    s.write_all(&Frame::Request(r).to_bytes()).await?;
                    s.flush().await
                }
                .await;
                let mut buf = Vec::new();
                let answer: Result<(), String> = match sent {
                    Err(e) => Err(format!("send: {e}")),
                    Ok(()) => match tokio::time::timeout(
                        Duration::from_secs(10),
                        read_frame(&mut s, &mut buf),
                    )
                    .await
                    {
                        Ok(Ok(Some(Frame::Response(r)))) if r.status == Status::Ok => {
                            return Ok("the write was accepted".to_string())
                        }
                        Ok(Ok(Some(Frame::Response(r)))) => Err(format!("status {}", r.status)),
                        Ok(Ok(other)) => Err(format!("answer {other:?}")),
                        Ok(Err(e)) => Err(format!("{e}")),
                        Err(_) => Err("no answer within 10 s".into()),
                    },
                };
                if let Err(e) = answer {
                    refused.push(format!("write: {e}"));
                }
            }
        }
        let create = AdminRequest::CreateCopy {
            volume: PHANTOM,
            size: 1 << 20,
            role: MemberRole::Primary,
            epoch: Epoch(1),
        };
        match admin_call_with_timeout(addr, tls, create, Duration::from_secs(10)).await {
            Ok(_) => return Ok("create-copy was accepted".to_string()),
            Err(e) => refused.push(format!("create-copy: {e}")),
        }
        Err(refused.join("; "))
    })
}

/// A ping with a valid client: the storage server still serves.
fn storage_ping(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>> {
    rt().block_on(async move {
        let (mut s, _) = connect(addr, tls, Role::Storage).await?;
        let serial = keel_proto::tls::peer_serial(s.get_ref().1).unwrap_or_default();
        let req = Request::new(Op::Ping, 1, VolumeId(1), Epoch(0));
        s.write_all(&Frame::Request(req).to_bytes()).await?;
        s.flush().await?;
        let mut buf = Vec::new();
        match read_frame(&mut s, &mut buf).await? {
            Some(Frame::Response(r)) if r.request_id == 1 => Ok(serial),
            other => bail!("ping answered {other:?}"),
        }
    })
}

/// A data-path connection kept open across a revocation.
struct Held {
    rt: tokio::runtime::Runtime,
    stream: keel_proto::io::ClientStream,
    next: u64,
}

impl Held {
    fn open(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Held> {
        let rt = rt();
        let (stream, _) = rt.block_on(connect(addr, tls, Role::Storage))?;
        Ok(Held {
            rt,
            stream,
            next: 1,
        })
    }

    /// A ping on this connection; an error once the server closed it.
    fn ping(&mut self) -> Result<()> {
        self.next += 1;
        let id = self.next;
        let s = &mut self.stream;
        self.rt.block_on(async move {
            let req = Request::new(Op::Ping, id, VolumeId(1), Epoch(0));
            s.write_all(&Frame::Request(req).to_bytes()).await?;
            s.flush().await?;
            let mut buf = Vec::new();
            match tokio::time::timeout(Duration::from_secs(5), read_frame(s, &mut buf)).await {
                Ok(Ok(Some(Frame::Response(r)))) if r.request_id == id => Ok(()),
                Ok(Ok(other)) => bail!("ping answered {other:?}"),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => bail!("no answer to a ping within 5 s"),
            }
        })
    }
}

/// Whether any copy file under `dir` holds `needle`.
fn copies_contain(dir: &Path, needle: &[u8]) -> Result<bool> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "keel") {
                let data = std::fs::read(&p)?;
                if data.windows(needle.len()).any(|w| w == needle) {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Copy files under `dir` whose name contains `needle`.
fn copy_files_named(dir: &Path, needle: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains(needle) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The data-path address of `server` (`keelctl server list`).
fn server_addr(c: &Cluster, server: &str) -> Result<SocketAddr> {
    let list = c.json(&["server", "list"])?;
    let s = list
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == server))
        .with_context(|| format!("no server {server} in {list}"))?;
    Ok(s["address"].as_str().context("address")?.parse()?)
}

fn volume_names(c: &Cluster) -> Result<Vec<String>> {
    let v = c.json(&["volume", "list"])?;
    Ok(v.as_array()
        .context("volume list")?
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_string())
        .collect())
}

fn issue(pki_dir: &Path, role: Role, id: &str, from: i64, to: i64) -> Result<TlsPaths> {
    Ok(pki::issue_with(
        pki_dir,
        role,
        id,
        &[],
        IssueOptions {
            not_before: from,
            not_after: to,
        },
    )?)
}

fn connect_vmm(socket: &Path) -> Result<TestVmm> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = if socket.exists() {
            match TestVmm::connect(socket, VmmOptions::default()) {
                Ok(v) => return Ok(v),
                Err(e) => format!("{e:#}"),
            }
        } else {
            "no socket yet".to_string()
        };
        if Instant::now() > deadline {
            bail!("no VMM connection to {} in 30 s: {err}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One row of the matrix.
struct Case {
    name: &'static str,
    api: Option<Arc<rustls::ClientConfig>>,
    storage: Option<Arc<rustls::ClientConfig>>,
}

#[test]
fn bad_certificates_are_refused_by_the_controller_and_storage_before_any_state_change() -> Result<()>
{
    let t = tempfile::tempdir()?;
    let c = Cluster::up(t.path(), 2, "1GiB")?;
    let pki_dir = t.path().join("pki");
    let ca = pki_dir.join("ca.pem");
    let extra = t.path().join("extra-certs");
    std::fs::create_dir_all(&extra)?;
    let now = pki::now_unix();

    // The storage side: a one-copy volume on a server.
    let v = c.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        "target",
        "--replicas",
        "1",
    ])?;
    let vid: VolumeId = v["id"].as_str().context("id")?.parse()?;
    let server = v["copies"][0]["server"]
        .as_str()
        .context("server")?
        .to_string();
    let epoch = v["epoch"].as_u64().context("epoch")?;
    let addr = server_addr(&c, &server)?;
    let storage_pid = c.pid(&format!("storage-{server}"))?;
    let controller_pid = c.pid("controller")?;

    // The valid clients the daemons must keep serving.
    let probe = client(&pki::issue(&pki_dir, Role::Node, "probe", &[])?)?;
    let admin = client(&TlsPaths::in_dir(&pki_dir, "admin-keelctl"))?;
    storage_ping(addr, probe.clone()).context("a valid node certificate pings")?;

    // The matrix (revocation comes after, as it needs keelctl and distribution).
    let other_ca = t.path().join("other-ca");
    pki::init_ca(&other_ca)?;
    let foreign = |role, id| -> Result<Arc<rustls::ClientConfig>> {
        let p = pki::issue(&other_ca, role, id, &[])?;
        // Trusting the cluster's CA: only the client's certificate is foreign.
        client(&TlsPaths {
            ca: ca.clone(),
            ..p
        })
    };
    let cases = vec![
        Case {
            name: "expired",
            api: Some(client(&issue(
                &pki_dir,
                Role::Admin,
                "expired",
                now - 30 * DAY,
                now - DAY,
            )?)?),
            storage: Some(client(&issue(
                &pki_dir,
                Role::Node,
                "expired",
                now - 30 * DAY,
                now - DAY,
            )?)?),
        },
        Case {
            name: "not yet valid",
            api: Some(client(&issue(
                &pki_dir,
                Role::Admin,
                "future",
                now + DAY,
                now + 30 * DAY,
            )?)?),
            storage: Some(client(&issue(
                &pki_dir,
                Role::Node,
                "future",
                now + DAY,
                now + 30 * DAY,
            )?)?),
        },
        Case {
            name: "signed by another CA",
            api: Some(foreign(Role::Admin, "keelctl")?),
            storage: Some(foreign(Role::Node, "node1")?),
        },
        Case {
            // A node may not create volumes; a node may not administer copies (and an admin
            // certificate may not write data).
            name: "wrong role (node on the API, node and admin on storage admin and data ops)",
            api: Some(probe.clone()),
            storage: Some(probe.clone()),
        },
        Case {
            name: "wrong role (storage certificate on the API, admin on the data path)",
            api: Some(client(&TlsPaths::in_dir(
                &pki_dir,
                &format!("storage-{server}"),
            ))?),
            storage: Some(admin.clone()),
        },
        Case {
            name: "no client certificate",
            api: Some(anonymous_client(&ca)?),
            storage: Some(anonymous_client(&ca)?),
        },
        Case {
            name: "TLS 1.2 only",
            api: Some(tls12_client(&TlsPaths::in_dir(&pki_dir, "admin-keelctl"))?),
            storage: Some(tls12_client(&TlsPaths::in_dir(&pki_dir, "node-probe"))?),
        },
        Case {
            name: "identity URI keel://bogus",
            api: Some(client(&malformed(
                &pki_dir,
                &extra,
                "bogus",
                Some("keel://bogus"),
            )?)?),
            storage: Some(client(&malformed(
                &pki_dir,
                &extra,
                "bogus",
                Some("keel://bogus"),
            )?)?),
        },
        Case {
            name: "identity URI keel://node/ (no id)",
            api: Some(client(&malformed(
                &pki_dir,
                &extra,
                "noid",
                Some("keel://node/"),
            )?)?),
            storage: Some(client(&malformed(
                &pki_dir,
                &extra,
                "noid",
                Some("keel://node/"),
            )?)?),
        },
        Case {
            name: "identity URI keel://wizard/x (no such role)",
            api: Some(client(&malformed(
                &pki_dir,
                &extra,
                "role",
                Some("keel://wizard/x"),
            )?)?),
            storage: Some(client(&malformed(
                &pki_dir,
                &extra,
                "role",
                Some("keel://wizard/x"),
            )?)?),
        },
        Case {
            name: "no keel URI at all",
            api: Some(client(&malformed(&pki_dir, &extra, "nouri", None)?)?),
            storage: Some(client(&malformed(&pki_dir, &extra, "nouri", None)?)?),
        },
    ];

    let mut report = Vec::new();
    for case in &cases {
        if let Some(tls) = &case.api {
            let r = api_create(&c.url, tls.clone(), "intruder");
            ensure!(
                r.is_err(),
                "controller accepted a volume creation with {}",
                case.name
            );
            let why = r.err().unwrap_or_default();
            report.push(format!("controller | {:<70} | refused: {why}", case.name));
            // The next, valid client is served and nothing was created.
            ensure!(
                volume_names(&c)? == ["target"],
                "after {}: volumes {:?}",
                case.name,
                volume_names(&c)?
            );
        }
        if let Some(tls) = &case.storage {
            let r = storage_attempt(addr, tls.clone(), vid, epoch);
            let why = match r {
                Ok(what) => bail!("storage server: {what} with {}", case.name),
                Err(why) => why,
            };
            report.push(format!("storage    | {:<70} | refused: {why}", case.name));
            storage_ping(addr, probe.clone())
                .with_context(|| format!("a valid client after {}", case.name))?;
        }
    }

    // Revocation: valid certificates until `keelctl pki revoke`, then refused; the storage
    // servers within a bound (they learn of the CRL with a heartbeat answer).
    let admin_revoked = pki::issue(&pki_dir, Role::Admin, "revoked", &[])?;
    let node_revoked = pki::issue(&pki_dir, Role::Node, "revoked", &[])?;
    api_create(&c.url, client(&admin_revoked)?, "before-revocation")
        .map_err(anyhow::Error::msg)
        .context("an admin certificate works before it is revoked")?;
    c.json(&["volume", "delete", "before-revocation"])?;
    c.wait_for(
        Duration::from_secs(20),
        "the deleted volume to be gone",
        || (volume_names(&c).ok()? == ["target"]).then_some(()),
    )?;
    storage_ping(addr, client(&node_revoked)?).context("a node pings before revocation")?;
    // A connection made before the revocation: the server closes it once the CRL arrives.
    let mut held = Held::open(addr, client(&node_revoked)?)?;
    held.ping()
        .context("the held connection works before revocation")?;

    let o = c.ctl(&["pki", "revoke", "--name", "node-revoked"])?;
    ensure!(o.code == 0, "pki revoke: {o:?}");
    ensure!(
        o.stdout.contains("took CRL number 1"),
        "pki revoke says the controller took it: {}",
        o.stdout
    );
    let revoked_at = Instant::now();
    let bound = Duration::from_secs(10);
    let mut reached = Vec::new();
    for s in ["s1", "s2"] {
        let a = server_addr(&c, s)?;
        let tls = client(&node_revoked)?;
        loop {
            match storage_attempt(a, tls.clone(), vid, epoch) {
                Err(why) if why.contains("write: connection refused") => {
                    reached.push((s, revoked_at.elapsed(), why));
                    break;
                }
                _ if revoked_at.elapsed() > bound => {
                    bail!("storage server {s} still accepts a revoked certificate after {bound:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    loop {
        match held.ping() {
            Err(e) => {
                report.push(format!(
                    "storage    | {:<70} | closed {:?} after revoke returned: {e:#}",
                    "revoked (node certificate, connection made before)",
                    revoked_at.elapsed()
                ));
                break;
            }
            Ok(()) if revoked_at.elapsed() > bound => {
                bail!("a revoked node's connection is still served after {bound:?}")
            }
            Ok(()) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    for (s, after, why) in &reached {
        report.push(format!(
            "storage    | {:<70} | refused {after:?} after revoke returned: {why}",
            format!("revoked (node certificate, server {s})")
        ));
    }
    let o = c.ctl(&["pki", "revoke", "--name", "admin-revoked"])?;
    ensure!(o.code == 0, "pki revoke: {o:?}");
    let r = api_create(&c.url, client(&admin_revoked)?, "intruder");
    ensure!(
        r.is_err(),
        "the controller took a revoked admin certificate"
    );
    report.push(format!(
        "controller | {:<70} | refused at once: {}",
        "revoked (admin certificate)",
        r.err().unwrap_or_default()
    ));
    ensure!(volume_names(&c)? == ["target"], "{:?}", volume_names(&c)?);
    storage_ping(addr, probe.clone())?;

    // The node manager applied it too, and a saved copy is kept for restarts.
    c.wait_for(
        Duration::from_secs(10),
        "the node manager to apply the CRL",
        || {
            std::fs::read_to_string(t.path().join("logs").join("node1.log"))
                .ok()
                .filter(|l| l.contains("certificate revocation list applied"))
        },
    )?;
    c.wait_for(
        Duration::from_secs(10),
        "both storage servers to keep the CRL",
        || {
            (copy_files_named(&t.path().join("storage"), "crl.pem")
                .ok()?
                .len()
                == 2)
                .then_some(())
        },
    )?;

    // The controller refuses an older (or the same) CRL, another CA's, and a node's PUT.
    let o = c.ctl(&["pki", "publish"])?;
    ensure!(o.code == 4, "publishing the same CRL again: {o:?}");
    ensure!(o.stderr.contains("not newer"), "{}", o.stderr);
    let foreign_crl = pki::revoke(&other_ca, &[("01".into(), "x".into())])?;
    let api = ApiClient::new(&c.url, admin.clone(), None)?;
    let e = rt()
        .block_on(api.put_bytes::<Value>(
            "/v1/pki/crl",
            foreign_crl.crl_pem.clone().into_bytes(),
            "application/x-pem-file",
        ))
        .err()
        .context("another CA's CRL was taken")?;
    ensure!(
        e.status() == Some(400) && e.to_string().contains("not signed"),
        "{e}"
    );
    let node_api = ApiClient::new(&c.url, probe.clone(), None)?;
    let crl_pem = std::fs::read(pki_dir.join("crl.pem"))?;
    let e = rt()
        .block_on(node_api.put_bytes::<Value>("/v1/pki/crl", crl_pem, "application/x-pem-file"))
        .err()
        .context("a node put a CRL")?;
    ensure!(e.status() == Some(403), "{e}");
    let info: keel_api::CrlInfo = rt().block_on(node_api.get("/v1/pki/crl"))?;
    ensure!(
        info.number == 2 && info.revoked.len() == 2,
        "GET /v1/pki/crl: {info:?}"
    );
    let list = c.ctl(&["pki", "list"])?;
    ensure!(
        list.code == 0 && list.stdout.contains("revoked") && list.stdout.contains("admin-keelctl"),
        "{list:?}"
    );

    // Nothing landed: no refused write in any copy, no copy of the phantom volume; the real
    // guest's write does land (the scan finds what is there).
    let storage_dir = t.path().join("storage");
    ensure!(
        !copies_contain(&storage_dir, BAD_MARKER)?,
        "a refused write landed"
    );
    let phantom = format!("{:016x}", PHANTOM.0);
    ensure!(
        copy_files_named(&storage_dir, &phantom)?.is_empty(),
        "a refused create-copy left a file"
    );
    let (socket, _) = c.attach("target", "node1", "vm1", &[])?;
    let mut vmm = connect_vmm(&socket)?;
    let mut data = vec![0u8; 4096];
    data[..GOOD_MARKER.len()].copy_from_slice(GOOD_MARKER);
    ensure!(vmm.write(0, 8, &data)? == 0, "guest write");
    ensure!(vmm.flush(0)? == 0, "guest flush");
    ensure!(
        copies_contain(&storage_dir, GOOD_MARKER)?,
        "the guest's write is in the copy (the scan works)"
    );
    ensure!(!copies_contain(&storage_dir, BAD_MARKER)?);
    let _ = vmm.stop();

    ensure!(
        c.pid(&format!("storage-{server}"))? == storage_pid && alive(storage_pid),
        "the storage server was restarted"
    );
    ensure!(
        c.pid("controller")? == controller_pid && alive(controller_pid),
        "the controller was restarted"
    );
    let panics = ["controller", "s1", "s2", "node1"]
        .iter()
        .map(|d| c.log_grep(d, "panicked", 5))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>();
    ensure!(panics.is_empty(), "panics: {panics:?}");
    println!("certificate matrix:\n{}", report.join("\n"));
    Ok(())
}

/// The serial the controller presents to a new connection.
fn controller_serial(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<String> {
    let addr = keel_api::client::parse_url(url)?;
    rt().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let s = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let serial = keel_proto::tls::peer_serial(s.get_ref().1).context("no serial")?;
        Ok(pki::serial_hex(&serial))
    })
}

fn printed_serial(out: &str) -> Result<String> {
    let v: Value = serde_json::from_str(out.trim()).with_context(|| out.to_string())?;
    Ok(v["serial"].as_str().context("serial")?.to_string())
}

#[test]
fn renewed_certificates_are_picked_up_without_a_restart() -> Result<()> {
    let t = tempfile::tempdir()?;
    let c = Cluster::up(t.path(), 1, "1GiB")?;
    let pki_dir = t.path().join("pki");
    let probe = client(&pki::issue(&pki_dir, Role::Node, "probe", &[])?)?;
    let addr = server_addr(&c, "s1")?;
    let storage_pid = c.pid("storage-s1")?;
    let controller_pid = c.pid("controller")?;

    // A guest writes through keel-vhost before the renewals.
    c.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        "g",
        "--replicas",
        "1",
    ])?;
    let (socket, _) = c.attach("g", "node1", "vm1", &[])?;
    let mut vmm = connect_vmm(&socket)?;
    let before: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 1) as u8).collect();
    ensure!(vmm.write(0, 0, &before)? == 0, "guest write before renewal");

    let old = pki::serial_hex(&storage_ping(addr, probe.clone())?);
    // Renew the storage server's certificate, valid 10 days: it is picked up, and the daemon
    // warns that it expires soon.
    let o = c.ctl(&[
        "pki",
        "renew",
        "--name",
        "storage-s1",
        "--days",
        "10",
        "-o",
        "json",
    ])?;
    ensure!(o.code == 0, "renew: {o:?}");
    let new = printed_serial(&o.stdout)?;
    ensure!(new != old);
    let t0 = Instant::now();
    let seen = c.wait_for(
        Duration::from_secs(10),
        "a new connection to see the renewed certificate",
        || {
            storage_ping(addr, probe.clone())
                .ok()
                .map(|s| pki::serial_hex(&s))
                .filter(|s| *s == new)
        },
    )?;
    println!(
        "storage-s1 renewed: {old} -> {seen}, seen by a new connection after {:?}",
        t0.elapsed()
    );
    c.wait_for(Duration::from_secs(10), "the expiry warning", || {
        let l = c.log_grep("s1", "expires within 30 days", 1);
        (!l.is_empty()).then_some(())
    })?;

    // The controller's and the node's certificates too.
    let admin = client(&TlsPaths::in_dir(&pki_dir, "admin-keelctl"))?;
    let old_c = controller_serial(&c.url, admin.clone())?;
    let o = c.ctl(&["pki", "renew", "--name", "controller-main", "-o", "json"])?;
    ensure!(o.code == 0, "renew: {o:?}");
    let new_c = printed_serial(&o.stdout)?;
    ensure!(new_c != old_c);
    c.wait_for(
        Duration::from_secs(10),
        "the controller's new certificate",
        || {
            controller_serial(&c.url, admin.clone())
                .ok()
                .filter(|s| *s == new_c)
        },
    )?;
    let o = c.ctl(&["pki", "renew", "--name", "node-node1"])?;
    ensure!(o.code == 0, "renew: {o:?}");

    // The guest's connection (made before every renewal) keeps working.
    ensure!(
        vmm.read(0, 0, before.len())? == (0, before.clone()),
        "read after renewal"
    );
    let after: Vec<u8> = (0..65536u32).map(|i| (i * 13 + 5) as u8).collect();
    ensure!(vmm.write(0, 128, &after)? == 0, "guest write after renewal");
    ensure!(
        vmm.read(0, 128, after.len())? == (0, after),
        "read after renewal"
    );
    ensure!(vmm.flush(0)? == 0);

    // The API keeps working with the renewed controller and node certificates (heartbeats).
    std::thread::sleep(Duration::from_secs(2));
    let nodes = c.json(&["node", "list"])?;
    ensure!(nodes[0]["health"] == "up", "{nodes}");
    let servers = c.json(&["server", "list"])?;
    ensure!(servers[0]["health"] == "up", "{servers}");

    // An admin certificate close to its end: keelctl warns.
    let o = c.ctl(&["pki", "renew", "--name", "admin-keelctl", "--days", "5"])?;
    ensure!(o.code == 0, "renew: {o:?}");
    let o = c.ctl(&["volume", "list"])?;
    ensure!(o.code == 0, "{o:?}");
    ensure!(
        o.stderr.contains("warning: the admin certificate") && o.stderr.contains("expires in"),
        "{}",
        o.stderr
    );

    ensure!(c.pid("storage-s1")? == storage_pid && alive(storage_pid));
    ensure!(c.pid("controller")? == controller_pid && alive(controller_pid));
    let _ = vmm.stop();
    Ok(())
}
