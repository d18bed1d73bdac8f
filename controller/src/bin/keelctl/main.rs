//! keelctl: Keel's command-line tool. Starts a local cluster (`up`), drives the controller's
//! API (volumes, servers, nodes), manages the PKI, and runs Keel's daemons (`daemon ...`) so a
//! single executable is enough for a whole cluster.
//!
//! Exit codes: 0 success, 1 unexpected failure, 2 usage error, 3 not found, 4 conflict,
//! 5 invalid request or not enough capacity, 6 not authorised, 7 controller unreachable or
//! unavailable (also: no cluster in the directory), 8 attached but the node did not serve the
//! socket in time.

mod output;
mod pki;
mod up;

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use keel_api::{
    ApiClient, AttachVolume, ClientError, CreateVolume, DeleteResult, DetachVolume, NodeInfo,
    ResizeVolume, ServerInfo, SizeInput, VolumeInfo,
};
use keel_proto::tls::TlsPaths;

#[derive(Parser)]
#[command(version, about = "Keel command-line tool", propagate_version = true)]
struct Cli {
    /// Cluster directory made by `keelctl up` (its pki/ and cluster.json are used).
    #[arg(long, global = true, env = "KEEL_DIR")]
    dir: Option<PathBuf>,
    /// Controller URL (https://IP:PORT); default: the one recorded in the cluster directory.
    #[arg(long, global = true, env = "KEEL_CONTROLLER")]
    controller: Option<String>,
    /// Bearer token instead of the admin certificate.
    #[arg(long, global = true, env = "KEEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a complete local cluster in the foreground (PKI, controller, storage servers,
    /// node manager); Ctrl-C stops it. Restarting with the same --dir brings everything back.
    #[command(after_help = "Example: keelctl up --dir ~/.keel --servers 3 --capacity 20GiB")]
    Up(up::UpArgs),
    /// Volumes: create, list, describe, delete, resize, attach, detach.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Storage servers.
    Server {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Node managers (hosts that run guests).
    Node {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Cluster certificates.
    Pki {
        #[command(subcommand)]
        cmd: pki::PkiCmd,
    },
    /// Print a shell completion script, e.g.
    /// `keelctl completion bash > /etc/bash_completion.d/keelctl`,
    /// `keelctl completion zsh > ~/.zfunc/_keelctl` (with `fpath+=~/.zfunc` before `compinit`),
    /// `keelctl completion fish > ~/.config/fish/completions/keelctl.fish`.
    Completion {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Run one of Keel's daemons (used by `up`; each also exists as its own binary).
    #[command(hide = true)]
    Daemon {
        #[command(subcommand)]
        which: Box<DaemonCmd>,
    },
}

#[derive(Subcommand)]
enum ListCmd {
    /// List them with their health (up or down) and what they hold.
    #[command(after_help = "Example: keelctl server list -o json")]
    List,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume, e.g. `keelctl volume create 10GiB --name data1`.
    #[command(after_help = "Example: keelctl volume create 10GiB --name data1 --replicas 2")]
    Create {
        /// Size: bytes, or e.g. 512MiB, 10GiB, 1.5T (binary units; K, M, G, T are the same), 10GB (powers of 1000); a multiple of 512.
        size: String,
        /// Unique name, usable instead of the id: 1 to 64 of [A-Za-z0-9._-], not only hex
        /// digits and not starting with `vol-` (those are volume ids).
        #[arg(long)]
        name: Option<String>,
        /// Copies to keep on distinct servers (1–3; the controller's default is 2).
        #[arg(long)]
        replicas: Option<u32>,
        /// Logical block size the guest sees: 512 (default; firmware boots only from it, and
        /// disk images expect it) or 4096. Fixed for the volume's life.
        #[arg(long)]
        block_size: Option<u32>,
    },
    /// List volumes.
    #[command(after_help = "Example: keelctl volume list -o json")]
    List,
    /// Show a volume: size, state, epoch, copies, attachments.
    #[command(after_help = "Example: keelctl volume describe data1")]
    Describe {
        /// The volume: its id (16 hex digits, optionally after vol-) or its name.
        volume: String,
    },
    /// Delete a detached volume and its copies.
    #[command(after_help = "Example: keelctl volume delete data1")]
    Delete {
        /// The volume: its id (16 hex digits, optionally after vol-) or its name.
        volume: String,
    },
    /// Grow a volume (online: an attached guest sees the new capacity).
    #[command(after_help = "Example: keelctl volume resize data1 20GiB")]
    Resize {
        /// The volume: its id (16 hex digits, optionally after vol-) or its name.
        volume: String,
        /// The new size, larger than the current one: bytes or e.g. 20GiB, as for create.
        size: String,
    },
    /// Attach a volume to an instance on a node; prints the vhost-user socket for QEMU once
    /// it accepts connections (unless --no-wait), so `keelctl volume attach ... && qemu ...`
    /// works.
    #[command(
        after_help = "Example (waits for the socket, then starts a VM on it):\n  qemu-configs/qemu.sh \"$(keelctl volume attach data1 --node node1 --instance vm1 -o json | jq -r .socket)\""
    )]
    Attach {
        /// The volume: its id (16 hex digits, optionally after vol-) or its name.
        volume: String,
        /// The node (host) whose node manager serves the volume (`keelctl node list`).
        #[arg(long)]
        node: String,
        /// The VM on that node, any name of [A-Za-z0-9._-]: one socket per instance.
        #[arg(long)]
        instance: String,
        /// Attach read-only: the guest may read, writes fail; readers coexist with the writer.
        #[arg(long)]
        read_only: bool,
        /// Take the read-write attachment from its holder, fencing the old writer.
        #[arg(long)]
        force: bool,
        /// Answer as soon as the attachment is recorded, before the node serves the socket
        /// (it appears a moment later).
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the node to serve the socket (1-60); past them keelctl exits
        /// with code 8, the attachment staying recorded.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=60), conflicts_with = "no_wait")]
        wait_timeout: u64,
    },
    /// Detach a volume from an instance.
    #[command(after_help = "Example: keelctl volume detach data1 --node node1 --instance vm1")]
    Detach {
        /// The volume: its id (16 hex digits, optionally after vol-) or its name.
        volume: String,
        /// The node the attachment is on.
        #[arg(long)]
        node: String,
        /// The instance the volume is attached to.
        #[arg(long)]
        instance: String,
        /// Detach although a guest is connected (its I/O then fails).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum DaemonCmd {
    Controller(keel_controller::daemon::Args),
    Storage(keel_storage::daemon::Args),
    Vhost(keel_vhost::daemon::Args),
    Node(keel_vhost::node::NodeArgs),
}

/// Where the admin credentials and the controller URL of a cluster directory are.
pub fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".keel")
}

