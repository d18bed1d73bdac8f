//! The node manager: registers this host with the controller, long-polls its attachments, and
//! runs one keel-vhost process per attachment (socket `<socket-dir>/<instance>-<volume>.sock`).
//!
//! * A keel-vhost process outlives a crash of the node manager: guests keep their disks. On
//!   start the manager adopts the processes recorded in its state directory that still run.
//! * An attachment whose epoch, size or server changed gets its control file rewritten and a
//!   SIGHUP (keel-vhost then sends the new epoch, shows the guest the new capacity, or switches
//!   to the new primary and resends what is in flight there). The process is not restarted, so
//!   the guest's disk session survives; only a change of `read_only`, `socket` or `block_size`
//!   (or a dead process) restarts it. keel-vhost gets the attachment's `--block-size`.
//! * A detached attachment's process gets SIGTERM and its socket is removed.
//! * Heartbeats report, per attachment, whether a guest is connected (from keel-vhost's status
//!   file), which the controller uses to refuse detaching a disk in use, and whether keel-vhost
//!   listens on the socket, with the attachments version applied: the controller answers an
//!   attach that waits (`?wait_ms=`) once the node reports the new attachment listening. The
//!   manager reads the status files every [`HEARTBEAT_POLL`] and sends a heartbeat at once when
//!   a report changes (else every `--heartbeat-ms`), so a waiting attach is not held a whole
//!   heartbeat interval.
//! * Every 200 ms the manager reads each keel-vhost's status file; while one says its primary
//!   is `unanswered` (and the manager still believes that server is the primary), it reports
//!   `PrimaryUnreachable` to the controller (`POST /v1/volumes/{id}/primary-unreachable`) at
//!   most once a second per attachment and logs the answer. The controller checks the primary
//!   itself before promoting a mirror; the new primary then reaches keel-vhost through the
//!   attachment long poll (control file + SIGHUP, above).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_api::{
    ApiClient, AttachmentReport, ClientError, NodeAttachment, NodeAttachments, NodeHeartbeat,
    NodeRegistration, PrimaryReport, PrimaryUnreachable,
};
use keel_proto::tls::TlsPaths;
use serde::{Deserialize, Serialize};

use crate::daemon::{unix_ms, write_json_atomically, ControlFile, StatusFile};

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
    /// Passed to each keel-vhost: milliseconds a primary may leave it waiting before it says so
    /// in its status file, which this manager reports to the controller.
    #[arg(long, default_value_t = 1000)]
    pub primary_timeout_ms: u64,
    /// Passed to each keel-vhost: milliseconds after which a guest request still not completed
    /// (no copy answers) fails with an I/O error; 0 waits forever.
    #[arg(long, default_value_t = 300_000)]
    pub io_fail_after_ms: u64,
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
    /// The version of the last attachments answer reconciled (`None` before the first).
    applied: Option<u64>,
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
        // A status file of an earlier process must not report the new one listening.
        let _ = std::fs::remove_file(self.status_file(&k));
        let (exe, pre) = self
            .vhost_cmd
            .split_first()
            .context("no keel-vhost command configured")?;
        let mut cmd = Command::new(exe);
        // Shown by `ps` (the program may be `keelctl daemon vhost`).
        cmd.arg0("keel-vhost");
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
            .arg("--block-size")
            .arg(spec.block_size.to_string())
            .arg("--pki-dir")
            .arg(&self.args.pki_dir)
            .arg("--id")
            .arg(&self.args.id)
            .arg("--num-queues")
            .arg(self.args.num_queues.to_string())
            .arg("--primary-timeout-ms")
            .arg(self.args.primary_timeout_ms.to_string())
            .arg("--io-fail-after-ms")
            .arg(self.args.io_fail_after_ms.to_string())
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
                        || slot.run.spec.socket != spec.socket
                        || slot.run.spec.block_size != spec.block_size =>
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

    /// Per attachment: whether a guest is connected and whether keel-vhost listens (its
    /// status file says so, written by the process the manager runs; an adopted process of a
    /// version without the field counts as listening once its socket exists). Sorted, so
    /// that equal reports compare equal.
    fn reports(&self) -> Vec<AttachmentReport> {
        let mut reports: Vec<AttachmentReport> = self
            .slots
            .iter()
            .map(|(k, s)| {
                let status = StatusFile::load(&self.status_file(k)).ok();
                let ours = status.as_ref().filter(|st| st.pid == s.run.pid);
                let listening = ours.is_some_and(|st| {
                    st.listening
                        || (s.child.is_none() && std::path::Path::new(&s.run.spec.socket).exists())
                });
                AttachmentReport {
                    volume: s.run.spec.volume.clone(),
                    instance: s.run.spec.instance.clone(),
                    connected: status.is_some_and(|st| st.connected),
                    listening: listening && !s.revoked,
                }
            })
            .collect();
        reports.sort_by(|a, b| (&a.volume, &a.instance).cmp(&(&b.volume, &b.instance)));
        reports
    }

    /// What the primary reporter needs of each attachment: its key, what the manager serves,
    /// whether it was revoked, and keel-vhost's status file.
    fn watched(&self) -> Vec<(String, NodeAttachment, bool, PathBuf)> {
        self.slots
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    s.run.spec.clone(),
                    s.revoked,
                    self.status_file(k),
                )
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

