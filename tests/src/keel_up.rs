//! A whole local cluster for tests, started exactly as a user does: `keelctl --dir DIR up`,
//! driven with `keelctl` commands, its daemons found through the pid files under `DIR/run`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

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

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid read from the cluster's pid files; only sends a signal.
    unsafe {
        libc::kill(pid, sig);
    }
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

impl Cluster {
    /// Starts `keelctl up` on `dir` with `servers` storage servers (each offering
    /// `capacity`), and waits for `keel: ready`.
    pub fn up(dir: &Path, servers: u32, capacity: &str) -> Result<Cluster> {
        let mut child = Command::new(bin("keelctl")?)
            .arg("--dir")
            .arg(dir)
            .arg("up")
            .arg("--servers")
            .arg(servers.to_string())
            .arg("--capacity")
            .arg(capacity)
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(old) {
            if Instant::now() > deadline {
                bail!("{name} (pid {old}) survived SIGKILL for 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(old)
    }

    /// Waits until `keelctl up` has restarted a daemon whose previous pid was `old` (a new
    /// pid in its pid file, alive); returns the new pid.
    pub fn wait_restart(&self, name: &str, old: i32) -> Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(p) = self.pid(name) {
                if p != old && alive(p) {
                    return Ok(p);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{name} was not restarted within 30 s")
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

    /// Waits for a line of the cluster's output containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(l) = self
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("no line containing {needle:?} within {timeout:?}")
    }

    /// Polls `f` until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(t) = f() {
                return Ok(t);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("timed out after {timeout:?} waiting for {what}")
    }

    /// Stops the cluster with SIGTERM (as Ctrl-C would) and waits for `keelctl up` to exit;
    /// returns whether it exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        kill(c.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(st) = c.try_wait()? {
                return Ok(st.success());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("keelctl up did not stop within 60 s of SIGTERM")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
