//! The node manager: registers this host with the controller, long-polls its attachments, and
//! runs one keel-vhost process per attachment (socket `<socket-dir>/<instance>-<volume>.sock`).
//!
//! * A keel-vhost process outlives a crash of the node manager: guests keep their disks. On
//!   start the manager adopts the processes recorded in its state directory that still run.
//! * An attachment whose epoch, size or server changed gets its control file rewritten and a
//!   SIGHUP (keel-vhost then sends the new epoch, shows the guest the new capacity, or switches
//!   to the new primary and resends what is in flight there). The process is not restarted, so
//!   the guest's disk session survives; only a change of `read_only` or `socket` (or a dead
//!   process) restarts it.
//! * A detached attachment's process gets SIGTERM and its socket is removed.
//! * Heartbeats report, per attachment, whether a guest is connected (from keel-vhost's status
//!   file), which the controller uses to refuse detaching a disk in use.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_api::{
    ApiClient, AttachmentReport, NodeAttachment, NodeAttachments, NodeHeartbeat, NodeRegistration,
};
use keel_proto::tls::TlsPaths;
use serde::{Deserialize, Serialize};

use crate::daemon::{write_json_atomically, ControlFile, StatusFile};

/// Keel node manager: serves this host's attachments as vhost-user-blk sockets.
#[derive(clap::Parser, Debug, Clone)]
pub struct NodeArgs {
    /// The controller's URL, https://IP:PORT.
    #[arg(long)]
    pub controller: String,
    /// PKI directory (ca.pem, node-<id>.pem/.key), made by `keelctl pki`.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// This node's id (its certificate is node-<id>.pem).
    #[arg(long)]
    pub id: String,
    /// Where the vhost-user sockets are created.
    #[arg(long)]
    pub socket_dir: PathBuf,
    /// Where the manager keeps one record per running attachment (survives its restarts).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Virtqueues offered to each guest.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Write the process id to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
}

/// What one keel-vhost process serves; written to `<state-dir>/<key>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Running {
    spec: NodeAttachment,
    pid: u32,
}

struct Slot {
    run: Running,
    /// Detached while a guest used it: keel-vhost fails its I/O until the guest lets go.
    revoked: bool,
    /// Our own child (else adopted from a previous manager: polled through /proc).
    child: Option<Child>,
}

struct Manager {
    args: NodeArgs,
    vhost_cmd: Vec<OsString>,
    slots: HashMap<String, Slot>,
}

fn key(a: &NodeAttachment) -> String {
    format!("{}-{}", a.instance, a.volume)
}