/// How often the heartbeat task reads the status files for a change to report at once.
pub const HEARTBEAT_POLL: Duration = Duration::from_millis(50);

/// Whether to send `hb` now: nothing sent yet, the reports or the applied version changed
/// since the last one sent, or `interval` has passed since it.
fn heartbeat_due(
    last: Option<&(NodeHeartbeat, Instant)>,
    hb: &NodeHeartbeat,
    interval: Duration,
) -> bool {
    match last {
        None => true,
        Some((sent, at)) => {
            sent.attachments != hb.attachments
                || sent.version != hb.version
                || at.elapsed() >= interval
        }
    }
}

/// How often the manager reads keel-vhost's status files for an unanswered primary.
const STATUS_POLL: Duration = Duration::from_millis(200);
/// At most one report per attachment this often while its primary does not answer.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The report to send now for one attachment, if any: keel-vhost's status says its server has
/// not answered, the manager still serves that server as the primary (otherwise the primary
/// already moved and keel-vhost is being told), the attachment was not revoked, and the last
/// report is at least [`REPORT_EVERY`] old.
pub fn report_due(
    spec: &NodeAttachment,
    status: &StatusFile,
    revoked: bool,
    last: Option<Instant>,
    now: Instant,
    now_unix_ms: u64,
) -> Option<PrimaryUnreachable> {
    let u = status.unanswered.as_ref()?;
    if revoked || !same_server(&u.server, &spec.server) {
        return None;
    }
    if last.is_some_and(|l| now.saturating_duration_since(l) < REPORT_EVERY) {
        return None;
    }
    Some(PrimaryUnreachable {
        server: u.server.clone(),
        epoch: u.epoch,
        unanswered_ms: u.waited_ms(now_unix_ms),
    })
}

