//! Clients that hold connections or memory without using them (issue 18; docs/security.md,
//! "Denial of service"; docs/protocol.md, "Limits and back-pressure"): floods of idle TCP
//! connections, TLS without a hello, a hello and nothing after, slow HTTP headers, a node that
//! never reads its answers, partial frames, a daemon out of file descriptors. Every daemon
//! stays up and keeps serving a valid client; limits are set low by flags so that each test
//! takes seconds. Loopback only (127.0.0.x addresses stand for different peers).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keel_proto::frame::checksum;
use keel_proto::tls::{client_config, TlsPaths};
use keel_proto::{Epoch, Frame, Op, Request, Role, Status, VolumeId};
use keel_tests::cluster::{bin, start_until_ready, Pki, Storage};
use keel_tests::hostile::{count_closed, flood, rss};
use keel_tests::wire::WireClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VOL: VolumeId = VolumeId(1);
const MIB: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A valid node writes 64 KiB with `fill` and reads it back, checked by checksum. Retries
/// for up to `patience` (a full connection limit or budget may make it wait).
fn serves(pki: &Path, addr: SocketAddr, fill: u8, patience: Duration) -> Result<()> {
    let until = Instant::now() + patience;
    loop {
        let r = (|| -> Result<()> {
            let mut c = WireClient::connect(pki, Role::Node, "n1", addr)?;
            let data = vec![fill; 64 << 10];
            let off = u64::from(fill) * (64 << 10);
            let w = c.call(
                Op::Write,
                VOL,
                Epoch(1),
                off,
                data.len() as u32,
                data.clone(),
            )?;
            ensure!(w.status == Status::Ok, "write answered {}", w.status);
            let r = c.call(Op::Read, VOL, Epoch(1), off, data.len() as u32, Vec::new())?;
            ensure!(r.status == Status::Ok, "read answered {}", r.status);
            ensure!(
                checksum(&r.payload) == checksum(&data),
                "read back other data"
            );
            Ok(())
        })();
        match r {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > until => return Err(e.context("a valid client")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn node_tls(pki: &Path) -> Result<Arc<rustls::ClientConfig>> {
    Ok(client_config(&TlsPaths::in_dir(pki, "node-n1"))?)
}

/// (a), (b) on a storage server: idle TCP floods are held up to the limits (excess closed at
/// once), closed after the handshake timeout; TLS without a hello likewise; a hello and
/// nothing after after the idle timeout. A valid client is served throughout.
#[test]
fn storage_limits_idle_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    for n in ["n1", "n2"] {
        pki.issue(Role::Node, n)?;
    }
    let s = Storage::start_with(
        &pki,
        "s1",
        &dir.path().join("s1"),
        &["1:64MiB"],
        "127.0.0.1:0".parse()?,
        &[
            "--max-connections",
            "200",
            "--max-connections-per-ip",
            "100",
            "--handshake-timeout-ms",
            "5000",
            "--idle-timeout-s",
            "2",
        ],
        None,
    )?;
    let pid = s.pid().context("pid")?;
    let rt = runtime();
    // 150 from one address: 100 held, 50 closed at once.
    let a = rt.block_on(flood("127.0.0.2", s.addr, 150))?;
    let a_at = Instant::now();
    serves(&pki.dir, s.addr, 1, Duration::from_secs(5))?;
    // 150 more from another: 100 held (the server's 200), 50 closed; 20 from a third: all
    // closed (the overall limit).
    let b = rt.block_on(flood("127.0.0.3", s.addr, 150))?;
    let c = rt.block_on(flood("127.0.0.4", s.addr, 20))?;
    let (ra, rb, rc) = rt.block_on(async {
        let w = Duration::from_millis(1500);
        tokio::join!(count_closed(a, w), count_closed(b, w), count_closed(c, w))
    });
    let quick = |v: &[Option<Duration>]| v.iter().filter(|c| c.is_some()).count();
    eprintln!(
        "closed within 1.5 s: {} of 150, {} of 150, {} of 20",
        quick(&ra),
        quick(&rb),
        quick(&rc)
    );
    ensure!(
        a_at.elapsed() < Duration::from_secs(4),
        "too slow a host for this test's timing"
    );
    ensure!(
        quick(&ra) == 50,
        "127.0.0.2: {} of 150 closed at once, expected 50",
        quick(&ra)
    );
    ensure!(
        quick(&rb) == 50,
        "127.0.0.3: {} of 150 closed at once, expected 50",
        quick(&rb)
    );
    ensure!(
        quick(&rc) == 20,
        "127.0.0.4: {} of 20 closed at once, expected 20",
        quick(&rc)
    );
    ensure!(alive(pid), "keel-storage died");

    // (b) Connections without TLS are closed after the handshake timeout (5 s).
    let idle = rt.block_on(flood("127.0.0.5", s.addr, 20))?;
    let closed = rt.block_on(count_closed(idle, Duration::from_secs(12)));
    for c in &closed {
        let c = c.context("a connection without TLS is still open after 12 s")?;
        ensure!(c >= Duration::from_secs(3), "closed too early: {c:?}");
    }
    eprintln!("without TLS: closed after {:?}", closed[0]);
    // TLS without a hello: the same bound.
    let tls = node_tls(&pki.dir)?;
    let addr = s.addr;
    let no_hello = rt.block_on(async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut t = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let start = Instant::now();
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(12), t.read(&mut b)).await;
        anyhow::Ok((r.is_ok(), start.elapsed()))
    })?;
    ensure!(no_hello.0, "TLS without a hello still open after 12 s");
    eprintln!("TLS without a hello: closed after {:?}", no_hello.1);
    // A hello and nothing after: closed after the idle timeout (2 s).
    let tls = node_tls(&pki.dir)?;
    let silent = rt.block_on(async {
        let (mut t, _) = keel_proto::io::connect(addr, tls, Role::Storage).await?;
        let start = Instant::now();
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(12), t.read(&mut b)).await;
        anyhow::Ok((r.is_ok(), start.elapsed()))
    })?;
    ensure!(
        silent.0,
        "a silent connection after its hello still open after 12 s"
    );
    ensure!(
        silent.1 >= Duration::from_millis(1500),
        "closed too early: {:?}",
        silent.1
    );
    eprintln!("hello, then silence: closed after {:?}", silent.1);
    ensure!(alive(pid), "keel-storage died");
    serves(&pki.dir, s.addr, 2, Duration::from_secs(10))?;
    Ok(())
}

