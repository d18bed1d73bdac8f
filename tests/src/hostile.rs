//! Hostile clients for tests (issue 18; docs/security.md, "Denial of service"): floods of
//! plain TCP connections and how the daemon met each one, a daemon's resident memory, TLS
//! connections from a chosen loopback address, and concurrent API creates. Shared by
//! `hostile_clients.rs`, `controller_races.rs` and `soak.rs`. Loopback only: 127.0.0.x
//! addresses stand for different peers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use http::Method;
use keel_api::ApiClient;
use keel_proto::frame::{checksum, PROTOCOL_VERSION};
use keel_proto::io::{connect, read_frame, write_frame, ClientStream};
use keel_proto::{Epoch, Frame, Hello, Op, Request, Role, Status, VolumeId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Resident memory of `pid`, in bytes (0 once it is gone).
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// A TCP connection from `src` (any port) to `addr`.
/// The port is chosen at connect (`IP_BIND_ADDRESS_NO_PORT`): a bind to port 0 searches for a
/// port free for every destination, which slows down as a flood holds more of them.
async fn connect_from(src: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (an int, as the option takes) from our stack for the
    // socket `s` owns.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(addr).await
}

/// `n` plain TCP connections from `src` to `addr`, sending nothing. `None`: reset while
/// connecting (the server accepted and refused it before the connect returned).
pub async fn flood(src: &str, addr: SocketAddr, n: usize) -> Result<Vec<Option<TcpStream>>> {
    let ip: IpAddr = src.parse()?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        match connect_from(ip, addr).await {
            Ok(c) => v.push(Some(c)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => v.push(None),
            Err(e) => return Err(e).with_context(|| format!("connection {} from {src}", v.len())),
        }
    }
    Ok(v)
}

/// Waits up to `within` for the peer to close `s`; returns when (None: still open).
pub async fn closed_at(s: Option<TcpStream>, start: Instant, within: Duration) -> Option<Duration> {
    let Some(mut s) = s else {
        return Some(Duration::ZERO);
    };
    let mut b = [0u8; 1024];
    let deadline = tokio::time::Instant::from_std(start + within);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// When the peer closed each of `conns` (all watched at once; None: open after `within`).
pub async fn count_closed(
    conns: Vec<Option<TcpStream>>,
    within: Duration,
) -> Vec<Option<Duration>> {
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|s| tokio::spawn(closed_at(s, start, within)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or(None));
    }
    out
}

/// How a daemon met a flood of plain TCP connections from one address.
#[derive(Debug, Default)]
pub struct Tally {
    pub src: String,
    /// Still open `refused_within` after their connect: the daemon holds them.
    pub accepted: usize,
    /// Reset while connecting or closed within `refused_within` of their connect.
    pub refused: usize,
    /// When the last refused connection was seen closed.
    pub last_refused: Option<Instant>,
    /// How long the connects took.
    pub took: Duration,
}

/// A connection's verdict: accepted, or refused (closed) at that instant.
type Verdict = Option<Instant>;

/// Watches `s` from its connect at `at`: refused if the peer closes it within
/// `refused_within`, else accepted; sends the verdict, then (if accepted) goes on watching
/// until `end` and returns when the peer closed it (None: open at the end).
async fn watch(
    mut s: TcpStream,
    at: Instant,
    refused_within: Duration,
    verdict: tokio::sync::mpsc::UnboundedSender<Verdict>,
    mut end: tokio::sync::watch::Receiver<bool>,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::from_std(at + refused_within);
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                let _ = verdict.send(Some(Instant::now()));
                return None;
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = verdict.send(None);
    loop {
        tokio::select! {
            _ = end.wait_for(|e| *e) => return None,
            r = s.read(&mut b) => match r {
                Ok(0) | Err(_) => return Some(Instant::now()),
                Ok(_) => {}
            },
        }
    }
}

/// A flood whose connections are being classified (see [`flood_start`]).
pub struct Pending {
    src: String,
    took: Duration,
    verdicts: tokio::sync::mpsc::UnboundedReceiver<Verdict>,
    n: usize,
    tasks: Vec<tokio::task::JoinHandle<Option<Instant>>>,
}

/// [`flood`], each connection classified from its own connect: refused if the daemon closed it within `refused_within` (a daemon over its limit
/// closes at once, right after `accept`), accepted if it is still open then. Returns once the
/// connects are made (so that floods from several addresses can be made back to back);
/// [`Pending::tally`] waits for the verdicts. Accepted connections are held, and watched,
/// until `end` turns true; [`Pending::end`] then tells when the daemon closed any of them.
/// `refused_within` must be well below the daemon's handshake timeout, which closes accepted
/// connections later.
pub async fn flood_start(
    src: &str,
    addr: SocketAddr,
    n: usize,
    refused_within: Duration,
    end: tokio::sync::watch::Receiver<bool>,
) -> Result<Pending> {
    let ip: IpAddr = src.parse()?;
    let started = Instant::now();
    let (vtx, verdicts) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        match connect_from(ip, addr).await {
            Ok(c) => {
                let (at, vtx, end) = (Instant::now(), vtx.clone(), end.clone());
                tasks.push(tokio::spawn(watch(c, at, refused_within, vtx, end)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                let _ = vtx.send(Some(Instant::now()));
            }
            Err(e) => return Err(e).with_context(|| format!("connection {i} from {src}")),
        }
    }
    Ok(Pending {
        src: src.to_string(),
        took: started.elapsed(),
        verdicts,
        n,
        tasks,
    })
}

impl Pending {
    /// Waits for every connection's verdict.
    pub async fn tally(&mut self) -> Tally {
        let mut t = Tally {
            src: self.src.clone(),
            took: self.took,
            ..Tally::default()
        };
        for _ in 0..self.n {
            match self.verdicts.recv().await {
                Some(None) => t.accepted += 1,
                Some(Some(at)) => {
                    t.refused += 1;
                    t.last_refused = t.last_refused.max(Some(at));
                }
                None => break,
            }
        }
        t
    }

    /// Once `end` is true: when the daemon closed the first of the accepted connections
    /// before the end (None: it held them all); they are closed on return.
    pub async fn end(self) -> Option<Instant> {
        let mut first: Option<Instant> = None;
        for t in self.tasks {
            if let Ok(Some(at)) = t.await {
                first = Some(first.map_or(at, |f| f.min(at)));
            }
        }
        first
    }
}

/// Mutual TLS and a hello to a storage server at `addr`, from `src`, with `config`; like
/// `keel_proto::io::connect`, which cannot choose the source address.
pub async fn hello_from(
    src: &str,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<ClientStream> {
    let tcp = connect_from(src.parse()?, addr).await?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    write_frame(
        &mut tls,
        &Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }),
    )
    .await?;
    let mut buf = Vec::new();
    match read_frame(&mut tls, &mut buf).await? {
        Some(Frame::HelloReply(r)) if r.status == Status::Ok => Ok(tls),
        other => anyhow::bail!("hello from {src} answered {other:?}"),
    }
}

/// When the peer closed each of `conns`, all watched at once from now (None: still open after
/// `within`). Anything the peer sends meanwhile is read and dropped.
pub async fn closed_after<S>(conns: Vec<S>, within: Duration) -> Vec<Option<Duration>>
where
    S: AsyncRead + Unpin + Send + 'static,
{
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + within);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                loop {
                    match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                        Err(_) => return None,
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                        Ok(Ok(_)) => {}
                    }
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or(None));
    }
    out
}