/// Whether two data-path addresses name the same server (compared as socket addresses when
/// both parse, so spellings of one IPv6 address agree).
fn same_server(a: &str, b: &str) -> bool {
    match (
        a.trim().parse::<std::net::SocketAddr>(),
        b.trim().parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// How a report went, in a form that says whether it is worth a new log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportResult {
    /// The controller answered.
    Answered(PrimaryReport),
    /// The controller has no such route (an older version: a 404 without the API's
    /// `not_found` code, which would mean an unknown volume).
    NotFound,
    /// The call failed.
    Failed(String),
}

impl ReportResult {
    fn of(r: Result<PrimaryReport, ClientError>) -> ReportResult {
        match r {
            Ok(rep) => ReportResult::Answered(rep),
            Err(e) if e.status() == Some(404) && e.code() != Some("not_found") => {
                ReportResult::NotFound
            }
            Err(e) => ReportResult::Failed(e.to_string()),
        }
    }

    /// What distinguishes one result from another for logging: the outcome, not the epoch or
    /// the exact error text.
    fn kind(&self) -> String {
        match self {
            ReportResult::Answered(r) => format!("answered {} {:?}", r.outcome, r.primary),
            ReportResult::NotFound => "not found".into(),
            ReportResult::Failed(_) => "failed".into(),
        }
    }
}

/// The reporter's memory: when each attachment last reported, which ones have a report in
/// flight, and what was last logged (so a lasting condition logs one line, not one a second).
#[derive(Default)]
pub struct Reporter {
    last: HashMap<String, Instant>,
    inflight: HashSet<String>,
    logged: HashMap<String, String>,
    /// A 404 was logged: the controller may predate the route; logged once per manager.
    not_found_logged: bool,
}

impl Reporter {
    /// Decides for one attachment at `now`; a report returned is recorded as sent and in
    /// flight until [`Reporter::finished`].
    pub fn decide(
        &mut self,
        key: &str,
        spec: &NodeAttachment,
        status: Option<&StatusFile>,
        revoked: bool,
        now: Instant,
        now_unix_ms: u64,
    ) -> Option<PrimaryUnreachable> {
        let Some(status) = status.filter(|s| s.unanswered.is_some()) else {
            // Answered again (or no status): the next silence reports at once.
            self.last.remove(key);
            self.logged.remove(key);
            return None;
        };
        if self.inflight.contains(key) {
            return None;
        }
        let due = report_due(
            spec,
            status,
            revoked,
            self.last.get(key).copied(),
            now,
            now_unix_ms,
        )?;
        self.last.insert(key.to_string(), now);
        self.inflight.insert(key.to_string());
        Some(due)
    }

    /// Records a report's result; returns whether it deserves a log line (at the level the
    /// caller picks): the first of its kind for this attachment while the condition lasts, and
    /// only the first 404 of the manager's life.
    pub fn finished(&mut self, key: &str, result: &ReportResult) -> bool {
        self.inflight.remove(key);
        if *result == ReportResult::NotFound {
            return !std::mem::replace(&mut self.not_found_logged, true);
        }
        let kind = result.kind();
        self.logged.get(key) != Some(&kind) && {
            self.logged.insert(key.to_string(), kind);
            true
        }
    }

    /// Forgets attachments that are gone.
    pub fn retain(&mut self, keys: &HashSet<String>) {
        self.last.retain(|k, _| keys.contains(k));
        self.logged.retain(|k, _| keys.contains(k));
    }
}

/// Reads keel-vhost's status files every [`STATUS_POLL`] and reports unanswered primaries.
async fn report_unanswered(api: ApiClient, mgr: Arc<std::sync::Mutex<Manager>>) {
    let reporter = Arc::new(std::sync::Mutex::new(Reporter::default()));
    loop {
        tokio::time::sleep(STATUS_POLL).await;
        // The manager's lock may be held for seconds (stopping a process), and the status
        // files are read from disk: both off the runtime's threads.
        let (m, r) = (mgr.clone(), reporter.clone());
        let due = tokio::task::spawn_blocking(move || {
            let watched = m.lock().unwrap_or_else(|p| p.into_inner()).watched();
            let keys: HashSet<String> = watched.iter().map(|(k, ..)| k.clone()).collect();
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
            r.retain(&keys);
            let mut due = Vec::new();
            for (k, spec, revoked, path) in watched {
                let status = StatusFile::load(&path).ok();
                let now_unix_ms = unix_ms(std::time::SystemTime::now());
                if let Some(body) = r.decide(
                    &k,
                    &spec,
                    status.as_ref(),
                    revoked,
                    Instant::now(),
                    now_unix_ms,
                ) {
                    due.push((k, spec.volume, body));
                }
            }
            due
        })
        .await
        .unwrap_or_default();
        for (k, volume, body) in due {
            let (api, reporter) = (api.clone(), reporter.clone());
            tokio::spawn(async move {
                tracing::info!(attachment = %k, server = %body.server, epoch = body.epoch, unanswered_ms = body.unanswered_ms, "reporting an unanswered primary to the controller");
                let path = format!("/v1/volumes/{volume}/primary-unreachable");
                let result = ReportResult::of(api.post::<_, PrimaryReport>(&path, &body).await);
                let log = reporter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .finished(&k, &result);
                match &result {
                    ReportResult::Answered(rep) if log => {
                        tracing::info!(attachment = %k, outcome = %rep.outcome, epoch = rep.epoch, primary = ?rep.primary, "the controller answered the report of an unanswered primary")
                    }
                    ReportResult::Answered(rep) => {
                        tracing::debug!(attachment = %k, outcome = %rep.outcome, epoch = rep.epoch, "report answered")
                    }
                    ReportResult::NotFound if log => {
                        tracing::warn!(attachment = %k, "the controller does not take reports of unanswered primaries (404: an older version?); it relies on its own heartbeats (logged once)")
                    }
                    ReportResult::NotFound => tracing::debug!(attachment = %k, "report: 404"),
                    ReportResult::Failed(e) if log => {
                        tracing::warn!(attachment = %k, error = %e, "reporting an unanswered primary failed; retrying while it lasts")
                    }
                    ReportResult::Failed(e) => {
                        tracing::debug!(attachment = %k, error = %e, "report failed")
                    }
                }
            });
        }
    }
}

async fn register(api: &ApiClient, args: &NodeArgs) {
    let reg = NodeRegistration {
        id: args.id.clone(),
        socket_dir: args.socket_dir.display().to_string(),
    };
    let mut delay = Duration::from_millis(100);
    let start = Instant::now();
    loop {
        match api.post::<_, keel_api::NodeInfo>("/v1/nodes", &reg).await {
            Ok(_) => {
                tracing::info!(controller = %api.url(), "registered with the controller");
                return;
            }
            Err(e) if start.elapsed() < keel_api::REGISTER_QUIET => {
                tracing::info!(error = %e, "registering with the controller failed (it may be starting); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
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
    // A renewed certificate is picked up without a restart; the CRL the controller hands out
    // (kept in the state directory) applies to the connections to it.
    let source = keel_proto::tls::TlsSource::new(&paths)
        .context("loading TLS certificates (make them with `keelctl pki`)")?;
    let crl_file = args.state_dir.join("crl.pem");
    keel_api::load_saved_crl(&source, &crl_file);
    let tls = keel_api::client_tls_from(&source).context("TLS configuration")?;
    let api = ApiClient::new(&args.controller, tls, None)?.with_timeout(Duration::from_secs(10));
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let mut mgr = Manager {
        args: args.clone(),
        vhost_cmd,
        slots: HashMap::new(),
        applied: None,
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
                let interval = Duration::from_millis(args.heartbeat_ms);
                let mut last: Option<(NodeHeartbeat, Instant)> = None;
                loop {
                    let hb = {
                        let m = mgr.lock().unwrap_or_else(|p| p.into_inner());
                        NodeHeartbeat {
                            attachments: m.reports(),
                            version: m.applied,
                        }
                    };
                    if !heartbeat_due(last.as_ref(), &hb, interval) {
                        tokio::time::sleep(HEARTBEAT_POLL).await;
                        continue;
                    }
                    last = Some((hb.clone(), Instant::now()));
                    let path = format!("/v1/nodes/{}/heartbeat", args.id);
                    match api
                        .post::<_, keel_api::HeartbeatAnswer>(&path, &hb)
                        .await
                    {
                        Ok(answer) => {
                            if let Err(e) = keel_api::sync_crl(
                                &api,
                                &source,
                                answer.crl_number,
                                Some(&crl_file),
                            )
                            .await
                            {
                                tracing::warn!(error = %e, "certificate revocation list not applied");
                            }
                        }
                        Err(e) if e.status() == Some(404) => {
                            register(&api, &args).await;
                            last = None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "heartbeat failed");
                            // Not delivered: the next is due at the interval, not at once.
                        }
                    }
                    tokio::time::sleep(HEARTBEAT_POLL).await;
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
                                let mut m = mgr.lock().unwrap_or_else(|p| p.into_inner());
                                m.reconcile(&na.attachments);
                                m.applied = Some(na.version);
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
        let reports = tokio::spawn(report_unanswered(api.clone(), mgr.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        hb.abort();
        watch.abort();
        reports.abort();
        anyhow::Ok(())
    });
    tracing::info!("node manager stopping: stopping every attachment");
    mgr.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::UnansweredStatus;
    use clap::Parser;

    #[test]
    fn a_heartbeat_goes_at_once_when_a_report_changes_else_at_the_interval() {
        let report = |listening| AttachmentReport {
            volume: "v".into(),
            instance: "vm1".into(),
            connected: false,
            listening,
        };
        let hb = |listening, version| NodeHeartbeat {
            attachments: vec![report(listening)],
            version: Some(version),
        };
        let second = Duration::from_secs(1);
        assert!(heartbeat_due(None, &hb(false, 1), second));
        let sent = (hb(false, 1), Instant::now());
        assert!(!heartbeat_due(Some(&sent), &hb(false, 1), second));
        assert!(heartbeat_due(Some(&sent), &hb(true, 1), second));
        assert!(heartbeat_due(Some(&sent), &hb(false, 2), second));
        let old = (hb(false, 1), Instant::now() - second);
        assert!(heartbeat_due(Some(&old), &hb(false, 1), second));
    }

    fn spec(server: &str) -> NodeAttachment {
        NodeAttachment {
            volume: "00000000000000000000000000abc123".into(),
            instance: "vm1".into(),
            socket: "/tmp/vm1.sock".into(),
            read_only: false,
            epoch: 4,
            size: 512,
            server: server.into(),
            block_size: 512,
        }
    }

    fn status(unanswered: Option<(&str, u64, u64)>) -> StatusFile {
        StatusFile {
            connected: true,
            listening: true,
            pid: 1,
            size: 512,
            epoch: 4,
            server: "10.0.0.1:7500".into(),
            unanswered: unanswered.map(|(server, epoch, since)| UnansweredStatus {
                server: server.into(),
                epoch,
                since_unix_ms: since,
            }),
            io_failed: 0,
        }
    }

    #[test]
    fn a_report_is_due_only_for_the_primary_the_manager_serves() {
        let now = Instant::now();
        let s = status(Some(("10.0.0.1:7500", 4, 10_000)));
        let p = spec("10.0.0.1:7500");
        assert_eq!(
            report_due(&p, &s, false, None, now, 12_500),
            Some(PrimaryUnreachable {
                server: "10.0.0.1:7500".into(),
                epoch: 4,
                unanswered_ms: 2500,
            })
        );
        // Nothing unanswered, revoked, or the primary already moved: nothing to say.
        assert_eq!(
            report_due(&p, &status(None), false, None, now, 12_500),
            None
        );
        assert_eq!(report_due(&p, &s, true, None, now, 12_500), None);
        assert_eq!(
            report_due(&spec("10.0.0.2:7500"), &s, false, None, now, 12_500),
            None
        );
        // The same address spelled differently is the same server.
        let v6 = status(Some(("[::1]:7500", 4, 10_000)));
        assert!(report_due(
            &spec("[0:0:0:0:0:0:0:1]:7500"),
            &v6,
            false,
            None,
            now,
            12_500
        )
        .is_some());
        // At most once a second.
        let last = now - Duration::from_millis(400);
        assert_eq!(report_due(&p, &s, false, Some(last), now, 12_500), None);
        let last = now - REPORT_EVERY;
        assert!(report_due(&p, &s, false, Some(last), now, 12_500).is_some());
        // A clock behind the file's: zero, not a wrap-around.
        assert_eq!(
            report_due(&p, &s, false, None, now, 5).map(|r| r.unanswered_ms),
            Some(0)
        );
    }

    #[test]
    fn the_reporter_sends_once_a_second_one_at_a_time_and_logs_changes_only() {
        let t0 = Instant::now();
        let p = spec("10.0.0.1:7500");
        let s = status(Some(("10.0.0.1:7500", 4, 10_000)));
        let mut r = Reporter::default();
        let ms = Duration::from_millis;
        assert!(r.decide("a", &p, Some(&s), false, t0, 11_000).is_some());
        // In flight: nothing more, even past the interval.
        assert!(r
            .decide("a", &p, Some(&s), false, t0 + ms(1500), 12_500)
            .is_none());
        let promoted = ReportResult::Answered(PrimaryReport {
            outcome: "primary_answers".into(),
            epoch: 4,
            primary: Some("10.0.0.1:7500".into()),
        });
        assert!(r.finished("a", &promoted), "the first answer is logged");
        assert!(r
            .decide("a", &p, Some(&s), false, t0 + ms(1600), 12_600)
            .is_some());
        assert!(!r.finished("a", &promoted), "the same answer again is not");
        // Not yet a second since the last report.
        assert!(r
            .decide("a", &p, Some(&s), false, t0 + ms(2000), 13_000)
            .is_none());
        assert!(r
            .decide("a", &p, Some(&s), false, t0 + ms(2600), 13_600)
            .is_some());
        let moved = ReportResult::Answered(PrimaryReport {
            outcome: "promoted".into(),
            epoch: 5,
            primary: Some("10.0.0.2:7500".into()),
        });
        assert!(r.finished("a", &moved), "a new outcome is logged");
        // 404s (an older controller): logged once for the whole manager.
        assert!(r.decide("b", &p, Some(&s), false, t0, 11_000).is_some());
        assert!(r.finished("b", &ReportResult::NotFound));
        assert!(r
            .decide("b", &p, Some(&s), false, t0 + ms(1000), 12_000)
            .is_some());
        assert!(!r.finished("b", &ReportResult::NotFound));
        assert!(r.decide("c", &p, Some(&s), false, t0, 11_000).is_some());
        assert!(!r.finished("c", &ReportResult::NotFound));
        // Errors: the first of a run is logged.
        assert!(r.decide("d", &p, Some(&s), false, t0, 11_000).is_some());
        assert!(r.finished("d", &ReportResult::Failed("refused".into())));
        assert!(r
            .decide("d", &p, Some(&s), false, t0 + ms(1000), 12_000)
            .is_some());
        assert!(!r.finished("d", &ReportResult::Failed("timed out".into())));
        // The primary answers again: the next silence reports at once and logs again.
        assert!(r
            .decide("a", &p, Some(&status(None)), false, t0 + ms(2700), 13_700)
            .is_none());
        assert!(r
            .decide("a", &p, None, false, t0 + ms(2700), 13_700)
            .is_none());
        assert!(r
            .decide("a", &p, Some(&s), false, t0 + ms(2800), 13_800)
            .is_some());
        assert!(r.finished("a", &moved));
        // Gone attachments are forgotten.
        r.retain(&HashSet::from(["a".to_string()]));
        assert!(!r.last.contains_key("d") && r.last.contains_key("a"));
    }

    #[test]
    fn a_404_without_the_apis_code_is_a_missing_route() {
        let api = |status: u16, code: &str| {
            Err(ClientError::Api {
                status,
                body: keel_api::ErrorBody {
                    code: code.into(),
                    message: "m".into(),
                },
            })
        };
        assert_eq!(ReportResult::of(api(404, "http")), ReportResult::NotFound);
        assert!(matches!(
            ReportResult::of(api(404, "not_found")),
            ReportResult::Failed(_)
        ));
        assert!(matches!(
            ReportResult::of(api(503, "unavailable")),
            ReportResult::Failed(_)
        ));
        let rep = PrimaryReport {
            outcome: "no_in_sync_mirror".into(),
            epoch: 2,
            primary: None,
        };
        assert_eq!(
            ReportResult::of(Ok(rep.clone())),
            ReportResult::Answered(rep)
        );
    }

    #[test]
    fn timeouts_are_node_flags_with_keel_vhost_defaults() {
        let base = [
            "keel-node",
            "--controller",
            "https://127.0.0.1:7000",
            "--pki-dir",
            "/tmp/pki",
            "--id",
            "n1",
            "--socket-dir",
            "/tmp/s",
            "--state-dir",
            "/tmp/st",
        ];
        let defaults = NodeArgs::try_parse_from(base).expect("parse");
        assert_eq!(
            (defaults.primary_timeout_ms, defaults.io_fail_after_ms),
            (1000, 300_000)
        );
        let mut more = base.to_vec();
        more.extend(["--primary-timeout-ms", "500", "--io-fail-after-ms", "0"]);
        let a = NodeArgs::try_parse_from(more).expect("parse");
        assert_eq!((a.primary_timeout_ms, a.io_fail_after_ms), (500, 0));
        let d = crate::daemon::Args::try_parse_from([
            "keel-vhost",
            "--socket",
            "/tmp/s",
            "--server",
            "127.0.0.1:7500",
            "--volume",
            "1",
            "--size",
            "512",
            "--pki-dir",
            "/tmp/pki",
            "--id",
            "n1",
        ])
        .expect("parse");
        assert_eq!(
            (d.primary_timeout_ms, d.io_fail_after_ms),
            (defaults.primary_timeout_ms, defaults.io_fail_after_ms),
            "the node's defaults are keel-vhost's"
        );
    }
}
