//! A whole cluster started by `keelctl up` in a temporary directory, driven with `keelctl`,
//! with the Rust test VMM as the guest: epoch fencing of a forced takeover and of a forced
//! detach, and daemons killed with SIGKILL under a connected guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::cluster::bin;
use keel_tests::keel_up::{
    alive, attachments, epoch, kill, socket, terminate, volume_args, wait_until, Cluster, Out,
};
use keel_tests::vmm::*;
use keel_tests::writer::*;
use serde_json::Value;

/// The pid of the keel-vhost serving `socket`, from the node manager's records in
/// `state_dir`, waiting up to 10 s for the record.
fn wait_vhost_pid(state_dir: &Path, socket: &Path) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match vhost_pid(state_dir, socket) {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The pid of the keel-vhost serving `socket`, from the node manager's records in `state_dir`.
fn vhost_pid(state_dir: &Path, socket: &Path) -> Result<i32> {
    for e in std::fs::read_dir(state_dir)?.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&std::fs::read(&p)?) else {
            continue;
        };
        if v["spec"]["socket"].as_str() == socket.to_str() {
            return v["pid"]
                .as_i64()
                .map(|p| p as i32)
                .with_context(|| format!("{} has no pid", p.display()));
        }
    }
    bail!(
        "no attachment record for {} in {}",
        socket.display(),
        state_dir.display()
    )
}

/// Requires `o` to be a refusal as a conflict (exit 4) whose message names each of `needles`.
fn assert_conflict(o: &Out, what: &str, needles: &[&str]) {
    assert_eq!(
        o.code, 4,
        "{what} must be a conflict (exit 4); stdout {:?} stderr {:?}",
        o.stdout, o.stderr
    );
    for n in needles {
        assert!(
            o.stderr.contains(n),
            "the refusal of {what} must name {n:?}: {:?}",
            o.stderr
        );
    }
}

/// A second node manager, run by hand next to the cluster's own; SIGTERM on drop.
struct NodeManager {
    child: Child,
    log: PathBuf,
}