fn alive(pid: u32) -> bool {
    // Zombies count as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a pid we started (or recorded) and a valid signal number; it only
    // sends a signal and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Manager {
    fn state_file(&self, k: &str) -> PathBuf {
        self.args.state_dir.join(format!("{k}.json"))
    }
    fn control_file(&self, k: &str) -> PathBuf {
        self.args.state_dir.join(format!("{k}.control"))
    }
    fn status_file(&self, k: &str) -> PathBuf {
        self.args.state_dir.join(format!("{k}.status"))
    }

    /// Adopts keel-vhost processes a previous manager left running.
    fn adopt(&mut self) {
        let Ok(dir) = std::fs::read_dir(&self.args.state_dir) else {
            return;
        };
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(run) = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Running>(&b).map_err(|e| e.to_string()))
            else {
                tracing::warn!(file = %p.display(), "unreadable attachment record: removed");
                let _ = std::fs::remove_file(&p);
                continue;
            };
            let k = key(&run.spec);
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", run.pid)).unwrap_or_default();
            let ours = alive(run.pid)
                && String::from_utf8_lossy(&cmdline).contains(run.spec.socket.as_str());
            if ours {
                tracing::info!(attachment = %k, pid = run.pid, "adopted a running keel-vhost");
                self.slots.insert(
                    k,
                    Slot {
                        run,
                        child: None,
                        revoked: false,
                    },
                );
            } else {
                tracing::info!(attachment = %k, "keel-vhost of a previous run is gone; it will be restarted if still attached");
                self.forget(&k, &run.spec.socket);
            }
        }
    }

    fn forget(&self, k: &str, socket: &str) {
        let _ = std::fs::remove_file(self.state_file(k));
        let _ = std::fs::remove_file(self.control_file(k));
        let _ = std::fs::remove_file(self.status_file(k));
        let _ = std::fs::remove_file(socket);
    }

    fn start(&mut self, spec: &NodeAttachment) -> anyhow::Result<()> {
        let k = key(spec);
        let control = self.control_file(&k);
        ControlFile {
            size: spec.size,
            epoch: spec.epoch,
            revoked: false,
            server: Some(spec.server.clone()),
        }
        .store(&control)?;
        let _ = std::fs::remove_file(&spec.socket);
        let (exe, pre) = self
            .vhost_cmd
            .split_first()
            .context("no keel-vhost command configured")?;
        let mut cmd = Command::new(exe);
        cmd.args(pre)
            .arg("--socket")
            .arg(&spec.socket)
            .arg("--server")
            .arg(&spec.server)
            .arg("--volume")
            .arg(&spec.volume)
            .arg("--size")
            .arg(spec.size.to_string())
            .arg("--epoch")
            .arg(spec.epoch.to_string())
            .arg("--pki-dir")
            .arg(&self.args.pki_dir)
            .arg("--id")
            .arg(&self.args.id)
            .arg("--num-queues")
            .arg(self.args.num_queues.to_string())
            .arg("--control-file")
            .arg(&control)
            .arg("--status-file")
            .arg(self.status_file(&k))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if spec.read_only {
            cmd.arg("--read-only");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting keel-vhost for {k}"))?;
        let run = Running {
            spec: spec.clone(),
            pid: child.id(),
        };
        write_json_atomically(&self.state_file(&k), &run)?;
        tracing::info!(attachment = %k, pid = run.pid, socket = %spec.socket, epoch = spec.epoch, read_only = spec.read_only, "serving attachment");
        self.slots.insert(
            k,
            Slot {
                run,
                child: Some(child),
                revoked: false,
            },
        );
        Ok(())
    }

    fn guest_connected(&self, k: &str) -> bool {
        StatusFile::load(&self.status_file(k)).is_ok_and(|s| s.connected)
    }

    /// An attachment is gone. Without a guest its process stops now. With a guest still
    /// connected (forced detach or takeover), stopping it would leave the guest's I/O hanging
    /// forever; instead keel-vhost is told to fail every request, so the guest sees I/O errors,
    /// and the process stops once the guest lets go.
    fn release(&mut self, k: &str) {
        let exited = self.slots.get_mut(k).is_none_or(Self::exited);
        if exited || !self.guest_connected(k) {
            self.stop(k);
            return;
        }
        let control = self.control_file(k);
        let Some(slot) = self.slots.get_mut(k) else {
            return;
        };
        if slot.revoked {
            return;
        }
        let ctl = ControlFile {
            size: slot.run.spec.size,
            epoch: slot.run.spec.epoch,
            revoked: true,
            server: Some(slot.run.spec.server.clone()),
        };
        match ctl.store(&control) {
            Ok(()) => {
                signal(slot.run.pid, libc::SIGHUP);
                slot.revoked = true;
                tracing::warn!(attachment = %k, "detached while a guest is connected: its I/O now fails; the process stops when the guest lets go");
            }
            Err(e) => {
                tracing::error!(attachment = %k, error = %format!("{e:#}"), "cannot revoke the attachment: stopping it");
                self.stop(k);
            }
        }
    }

    fn stop(&mut self, k: &str) {
        let Some(mut slot) = self.slots.remove(k) else {
            return;
        };
        signal(slot.run.pid, libc::SIGTERM);
        for _ in 0..100 {
            let gone = match &mut slot.child {
                Some(c) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => !alive(slot.run.pid),
            };
            if gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if match &mut slot.child {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => alive(slot.run.pid),
        } {
            signal(slot.run.pid, libc::SIGKILL);
            if let Some(c) = &mut slot.child {
                let _ = c.wait();
            }
        }
        self.forget(k, &slot.run.spec.socket);
        tracing::info!(attachment = %k, "stopped serving attachment");
    }

    fn exited(slot: &mut Slot) -> bool {
        match &mut slot.child {
            Some(c) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
            None => !alive(slot.run.pid),
        }
    }

    /// Makes the running processes match `want`.
    fn reconcile(&mut self, want: &[NodeAttachment]) {
        let wanted: HashMap<String, &NodeAttachment> = want.iter().map(|a| (key(a), a)).collect();
        let gone: Vec<String> = self
            .slots
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.release(&k);
        }
        for (k, spec) in wanted {
            let died = self.slots.get_mut(&k).is_some_and(Self::exited);
            if died {
                tracing::warn!(attachment = %k, "keel-vhost exited unexpectedly: restarting it");
            }
            let restart = match self.slots.get(&k) {
                None => true,
                Some(_) if died => true,
                Some(slot) if slot.revoked => true,
                // A new server is not a reason: keel-vhost switches on SIGHUP (below), keeping
                // the guest's session.
                Some(slot)
                    if slot.run.spec.read_only != spec.read_only
                        || slot.run.spec.socket != spec.socket =>
                {
                    true
                }
                Some(_) => false,
            };
            if restart {
                self.stop(&k);
                if let Err(e) = self.start(spec) {
                    tracing::error!(attachment = %k, error = %format!("{e:#}"), "cannot serve attachment");
                }
                continue;
            }
            let Some(slot) = self.slots.get_mut(&k) else {
                continue;
            };
            if slot.run.spec.epoch != spec.epoch
                || slot.run.spec.size != spec.size
                || slot.run.spec.server != spec.server
            {
                let pid = slot.run.pid;
                let old_server = std::mem::replace(&mut slot.run.spec, spec.clone()).server;
                if old_server != spec.server {
                    tracing::info!(attachment = %k, from = %old_server, to = %spec.server, "primary moved: keel-vhost switches servers without a restart");
                }
                let run = slot.run.clone();
                let write = ControlFile {
                    size: spec.size,
                    epoch: spec.epoch,
                    revoked: false,
                    server: Some(spec.server.clone()),
                }
                .store(&self.control_file(&k))
                .and_then(|()| write_json_atomically(&self.state_file(&k), &run));
                match write {
                    Ok(()) => {
                        signal(pid, libc::SIGHUP);
                        tracing::info!(attachment = %k, epoch = spec.epoch, size = spec.size, server = %spec.server, "attachment updated");
                    }
                    Err(e) => {
                        tracing::error!(attachment = %k, error = %e, "cannot update attachment")
                    }
                }
            }
        }
    }

    fn reports(&self) -> Vec<AttachmentReport> {
        self.slots
            .iter()
            .map(|(k, s)| AttachmentReport {
                volume: s.run.spec.volume.clone(),
                instance: s.run.spec.instance.clone(),
                connected: self.guest_connected(k),
            })
            .collect()
    }

    fn stop_all(&mut self) {
        let keys: Vec<String> = self.slots.keys().cloned().collect();
        for k in keys {
            self.stop(&k);
        }
    }
}

