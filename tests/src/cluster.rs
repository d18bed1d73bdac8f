//! Keel's daemons as real processes for tests: a PKI in a temp directory, keel-storage and
//! keel-vhost started from the workspace's built binaries, stopped or killed on demand.
//!
//! The binaries come from the same target directory as the running test (`cargo build
//! --release --bins` first; the README's test command does it). A missing binary is an error
//! that says so, never a skip.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_proto::{pki, Role};

/// The directory holding the workspace's binaries for the running test's profile.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("KEEL_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().unwrap_or_default();
    let deps = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().map(Path::to_path_buf).unwrap_or(deps)
    } else {
        deps
    }
}

/// Path of a workspace binary, or an error telling how to build it.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the daemons first (`cargo build --release --bins`, as the README's test command does), or set KEEL_BIN_DIR",
            p.display()
        );
    }
    Ok(p)
}

/// A cluster PKI in a directory: CA plus certificates issued on demand.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Result<Pki> {
        pki::init_ca(dir)?;
        Ok(Pki {
            dir: dir.to_path_buf(),
        })
    }

    /// Issues `<role>-<id>` if it does not exist yet.
    pub fn issue(&self, role: Role, id: &str) -> Result<()> {
        if !self.dir.join(format!("{role}-{id}.pem")).exists() {
            pki::issue(&self.dir, role, id, &[])?;
        }
        Ok(())
    }
}