impl NodeManager {
    fn start(c: &Cluster, id: &str, dir: &Path) -> Result<NodeManager> {
        let pki = c.dir.join("pki");
        let out = Command::new(bin("keelctl")?)
            .args(["pki", "issue", "--role", "node", "--id", id, "--pki-dir"])
            .arg(&pki)
            .output()?;
        ensure!(
            out.status.success(),
            "keelctl pki issue for {id} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir_all(dir)?;
        let log = dir.join("node.log");
        let f = std::fs::File::create(&log)?;
        let child = Command::new(bin("keelctl")?)
            .args(["daemon", "node", "--controller", &c.url, "--id", id])
            .arg("--pki-dir")
            .arg(&pki)
            .arg("--socket-dir")
            .arg(dir.join("sockets"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting a second node manager")?;
        Ok(NodeManager { child, log })
    }

    fn log_grep(&self, needle: &str) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM and wait (20 s); returns whether it exited with success.
    fn stop(&mut self) -> Result<bool> {
        terminate(
            &mut self.child,
            Duration::from_secs(20),
            Duration::from_millis(50),
            "the second node manager",
        )
    }
}

impl Drop for NodeManager {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
    }
}

/// Sends SIGCONT to a process on drop, so a failing test never leaves a daemon stopped.
struct ContOnDrop(i32);

impl Drop for ContOnDrop {
    fn drop(&mut self) {
        kill(self.0, libc::SIGCONT);
    }
}

#[test]
fn forced_takeover_fences_the_old_writer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir2 = tempfile::tempdir()?;
    // Two servers: the volume gets the default two copies, and both must fence the old writer.
    let cluster = Cluster::up(&dir.path().join("keel"), 2, CAPACITY)?;
    cluster.json(&["volume", "create", "64MiB", "--name", "t"])?;
    let (sock1, _) = cluster.attach("t", "node1", "vm1", &[])?;
    let mut old = connect(&sock1, Duration::from_secs(10))?;
    // Pattern A at sector 0 and elsewhere.
    const A: u64 = 0xA;
    let spots = [(0u64, 4096usize), (2048, 65536), (100_000, 8192)];
    for (s, l) in spots {
        write_ok(&mut old, s, l, A)?;
    }
    flush_ok(&mut old)?;
    let before = cluster.describe("t")?;
    let e0 = epoch(&before);
    assert_eq!(attachments(&before), [("node1".into(), "vm1".into())]);

    // A second node manager, node2.
    let mut node2 = NodeManager::start(&cluster, "node2", dir2.path())?;
    cluster.wait_for(Duration::from_secs(30), "node2 to be up", || {
        let nodes = cluster.json(&["node", "list"]).ok()?;
        nodes
            .as_array()?
            .iter()
            .any(|n| n["id"] == "node2" && n["health"] == "up")
            .then_some(())
    })?;

    // node1's manager stops hearing anything; its keel-vhost keeps serving the old VMM.
    let node1_pid = cluster.pid("node")?;
    let old_vhost = wait_vhost_pid(&cluster.dir.join("node"), &sock1)?;
    kill(node1_pid, libc::SIGSTOP);
    let cont = ContOnDrop(node1_pid);

    let o = cluster.ctl(&volume_args("attach", "t", "node2", "vm2", &[]))?;
    assert_conflict(
        &o,
        "attach over a writer without --force",
        &["node1", "vm1"],
    );
    assert_eq!(
        epoch(&cluster.describe("t")?),
        e0,
        "a refused attach bumped the epoch"
    );

    let o = cluster.ctl(&volume_args(
        "attach",
        "t",
        "node2",
        "vm2",
        &["--force", "-o", "json"],
    ))?;
    assert_eq!(o.code, 0, "forced attach failed: {}", o.stderr);
    let a: Value = serde_json::from_str(&o.stdout)?;
    let sock2 = socket(&a)?;
    assert!(
        sock2.starts_with(std::fs::canonicalize(dir2.path())?),
        "vm2's socket {} is not in node2's socket directory",
        sock2.display()
    );
    let after = cluster.describe("t")?;
    assert!(
        epoch(&after) > e0,
        "forced takeover must bump the epoch: {e0} -> {}",
        epoch(&after)
    );
    assert_eq!(a["epoch"].as_u64(), Some(epoch(&after)));
    assert_eq!(attachments(&after), [("node2".into(), "vm2".into())]);
    assert_eq!(
        after["copies"][0]["state"], "ok",
        "the new epoch must have reached the copy before the API answered: {after}"
    );

    // The old writer is fenced by the storage server: its write fails and never lands.
    const B: u64 = 0xB;
    let st = old.write(0, 0, &pattern(B, 0, 4096))?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "the fenced writer's write must fail with IOERR"
    );
    let (st, _) = old.read(0, 2048, 4096)?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "the fenced writer's read must fail with IOERR"
    );
    assert!(
        alive(old_vhost),
        "node1's keel-vhost should still run (its manager is stopped)"
    );

    // The new writer sees A (B never landed), and writes.
    let mut new = connect(&sock2, Duration::from_secs(10))?;
    for (s, l) in spots {
        verify(&mut new, s, l, A).context("the new writer reading pattern A")?;
    }
    const C: u64 = 0xC;
    write_ok(&mut new, 0, 4096, C)?;
    flush_ok(&mut new)?;
    verify(&mut new, 0, 4096, C)?;

    // node1's manager wakes up and learns that vm1 is gone while its guest is still connected:
    // it revokes the attachment (keel-vhost keeps running and fails every request, so the
    // guest sees errors instead of a hang) and stops it once the guest lets go.
    drop(cont);
    let control = cluster.dir.join("node").join(format!(
        "vm1-{}.control",
        after["id"].as_str().unwrap_or_default()
    ));
    wait_until(Duration::from_secs(20), "node1 to revoke vm1", || {
        std::fs::read_to_string(&control)
            .ok()
            .filter(|c| c.contains("\"revoked\":true"))
            .map(|_| ())
    })?;
    let st = old.write(0, 0, &pattern(B, 0, 4096))?;
    assert_eq!(st, VIRTIO_BLK_S_IOERR, "a revoked attachment fails writes");
    assert!(
        alive(old_vhost),
        "keel-vhost must outlive the revocation while its guest is connected"
    );
    drop(old);
    wait_until(
        Duration::from_secs(20),
        "node1 to stop vm1's keel-vhost once its guest left",
        || (!alive(old_vhost) && !sock1.exists()).then_some(()),
    )
    .with_context(|| {
        format!(
            "vhost pid {old_vhost} alive: {}, socket exists: {}; node1 log:\n{}",
            alive(old_vhost),
            sock1.exists(),
            cluster.log_grep("node1", "attachment", 10)
        )
    })?;
    assert!(
        vhost_pid(&cluster.dir.join("node"), &sock1).is_err(),
        "node1 still records vm1's attachment"
    );
    // Still the new writer's data.
    verify(&mut new, 0, 4096, C)?;
    verify(&mut new, 2048, 65536, A)?;
    drop(new);

    let vhost2 = wait_vhost_pid(&dir2.path().join("state"), &sock2)?;
    assert!(
        node2.stop()?,
        "node2's manager did not exit cleanly:\n{}",
        node2.log_grep("")
    );
    assert!(
        !alive(vhost2),
        "node2's manager left vm2's keel-vhost running"
    );
    assert!(!sock2.exists(), "node2's manager left vm2's socket behind");
    Ok(())
}