/// (a), (b) on the controller: idle TCP floods up to the limits, slow headers closed after
/// the header timeout, a valid client served throughout.
#[test]
fn controller_limits_idle_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    pki.issue(Role::Controller, "main")?;
    pki.issue(Role::Admin, "ops")?;
    let mut cmd = Command::new(bin("keel-controller")?);
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("ctl"))
        .arg("--pki-dir")
        .arg(&pki.dir)
        .args([
            "--max-connections",
            "200",
            "--max-connections-per-ip",
            "100",
            "--handshake-timeout-ms",
            "5000",
            "--header-timeout-ms",
            "2000",
            "--body-timeout-ms",
            "2000",
        ]);
    let (child, line) = start_until_ready(
        cmd,
        "keel-controller: listening on https://",
        "keel-controller",
    )?;
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let pid = child.0.id();
    let url = line
        .trim_start_matches("keel-controller: listening on ")
        .trim()
        .to_string();
    let addr: SocketAddr = url.trim_start_matches("https://").parse()?;
    let paths = TlsPaths::in_dir(&pki.dir, "admin-ops");
    let api = keel_api::ApiClient::new(&url, keel_api::client_tls(&paths.ca, Some(&paths))?, None)?
        .with_timeout(Duration::from_secs(5));
    let rt = runtime();
    let healthy = |rt: &tokio::runtime::Runtime| -> Result<()> {
        rt.block_on(api.get::<serde_json::Value>("/v1/health"))
            .context("GET /v1/health")?;
        Ok(())
    };
    healthy(&rt)?;
    let a = rt.block_on(flood("127.0.0.2", addr, 150))?;
    healthy(&rt)?;
    let ra = rt.block_on(count_closed(a, Duration::from_millis(1500)));
    let quick = ra.iter().filter(|c| c.is_some()).count();
    eprintln!("controller: closed within 1.5 s: {quick} of 150");
    ensure!(quick == 50, "{quick} of 150 closed at once, expected 50");

    // Slow headers: TLS, half a request, then nothing: closed after the header timeout.
    let tls = keel_api::client_tls(&paths.ca, None)?;
    let slow = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..20 {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let mut t = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await?;
            t.write_all(b"GET /v1/health HTTP/1.1\r\nHost: keel\r\n")
                .await?;
            t.flush().await?;
            v.push(t);
        }
        let start = Instant::now();
        let mut out = Vec::new();
        for mut t in v {
            let mut b = [0u8; 256];
            let left = Duration::from_secs(12).saturating_sub(start.elapsed());
            let closed = loop {
                match tokio::time::timeout(left, t.read(&mut b)).await {
                    Err(_) => break None,
                    Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
                    Ok(Ok(_)) => {}
                }
            };
            out.push(closed);
        }
        anyhow::Ok(out)
    })?;
    for c in &slow {
        let c = c.context("a slow-header connection is still open after 12 s")?;
        ensure!(c >= Duration::from_millis(1500), "closed too early: {c:?}");
    }
    eprintln!("controller: slow headers closed after {:?}", slow[0]);
    // A slow body (an admin's request, so that the body is read): the body timeout (2 s).
    let admin_tls = keel_api::client_tls(&paths.ca, Some(&paths))?;
    let slow_body = rt.block_on(async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut t = tokio_rustls::TlsConnector::from(admin_tls)
            .connect(name, tcp)
            .await?;
        t.write_all(
            b"POST /v1/volumes HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await?;
        t.flush().await?;
        let start = Instant::now();
        let mut b = [0u8; 1024];
        let mut answer = Vec::new();
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(12), t.read(&mut b)).await {
                Err(_) => break None,
                Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
                Ok(Ok(n)) => answer.extend_from_slice(&b[..n]),
            }
        };
        anyhow::Ok((closed, String::from_utf8_lossy(&answer).into_owned()))
    })?;
    let body_closed = slow_body
        .0
        .context("a slow-body connection is still open after 12 s")?;
    ensure!(
        body_closed >= Duration::from_millis(1500),
        "closed too early: {body_closed:?}"
    );
    eprintln!(
        "controller: slow body closed after {body_closed:?}, answer {:?}",
        slow_body.1.lines().next().unwrap_or("")
    );
    // Without TLS: the handshake timeout.
    let idle = rt.block_on(flood("127.0.0.3", addr, 20))?;
    let closed = rt.block_on(count_closed(idle, Duration::from_secs(12)));
    ensure!(
        closed
            .iter()
            .all(|c| c.is_some_and(|c| c >= Duration::from_secs(3))),
        "connections without TLS: {closed:?}"
    );
    ensure!(alive(pid), "keel-controller died");
    healthy(&rt)?;
    Ok(())
}

