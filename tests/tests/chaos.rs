//! Chaos: a whole cluster started by `keelctl up`, a writer at queue depth 16 that reads back
//! and checks every block it had acknowledged, and one failure (or two in sequence) injected
//! while it runs. Each scenario runs `KEEL_CHAOS_ROUNDS` times (default 5), each round on a
//! fresh cluster. After every round: every acknowledged write read back exactly, the guest saw
//! no I/O error, and `describe` shows full redundancy again. The longest request of a round
//! (the guest-visible stall) is printed per round and summarized at the end.
//!
//! The writer: passes over a 16 MiB region in 64 KiB blocks, each pass writing every block
//! once with its own seed at queue depth 16 and then reading every block back against that
//! seed, so a write acknowledged before, during or after a failover that any later primary
//! misses fails the pass's read-back.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_proto::frame::checksum;
use keel_proto::io::{connect, read_frame};
use keel_proto::tls::{client_config, TlsPaths};
use keel_proto::{Epoch, Frame, Op, Request, Role, Status, VolumeId};
use keel_tests::keel_up::{epoch, Cluster};
use keel_tests::vmm::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const CAPACITY: &str = "4GiB";
const BLOCK: usize = 64 << 10;
/// The writer's region: the first 16 MiB of a 64 MiB volume.
const REGION_SECTORS: u64 = (16 << 20) / 512;
const BLOCKS: u64 = (16 << 20) / BLOCK as u64;