#[test]
fn detach_refuses_a_connected_guest_unless_forced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(&dir.path().join("keel"), 1, CAPACITY)?;
    cluster.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        "det",
        "--replicas",
        "1",
    ])?;
    let (sock, _) = cluster.attach("det", "node1", "vm1", &[])?;
    let vhost = wait_vhost_pid(&cluster.dir.join("node"), &sock)?;
    let mut vmm = connect(&sock, Duration::from_secs(10))?;
    write_ok(&mut vmm, 8, 4096, 1)?;
    flush_ok(&mut vmm)?;

    // keel-vhost's status file -> the node's heartbeat -> the controller.
    let t = Instant::now();
    cluster.wait_connected("det", true, Duration::from_secs(10))?;
    eprintln!("controller saw the guest connected after {:?}", t.elapsed());
    let e0 = epoch(&cluster.describe("det")?);

    let o = cluster.ctl(&volume_args("detach", "det", "node1", "vm1", &[]))?;
    assert_conflict(&o, "detaching a connected guest", &["connected"]);
    let v = cluster.describe("det")?;
    assert_eq!(attachments(&v), [("node1".into(), "vm1".into())]);
    assert_eq!(epoch(&v), e0);
    // The guest still works.
    verify(&mut vmm, 8, 4096, 1)?;

    let o = cluster.ctl(&volume_args("detach", "det", "node1", "vm1", &["--force"]))?;
    assert_eq!(o.code, 0, "forced detach failed: {}", o.stderr);
    let v = cluster.describe("det")?;
    assert!(
        epoch(&v) > e0,
        "a forced detach of a writer must bump the epoch: {e0} -> {}",
        epoch(&v)
    );
    assert!(attachments(&v).is_empty(), "still attached: {v}");
    assert_eq!(v["state"], "available");

    // The guest's next write fails with an I/O error (fenced, then revoked by the node): it
    // never hangs. keel-vhost stays until the guest lets go.
    let st = vmm.write(0, 8, &pattern(2, 8, 4096))?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "a write after a forced detach must fail"
    );
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let (st, _) = vmm.read(0, 8, 4096)?;
        assert_eq!(
            st, VIRTIO_BLK_S_IOERR,
            "a read after a forced detach must fail"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        sock.exists() && alive(vhost),
        "keel-vhost must serve errors while the guest is connected"
    );
    drop(vmm);
    wait_until(Duration::from_secs(20), "the socket to disappear", || {
        (!sock.exists() && !alive(vhost)).then_some(())
    })
    .with_context(|| {
        format!(
            "socket exists: {}, keel-vhost alive: {}; node log:\n{}",
            sock.exists(),
            alive(vhost),
            cluster.log_grep("node1", "attachment", 10)
        )
    })?;

    // The data written before the detach is there for the next attachment.
    let (sock, _) = cluster.attach("det", "node1", "vm2", &[])?;
    let mut vmm = connect(&sock, Duration::from_secs(10))?;
    verify(&mut vmm, 8, 4096, 1)?;
    Ok(())
}