/// (c) A node sends 250 reads of 4 MiB and never reads the answers: the server stops reading
/// its requests once 128 MiB of answers wait, its memory stays bounded, it serves others,
/// and it closes the connection once a batch of answers is not taken within the frame
/// timeout.
#[test]
fn unread_answers_are_bounded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    pki.issue(Role::Node, "n1")?;
    let s = Storage::start_with(
        &pki,
        "s1",
        &dir.path().join("s1"),
        &["1:64MiB"],
        "127.0.0.1:0".parse()?,
        &["--frame-timeout-ms", "10000", "--trim-interval-ms", "500"],
        None,
    )?;
    let pid = s.pid().context("pid")?;
    serves(&pki.dir, s.addr, 1, Duration::from_secs(5))?;
    let base = rss(pid);
    let rt = runtime();
    let tls = node_tls(&pki.dir)?;
    let addr = s.addr;
    let (mut rd, sent) = rt.block_on(async {
        let (t, _) = keel_proto::io::connect(addr, tls, Role::Storage).await?;
        let (rd, mut wr) = tokio::io::split(t);
        let sent = Arc::new(AtomicU64::new(0));
        let n = sent.clone();
        tokio::spawn(async move {
            for i in 0..250u64 {
                let mut r = Request::new(Op::Read, i + 1, VOL, Epoch(1));
                r.length = 4 << 20;
                if wr.write_all(&Frame::Request(r).to_bytes()).await.is_err() {
                    break;
                }
                let _ = wr.flush().await;
                n.fetch_add(1, Ordering::Relaxed);
            }
            // Keep the write side open.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(wr);
        });
        anyhow::Ok((rd, sent))
    })?;
    let mut peak = 0;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(rss(pid));
    }
    serves(&pki.dir, s.addr, 2, Duration::from_secs(5))?;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(rss(pid));
    }
    eprintln!(
        "250 unread 4 MiB reads ({} sent): RSS {} MiB before, peak {} MiB",
        sent.load(Ordering::Relaxed),
        base / MIB,
        peak / MIB
    );
    ensure!(
        peak < base + 128 * MIB + 40 * MIB,
        "RSS {} MiB over the bound ({} MiB + 168 MiB)",
        peak / MIB,
        base / MIB
    );
    // The frame timeout (10 s) closes the connection: what is in the socket buffers comes
    // out, then the end; far fewer than 250 answers.
    std::thread::sleep(Duration::from_secs(12));
    let answers = rt.block_on(async {
        let mut buf = Vec::new();
        let mut n = 0u64;
        loop {
            match tokio::time::timeout(
                Duration::from_secs(10),
                keel_proto::io::read_frame(&mut rd, &mut buf),
            )
            .await
            {
                Ok(Ok(Some(_))) => n += 1,
                Ok(_) => return Ok(n),
                Err(_) => anyhow::bail!("the connection is still open ({n} answers read)"),
            }
        }
    })?;
    eprintln!("answers received before the server closed the connection: {answers}");
    ensure!(answers < 250, "all {answers} answers were served");
    std::thread::sleep(Duration::from_secs(2));
    let after = rss(pid);
    // The answers' buffers are freed, but glibc keeps up to M_TRIM_THRESHOLD (256 MiB,
    // keel_proto::tuning) free at the top of the blocking threads' arenas, which
    // malloc_trim does not release: the next requests reuse it (docs/protocol.md).
    eprintln!("RSS after the close: {} MiB", after / MIB);
    ensure!(
        after < base + 128 * MIB + 40 * MIB,
        "RSS {} MiB after the close",
        after / MIB
    );
    ensure!(alive(pid), "keel-storage died");
    serves(&pki.dir, s.addr, 3, Duration::from_secs(5))?;
    Ok(())
}