fn rounds() -> usize {
    std::env::var("KEEL_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5)
}

/// The copies of `describe` as `(server, role, state, address)`.
fn copies(v: &Value) -> Vec<(String, String, String, String)> {
    v["copies"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    (s("server"), s("role"), s("state"), s("address"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn role_of(v: &Value, role: &str) -> Result<(String, String)> {
    copies(v)
        .into_iter()
        .find(|c| c.1 == role)
        .map(|c| (c.0, c.3))
        .with_context(|| format!("no {role} copy: {v}"))
}

/// Every copy on its server, at the volume's epoch: a primary `ok`, the mirrors `in_sync`.
fn fully_redundant(v: &Value, replicas: usize) -> bool {
    let c = copies(v);
    c.len() == replicas && c.iter().all(|x| x.2 == "ok" || x.2 == "in_sync")
}

fn wait_redundant(cluster: &Cluster, volume: &str, replicas: usize, what: &str) -> Result<Value> {
    cluster
        .wait_for(Duration::from_secs(90), what, || {
            let v = cluster.describe(volume).ok()?;
            fully_redundant(&v, replicas).then_some(v)
        })
        .with_context(|| {
            format!(
                "{what}: last describe {}",
                cluster
                    .describe(volume)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            )
        })
}

/// The writer and what it saw.
struct Writer {
    vmm: TestVmm,
    seed: u64,
    passes: u64,
    /// The longest request of any pass, in microseconds: the guest-visible stall.
    max_latency_us: u64,
}

impl Writer {
    fn new(vmm: TestVmm, seed: u64) -> Writer {
        Writer {
            vmm,
            seed,
            passes: 0,
            max_latency_us: 0,
        }
    }

    fn load(&mut self, op: LoadOp, seed: u64) -> Result<LoadResult> {
        let r = self.vmm.run_load(
            0,
            LoadSpec {
                op,
                depth: 16,
                block_size: BLOCK,
                random: false,
                region: Some((0, REGION_SECTORS)),
                count: Some(BLOCKS),
                duration: None,
                seed,
                data_seed: Some(seed),
            },
        )?;
        if let Some(m) = r.latencies_us.iter().max() {
            self.max_latency_us = self.max_latency_us.max(*m);
        }
        Ok(r)
    }

    /// One pass: every block written with a new seed, then every block read back against it.
    fn pass(&mut self) -> Result<()> {
        self.seed += 1;
        let seed = self.seed;
        let w = self.load(LoadOp::Write, seed)?;
        ensure!(
            w.errors == 0 && w.completed == BLOCKS,
            "pass {}: the guest saw {} write errors (first {:?}), {} of {BLOCKS} completed",
            self.passes,
            w.errors,
            w.first_error,
            w.completed
        );
        let r = self.load(LoadOp::Read, seed)?;
        ensure!(
            r.errors == 0 && r.completed == BLOCKS,
            "pass {}: the guest saw {} read errors (first {:?})",
            self.passes,
            r.errors,
            r.first_error
        );
        ensure!(
            r.mismatches == 0,
            "pass {}: {} of {BLOCKS} acknowledged blocks read back different",
            self.passes,
            r.mismatches
        );
        self.passes += 1;
        Ok(())
    }

    /// Runs passes until `done` is set, then two more.
    fn run_until(&mut self, done: &AtomicBool) -> Result<()> {
        while !done.load(Ordering::Acquire) {
            self.pass()?;
        }
        self.pass()?;
        self.pass()
    }
}

/// Runs `inject` on another thread while the writer makes passes; fails if either fails.
fn under_load(
    writer: &mut Writer,
    inject: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<()> {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let t = std::thread::spawn(move || {
        let r = inject();
        d.store(true, Ordering::Release);
        r
    });
    let w = writer.run_until(&done);
    done.store(true, Ordering::Release);
    let i = t
        .join()
        .map_err(|_| anyhow::anyhow!("the injector thread panicked"))?;
    i.context("injecting the failure")?;
    w.context("the writer")
}

/// A fresh cluster with a 64 MiB volume `v` of `replicas` copies attached read-write to a
/// connected test VMM that has written one verified pass.
fn setup(dir: &Path, servers: u32, replicas: usize) -> Result<(Arc<Cluster>, Writer)> {
    let cluster = Cluster::up(dir, servers, CAPACITY)?;
    cluster.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        "v",
        "--replicas",
        &replicas.to_string(),
    ])?;
    wait_redundant(&cluster, "v", replicas, "the new copies to report")?;
    let (sock, _) = cluster.attach("v", "node1", "vm1", &[])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let vmm = loop {
        match TestVmm::connect(
            &sock,
            VmmOptions {
                // Requests stall across failovers; none may fail.
                io_timeout: Duration::from_secs(120),
                ..VmmOptions::default()
            },
        ) {
            Ok(v) => break v,
            Err(e) if Instant::now() > deadline => return Err(e.context("connecting the VMM")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut w = Writer::new(vmm, 1000);
    w.pass()?;
    Ok((Arc::new(cluster), w))
}

/// Sends one 4 KiB write straight to `addr` as node1 would, carrying `epoch`; returns the
/// storage server's answer. Used on a resumed old primary: it must never answer `Ok`.
fn direct_write(cluster: &Cluster, addr: &str, volume: &str, epoch: u64) -> Result<Status> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let vol: VolumeId = volume.parse()?;
    let cfg = client_config(&TlsPaths::in_dir(&cluster.dir.join("pki"), "node-node1"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (mut s, _) = connect(addr, cfg, Role::Storage).await?;
        let payload = vec![0xEEu8; 4096];
        let mut r = Request::new(Op::Write, 1, vol, Epoch(epoch));
        r.offset = 0;
        r.length = 4096;
        r.crc = checksum(&payload);
        r.payload = payload.into();
        s.write_all(&Frame::Request(r).to_bytes()).await?;
        s.flush().await?;
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut s, &mut buf)).await {
            Ok(Ok(Some(Frame::Response(resp)))) => Ok(resp.status),
            Ok(other) => bail!("expected a response, got {other:?}"),
            Err(_) => bail!("no answer within 30 s"),
        }
    })
}

/// The cluster's view, for a failure message.
fn diagnostics(c: &Cluster) -> String {
    format!(
        "describe: {}\nservers: {}\ncontroller log:\n{}",
        c.describe("v").map(|v| v.to_string()).unwrap_or_default(),
        c.json(&["server", "list"])
            .map(|v| v.to_string())
            .unwrap_or_default(),
        c.log_grep("controller", "", 15)
    )
}

/// Prints the round's stall and keeps it for the summary.
fn note(stalls: &mut Vec<f64>, scenario: &str, round: usize, w: &Writer) {
    let s = w.max_latency_us as f64 / 1e6;
    eprintln!(
        "chaos {scenario} round {round}: {} passes, longest request {s:.2} s",
        w.passes
    );
    stalls.push(s);
}

fn summary(scenario: &str, stalls: &mut [f64]) {
    stalls.sort_by(f64::total_cmp);
    if let (Some(max), false) = (stalls.last(), stalls.is_empty()) {
        eprintln!(
            "chaos {scenario}: {} rounds, longest request median {:.2} s, max {max:.2} s",
            stalls.len(),
            stalls[stalls.len() / 2]
        );
    }
}

/// The primary's server dies (SIGKILL) and stays down: the controller promotes the mirror, the
/// writer stalls and goes on. When the server returns, its copy is a stale mirror, rebuilt.
#[test]
fn primary_killed_and_kept_down() -> Result<()> {
    let mut stalls = Vec::new();
    for round in 0..rounds() {
        let dir = tempfile::tempdir()?;
        let (cluster, mut w) = setup(&dir.path().join("keel"), 2, 2)?;
        let v0 = cluster.describe("v")?;
        let (primary, _) = role_of(&v0, "primary")?;
        let name = format!("storage-{primary}");
        let c = cluster.clone();
        let p = primary.clone();
        under_load(&mut w, move || {
            std::thread::sleep(Duration::from_millis(300));
            c.hold(&name)?;
            c.kill9(&name)?;
            c.wait_for(Duration::from_secs(60), "the mirror's promotion", || {
                let v = c.describe("v").ok()?;
                (role_of(&v, "primary").ok()?.0 != p).then_some(())
            })
            .with_context(|| diagnostics(&c))
        })?;
        let v = cluster.describe("v")?;
        ensure!(epoch(&v) > epoch(&v0), "promotion bumps the epoch: {v}");
        cluster.release(&format!("storage-{primary}"))?;
        let c = cluster.clone();
        under_load(&mut w, move || {
            wait_redundant(&c, "v", 2, "the old primary rebuilt as a mirror").map(drop)
        })?;
        let v = cluster.describe("v")?;
        ensure!(
            copies(&v)
                .iter()
                .any(|x| x.0 == primary && x.1 == "mirror" && x.2 == "in_sync"),
            "the old primary must be an in-sync mirror now: {v}"
        );
        note(&mut stalls, "primary_killed_and_kept_down", round, &w);
    }
    summary("primary_killed_and_kept_down", &mut stalls);
    Ok(())
}

/// The primary's server hangs (SIGSTOP) for longer than the failure timeout: the mirror is
/// promoted. Resumed, the old primary still believes it is primary at its old epoch: a write
/// sent to it at that epoch the moment it resumes is refused (its mirror, now primary, refuses
/// its epoch; the controller refuses its drop), never acknowledged. Then it is rebuilt.
#[test]
fn primary_hung_then_resumed_is_fenced() -> Result<()> {
    let mut stalls = Vec::new();
    for round in 0..rounds() {
        let dir = tempfile::tempdir()?;
        let (cluster, mut w) = setup(&dir.path().join("keel"), 2, 2)?;
        let v0 = cluster.describe("v")?;
        let id = v0["id"].as_str().context("no id")?.to_string();
        let e0 = epoch(&v0);
        let (primary, addr) = role_of(&v0, "primary")?;
        let name = format!("storage-{primary}");
        let pid = cluster.pid(&name)?;
        let c = cluster.clone();
        under_load(&mut w, move || {
            std::thread::sleep(Duration::from_millis(300));
            keel_tests::keel_up::kill(pid, libc::SIGSTOP);
            let r = c.wait_for(Duration::from_secs(60), "the mirror's promotion", || {
                let v = c.describe("v").ok()?;
                (role_of(&v, "primary").ok()?.0 != primary).then_some(())
            });
            if r.is_err() {
                keel_tests::keel_up::kill(pid, libc::SIGCONT);
            }
            r
        })?;
        // Resume it and write to it at once, at the epoch its clients used.
        keel_tests::keel_up::kill(pid, libc::SIGCONT);
        let st = direct_write(&cluster, &addr, &id, e0)?;
        ensure!(
            st != Status::Ok,
            "round {round}: the resumed old primary acknowledged a write at its old epoch {e0}"
        );
        eprintln!("round {round}: the resumed old primary answered {st:?}");
        let c = cluster.clone();
        under_load(&mut w, move || {
            wait_redundant(&c, "v", 2, "the old primary rebuilt as a mirror").map(drop)
        })?;
        note(
            &mut stalls,
            "primary_hung_then_resumed_is_fenced",
            round,
            &w,
        );
    }
    summary("primary_hung_then_resumed_is_fenced", &mut stalls);
    Ok(())
}

/// The mirror's server dies (SIGKILL) and stays down for a while: the primary has it dropped
/// and goes on alone; when it returns it is resynced and rejoins.
#[test]
fn mirror_killed_and_kept_down() -> Result<()> {
    let mut stalls = Vec::new();
    for round in 0..rounds() {
        let dir = tempfile::tempdir()?;
        let (cluster, mut w) = setup(&dir.path().join("keel"), 2, 2)?;
        let v0 = cluster.describe("v")?;
        let (mirror, _) = role_of(&v0, "mirror")?;
        let (primary, _) = role_of(&v0, "primary")?;
        let name = format!("storage-{mirror}");
        let c = cluster.clone();
        under_load(&mut w, move || {
            std::thread::sleep(Duration::from_millis(300));
            c.hold(&name)?;
            c.kill9(&name)?;
            c.wait_for(Duration::from_secs(60), "the mirror to be dropped", || {
                let v = c.describe("v").ok()?;
                copies(&v)
                    .iter()
                    .any(|x| x.0 == mirror && x.2 != "in_sync")
                    .then_some(())
            })?;
            // Down for longer than the failure timeout, writes going on.
            std::thread::sleep(Duration::from_secs(4));
            c.release(&name)?;
            wait_redundant(&c, "v", 2, "the returned mirror to rejoin").map(drop)
        })?;
        let v = cluster.describe("v")?;
        ensure!(
            role_of(&v, "primary")?.0 == primary,
            "a mirror's failure must not move the primary: {v}"
        );
        note(&mut stalls, "mirror_killed_and_kept_down", round, &w);
    }
    summary("mirror_killed_and_kept_down", &mut stalls);
    Ok(())
}

/// Each server in turn is killed and restarted at once by `keelctl up` (within about a second,
/// before the failure timeout), first the primary's, then the mirror's.
#[test]
fn servers_restart_under_the_writer() -> Result<()> {
    let mut stalls = Vec::new();
    for round in 0..rounds() {
        let dir = tempfile::tempdir()?;
        let (cluster, mut w) = setup(&dir.path().join("keel"), 2, 2)?;
        let v0 = cluster.describe("v")?;
        let (primary, _) = role_of(&v0, "primary")?;
        let (mirror, _) = role_of(&v0, "mirror")?;
        for server in [primary, mirror] {
            let name = format!("storage-{server}");
            let c = cluster.clone();
            under_load(&mut w, move || {
                std::thread::sleep(Duration::from_millis(300));
                let old = c.kill9(&name)?;
                c.wait_restart(&name, old)?;
                wait_redundant(&c, "v", 2, "both copies in sync after the restart").map(drop)
            })?;
        }
        note(&mut stalls, "servers_restart_under_the_writer", round, &w);
    }
    summary("servers_restart_under_the_writer", &mut stalls);
    Ok(())
}

/// Two failures in sequence on three servers: the primary's server dies for good; the mirror
/// is promoted and a new mirror is placed on the third server and rebuilt; then the new
/// primary's server dies too, and the rebuilt copy is promoted and serves every write.
#[test]
fn two_failures_in_sequence() -> Result<()> {
    let mut stalls = Vec::new();
    for round in 0..rounds() {
        let dir = tempfile::tempdir()?;
        let (cluster, mut w) = setup(&dir.path().join("keel"), 3, 2)?;
        let v0 = cluster.describe("v")?;
        let (first, _) = role_of(&v0, "primary")?;
        let (second, _) = role_of(&v0, "mirror")?;
        let c = cluster.clone();
        let (f, s) = (first.clone(), second.clone());
        under_load(&mut w, move || {
            std::thread::sleep(Duration::from_millis(300));
            let name = format!("storage-{f}");
            c.hold(&name)?;
            c.kill9(&name)?;
            // Promoted, re-placed on the third server, rebuilt: two in-sync copies, neither on
            // the dead server.
            c.wait_for(
                Duration::from_secs(90),
                "promotion and a rebuilt mirror on the third server",
                || {
                    let v = c.describe("v").ok()?;
                    (fully_redundant(&v, 2)
                        && role_of(&v, "primary").ok()?.0 == s
                        && copies(&v).iter().all(|x| x.0 != f))
                    .then_some(())
                },
            )
        })?;
        let c = cluster.clone();
        let (f, s) = (first.clone(), second.clone());
        under_load(&mut w, move || {
            std::thread::sleep(Duration::from_millis(300));
            let name = format!("storage-{s}");
            c.hold(&name)?;
            c.kill9(&name)?;
            c.wait_for(
                Duration::from_secs(60),
                "the rebuilt copy's promotion",
                || {
                    let v = c.describe("v").ok()?;
                    let p = role_of(&v, "primary").ok()?.0;
                    (p != s && p != f).then_some(())
                },
            )
        })?;
        // Both come back: the volume is re-replicated to two in-sync copies again.
        cluster.release(&format!("storage-{second}"))?;
        cluster.release(&format!("storage-{first}"))?;
        let c = cluster.clone();
        under_load(&mut w, move || {
            wait_redundant(&c, "v", 2, "full redundancy after both servers returned").map(drop)
        })?;
        note(&mut stalls, "two_failures_in_sequence", round, &w);
    }
    summary("two_failures_in_sequence", &mut stalls);
    Ok(())
}