#[test]
fn daemons_survive_kill9_and_the_cluster_restarts_with_its_data() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("keel");
    let mut cluster = Cluster::up(&dir, 2, CAPACITY)?;
    let created = cluster.json(&["volume", "create", "256MiB", "--name", "k"])?;
    let id = created["id"]
        .as_str()
        .context("create printed no id")?
        .to_string();
    let (sock, _) = cluster.attach("k", "node1", "vm1", &[])?;
    // Requests stall (not fail) while a storage server restarts: a long completion timeout.
    let mut vmm = connect(&sock, Duration::from_secs(90))?;
    let mut data = Written(Vec::new());
    // 4 MiB in 256 KiB writes, each sector's content a function of (seed, sector).
    for i in 0..16u64 {
        data.write(&mut vmm, i * 512, 256 << 10, 100)?;
    }
    flush_ok(&mut vmm)?;
    data.verify_all(&mut vmm)?;
    let v0 = cluster.describe("k")?;
    let e0 = epoch(&v0);

    // 1. kill -9 the node manager: its keel-vhost keeps running and is adopted.
    let state = dir.join("node");
    let vhost = wait_vhost_pid(&state, &sock)?;
    let new_node = cluster.kill9_and_wait_restart("node")?;
    cluster
        .wait_log("adopted a running keel-vhost", Duration::from_secs(30))
        .context("the restarted node manager did not adopt keel-vhost")?;
    assert!(alive(vhost), "keel-vhost died with its node manager");
    assert_eq!(
        vhost_pid(&state, &sock)?,
        vhost,
        "the restarted node manager (pid {new_node}) replaced keel-vhost instead of adopting it"
    );
    data.write(&mut vmm, 20_000, 64 << 10, 101)?;
    flush_ok(&mut vmm)?;
    data.verify_all(&mut vmm)?;
    // Once the restarted manager registered (its first look at its attachments follows at
    // once), it still runs the same keel-vhost: it started no second one.
    let count = |needle: &str| cluster.log_grep("node1", needle, 100).lines().count();
    cluster.wait_for(
        Duration::from_secs(30),
        "the restarted node manager to register",
        || (count("registered with the controller") >= 2).then_some(()),
    )?;
    data.write(&mut vmm, 24_000, 64 << 10, 105)?;
    data.verify_all(&mut vmm)?;
    assert_eq!(
        count("serving attachment"),
        1,
        "keel-vhost was started again:\n{}",
        cluster.log_grep("node1", "attachment", 10)
    );
    assert_eq!(vhost_pid(&state, &sock)?, vhost);
    assert!(alive(vhost));

    // 2. kill -9 the primary's storage server: I/O issued meanwhile stalls, then completes.
    let server = v0["copies"][0]["server"]
        .as_str()
        .context("describe shows no copy")?
        .to_string();
    let name = format!("storage-{server}");
    let old = cluster.kill9(&name)?;
    let t = Instant::now();
    data.write(&mut vmm, 30_000, 128 << 10, 102)
        .context("a write issued while the storage server was down")?;
    let stalled = t.elapsed();
    // It could only complete on the restarted server (which writes its pid file first).
    let new = cluster.pid(&name)?;
    assert_ne!(
        new, old,
        "the write completed although {name} was not restarted"
    );
    assert!(
        alive(new),
        "the restarted {name} (pid {new}) is not running"
    );
    eprintln!("write during the storage restart completed after {stalled:?}; {name} is pid {new}");
    flush_ok(&mut vmm)?;
    data.write(&mut vmm, 40_000, 64 << 10, 103)?;
    data.verify_all(&mut vmm)?;

    // 3. kill -9 the controller: restarted, with the volume as it was.
    cluster.kill9_and_wait_restart("controller")?;
    let v = cluster.wait_for(Duration::from_secs(30), "the restarted controller", || {
        cluster.describe("k").ok()
    })?;
    assert_eq!(v["id"], id.as_str());
    assert_eq!(
        epoch(&v),
        e0,
        "the epoch changed across a controller restart"
    );
    assert_eq!(attachments(&v), [("node1".into(), "vm1".into())]);
    assert_eq!(vhost_pid(&state, &sock)?, vhost);
    // The restarted controller knows nothing of the guest until the node's next heartbeat:
    // a detach meanwhile must not take the disk from the connected guest.
    let o = cluster.wait_for(
        Duration::from_secs(15),
        "the node to report to the restarted controller",
        || {
            let o = cluster
                .ctl(&volume_args("detach", "k", "node1", "vm1", &[]))
                .ok()?;
            (o.code != 7).then_some(o)
        },
    )?;
    assert_conflict(
        &o,
        "a detach right after a controller restart, while the guest is connected,",
        &["connected"],
    );
    let v = cluster.describe("k")?;
    assert_eq!(attachments(&v), [("node1".into(), "vm1".into())]);
    assert_eq!(v["attachments"][0]["connected"], true);
    data.write(&mut vmm, 50_000, 64 << 10, 104)?;
    flush_ok(&mut vmm)?;
    data.verify_all(&mut vmm)?;

    // 4. The guest leaves; detach (once the controller hears it left); stop the cluster.
    drop(vmm);
    cluster.wait_connected("k", false, Duration::from_secs(15))?;
    cluster.detach_when_disconnected("k", "node1", "vm1", Duration::from_secs(15))?;
    wait_until(Duration::from_secs(20), "vm1's keel-vhost to stop", || {
        (!alive(vhost) && !sock.exists()).then_some(())
    })?;
    assert_eq!(
        epoch(&cluster.describe("k")?),
        e0 + 1,
        "a clean detach changes the copies' access list: the epoch moves once"
    );

    let mut pids = Vec::new();
    for e in std::fs::read_dir(dir.join("run"))?.flatten() {
        let pid: i32 = std::fs::read_to_string(e.path())?.trim().parse()?;
        pids.push((e.path(), pid));
    }
    assert!(pids.len() >= 4, "pid files: {pids:?}");
    assert!(cluster.stop()?, "keelctl up did not exit successfully");
    for (path, pid) in pids {
        assert!(
            !alive(pid),
            "{} (pid {pid}) still runs after the cluster stopped",
            path.display()
        );
    }
    let stale: Vec<_> = std::fs::read_dir(dir.join("run"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        stale.is_empty(),
        "pid files left after a clean stop: {stale:?}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.join("sockets"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "sockets left behind: {left:?}");
    drop(cluster);

    // 5. The same directory again: the volume and its data are there.
    let cluster = Cluster::up(&dir, 2, CAPACITY)?;
    let list = cluster.json(&["volume", "list"])?;
    let vols = list.as_array().context("volume list is not a list")?;
    assert_eq!(vols.len(), 1, "{list}");
    assert_eq!(vols[0]["id"], id.as_str());
    assert_eq!(vols[0]["name"], "k");
    let (sock, _) = cluster.attach("k", "node1", "vm9", &[])?;
    let mut vmm = connect(&sock, Duration::from_secs(30))?;
    data.verify_all(&mut vmm)?;
    Ok(())
}

/// `(node, instance, mode)` of each attachment, sorted.
fn attachment_modes(v: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = v["attachments"]
        .as_array()
        .expect("describe shows attachments")
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
            (s("node"), s("instance"), s("mode"))
        })
        .collect();
    out.sort();
    out
}

