//! `keelctl up`: a complete single-machine cluster in the foreground.
//!
//! Layout of the cluster directory:
//! ```text
//! DIR/cluster.json        controller URL, ports, server ids (kept across restarts)
//! DIR/pki/                CA, every daemon's certificate, admin.token
//! DIR/controller/         metadata store
//! DIR/storage/<id>/       each storage server's copies
//! DIR/sockets/            vhost-user sockets (one per attachment)
//! DIR/node/               the node manager's attachment records
//! DIR/run/<daemon>.pid    pid files
//! DIR/run/<daemon>.hold   while it exists, a daemon that dies is not restarted
//! DIR/logs/<daemon>.log   each daemon's log (also shown on stdout, prefixed)
//! ```
//! Every daemon runs as `keelctl daemon <kind> ...` (this same executable), so a fresh clone
//! needs only `cargo run --release -p keelctl -- up`. A daemon that dies is restarted.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keel_api::{ApiClient, Health, NodeInfo, ServerInfo};
use keel_proto::tls::TlsPaths;
use keel_proto::{pki, Role};
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// Number of storage servers (each in its own zone).
    #[arg(long, default_value_t = 3)]
    servers: u32,
    /// Controller port (default: a free port chosen at the first start, then kept).
    #[arg(long)]
    port: Option<u16>,
    /// Capacity each storage server offers (default: the free space of the directory).
    #[arg(long)]
    capacity: Option<String>,
    /// The node manager's id.
    #[arg(long, default_value = "node1")]
    node: String,
    /// Seconds to wait for every daemon to answer.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// Passed to the node manager and its keel-vhost processes: milliseconds after which a
    /// guest request no copy answers fails with an I/O error; 0 waits forever (default: the
    /// node manager's, 300000 = 5 minutes).
    #[arg(long)]
    io_fail_after_ms: Option<u64>,
    /// Passed to the node manager and its keel-vhost processes: milliseconds a primary may
    /// leave keel-vhost waiting before the node reports it to the controller (default: the
    /// node manager's, 1000).
    #[arg(long)]
    primary_timeout_ms: Option<u64>,
    /// Passed to the controller: milliseconds without a heartbeat before a server or node is
    /// down (default: the controller's, 3000).
    #[arg(long)]
    failure_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerEntry {
    pub id: String,
    pub port: u16,
    pub zone: String,
}

/// `DIR/cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub controller: String,
    pub servers: Vec<ServerEntry>,
    pub node: String,
}

impl ClusterFile {
    pub fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
        let p = dir.join("cluster.json");
        let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))
    }
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let p = dir.join("cluster.json");
        std::fs::write(&p, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", p.display()))
    }
}

/// Picks free loopback ports, distinct from each other and from those named `taken`: each
/// stays bound until the picker is dropped, because a port closed at once can be handed out
/// again by the next `bind(0)` (two storage servers once got the same port and one could not
/// listen).
struct Ports {
    held: Vec<TcpListener>,
    taken: std::collections::HashSet<u16>,
}

impl Ports {
    fn new(taken: impl IntoIterator<Item = u16>) -> Ports {
        Ports {
            held: Vec::new(),
            taken: taken.into_iter().collect(),
        }
    }

    fn pick(&mut self) -> anyhow::Result<u16> {
        for _ in 0..64 {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let port = l.local_addr()?.port();
            self.held.push(l);
            if self.taken.insert(port) {
                return Ok(port);
            }
        }
        bail!("no free loopback port found")
    }
}