/// How many of `closed` were closed, and when the last of them was.
pub fn closed_summary(closed: &[Option<Duration>]) -> (usize, Duration) {
    let done: Vec<Duration> = closed.iter().flatten().copied().collect();
    (done.len(), done.into_iter().max().unwrap_or_default())
}

fn server_name(addr: SocketAddr) -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::IpAddress(addr.ip().into())
}

/// `n` TLS connections to `addr` with `config` (no hello: a storage server's hello timeout,
/// or a controller's header timeout, applies to them).
pub async fn tls_only(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Vec<tokio_rustls::client::TlsStream<TcpStream>>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = TcpStream::connect(addr).await?;
        v.push(
            tokio_rustls::TlsConnector::from(config.clone())
                .connect(server_name(addr), tcp)
                .await?,
        );
    }
    Ok(v)
}

/// `n` TLS connections with `config`, made one after the other, each sending a few bytes and
/// reading: how many the server refused (a failed handshake, an error or the end on the first
/// read, within 20 s each). For a config without a client certificate against a server that
/// requires one (TLS 1.3: the client's side of the handshake completes before the server
/// checks).
pub async fn tls_refused(addr: SocketAddr, config: Arc<rustls::ClientConfig>, n: usize) -> usize {
    let mut refused = 0;
    for _ in 0..n {
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            let tcp = TcpStream::connect(addr).await?;
            let mut s = tokio_rustls::TlsConnector::from(config.clone())
                .connect(server_name(addr), tcp)
                .await?;
            s.write_all(b"KEEL").await?;
            let mut b = [0u8; 64];
            anyhow::Ok(s.read(&mut b).await?)
        })
        .await;
        if matches!(r, Ok(Err(_)) | Ok(Ok(0))) {
            refused += 1;
        }
    }
    refused
}

