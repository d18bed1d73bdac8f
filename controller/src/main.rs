//! keelctl: Keel's command-line tool. This version manages the cluster PKI; the controller's
//! volume lifecycle commands come with the controller.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_proto::{pki, Role};

#[derive(Parser)]
#[command(version, about = "Keel command-line tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster certificates.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for a daemon: writes <role>-<id>.pem and .key in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// storage, node, controller or admin.
        #[arg(long)]
        role: Role,
        #[arg(long)]
        id: String,
        /// Extra DNS names or IP addresses the holder is reached at.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Pki {
            cmd: PkiCmd::Init { dir },
        } => {
            pki::init_ca(&dir).with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!("created CA in {}", dir.display());
        }
        Cmd::Pki {
            cmd:
                PkiCmd::Issue {
                    dir,
                    role,
                    id,
                    hosts,
                },
        } => {
            let p = pki::issue(&dir, role, &id, &hosts).with_context(|| {
                format!(
                    "issuing a {role} certificate (run `keelctl pki init --dir {}` first)",
                    dir.display()
                )
            })?;
            println!("{}", p.cert.display());
        }
    }
    Ok(())
}
