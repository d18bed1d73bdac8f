//! Issue 18, items 3 and 4, against a real cluster (`keelctl up` on loopback):
//! * concurrent creates with one name give exactly one volume (the others 409 naming it);
//! * concurrent creates that only fit once: exactly one succeeds, capacity is never
//!   over-committed;
//! * names never have an id's shape, resolution never crosses from names to ids, and request
//!   bodies of the wrong JSON shape are refused with `{code, message}`.
//!
//! One cluster (two storage servers of 1 GiB) serves every case.

use std::time::Instant;

use anyhow::Result;
use http::Method;
use keel_api::{ApiClient, ErrorBody};
use keel_proto::tls::TlsPaths;
use keel_tests::hostile::{delete_volume as delete, race_creates};
use keel_tests::keel_up::Cluster;
use serde_json::Value;

const RACERS: usize = 8;

fn admin(c: &Cluster) -> Result<ApiClient> {
    let pki = c.dir.join("pki");
    let id = TlsPaths::in_dir(&pki, "admin-keelctl");
    let tls = keel_api::client_tls(&pki.join("ca.pem"), Some(&id))?;
    Ok(ApiClient::new(&c.url, tls, None)?)
}

fn error(body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {}", String::from_utf8_lossy(body)))
}

async fn volume_names(api: &ApiClient) -> Result<Vec<(String, Option<String>)>> {
    let vols: Vec<Value> = api.get("/v1/volumes").await?;
    Ok(vols
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap_or_default().to_string(),
                v["name"].as_str().map(str::to_string),
            )
        })
        .collect())
}

/// (a) 8 concurrent creates of one name, 20 rounds: exactly one volume per name, the others
/// 409 naming it.
async fn one_name_one_volume(api: &ApiClient) -> Result<()> {
    let started = Instant::now();
    let mut duplicates = 0;
    for round in 0..20 {
        let name = format!("race-{round}");
        let answers = race_creates(
            api,
            &format!(r#"{{"size":"1MiB","replicas":1,"name":"{name}"}}"#),
            RACERS,
        )
        .await?;
        let won: Vec<Value> = answers
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| serde_json::from_slice(b).expect("volume"))
            .collect();
        let holders: Vec<String> = volume_names(api)
            .await?
            .into_iter()
            .filter(|(_, n)| n.as_deref() == Some(name.as_str()))
            .map(|(id, _)| id)
            .collect();
        if holders.len() > 1 {
            duplicates += 1;
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: {} creates of {name} won",
            won.len()
        );
        assert_eq!(
            holders.len(),
            1,
            "round {round}: volumes named {name}: {holders:?}"
        );
        let id = won[0]["id"].as_str().expect("id").to_string();
        assert_eq!(holders[0], id);
        for (s, b) in answers.iter().filter(|(s, _)| *s != 200) {
            assert_eq!(*s, 409, "round {round}: {}", String::from_utf8_lossy(b));
            let e = error(b);
            assert_eq!(e.code, "conflict");
            assert!(
                e.message.contains(&name) && e.message.contains(&id),
                "the 409 names the existing volume: {}",
                e.message
            );
        }
        let d: Value = api.get(&format!("/v1/volumes/{name}")).await?;
        assert_eq!(d["id"], id.as_str(), "describe {name}");
        delete(api, &id).await?;
    }
    eprintln!(
        "one name, {RACERS} concurrent creates, 20 rounds: {duplicates} rounds with duplicates ({:?})",
        started.elapsed()
    );
    Ok(())
}

/// (b) 8 concurrent creates that only fit once (two copies of 768 MiB on two servers of
/// 1 GiB): exactly one succeeds, the others are refused for capacity, and no server is
/// over-committed.
async fn capacity_is_never_overcommitted(api: &ApiClient) -> Result<()> {
    let started = Instant::now();
    for round in 0..5 {
        let answers = race_creates(api, r#"{"size":"768MiB","replicas":2}"#, RACERS).await?;
        let won: Vec<Value> = answers
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| serde_json::from_slice(b).expect("volume"))
            .collect();
        let servers: Vec<Value> = api.get("/v1/servers").await?;
        for s in &servers {
            assert!(
                s["allocated_bytes"].as_u64() <= s["capacity_bytes"].as_u64(),
                "round {round}: over-committed: {s}"
            );
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: {} creates fit once",
            won.len()
        );
        for (s, b) in answers.iter().filter(|(s, _)| *s != 200) {
            let e = error(b);
            assert_eq!(
                (*s, e.code.as_str()),
                (400, "insufficient_capacity"),
                "{}",
                e.message
            );
        }
        delete(api, won[0]["id"].as_str().expect("id")).await?;
    }
    eprintln!(
        "{RACERS} concurrent creates that fit once, 5 rounds: no over-commit ({:?})",
        started.elapsed()
    );
    Ok(())
}

