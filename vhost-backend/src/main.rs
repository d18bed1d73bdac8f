//! The keel-vhost daemon: serves one volume on a vhost-user-blk socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keel_proto::tls::TlsPaths;
use keel_proto::{parse_size, Epoch, VolumeId};
use keel_vhost::backend::{DiskConfig, KeelBlk};
use keel_vhost::client::{ClientConfig, VolumeClient};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Keel node manager: serves a volume to a VM as a vhost-user-blk device.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The vhost-user socket to create (give it to QEMU's vhost-user-blk-pci).
    #[arg(long)]
    socket: PathBuf,
    /// The storage server holding the volume's primary copy.
    #[arg(long)]
    server: SocketAddr,
    /// The volume id (hex).
    #[arg(long)]
    volume: VolumeId,
    /// The volume's size as created on the storage server, e.g. 1GiB.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// The volume's epoch (fencing number).
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// PKI directory (ca.pem, node-<id>.pem, node-<id>.key), made by `keelctl pki`.
    #[arg(long)]
    pki_dir: PathBuf,
    /// This node's id (its certificate is node-<id>.pem).
    #[arg(long)]
    id: String,
    /// Number of virtqueues offered to the guest.
    #[arg(long, default_value_t = 1)]
    num_queues: u16,
    /// Largest virtqueue size accepted.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Offer the volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Milliseconds a request may go unanswered before the connection is re-established and
    /// the request resent.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Milliseconds a stopping ring waits for requests in flight before abandoning them to be
    /// re-offered by the frontend.
    #[arg(long, default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// Write the process id to this file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.num_queues == 0 || args.num_queues > 64 {
        anyhow::bail!("--num-queues must be between 1 and 64");
    }
    if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
        anyhow::bail!("--queue-size must be a power of two up to 32768");
    }
    if args.size == 0 || args.size % 512 != 0 {
        anyhow::bail!("--size must be a positive multiple of 512 bytes");
    }
    let tls = keel_proto::tls::client_config(&TlsPaths::in_dir(
        &args.pki_dir,
        &format!("node-{}", args.id),
    ))
    .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = VolumeClient::start(
        ClientConfig {
            server: args.server,
            volume: args.volume,
            epoch: Epoch(args.epoch),
            tls,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
        },
        rt.handle(),
    );
    let disk = DiskConfig {
        volume: args.volume,
        capacity_bytes: args.size,
        read_only: args.read_only,
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
    };
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let mut listener = Listener::new(&args.socket, true)
        .with_context(|| format!("creating socket {}", args.socket.display()))?;
    println!(
        "keel-vhost: serving volume {} on {}",
        args.volume,
        args.socket.display()
    );
    tracing::info!(volume = %args.volume, socket = %args.socket.display(), "ready for a frontend");
    loop {
        let backend = KeelBlk::new(disk.clone(), client.clone()).context("creating the device")?;
        let mut daemon = VhostUserDaemon::new(
            "keel-vhost".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("creating the vhost-user daemon: {e}"))?;
        // One vring thread serves every queue; it also listens for the budget's resume event.
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers
            .first()
            .context("the vhost-user daemon has no vring thread")?;
        handler
            .register_listener(
                backend.resume_fd(),
                vmm_sys_util::epoll::EventSet::IN,
                u64::from(backend.resume_event()),
            )
            .map_err(|e| anyhow::anyhow!("registering the resume event: {e}"))?;
        match daemon.start(&mut listener) {
            Ok(()) => tracing::info!("frontend connected"),
            Err(e) => {
                tracing::error!(error = %e, "accepting a frontend failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        match daemon.wait() {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "frontend session ended with an error"),
        }
        backend.shutdown();
        tracing::info!(
            in_flight = backend.in_flight(),
            "ready for the next frontend"
        );
    }
}
