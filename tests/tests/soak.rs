//! Issue 18's soak: a QEMU guest writes and verifies its replicated volume (fio, crc32c, every
//! block read back) for a minute while hostile clients flood the same daemons and races run
//! through the API, all against a cluster started by `keelctl up` with its default limits
//! (docs/security.md, "Denial of service"):
//! * plain TCP connections to the guest's primary storage server past the per-address limit
//!   (1024) and the overall limit (4096), and to the controller past the per-address limit;
//! * TLS without a client certificate, TLS without a hello, a hello and nothing after;
//! * partial 4 MiB write frames, and a node that asks for 1000 MiB of reads and never reads
//!   the answers (the per-connection budget holds it to 128 MiB);
//! * slow HTTP headers to the controller;
//! * rounds of concurrent same-name creates and of creates that fit only once.
//!
//! At the end: zero guest I/O errors and verification failures over at least
//! `MIN_VERIFIED_MIB`, every daemon the same process and answering, the storage servers'
//! memory bounded, each race with exactly one winner and no server over-committed, the floods
//! shown to have reached the limits (connections counted accepted and refused), and a fresh
//! client served from a flooding address. Loopback only (127.0.0.x stand for peers).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_api::ApiClient;
use keel_proto::io::ClientStream;
use keel_proto::limits::{raise_nofile_limit, ConnLimits};
use keel_proto::tls::{client_config, TlsPaths};
use keel_proto::{Epoch, Op, Role, Status, VolumeId};
use keel_tests::guest::{self, console_lines, Disk, GuestConfig};
use keel_tests::hostile::{
    capacity_round, closed_after, closed_summary, drain_answers, flood_start, hello_from,
    one_name_round, over_committed, partial_frames, rss, slow_headers, tls_only, tls_refused,
    unread_reads, RssSampler, Tally,
};
use keel_tests::keel_up::{alive, Cluster};
use keel_tests::wire::WireClient;
use keel_tests::writer::copies;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const VOLUME: &str = "soak";
const VOLUME_MIB: u64 = 256;
/// Seconds of guest I/O (the guest starts no fio pass after this).
const SOAK_SECS: u64 = 60;
/// Each fio pass writes this much at random (4 KiB blocks, each once) and reads it all back.
const PASS_MIB: u64 = 32;
/// A guest that verified less did too little for the soak to mean anything.
const MIN_VERIFIED_MIB: u64 = 4 * PASS_MIB;
/// The storage servers' resident memory while flooded. Before the floods: about 10 MiB; the
/// floods may add the unread answers' per-connection budget (128 MiB), the partial frames
/// (20 x 4 MiB) and the allocator's retention (240-280 MiB peaks seen); before issue 18's
/// limits the unread reads alone held all 1000 MiB asked for.
const RSS_BOUND: u64 = 400 * MIB;
/// A connection over a limit is closed right after `accept`; one still open this long after
/// its connect was accepted (the handshake timeout, 10 s, closes it later).
const REFUSED_WITHIN: Duration = Duration::from_secs(3);
/// Excess connections each flooding address opens past the per-address limit.
const EXCESS: usize = 20;
/// Connections of each TLS-level flood.
const TLS_FLOOD: usize = 20;
const RACERS: usize = 8;
const NAME_ROUNDS: usize = 5;
const CAPACITY_ROUNDS: usize = 3;

/// The guest: fio passes over successive 32 MiB regions (random 4 KiB writes with a crc32c
/// header per block, verified as it goes and at the end) until `SOAK_SECS` have passed; the
/// kernel's block-layer errors; exit 0 only if every pass succeeded.
fn guest_script() -> String {
    format!(
        "echo SOAK-START\n\
         start=$(date +%s); pass=0; fails=0\n\
         while [ $(( $(date +%s) - start )) -lt {SOAK_SECS} ] && [ $pass -lt 200 ]; do\n\
           pass=$((pass+1))\n\
           fio --name=soak --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
             --rw=randwrite --bs=4k --offset=$(( (pass % 8) * {PASS_MIB} ))M --size={PASS_MIB}M \
             --randseed=$pass --verify=crc32c --do_verify=1 --verify_fatal=1 \
             --verify_backlog=1024 --group_reporting > /tmp/fio.out 2>&1\n\
           rc=$?\n\
           grep -E 'err=|verify|READ:|WRITE:' /tmp/fio.out | sed \"s/^/FIO$pass: /\"\n\
           echo PASS=$pass RC=$rc\n\
           if [ $rc != 0 ]; then fails=$((fails+1)); sed 's/^/FIO-FAILED: /' /tmp/fio.out; break; fi\n\
         done\n\
         echo DMESG-ERRORS=$(dmesg | grep -ciE 'I/O error|blk_update_request|Buffer I/O') DMESG-LINES=$(dmesg | wc -l)\n\
         echo SOAK-DONE passes=$pass fails=$fails\n\
         [ $fails = 0 ]\n"
    )
}

