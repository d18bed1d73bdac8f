//! The keel-vhost daemon: serves one volume on a vhost-user-blk socket (see
//! [`keel_vhost::daemon`]).

use clap::Parser;
use keel_vhost::daemon::{self, Args};

fn main() -> anyhow::Result<()> {
    keel_proto::tuning::keep_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    daemon::run(Args::parse())
}
