//! Trust boundaries on the data path (docs/security.md, A1–A5), against a whole `keelctl up`
//! cluster: the storage servers themselves refuse a node certificate without a grant at every
//! epoch and for every op, a read-only node's writes (even through a keel-vhost it started by
//! hand), a detached node and a node whose writer attachment was taken over; and nothing any
//! of them sent lands (checked by content through the real attachment).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_proto::frame::checksum;
use keel_proto::{Epoch, Op, Role, Status, VolumeId};
use keel_tests::cluster::{Pki, Vhost, VhostOptions};
use keel_tests::keel_up::{connect_vmm, epoch, Cluster};
use keel_tests::vmm::*;
use keel_tests::wire::WireClient;
use serde_json::Value;

/// Every data op a node could send, and the two that only name the volume.
const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Discard,
    Op::WriteZeroes,
    Op::Flush,
    Op::Claim,
    Op::Ping,
];
/// Where the real writer put its data (sector, bytes).
const SPOTS: [(u64, usize); 3] = [(0, 4096), (2048, 65536), (100_000, 8192)];

fn vmm(socket: &Path) -> Result<TestVmm> {
    connect_vmm(
        socket,
        VmmOptions {
            io_timeout: Duration::from_secs(20),
            ..VmmOptions::default()
        },
    )
}

fn write_spots(v: &mut TestVmm, seed: u64) -> Result<()> {
    for (s, l) in SPOTS {
        let st = v.write(0, s, &pattern(seed, s, l))?;
        anyhow::ensure!(st == VIRTIO_BLK_S_OK, "write at {s}: status {st}");
    }
    anyhow::ensure!(v.flush(0)? == VIRTIO_BLK_S_OK, "flush failed");
    Ok(())
}

/// Reads every spot back through `v` and requires `pattern(seed, ...)`.
fn verify_spots(v: &mut TestVmm, seed: u64, what: &str) -> Result<()> {
    for (s, l) in SPOTS {
        let (st, d) = v.read(0, s, l)?;
        anyhow::ensure!(st == VIRTIO_BLK_S_OK, "{what}: read at {s}: status {st}");
        anyhow::ensure!(
            checksum(&d) == checksum(&pattern(seed, s, l)),
            "{what}: the data at sector {s} changed"
        );
    }
    Ok(())
}

/// The volume's id and its copies' `(role, server address)`.
fn layout(cluster: &Cluster, describe: &Value) -> Result<(VolumeId, Vec<(String, SocketAddr)>)> {
    let id: VolumeId = describe["id"]
        .as_str()
        .context("describe shows no id")?
        .parse()
        .map_err(|e| anyhow::anyhow!("volume id: {e:?}"))?;
    let servers = cluster.json(&["server", "list"])?;
    let addr_of = |server: &str| -> Result<SocketAddr> {
        servers
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == server))
            .and_then(|s| s["address"].as_str())
            .with_context(|| format!("server {server} not listed: {servers}"))?
            .parse()
            .context("server address")
    };
    let mut copies = Vec::new();
    for c in describe["copies"].as_array().context("no copies")? {
        let role = c["role"].as_str().unwrap_or_default().to_string();
        copies.push((role, addr_of(c["server"].as_str().unwrap_or_default())?));
    }
    Ok((id, copies))
}

fn primary(copies: &[(String, SocketAddr)]) -> Result<SocketAddr> {
    copies
        .iter()
        .find(|(r, _)| r == "primary")
        .map(|(_, a)| *a)
        .context("no primary copy")
}

