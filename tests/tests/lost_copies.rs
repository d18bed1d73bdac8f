//! A copy lost while its server stays up (docs/replication.md, R10), on whole `keelctl up`
//! clusters with the test VMM writing through the real keel-vhost: the copy's file removed
//! and its server restarted, the file removed under the running server, the file damaged so it
//! cannot be opened at start, and the disk failing under the server (an ext4 filesystem shut
//! down with `EXT4_IOC_SHUTDOWN`, so every I/O returns `EIO`). Each time the writer sees no
//! error, the volume moves to a copy that is not lost, gets its redundancy back, and every
//! acknowledged write reads back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::keel_up::{alive, Cluster};
use keel_tests::vmm::TestVmm;
use keel_tests::writer::*;
use serde_json::Value;

/// Long enough that a restarted server never looks down to the controller: what it sees is a
/// live server without the copy.
const FAILURE_TIMEOUT_MS: &str = "10000";

fn up(dir: &Path, servers: u32) -> Result<Cluster> {
    Cluster::up_with_args(
        &dir.join("keel"),
        servers,
        CAPACITY,
        &["--failure-timeout-ms", FAILURE_TIMEOUT_MS],
    )
}

fn volume_id(cluster: &Cluster, volume: &str) -> Result<String> {
    Ok(cluster.describe(volume)?["id"]
        .as_str()
        .context("describe shows no id")?
        .to_string())
}

/// The files of `volume`'s copy on `server` (`<id>.keel`, `<id>.members`).
fn copy_files(cluster: &Cluster, server: &str, id: &str) -> Result<Vec<PathBuf>> {
    let dir = cluster.dir.join("storage").join(server).join("copies");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        // Files are named by the id in 32 hex digits; the API shows it without leading zeros.
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        if u128::from_str_radix(stem, 16).ok() == u128::from_str_radix(id, 16).ok() {
            out.push(p);
        }
    }
    ensure!(
        out.iter()
            .any(|p| p.extension().is_some_and(|x| x == "keel")),
        "no copy file of {id} in {}",
        dir.display()
    );
    Ok(out)
}

/// Writes 32 blocks of 8 KiB and flushes.
fn write_some(vmm: &mut TestVmm, written: &mut Written, seed: u64) -> Result<()> {
    for i in 0..32u64 {
        written.write(vmm, i * 64, 8192, seed + i)?;
    }
    flush_ok(vmm)
}