/// Starts `cmd`, waits for a stdout line starting with `ready` and returns it with the child.
/// Other stdout lines and stderr are passed through to the test's output.
pub fn start_until_ready(mut cmd: Command, ready: &str, what: &str) -> Result<(Child, String)> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.starts_with(&ready) {
                let _ = tx.send(line.clone());
                sent = true;
            } else {
                eprintln!("{line}");
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => Ok((child, line)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!("{what} did not become ready within 30 s (exit: {status:?})")
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// The node certificate ids granted read-write access to the copies a test makes without a
/// controller (`--create`, [`replicate`]); any other node is refused (docs/security.md).
pub const TEST_NODES: [&str; 2] = ["n1", "n2"];

/// Waits (up to 5 s) until every thread of process `pid` is stopped (`T` in
/// `/proc/PID/task/*/stat`).
fn wait_stopped(pid: u32) {
    let stopped = || -> Option<bool> {
        let mut all = true;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // The state follows the command name, which is in parentheses.
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
            all &= state == "T" || state == "t";
        }
        Some(all)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while stopped() == Some(false) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A running keel-storage.
pub struct Storage {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub id: String,
    pub data_dir: PathBuf,
    pki_dir: PathBuf,
}

impl Storage {
    /// Starts a storage server; `creates` are `VOLUME:SIZE` copies to create at startup.
    pub fn start(pki: &Pki, id: &str, data_dir: &Path, creates: &[&str]) -> Result<Storage> {
        Self::start_at(pki, id, data_dir, creates, "127.0.0.1:0".parse()?)
    }

    pub fn start_at(
        pki: &Pki,
        id: &str,
        data_dir: &Path,
        creates: &[&str],
        listen: SocketAddr,
    ) -> Result<Storage> {
        Self::start_with(pki, id, data_dir, creates, listen, &[], None)
    }

    /// [`Storage::start_at`] with more `keel-storage` flags, and optionally under a file limit
    /// (`ulimit -n`, soft and hard: the daemon cannot raise it).
    pub fn start_with(
        pki: &Pki,
        id: &str,
        data_dir: &Path,
        creates: &[&str],
        listen: SocketAddr,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Result<Storage> {
        pki.issue(Role::Storage, id)?;
        let mut cmd = match nofile {
            None => Command::new(bin("keel-storage")?),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin("keel-storage")?);
                c
            }
        };
        cmd.args(extra);
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--pki-dir")
            .arg(&pki.dir)
            .arg("--id")
            .arg(id);
        for c in creates {
            cmd.arg("--create").arg(c);
        }
        if !creates.is_empty() {
            // Copies made without a controller grant the test nodes access themselves.
            for n in TEST_NODES {
                cmd.arg("--grant").arg(n);
            }
        }
        let (child, line) = start_until_ready(cmd, "keel-storage: listening on ", "keel-storage")?;
        let addr = line
            .trim_start_matches("keel-storage: listening on ")
            .trim()
            .parse()
            .context("parsing keel-storage's address")?;
        Ok(Storage {
            child: Some(child),
            addr,
            id: id.to_string(),
            data_dir: data_dir.to_path_buf(),
            pki_dir: pki.dir.clone(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (the server syncs its copies first).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts again on the same address with the same data.
    pub fn restart(&mut self) -> Result<()> {
        let pki = Pki {
            dir: self.pki_dir.clone(),
        };
        let s = Storage::start_at(&pki, &self.id, &self.data_dir, &[], self.addr)?;
        self.child = s.into_child();
        Ok(())
    }

    fn into_child(mut self) -> Option<Child> {
        self.child.take()
    }

    /// SIGSTOP / SIGCONT. A stop returns once every thread of the process is stopped: the
    /// signal alone is asynchronous, and on a busy machine a thread could still answer a
    /// request sent right after it (seen once: `hung_mirror_times_out_into_not_primary` got
    /// `ok` from a mirror it had just stopped).
    pub fn pause(&self, on: bool) {
        if let Some(c) = &self.child {
            signal(c, if on { libc::SIGSTOP } else { libc::SIGCONT });
            if on {
                wait_stopped(c.id());
            }
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How to start a keel-vhost.
#[derive(Clone, Debug)]
pub struct VhostOptions {
    pub socket: PathBuf,
    pub server: SocketAddr,
    pub volume: String,
    pub size: String,
    pub epoch: u64,
    pub node_id: String,
    pub num_queues: u16,
    pub read_only: bool,
    pub extra: Vec<String>,
}

/// A running keel-vhost.
pub struct Vhost {
    child: Option<Child>,
    pub opts: VhostOptions,
    pki_dir: PathBuf,
}

impl Vhost {
    pub fn start(pki: &Pki, opts: VhostOptions) -> Result<Vhost> {
        pki.issue(Role::Node, &opts.node_id)?;
        let mut cmd = Command::new(bin("keel-vhost")?);
        cmd.arg("--socket")
            .arg(&opts.socket)
            .arg("--server")
            .arg(opts.server.to_string())
            .arg("--volume")
            .arg(&opts.volume)
            .arg("--size")
            .arg(&opts.size)
            .arg("--epoch")
            .arg(opts.epoch.to_string())
            .arg("--pki-dir")
            .arg(&pki.dir)
            .arg("--id")
            .arg(&opts.node_id)
            .arg("--num-queues")
            .arg(opts.num_queues.to_string())
            .args(&opts.extra);
        if opts.read_only {
            cmd.arg("--read-only");
        }
        let (child, _) = start_until_ready(cmd, "keel-vhost: serving", "keel-vhost")?;
        Ok(Vhost {
            child: Some(child),
            opts,
            pki_dir: pki.dir.clone(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGHUP: keel-vhost re-reads its `--control-file`.
    pub fn sighup(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGHUP);
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let pki = Pki {
            dir: self.pki_dir.clone(),
        };
        let mut v = Vhost::start(&pki, self.opts.clone())?;
        self.child = v.child.take();
        Ok(())
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A keel-vhost `--status-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostStatus {
    pub connected: bool,
    pub pid: u32,
    pub size: u64,
    pub epoch: u64,
}

impl VhostStatus {
    /// Reads and parses a status file: `{"connected", "pid", "size", "epoch"}`.
    pub fn read(path: &Path) -> Result<VhostStatus> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let field = |name: &str| {
            v.get(name)
                .with_context(|| format!("{} has no {name:?}: {v}", path.display()))
        };
        let num = |name: &str| -> Result<u64> {
            field(name)?
                .as_u64()
                .with_context(|| format!("{name:?} is not a u64: {v}"))
        };
        Ok(VhostStatus {
            connected: field("connected")?
                .as_bool()
                .with_context(|| format!("\"connected\" is not a bool: {v}"))?,
            pid: u32::try_from(num("pid")?)?,
            size: num("size")?,
            epoch: num("epoch")?,
        })
    }

    /// Polls the status file until `want` holds for it; errors with the last one seen after
    /// `timeout`.
    pub fn wait_for(
        path: &Path,
        timeout: Duration,
        want: impl Fn(&VhostStatus) -> bool,
    ) -> Result<VhostStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = VhostStatus::read(path);
            if let Ok(s) = &got {
                if want(s) {
                    return Ok(*s);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: status not reached within {timeout:?}; last: {got:?}",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Writes a keel-vhost `--control-file` (`{"size": <bytes>, "epoch": <u64>}`) atomically.
pub fn write_vhost_control(path: &Path, size: u64, epoch: u64) -> Result<()> {
    write_atomically(
        path,
        format!("{{\"size\": {size}, \"epoch\": {epoch}}}\n").as_bytes(),
    )
}

/// Writes a keel-vhost `--control-file` naming a storage server too (`{"size", "epoch",
/// "server": "IP:PORT"}`) atomically. `server` is written as given (a bad one tests refusal).
pub fn write_vhost_control_server(path: &Path, size: u64, epoch: u64, server: &str) -> Result<()> {
    let v = serde_json::json!({ "size": size, "epoch": epoch, "server": server });
    write_atomically(path, format!("{v}\n").as_bytes())
}

/// The `server` a keel-vhost `--status-file` reports (`None` if the file has none).
pub fn vhost_status_server(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(v.get("server").and_then(|s| s.as_str()).map(str::to_string))
}

/// Writes `data` to a temporary file next to `path` and renames it over `path`.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// A PKI, keel-storage `s1` and keel-vhost `n1` in a new temporary directory: one volume's
/// data path.
pub struct DataPath {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub storage: Storage,
    pub vhost: Vhost,
}

/// How long [`DataPath::reload`] waits for keel-vhost.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

impl DataPath {
    /// Starts keel-storage creating the copy `create` (`VOLUME:SIZE[:EPOCH]`), then keel-vhost
    /// serving `VOLUME` at `SIZE` on `DIR/<socket>` at epoch 1, one queue, read-write, without
    /// further options; `adjust` changes those options, given the directory.
    pub fn start(
        create: &str,
        socket: &str,
        adjust: impl FnOnce(&Path, VhostOptions) -> VhostOptions,
    ) -> Result<DataPath> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(&dir.path().join("pki"))?;
        let storage = Storage::start(&pki, "s1", &dir.path().join("data"), &[create])?;
        let mut parts = create.split(':');
        let volume = parts.next().unwrap_or_default().to_string();
        let size = parts
            .next()
            .with_context(|| format!("the copy {create:?} has no size"))?
            .to_string();
        let opts = VhostOptions {
            socket: dir.path().join(socket),
            server: storage.addr,
            volume,
            size,
            epoch: 1,
            node_id: "n1".into(),
            num_queues: 1,
            read_only: false,
            extra: Vec::new(),
        };
        let vhost = Vhost::start(&pki, adjust(dir.path(), opts))?;
        Ok(DataPath {
            dir,
            pki,
            storage,
            vhost,
        })
    }

    /// `DIR/control.json`, keel-vhost's control file when started with [`control_args`].
    pub fn control(&self) -> PathBuf {
        self.dir.path().join("control.json")
    }

    /// `DIR/status.json`, keel-vhost's status file when started with [`control_args`].
    pub fn status(&self) -> PathBuf {
        self.dir.path().join("status.json")
    }

    /// Writes the control file, sends SIGHUP and waits for the reload.
    pub fn push(&self, size: u64, epoch: u64) -> Result<()> {
        write_vhost_control(&self.control(), size, epoch)?;
        self.reload()
    }

    /// Writes the control file with `server` too, sends SIGHUP and waits for the reload.
    pub fn push_server(&self, size: u64, epoch: u64, server: &str) -> Result<()> {
        write_vhost_control_server(&self.control(), size, epoch, server)?;
        self.reload()
    }

    /// Sends SIGHUP and waits (up to 15 s) until keel-vhost has reloaded: every reload replaces
    /// the status file (a new inode), whatever the control file held.
    pub fn reload(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let inode = || std::fs::metadata(self.status()).map(|m| m.ino()).ok();
        let before = inode();
        self.vhost.sighup();
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while inode() == before {
            anyhow::ensure!(
                Instant::now() < deadline,
                "keel-vhost did not reload within {RELOAD_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// keel-vhost's `--control-file DIR/control.json --status-file DIR/status.json`: the files
/// [`DataPath::control`] and [`DataPath::status`] name.
pub fn control_args(dir: &Path) -> Vec<String> {
    vec![
        "--control-file".into(),
        dir.join("control.json").display().to_string(),
        "--status-file".into(),
        dir.join("status.json").display().to_string(),
    ]
}

/// Sets up a replicated volume by hand, as the controller would (certificate `controller-c1`):
/// an empty mirror copy on each of `mirrors` and the primary on `primary`, created at epoch 1,
/// then the membership at epoch 2 (writer epoch 1) pushed to the mirrors first, then to the
/// primary. Clients write with epoch 2. Nodes [`TEST_NODES`] are granted read-write access and
/// the mirrors take replicated requests from the primary's certificate only.
pub fn replicate(
    pki: &Pki,
    volume: &str,
    size: u64,
    primary: &Storage,
    mirrors: &[&Storage],
) -> Result<()> {
    use keel_proto::admin::{admin_call, AdminRequest};
    use keel_proto::members::{Access, Grant};
    use keel_proto::tls::{client_config, TlsPaths};
    use keel_proto::{Epoch, MemberRole, VolumeId};
    let volume: VolumeId = volume.parse()?;
    let grants: Vec<Grant> = TEST_NODES
        .iter()
        .map(|n| Grant {
            node: n.to_string(),
            access: Access::ReadWrite,
        })
        .collect();
    pki.issue(Role::Controller, "c1")?;
    let cfg = client_config(&TlsPaths::in_dir(&pki.dir, "controller-c1"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let call = |s: &Storage, req: AdminRequest| {
            let (cfg, addr) = (cfg.clone(), s.addr);
            async move {
                admin_call(addr, cfg, req)
                    .await
                    .with_context(|| format!("admin request to {addr}"))
            }
        };
        for m in mirrors {
            call(
                m,
                AdminRequest::CreateCopy {
                    volume,
                    size,
                    role: MemberRole::Mirror,
                    epoch: Epoch(1),
                },
            )
            .await?;
        }
        call(
            primary,
            AdminRequest::CreateCopy {
                volume,
                size,
                role: MemberRole::Primary,
                epoch: Epoch(1),
            },
        )
        .await?;
        for m in mirrors {
            call(
                m,
                AdminRequest::SetMembership {
                    volume,
                    role: MemberRole::Mirror,
                    epoch: Epoch(2),
                    writer_epoch: Epoch(1),
                    mirrors: Vec::new(),
                    rebuilding: Vec::new(),
                    primary: Some(primary.id.clone()),
                    grants: grants.clone(),
                },
            )
            .await?;
        }
        call(
            primary,
            AdminRequest::SetMembership {
                volume,
                role: MemberRole::Primary,
                epoch: Epoch(2),
                writer_epoch: Epoch(1),
                mirrors: mirrors.iter().map(|m| m.addr).collect(),
                rebuilding: Vec::new(),
                primary: Some(primary.id.clone()),
                grants: grants.clone(),
            },
        )
        .await?;
        Ok(())
    })
}
