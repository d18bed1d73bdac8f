//! Warnings mean something went wrong: a session without faults (start a cluster, create,
//! attach, guest I/O, the guest goes away, detach, stop) logs no WARN or ERROR line in any
//! daemon's log, and a session with a fault (a storage server killed) does. The Rust test VMM
//! plays the guest here; `e2e_cluster` checks the same with QEMU guests running fio.

use std::time::Duration;

use anyhow::{ensure, Result};
use keel_tests::keel_up::{connect_vmm, Cluster};
use keel_tests::vmm::{pattern, VmmOptions};

const OK: u8 = 0;

/// Create, attach, write and read back through the test VMM; the VMM disconnects. When
/// `fault` is set it runs after the writes, before the disconnect. Then detach and stop;
/// returns the WARN/ERROR lines of the whole session.
fn session(fault: impl FnOnce(&Cluster) -> Result<()>) -> Result<Vec<String>> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::up(dir.path(), 2, "4GiB")?;
    cluster.json(&["volume", "create", "64MiB", "--name", "quiet"])?;
    let (sock, _) = cluster.attach("quiet", "node1", "vm1", &[])?;
    let mut vmm = connect_vmm(&sock, VmmOptions::default())?;
    for i in 0..8u64 {
        let data = pattern(i, i * 128, 64 << 10);
        ensure!(vmm.write(0, i * 128, &data)? == OK, "write {i} failed");
        let (st, back) = vmm.read(0, i * 128, 64 << 10)?;
        ensure!(st == OK && back == data, "read {i} failed or differs");
    }
    ensure!(vmm.flush(0)? == OK, "flush failed");
    fault(&cluster)?;
    drop(vmm);
    cluster.detach_when_disconnected("quiet", "node1", "vm1", Duration::from_secs(60))?;
    let log = cluster.log_handle();
    ensure!(cluster.stop()?, "keelctl up did not exit cleanly");
    Ok(keel_tests::keel_up::warnings(&log))
}

#[test]
fn a_session_without_faults_logs_no_warning() -> Result<()> {
    let warnings = session(|_| Ok(()))?;
    ensure!(
        warnings.is_empty(),
        "a session without faults logged {} WARN/ERROR lines:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    Ok(())
}

/// The negative control: the same session with a storage server killed (kill -9; `keelctl
/// up` restarts it) shows in the warnings, so the check above can fail.
#[test]
fn a_session_with_a_fault_logs_warnings() -> Result<()> {
    let warnings = session(|c| {
        c.kill9_and_wait_restart("storage-s1")?;
        Ok(())
    })?;
    eprintln!("{} WARN/ERROR lines, e.g.:", warnings.len());
    for l in warnings.iter().take(5) {
        eprintln!("  {l}");
    }
    ensure!(
        !warnings.is_empty(),
        "a storage server killed under an attachment logged no WARN/ERROR line"
    );
    Ok(())
}
