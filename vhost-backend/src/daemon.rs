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
//!   plus, only while they apply, `"listening": true` (the socket accepts a frontend),
//!   `"unanswered": {"server": "IP:PORT", "epoch": <u64>, "since_unix_ms": <u64>}` (the
//!   storage server has left keel-vhost waiting for at least
//!   `--primary-timeout-ms`: no answer to a request or ping, or no connection, since that time)
//!   and `"io_failed": <u64>` (guest requests failed after `--io-fail-after-ms`). Rewritten at
//!   start (not connected), once the socket listens, when a frontend session starts and ends,
//!   after every SIGHUP, and within 200 ms of `unanswered` or `io_failed` changing.

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
    /// Threads running the network side (TLS to the storage servers). One is fastest on a
    /// small host that the VMs share: every hand-off between threads costs a wake-up
    /// (docs/performance.md).
    #[arg(long, env = "KEEL_IO_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
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
    /// Logical block size offered to the guest, 512 or 4096 bytes. Either way the device
    /// reports 4 KiB physical blocks (so the guest still aligns its I/O to 4 KiB). A volume
    /// must keep the block size it was formatted with: its partition table and filesystems
    /// are laid out in these blocks. Firmware (SeaBIOS) boots only from 512.
    #[arg(long, default_value_t = 512, value_parser = crate::virtio::spec::parse_block_size)]
    pub block_size: u32,
    /// Milliseconds a request may go unanswered before the connection is re-established and
    /// the request resent.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Milliseconds the storage server may leave keel-vhost waiting (no answer to a request or
    /// to a ping — sent when the connection has been quiet for half of this — or no
    /// connection) before the status file reports it `unanswered`, for the node manager to
    /// tell the controller. Only a report: reconnecting still waits for --request-timeout-ms.
    #[arg(long, default_value_t = 1000)]
    pub primary_timeout_ms: u64,
    /// Milliseconds after its submission a guest request still not completed (no copy
    /// answers: R9) fails with an I/O error instead of stalling on. 0: wait forever. The
    /// default, 5 minutes, outlasts failovers and server restarts by far, yet unblocks the
    /// guest's applications before an operator would give up on them.
    #[arg(long, default_value_t = 300_000)]
    pub io_fail_after_ms: u64,
    /// Milliseconds a stopping ring waits for requests in flight before abandoning them to be
    /// re-offered by the frontend.
    #[arg(long, default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Microseconds the vring thread keeps polling an emptied queue before it turns the
    /// guest's notifications back on and waits for a kick (0: never polls). Polling spares the
    /// guest a kick (a VM exit) per request and the vring thread a wake-up, for up to this
    /// much spinning per event: a busy volume can keep one core busy. See
    /// docs/performance.md.
    #[arg(long, env = "KEEL_POLL_US", default_value_t = 100)]
    pub poll_us: u64,
    /// Log the guest's kicks, requests and interrupts over each period of this many
    /// milliseconds while a frontend is connected (diagnosis; 0: never).
    #[arg(long, env = "KEEL_VHOST_COUNTERS_MS", default_value_t = 0)]
    pub counters_every_ms: u64,
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
    /// The socket exists and accepts a frontend's connection (absent until then).
    #[serde(default, skip_serializing_if = "is_false")]
    pub listening: bool,
    pub pid: u32,
    /// The capacity offered, in bytes.
    pub size: u64,
    /// The epoch requests carry.
    pub epoch: u64,
    /// The storage server requests go to (`IP:PORT`; empty in files of older versions).
    #[serde(default)]
    pub server: String,
    /// The storage server has not answered for at least `--primary-timeout-ms`; absent while
    /// it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unanswered: Option<UnansweredStatus>,
    /// Guest requests failed since the start because they were not completed within
    /// `--io-fail-after-ms` (absent while none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub io_failed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A storage server leaving keel-vhost waiting, in the status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnansweredStatus {
    /// The server (`IP:PORT`) keel-vhost waits for.
    pub server: String,
    /// The epoch keel-vhost's requests carry.
    pub epoch: u64,
    /// Since when (Unix time, milliseconds) keel-vhost has waited for an answer.
    pub since_unix_ms: u64,
}