/// `n` connections to a storage server (mutual TLS with `config`, hello), each sending a
/// 4 MiB write frame to `volume` without its last byte. The payload is charged to the budgets
/// and read before the request is looked at, so a volume that exists nowhere will do.
pub async fn partial_frames(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    volume: VolumeId,
    n: usize,
) -> Result<Vec<ClientStream>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let (mut s, _) = connect(addr, config.clone(), Role::Storage).await?;
        let mut req = Request::new(Op::Write, i + 1, volume, Epoch(1));
        let payload = vec![0x5A; 4 << 20];
        req.length = payload.len() as u32;
        req.crc = checksum(&payload);
        req.payload = payload.into();
        let bytes = Frame::Request(req).to_bytes();
        s.write_all(&bytes[..bytes.len() - 1]).await?;
        s.flush().await?;
        v.push(s);
    }
    Ok(v)
}

/// `n` connections to the controller's API with `config`, each sending half a request's
/// headers and nothing after.
pub async fn slow_headers(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Vec<tokio_rustls::client::TlsStream<TcpStream>>> {
    let mut v = tls_only(addr, config, n).await?;
    for s in &mut v {
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: keel\r\n")
            .await?;
        s.flush().await?;
    }
    Ok(v)
}

/// One connection to a storage server that sends `n` reads of 4 MiB of `volume` at `epoch`
/// (offsets wrapping at `size`), and reads none of the answers.
pub async fn unread_reads(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    volume: VolumeId,
    epoch: Epoch,
    size: u64,
    n: u64,
) -> Result<ClientStream> {
    let (mut s, _) = connect(addr, config, Role::Storage).await?;
    for i in 0..n {
        let mut req = Request::new(Op::Read, i + 1, volume, epoch);
        req.offset = (i * (4 << 20)) % size;
        req.length = 4 << 20;
        tokio::time::timeout(
            Duration::from_secs(20),
            s.write_all(&Frame::Request(req).to_bytes()),
        )
        .await
        .context("writing read requests")??;
    }
    s.flush().await?;
    Ok(s)
}

/// The answers that still come on `s` (up to `max`, each within 5 s), all required `Ok`.
pub async fn drain_answers(s: &mut ClientStream, max: u64) -> Result<u64> {
    let mut buf = Vec::new();
    let mut answers = 0u64;
    while let Ok(Ok(Some(Frame::Response(a)))) =
        tokio::time::timeout(Duration::from_secs(5), read_frame(s, &mut buf)).await
    {
        anyhow::ensure!(a.status == Status::Ok, "a read answered {}", a.status);
        answers += 1;
        if answers >= max {
            break;
        }
    }
    Ok(answers)
}

/// Samples processes' resident memory every 100 ms, keeping each one's peak, until dropped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<_> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (pid, peak) in pids.iter().zip(&p) {
                    peak.fetch_max(rss(*pid), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// Each process's peak so far, in bytes.
    pub fn peaks(&self) -> Vec<u64> {
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `racers` creates of `body` through `api`, released together; their (status, body).
pub async fn race_creates(
    api: &ApiClient,
    body: &str,
    racers: usize,
) -> Result<Vec<(u16, Vec<u8>)>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(racers));
    let tasks: Vec<_> = (0..racers)
        .map(|_| {
            let (api, barrier, body) = (api.clone(), barrier.clone(), body.to_string());
            tokio::spawn(async move {
                barrier.wait().await;
                api.raw(Method::POST, "/v1/volumes", Some(body.into_bytes()))
                    .await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            t.await
                .context("a racer panicked")?
                .context("create answered")?,
        );
    }
    Ok(out)
}

/// Deletes volume `id` and waits (up to 10 s) until the list no longer shows it.
pub async fn delete_volume(api: &ApiClient, id: &str) -> Result<()> {
    let (s, b) = api
        .raw(Method::DELETE, &format!("/v1/volumes/{id}"), None)
        .await?;
    anyhow::ensure!(s == 200, "delete {id}: {s} {}", String::from_utf8_lossy(&b));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let vols: Vec<serde_json::Value> = api.get("/v1/volumes").await?;
        if !vols.iter().any(|v| v["id"] == id) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "volume {id} not gone after delete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<keel_api::ErrorBody>(body)
        .map(|e| e.code)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

/// The bodies of the answers 200 among `answers`, and fails unless every other answer is
/// `status` with error code `code`.
fn winners<'a>(answers: &'a [(u16, Vec<u8>)], status: u16, code: &str) -> Result<Vec<&'a [u8]>> {
    for (s, b) in answers.iter().filter(|a| a.0 != 200) {
        let c = error_code(b);
        anyhow::ensure!(
            (*s, c.as_str()) == (status, code),
            "a racer got {s} {c}, expected {status} {code}"
        );
    }
    Ok(answers
        .iter()
        .filter(|a| a.0 == 200)
        .map(|a| a.1.as_slice())
        .collect())
}

/// `racers` concurrent creates of a 1 MiB volume named `name`: exactly one wins, the others
/// are 409, exactly one volume has the name; then deleted.
pub async fn one_name_round(api: &ApiClient, name: &str, racers: usize) -> Result<()> {
    let body = format!(r#"{{"size":"1MiB","replicas":1,"name":"{name}"}}"#);
    let answers = race_creates(api, &body, racers).await?;
    let won = winners(&answers, 409, "conflict")?;
    anyhow::ensure!(won.len() == 1, "{} creates of {name} won", won.len());
    let v: serde_json::Value = serde_json::from_slice(won[0])?;
    let id = v["id"].as_str().context("no id")?;
    let vols: Vec<serde_json::Value> = api.get("/v1/volumes").await?;
    let holders: Vec<&str> = vols
        .iter()
        .filter(|v| v["name"] == name)
        .filter_map(|v| v["id"].as_str())
        .collect();
    anyhow::ensure!(holders == [id], "volumes named {name}: {holders:?}");
    delete_volume(api, id).await
}

/// `racers` concurrent creates of `body`, which fits once: exactly one wins, the others are
/// refused for capacity, no server is over-committed; then deleted.
pub async fn capacity_round(api: &ApiClient, body: &str, racers: usize) -> Result<()> {
    let answers = race_creates(api, body, racers).await?;
    over_committed(api).await?;
    let won = winners(&answers, 400, "insufficient_capacity")?;
    anyhow::ensure!(won.len() == 1, "{} creates of {body} won", won.len());
    let v: serde_json::Value = serde_json::from_slice(won[0])?;
    delete_volume(api, v["id"].as_str().context("no id")?).await
}

/// Fails if any server's allocation exceeds its capacity.
pub async fn over_committed(api: &ApiClient) -> Result<()> {
    let servers: Vec<serde_json::Value> = api.get("/v1/servers").await?;
    for s in &servers {
        let (a, c) = (s["allocated_bytes"].as_u64(), s["capacity_bytes"].as_u64());
        anyhow::ensure!(a.is_some() && c.is_some() && a <= c, "over-committed: {s}");
    }
    Ok(())
}