/// (d) 50 connections each send a 4 MiB write frame without its last byte: payloads are
/// charged to the memory budget (64 MiB here) before they are read, the frames time out
/// (2 s) and their memory goes back to the system.
#[test]
fn partial_frames_time_out_and_are_freed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    pki.issue(Role::Node, "n1")?;
    let s = Storage::start_with(
        &pki,
        "s1",
        &dir.path().join("s1"),
        &["1:64MiB"],
        "127.0.0.1:0".parse()?,
        &[
            "--frame-timeout-ms",
            "2000",
            "--memory-budget",
            "64MiB",
            "--trim-interval-ms",
            "500",
        ],
        None,
    )?;
    let pid = s.pid().context("pid")?;
    serves(&pki.dir, s.addr, 1, Duration::from_secs(5))?;
    let base = rss(pid);
    let (peak, last) = partial_frames(&pki.dir, s.addr, pid)?;
    std::thread::sleep(Duration::from_secs(2));
    let after = rss(pid);
    eprintln!(
        "50 partial 4 MiB frames: RSS {} MiB before, peak {} MiB, {} MiB 2 s after the last closed ({:?})",
        base / MIB,
        peak / MIB,
        after / MIB,
        last
    );
    ensure!(
        peak < base + 64 * MIB + 40 * MIB,
        "RSS peak {} MiB over the bound ({} MiB + 104 MiB)",
        peak / MIB,
        base / MIB
    );
    // Freed, not leaked: a second flood reuses the memory of the first. (How much of it the
    // allocator hands back to the system at once varies from run to run: malloc_trim does not
    // release the free top of a thread's arena, so RSS right after is not asserted; seen in CI
    // at 63 MiB 2 s after the close, and at 7 MiB on a quiet machine.)
    let (peak2, _) = partial_frames(&pki.dir, s.addr, pid)?;
    eprintln!("a second flood: peak {} MiB", peak2 / MIB);
    ensure!(
        peak2 < peak.max(after) + 16 * MIB,
        "the second flood's peak {} MiB grew past the first's {} MiB: memory was not reused",
        peak2 / MIB,
        peak / MIB
    );
    ensure!(alive(pid), "keel-storage died");
    serves(&pki.dir, s.addr, 2, Duration::from_secs(5))?;
    Ok(())
}