impl UnansweredStatus {
    /// How long keel-vhost has waited by `now_unix_ms` (0 if the clocks disagree).
    pub fn waited_ms(&self, now_unix_ms: u64) -> u64 {
        now_unix_ms.saturating_sub(self.since_unix_ms)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    /// The vhost-user socket is bound and listening.
    listening: bool,
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
        let unanswered = self.client.unanswered().map(|u| {
            let since = std::time::SystemTime::now()
                .checked_sub(u.waited)
                .unwrap_or(std::time::UNIX_EPOCH);
            UnansweredStatus {
                server: u.server.to_string(),
                epoch: u.epoch.0,
                since_unix_ms: unix_ms(since),
            }
        });
        StatusFile {
            connected: st.connected,
            listening: st.listening,
            pid: std::process::id(),
            size: st.size,
            epoch: self.client.epoch().0,
            server: self.client.server().to_string(),
            unanswered,
            io_failed: self.client.gave_up(),
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

/// What the status watcher compares: the unanswered server (with epoch and start of the
/// silence) and the count of requests given up on.
type Watched = (Option<(SocketAddr, Epoch, std::time::Instant)>, u64);

fn watched(client: &VolumeClient) -> Watched {
    (
        client.unanswered().map(|u| (u.server, u.epoch, u.since)),
        client.gave_up(),
    )
}

/// How often the status watcher looks: a fifth of the primary timeout, 20 to 200 ms.
fn status_poll_period(primary_timeout: Duration) -> Duration {
    (primary_timeout / 5).clamp(Duration::from_millis(20), Duration::from_millis(200))
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
    if args.primary_timeout_ms == 0 || args.request_timeout_ms == 0 {
        anyhow::bail!("--primary-timeout-ms and --request-timeout-ms must be positive");
    }
    let tls = keel_proto::tls::client_config(&TlsPaths::in_dir(
        &args.pki_dir,
        &format!("node-{}", args.id),
    ))
    .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.io_threads))
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
            primary_timeout: Duration::from_millis(args.primary_timeout_ms),
            io_fail_after: (args.io_fail_after_ms > 0)
                .then(|| Duration::from_millis(args.io_fail_after_ms)),
            // Stable across restarts of this attachment's keel-vhost, distinct between two
            // attachments of one volume on one node: the socket names the attachment.
            client_key: keel_proto::frame::checksum(std::os::unix::ffi::OsStrExt::as_bytes(
                args.socket.as_os_str(),
            )),
        },
        rt.handle(),
    );
    let disk = DiskConfig {
        volume: args.volume,
        capacity_bytes: args.size,
        read_only: args.read_only,
        block_size: args.block_size,
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        poll: Duration::from_micros(args.poll_us),
    };
    let att = Arc::new(Attachment {
        client: client.clone(),
        control_file: args.control_file.clone(),
        status_file: args.status_file.clone(),
        state: Mutex::new(State {
            size: args.size,
            connected: false,
            listening: false,
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

    // The status file follows the storage server's silence and the requests given up on.
    let watch_att = att.clone();
    let period = status_poll_period(Duration::from_millis(args.primary_timeout_ms));
    rt.spawn(async move {
        let mut last: Watched = (None, 0);
        loop {
            tokio::time::sleep(period).await;
            let now = watched(&watch_att.client);
            if now == last {
                continue;
            }
            match (&last.0, &now.0) {
                (_, Some(u)) if last.0.as_ref() != Some(u) => {
                    if let Some(u) = watch_att.client.unanswered() {
                        tracing::warn!(server = %u.server, epoch = %u.epoch, waited = ?u.waited, "the storage server has not answered within --primary-timeout-ms: reported in the status file");
                    }
                }
                (Some((server, _, _)), None) => {
                    tracing::info!(%server, "the storage server answers again (or was replaced)")
                }
                _ => {}
            }
            last = now;
            let a = watch_att.clone();
            if let Err(e) =
                tokio::task::spawn_blocking(move || a.write_status_or_warn(&a.lock())).await
            {
                tracing::error!(error = %e, "writing the status file failed");
            }
        }
    });

    if args.counters_every_ms > 0 {
        let att = att.clone();
        let volume = args.volume;
        let period = Duration::from_millis(args.counters_every_ms);
        rt.spawn(async move {
            let mut last = crate::backend::Counters::default();
            loop {
                tokio::time::sleep(period).await;
                let Some(now) = att.lock().session.as_ref().map(|s| s.counters()) else {
                    continue;
                };
                // A new frontend session starts its counters from zero.
                if now.requests < last.requests || now.kicks < last.kicks || now.signals < last.signals {
                    last = crate::backend::Counters::default();
                }
                let requests = now.requests.saturating_sub(last.requests);
                if requests > 0 {
                    let per = |n: u64| n as f64 / requests as f64;
                    tracing::info!(
                        %volume,
                        requests,
                        kicks_per_request = format_args!("{:.3}", per(now.kicks.saturating_sub(last.kicks))),
                        signals_per_request = format_args!("{:.3}", per(now.signals.saturating_sub(last.signals))),
                        "guest counters"
                    );
                }
                last = now;
            }
        });
    }

    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    att.write_status(&att.lock())
        .context("writing the status file")?;
    let mut listener = Listener::new(&args.socket, true)
        .with_context(|| format!("creating socket {}", args.socket.display()))?;
    {
        // The node manager tells the controller, which answers a waiting attach.
        let mut st = att.lock();
        st.listening = true;
        att.write_status(&st).context("writing the status file")?;
    }
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
                // A guest that breaks its ring gets its session closed by the device.
                if let Some(end) = daemon.shutdown_handle() {
                    backend.set_session_end(end);
                }
                att.set_connected(true);
            }
            Err(e) => {
                tracing::error!(error = %e, "accepting a frontend failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        match daemon.wait() {
            Ok(()) if backend.ring_was_broken() => {
                tracing::warn!("session closed by keel-vhost: the guest broke its ring")
            }
            // A VM that exits (or QEMU that quits) just closes the socket: expected.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => tracing::info!("frontend disconnected"),
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
        assert_eq!(
            (
                a.request_timeout_ms,
                a.primary_timeout_ms,
                a.io_fail_after_ms
            ),
            (10_000, 1000, 300_000)
        );
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
            listening: false,
            pid: 42,
            size: 64 << 20,
            epoch: 7,
            server: "127.0.0.1:7500".into(),
            unanswered: None,
            io_failed: 0,
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
    fn timeout_flags_parse() {
        let a = Args::try_parse_from([
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
            "--primary-timeout-ms",
            "250",
            "--io-fail-after-ms",
            "0",
        ])
        .expect("parse");
        assert_eq!((a.primary_timeout_ms, a.io_fail_after_ms), (250, 0));
        assert_eq!(
            status_poll_period(Duration::from_millis(250)),
            Duration::from_millis(50)
        );
        assert_eq!(
            status_poll_period(Duration::from_secs(1)),
            Duration::from_millis(200)
        );
        assert_eq!(
            status_poll_period(Duration::from_millis(10)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn status_file_with_an_unanswered_server_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = dir.path().join("status.json");
        let st = StatusFile {
            connected: true,
            listening: false,
            pid: 42,
            size: 512,
            epoch: 3,
            server: "10.0.0.1:7500".into(),
            unanswered: Some(UnansweredStatus {
                server: "10.0.0.1:7500".into(),
                epoch: 3,
                since_unix_ms: 1_700_000_000_000,
            }),
            io_failed: 2,
        };
        st.store(&s).expect("store");
        assert_eq!(StatusFile::load(&s).expect("load"), st);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&s).expect("read")).expect("json");
        assert_eq!(v["unanswered"]["server"], "10.0.0.1:7500");
        assert_eq!(v["unanswered"]["since_unix_ms"], 1_700_000_000_000u64);
        assert_eq!(v["io_failed"], 2);
        let u = st.unanswered.as_ref().expect("unanswered");
        assert_eq!(u.waited_ms(1_700_000_001_500), 1500);
        assert_eq!(
            u.waited_ms(0),
            0,
            "a clock behind the file's is not negative"
        );
        // Files of older versions have neither field.
        std::fs::write(
            &s,
            br#"{"connected":false,"pid":1,"size":512,"epoch":1,"server":"10.0.0.1:7500"}"#,
        )
        .expect("write");
        let old = StatusFile::load(&s).expect("load");
        assert_eq!((old.unanswered, old.io_failed), (None, 0));
        assert_eq!(
            unix_ms(std::time::UNIX_EPOCH + Duration::from_millis(1234)),
            1234
        );
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
