//! The keel-storage daemon: command-line arguments and the process's main loop, as a library
//! entry point so that other code (the controller registration, tests) can start it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use keel_proto::members::{Access, Grant};
use keel_proto::tls::TlsPaths;
use keel_proto::{parse_size, Epoch, VolumeId};

use crate::copy::CopyRole;
use crate::replicate::{MirrorFailure, RefuseMirrorFailure, Replication};
use crate::server::Stats;
use crate::store::Store;

/// Keel storage server: holds volume copies and serves them over mutual TLS.
#[derive(Parser, Debug, Clone)]
#[command(name = "keel-storage", version)]
pub struct Args {
    /// Threads running the network side (TLS, frames, page-cache reads and small writes).
    /// One is fastest on a small host that the VMs share: every hand-off between threads
    /// costs a wake-up (docs/performance.md); raise it on hosts with cores to spare.
    #[arg(long, env = "KEEL_IO_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7500")]
    pub listen: SocketAddr,
    /// Directory holding the copies.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// PKI directory (ca.pem, storage-<id>.pem, storage-<id>.key), made by `keelctl pki`.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// This server's id (its certificate is storage-<id>.pem).
    #[arg(long)]
    pub id: String,
    /// Create a primary copy at startup unless it exists: VOLUME:SIZE[:EPOCH], e.g. 1:1GiB.
    #[arg(long = "create", value_name = "VOLUME:SIZE[:EPOCH]")]
    pub create: Vec<String>,
    /// Grant node certificate NODE access to every `--create` copy (`:ro` for read-only).
    /// Without a grant no node may use a copy; a server with a controller gets its grants from
    /// it only (docs/security.md), so this is refused with `--controller`. Repeat for several
    /// nodes.
    #[arg(long = "grant", value_name = "NODE[:ro]", value_parser = parse_grant, conflicts_with = "controller")]
    pub grant: Vec<Grant>,
    /// Write the process id to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// The controller to register with and heartbeat to (https://IP:PORT); without it the
    /// server runs standalone.
    #[arg(long)]
    pub controller: Option<String>,
    /// Failure-domain label (zone or rack) reported to the controller.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// Bytes offered for copies, e.g. 100GiB (default: the data directory's free space).
    #[arg(long, value_parser = parse_size)]
    pub capacity: Option<u64>,
    /// Address clients should use, if not the listening address (e.g. behind NAT).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Milliseconds a mirror has to answer a replicated request (connecting included) before
    /// the primary reports it failed.
    #[arg(long, default_value_t = 1000)]
    pub replication_timeout_ms: u64,
    /// Rebuilds (copying a primary's data to a new or returning mirror) run at once.
    #[arg(long, default_value_t = crate::replicate::DEFAULT_REBUILD_CONCURRENCY)]
    pub rebuild_concurrency: usize,
    /// Bandwidth for rebuilds, in MiB/s, shared by all of them (0: unlimited).
    #[arg(long, default_value_t = 200)]
    pub rebuild_mbps: u64,
    /// Connections open at once; more are closed at once, before TLS (docs/security.md,
    /// "Denial of service").
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections open at once from one address.
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_ip: usize,
    /// Milliseconds for a connection's TLS handshake and hello together.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Milliseconds for a frame to arrive once its first byte did, and for a batch of answers
    /// to be written.
    #[arg(long, default_value_t = 30_000)]
    pub frame_timeout_ms: u64,
    /// Seconds after which a connection that sent nothing and has nothing in flight is closed
    /// (not a node's claimed connection, nor a storage server's).
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_s: u64,
    /// Bytes in flight across all connections (request payloads, work, unwritten answers),
    /// e.g. 1GiB; each connection also has its own 128 MiB.
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    pub memory_budget: u64,
    /// Milliseconds between returns of the allocator's free memory to the system while
    /// nothing is in flight (0: never).
    #[arg(long, default_value_t = 30_000)]
    pub trim_interval_ms: u64,
}

impl Args {
    /// The server's limits against clients that hold connections or memory.
    pub fn limits(&self) -> crate::server::Limits {
        use std::time::Duration;
        crate::server::Limits {
            conns: keel_proto::limits::ConnLimits {
                max_total: self.max_connections.max(1),
                max_per_ip: self.max_connections_per_ip.max(1),
            },
            handshake: Duration::from_millis(self.handshake_timeout_ms.max(1)),
            frame: Duration::from_millis(self.frame_timeout_ms.max(1)),
            idle: Duration::from_secs(self.idle_timeout_s.max(1)),
            memory: self.memory_budget.max(4 << 20),
            trim_interval: Duration::from_millis(self.trim_interval_ms),
        }
    }
}