struct Daemon {
    name: String,
    args: Vec<OsString>,
    child: Option<Child>,
    started: Instant,
    /// Its pid file is `DIR/run/<run_name>.pid`; it is not restarted while
    /// `DIR/run/<run_name>.hold` exists.
    run_name: String,
    /// The hold was announced.
    held: bool,
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid; only sends a signal.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Daemon {
    fn spawn(&mut self, dir: &Path) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding keelctl's own executable")?;
        // `ps` shows the daemon's own name (argv[0] here, its comm set by `keelctl daemon`).
        let program = self
            .args
            .first()
            .and_then(|a| a.to_str())
            .map_or("keelctl", crate::daemon_program);
        let mut child = Command::new(exe)
            .arg0(program)
            .arg("daemon")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let log_path = dir.join("logs").join(format!("{}.log", self.name));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let name = self.name.clone();
            let log_path = log_path.clone();
            std::thread::spawn(move || {
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .ok();
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(f) = log.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                    println!("{name:>10} | {line}");
                }
            });
        }
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        signal(&c, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("keel: {} did not stop within 15 s: killing it", self.name);
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Makes the PKI: CA, the controller's, each server's, the node's and the admin's
/// certificates, and an operator bearer token.
fn ensure_pki(pki_dir: &Path, cluster: &ClusterFile) -> anyhow::Result<()> {
    std::fs::create_dir_all(pki_dir)?;
    if !pki_dir.join("ca.pem").exists() {
        pki::init_ca(pki_dir).context("creating the cluster CA")?;
    }
    let mut want = vec![
        (Role::Controller, "main".to_string()),
        (Role::Admin, "keelctl".to_string()),
        (Role::Node, cluster.node.clone()),
    ];
    want.extend(
        cluster
            .servers
            .iter()
            .map(|s| (Role::Storage, s.id.clone())),
    );
    for (role, id) in want {
        if !pki_dir.join(format!("{role}-{id}.pem")).exists() {
            pki::issue(pki_dir, role, &id, &[]).with_context(|| format!("issuing {role}-{id}"))?;
        }
    }
    let token = pki_dir.join("admin.token");
    if !token.exists() {
        let mut b = [0u8; 24];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        std::fs::write(&token, format!("{hex}\n"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn cluster_file(dir: &Path, a: &UpArgs) -> anyhow::Result<ClusterFile> {
    if let Ok(mut c) = ClusterFile::load(dir) {
        if let Some(p) = a.port {
            c.controller = format!("https://127.0.0.1:{p}");
        }
        let controller_port = c
            .controller
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok());
        let mut ports = Ports::new(c.servers.iter().map(|s| s.port).chain(controller_port));
        while c.servers.len() < a.servers as usize {
            let n = c.servers.len() + 1;
            c.servers.push(ServerEntry {
                id: format!("s{n}"),
                port: ports.pick()?,
                zone: format!("zone-{n}"),
            });
        }
        c.save(dir)?;
        return Ok(c);
    }
    if a.servers == 0 {
        bail!("--servers must be at least 1");
    }
    let mut ports = Ports::new(a.port);
    let port = match a.port {
        Some(p) => p,
        None => ports.pick()?,
    };
    let c = ClusterFile {
        controller: format!("https://127.0.0.1:{port}"),
        servers: (1..=a.servers)
            .map(|n| {
                Ok(ServerEntry {
                    id: format!("s{n}"),
                    port: ports.pick()?,
                    zone: format!("zone-{n}"),
                })
            })
            .collect::<anyhow::Result<_>>()?,
        node: a.node.clone(),
    };
    c.save(dir)?;
    Ok(c)
}

async fn wait_ready(
    api: &ApiClient,
    servers: usize,
    node: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("controller not answering yet");
    while Instant::now() < deadline {
        let state = async {
            let s: Vec<ServerInfo> = api.get("/v1/servers").await?;
            let n: Vec<NodeInfo> = api.get("/v1/nodes").await?;
            anyhow::Ok((s, n))
        }
        .await;
        match state {
            Ok((s, n)) => {
                let up = s.iter().filter(|s| s.health == Health::Up).count();
                let node_up = n.iter().any(|n| n.id == node && n.health == Health::Up);
                if up >= servers && node_up {
                    return Ok(());
                }
                last = format!(
                    "{up}/{servers} storage servers up, node {node} {}",
                    if node_up { "up" } else { "not up" }
                );
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the cluster did not become ready within {limit:?}: {last}")
}

fn path_arg(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

pub async fn run(a: UpArgs, dir: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir)?;
    for sub in ["run", "logs", "controller", "storage", "sockets", "node"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    // Refuse to start twice on one directory.
    if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
        for e in rd.flatten() {
            let pid = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                if pid_alive(pid) && e.file_name() == "keelctl.pid" {
                    bail!(
                        "a cluster already runs from {} (keelctl pid {pid}); stop it first",
                        dir.display()
                    );
                }
            }
        }
    }
    std::fs::write(
        dir.join("run/keelctl.pid"),
        format!("{}\n", std::process::id()),
    )?;
    let cluster = cluster_file(&dir, &a)?;
    let pki_dir = dir.join("pki");
    ensure_pki(&pki_dir, &cluster)?;
    let controller_addr = keel_api::client::parse_url(&cluster.controller)?;

    let mut daemons: Vec<Daemon> = Vec::new();
    let run = |name: &str| path_arg(&dir.join("run").join(format!("{name}.pid")));
    let mut args: Vec<OsString> = vec![
        "controller".into(),
        "--listen".into(),
        controller_addr.to_string().into(),
        "--data-dir".into(),
        path_arg(&dir.join("controller")),
        "--pki-dir".into(),
        path_arg(&pki_dir),
        "--token-file".into(),
        path_arg(&pki_dir.join("admin.token")),
        "--pid-file".into(),
        run("controller"),
    ];
    if let Some(ms) = a.failure_timeout_ms {
        args.extend(["--failure-timeout-ms".into(), ms.to_string().into()]);
    }
    daemons.push(Daemon {
        name: "controller".into(),
        run_name: "controller".into(),
        args: std::mem::take(&mut args),
        child: None,
        started: Instant::now(),
        held: false,
    });
    for s in &cluster.servers {
        let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], s.port));
        let mut v: Vec<OsString> = vec![
            "storage".into(),
            "--listen".into(),
            listen.to_string().into(),
            "--data-dir".into(),
            path_arg(&dir.join("storage").join(&s.id)),
            "--pki-dir".into(),
            path_arg(&pki_dir),
            "--id".into(),
            s.id.clone().into(),
            "--controller".into(),
            cluster.controller.clone().into(),
            "--zone".into(),
            s.zone.clone().into(),
            "--pid-file".into(),
            run(&format!("storage-{}", s.id)),
        ];
        if let Some(c) = &a.capacity {
            v.push("--capacity".into());
            v.push(c.into());
        }
        daemons.push(Daemon {
            name: s.id.clone(),
            run_name: format!("storage-{}", s.id),
            args: v,
            child: None,
            started: Instant::now(),
            held: false,
        });
    }
    daemons.push(Daemon {
        name: cluster.node.clone(),
        run_name: "node".into(),
        args: vec![
            "node".into(),
            "--controller".into(),
            cluster.controller.clone().into(),
            "--pki-dir".into(),
            path_arg(&pki_dir),
            "--id".into(),
            cluster.node.clone().into(),
            "--socket-dir".into(),
            path_arg(&dir.join("sockets")),
            "--state-dir".into(),
            path_arg(&dir.join("node")),
            "--pid-file".into(),
            run("node"),
        ],
        child: None,
        started: Instant::now(),
        held: false,
    });
    // keel-vhost's timeouts, through the node manager.
    if let Some(node) = daemons.iter_mut().rev().find(|d| d.name == cluster.node) {
        for (flag, ms) in [
            ("--io-fail-after-ms", a.io_fail_after_ms),
            ("--primary-timeout-ms", a.primary_timeout_ms),
        ] {
            if let Some(ms) = ms {
                node.args.push(flag.into());
                node.args.push(ms.to_string().into());
            }
        }
    }
    for d in &mut daemons {
        std::fs::create_dir_all(dir.join("storage"))?;
        d.spawn(&dir)?;
    }

    let tls = keel_api::client_tls(
        &pki_dir.join("ca.pem"),
        Some(&TlsPaths::in_dir(&pki_dir, "admin-keelctl")),
    )?;
    let api = ApiClient::new(&cluster.controller, tls, None)?.with_timeout(Duration::from_secs(5));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ready = tokio::select! {
        r = wait_ready(&api, cluster.servers.len(), &cluster.node, Duration::from_secs(a.ready_timeout)) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    if let Err(e) = ready {
        stop_all(&mut daemons);
        let _ = std::fs::remove_file(dir.join("run/keelctl.pid"));
        return Err(e);
    }
    println!("keel: ready controller={}", cluster.controller);
    println!(
        "keel: try `keelctl --dir {} volume create 1GiB --name demo` then `keelctl --dir {} volume attach demo --node {} --instance vm1`",
        dir.display(),
        dir.display(),
        cluster.node
    );
    println!(
        "keel: logs are in {}/logs; Ctrl-C stops the cluster",
        dir.display()
    );

    // Supervise: restart a daemon that dies, stop everything on Ctrl-C or SIGTERM.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                for d in &mut daemons {
                    let exited = match d.child.as_mut().map(Child::try_wait) {
                        Some(Ok(Some(status))) => Some(status.to_string()),
                        Some(Err(e)) => Some(e.to_string()),
                        _ => None,
                    };
                    if let Some(status) = exited {
                        d.child = None;
                        println!("keel: {} exited ({status})", d.name);
                    }
                    if d.child.is_none() {
                        // An operator (or a test) keeps a dead daemon down, as if its machine
                        // were gone, by creating this file; removing it restarts the daemon.
                        let hold = dir.join("run").join(format!("{}.hold", d.run_name));
                        if hold.exists() {
                            if !d.held {
                                println!("keel: {} is held by {}: not restarting it until that file is removed", d.name, hold.display());
                                d.held = true;
                            }
                            continue;
                        }
                        d.held = false;
                        println!("keel: restarting {}", d.name);
                        if d.started.elapsed() < Duration::from_secs(1) {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        if let Err(e) = d.spawn(&dir) {
                            println!("keel: restarting {} failed: {e:#}", d.name);
                        }
                    }
                }
            }
        }
    }
    println!("keel: stopping");
    stop_all(&mut daemons);
    // Every daemon has exited: its pid file would name a dead (or reused) pid.
    if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    println!("keel: stopped");
    Ok(())
}

/// Stops the node manager first (it stops the guests' keel-vhost processes), then the storage
/// servers, then the controller.
fn stop_all(daemons: &mut [Daemon]) {
    for d in daemons.iter_mut().rev() {
        d.stop();
    }
}

#[cfg(test)]
mod unit_tests {
    use super::Ports;

    #[test]
    fn picked_ports_are_distinct_and_avoid_the_taken_ones() {
        let mut first = Ports::new([]);
        let taken = first.pick().expect("a port");
        let mut ports = Ports::new([taken]);
        let mut seen = std::collections::HashSet::from([taken]);
        for _ in 0..200 {
            let p = ports.pick().expect("a port");
            assert!(seen.insert(p), "port {p} picked twice");
        }
    }
}
