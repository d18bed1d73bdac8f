//! A node's report of an unreachable primary (docs/replication.md, R6) against a real cluster:
//! the controller probes the primary itself and promotes only when the probe fails. The
//! controller's failure timeout is 30 s, so the heartbeat path cannot be what promotes.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use http::Method;
use keel_api::{ApiClient, PrimaryReport, PrimaryUnreachable};
use keel_proto::tls::TlsPaths;
use keel_proto::{pki, Role};
use keel_tests::keel_up::{kill, Cluster};
use keel_tests::writer::copy_fields;
use serde_json::Value;

/// `(server, address, role)` of each copy `describe` shows.
fn copies(v: &Value) -> Vec<[String; 3]> {
    copy_fields(v, ["server", "address", "role"])
}

fn client(c: &Cluster, cert: Option<&str>, token: Option<String>) -> Result<ApiClient> {
    let pki = c.dir.join("pki");
    let id = cert.map(|n| TlsPaths::in_dir(&pki, n));
    let tls = keel_api::client_tls(&pki.join("ca.pem"), id.as_ref())?;
    Ok(ApiClient::new(&c.url, tls, token)?.with_timeout(Duration::from_secs(20)))
}

/// SIGCONT on drop.
struct ContOnDrop(i32);

impl Drop for ContOnDrop {
    fn drop(&mut self) {
        kill(self.0, libc::SIGCONT);
    }
}

async fn report(api: &ApiClient, volume: &str, server: &str, epoch: u64) -> Result<PrimaryReport> {
    Ok(api
        .post(
            &format!("/v1/volumes/{volume}/primary-unreachable"),
            &PrimaryUnreachable {
                server: server.to_string(),
                epoch,
                unanswered_ms: 1000,
            },
        )
        .await?)
}

async fn report_status(api: &ApiClient, volume: &str, server: &str) -> Result<u16> {
    let body = serde_json::to_vec(&PrimaryUnreachable {
        server: server.to_string(),
        epoch: 1,
        unanswered_ms: 1000,
    })?;
    Ok(api
        .raw(
            Method::POST,
            &format!("/v1/volumes/{volume}/primary-unreachable"),
            Some(body),
        )
        .await?
        .0)
}