/// Free bytes of the filesystem holding `dir`.
fn free_space(dir: &std::path::Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes only into the zeroed struct we pass; `c` is a valid C string.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(std::io::Error::last_os_error()).context("statvfs of the data directory");
        }
        st
    };
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// `NODE` or `NODE:rw` (read-write), `NODE:ro` (read-only).
fn parse_grant(s: &str) -> Result<Grant, String> {
    let (node, access) = match s.split_once(':') {
        None => (s, Access::ReadWrite),
        Some((n, "rw")) => (n, Access::ReadWrite),
        Some((n, "ro")) => (n, Access::ReadOnly),
        Some((_, other)) => {
            return Err(format!(
                "access {other:?} is neither rw nor ro; use NODE, NODE:rw or NODE:ro"
            ))
        }
    };
    if !keel_proto::members::valid_id(node) {
        return Err(format!(
            "{node:?} is not a node certificate id (1 to 64 letters, digits, '-', '_' or '.')"
        ));
    }
    Ok(Grant {
        node: node.to_string(),
        access,
    })
}

fn parse_create(s: &str) -> anyhow::Result<(VolumeId, u64, Epoch)> {
    let mut parts = s.split(':');
    let vol = parts
        .next()
        .context("missing volume id")?
        .parse::<VolumeId>()?;
    let size = parse_size(
        parts
            .next()
            .context("--create needs VOLUME:SIZE, e.g. 1:1GiB")?,
    )
    .map_err(anyhow::Error::msg)?;
    let epoch = match parts.next() {
        Some(e) => Epoch(e.parse().context("epoch must be a number")?),
        None => Epoch(1),
    };
    Ok((vol, size, epoch))
}

/// Runs the daemon until SIGINT or SIGTERM: opens the data directory, creates the `--create`
/// copies, listens, prints `keel-storage: listening on ADDR` on stdout once ready, serves, and
/// syncs every copy before returning. Builds its own tokio runtime; tracing is the caller's.
/// A mirror failing a replicated request is never dropped ([`RefuseMirrorFailure`]): see
/// [`run_with`].
pub fn run(args: Args) -> anyhow::Result<()> {
    let failure: Arc<dyn MirrorFailure> = match &args.controller {
        Some(url) => {
            let paths = TlsPaths::in_dir(&args.pki_dir, &format!("storage-{}", args.id));
            let api_tls = keel_api::client_tls(&paths.ca, Some(&paths))
                .context("loading TLS certificates for the controller")?;
            Arc::new(crate::register::ControllerMirrorFailure {
                api: keel_api::ApiClient::new(url, api_tls, None)?
                    .with_timeout(std::time::Duration::from_secs(10)),
            })
        }
        None => Arc::new(RefuseMirrorFailure),
    };
    run_with(args, failure)
}

