//! The keel-storage daemon: parses its arguments, sets up logging, runs
//! [`keel_storage::daemon::run`].

use clap::Parser;
use keel_storage::daemon::{run, Args};

fn main() -> anyhow::Result<()> {
    keel_proto::tuning::keep_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Connections and copy files need more descriptors than the usual soft limit of 1024.
    match keel_proto::limits::raise_nofile_limit() {
        Ok((before, after)) => tracing::debug!(before, after, "file limit raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file limit"),
    }
    run(Args::parse())
}
