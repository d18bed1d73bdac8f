//! End to end with a real guest: QEMU (TCG) boots a tiny Linux whose /dev/vda is a Keel
//! volume served by keel-vhost, backed by keel-storage over mutual TLS; fio writes and
//! verifies data with crc32c. Passes only on fio's own success (exit 0, `err= 0`).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use keel_tests::cluster::{control_args, write_vhost_control, DataPath, VhostOptions, VhostStatus};
use keel_tests::guest::{self, console_lines, Disk, GuestConfig, GuestOutput, RESIZE_LINES};

const VOLUME: &str = "e2e1";
const SIZE: &str = "512MiB";

/// fio: random writes of `bs` (e.g. `4k-128k`) over 256 MiB at queue depth 32, every block
/// verified by crc32c; `extra` adds options (e.g. `--verify_only`).
fn fio_script(bs: &str, extra: &str, marker: &str) -> String {
    format!(
        "echo {marker}\n\
         fio --name=keel --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \
         --rw=randwrite --bsrange={bs} --size=256M --randseed=4242 --verify=crc32c \
         --verify_fatal=1 --end_fsync=1 --group_reporting {extra} > /tmp/fio.out 2>&1\n\
         rc=$?\ncat /tmp/fio.out\necho FIO-RC=$rc\nexit $rc\n"
    )
}

fn check_fio(out: &GuestOutput) -> Result<()> {
    ensure!(
        out.exit_status == Some(0),
        "fio failed (exit {:?}):\n{}",
        out.exit_status,
        out.console
    );
    ensure!(
        out.console.contains("err= 0"),
        "fio's success line is missing:\n{}",
        out.console
    );
    ensure!(
        !out.console.contains("verify: bad") && !out.console.contains("crc32c: verify failed"),
        "fio reported bad data:\n{}",
        out.console
    );
    Ok(())
}

/// keel-storage with a `SIZE` copy of `VOLUME`, keel-vhost serving all of it with `num_queues`
/// queues and the `extra` options.
fn setup(num_queues: u16, extra: &[&str]) -> Result<DataPath> {
    guest::require_tools()?;
    DataPath::start(&format!("{VOLUME}:{SIZE}"), "vda.sock", |_, o| {
        VhostOptions {
            num_queues,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..o
        }
    })
}

fn guest_config(socket: &Path, num_queues: u16, script: String) -> GuestConfig {
    let disk = Disk {
        socket: socket.to_path_buf(),
        num_queues,
        reconnect: true,
    };
    GuestConfig::one_disk(disk, script, Duration::from_secs(600))
}

/// Write + verify at QD32, then restart both daemons (kill -9) and verify the same data again
/// from a freshly booted guest.
#[test]
fn guest_fio_verifies_across_daemon_restarts() -> Result<()> {
    let mut s = setup(2, &[])?;
    let socket = s.vhost.opts.socket.clone();
    let out = guest::run(&guest_config(
        &socket,
        2,
        fio_script("4k-128k", "", "PASS1"),
    ))?;
    check_fio(&out)?;

    s.storage.kill9();
    s.vhost.kill9();
    s.storage.restart()?;
    s.vhost.restart()?;

    let out = guest::run(&guest_config(
        &socket,
        2,
        fio_script("4k-128k", "--verify_only", "PASS2"),
    ))?;
    check_fio(&out)?;
    Ok(())
}

/// Boots a guest running the verified fio job at QD32 and, 3 s into it, applies `disrupt`;
/// fio's verification must still pass.
fn fio_survives(mut s: DataPath, disrupt: impl FnOnce(&mut DataPath) -> Result<()>) -> Result<()> {
    let socket = s.vhost.opts.socket.clone();
    let g = guest::spawn(&guest_config(
        &socket,
        1,
        fio_script("4k-4k", "", "FIO-START"),
    ))?;
    g.wait_for_line("FIO-START", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(3));
    disrupt(&mut s)?;
    check_fio(&g.wait()?)
}

/// kill -9 of keel-vhost while the guest writes: QEMU reconnects to the restarted daemon, the
/// requests the guest had not seen complete are re-offered, and fio's verification passes.
#[test]
fn kill_9_of_keel_vhost_during_guest_io_loses_nothing() -> Result<()> {
    fio_survives(setup(1, &[])?, |s| {
        s.vhost.kill9();
        std::thread::sleep(Duration::from_millis(500));
        s.vhost.restart()
    })
}

/// kill -9 of keel-storage while the guest writes: keel-vhost reconnects and resends what was
/// in flight; the guest only stalls.
#[test]
fn kill_9_of_keel_storage_during_guest_io_stalls_and_loses_nothing() -> Result<()> {
    fio_survives(setup(1, &["--request-timeout-ms", "2000"])?, |s| {
        s.storage.kill9();
        std::thread::sleep(Duration::from_secs(1));
        s.storage.restart()
    })
}

/// The verification above can fail: verifying data that was never written is an error.
#[test]
fn fio_verify_only_fails_on_a_fresh_volume() -> Result<()> {
    let s = setup(1, &[])?;
    let out = guest::run(&guest_config(
        &s.vhost.opts.socket,
        1,
        fio_script("4k-128k", "--verify_only", "FRESH"),
    ))?;
    assert!(
        check_fio(&out).is_err(),
        "verifying a fresh volume must fail"
    );
    assert_ne!(out.exit_status, Some(0));
    Ok(())
}