fn client(cli: &Cli) -> anyhow::Result<ApiClient> {
    let dir = cli.dir.clone().unwrap_or_else(default_dir);
    let url = match &cli.controller {
        Some(u) => u.clone(),
        None => up::ClusterFile::load(&dir)
            .with_context(|| {
                NoCluster(format!(
                    "no cluster in {} (start one with `keelctl up --dir {}`, or pass --controller and --dir)",
                    dir.display(),
                    dir.display()
                ))
            })?
            .controller,
    };
    let pki = dir.join("pki");
    let ca = pki.join("ca.pem");
    let tls = if cli.token.is_some() {
        keel_api::client_tls(&ca, None)
    } else {
        let admin = TlsPaths::in_dir(&pki, "admin-keelctl");
        pki::warn_admin_expiry(&admin.cert);
        keel_api::client_tls(&ca, Some(&admin))
    }
    .with_context(|| format!("loading credentials from {}", pki.display()))?;
    Ok(ApiClient::new(&url, tls, cli.token.clone())?)
}

/// No cluster directory to find the controller in: nothing to reach (exit code 7, like an
/// unreachable controller).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoCluster(String);

fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<InvalidInput>().is_some() {
        return 5;
    }
    if e.downcast_ref::<NoCluster>().is_some() {
        return 7;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api { body, .. }) => match body.code.as_str() {
            "not_found" => 3,
            "conflict" => 4,
            "bad_request" | "insufficient_capacity" => 5,
            "unauthorized" | "forbidden" => 6,
            "unavailable" => 7,
            "not_ready" => 8,
            _ => 1,
        },
        Some(ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Tls { .. }) => 7,
        Some(ClientError::BadUrl(_)) => 2,
        _ => 1,
    }
}

/// The name a daemon run as `keelctl daemon WHICH` shows in `ps`, `top` and `/proc/PID/comm`
/// (at most 15 bytes): the name of its own binary (the node manager: keel-node).
pub fn daemon_program(which: &str) -> &'static str {
    match which {
        "controller" => "keel-controller",
        "storage" => "keel-storage",
        "node" => "keel-node",
        "vhost" => "keel-vhost",
        _ => "keelctl",
    }
}

/// Names the calling thread (for the main thread: the process's `comm`).
fn set_process_name(name: &str) {
    let Ok(c) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of which the kernel copies at most 16
    // bytes; `c` outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// Writes the completion script of `shell` for keelctl's commands and options.
fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut command(), "keelctl", out);
}