/// 50 connections each send a 4 MiB write frame without its last byte and wait for the
/// server to close them; returns the server's peak RSS meanwhile and when the last closed.
fn partial_frames(pki: &Path, addr: std::net::SocketAddr, pid: u32) -> Result<(u64, Duration)> {
    let rt = runtime();
    let start = Instant::now();
    let tasks: Vec<_> = (0..50u64)
        .map(|i| {
            let tls = node_tls(pki).expect("tls");
            rt.spawn(async move {
                let (mut t, _) = keel_proto::io::connect(addr, tls, Role::Storage).await?;
                let mut r = Request::new(Op::Write, i + 1, VOL, Epoch(1));
                let payload = vec![0x5A; 4 << 20];
                r.length = payload.len() as u32;
                r.crc = checksum(&payload);
                r.payload = payload.into();
                let bytes = Frame::Request(r).to_bytes();
                if t.write_all(&bytes[..bytes.len() - 1]).await.is_ok() {
                    let _ = t.flush().await;
                    let mut b = [0u8; 64];
                    loop {
                        match t.read(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
                anyhow::Ok(start.elapsed())
            })
        })
        .collect();
    let mut peak = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "partial frames still open after 60 s"
        );
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut last = Duration::ZERO;
    for t in tasks {
        last = last.max(rt.block_on(t)??);
    }
    Ok((peak, last))
}

/// (e) keel-storage under `ulimit -n 64` and 100 idle connections: accept fails with EMFILE;
/// the daemon logs it, waits and goes on, and serves a valid client once the flood is gone.
#[test]
fn storage_survives_running_out_of_file_descriptors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    pki.issue(Role::Node, "n1")?;
    let s = Storage::start_with(
        &pki,
        "s1",
        &dir.path().join("s1"),
        &["1:64MiB"],
        "127.0.0.1:0".parse()?,
        &["--handshake-timeout-ms", "2000"],
        Some(64),
    )?;
    let pid = s.pid().context("pid")?;
    serves(&pki.dir, s.addr, 1, Duration::from_secs(5))?;
    let rt = runtime();
    let fl = rt.block_on(flood("127.0.0.2", s.addr, 100))?;
    // The daemon runs into its limit (accept fails with EMFILE while it is there).
    let mut most = 0;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        most = most.max(fds);
    }
    eprintln!("open files under ulimit -n 64: at most {most}");
    ensure!(
        most >= 60,
        "the flood did not exhaust the file limit ({most} open)"
    );
    ensure!(alive(pid), "keel-storage died out of file descriptors");
    drop(fl);
    std::thread::sleep(Duration::from_secs(3));
    ensure!(alive(pid), "keel-storage died out of file descriptors");
    serves(&pki.dir, s.addr, 2, Duration::from_secs(15))?;
    Ok(())
}