#[test]
fn a_reported_primary_is_probed_and_replaced_only_when_it_does_not_answer() -> Result<()> {
    let t = tempfile::tempdir()?;
    let c = Cluster::up_with_args(
        &t.path().join("keel"),
        2,
        "1GiB",
        &["--failure-timeout-ms", "30000"],
    )?;
    let pki_dir = c.dir.join("pki");
    // node2 has no node manager (so no keel-vhost reports on its own); its attachment makes it
    // a caller allowed to report. "intruder" is a node without an attachment.
    pki::issue(&pki_dir, Role::Node, "node2", &[])?;
    pki::issue(&pki_dir, Role::Node, "intruder", &[])?;
    let v = c.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        "rep",
        "--replicas",
        "2",
    ])?;
    let id = v["id"].as_str().context("id")?.to_string();
    c.wait_for(Duration::from_secs(20), "both copies reported", || {
        let d = c.describe("rep").ok()?;
        d["copies"]
            .as_array()?
            .iter()
            .all(|x| x["state"] == "ok" || x["state"] == "in_sync")
            .then_some(())
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let node2 = client(&c, Some("node-node2"), None)?;
        node2
            .post::<_, Value>(
                "/v1/nodes",
                &keel_api::NodeRegistration {
                    id: "node2".into(),
                    socket_dir: "/nonexistent/keel-node2".into(),
                },
            )
            .await?;
        c.json(&[
            "volume",
            "attach",
            "rep",
            "--node",
            "node2",
            "--instance",
            "vm",
            // No node manager serves node2: nothing to wait for.
            "--no-wait",
        ])?;
        let d = c.describe("rep")?;
        let e0 = d["epoch"].as_u64().context("epoch")?;
        let cs = copies(&d);
        let find = |role: &str| {
            cs.iter()
                .find(|x| x[2] == role)
                .cloned()
                .with_context(|| format!("no {role}: {d}"))
        };
        let [p_server, p_addr, _] = find("primary")?;
        let [m_server, m_addr, _] = find("mirror")?;

        // Callers: a node without an attachment, and a storage server, are refused.
        let intruder = client(&c, Some("node-intruder"), None)?;
        assert_eq!(report_status(&intruder, &id, &p_addr).await?, 403);
        let storage = client(&c, Some(&format!("storage-{m_server}")), None)?;
        assert_eq!(report_status(&storage, &id, &p_addr).await?, 403);
        assert_eq!(
            report_status(&client(&c, None, None)?, &id, &p_addr).await?,
            401
        );
        assert_eq!(report_status(&node2, &id, "not-an-address").await?, 400);

        // A healthy primary answers the controller's probe: nothing changes.
        let r = report(&node2, &id, &p_addr, e0).await?;
        assert_eq!(r.outcome, "primary_answers", "{r:?}");
        assert_eq!(r.epoch, e0);
        assert_eq!(r.primary.as_deref(), Some(p_addr.as_str()));
        assert_eq!(c.describe("rep")?["epoch"], e0);

        // The primary's server hangs. Two reports at once share one probe: one promotes, the
        // other finds the primary moved; E bumps once.
        let pid = c.pid(&format!("storage-{p_server}"))?;
        kill(pid, libc::SIGSTOP);
        let _cont = ContOnDrop(pid);
        // As keel-vhost does: report once a request has waited a second (the earlier probe,
        // which the primary answered, is then older than the wait: it is not reused).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let started = Instant::now();
        let (a, b) = tokio::join!(
            report(&node2, &id, &p_addr, e0),
            report(&node2, &id, &p_addr, e0)
        );
        let took = started.elapsed();
        let (a, b) = (a?, b?);
        eprintln!("reports after SIGSTOP of the primary answered in {took:?}: {a:?} {b:?}");
        let mut outcomes = [a.outcome.as_str(), b.outcome.as_str()];
        outcomes.sort();
        assert_eq!(outcomes, ["already_moved", "promoted"], "{a:?} {b:?}");
        for r in [&a, &b] {
            assert_eq!(r.epoch, e0 + 1, "{r:?}");
            assert_eq!(r.primary.as_deref(), Some(m_addr.as_str()), "{r:?}");
        }
        ensure!(
            took < Duration::from_secs(10),
            "the report took {took:?}: the heartbeat path (30 s) cannot have promoted"
        );
        let d = c.describe("rep")?;
        assert_eq!(d["epoch"], e0 + 1);
        let cs = copies(&d);
        assert!(
            cs.iter().any(|x| x[0] == m_server && x[2] == "primary"),
            "the mirror is primary: {d}"
        );
        assert!(
            cs.iter().any(|x| x[0] == p_server && x[2] == "mirror"),
            "the old primary is a mirror: {d}"
        );
        let state = d["copies"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["server"] == p_server.as_str()))
            .map(|x| x["state"].clone());
        assert_eq!(state, Some(Value::from("stale")), "{d}");

        // A report naming the old primary's address: already moved, nothing changes.
        let r = report(&node2, &id, &p_addr, e0).await?;
        assert_eq!(r.outcome, "already_moved", "{r:?}");
        assert_eq!(r.epoch, e0 + 1);
        assert_eq!(r.primary.as_deref(), Some(m_addr.as_str()));
        // An admin may report too.
        let token = std::fs::read_to_string(pki_dir.join("admin.token"))?
            .trim()
            .to_string();
        let admin = client(&c, None, Some(token))?;
        let r = report(&admin, &id, &m_addr, e0 + 1).await?;
        assert_eq!(r.outcome, "primary_answers", "{r:?}");
        assert_eq!(r.epoch, e0 + 1);
        anyhow::Ok(())
    })
}