/// What the floods and races aim at.
struct Target {
    pki: PathBuf,
    /// The guest's primary storage server.
    storage: SocketAddr,
    controller: SocketAddr,
    volume: VolumeId,
    epoch: Epoch,
    /// The primary's log (DIR/logs/<id>.log).
    storage_log: PathBuf,
}

/// The counts the floods and races reached.
#[derive(Default)]
struct Report {
    storage_idle: Vec<(String, usize, usize)>,
    storage_idle_took: Duration,
    /// Every accepted flood connection was still held when the flood's last connect or
    /// refusal was made (false on a host too slow to make them within the handshake timeout:
    /// the overall limit then cannot be read from the counts, and only the per-address limit of
    /// the first address is checked; `hostile_clients` checks the overall limit on its own).
    storage_idle_at_once: bool,
    controller_idle: (usize, usize),
    no_cert_refused: usize,
    no_hello_closed: (usize, Duration),
    hello_held: usize,
    partial_closed: (usize, Duration),
    unread: (u64, Duration),
    slow_headers_closed: (usize, Duration),
    name_rounds: usize,
    capacity_rounds: usize,
}

fn tallies_line(t: &[Tally]) -> Vec<(String, usize, usize)> {
    t.iter()
        .map(|t| (t.src.clone(), t.accepted, t.refused))
        .collect()
}

/// Plain TCP floods of the primary storage server: 1044 from each of four addresses (past the
/// per-address limit; the fourth reaches the overall limit), then 20 from a fifth (all over
/// it). The counts show the overall limit only if every accepted connection was still held
/// when the last of the fifth's was refused (the handshake timeout, 10 s, frees the first
/// connections): [`Report::storage_idle_at_once`].
async fn storage_idle_flood(t: &Target, r: &mut Report) -> Result<()> {
    let lim = ConnLimits::default();
    let start = Instant::now();
    let (end, ended) = tokio::sync::watch::channel(false);
    let mut pending = Vec::new();
    for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let n = lim.max_per_ip + EXCESS;
        pending.push(flood_start(src, t.storage, n, REFUSED_WITHIN, ended.clone()).await?);
    }
    pending.push(flood_start("127.0.0.6", t.storage, EXCESS, REFUSED_WITHIN, ended).await?);
    r.storage_idle_took = start.elapsed();
    let mut tallies = Vec::new();
    for p in &mut pending {
        tallies.push(p.tally().await);
    }
    let _ = end.send(true);
    let mut first_freed = None;
    for p in pending {
        if let Some(at) = p.end().await {
            first_freed = Some(first_freed.map_or(at, |f: Instant| f.min(at)));
        }
    }
    r.storage_idle = tallies_line(&tallies);
    eprintln!(
        "soak: storage idle TCP flood (address, accepted, refused): {:?}, connects took {:?}",
        r.storage_idle, r.storage_idle_took
    );
    // Every accepted connection was held until the last connect was made and the last
    // refusal seen: the counts are of connections held at once.
    let last = tallies
        .iter()
        .filter_map(|t| t.last_refused)
        .fold(start + r.storage_idle_took, Instant::max);
    r.storage_idle_at_once = first_freed.is_none_or(|freed| freed > last);
    if !r.storage_idle_at_once {
        eprintln!(
            "soak: the daemon freed flood connections before the flood's last connect or refusal \
             (the {} connects took {:?}): the overall limit is not read from these counts",
            4 * (lim.max_per_ip + EXCESS) + EXCESS,
            r.storage_idle_took
        );
    }
    Ok(())
}

