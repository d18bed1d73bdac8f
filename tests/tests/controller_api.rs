//! The controller's API and `keelctl` against a real cluster (`keelctl up` on loopback):
//! volume lifecycle, placement, bad input with clear errors and exit codes, authentication.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use http::Method;
use keel_api::{ApiClient, ClientError};
use keel_proto::tls::TlsPaths;
use keel_proto::{pki, Role};
use keel_tests::keel_up::{connect_vmm, socket, volume_args, Cluster};
use keel_tests::vmm::VmmOptions;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn cli_volume_lifecycle_placement_and_bad_input() -> Result<()> {
    let t = tmp();
    let c = Cluster::up(t.path(), 2, "1GiB")?;

    let servers = c.json(&["server", "list"])?;
    let servers = servers.as_array().expect("array");
    assert_eq!(servers.len(), 2, "{servers:?}");
    assert!(servers.iter().all(|s| s["health"] == "up"), "{servers:?}");
    assert_ne!(servers[0]["zone"], servers[1]["zone"]);
    assert_eq!(servers[0]["capacity_bytes"], 1u64 << 30);
    let nodes = c.json(&["node", "list"])?;
    assert_eq!(nodes[0]["id"], "node1");

    // Bad sizes: exit code 5 and a reason.
    for (size, needle) in [
        ("0", "greater than 0"),
        ("1000", "multiple of 512"),
        ("12XB", "invalid size"),
        ("2GiB", "free space"),
    ] {
        let o = c.ctl(&["volume", "create", size])?;
        assert_eq!(o.code, 5, "create {size}: {o:?}");
        assert!(o.stderr.contains(needle), "create {size}: {}", o.stderr);
    }

    // By default two copies land on distinct servers (distinct zones), primary first.
    let v = c.json(&["volume", "create", "64MiB", "--name", "data"])?;
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 16, "ids are 16 hex digits: {id}");
    assert_eq!(v["size"], 64u64 << 20);
    assert_eq!(v["state"], "available");
    let copies = v["copies"].as_array().expect("copies");
    assert_eq!(copies.len(), 2);
    assert_ne!(copies[0]["server"], copies[1]["server"]);
    assert_eq!(copies[0]["role"], "primary");
    assert_eq!(copies[1]["role"], "mirror");
    // Three copies do not fit on two servers.
    let o = c.ctl(&["volume", "create", "64MiB", "--replicas", "3"])?;
    assert_eq!(o.code, 5, "{o:?}");
    // A name may not have the form of an id.
    let o = c.ctl(&["volume", "create", "64MiB", "--name", "0123456789abcdef"])?;
    assert_eq!(o.code, 5, "{o:?}");
    // A name is unique.
    let o = c.ctl(&["volume", "create", "64MiB", "--name", "data"])?;
    assert_eq!(o.code, 4, "{o:?}");

    // Lookup by id and by name; unknown ids are 404 with the id.
    assert_eq!(c.describe(&id)?["name"], "data");
    assert_eq!(c.describe("data")?["id"], id);
    let o = c.ctl(&["volume", "describe", "00ff00ff00ff00ff"])?;
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("00ff00ff00ff00ff"), "{}", o.stderr);
    let o = c.ctl(&["volume", "describe", "no/such"])?;
    assert_eq!(o.code, 5, "{o:?}");

    // Resize: grow only.
    let o = c.ctl(&["volume", "resize", "data", "32MiB"])?;
    assert_eq!(o.code, 5, "{o:?}");
    assert!(o.stderr.contains("only grow"), "{}", o.stderr);
    let v = c.json(&["volume", "resize", "data", "128MiB"])?;
    assert_eq!(v["size"], 128u64 << 20);
    // The storage servers report the new size.
    c.wait_for(Duration::from_secs(10), "copies at the new size", || {
        let v = c.describe("data").ok()?;
        let copies = v["copies"].as_array()?;
        copies
            .iter()
            .all(|c| c["state"] == "ok" || c["state"] == "in_sync")
            .then_some(())
    })?;

    // Attach conflicts and detach.
    let a = c.json(&volume_args("attach", "data", "node1", "vm1", &[]))?;
    assert!(a["socket"]
        .as_str()
        .expect("socket")
        .ends_with(&format!("vm1-{id}.sock")));
    let epoch1 = a["epoch"].as_u64().expect("epoch");
    let o = c.ctl(&volume_args("attach", "data", "node1", "vm2", &[]))?;
    assert_eq!(o.code, 4, "{o:?}");
    assert!(
        o.stderr.contains("vm1") && o.stderr.contains("node1"),
        "{}",
        o.stderr
    );
    let ro = c.json(&volume_args(
        "attach",
        "data",
        "node1",
        "ro1",
        &["--read-only"],
    ))?;
    assert_eq!(ro["mode"], "read_only");
    // A read-only attach changes the copies' access list: E moves by one (the writer epoch
    // does not: the writer is not fenced; docs/security.md, A2).
    assert_eq!(
        ro["epoch"].as_u64(),
        Some(epoch1 + 1),
        "a read-only attach bumps the epoch once"
    );
    let o = c.ctl(&volume_args("attach", "data", "nodeX", "vm1", &[]))?;
    assert_eq!(o.code, 3, "{o:?}");
    let o = c.ctl(&["volume", "delete", "data"])?;
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.stderr.contains("detach"), "{}", o.stderr);
    for inst in ["vm1", "ro1"] {
        let o = c.ctl(&volume_args("detach", "data", "node1", inst, &[]))?;
        assert_eq!(o.code, 0, "{o:?}");
    }
    let o = c.ctl(&volume_args("detach", "data", "node1", "vm1", &[]))?;
    assert_eq!(o.code, 3, "{o:?}");

    // Delete removes every copy's file.
    let d = c.json(&["volume", "delete", "data"])?;
    assert_eq!(d["complete"], true);
    let o = c.ctl(&["volume", "describe", &id])?;
    assert_eq!(o.code, 3, "{o:?}");
    for s in ["s1", "s2"] {
        let dir = t.path().join("storage").join(s);
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(&id),
                "copy file {name} left in {}",
                dir.display()
            );
        }
    }
    assert!(c
        .json(&["volume", "list"])?
        .as_array()
        .expect("array")
        .is_empty());
    Ok(())
}