/// Sends every op at every epoch 1..=6 as `role`/`id` to `addr`, and requires each answer to
/// be `want(epoch)` with epoch 0 (ping: `ok`, epoch 0, no payload). Offsets are the writer's spots.
fn refused_everywhere(
    pki: &Path,
    role: Role,
    id: &str,
    addr: SocketAddr,
    volume: VolumeId,
    want: impl Fn(u64) -> Status,
) -> Result<()> {
    let mut c = WireClient::connect(pki, role, id, addr)?;
    for e in 1..=6u64 {
        for op in OPS {
            for (s, _) in SPOTS {
                let r = c.probe(op, volume, Epoch(e), s * 512, 0xEE)?;
                let expect = if op == Op::Ping { Status::Ok } else { want(e) };
                anyhow::ensure!(
                    (r.status, r.epoch) == (expect, Epoch(0)) && r.payload.is_empty(),
                    "{role}/{id} {op:?} at epoch {e} to {addr}: answered {} at epoch {} with {} bytes, expected {expect} at epoch 0",
                    r.status,
                    r.epoch,
                    r.payload.len()
                );
            }
        }
    }
    Ok(())
}

/// A two-server cluster with volume `t` (two copies) attached read-write to node1/vm1, whose
/// guest (the returned VMM) wrote pattern 0xA at [`SPOTS`].
fn writer_of_t(dir: &Path) -> Result<(Cluster, TestVmm)> {
    let cluster = Cluster::up(&dir.join("keel"), 2, "4GiB")?;
    cluster.json(&["volume", "create", "64MiB", "--name", "t"])?;
    let (sock, _) = cluster.attach("t", "node1", "vm1", &[])?;
    let mut vm1 = vmm(&sock)?;
    write_spots(&mut vm1, 0xA)?;
    Ok((cluster, vm1))
}

/// A node certificate with no attachment (`keel://node/evil`, the cluster's CA) tries every
/// op at every epoch from 1 to 6 on both copies of a volume attached read-write to node1:
/// each is refused `unauthorized` with no epoch, exactly as for a volume that does not exist;
/// nothing lands (the real writer reads its data back); the daemons keep serving.
#[test]
fn a_node_without_a_grant_is_refused_at_every_epoch_and_nothing_lands() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cluster, mut vm1) = writer_of_t(dir.path())?;
    let d = cluster.describe("t")?;
    let (vol, copies) = layout(&cluster, &d)?;
    assert_eq!(copies.len(), 2, "two copies: {d}");

    let pki_dir = cluster.dir.join("pki");
    Pki {
        dir: pki_dir.clone(),
    }
    .issue(Role::Node, "evil")?;
    for (role, addr) in &copies {
        refused_everywhere(&pki_dir, Role::Node, "evil", *addr, vol, |_| {
            Status::Unauthorized
        })
        .with_context(|| format!("the {role}"))?;
        // A volume the server does not hold gets the very same answers: nothing is revealed.
        refused_everywhere(
            &pki_dir,
            Role::Node,
            "evil",
            *addr,
            VolumeId(0xdead_beef),
            |_| Status::Unauthorized,
        )?;
    }
    // Negative control: the same probe with node1's own certificate at the volume's epoch is
    // served (so the refusals above are about the grant, not about the probe).
    let mut own = WireClient::connect(&pki_dir, Role::Node, "node1", primary(&copies)?)?;
    let r = own.probe(Op::Read, vol, Epoch(epoch(&d)), 0, 0)?;
    assert_eq!(r.status, Status::Ok, "node1 reads its own volume");
    assert_eq!(checksum(&r.payload), checksum(&pattern(0xA, 0, 4096)));

    verify_spots(&mut vm1, 0xA, "after the rogue node's attempts")?;
    write_spots(&mut vm1, 0xB)?;
    verify_spots(&mut vm1, 0xB, "the writer after the rogue node's attempts")?;
    Ok(())
}