/// TLS-level floods of the primary storage server, all at once: TLS without a client
/// certificate (refused), TLS without a hello (closed by the hello timeout), a hello and
/// nothing after (held: a legitimate idle client), partial write frames (closed by the frame
/// timeout), and a node that never reads its answers (closed once its answers wait too long).
/// Returns the held connections.
async fn storage_tls_floods(t: &Target, r: &mut Report) -> Result<Vec<ClientStream>> {
    let node = client_config(&TlsPaths::in_dir(&t.pki, "node-node1"))?;
    let no_cert = keel_api::client_tls(&t.pki.join("ca.pem"), None)?;
    let addr = t.storage;
    let no_cert = tokio::spawn(tls_refused(addr, no_cert, TLS_FLOOD));
    let no_hello = tls_only(addr, node.clone(), TLS_FLOOD).await?;
    let no_hello = tokio::spawn(closed_after(no_hello, Duration::from_secs(30)));
    // From their own address: the idle timeout (5 min) is not reached.
    let mut held = Vec::new();
    for _ in 0..TLS_FLOOD {
        held.push(hello_from("127.0.0.7", addr, node.clone()).await?);
    }
    r.hello_held = held.len();
    let partial = partial_frames(addr, node.clone(), VolumeId(0x50a6), TLS_FLOOD).await?;
    let partial = tokio::spawn(closed_after(partial, Duration::from_secs(60)));
    let (unread, no_cert, no_hello, partial) =
        tokio::join!(unread_answers(t, node), no_cert, no_hello, partial);
    r.unread = unread?;
    eprintln!("soak: unread answers: {:?}", r.unread);
    r.no_cert_refused = no_cert?;
    r.no_hello_closed = closed_summary(&no_hello?);
    r.partial_closed = closed_summary(&partial?);
    Ok(held)
}

/// Sends 250 reads of 4 MiB (at the volume's epoch, as its node) without reading the answers;
/// waits for the server to close the connection, then counts the answers that still come.
async fn unread_answers(t: &Target, node: Arc<rustls::ClientConfig>) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut s = unread_reads(t.storage, node, t.volume, t.epoch, VOLUME_MIB * MIB, 250).await?;
    // The server shuts the connection down once a batch of answers waits too long; the FIN
    // queues behind the answers this client never reads, so its log says when.
    let port = s.get_ref().0.local_addr()?.port();
    let needle = format!("127.0.0.1:{port}");
    loop {
        let log = std::fs::read_to_string(&t.storage_log).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains(&needle) && l.contains("its answers were not read in time"))
        {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(90),
            "the connection that never reads its answers is still served after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed = start.elapsed();
    Ok((drain_answers(&mut s, 250).await?, closed))
}

/// Plain TCP past the controller's per-address limit, and slow headers (half a request, then
/// nothing: closed by the header timeout, 10 s).
async fn controller_floods(t: &Target, r: &mut Report) -> Result<()> {
    let lim = ConnLimits::default();
    let (end, ended) = tokio::sync::watch::channel(false);
    let n = lim.max_per_ip + EXCESS;
    let mut p = flood_start("127.0.0.2", t.controller, n, REFUSED_WITHIN, ended).await?;
    let tally = p.tally().await;
    let _ = end.send(true);
    p.end().await;
    r.controller_idle = (tally.accepted, tally.refused);
    eprintln!(
        "soak: controller idle TCP flood: {:?} accepted, refused",
        r.controller_idle
    );
    let tls = keel_api::client_tls(&t.pki.join("ca.pem"), None)?;
    let slow = slow_headers(t.controller, tls, TLS_FLOOD).await?;
    r.slow_headers_closed = closed_summary(&closed_after(slow, Duration::from_secs(30)).await);
    Ok(())
}