/// A volume's logical block size: 512 unless `--block-size 4096` at create, refused otherwise
/// with a clear error, shown by describe, and offered to the guest by the keel-vhost the node
/// manager starts for its attachment.
#[test]
fn block_size_is_chosen_at_create_and_reaches_the_device() -> Result<()> {
    let t = tmp();
    let c = Cluster::up(t.path(), 1, "1GiB")?;
    for bad in ["1024", "0", "8192"] {
        let o = c.ctl(&[
            "volume",
            "create",
            "64MiB",
            "--replicas",
            "1",
            "--block-size",
            bad,
        ])?;
        assert_eq!(o.code, 5, "--block-size {bad}: {o:?}");
        assert!(o.stderr.contains("512 or 4096"), "{}", o.stderr);
    }
    let v = c.json(&[
        "volume",
        "create",
        "64MiB",
        "--replicas",
        "1",
        "--name",
        "bs512",
    ])?;
    assert_eq!(v["block_size"], 512, "the default: {v}");
    let v = c.json(&[
        "volume",
        "create",
        "64MiB",
        "--replicas",
        "1",
        "--name",
        "bs4k",
        "--block-size",
        "4096",
    ])?;
    assert_eq!(v["block_size"], 4096, "{v}");
    // Whole blocks only, at create and resize.
    let o = c.ctl(&[
        "volume",
        "create",
        "66048",
        "--replicas",
        "1",
        "--block-size",
        "4096",
    ])?;
    assert_eq!(o.code, 5, "{o:?}");
    assert!(o.stderr.contains("multiple of 4096"), "{}", o.stderr);
    let o = c.ctl(&["volume", "resize", "bs4k", "67109376"])?;
    assert_eq!(o.code, 5, "{o:?}");
    assert!(o.stderr.contains("multiple of that"), "{}", o.stderr);
    let o = c.ctl(&["volume", "describe", "bs4k"])?;
    assert!(o.stdout.contains("block size: 4096"), "{}", o.stdout);
    for (name, want) in [("bs512", 512u32), ("bs4k", 4096)] {
        let a = c.json(&volume_args("attach", name, "node1", "vm1", &[]))?;
        let vmm = connect_vmm(&socket(&a)?, VmmOptions::default())?;
        let cfg = vmm.config();
        assert_eq!(cfg.blk_size, want, "{name}");
        assert_eq!(
            cfg.blk_size << cfg.physical_block_exp,
            4096,
            "{name}: 4 KiB physical blocks"
        );
    }
    Ok(())
}

fn client(c: &Cluster, cert: Option<&str>, token: Option<String>) -> Result<ApiClient> {
    let pki = c.dir.join("pki");
    let id = cert.map(|n| TlsPaths::in_dir(&pki, n));
    let tls = keel_api::client_tls(&pki.join("ca.pem"), id.as_ref())?;
    Ok(ApiClient::new(&c.url, tls, token)?)
}

async fn status(api: &ApiClient, m: Method, path: &str, body: Option<&str>) -> u16 {
    match api.raw(m, path, body.map(|b| b.as_bytes().to_vec())).await {
        Ok((s, _)) => s,
        Err(e) => panic!("{path}: {e}"),
    }
}