/// keel-storage with a 128 MiB copy of `VOLUME`, and keel-vhost offering 64 MiB of it, steered
/// by a control file, reporting in a status file (both in the setup's directory).
fn resize_setup() -> Result<DataPath> {
    guest::require_tools()?;
    DataPath::start(&format!("{VOLUME}:128MiB"), "vda.sock", |dir, o| {
        VhostOptions {
            size: "64MiB".into(),
            extra: control_args(dir),
            ..o
        }
    })
}

/// Guest script: prints the size, waits (up to 120 s) for /dev/vda to become 128 MiB, checks
/// the kernel noticed, then writes 4 MiB at 100 MiB (beyond the old end) and reads it back.
const RESIZE_SCRIPT: &str = "\
    echo SIZE0=$(cat /sys/block/vda/size)\n\
    echo WAIT-RESIZE\n\
    i=0\n\
    while [ \"$(cat /sys/block/vda/size)\" != 262144 ]; do\n\
      i=$((i+1)); if [ $i -gt 1200 ]; then echo RESIZE-TIMEOUT; exit 1; fi; sleep 0.1\n\
    done\n\
    echo SIZE1=$(cat /sys/block/vda/size)\n\
    dmesg | grep -i 'capacity change' | sed 's/^/DMESG: /'\n\
    dmesg | grep -qi 'detected capacity change' || { echo NO-CAPACITY-MESSAGE; exit 1; }\n\
    dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null\n\
    dd if=/tmp/pat of=/dev/vda bs=1M seek=100 count=4 conv=fsync 2>/dev/null || { echo WRITE-FAILED; exit 1; }\n\
    blockdev --flushbufs /dev/vda\n\
    echo 3 > /proc/sys/vm/drop_caches\n\
    a=$(md5sum < /tmp/pat | cut -d' ' -f1)\n\
    b=$(dd if=/dev/vda bs=1M skip=100 count=4 2>/dev/null | md5sum | cut -d' ' -f1)\n\
    echo MD5 $a $b\n\
    [ -n \"$a\" ] && [ \"$a\" = \"$b\" ] || { echo MISMATCH; exit 1; }\n\
    echo RESIZE-OK\n";

/// Boots a guest running [`RESIZE_SCRIPT`], checks it starts at 64 MiB with the status file
/// saying connected, applies `resize` once the guest waits, and checks the guest's verdict and
/// that the status file says disconnected (at 128 MiB) once it is gone.
fn guest_resize(s: &mut DataPath, resize: impl FnOnce(&mut DataPath) -> Result<()>) -> Result<()> {
    assert!(!VhostStatus::read(&s.status())?.connected);
    let g = guest::spawn(&guest_config(&s.vhost.opts.socket, 1, RESIZE_SCRIPT.into()))?;
    let size0 = g.wait_for_line("SIZE0=", Duration::from_secs(300))?;
    ensure!(size0.contains("SIZE0=131072"), "before the resize: {size0}");
    let st = VhostStatus::wait_for(&s.status(), Duration::from_secs(30), |s| s.connected)?;
    ensure!(st.size == 64 << 20 && st.epoch == 1, "{st:?}");
    g.wait_for_line("WAIT-RESIZE", Duration::from_secs(60))?;

    resize(s)?;

    let out = g.wait()?;
    let relevant = console_lines(&out.console, RESIZE_LINES);
    ensure!(
        out.exit_status == Some(0)
            && out.console.contains("RESIZE-OK")
            && out.console.contains("SIZE1=262144"),
        "guest script failed (exit {:?}):\n{}",
        out.exit_status,
        relevant.join("\n")
    );
    let st = VhostStatus::wait_for(&s.status(), Duration::from_secs(30), |s| !s.connected)?;
    ensure!(st.size == 128 << 20, "{st:?}");
    Ok(())
}

/// Online resize seen by a real guest: the copy is 128 MiB, keel-vhost starts offering 64 MiB;
/// the node manager's control file + SIGHUP grow it to 128 MiB, QEMU gets the config-change
/// message and interrupts the guest, whose kernel picks up the new capacity; data written
/// beyond the old end reads back. The status file follows the session.
#[test]
fn guest_sees_online_resize() -> Result<()> {
    guest_resize(&mut resize_setup()?, |s| {
        write_vhost_control(&s.control(), 128 << 20, 1)?;
        s.vhost.sighup();
        Ok(())
    })
}

/// A resize made while keel-vhost is down (kill -9; the restarted one finds the larger size in
/// the control file) reaches the running guest when QEMU reconnects: keel-vhost asks QEMU to
/// re-read the config space when the device restarts.
#[test]
fn guest_sees_a_resize_made_while_keel_vhost_was_down() -> Result<()> {
    guest_resize(&mut resize_setup()?, |s| {
        s.vhost.kill9();
        write_vhost_control(&s.control(), 128 << 20, 1)?;
        s.vhost.restart()
    })
}