/// Registers node `id` with the controller as an admin would (no node manager runs for it:
/// the test plays its host by hand).
fn register_node(cluster: &Cluster, id: &str, socket_dir: &Path) -> Result<()> {
    let pki = cluster.dir.join("pki");
    let tls = keel_api::client_tls(
        &pki.join("ca.pem"),
        Some(&keel_proto::tls::TlsPaths::in_dir(&pki, "admin-keelctl")),
    )?;
    let api = keel_api::ApiClient::new(&cluster.url, tls, None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reg = keel_api::NodeRegistration {
        id: id.to_string(),
        socket_dir: socket_dir.display().to_string(),
    };
    let _: Value = rt.block_on(api.post("/v1/nodes", &reg))?;
    Ok(())
}

/// The servers enforce attachment modes and ends: node2 attached read-only cannot write even
/// through a keel-vhost it starts by hand without `--read-only` (and can read); once detached,
/// it is refused; node1, whose read-write attachment node2 then takes over, is refused at
/// every epoch. Nothing any of them sent lands.
#[test]
fn read_only_detached_and_taken_over_nodes_are_refused_by_the_servers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cluster, mut vm1) = writer_of_t(dir.path())?;
    let pki_dir = cluster.dir.join("pki");
    let pki = Pki {
        dir: pki_dir.clone(),
    };
    let node2_dir = dir.path().join("node2");
    std::fs::create_dir_all(&node2_dir)?;
    register_node(&cluster, "node2", &node2_dir)?;

    // node2 attached read-only; its host starts a keel-vhost that does not enforce it.
    // No node manager serves node2: the attach cannot wait for a socket.
    cluster.attach("t", "node2", "vm2", &["--read-only", "--no-wait"])?;
    let d = cluster.describe("t")?;
    let (vol, copies) = layout(&cluster, &d)?;
    let rogue_sock = node2_dir.join("rogue.sock");
    let rogue = Vhost::start(
        &pki,
        VhostOptions {
            socket: rogue_sock.clone(),
            server: primary(&copies)?,
            volume: vol.to_string(),
            size: "64MiB".into(),
            epoch: epoch(&d),
            node_id: "node2".into(),
            num_queues: 1,
            read_only: false,
            extra: Vec::new(),
        },
    )?;
    let mut vm2 = vmm(&rogue_sock)?;
    verify_spots(&mut vm2, 0xA, "node2 reading read-only")?;
    for (s, l) in SPOTS {
        let st = vm2.write(0, s, &pattern(0xD, s, l))?;
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "a read-only node's write at {s}");
    }
    let mut raw = WireClient::connect(&pki_dir, Role::Node, "node2", primary(&copies)?)?;
    // `read-only` up to the copy's epoch; above it (a newer attachment, maybe read-write,
    // whose push is on its way) the request waits: `unauthorized`. Neither writes.
    let now = epoch(&d);
    for e in 1..=6u64 {
        for op in [Op::Write, Op::Discard, Op::WriteZeroes] {
            let r = raw.probe(op, vol, Epoch(e), 0, 0xD)?;
            let want = if e <= now {
                Status::ReadOnly
            } else {
                Status::Unauthorized
            };
            assert_eq!(r.status, want, "node2 {op:?} at epoch {e} (copy at {now})");
        }
    }
    verify_spots(&mut vm1, 0xA, "after the read-only node's writes")?;

    // Detached (forced: no node manager reports for node2): refused at once, every epoch.
    let o = cluster.ctl(&[
        "volume",
        "detach",
        "t",
        "--node",
        "node2",
        "--instance",
        "vm2",
        "--force",
    ])?;
    assert_eq!(o.code, 0, "detach failed: {}", o.stderr);
    // Fenced (`stale epoch`, no epoch) at the copies' epoch and below; above it a request could
    // come from a newer attachment whose grant is on its way, and waits (`unauthorized`).
    let fenced = |now: u64| {
        move |e: u64| {
            if e <= now {
                Status::StaleEpoch
            } else {
                Status::Unauthorized
            }
        }
    };
    let e = epoch(&cluster.describe("t")?);
    for (role, addr) in &copies {
        refused_everywhere(&pki_dir, Role::Node, "node2", *addr, vol, fenced(e))
            .with_context(|| format!("detached node2 on the {role}"))?;
    }
    let (st, _) = vm2.read(0, 0, 4096)?;
    assert_eq!(st, VIRTIO_BLK_S_IOERR, "a detached node's read fails");
    drop(vm2);
    drop(rogue);

    // node2 takes the writer attachment over: node1 is refused everywhere, at every epoch.
    cluster.attach("t", "node2", "vm3", &["--force", "--no-wait"])?;
    let d = cluster.describe("t")?;
    let (_, copies) = layout(&cluster, &d)?;
    for (role, addr) in &copies {
        refused_everywhere(&pki_dir, Role::Node, "node1", *addr, vol, fenced(epoch(&d)))
            .with_context(|| format!("taken-over node1 on the {role}"))?;
    }
    let st = vm1.write(0, 0, &pattern(0xE, 0, 4096))?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "the taken-over writer's write fails"
    );
    // node2, the writer now, reads pattern A everywhere: nothing of the others landed.
    let mut w = WireClient::connect(&pki_dir, Role::Node, "node2", primary(&copies)?)?;
    for (s, l) in SPOTS {
        let r = w.call(
            Op::Read,
            vol,
            Epoch(epoch(&d)),
            s * 512,
            l as u32,
            Vec::new(),
        )?;
        assert_eq!(r.status, Status::Ok, "the new writer reads sector {s}");
        assert_eq!(
            checksum(&r.payload),
            checksum(&pattern(0xA, s, l)),
            "sector {s} changed"
        );
    }
    Ok(())
}

