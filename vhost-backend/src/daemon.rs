//! The keel-vhost process: serves one attachment (one volume to one VM) on a vhost-user-blk
//! socket, one frontend session after another. The node manager runs one per attachment and
//! steers it with two small JSON files:
//!
//! * **control file** (`--control-file`, written by the node manager, read by keel-vhost at
//!   start if present and on every SIGHUP): `{"size": <bytes>, "epoch": <u64>,
//!   "server": "IP:PORT"}` (`server` optional).
//!   * `epoch` higher than the current one: every request sent from now on carries it
//!     (resends of requests in flight included). A lower one is refused with a warning.
//!   * `size` larger than the current one (a multiple of 512): the device's capacity grows, and
//!     a connected frontend is sent a config-change message so the guest sees the new size at
//!     once; with no frontend connected it applies to the next session. A smaller size is
//!     refused with a warning (volumes do not shrink).
//!   * `server` different from the current one (a new primary): the connection to the old
//!     server is dropped, keel-vhost connects to the new one (with the usual backoff) and
//!     resends every request in flight there. The guest sees a stall, never an error. An
//!     address that does not parse is refused with a warning (the old server stays).
//!   * A missing or malformed file is logged and changes nothing; keel-vhost keeps serving.
//! * **status file** (`--status-file`, written by keel-vhost, replaced atomically by rename):
//!   `{"connected": <bool>, "pid": <u32>, "size": <bytes>, "epoch": <u64>, "server": "IP:PORT"}`,
//!   rewritten at start
//!   (not connected), when a frontend session starts and ends, and after every SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keel_proto::tls::TlsPaths;
use keel_proto::{parse_size, Epoch, VolumeId};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{DiskConfig, KeelBlk};
use crate::client::{ClientConfig, VolumeClient};

/// Keel node manager: serves a volume to a VM as a vhost-user-blk device.
#[derive(Parser, Debug, Clone)]
#[command(name = "keel-vhost", version)]
pub struct Args {
    /// The vhost-user socket to create (give it to QEMU's vhost-user-blk-pci).
    #[arg(long)]
    pub socket: PathBuf,
    /// The storage server holding the volume's primary copy.
    #[arg(long)]
    pub server: SocketAddr,
    /// The volume id (hex).
    #[arg(long)]
    pub volume: VolumeId,
    /// The volume's size as created on the storage server, e.g. 1GiB.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// The volume's epoch (fencing number).
    #[arg(long, default_value_t = 1)]
    pub epoch: u64,
    /// PKI directory (ca.pem, node-<id>.pem, node-<id>.key), made by `keelctl pki`.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// This node's id (its certificate is node-<id>.pem).
    #[arg(long)]
    pub id: String,
    /// Number of virtqueues offered to the guest.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue size accepted.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Offer the volume read-only. A `stale epoch` answer then stalls reads (resent with backoff
    /// until a newer epoch arrives through the control file) instead of failing them.
    #[arg(long)]
    pub read_only: bool,
    /// Milliseconds a request may go unanswered before the connection is re-established and
    /// the request resent.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Milliseconds a stopping ring waits for requests in flight before abandoning them to be
    /// re-offered by the frontend.
    #[arg(long, default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Write the process id to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// JSON control file `{"size": <bytes>, "epoch": <u64>, "server": "IP:PORT"}`, read at
    /// start if present and on every SIGHUP: a larger size grows the device (the guest is
    /// told), a higher epoch is carried by every request from then on, a new server gets every
    /// request from then on (those in flight are resent there).
    #[arg(long)]
    pub control_file: Option<PathBuf>,
    /// JSON status file `{"connected", "pid", "size", "epoch", "server"}`,
    /// replaced atomically at start, when a frontend connects or leaves, and after a SIGHUP.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
}