/// Rounds of `RACERS` concurrent creates of one name (exactly one volume, the others 409)
/// and of a size that fits once (exactly one, the others refused for capacity, no server
/// over-committed).
async fn races(api: &ApiClient, r: &mut Report) -> Result<()> {
    for round in 0..NAME_ROUNDS {
        one_name_round(api, &format!("soak-race-{round}"), RACERS).await?;
        r.name_rounds += 1;
    }
    for _ in 0..CAPACITY_ROUNDS {
        // 256 MiB of each 1 GiB server hold the soak volume: one more pair of 640 MiB copies
        // fits, two do not.
        capacity_round(api, r#"{"size":"640MiB","replicas":2}"#, RACERS).await?;
        r.capacity_rounds += 1;
    }
    Ok(())
}

/// The floods and races, all against the running cluster.
async fn floods(t: &Target, api: &ApiClient) -> Result<Report> {
    let mut storage = Report::default();
    let mut control = Report::default();
    let mut raced = Report::default();
    // Alone first: the overall limit must be reached within the handshake timeout; and the
    // races create copies on the storage servers, so they come after it is freed.
    storage_idle_flood(t, &mut storage).await?;
    let (held, raced_ok, c) = tokio::join!(
        storage_tls_floods(t, &mut storage),
        races(api, &mut raced),
        controller_floods(t, &mut control)
    );
    raced_ok?;
    c?;
    // A fresh client from a flooding address is served once its connections are gone.
    drop(held?);
    let node = client_config(&TlsPaths::in_dir(&t.pki, "node-node1"))?;
    hello_from("127.0.0.2", t.storage, node)
        .await
        .context("a fresh client from a flooding address after the floods")?;
    storage.controller_idle = control.controller_idle;
    storage.slow_headers_closed = control.slow_headers_closed;
    storage.name_rounds = raced.name_rounds;
    storage.capacity_rounds = raced.capacity_rounds;
    Ok(storage)
}

/// The MiB fio's summaries say it read (its `READ: ... io=32.0MiB` lines: with a write-only
/// job, the verification's reads).
fn fio_read_mib(console: &str) -> f64 {
    console
        .lines()
        .filter(|l| l.contains(" READ: bw="))
        .filter_map(|l| {
            let v = l.split("io=").nth(1)?;
            let end = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
            let n: f64 = v[..end].parse().ok()?;
            match &v[end..end + 3.min(v.len() - end)] {
                "KiB" => Some(n / 1024.0),
                "MiB" => Some(n),
                "GiB" => Some(n * 1024.0),
                _ => None,
            }
        })
        .sum()
}

/// The address `keelctl up` gave storage server `id` (DIR/cluster.json).
fn server_addr(dir: &Path, id: &str) -> Result<SocketAddr> {
    let c: Value = serde_json::from_slice(&std::fs::read(dir.join("cluster.json"))?)?;
    let port = c["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == id))
        .and_then(|s| s["port"].as_u64())
        .with_context(|| format!("no port for {id} in cluster.json: {c}"))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port as u16)))
}