/// keelctl's command line: [`Cli`], but `keelctl up --help` does not list the global
/// `--token` and `--output` (for the commands that call a running controller; `up` ignores
/// them): `up` gets hidden arguments of the same ids and types, which keeps the global ones
/// from being copied into it.
fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommand("up", |up| {
        up.arg(
            clap::Arg::new("token")
                .long("token")
                .hide(true)
                .value_parser(clap::value_parser!(String)),
        )
        .arg(
            clap::Arg::new("output")
                .short('o')
                .long("output")
                .hide(true)
                .value_parser(clap::builder::EnumValueParser::<Format>::new()),
        )
    })
}

fn main() {
    let cli = {
        use clap::FromArgMatches;
        Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
    };
    if let Cmd::Completion { shell } = cli.cmd {
        // Generated into memory: clap_complete panics on a failed write (`| head`).
        let mut script = Vec::new();
        completion(shell, &mut script);
        let mut out = std::io::stdout().lock();
        if let Err(e) = std::io::Write::write_all(&mut out, &script)
            .and_then(|()| std::io::Write::flush(&mut out))
        {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("error: writing the completion script: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Cmd::Daemon { which } = cli.cmd {
        set_process_name(daemon_program(match *which {
            DaemonCmd::Controller(_) => "controller",
            DaemonCmd::Storage(_) => "storage",
            DaemonCmd::Vhost(_) => "vhost",
            DaemonCmd::Node(_) => "node",
        }));
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
        let r = match *which {
            DaemonCmd::Controller(a) => keel_controller::daemon::run(a),
            DaemonCmd::Storage(a) => keel_storage::daemon::run(a),
            DaemonCmd::Vhost(a) => keel_vhost::daemon::run(a),
            DaemonCmd::Node(a) => {
                let exe: OsString = std::env::current_exe()
                    .map(PathBuf::into_os_string)
                    .unwrap_or_else(|_| "keelctl".into());
                keel_vhost::node::run(a, vec![exe, "daemon".into(), "vhost".into()])
            }
        };
        if let Err(e) = r {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(exit_code(&e));
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fmt = cli.output;
    match &cli.cmd {
        Cmd::Up(a) => up::run(a.clone(), cli.dir.clone().unwrap_or_else(default_dir)).await,
        Cmd::Pki { cmd } => pki::run(&cli, cmd).await,
        Cmd::Daemon { .. } | Cmd::Completion { .. } => Ok(()),
        Cmd::Server { cmd: ListCmd::List } => {
            let list: Vec<ServerInfo> = client(&cli)?.get("/v1/servers").await?;
            output::servers(fmt, &list)
        }
        Cmd::Node { cmd: ListCmd::List } => {
            let list: Vec<NodeInfo> = client(&cli)?.get("/v1/nodes").await?;
            output::nodes(fmt, &list)
        }
        Cmd::Volume { cmd } => volume(&cli, fmt, cmd).await,
    }
}

fn enc(s: &str) -> String {
    // Volume ids and names are [A-Za-z0-9._-]; anything else is sent escaped and refused by
    // the controller with a clear message.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Input keelctl itself rejects (exit code 5, like the controller's `bad_request`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

fn size_arg(s: &str) -> anyhow::Result<SizeInput> {
    keel_proto::parse_size(s).map_err(InvalidInput)?;
    Ok(SizeInput::Human(s.to_string()))
}

/// `POST /v1/volumes/{volume}/{action}`.
async fn volume_action<B: serde::Serialize>(
    api: &ApiClient,
    volume: &str,
    action: &str,
    body: &B,
) -> anyhow::Result<VolumeInfo> {
    Ok(api
        .post(&format!("/v1/volumes/{}/{action}", enc(volume)), body)
        .await?)
}

async fn volume(cli: &Cli, fmt: Format, cmd: &VolumeCmd) -> anyhow::Result<()> {
    let api = client(cli)?;
    match cmd {
        VolumeCmd::Create {
            size,
            name,
            replicas,
            block_size,
        } => {
            let v: VolumeInfo = api
                .post(
                    "/v1/volumes",
                    &CreateVolume {
                        size: size_arg(size)?,
                        replicas: *replicas,
                        name: name.clone(),
                        block_size: *block_size,
                    },
                )
                .await?;
            output::volume(fmt, &v)
        }
        VolumeCmd::List => {
            let list: Vec<VolumeInfo> = api.get("/v1/volumes").await?;
            output::volumes(fmt, &list)
        }
        VolumeCmd::Describe { volume } => {
            let v: VolumeInfo = api.get(&format!("/v1/volumes/{}", enc(volume))).await?;
            output::volume(fmt, &v)
        }
        VolumeCmd::Delete { volume } => {
            let r: DeleteResult = api.delete(&format!("/v1/volumes/{}", enc(volume))).await?;
            output::deleted(fmt, &r)
        }
        VolumeCmd::Resize { volume, size } => {
            let body = ResizeVolume {
                size: size_arg(size)?,
            };
            let v = volume_action(&api, volume, "resize", &body).await?;
            output::volume(fmt, &v)
        }
        VolumeCmd::Attach {
            volume,
            node,
            instance,
            read_only,
            force,
            no_wait,
            wait_timeout,
        } => {
            let body = AttachVolume {
                node: node.clone(),
                instance: instance.clone(),
                read_only: *read_only,
                force: *force,
            };
            let v: VolumeInfo = if *no_wait {
                volume_action(&api, volume, "attach", &body).await?
            } else {
                let wait = std::time::Duration::from_secs(*wait_timeout);
                let path = format!(
                    "/v1/volumes/{}/attach?wait_ms={}",
                    enc(volume),
                    wait.as_millis()
                );
                api.post_wait(&path, &body, wait).await?
            };
            output::attached(fmt, &v, node, instance)
        }
        VolumeCmd::Detach {
            volume,
            node,
            instance,
            force,
        } => {
            let body = DetachVolume {
                node: node.clone(),
                instance: instance.clone(),
                force: *force,
            };
            let v = volume_action(&api, volume, "detach", &body).await?;
            output::volume(fmt, &v)
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    /// No cluster directory is an unreachable controller (7), whatever error the file gave.
    #[test]
    fn no_cluster_directory_exits_7() {
        let e = anyhow::Error::from(std::io::Error::other("No such file or directory"))
            .context(NoCluster("no cluster in /nowhere".into()));
        assert_eq!(exit_code(&e), 7);
        assert_eq!(exit_code(&anyhow::anyhow!("something else")), 1);
    }

    /// Every argument of every command a user runs has a help text, and every such command an
    /// example.
    #[test]
    fn every_argument_has_help_and_every_command_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && !a.is_hide_set() && a.get_help().is_none() {
                    missing.push(format!("{path}: argument {} has no help", a.get_id()));
                }
            }
            let subs: Vec<&clap::Command> = cmd
                .get_subcommands()
                .filter(|s| !s.is_hide_set() && s.get_name() != "help")
                .collect();
            if subs.is_empty() {
                let example = cmd
                    .get_after_help()
                    .is_some_and(|h| h.to_string().contains("Example"))
                    || cmd
                        .get_about()
                        .is_some_and(|h| h.to_string().contains("e.g."));
                if !example {
                    missing.push(format!("{path}: no example"));
                }
            }
            for s in subs {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        let mut cmd = command();
        cmd.build();
        walk(&cmd, "keelctl", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    /// `up --help` lists up's options and `--dir`, not the global `--token` and `--output`;
    /// the commands that call the controller keep them, before or after the subcommand.
    #[test]
    fn up_help_leaves_out_the_api_options() {
        let mut cmd = command();
        cmd.build();
        let up = cmd
            .find_subcommand_mut("up")
            .expect("up")
            .render_long_help()
            .to_string();
        assert!(up.contains("--servers") && up.contains("--dir"), "{up}");
        assert!(!up.contains("--token") && !up.contains("--output"), "{up}");
        let list = cmd
            .find_subcommand_mut("volume")
            .and_then(|v| v.find_subcommand_mut("list"))
            .expect("volume list")
            .render_long_help()
            .to_string();
        assert!(
            list.contains("--token") && list.contains("--output"),
            "{list}"
        );
        use clap::FromArgMatches;
        for args in [
            &["keelctl", "volume", "list", "-o", "json"][..],
            &["keelctl", "-o", "json", "volume", "list"],
        ] {
            let m = command().try_get_matches_from(args).expect("parses");
            let cli = Cli::from_arg_matches(&m).expect("a Cli");
            assert!(cli.output == Format::Json, "{args:?}");
        }
        let m = command()
            .try_get_matches_from(["keelctl", "up", "--servers", "1"])
            .expect("up parses");
        assert!(Cli::from_arg_matches(&m).is_ok());
    }

    /// The scripts of the documented shells complete the commands and options.
    #[test]
    fn completion_scripts_name_the_commands_and_options() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completion(shell, &mut out);
            let script = String::from_utf8(out).expect("a script is UTF-8");
            for word in [
                "volume",
                "attach",
                "no-wait",
                "wait-timeout",
                "completion",
                "pki",
            ] {
                assert!(script.contains(word), "{shell}: {word} missing");
            }
        }
    }
}