/// [`run`], with `failure` deciding what a primary does when one of its mirrors fails a
/// replicated request (e.g. ask the controller to drop it: see
/// [`crate::replicate::MirrorFailure`]).
pub fn run_with(args: Args, failure: Arc<dyn MirrorFailure>) -> anyhow::Result<()> {
    let paths = TlsPaths::in_dir(&args.pki_dir, &format!("storage-{}", args.id));
    // One source for serving, replicating and the controller: a renewed certificate is picked
    // up without a restart, the CRL (kept in the data directory) applies to all.
    let source = keel_proto::tls::TlsSource::new(&paths)
        .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let crl_file = args.data_dir.join("crl.pem");
    keel_api::load_saved_crl(&source, &crl_file);
    let tls = source.server_config().context("TLS configuration")?;
    // The same certificate, as a client of the mirrors.
    let client_tls = source
        .client_config()
        .context("TLS configuration for replication")?;
    let replication = Replication {
        client_tls: Some(client_tls),
        timeout: std::time::Duration::from_millis(args.replication_timeout_ms.max(1)),
        failure,
        rebuild_concurrency: args.rebuild_concurrency.max(1),
        rebuild_bytes_per_sec: args.rebuild_mbps.saturating_mul(1 << 20),
    };
    let repl = Arc::new(crate::replicate::Replicator::new(replication));
    let store = Arc::new(
        Store::open(&args.data_dir)
            .with_context(|| format!("opening data directory {}", args.data_dir.display()))?,
    );
    for c in &args.create {
        let (vol, size, epoch) = parse_create(c).with_context(|| format!("--create {c}"))?;
        let copy = store
            .create(vol, size, CopyRole::Primary, epoch)
            .with_context(|| format!("creating volume {vol}"))?;
        if !args.grant.is_empty() {
            let mut list = (*copy.access()).clone();
            list.in_sync = copy.mirrors().to_vec();
            list.rebuilding = copy.rebuilding().to_vec();
            for g in &args.grant {
                list.grants.retain(|x| x.node != g.node);
                list.grants.push(g.clone());
            }
            copy.set_members(copy.role(), copy.epoch(), copy.writer_epoch(), &list)
                .with_context(|| format!("granting access to volume {vol}"))?;
        }
        tracing::info!(volume = %vol, size, epoch = %copy.epoch(), "copy ready");
    }
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let stats = Arc::new(Stats::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.io_threads))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("keel-storage: listening on {addr}");
        tracing::info!(%addr, id = %args.id, "keel-storage ready");
        if let Some(url) = &args.controller {
            let api_tls = keel_api::client_tls_from(&source)
                .context("TLS configuration for the controller")?;
            let capacity = match args.capacity {
                Some(c) => c,
                None => free_space(&args.data_dir)?,
            };
            let reg = crate::register::Registration {
                api: keel_api::ApiClient::new(url, api_tls, None)?
                    .with_timeout(std::time::Duration::from_secs(10)),
                id: args.id.clone(),
                address: args.advertise.unwrap_or(addr),
                zone: args.zone.clone(),
                capacity_bytes: capacity,
                interval: std::time::Duration::from_millis(args.heartbeat_ms),
                tls: Some(source.clone()),
                crl_file: Some(crl_file.clone()),
            };
            tokio::spawn(crate::register::run(
                reg,
                store.clone(),
                stats.clone(),
                repl.clone(),
            ));
        }
        let server = crate::server::serve_limited(
            listener,
            store.clone(),
            tls,
            stats.clone(),
            repl.clone(),
            args.limits(),
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = server => r.context("accept loop")?,
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let st = stats.snapshot();
        tracing::info!(
            reads = st.reads,
            writes = st.writes,
            bytes_read = st.bytes_read,
            bytes_written = st.bytes_written,
            errors = st.errors,
            refused = st.refused,
            used_bytes = store.used_bytes(),
            "shutting down: syncing copies"
        );
        for c in store.list() {
            if let Err(e) = c.flush() {
                tracing::error!(volume = %c.volume(), error = %e, "final sync failed");
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn create_specs_parse() {
        let (v, s, e) = parse_create("51:64MiB").expect("parse");
        assert_eq!((v, s, e), (VolumeId(0x51), 64 << 20, Epoch(1)));
        let (_, _, e) = parse_create("1:1GiB:7").expect("parse");
        assert_eq!(e, Epoch(7));
        assert!(parse_create("1").is_err());
        assert!(parse_create("1:1GiB:x").is_err());
    }

    #[test]
    fn grant_specs_parse() {
        let g = parse_grant("n1").expect("parse");
        assert_eq!((g.node.as_str(), g.access), ("n1", Access::ReadWrite));
        assert_eq!(parse_grant("n1:ro").expect("ro").access, Access::ReadOnly);
        assert_eq!(parse_grant("n1:rw").expect("rw").access, Access::ReadWrite);
        assert!(parse_grant("n1:x").is_err());
        assert!(parse_grant("*").is_err());
        assert!(parse_grant("").is_err());
    }

    #[test]
    fn flags_are_unchanged() {
        let a = Args::try_parse_from([
            "keel-storage",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "d",
            "--pki-dir",
            "p",
            "--id",
            "s1",
            "--create",
            "1:1GiB",
            "--create",
            "2:2GiB:3",
            "--pid-file",
            "pid",
        ])
        .expect("parse");
        assert_eq!(a.create.len(), 2);
        assert_eq!(a.id, "s1");
        assert_eq!(a.replication_timeout_ms, 1000);
        assert!(Args::try_parse_from(["keel-storage", "--id", "s1"]).is_err());
    }
}
