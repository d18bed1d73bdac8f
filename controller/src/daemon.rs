//! The keel-controller daemon: metadata store, reconciler and HTTPS API in one process.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_proto::tls::{TlsPaths, TlsSource};

use crate::http::{router, serve_limited, server_tls, ApiLimits, AppState};
use crate::pki::Revocations;
use crate::push::Pusher;
use crate::service::{Config, Controller};
use crate::store::{MetaStore, RedbStore};

/// Keel controller: owns volumes, placement and attachments; serves the HTTPS API.
#[derive(clap::Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// Address for the HTTPS API (port 0 picks a free port; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Directory for the metadata store (meta.redb).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// PKI directory (ca.pem, controller-<id>.pem/.key), made by `keelctl pki`.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// This controller's id (its certificate is controller-<id>.pem).
    #[arg(long, default_value = "main")]
    pub id: String,
    /// File of bearer tokens (one per line) that authenticate operators.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Milliseconds without a heartbeat after which a server or node is down.
    #[arg(long, default_value_t = 3000)]
    pub failure_timeout_ms: u64,
    /// Milliseconds the controller's own probe of a primary a node reported unreachable may
    /// take before the report is taken as confirmed (docs/replication.md, R6).
    #[arg(long, default_value_t = 500)]
    pub probe_timeout_ms: u64,
    /// Milliseconds a push to a storage server may take.
    #[arg(long, default_value_t = 5000)]
    pub push_timeout_ms: u64,
    /// Write the process id to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// API connections open at once; more are closed at once, before TLS (docs/security.md,
    /// "Denial of service").
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// API connections open at once from one address.
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_ip: usize,
    /// Milliseconds for an API connection's TLS handshake.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Milliseconds for a request's headers to arrive (and an idle keep-alive connection's
    /// life).
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Milliseconds for a request's body to arrive once its headers did.
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
}

impl Args {
    /// The API server's limits against clients that hold connections.
    pub fn limits(&self) -> ApiLimits {
        ApiLimits {
            conns: keel_proto::limits::ConnLimits {
                max_total: self.max_connections.max(1),
                max_per_ip: self.max_connections_per_ip.max(1),
            },
            handshake: Duration::from_millis(self.handshake_timeout_ms.max(1)),
            headers: Duration::from_millis(self.header_timeout_ms.max(1)),
            body: Duration::from_millis(self.body_timeout_ms.max(1)),
        }
    }
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> anyhow::Result<()> {
    let paths = TlsPaths::in_dir(&args.pki_dir, &format!("controller-{}", args.id));
    // One source for the API server and the pushes: the certificate is re-read when renewed,
    // the CRL applies to both.
    let source = TlsSource::new(&paths)
        .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let api_tls = server_tls(&source).context("TLS configuration of the API")?;
    let push_tls = source
        .client_config()
        .context("TLS configuration of the pushes")?;
    let tokens: HashSet<String> = match &args.token_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect(),
        None => HashSet::new(),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let db = args.data_dir.join("meta.redb");
    let store: Arc<dyn MetaStore> = Arc::new(
        RedbStore::open(&db)
            .with_context(|| format!("opening the metadata store {}", db.display()))?,
    );
    let revocations = Arc::new(Revocations::new(source, store.clone()));
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let limits = args.limits();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let controller = Controller::new(
            store,
            Pusher::new(push_tls, Duration::from_millis(args.push_timeout_ms)),
            Config {
                failure_timeout: Duration::from_millis(args.failure_timeout_ms),
                probe_timeout: Duration::from_millis(args.probe_timeout_ms),
                ..Config::default()
            },
        );
        tokio::spawn(controller.clone().reconcile_forever());
        let app = router(Arc::new(AppState {
            controller,
            tokens,
            revocations,
        }));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("keel-controller: listening on https://{addr}");
        tracing::info!(%addr, "keel-controller ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = serve_limited(listener, api_tls, app, limits) => r.context("accept loop")?,
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("keel-controller stopping");
        Ok(())
    })
}