/// A7: a storage server whose copies lost their access lists (as after an upgrade from before
/// access lists: members files with mirror lines only) is given them again by the reconciler,
/// without an epoch change; the writer's guest stalls meanwhile, never fails.
#[test]
fn an_access_list_lost_on_a_server_is_pushed_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Long failure and primary timeouts: the primary's restart must not cause a failover here
    // (neither through its missing heartbeats nor through keel-vhost's report).
    let cluster = Cluster::up_with_args(
        &dir.path().join("keel"),
        2,
        "4GiB",
        &[
            "--failure-timeout-ms",
            "60000",
            "--primary-timeout-ms",
            "60000",
        ],
    )?;
    cluster.json(&["volume", "create", "64MiB", "--name", "t"])?;
    let (sock, _) = cluster.attach("t", "node1", "vm1", &[])?;
    let mut vm1 = vmm(&sock)?;
    write_spots(&mut vm1, 0xA)?;
    let d = cluster.describe("t")?;
    let e0 = epoch(&d);
    let primary_id = d["copies"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["role"] == "primary"))
        .and_then(|c| c["server"].as_str())
        .context("no primary")?
        .to_string();
    let name = format!("storage-{primary_id}");
    cluster.hold(&name)?;
    let old = cluster.kill9(&name)?;
    let copies_dir = cluster.dir.join("storage").join(&primary_id).join("copies");
    let mut stripped = 0;
    for e in std::fs::read_dir(&copies_dir)?.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "members") {
            continue;
        }
        let text = std::fs::read_to_string(&p)?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("node ") && !l.starts_with("primary "))
            .collect();
        anyhow::ensure!(
            kept.len() < text.lines().count(),
            "{text:?} had no access entries"
        );
        stripped += 1;
        if kept.is_empty() {
            std::fs::remove_file(&p)?;
        } else {
            std::fs::write(&p, kept.join("\n") + "\n")?;
        }
    }
    assert_eq!(stripped, 1, "one copy's list in {}", copies_dir.display());
    cluster.release(&name)?;
    cluster.wait_restart(&name, old)?;
    // The writer goes on (after a stall while the reconciler pushes the list again).
    write_spots(&mut vm1, 0xC)?;
    verify_spots(
        &mut vm1,
        0xC,
        "the writer after its primary's list was restored",
    )?;
    let d = cluster.describe("t")?;
    assert_eq!(epoch(&d), e0, "restoring an access list needs no new epoch");
    let restored = std::fs::read_dir(&copies_dir)?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "members"))
        .map(|e| std::fs::read_to_string(e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .concat();
    assert!(
        restored.contains("node node1 rw") && restored.contains(&format!("primary {primary_id}")),
        "the primary's list was not pushed again: {restored:?}"
    );
    Ok(())
}