/// The control file's contents (written by the node manager).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlFile {
    /// The volume's size in bytes.
    pub size: u64,
    /// The attachment's epoch.
    pub epoch: u64,
    /// The attachment was taken away while a guest used it: fail every request from now on
    /// (the guest sees I/O errors, not a hang) until the guest lets go.
    #[serde(default)]
    pub revoked: bool,
    /// The data-path address (`IP:PORT`) of the storage server holding the primary copy; absent:
    /// keep the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

impl ControlFile {
    pub fn load(path: &Path) -> anyhow::Result<ControlFile> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Replaces `path` atomically.
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        write_json_atomically(path, self)
    }
}

/// The status file's contents (written by keel-vhost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFile {
    /// A frontend (the VM) is connected to the socket.
    pub connected: bool,
    pub pid: u32,
    /// The capacity offered, in bytes.
    pub size: u64,
    /// The epoch requests carry.
    pub epoch: u64,
    /// The storage server requests go to (`IP:PORT`; empty in files of older versions).
    #[serde(default)]
    pub server: String,
}

impl StatusFile {
    pub fn load(path: &Path) -> anyhow::Result<StatusFile> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Replaces `path` atomically.
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        write_json_atomically(path, self)
    }
}

/// Writes `value` as JSON next to `path` and renames it over `path`, so readers see the old
/// or the new contents, never a mix.
pub fn write_json_atomically<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec(value)?;
    text.push(b'\n');
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })
}

/// What changes at run time.
struct State {
    /// The capacity offered, bytes.
    size: u64,
    connected: bool,
    /// The device of the current (or awaited) frontend session.
    session: Option<KeelBlk>,
}

/// One attachment: the volume connection and the state the control file changes.
struct Attachment {
    client: VolumeClient,
    control_file: Option<PathBuf>,
    status_file: Option<PathBuf>,
    state: Mutex<State>,
}

impl Attachment {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self, st: &State) -> StatusFile {
        StatusFile {
            connected: st.connected,
            pid: std::process::id(),
            size: st.size,
            epoch: self.client.epoch().0,
            server: self.client.server().to_string(),
        }
    }

    /// Rewrites the status file (called with the state locked, so writes are in order).
    fn write_status(&self, st: &State) -> anyhow::Result<()> {
        match &self.status_file {
            Some(p) => self.status(st).store(p),
            None => Ok(()),
        }
    }

    fn write_status_or_warn(&self, st: &State) {
        if let Err(e) = self.write_status(st) {
            tracing::warn!(error = format!("{e:#}"), "cannot write the status file");
        }
    }

    fn set_connected(&self, connected: bool) {
        let mut st = self.lock();
        st.connected = connected;
        self.write_status_or_warn(&st);
    }

    /// Reads the control file and applies it. `at_start`: a missing file is normal.
    fn reload(&self, at_start: bool) {
        let Some(path) = &self.control_file else {
            if !at_start {
                tracing::info!("SIGHUP without --control-file: nothing to reload");
                self.write_status_or_warn(&self.lock());
            }
            return;
        };
        if at_start && !path.exists() {
            return;
        }
        let loaded = ControlFile::load(path);
        let mut st = self.lock();
        match loaded {
            Ok(ctl) => self.apply(&mut st, ctl),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "cannot read the control file: nothing changed"
            ),
        }
        if !at_start {
            self.write_status_or_warn(&st);
        }
    }

    fn apply(&self, st: &mut State, ctl: ControlFile) {
        if let Some(server) = &ctl.server {
            match server.trim().parse::<SocketAddr>() {
                Ok(addr) => {
                    let from = self.client.server();
                    if self.client.set_server(addr) {
                        tracing::info!(%from, to = %addr, "storage server changed: requests in flight are resent there");
                    }
                }
                Err(e) => tracing::warn!(
                    server = %server,
                    error = %e,
                    current = %self.client.server(),
                    "the control file's server is not an IP:PORT address: ignored"
                ),
            }
        }
        if ctl.revoked && !self.client.is_revoked() {
            self.client.revoke();
            tracing::warn!(
                "attachment revoked by the node manager: every request fails from now on"
            );
        }
        let epoch = self.client.epoch().0;
        if ctl.epoch > epoch {
            self.client.set_epoch(Epoch(ctl.epoch));
            tracing::info!(from = epoch, to = ctl.epoch, "epoch changed");
        } else if ctl.epoch < epoch {
            tracing::warn!(
                current = epoch,
                asked = ctl.epoch,
                "the control file asks for a lower epoch: ignored (epochs only grow)"
            );
        }
        if ctl.size == st.size {
            return;
        }
        if ctl.size == 0 || !ctl.size.is_multiple_of(512) {
            tracing::warn!(
                size = ctl.size,
                "the control file's size is not a positive multiple of 512: ignored"
            );
        } else if ctl.size < st.size {
            tracing::warn!(
                current = st.size,
                asked = ctl.size,
                "the control file asks for a smaller size: ignored (volumes do not shrink)"
            );
        } else {
            tracing::info!(from = st.size, to = ctl.size, "capacity grows");
            st.size = ctl.size;
            if let Some(dev) = &st.session {
                dev.set_capacity(ctl.size);
                match dev.notify_config_change() {
                    Ok(true) => tracing::info!("the frontend was told of the new capacity"),
                    Ok(false) => tracing::info!(
                        "no frontend channel to tell: the new capacity applies when the guest next reads its configuration"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot send the config-change message: the guest sees the new capacity when it next reads its configuration"
                    ),
                }
            }
        }
    }
}

