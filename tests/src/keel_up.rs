//! A whole local cluster for tests, started exactly as a user does: `keelctl --dir DIR up`,
//! driven with `keelctl` commands, its daemons found through the pid files under `DIR/run`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cluster::bin;

/// A running `keelctl up`.
pub struct Cluster {
    child: Option<Child>,
    pub dir: PathBuf,
    /// The controller URL from the ready line.
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
}

/// A finished `keelctl` command.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Sends `sig` to `pid` (a daemon of the test's own cluster).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid of the test's own cluster; only sends a signal.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Calls `f` every `every` until it returns `Some`; fails naming `what` once `timeout` has
/// passed.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// [`poll`] every 100 ms.
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> Result<T> {
    poll(timeout, Duration::from_millis(100), what, f)
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit (checking every `every`);
/// returns whether it exited successfully. Kills it and fails naming `what` if it does not stop.
pub fn terminate(
    child: &mut Child,
    timeout: Duration,
    every: Duration,
    what: &str,
) -> Result<bool> {
    kill(child.id() as i32, libc::SIGTERM);
    let stopped = poll(
        timeout,
        every,
        &format!("{what} to stop after SIGTERM"),
        || child.try_wait().transpose(),
    );
    match stopped {
        Ok(st) => Ok(st?.success()),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// `keelctl volume VERB VOLUME --node NODE --instance INSTANCE`, then `extra`: an `attach` or
/// `detach` (with `--force`, `--read-only`, `-o json`, ...).
pub fn volume_args<'a>(
    verb: &'a str,
    volume: &'a str,
    node: &'a str,
    instance: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "volume",
        verb,
        volume,
        "--node",
        node,
        "--instance",
        instance,
    ];
    a.extend_from_slice(extra);
    a
}

/// The socket an attach answer (`-o json`) names.
pub fn socket(answer: &Value) -> Result<PathBuf> {
    let s = answer["socket"]
        .as_str()
        .with_context(|| format!("attach printed no socket: {answer}"))?;
    Ok(PathBuf::from(s))
}

/// Waits for `socket` to appear and connects a test VMM to it (retrying while keel-vhost
/// is between bind and listen), for up to 30 s.
pub fn connect_vmm(socket: &Path, opts: crate::vmm::VmmOptions) -> Result<crate::vmm::TestVmm> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = if socket.exists() {
            match crate::vmm::TestVmm::connect(socket, opts.clone()) {
                Ok(v) => return Ok(v),
                Err(e) => format!("{e:#}"),
            }
        } else {
            "socket does not exist".to_string()
        };
        if Instant::now() > deadline {
            bail!(
                "cannot connect a VMM to {} within 30 s: {err}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The epoch `keelctl volume describe -o json` shows.
pub fn epoch(describe: &Value) -> u64 {
    describe["epoch"].as_u64().expect("describe shows an epoch")
}

/// `(node, instance)` of each attachment `keelctl volume describe -o json` shows.
pub fn attachments(describe: &Value) -> Vec<(String, String)> {
    describe["attachments"]
        .as_array()
        .expect("describe shows attachments")
        .iter()
        .map(|a| {
            (
                a["node"].as_str().unwrap_or_default().to_string(),
                a["instance"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Whether `pid` runs (zombies count as gone).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The lines of a cluster's output (every daemon's log, prefixed by its name, and `keelctl
/// up`'s own) at WARN or ERROR level: a session without faults has none.
pub fn warnings(log: &Mutex<Vec<String>>) -> Vec<String> {
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .cloned()
        .collect()
}

impl Cluster {
    /// Starts `keelctl up` on `dir` with `servers` storage servers (each offering
    /// `capacity`), and waits for `keel: ready`.
    pub fn up(dir: &Path, servers: u32, capacity: &str) -> Result<Cluster> {
        Cluster::up_with_args(dir, servers, capacity, &[])
    }

    /// [`Cluster::up`] with more `keelctl up` options (`--failure-timeout-ms`, ...).
    pub fn up_with_args(
        dir: &Path,
        servers: u32,
        capacity: &str,
        extra: &[&str],
    ) -> Result<Cluster> {
        let mut child = Command::new(bin("keelctl")?)
            .arg("--dir")
            .arg(dir)
            .arg("up")
            .arg("--servers")
            .arg(servers.to_string())
            .arg("--capacity")
            .arg(capacity)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting keelctl up")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.strip_prefix("keel: ready controller=") {
                        let _ = tx.send(url.to_string());
                    }
                    log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let url = match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = log.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                bail!("keelctl up did not print `keel: ready` within 90 s; its output:\n{tail}");
            }
        };
        Ok(Cluster {
            child: Some(child),
            dir: dir.to_path_buf(),
            url,
            log,
        })
    }

    /// Runs `keelctl --dir DIR args...`.
    pub fn ctl(&self, args: &[&str]) -> Result<Out> {
        let out = Command::new(bin("keelctl")?)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .context("running keelctl")?;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs a command with `-o json`, requires exit 0, and parses its output.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ctl(&a)?;
        if out.code != 0 {
            bail!("keelctl {args:?} exited {}: {}", out.code, out.stderr);
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("keelctl {args:?} printed no JSON: {}", out.stdout))
    }

    /// `keelctl volume describe VOLUME -o json`.
    pub fn describe(&self, volume: &str) -> Result<Value> {
        self.json(&["volume", "describe", volume])
    }

    /// Attaches `volume` to `node`/`instance` (`extra`: `--read-only`, `--force`); returns the
    /// socket the controller chose and the whole answer.
    pub fn attach(
        &self,
        volume: &str,
        node: &str,
        instance: &str,
        extra: &[&str],
    ) -> Result<(PathBuf, Value)> {
        let a = self.json(&volume_args("attach", volume, node, instance, extra))?;
        Ok((socket(&a)?, a))
    }

    /// Detaches `volume` from `node`/`instance` once the controller lets it: asks again (every
    /// 200 ms, up to `timeout`) while it refuses because the guest is still reported connected
    /// (exit 4) or not reported yet (exit 7); any other failure is an error at once.
    pub fn detach_when_disconnected(
        &self,
        volume: &str,
        node: &str,
        instance: &str,
        timeout: Duration,
    ) -> Result<()> {
        let args = volume_args("detach", volume, node, instance, &[]);
        self.wait_for(
            timeout,
            &format!("{node}/{instance} to be detached from {volume}"),
            || {
                let o = self.ctl(&args).ok()?;
                match o.code {
                    0 => Some(Ok(())),
                    4 | 7 if o.stderr.contains("connected") => None,
                    _ => Some(Err(anyhow::anyhow!(
                        "detach exited {}: {}",
                        o.code,
                        o.stderr
                    ))),
                }
            },
        )?
    }

    /// Waits until `keelctl volume describe` shows the guest of `volume`'s (first) attachment
    /// connected, or not connected.
    pub fn wait_connected(&self, volume: &str, connected: bool, timeout: Duration) -> Result<()> {
        let what = if connected { "connected" } else { "gone" };
        self.wait_for(
            timeout,
            &format!("the controller to see the guest of {volume} {what}"),
            || {
                let v = self.describe(volume).ok()?;
                (v["attachments"][0]["connected"] == connected).then_some(())
            },
        )
    }

    /// The pid recorded in `DIR/run/<name>.pid` (`controller`, `storage-s1`, `node`, ...).
    pub fn pid(&self, name: &str) -> Result<i32> {
        let p = self.dir.join("run").join(format!("{name}.pid"));
        std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", p.display()))
    }

    /// kill -9 a daemon and wait until `keelctl up` has restarted it (a new pid, alive).
    pub fn kill9_and_wait_restart(&self, name: &str) -> Result<i32> {
        let old = self.kill9(name)?;
        self.wait_restart(name, old)
    }

    /// kill -9 a daemon and wait until it is gone (not yet restarted, most likely); returns
    /// its pid, for [`Cluster::wait_restart`].
    pub fn kill9(&self, name: &str) -> Result<i32> {
        let old = self.pid(name)?;
        kill(old, libc::SIGKILL);
        poll(
            Duration::from_secs(10),
            Duration::from_millis(5),
            &format!("{name} (pid {old}) to die of SIGKILL"),
            || (!alive(old)).then_some(old),
        )
    }

    /// Waits until `keelctl up` has restarted a daemon whose previous pid was `old` (a new
    /// pid in its pid file, alive); returns the new pid.
    pub fn wait_restart(&self, name: &str, old: i32) -> Result<i32> {
        wait_until(
            Duration::from_secs(30),
            &format!("{name} to be restarted"),
            || self.pid(name).ok().filter(|&p| p != old && alive(p)),
        )
    }

    /// Keeps `name` down when it dies (`DIR/run/<name>.hold`), as if its machine were gone.
    pub fn hold(&self, name: &str) -> Result<()> {
        let p = self.dir.join("run").join(format!("{name}.hold"));
        std::fs::write(&p, b"").with_context(|| format!("creating {}", p.display()))
    }

    /// Lets `keelctl up` restart `name` again (undoes [`Cluster::hold`]).
    pub fn release(&self, name: &str) -> Result<()> {
        let p = self.dir.join("run").join(format!("{name}.hold"));
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// Sends `sig` to a daemon.
    pub fn signal(&self, name: &str, sig: i32) -> Result<()> {
        kill(self.pid(name)?, sig);
        Ok(())
    }

    /// The lines of `DIR/logs/<daemon>.log` (`controller`, `s1`, `node1`, ...) containing
    /// `needle`, the last `max` of them: for failure messages.
    pub fn log_grep(&self, daemon: &str, needle: &str, max: usize) -> String {
        let p = self.dir.join("logs").join(format!("{daemon}.log"));
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let hits: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        hits[hits.len().saturating_sub(max)..].join("\n")
    }

    /// [`warnings`] of this cluster's output so far.
    pub fn warnings(&self) -> Vec<String> {
        warnings(&self.log)
    }

    /// The cluster's output as it is captured (still filled while `keelctl up` stops): for
    /// [`warnings`] after [`Cluster::stop`].
    pub fn log_handle(&self) -> Arc<Mutex<Vec<String>>> {
        self.log.clone()
    }

    /// Waits for a line of the cluster's output containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        wait_until(timeout, &format!("a line containing {needle:?}"), || {
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// [`poll`] every 200 ms (a `keelctl` command a time, most often).
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        f: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        poll(timeout, Duration::from_millis(200), what, f)
    }

    /// Stops the cluster with SIGTERM (as Ctrl-C would) and waits for `keelctl up` to exit;
    /// returns whether it exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        terminate(
            &mut c,
            Duration::from_secs(60),
            Duration::from_millis(100),
            "keelctl up",
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