/// The `epoch` field of one of keel-vhost's JSON files (control file or status file).
fn file_epoch(path: &Path) -> Option<u64> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["epoch"].as_u64()
}

#[test]
fn read_only_attachments_follow_epoch_changes() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(&dir.path().join("keel"), 1, CAPACITY)?;
    let created = cluster.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        "ro",
        "--replicas",
        "1",
    ])?;
    let id = created["id"]
        .as_str()
        .context("create printed no id")?
        .to_string();
    let state = cluster.dir.join("node");

    // The writer vm1 writes pattern A.
    let (sock1, _) = cluster.attach("ro", "node1", "vm1", &[])?;
    let mut vm1 = connect(&sock1, Duration::from_secs(10))?;
    const A: u64 = 0xA;
    const B: u64 = 0xB;
    let spots = [(0u64, 4096usize), (2048, 65536), (100_000, 8192)];
    for (s, l) in spots {
        write_ok(&mut vm1, s, l, A)?;
    }
    flush_ok(&mut vm1)?;
    let e0 = epoch(&cluster.describe("ro")?);

    // A read-only attachment on the same node: the epoch moves once (the copies' access list
    // changes; the writer epoch does not, so vm1 is not fenced).
    let (ro_sock, a) = cluster.attach("ro", "node1", "ro1", &["--read-only"])?;
    assert_eq!(
        ro_sock.file_name().and_then(|n| n.to_str()),
        Some(format!("ro1-{id}.sock").as_str()),
        "unexpected socket name {}",
        ro_sock.display()
    );
    let v = cluster.describe("ro")?;
    assert_eq!(epoch(&v), e0 + 1, "a read-only attach moves the epoch once");
    assert_eq!(a["epoch"].as_u64(), Some(e0 + 1));
    write_ok(&mut vm1, 2048, 65536, A).context("the writer after a read-only attach")?;
    // Attachments carry the writer epoch, e0 still.
    assert_eq!(
        attachment_modes(&v),
        [
            ("node1".into(), "ro1".into(), "read_only".into()),
            ("node1".into(), "vm1".into(), "read_write".into()),
        ]
    );
    let control = state.join(format!("ro1-{id}.control"));
    let status = state.join(format!("ro1-{id}.status"));
    let ro_vhost = wait_vhost_pid(&state, &ro_sock)?;
    // Reads that wait for a new epoch stall: a completion timeout well above the stall.
    let mut ro = connect(&ro_sock, Duration::from_secs(30))?;
    assert!(
        ro.has_feature(VIRTIO_BLK_F_RO),
        "a read-only attachment must offer VIRTIO_BLK_F_RO (features {:#x})",
        ro.features()
    );
    for (s, l) in spots {
        verify(&mut ro, s, l, A).context("ro1 reading pattern A")?;
    }
    assert_eq!(file_epoch(&control), Some(e0), "{}", control.display());
    assert_eq!(file_epoch(&status), Some(e0), "{}", status.display());
    // keel-vhost refuses writes on a read-only disk itself (the request parser): IOERR.
    let st = ro.write(0, 0, &pattern(B, 0, 4096))?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "a write to a read-only disk must fail with IOERR"
    );

    // Freeze the node manager, so ro1's keel-vhost cannot learn the new epoch yet (and vm1's
    // keel-vhost keeps serving the old writer).
    let node_pid = cluster.pid("node")?;
    kill(node_pid, libc::SIGSTOP);
    let cont = ContOnDrop(node_pid);

    // Forced takeover by vm2: the epoch moves on; ro1 stays attached.
    // The node manager is frozen: the attach cannot wait for vm2's socket.
    let (sock2, a) = cluster.attach("ro", "node1", "vm2", &["--force", "--no-wait"])?;
    let v = cluster.describe("ro")?;
    let e1 = epoch(&v);
    assert!(
        e1 > e0,
        "a forced takeover must bump the epoch: {e0} -> {e1}"
    );
    assert_eq!(a["epoch"].as_u64(), Some(e1));
    assert_eq!(
        attachment_modes(&v),
        [
            ("node1".into(), "ro1".into(), "read_only".into()),
            ("node1".into(), "vm2".into(), "read_write".into()),
        ]
    );

    // The old writer is fenced by the storage server.
    let st = vm1.write(0, 0, &pattern(B, 0, 4096))?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "the fenced writer's write must fail with IOERR"
    );

    // ro1's read carries the old epoch: it stalls (not fails) until the node manager, woken
    // up, rewrites the control file and SIGHUPs ro1's keel-vhost.
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let at = Instant::now();
        drop(cont);
        at
    });
    let t = Instant::now();
    let r = verify(&mut ro, 2048, 65536, A);
    let done = Instant::now();
    let resumed = waker.join().expect("the SIGCONT thread panicked");
    r.context("ro1 reading pattern A across the epoch change")?;
    assert!(
        done > resumed,
        "ro1's read completed {:?} after it was issued, before the node manager was resumed \
         ({:?}): it cannot have carried the new epoch",
        done - t,
        resumed - t
    );
    eprintln!(
        "ro1's read stalled {:?} (node manager resumed after {:?})",
        done - t,
        resumed - t
    );
    for (s, l) in spots {
        verify(&mut ro, s, l, A).context("ro1 reading pattern A after the epoch change")?;
    }
    wait_until(
        Duration::from_secs(10),
        "ro1's control and status files to show the new epoch",
        || (file_epoch(&control) == Some(e1) && file_epoch(&status) == Some(e1)).then_some(()),
    )
    .with_context(|| {
        format!(
            "control {:?}, status {:?}; node log:\n{}",
            std::fs::read_to_string(&control),
            std::fs::read_to_string(&status),
            cluster.log_grep("node1", "attachment", 10)
        )
    })?;
    assert_eq!(
        vhost_pid(&state, &ro_sock)?,
        ro_vhost,
        "ro1's keel-vhost was restarted instead of told the new epoch"
    );
    assert!(alive(ro_vhost));
    let st = ro.write(0, 0, &pattern(B, 0, 4096))?;
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "a write to a read-only disk must fail with IOERR after the epoch change too"
    );

    // vm1's guest lets go; the node stops vm1's keel-vhost. vm2 sees A (vm1's fenced write
    // never landed), writes B, and ro1 reads B.
    drop(vm1);
    wait_until(Duration::from_secs(20), "vm1's socket to disappear", || {
        (!sock1.exists()).then_some(())
    })?;
    let mut vm2 = connect(&sock2, Duration::from_secs(10))?;
    for (s, l) in spots {
        verify(&mut vm2, s, l, A).context("vm2 reading pattern A")?;
    }
    for (s, l) in spots {
        write_ok(&mut vm2, s, l, B)?;
    }
    flush_ok(&mut vm2)?;
    for (s, l) in spots {
        verify(&mut ro, s, l, B).context("ro1 reading vm2's pattern B")?;
    }

    // A forced detach of the writer bumps the epoch too; ro1 follows without any freezing.
    drop(vm2);
    let o = cluster.ctl(&volume_args("detach", "ro", "node1", "vm2", &["--force"]))?;
    assert_eq!(o.code, 0, "forced detach of vm2 failed: {}", o.stderr);
    let e2 = epoch(&cluster.describe("ro")?);
    assert!(e2 > e1, "a forced detach of the writer must bump the epoch");
    let t = Instant::now();
    verify(&mut ro, 0, 4096, B).context("ro1 reading B after the forced detach")?;
    eprintln!("ro1's read after the forced detach took {:?}", t.elapsed());
    wait_until(
        Duration::from_secs(10),
        "ro1's files to show the epoch of the forced detach",
        || (file_epoch(&control) == Some(e2) && file_epoch(&status) == Some(e2)).then_some(()),
    )?;
    for (s, l) in spots {
        verify(&mut ro, s, l, B)?;
    }

    // ro1's guest leaves; detach it (once the controller has heard it left).
    drop(ro);
    cluster.detach_when_disconnected("ro", "node1", "ro1", Duration::from_secs(15))?;
    let v = cluster.describe("ro")?;
    assert!(attachments(&v).is_empty(), "still attached: {v}");
    assert_eq!(
        epoch(&v),
        e2 + 1,
        "detaching a reader changes the access list: the epoch moves once"
    );
    wait_until(
        Duration::from_secs(20),
        "ro1's socket to disappear and its keel-vhost to stop",
        || (!ro_sock.exists() && !alive(ro_vhost)).then_some(()),
    )
    .with_context(|| {
        format!(
            "socket exists: {}, keel-vhost alive: {}; node log:\n{}",
            ro_sock.exists(),
            alive(ro_vhost),
            cluster.log_grep("node1", "attachment", 10)
        )
    })?;
    assert!(
        !control.exists() && !status.exists(),
        "ro1's control or status file was left behind"
    );
    eprintln!(
        "read_only_attachments_follow_epoch_changes took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Stops (SIGSTOP) a storage server until the guard is dropped.
fn hang(cluster: &Cluster, server: &str) -> Result<ContOnDrop> {
    let name = format!("storage-{server}");
    cluster.signal(&name, libc::SIGSTOP)?;
    Ok(ContOnDrop(cluster.pid(&name)?))
}

/// Two copies: the mirror's server hangs under a writer, the primary has the controller drop
/// it from the in-sync set at a new epoch (docs/replication.md, R5), the writer sees no error;
/// when the server is back the mirror is rebuilt while writes go on (R7), rejoins, and — made
/// primary by hanging the other server — serves every acknowledged write.
#[test]
fn a_failed_mirror_is_dropped_and_writes_continue() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(&dir.path().join("keel"), 2, CAPACITY)?;
    let (_, mirror_server, mut vmm) = two_copies(&cluster, "two")?;
    let e0 = epoch(&cluster.describe("two")?);
    let mut written = Written(Vec::new());
    for i in 0..32u64 {
        written.write(&mut vmm, i * 64, 8192, 100 + i)?;
    }
    flush_ok(&mut vmm)?;

    // The mirror's server hangs (SIGSTOP) for longer than the replication timeout: the
    // primary's next write cannot reach it.
    let cont = hang(&cluster, &mirror_server)?;
    for i in 32..64u64 {
        written.write(&mut vmm, i * 64, 8192, 100 + i)?;
    }
    flush_ok(&mut vmm)?;
    let v = cluster.describe("two")?;
    ensure!(
        epoch(&v) > e0,
        "dropping the mirror must bump the epoch: {v}"
    );
    ensure!(
        copies(&v)
            .iter()
            .any(|x| x.0 == mirror_server && x.1 == "mirror" && x.2 == "stale"),
        "the dropped mirror must show stale: {v}"
    );
    written.verify_all(&mut vmm)?;
    drop(cont);
    // Back: the controller has the primary rebuild it (R7) while the writer goes on, and it
    // joins the in-sync set again at a new epoch.
    let e1 = epoch(&cluster.describe("two")?);
    let mut i = 64u64;
    let t = Instant::now();
    loop {
        written.write(&mut vmm, (i % 256) * 64, 8192, 100 + i)?;
        i += 1;
        let v = cluster.describe("two")?;
        if copies(&v)
            .iter()
            .any(|x| x.0 == mirror_server && x.1 == "mirror" && x.2 == "in_sync")
        {
            ensure!(epoch(&v) > e1, "rejoining must bump the epoch: {v}");
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the mirror was not rebuilt within 60 s: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("mirror rebuilt and back in sync after {:?}", t.elapsed());
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;

    // The rebuilt copy holds everything: make it the primary (hang the current one) and read
    // every acknowledged write back from it.
    let primary_server = copies(&cluster.describe("two")?)
        .into_iter()
        .find(|c| c.1 == "primary")
        .map(|c| c.0)
        .context("no primary")?;
    let pcont = hang(&cluster, &primary_server)?;
    written.write(&mut vmm, 300 * 64, 8192, 4242)?;
    flush_ok(&mut vmm)?;
    let v = cluster.describe("two")?;
    ensure!(
        copies(&v)
            .iter()
            .any(|x| x.0 == mirror_server && x.1 == "primary"),
        "the rebuilt mirror must have been promoted: {v}"
    );
    written.verify_all(&mut vmm)?;
    drop(pcont);
    Ok(())
}

/// R6: the primary's server hangs (SIGSTOP) for longer than the failure timeout under a
/// writer: the controller promotes the in-sync mirror at a new epoch, the node points
/// keel-vhost at it, and the write that was in flight completes there — a stall, no error.
/// Every acknowledged write reads back; the old primary, resumed, is a stale mirror.
#[test]
fn a_hung_primary_is_replaced_by_its_mirror_without_guest_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(&dir.path().join("keel"), 2, CAPACITY)?;
    let (primary, _, mut vmm) = two_copies(&cluster, "fo")?;
    let e0 = epoch(&cluster.describe("fo")?);
    let mut written = Written(Vec::new());
    for i in 0..16u64 {
        written.write(&mut vmm, i * 128, 16384, 500 + i)?;
    }
    flush_ok(&mut vmm)?;

    let cont = hang(&cluster, &primary)?;
    let t = Instant::now();
    written.write(&mut vmm, 16 * 128, 16384, 999)?;
    let stall = t.elapsed();
    eprintln!("guest-visible stall after SIGSTOP of the primary: {stall:?}");
    flush_ok(&mut vmm)?;
    let v = cluster.describe("fo")?;
    let c = copies(&v);
    ensure!(epoch(&v) > e0, "promotion must bump the epoch: {v}");
    ensure!(
        c.iter().any(|x| x.0 != primary && x.1 == "primary"),
        "the mirror must be the primary now: {v}"
    );
    ensure!(
        c.iter()
            .any(|x| x.0 == primary && x.1 == "mirror" && x.2 == "stale"),
        "the old primary must be a stale mirror: {v}"
    );
    written.verify_all(&mut vmm)?;

    // The old primary comes back: it stays out of the way (stale mirror), the writer goes on.
    drop(cont);
    for i in 17..24u64 {
        written.write(&mut vmm, i * 128, 16384, 500 + i)?;
    }
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;
    // Its copy is rebuilt from the new primary (R7) and rejoins the in-sync set.
    cluster.wait_for(
        Duration::from_secs(60),
        "the old primary to be rebuilt",
        || {
            copies(&cluster.describe("fo").ok()?)
                .iter()
                .any(|x| x.0 == primary && x.1 == "mirror" && x.2 == "in_sync")
                .then_some(())
        },
    )?;
    written.verify_all(&mut vmm)?;
    Ok(())
}

/// The primary's server is killed (SIGKILL) under a writer: `keelctl up` restarts it within
/// about a second. keel-vhost resends to it once it is back, or — when keel-vhost found it
/// unanswered for its primary timeout first and the controller's own probe failed too — to the
/// promoted mirror; either way the write in flight completes, no error, every acknowledged
/// write reads back, and both copies end in sync.
#[test]
fn a_killed_primary_restarts_under_a_writer_without_guest_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(&dir.path().join("keel"), 2, CAPACITY)?;
    let (primary, _, mut vmm) = two_copies(&cluster, "kl")?;
    let mut written = Written(Vec::new());
    for i in 0..16u64 {
        written.write(&mut vmm, i * 128, 16384, 700 + i)?;
    }
    flush_ok(&mut vmm)?;
    let name = format!("storage-{primary}");
    let old = cluster.kill9(&name)?;
    let t = Instant::now();
    written.write(&mut vmm, 16 * 128, 16384, 777)?;
    flush_ok(&mut vmm)?;
    eprintln!(
        "guest-visible stall after SIGKILL of the primary: {:?}",
        t.elapsed()
    );
    cluster.wait_restart(&name, old)?;
    written.verify_all(&mut vmm)?;
    cluster.wait_for(Duration::from_secs(60), "both copies in sync again", || {
        let c = copies(&cluster.describe("kl").ok()?);
        (c.len() == 2 && c.iter().all(|x| x.2 == "ok" || x.2 == "in_sync")).then_some(())
    })?;
    written.verify_all(&mut vmm)?;
    Ok(())
}