/// Runs the daemon: serves frontends on `args.socket` one session after another, forever
/// (errors only on a bad configuration or setup failure).
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.num_queues == 0 || args.num_queues > 64 {
        anyhow::bail!("--num-queues must be between 1 and 64");
    }
    if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
        anyhow::bail!("--queue-size must be a power of two up to 32768");
    }
    if args.size == 0 || !args.size.is_multiple_of(512) {
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
            retry_stale_epoch: args.read_only,
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
    let att = Arc::new(Attachment {
        client: client.clone(),
        control_file: args.control_file.clone(),
        status_file: args.status_file.clone(),
        state: Mutex::new(State {
            size: args.size,
            connected: false,
            session: None,
        }),
    });
    att.reload(true);

    // SIGHUP re-reads the control file. Installed before anything says we are ready, since
    // SIGHUP's default action would end the process.
    let mut hup = {
        let _rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?
    };
    let hup_att = att.clone();
    rt.spawn(async move {
        while hup.recv().await.is_some() {
            let a = hup_att.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || a.reload(false)).await {
                tracing::error!(error = %e, "the control file reload failed");
            }
        }
    });

    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    att.write_status(&att.lock())
        .context("writing the status file")?;
    let mut listener = Listener::new(&args.socket, true)
        .with_context(|| format!("creating socket {}", args.socket.display()))?;
    println!(
        "keel-vhost: serving volume {} on {}",
        args.volume,
        args.socket.display()
    );
    tracing::info!(volume = %args.volume, socket = %args.socket.display(), "ready for a frontend");
    loop {
        let backend = {
            let mut st = att.lock();
            let disk = DiskConfig {
                capacity_bytes: st.size,
                ..disk.clone()
            };
            let dev = KeelBlk::new(disk, client.clone()).context("creating the device")?;
            st.session = Some(dev.clone());
            dev
        };
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
            Ok(()) => {
                tracing::info!("frontend connected");
                att.set_connected(true);
            }
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
        att.set_connected(false);
        backend.shutdown();
        att.lock().session = None;
        tracing::info!(
            in_flight = backend.in_flight(),
            "ready for the next frontend"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_and_without_the_control_files() {
        let base = [
            "keel-vhost",
            "--socket",
            "/tmp/s",
            "--server",
            "127.0.0.1:7500",
            "--volume",
            "1",
            "--size",
            "64MiB",
            "--pki-dir",
            "/tmp/pki",
            "--id",
            "n1",
        ];
        let a = Args::try_parse_from(base).expect("parse");
        assert_eq!(a.size, 64 << 20);
        assert_eq!(a.epoch, 1);
        assert!(a.control_file.is_none() && a.status_file.is_none());
        let mut more = base.to_vec();
        more.extend([
            "--control-file",
            "/tmp/c.json",
            "--status-file",
            "/tmp/s.json",
        ]);
        let a = Args::try_parse_from(more).expect("parse");
        assert_eq!(a.control_file.as_deref(), Some(Path::new("/tmp/c.json")));
        assert_eq!(a.status_file.as_deref(), Some(Path::new("/tmp/s.json")));
    }

    #[test]
    fn control_and_status_files_round_trip_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = dir.path().join("control.json");
        assert!(ControlFile::load(&c).is_err(), "missing file");
        std::fs::write(&c, br#"{"size": 134217728, "epoch": 3}"#).expect("write");
        assert_eq!(
            ControlFile::load(&c).expect("load"),
            ControlFile {
                size: 128 << 20,
                epoch: 3,
                revoked: false,
                server: None,
            }
        );
        for bad in [
            &b"{"[..],
            b"",
            br#"{"size": -1, "epoch": 1}"#,
            br#"{"epoch": 1}"#,
        ] {
            std::fs::write(&c, bad).expect("write");
            assert!(
                ControlFile::load(&c).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let s = dir.path().join("status.json");
        let st = StatusFile {
            connected: true,
            pid: 42,
            size: 64 << 20,
            epoch: 7,
            server: "127.0.0.1:7500".into(),
        };
        st.store(&s).expect("store");
        assert_eq!(StatusFile::load(&s).expect("load"), st);
        let text = std::fs::read_to_string(&s).expect("read");
        assert_eq!(
            text.trim(),
            r#"{"connected":true,"pid":42,"size":67108864,"epoch":7,"server":"127.0.0.1:7500"}"#
        );
        // A status file of an older version (no server) still parses.
        std::fs::write(&s, br#"{"connected":false,"pid":1,"size":512,"epoch":1}"#).expect("write");
        assert_eq!(StatusFile::load(&s).expect("load").server, "");
        // Only the status file is left: the temporary was renamed.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn control_file_with_and_without_a_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = dir.path().join("control.json");
        std::fs::write(&c, br#"{"size": 512, "epoch": 2}"#).expect("write");
        assert_eq!(ControlFile::load(&c).expect("load").server, None);
        std::fs::write(
            &c,
            br#"{"size": 512, "epoch": 2, "revoked": false, "server": "10.0.0.7:7500"}"#,
        )
        .expect("write");
        let ctl = ControlFile::load(&c).expect("load");
        assert_eq!(ctl.server.as_deref(), Some("10.0.0.7:7500"));
        assert_eq!((ctl.size, ctl.epoch, ctl.revoked), (512, 2, false));
        // Round trip; without a server the field is left out (older readers see what they did).
        ctl.store(&c).expect("store");
        assert_eq!(ControlFile::load(&c).expect("load"), ctl);
        let none = ControlFile {
            server: None,
            ..ctl.clone()
        };
        none.store(&c).expect("store");
        let text = std::fs::read_to_string(&c).expect("read");
        assert!(!text.contains("server"), "{text}");
        // The file parses whatever the address says; keel-vhost checks it when applying.
        std::fs::write(&c, br#"{"size": 512, "epoch": 2, "server": "nowhere"}"#).expect("write");
        assert_eq!(
            ControlFile::load(&c).expect("load").server.as_deref(),
            Some("nowhere")
        );
        std::fs::write(&c, br#"{"size": 512, "epoch": 2, "server": 7}"#).expect("write");
        assert!(ControlFile::load(&c).is_err(), "a server must be a string");
    }
}