#[test]
fn guest_verifies_its_data_under_floods_and_races() -> Result<()> {
    // Fails (not skips) without QEMU, a kernel, busybox or fio.
    guest::require_tools()?;
    // The floods hold about 5200 connections at once.
    raise_nofile_limit()?;
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(dir.path(), 2, "1GiB")?;
    let v = cluster.json(&[
        "volume",
        "create",
        &format!("{VOLUME_MIB}MiB"),
        "--name",
        VOLUME,
        "--replicas",
        "2",
    ])?;
    let volume: VolumeId = v["id"].as_str().context("no id")?.parse()?;
    let d = cluster.wait_for(
        Duration::from_secs(30),
        "primary ok, mirror in_sync",
        || {
            let d = cluster.describe(VOLUME).ok()?;
            let c = copies(&d);
            (c.len() == 2
                && c.iter().any(|x| x.1 == "primary" && x.2 == "ok")
                && c.iter().any(|x| x.1 == "mirror" && x.2 == "in_sync"))
            .then_some(d)
        },
    )?;
    let primary = copies(&d)
        .into_iter()
        .find(|x| x.1 == "primary")
        .context("no primary")?
        .0;
    let (socket, a) = cluster.attach(VOLUME, "node1", "vm1", &[])?;
    let epoch = Epoch(a["epoch"].as_u64().context("attach printed no epoch")?);
    cluster.wait_for(Duration::from_secs(30), "the attachment's socket", || {
        socket.exists().then_some(())
    })?;
    let names = ["controller", "storage-s1", "storage-s2", "node"];
    let pids: Vec<i32> = names
        .iter()
        .map(|n| cluster.pid(n))
        .collect::<Result<_>>()?;
    let pki = cluster.dir.join("pki");
    let t = Target {
        storage: server_addr(&cluster.dir, &primary)?,
        controller: cluster.url.trim_start_matches("https://").parse()?,
        pki: pki.clone(),
        storage_log: cluster.dir.join("logs").join(format!("{primary}.log")),
        volume,
        epoch,
    };
    // The flood's reads are a node's ordinary reads: answered Ok at this epoch.
    let mut c = WireClient::connect(&pki, Role::Node, "node1", t.storage)?;
    let probe = c.call(Op::Read, volume, epoch, 0, 4096, Vec::new())?;
    ensure!(
        probe.status == Status::Ok,
        "a read as node1 answered {}",
        probe.status
    );
    drop(c);
    let id = TlsPaths::in_dir(&pki, "admin-keelctl");
    let api = ApiClient::new(
        &cluster.url,
        keel_api::client_tls(&pki.join("ca.pem"), Some(&id))?,
        None,
    )?
    .with_timeout(Duration::from_secs(30));

    let g = guest::spawn(&GuestConfig::one_disk(
        Disk::new(&socket),
        guest_script(),
        Duration::from_secs(400),
    ))?;
    g.wait_for_line("SOAK-START", Duration::from_secs(300))?;
    let soak_start = Instant::now();
    let booted = started.elapsed();
    let storage_pids = [pids[1] as u32, pids[2] as u32];
    let before: Vec<u64> = storage_pids.iter().map(|p| rss(*p)).collect();
    let sampler = RssSampler::start(storage_pids.to_vec());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let passes = |c: &str| c.lines().filter(|l| l.contains("PASS=")).count();
    let console = g.console();
    ensure!(
        !console.contains("SOAK-DONE"),
        "the guest finished before the floods began"
    );
    let passes_before = passes(&console);
    let r = rt.block_on(floods(&t, &api))?;
    let flooded = soak_start.elapsed();
    let passes_during = passes(&g.console()) - passes_before;
    let peaks = sampler.peaks();
    // After the floods: daemons answer a fresh client.
    rt.block_on(api.get::<Value>("/v1/health"))
        .context("GET /v1/health after the floods")?;
    let mut c = WireClient::connect(&pki, Role::Node, "node1", t.storage)?;
    let probe = c.call(Op::Read, volume, epoch, 0, 4096, Vec::new())?;
    ensure!(
        probe.status == Status::Ok,
        "after the floods, a read answered {}",
        probe.status
    );
    drop(c);
    rt.block_on(over_committed(&api))?;

    let out = g.wait()?;
    drop(sampler);
    let soaked = soak_start.elapsed();
    let done = out
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("SOAK-DONE passes="))
        .map(str::to_string)
        .unwrap_or_default();
    let ok_passes = out.console.lines().filter(|l| l.contains("RC=0")).count() as u64;
    let read_mib = fio_read_mib(&out.console);
    let summary = console_lines(
        &out.console,
        &[
            "PASS=",
            "FIO-FAILED",
            "DMESG-",
            "SOAK-DONE",
            "verify",
            "error",
        ],
    )
    .join("\n");
    println!("--- guest ---\n{summary}");
    println!(
        "soak: cluster up and guest booted in {:.1} s; floods and races for {:.1} s of the \
         guest's {:.1} s of I/O ({passes_during} fio passes during them); total {:.1} s",
        booted.as_secs_f64(),
        flooded.as_secs_f64(),
        soaked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "storage {primary} idle TCP (address, accepted, refused): {:?}, connects took {:?}",
        r.storage_idle, r.storage_idle_took
    );
    println!(
        "controller idle TCP from 127.0.0.2: {} accepted, {} refused",
        r.controller_idle.0, r.controller_idle.1
    );
    println!(
        "TLS without a certificate: {} of {TLS_FLOOD} refused; without a hello: {} closed \
         (last after {:?}); hello then nothing: {} held; partial frames: {} closed (last after \
         {:?}); unread answers: closed after {:?}, {} of 250 answers came; slow headers: {} \
         closed (last after {:?})",
        r.no_cert_refused,
        r.no_hello_closed.0,
        r.no_hello_closed.1,
        r.hello_held,
        r.partial_closed.0,
        r.partial_closed.1,
        r.unread.1,
        r.unread.0,
        r.slow_headers_closed.0,
        r.slow_headers_closed.1
    );
    println!(
        "races: {} same-name rounds, {} capacity rounds of {RACERS} creates",
        r.name_rounds, r.capacity_rounds
    );
    println!(
        "RSS before the floods {:?} MiB, peak during them {:?} MiB (s1, s2); verified {} MiB \
         in {ok_passes} passes (fio read back {read_mib:.1} MiB)",
        before.iter().map(|b| b / MIB).collect::<Vec<_>>(),
        peaks.iter().map(|b| b / MIB).collect::<Vec<_>>(),
        ok_passes * PASS_MIB
    );

    // The guest: no error, no bad block, and enough I/O to mean something.
    ensure!(
        out.exit_status == Some(0) && done.ends_with("fails=0"),
        "the guest saw errors (exit {:?}):\n{summary}",
        out.exit_status
    );
    let failed = [
        "verify: bad",
        "verify failed",
        "I/O error",
        "Buffer I/O",
        "FIO-FAILED",
    ];
    ensure!(
        !failed.iter().any(|f| out.console.contains(f)) && out.console.contains("DMESG-ERRORS=0 "),
        "the guest saw bad data or I/O errors:\n{summary}"
    );
    let passes_done: u64 = done.split_whitespace().next().unwrap_or("0").parse()?;
    ensure!(
        passes_done == ok_passes,
        "{passes_done} passes, {ok_passes} clean"
    );
    ensure!(
        ok_passes * PASS_MIB >= MIN_VERIFIED_MIB && read_mib >= (ok_passes * PASS_MIB) as f64,
        "the guest verified only {} MiB (fio read back {read_mib:.1} MiB)",
        ok_passes * PASS_MIB
    );
    ensure!(passes_during >= 1, "no fio pass ran during the floods");
    // The daemons: the same processes, alive.
    for (n, p) in names.iter().zip(&pids) {
        ensure!(alive(*p), "{n} (pid {p}) died");
        ensure!(cluster.pid(n)? == *p, "{n} was restarted");
    }
    // Memory bounded while 1000 MiB of answers were asked for and never read.
    for (p, s) in peaks.iter().zip(["s1", "s2"]) {
        ensure!(*p < RSS_BOUND, "{s}: RSS peaked at {} MiB", p / MIB);
    }
    // The floods reached the limits: the per-address limit on its own for the first three
    // addresses, then the overall limit (a few places go to the cluster's own connections).
    let lim = ConnLimits::default();
    let per_address = if r.storage_idle_at_once { 3 } else { 1 };
    for (src, acc, refused) in &r.storage_idle[..per_address] {
        ensure!(
            *acc == lim.max_per_ip && *refused == EXCESS,
            "storage, {src}: {acc} accepted, {refused} refused"
        );
    }
    if r.storage_idle_at_once {
        let held: usize = r.storage_idle.iter().map(|x| x.1).sum();
        ensure!(
            held <= lim.max_total && held + 64 >= lim.max_total,
            "storage: {held} flood connections held at once, the limit is {}",
            lim.max_total
        );
        ensure!(
            r.storage_idle[4].1 == 0,
            "storage: connections over the overall limit accepted: {:?}",
            r.storage_idle[4]
        );
    }
    ensure!(
        r.controller_idle == (lim.max_per_ip, EXCESS),
        "controller: {:?} accepted, refused",
        r.controller_idle
    );
    ensure!(
        r.no_cert_refused == TLS_FLOOD,
        "TLS without a certificate: {} refused",
        r.no_cert_refused
    );
    ensure!(
        r.no_hello_closed.0 == TLS_FLOOD,
        "TLS without a hello: {} closed",
        r.no_hello_closed.0
    );
    ensure!(
        r.hello_held == TLS_FLOOD,
        "hellos answered: {}",
        r.hello_held
    );
    ensure!(
        r.partial_closed.0 == TLS_FLOOD,
        "partial frames: {} closed",
        r.partial_closed.0
    );
    ensure!(
        r.unread.0 < 250,
        "all {} unread answers were served",
        r.unread.0
    );
    ensure!(
        r.slow_headers_closed.0 == TLS_FLOOD,
        "slow headers: {} closed",
        r.slow_headers_closed.0
    );
    ensure!(
        (r.name_rounds, r.capacity_rounds) == (NAME_ROUNDS, CAPACITY_ROUNDS),
        "races: {} and {} rounds",
        r.name_rounds,
        r.capacity_rounds
    );
    let mut cluster = cluster;
    if !cluster.stop()? {
        bail!("keelctl up did not exit cleanly");
    }
    Ok(())
}