/// Waits until `volume`'s primary is on another server than `old`, writing (and so stalling,
/// never failing) meanwhile; returns the new primary's server.
fn wait_moved(
    cluster: &Cluster,
    vmm: &mut TestVmm,
    written: &mut Written,
    volume: &str,
    old: &str,
) -> Result<String> {
    let t = Instant::now();
    let mut i = 0u64;
    loop {
        written
            .write(vmm, 4096 + (i % 64) * 16, 4096, 7000 + i)
            .with_context(|| {
                format!(
                    "a write while the primary's copy is lost; controller:\n{}\nnode1:\n{}",
                    cluster.log_grep("controller", "", 20),
                    cluster.log_grep("node1", "", 20)
                )
            })?;
        i += 1;
        let v = cluster.describe(volume)?;
        if let Some(p) = copies(&v)
            .into_iter()
            .find(|c| c.1 == "primary" && c.0 != old)
        {
            eprintln!(
                "primary moved from {old} to {} after {:?}",
                p.0,
                t.elapsed()
            );
            return Ok(p.0);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "the primary did not move off {old} within 90 s: {v}\ncontroller:\n{}",
            cluster.log_grep("controller", "", 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every copy of `volume` is `ok`/`in_sync` with `want` copies, writing meanwhile.
fn wait_redundant(
    cluster: &Cluster,
    vmm: &mut TestVmm,
    written: &mut Written,
    volume: &str,
    want: usize,
) -> Result<Value> {
    let t = Instant::now();
    let mut i = 0u64;
    loop {
        written.write(vmm, 6000 + (i % 64) * 16, 4096, 9000 + i)?;
        i += 1;
        let v = cluster.describe(volume)?;
        let c = copies(&v);
        if c.len() == want && c.iter().all(|x| x.2 == "ok" || x.2 == "in_sync") {
            eprintln!("redundancy back after {:?}: {c:?}", t.elapsed());
            return Ok(v);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "{volume} did not get {want} healthy copies within 120 s: {v}\ncontroller:\n{}",
            cluster.log_grep("controller", "", 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The controller's log must show that it moved the volume because of a lost copy on a live
/// server (not because the server looked down).
fn assert_lost_on_live_server(cluster: &Cluster, what: &str) {
    // Its reconciler saw the copy lost, or a node reported the primary and the controller's
    // probe of that copy failed.
    let promoted = [
        cluster.log_grep("controller", "copy lost on a live server", 5),
        cluster.log_grep("controller", "unanswered to the controller's probe", 5),
    ]
    .concat();
    assert!(
        !promoted.is_empty(),
        "{what}: the controller must say it handled a copy lost on a live server; its log:\n{}",
        cluster.log_grep("controller", "", 40)
    );
    let down = cluster.log_grep("controller", "primary's server failed", 5);
    assert!(
        down.is_empty(),
        "{what}: the server never looked down, yet: {down}"
    );
}

/// The primary's copy files are removed and its server restarted at once (a restart well
/// within the failure timeout): the controller sees a live server that no longer reports the
/// copy, and after the failure timeout promotes the in-sync mirror; the writer only stalls. The
/// copy is created again on the same server (the only other one), rebuilt, and — promoted by
/// removing the other copy the same way — serves every acknowledged write.
#[test]
fn a_primary_copy_gone_after_a_restart_is_replaced_and_rebuilt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = up(dir.path(), 2)?;
    let (primary, mirror, mut vmm) = two_copies(&cluster, "gone")?;
    let id = volume_id(&cluster, "gone")?;
    let mut written = Written(Vec::new());
    write_some(&mut vmm, &mut written, 100)?;

    let files = copy_files(&cluster, &primary, &id)?;
    let name = format!("storage-{primary}");
    let old = cluster.kill9(&name)?;
    for f in &files {
        std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
    }
    cluster.wait_restart(&name, old)?;
    let new_primary = wait_moved(&cluster, &mut vmm, &mut written, "gone", &primary)?;
    assert_eq!(new_primary, mirror, "the in-sync mirror is promoted");
    assert_lost_on_live_server(&cluster, "a copy gone after a restart");
    written.verify_all(&mut vmm)?;

    wait_redundant(&cluster, &mut vmm, &mut written, "gone", 2)?;
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;

    // The rebuilt copy holds everything: remove the other one the same way, read back.
    let files = copy_files(&cluster, &mirror, &id)?;
    let name = format!("storage-{mirror}");
    let old = cluster.kill9(&name)?;
    for f in &files {
        std::fs::remove_file(f)?;
    }
    cluster.wait_restart(&name, old)?;
    let back = wait_moved(&cluster, &mut vmm, &mut written, "gone", &mirror)?;
    assert_eq!(back, primary, "the rebuilt copy is promoted");
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;
    Ok(())
}

/// A volume with no attachment (no node to report anything): its primary's copy files are
/// removed and its server restarted at once. The controller alone notices that the live server
/// no longer reports the copy and, one failure timeout later, promotes the mirror; the copy is
/// then created again and rebuilt. The data written before reads back through a new attachment.
#[test]
fn an_idle_volume_whose_primary_copy_is_gone_is_noticed_by_the_controller() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up_with_args(
        &dir.path().join("keel"),
        2,
        CAPACITY,
        &["--failure-timeout-ms", "5000"],
    )?;
    let (primary, mirror, mut vmm) = two_copies(&cluster, "idle")?;
    let id = volume_id(&cluster, "idle")?;
    let mut written = Written(Vec::new());
    write_some(&mut vmm, &mut written, 500)?;
    drop(vmm);
    cluster.detach_when_disconnected("idle", "node1", "vm1", Duration::from_secs(30))?;

    let files = copy_files(&cluster, &primary, &id)?;
    let name = format!("storage-{primary}");
    let old = cluster.kill9(&name)?;
    for f in &files {
        std::fs::remove_file(f)?;
    }
    cluster.wait_restart(&name, old)?;
    let t = Instant::now();
    cluster.wait_for(Duration::from_secs(60), "the mirror promoted", || {
        let v = cluster.describe("idle").ok()?;
        copies(&v)
            .iter()
            .any(|c| c.0 == mirror && c.1 == "primary")
            .then_some(())
    })?;
    eprintln!("promoted {:?} after the restart", t.elapsed());
    let reconciled = cluster.log_grep("controller", "primary's copy lost on a live server", 3);
    ensure!(
        reconciled.contains("has not reported the copy"),
        "the controller's reconciler must have found the copy missing; its log:\n{}",
        cluster.log_grep("controller", "", 30)
    );
    let down = cluster.log_grep("controller", "primary's server failed", 3);
    ensure!(down.is_empty(), "the server never looked down: {down}");

    let (sock, _) = cluster.attach("idle", "node1", "vm1", &[])?;
    let mut vmm = connect(&sock, Duration::from_secs(60))?;
    written.verify_all(&mut vmm)?;
    wait_redundant(&cluster, &mut vmm, &mut written, "idle", 2)?;
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;
    Ok(())
}

/// Two faults at once: the mirror's server restarts with its copy gone (an emptied disk),
/// and right after, the primary's copy file is removed under its running server. The mirror,
/// in the in-sync set but without a copy, must not be promoted: promotion needs its server to
/// report the copy (a server that has not yet been missing it for the failure timeout is no
/// evidence). The primary keeps serving from its open file, every write reads back, and
/// nothing is deleted while no copy is known sound (R9, R10).
#[test]
fn a_mirror_without_its_copy_is_never_promoted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = up(dir.path(), 2)?;
    let (primary, mirror, mut vmm) = two_copies(&cluster, "double")?;
    let id = volume_id(&cluster, "double")?;
    let mut written = Written(Vec::new());
    write_some(&mut vmm, &mut written, 600)?;
    flush_ok(&mut vmm)?;

    let name = format!("storage-{mirror}");
    let files = copy_files(&cluster, &mirror, &id)?;
    let old = cluster.kill9(&name)?;
    for f in &files {
        std::fs::remove_file(f)?;
    }
    cluster.wait_restart(&name, old)?;
    for f in copy_files(&cluster, &primary, &id)? {
        std::fs::remove_file(&f)?;
    }
    // Well inside the 10 s failure timeout: the old rule saw the mirror usable here.
    std::thread::sleep(Duration::from_secs(4));
    let v = cluster.describe("double")?;
    ensure!(
        copies(&v)
            .iter()
            .any(|x| x.0 == primary && x.1 == "primary"),
        "a mirror without its copy must not be promoted: {v}"
    );
    for bad in ["mirror promoted", "deleted a lost copy"] {
        let hits = cluster.log_grep("controller", bad, 3);
        ensure!(
            hits.is_empty(),
            "nothing may be promoted or deleted, yet: {hits}"
        );
    }
    written
        .verify_all(&mut vmm)
        .context("the primary serves from its open file")?;
    Ok(())
}

/// The primary's copy file is removed while its server runs (no restart): the server still
/// serves from the open file, and its next heartbeat reports the copy lost, so the controller
/// promotes the mirror at once (no failure timeout to wait) before a restart could lose the
/// data; the old copy is then replaced and rebuilt.
#[test]
fn a_primary_copy_file_removed_under_a_running_server_is_moved_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = up(dir.path(), 2)?;
    let (primary, mirror, mut vmm) = two_copies(&cluster, "unlinked")?;
    let id = volume_id(&cluster, "unlinked")?;
    let mut written = Written(Vec::new());
    write_some(&mut vmm, &mut written, 200)?;
    let pid = cluster.pid(&format!("storage-{primary}"))?;

    for f in copy_files(&cluster, &primary, &id)? {
        std::fs::remove_file(&f)?;
    }
    let t = Instant::now();
    let new_primary = wait_moved(&cluster, &mut vmm, &mut written, "unlinked", &primary)?;
    assert_eq!(new_primary, mirror);
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "reported by the next heartbeat, not after the {FAILURE_TIMEOUT_MS} ms timeout: {:?}; controller:\n{}\nserver:\n{}",
        t.elapsed(),
        cluster.log_grep("controller", "", 30),
        cluster.log_grep(&primary, "", 30)
    );
    assert_lost_on_live_server(&cluster, "a copy file removed under its server");
    assert_eq!(
        cluster.pid(&format!("storage-{primary}"))?,
        pid,
        "the server was not restarted"
    );
    wait_redundant(&cluster, &mut vmm, &mut written, "unlinked", 2)?;
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;
    // The copy is on disk again, under its name.
    copy_files(&cluster, &primary, &id)?;
    Ok(())
}

/// The mirror's copy file is damaged (its header overwritten) and its server restarted: the
/// server starts anyway and serves its other copies (before, one damaged file kept it down),
/// reports the copy lost with the reason, the controller drops the mirror, deletes the damaged
/// copy, creates it again and has it rebuilt.
#[test]
fn a_copy_unreadable_at_start_leaves_its_server_up_and_is_rebuilt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = up(dir.path(), 2)?;
    let (_, mirror, mut vmm) = two_copies(&cluster, "damaged")?;
    let id = volume_id(&cluster, "damaged")?;
    let mut written = Written(Vec::new());
    write_some(&mut vmm, &mut written, 300)?;
    // A second volume whose primary is on the damaged copy's server, to show it still serves.
    let other = cluster.json(&["volume", "create", "16MiB", "--name", "other"])?;
    let other_id = other["id"].as_str().context("no id")?.to_string();

    let name = format!("storage-{mirror}");
    let old = cluster.kill9(&name)?;
    let keel = copy_files(&cluster, &mirror, &id)?
        .into_iter()
        .find(|p| p.extension().is_some_and(|x| x == "keel"))
        .context("no .keel file")?;
    let mut header = std::fs::read(&keel)?;
    ensure!(header.len() >= 8192, "copy file too short");
    header[..8192].fill(0x5a);
    std::fs::write(&keel, &header[..8192]).context("damaging the copy file")?;
    let pid = cluster.wait_restart(&name, old)?;

    // The server stays up and reports the copy lost, with why.
    let v = cluster.wait_for(
        Duration::from_secs(30),
        "the damaged copy reported lost",
        || {
            let v = cluster.describe("damaged").ok()?;
            let c = v["copies"].as_array()?.iter().find(|c| {
                c["server"].as_str() == Some(mirror.as_str())
                    && c["fault"]
                        .as_str()
                        .is_some_and(|f| f.contains("unreadable at start"))
            })?;
            let _ = c;
            Some(v)
        },
    );
    // The controller may already have replaced it: then the log says so.
    if v.is_err() {
        let log = cluster.log_grep("controller", "mirror's copy lost on a live server", 3);
        ensure!(
            !log.is_empty(),
            "the damaged copy was neither reported lost nor handled; controller:\n{}\n{}:\n{}",
            cluster.log_grep("controller", "", 30),
            mirror,
            cluster.log_grep(&mirror, "", 30)
        );
    }
    ensure!(alive(pid), "the server must stay up with a damaged copy");
    let log = cluster.log_grep(&mirror, "copy file cannot be opened", 3);
    ensure!(!log.is_empty(), "the server logs the damaged file");
    // The server still serves the other volume's copies.
    let o = cluster.describe("other")?;
    ensure!(
        copies(&o).iter().all(|c| c.2 == "ok" || c.2 == "in_sync"),
        "the other volume is served: {o}"
    );
    ensure!(other_id != id);

    wait_redundant(&cluster, &mut vmm, &mut written, "damaged", 2)?;
    let replaced = cluster.log_grep("controller", "deleted a lost copy, to be created again", 3);
    ensure!(
        !replaced.is_empty(),
        "the controller must have deleted the damaged copy before creating it again; its log:\n{}",
        cluster.log_grep("controller", "", 30)
    );
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;
    Ok(())
}

/// A loop-mounted ext4 filesystem (its image in the test's directory), unmounted on drop.
struct LoopFs {
    mount: PathBuf,
}

impl LoopFs {
    fn new(image: &Path, mount: &Path) -> Result<LoopFs> {
        run(Command::new("truncate").args(["-s", "256M"]).arg(image))?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))?;
        std::fs::create_dir_all(mount)?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(mount))
        .context("mounting a loop device (the test needs root and the loop driver)")?;
        Ok(LoopFs {
            mount: mount.to_path_buf(),
        })
    }

    /// Shuts the filesystem down (`EXT4_IOC_SHUTDOWN`, without flushing its log): every later
    /// I/O on it fails with `EIO`, as on a failed disk.
    fn shut_down(&self) -> Result<()> {
        let dir = std::fs::File::open(&self.mount)?;
        // _IOR('X', 125, __u32)
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
        const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: an ioctl on a directory fd we own, reading one u32 we pass by pointer.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                EXT4_IOC_SHUTDOWN as _,
                &flags,
            )
        };
        if r != 0 {
            bail!(
                "EXT4_IOC_SHUTDOWN on {}: {}",
                self.mount.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Three servers, each with its data directory on its own ext4 filesystem; the primary's
/// filesystem is shut down under a writer, so every I/O of the primary's copy fails with EIO.
/// The copy is failed at its first error and answers `copy lost` (never `io error`): keel-vhost
/// waits, its node reports the primary, the controller's probe hears `copy lost` and promotes
/// the mirror; the writer sees no error. The lost copy is re-placed on the third server and
/// rebuilt; every acknowledged write reads back.
#[test]
fn a_disk_failing_under_the_primary_moves_the_volume_without_guest_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut fs = Vec::new();
    for s in ["s1", "s2", "s3"] {
        fs.push((
            s,
            LoopFs::new(
                &dir.path().join(format!("{s}.img")),
                &dir.path().join("keel").join("storage").join(s),
            )?,
        ));
    }
    let mut cluster = up(dir.path(), 3)?;
    let (primary, mirror, mut vmm) = two_copies(&cluster, "disk")?;
    let mut written = Written(Vec::new());
    write_some(&mut vmm, &mut written, 400)?;
    let pid = cluster.pid(&format!("storage-{primary}"))?;

    fs.iter()
        .find(|(s, _)| *s == primary)
        .context("no filesystem for the primary")?
        .1
        .shut_down()?;
    let new_primary = wait_moved(&cluster, &mut vmm, &mut written, "disk", &primary)?;
    assert_eq!(new_primary, mirror);
    ensure!(alive(pid), "the server with the failed disk stays up");
    let failed = cluster.log_grep(&primary, "the copy is lost", 3);
    ensure!(
        !failed.is_empty(),
        "the primary's server must log its copy failing; its log:\n{}",
        cluster.log_grep(&primary, "", 30)
    );
    let v = wait_redundant(&cluster, &mut vmm, &mut written, "disk", 2)?;
    ensure!(
        !copies(&v).iter().any(|c| c.0 == primary),
        "the lost copy is re-placed off the failed disk: {v}"
    );
    flush_ok(&mut vmm)?;
    written.verify_all(&mut vmm)?;
    drop(vmm);
    let _ = cluster.stop();
    drop(fs);
    Ok(())
}