/// A server silent for longer than the failure timeout loses its copies: with three servers
/// and two copies, the mirror on a hung server is re-placed on the third server and rebuilt
/// from the primary while the writer goes on; the hung server's copy is deleted when it comes
/// back; the re-placed copy, made primary, serves every acknowledged write.
#[test]
fn a_lost_mirror_is_rebuilt_on_another_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(&dir.path().join("keel"), 3, CAPACITY)?;
    let (_, lost, mut vmm) = two_copies(&cluster, "rr")?;
    let id = cluster.describe("rr")?["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let mut written = Written(Vec::new());
    for i in 0..32u64 {
        written.write(&mut vmm, i * 64, 8192, 900 + i)?;
    }
    flush_ok(&mut vmm)?;

    let cont = hang(&cluster, &lost)?;
    let t = Instant::now();
    let mut i = 32u64;
    let new_home = loop {
        written.write(&mut vmm, (i % 200) * 64, 8192, 900 + i)?;
        i += 1;
        let v = cluster.describe("rr")?;
        let c = copies(&v);
        if let Some(m) = c
            .iter()
            .find(|x| x.1 == "mirror" && x.0 != lost && x.2 == "in_sync")
        {
            break m.0.clone();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the lost mirror was not rebuilt elsewhere within 60 s: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "mirror re-placed on {new_home} and in sync after {:?}",
        t.elapsed()
    );
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;

    // The lost server returns: its copy of the volume is deleted.
    drop(cont);
    let data = dir.path().join("keel").join("storage").join(&lost);
    cluster.wait_for(
        Duration::from_secs(30),
        "the returned server's copy to be deleted",
        || {
            let left = std::fs::read_dir(&data)
                .ok()?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains(&id));
            (!left).then_some(())
        },
    )?;

    // The rebuilt copy holds everything: hang the primary so it is promoted, read back.
    let primary = copies(&cluster.describe("rr")?)
        .into_iter()
        .find(|x| x.1 == "primary")
        .map(|x| x.0)
        .context("no primary")?;
    let pcont = hang(&cluster, &primary)?;
    written
        .write(&mut vmm, 250 * 64, 8192, 31337)
        .with_context(|| {
            format!(
                "write after the primary hung; node1:\n{}\ncontroller:\n{}",
                cluster.log_grep("node1", "", 30),
                cluster.log_grep("controller", "", 30)
            )
        })?;
    flush_ok(&mut vmm)?;
    let v = cluster.describe("rr")?;
    ensure!(
        copies(&v)
            .iter()
            .any(|x| x.0 == new_home && x.1 == "primary"),
        "the re-placed copy must have been promoted: {v}"
    );
    written.verify_all(&mut vmm)?;
    drop(pcont);
    Ok(())
}