async fn register(api: &ApiClient, args: &NodeArgs) {
    let reg = NodeRegistration {
        id: args.id.clone(),
        socket_dir: args.socket_dir.display().to_string(),
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match api.post::<_, keel_api::NodeInfo>("/v1/nodes", &reg).await {
            Ok(_) => {
                tracing::info!(controller = %api.url(), "registered with the controller");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "registering with the controller failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs the node manager until SIGTERM/Ctrl-C (which stops every attachment's process).
/// `vhost_cmd` is the program (and leading arguments) that runs one keel-vhost.
pub fn run(args: NodeArgs, vhost_cmd: Vec<OsString>) -> anyhow::Result<()> {
    for d in [&args.socket_dir, &args.state_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let socket_dir = std::fs::canonicalize(&args.socket_dir)?;
    let state_dir = std::fs::canonicalize(&args.state_dir)?;
    let args = NodeArgs {
        socket_dir,
        state_dir,
        ..args
    };
    let paths = TlsPaths::in_dir(&args.pki_dir, &format!("node-{}", args.id));
    let tls = keel_api::client_tls(&paths.ca, Some(&paths))
        .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let api = ApiClient::new(&args.controller, tls, None)?.with_timeout(Duration::from_secs(10));
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let mut mgr = Manager {
        args: args.clone(),
        vhost_cmd,
        slots: HashMap::new(),
    };
    mgr.adopt();
    let mgr = Arc::new(std::sync::Mutex::new(mgr));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        register(&api, &args).await;
        println!(
            "keel-node: serving node {} in {}",
            args.id,
            args.socket_dir.display()
        );
        let hb = {
            let api = api.clone();
            let mgr = mgr.clone();
            let args = args.clone();
            tokio::spawn(async move {
                loop {
                    let attachments = {
                        let m = mgr.lock().unwrap_or_else(|p| p.into_inner());
                        m.reports()
                    };
                    let path = format!("/v1/nodes/{}/heartbeat", args.id);
                    match api
                        .post::<_, serde_json::Value>(&path, &NodeHeartbeat { attachments })
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.status() == Some(404) => register(&api, &args).await,
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(args.heartbeat_ms)).await;
                }
            })
        };
        let watch = {
            let api = api.clone();
            let mgr = mgr.clone();
            let id = args.id.clone();
            tokio::spawn(async move {
                let mut after = 0u64;
                loop {
                    let path = format!("/v1/nodes/{id}/attachments?after={after}&wait_ms=2000");
                    match api
                        .get_wait::<NodeAttachments>(&path, Duration::from_secs(3))
                        .await
                    {
                        Ok(na) => {
                            after = na.version;
                            let mgr = mgr.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                mgr.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .reconcile(&na.attachments)
                            })
                            .await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching attachments failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            })
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        hb.abort();
        watch.abort();
        anyhow::Ok(())
    });
    tracing::info!("node manager stopping: stopping every attachment");
    mgr.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
    result
}
