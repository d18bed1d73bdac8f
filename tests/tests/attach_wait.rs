//! `keelctl volume attach` answers once the volume's socket accepts connections, so
//! `keelctl volume attach ... && qemu ...` cannot race keel-vhost's start (the controller's
//! `?wait_ms=`, the node's `listening` report). Against a whole `keelctl up` cluster.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use keel_tests::keel_up::{kill, socket, volume_args, Cluster};

/// Attaches to make in a row.
const ATTACHES: usize = 10;

/// SIGCONT on drop, so a failed check does not leave the node manager stopped.
struct ContOnDrop(i32);

impl Drop for ContOnDrop {
    fn drop(&mut self) {
        kill(self.0, libc::SIGCONT);
    }
}

fn accepts(socket: &Path) -> std::io::Result<()> {
    UnixStream::connect(socket).map(drop)
}

/// Right after each of [`ATTACHES`] attaches returns, the socket it names accepts a
/// connection, at once (no retry). The negative control is deterministic: with the node
/// manager stopped (SIGSTOP) nothing can serve a socket, so `--no-wait` answers with a socket
/// that does not exist, and the waiting attach fails with exit code 8 after its timeout
/// (the attachment recorded); once the node runs again the same attach succeeds and the
/// socket accepts.
#[test]
fn attach_returns_once_the_socket_accepts_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::up(dir.path(), 1, "4GiB")?;
    let create = |name: &str| -> Result<()> {
        cluster.json(&[
            "volume",
            "create",
            "16MiB",
            "--replicas",
            "1",
            "--name",
            name,
        ])?;
        Ok(())
    };

    let mut waited = Vec::new();
    for i in 0..ATTACHES {
        let (name, instance) = (format!("w{i}"), format!("vm{i}"));
        create(&name)?;
        let t = Instant::now();
        let (sock, answer) = cluster.attach(&name, "node1", &instance, &[])?;
        waited.push(t.elapsed());
        accepts(&sock).with_context(|| {
            format!(
                "attach {i} returned but its socket {} refuses connections: {answer}",
                sock.display()
            )
        })?;
        ensure!(
            answer["ready"] == true,
            "attach {i} answered not ready: {answer}"
        );
    }
    eprintln!("{ATTACHES} attaches, each followed at once by a connection that succeeded; attach took {waited:?}");

    // Negative control: a node manager that cannot serve.
    let node = cluster.pid("node")?;
    kill(node, libc::SIGSTOP);
    let cont = ContOnDrop(node);
    create("late")?;
    let o = cluster.ctl(&volume_args(
        "attach",
        "late",
        "node1",
        "vm-late",
        &["--no-wait", "-o", "json"],
    ))?;
    ensure!(
        o.code == 0,
        "attach --no-wait exited {}: {}",
        o.code,
        o.stderr
    );
    let late = socket(&serde_json::from_str(&o.stdout)?)?;
    ensure!(
        accepts(&late).is_err(),
        "with the node manager stopped, {} accepted a connection",
        late.display()
    );
    create("stuck")?;
    let o = cluster.ctl(&volume_args(
        "attach",
        "stuck",
        "node1",
        "vm-stuck",
        &["--wait-timeout", "2"],
    ))?;
    ensure!(
        o.code == 8 && o.stderr.contains("has not reported its socket listening"),
        "a waiting attach with the node manager stopped exited {} (want 8): {}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    let v = cluster.describe("stuck")?;
    ensure!(
        v["attachments"][0]["instance"] == "vm-stuck" && v["attachments"][0]["ready"] == false,
        "the timed-out attach's attachment is not recorded, or shown ready: {v}"
    );
    drop(cont);
    let (sock, answer) = cluster.attach("stuck", "node1", "vm-stuck", &[])?;
    accepts(&sock).with_context(|| format!("socket of the repeated attach: {answer}"))?;
    Ok(())
}