/// (c) Names never have an id's shape; resolution never crosses; wrong JSON shapes refused.
async fn names_ids_and_bodies(c: &Cluster, api: &ApiClient) -> Result<()> {
    let create = |body: &'static str| {
        let api = api.clone();
        async move {
            api.raw(Method::POST, "/v1/volumes", Some(body.as_bytes().to_vec()))
                .await
                .expect("answered")
        }
    };
    let (s, b) = create(r#"{"size":"1MiB","replicas":1,"name":"victim"}"#).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let victim: Value = serde_json::from_slice(&b)?;
    let victim_id = victim["id"].as_str().expect("id").to_string();

    // The issue's scenario: a name `vol-<another volume's id>` is refused at create, so
    // `delete vol-<id>` can only mean that id.
    for name in [
        format!("vol-{victim_id}"),
        victim_id.clone(),
        victim_id.to_uppercase(),
        "deadbeef".to_string(),
        "DEADBEEF".into(),
        "0".into(),
        "VOL-data".into(),
    ] {
        let o = c.ctl(&[
            "volume",
            "create",
            "1MiB",
            "--replicas",
            "1",
            "--name",
            &name,
        ])?;
        assert_eq!(o.code, 5, "name {name:?} accepted: {o:?}");
        assert!(o.stderr.contains("refused"), "name {name:?}: {}", o.stderr);
        let body = format!(r#"{{"size":"1MiB","replicas":1,"name":"{name}"}}"#);
        let (s, b) = api
            .raw(Method::POST, "/v1/volumes", Some(body.into_bytes()))
            .await?;
        assert_eq!(s, 400, "name {name:?}");
        assert_eq!(error(&b).code, "bad_request");
    }
    // An id-shaped argument is an id only: an unknown one is not found, never a name.
    let o = c.ctl(&["volume", "delete", "vol-0123456789abcdef"])?;
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("no volume has the id"), "{}", o.stderr);
    // `delete <name>` deletes that volume and no other.
    let (s, b) = create(r#"{"size":"1MiB","replicas":1,"name":"data-2"}"#).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let data2: Value = serde_json::from_slice(&b)?;
    let data2_id = data2["id"].as_str().expect("id").to_string();
    let o = c.ctl(&["volume", "delete", "data-2"])?;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains(&data2_id), "{}", o.stdout);
    let d = c.describe("victim")?;
    assert_eq!(d["id"], victim_id.as_str(), "victim survives");
    let d = c.describe(&format!("vol-{victim_id}"))?;
    assert_eq!(d["id"], victim_id.as_str(), "vol-<id> is the id");
    // The name is free again once its volume is gone.
    let (s, b) = create(r#"{"size":"1MiB","replicas":1,"name":"data-2"}"#).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let again: Value = serde_json::from_slice(&b)?;
    assert_ne!(again["id"], data2_id.as_str());
    delete(api, again["id"].as_str().expect("id")).await?;

    // Bodies of the wrong JSON shape: 400 with {code, message}, nothing created.
    let before = volume_names(api).await?.len();
    for (body, needle) in [
        (r#"["1MiB", 1, "arr"]"#, "expected a JSON object"),
        (r#""1MiB""#, "expected a JSON object"),
        (
            r#"{"size":"1MiB","replicas":1,"nmae":"typo"}"#,
            "unknown field `nmae`",
        ),
        (r#"{"size":"1MiB","replicas":"one"}"#, "invalid type"),
        (r#"{"size":"1MiB","replicas":1,"name":7}"#, "invalid type"),
    ] {
        let (s, b) = api
            .raw(Method::POST, "/v1/volumes", Some(body.as_bytes().to_vec()))
            .await?;
        assert_eq!(s, 400, "{body}: {}", String::from_utf8_lossy(&b));
        let e = error(&b);
        assert_eq!(e.code, "bad_request", "{body}");
        assert!(e.message.contains(needle), "{body}: {}", e.message);
    }
    let (s, b) = api
        .raw(
            Method::POST,
            &format!("/v1/volumes/{victim_id}/attach"),
            Some(br#"["node1", "vm1"]"#.to_vec()),
        )
        .await?;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(error(&b).code, "bad_request");
    assert_eq!(volume_names(api).await?.len(), before, "nothing created");
    delete(api, &victim_id).await?;
    Ok(())
}

#[test]
fn concurrent_creates_names_ids_and_bodies() -> Result<()> {
    let t = tempfile::tempdir()?;
    let c = Cluster::up(t.path(), 2, "1GiB")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let api = admin(&c)?;
        one_name_one_volume(&api).await?;
        capacity_is_never_overcommitted(&api).await?;
        names_ids_and_bodies(&c, &api).await
    })
}