/// The status of `POST /v1/servers` registering a server `id` (at 127.0.0.1:1).
async fn register_status(api: &ApiClient, id: &str) -> u16 {
    let body = format!(r#"{{"id":"{id}","address":"127.0.0.1:1","zone":"z","capacity_bytes":1}}"#);
    status(api, Method::POST, "/v1/servers", Some(&body)).await
}

#[test]
fn api_authentication_roles_and_errors() -> Result<()> {
    let t = tmp();
    let c = Cluster::up(t.path(), 1, "1GiB")?;
    let pki_dir = c.dir.join("pki");
    pki::issue(&pki_dir, Role::Node, "intruder", &[])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let anon = client(&c, None, None)?;
        // The OpenAPI document and health need no credentials; everything else does.
        assert_eq!(status(&anon, Method::GET, "/openapi.json", None).await, 200);
        assert_eq!(status(&anon, Method::GET, "/v1/health", None).await, 200);
        assert_eq!(status(&anon, Method::GET, "/v1/volumes", None).await, 401);
        let e = anon
            .get::<serde_json::Value>("/v1/volumes")
            .await
            .expect_err("401");
        assert_eq!(e.code(), Some("unauthorized"));

        let bad = client(&c, None, Some("not-the-token".into()))?;
        assert_eq!(status(&bad, Method::GET, "/v1/volumes", None).await, 401);
        let token = std::fs::read_to_string(pki_dir.join("admin.token"))?
            .trim()
            .to_string();
        let op = client(&c, None, Some(token))?;
        assert_eq!(status(&op, Method::GET, "/v1/volumes", None).await, 200);

        // A node may not manage volumes, nor act as another node or register servers.
        let node = client(&c, Some("node-intruder"), None)?;
        assert_eq!(status(&node, Method::GET, "/v1/volumes", None).await, 403);
        assert_eq!(
            status(
                &node,
                Method::POST,
                "/v1/nodes/node1/heartbeat",
                Some(r#"{"attachments":[]}"#)
            )
            .await,
            403
        );
        assert_eq!(register_status(&node, "s9").await, 403);
        assert_eq!(
            status(&node, Method::GET, "/v1/nodes/node1/attachments", None).await,
            403
        );
        // A storage server may not register under another id.
        let s1 = client(&c, Some("storage-s1"), None)?;
        assert_eq!(register_status(&s1, "s2").await, 403);

        // Errors are JSON with a code; malformed bodies are 400.
        let admin = client(&c, Some("admin-keelctl"), None)?;
        let (s, body) = admin
            .raw(Method::POST, "/v1/volumes", Some(b"{not json".to_vec()))
            .await?;
        assert_eq!(s, 400);
        let body: keel_api::ErrorBody = serde_json::from_slice(&body)?;
        assert_eq!(body.code, "bad_request");
        let (s, body) = admin.raw(Method::GET, "/v1/nothing-here", None).await?;
        assert_eq!(s, 404);
        assert!(serde_json::from_slice::<keel_api::ErrorBody>(&body).is_ok());
        for (path, body) in [
            ("/v1/volumes", r#"{"size":"1GiB","replicas":0}"#),
            ("/v1/volumes", r#"{"size":-5}"#),
            (
                "/v1/volumes/abc/attach",
                r#"{"node":"node1","instance":"a b"}"#,
            ),
        ] {
            let (s, _) = admin
                .raw(Method::POST, path, Some(body.as_bytes().to_vec()))
                .await?;
            assert_eq!(s, 400, "POST {path} {body}");
        }
        // Bodies are size-limited: 413, or (when the server refuses before the client has sent
        // everything) a connection the server closed. Either way nothing was created.
        let big = vec![b' '; 70 << 10];
        match admin.raw(Method::POST, "/v1/volumes", Some(big)).await {
            Ok((s, _)) => assert_eq!(s, 413, "bodies are size-limited"),
            Err(ClientError::Http(e)) => eprintln!("oversized body cut off by the server: {e}"),
            Err(e) => panic!("oversized body: unexpected {e}"),
        }
        let vols: Vec<keel_api::VolumeInfo> = admin.get("/v1/volumes").await?;
        assert!(vols.is_empty(), "{vols:?}");

        // A certificate from another CA cannot even connect, so cannot register.
        let other = tempfile::tempdir()?;
        pki::init_ca(other.path())?;
        let rogue = pki::issue(other.path(), Role::Storage, "s1", &[])?;
        let rogue_tls = keel_api::client_tls(&pki_dir.join("ca.pem"), Some(&rogue))?;
        let rogue = ApiClient::new(&c.url, Arc::clone(&rogue_tls), None)?;
        let r = rogue
            .post::<_, serde_json::Value>(
                "/v1/servers",
                &keel_api::ServerRegistration {
                    id: "s1".into(),
                    address: "127.0.0.1:9".into(),
                    zone: "z".into(),
                    capacity_bytes: 1 << 30,
                },
            )
            .await;
        assert!(
            matches!(r, Err(ClientError::Tls { .. } | ClientError::Http(_))),
            "a foreign certificate must fail the handshake: {r:?}"
        );
        let servers: Vec<keel_api::ServerInfo> = admin.get("/v1/servers").await?;
        assert!(
            servers.iter().all(|s| s.address != "127.0.0.1:9"),
            "the rogue registration must not land"
        );
        anyhow::Ok(())
    })
}
