//! The keel-storage daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use keel_proto::tls::TlsPaths;
use keel_proto::{parse_size, Epoch, VolumeId};
use keel_storage::copy::CopyRole;
use keel_storage::store::Store;

/// Keel storage server: holds volume copies and serves them over mutual TLS.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7500")]
    listen: SocketAddr,
    /// Directory holding the copies.
    #[arg(long)]
    data_dir: PathBuf,
    /// PKI directory (ca.pem, storage-<id>.pem, storage-<id>.key), made by `keelctl pki`.
    #[arg(long)]
    pki_dir: PathBuf,
    /// This server's id (its certificate is storage-<id>.pem).
    #[arg(long)]
    id: String,
    /// Create a primary copy at startup unless it exists: VOLUME:SIZE[:EPOCH], e.g. 1:1GiB.
    #[arg(long = "create", value_name = "VOLUME:SIZE[:EPOCH]")]
    create: Vec<String>,
    /// Write the process id to this file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tls = keel_proto::tls::server_config(&TlsPaths::in_dir(
        &args.pki_dir,
        &format!("storage-{}", args.id),
    ))
    .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let store = Arc::new(
        Store::open(&args.data_dir)
            .with_context(|| format!("opening data directory {}", args.data_dir.display()))?,
    );
    for c in &args.create {
        let (vol, size, epoch) = parse_create(c).with_context(|| format!("--create {c}"))?;
        let copy = store
            .create(vol, size, CopyRole::Primary, epoch)
            .with_context(|| format!("creating volume {vol}"))?;
        tracing::info!(volume = %vol, size, epoch = %copy.epoch(), "copy ready");
    }
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("keel-storage: listening on {addr}");
        tracing::info!(%addr, id = %args.id, "keel-storage ready");
        let server = keel_storage::server::serve(listener, store.clone(), tls);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = server => r.context("accept loop")?,
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down: syncing copies");
        for c in store.list() {
            if let Err(e) = c.flush() {
                tracing::error!(volume = %c.volume(), error = %e, "final sync failed");
            }
        }
        Ok(())
    })
}
