//! End to end through the control plane, as a user runs it: `keelctl up` starts a cluster
//! (controller, two storage servers, node manager), `keelctl volume create/attach` gives a
//! vhost-user socket, a QEMU (TCG) guest writes through it with fio's crc32c verification;
//! after the guest exits the volume is detached, attached again to another instance, and a
//! second guest reads every block back (fio `--verify_only` plus an md5 of the region).
//!
//! The test prints a transcript of every `keelctl` command and its output, and fio's summary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::guest::{self, console_lines, Disk, GuestConfig, GuestOutput, RESIZE_LINES};
use keel_tests::keel_up::{socket, volume_args, Cluster, Out};
use keel_tests::writer::copies;
use serde_json::Value;

const NODE: &str = "node1";
/// Not `e2e`: the controller refuses names that parse as a (hex) volume id.
const VOLUME: &str = "e2e-vol";
/// The region fio writes and the guests checksum.
const REGION_MIB: u32 = 128;

/// A cluster started by `keelctl up` in a temporary directory: runs `keelctl` commands and
/// prints each with its output.
struct Transcript {
    /// Before `_dir`: stopped before the directory goes.
    cluster: Cluster,
    _dir: tempfile::TempDir,
    started: Instant,
}

impl Transcript {
    /// `keelctl up` with `servers` storage servers of 4 GiB each, announced in the transcript.
    fn up(servers: u32) -> Result<Transcript> {
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let cluster = Cluster::up(dir.path(), servers, "4GiB")?;
        println!(
            "=== keelctl --dir DIR up --servers {servers} --capacity 4GiB: ready, controller {} ({:.1} s)",
            cluster.url,
            started.elapsed().as_secs_f64()
        );
        Ok(Transcript {
            cluster,
            _dir: dir,
            started,
        })
    }

    /// Stops the cluster with SIGTERM and requires a clean exit.
    fn stop(mut self) -> Result<()> {
        let clean = self.cluster.stop()?;
        println!(
            "=== cluster stopped ({}), total {:.1} s",
            if clean { "clean exit" } else { "non-zero exit" },
            self.started.elapsed().as_secs_f64()
        );
        ensure!(clean, "keelctl up did not exit cleanly on SIGTERM");
        Ok(())
    }

    /// [`Transcript::stop`], then requires that no daemon logged a warning or an error from
    /// the start to the end: the session had no fault, so every event in it was expected.
    fn stop_without_warnings(self) -> Result<()> {
        let log = self.cluster.log_handle();
        self.stop()?;
        let warnings = keel_tests::keel_up::warnings(&log);
        ensure!(
            warnings.is_empty(),
            "a session without faults logged {} WARN/ERROR lines:\n{}",
            warnings.len(),
            warnings.join("\n")
        );
        println!("=== no WARN or ERROR line in the daemons' logs");
        Ok(())
    }

    /// Prints a command and its output; JSON output on one line, to keep the transcript short.
    fn show(args: &[&str], out: &Out) {
        println!("$ keelctl {}", args.join(" "));
        let compact = args
            .ends_with(&["-o", "json"])
            .then(|| serde_json::from_str::<Value>(&out.stdout).ok())
            .flatten();
        match compact {
            Some(v) => println!("  {v}"),
            None => out.stdout.lines().for_each(|l| println!("  {l}")),
        }
        for l in out.stderr.lines() {
            println!("  {l}");
        }
        if out.code != 0 {
            println!("  [exit {}]", out.code);
        }
    }

    /// Runs a command, prints it, requires exit 0.
    fn ok(&self, args: &[&str]) -> Result<Out> {
        let out = self.cluster.ctl(args)?;
        Self::show(args, &out);
        ensure!(
            out.code == 0,
            "keelctl {args:?} exited {}: {}",
            out.code,
            out.stderr
        );
        Ok(out)
    }

    /// Runs a command with `-o json`, prints it, requires exit 0, parses the output.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a)?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("keelctl {a:?} printed no JSON: {}", out.stdout))
    }

    /// Detaches `volume` from `NODE`/`instance`, retrying while the controller refuses (exit
    /// 4) because the node still reports the guest connected (up to 30 s); prints the first
    /// refusal and the final answer.
    fn detach_retrying(&self, volume: &str, instance: &str) -> Result<Value> {
        let args = volume_args("detach", volume, NODE, instance, &["-o", "json"]);
        let start = Instant::now();
        let mut refusals = 0;
        loop {
            let out = self.cluster.ctl(&args)?;
            if out.code == 0 {
                if refusals > 0 {
                    println!(
                        "  ({refusals} refusal(s) while the node still reported the guest; detached after {:.1} s)",
                        start.elapsed().as_secs_f64()
                    );
                }
                Self::show(&args, &out);
                return serde_json::from_str(&out.stdout)
                    .with_context(|| format!("detach printed no JSON: {}", out.stdout));
            }
            let connected = out.code == 4 && out.stderr.contains("still connected");
            if refusals == 0 || !connected {
                Self::show(&args, &out);
            }
            ensure!(
                connected,
                "detach failed for another reason than a connected guest (exit {}): {}",
                out.code,
                out.stderr
            );
            refusals += 1;
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "detach still refused after 30 s ({refusals} tries): {}",
                    out.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn wait_path(p: &Path, exists: bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while p.exists() != exists {
        ensure!(
            Instant::now() < deadline,
            "{} still {} after {timeout:?}",
            p.display(),
            if exists { "missing" } else { "present" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// fio over the first `REGION_MIB` of /dev/vda: random writes of 4k–64k at QD16, each block
/// with a crc32c header, fixed seed (so `--verify_only` replays the same blocks); then the
/// region's md5 and the disk's serial.
fn guest_script(marker: &str, extra: &str) -> String {
    format!(
        "echo {marker}\n\
         fio --name=keel --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
         --rw=randwrite --bsrange=4k-64k --size={REGION_MIB}M --randseed=20240917 \
         --verify=crc32c --do_verify=1 --verify_fatal=1 --end_fsync=1 --group_reporting \
         {extra} > /tmp/fio.out 2>&1\n\
         rc=$?\ncat /tmp/fio.out\necho FIO-RC=$rc\n\
         [ $rc = 0 ] || exit $rc\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         echo MD5=$(dd if=/dev/vda bs=1M count={REGION_MIB} 2>/dev/null | md5sum | cut -d' ' -f1)\n\
         echo SERIAL=$(cat /sys/block/vda/serial 2>/dev/null)\n"
    )
}

/// A guest running `script` on the attachment's `socket` (one queue, no reconnect).
fn guest_config(socket: &Path, script: impl Into<String>) -> GuestConfig {
    GuestConfig::one_disk(Disk::new(socket), script, Duration::from_secs(600))
}

/// The value after `key=` on the console (last occurrence).
fn console_value(out: &GuestOutput, key: &str) -> Option<String> {
    out.console
        .lines()
        .rev()
        .find_map(|l| l.find(key).map(|i| l[i + key.len()..].trim().to_string()))
}

/// Requires fio's success (exit 0, `err= 0`, no verify failure), prints its summary lines,
/// returns the md5 of the region.
fn check_guest(out: &GuestOutput, what: &str) -> Result<String> {
    let summary = console_lines(
        &out.console,
        &["IOPS=", "err=", "verify", "FIO-RC=", "MD5=", "SERIAL="],
    );
    println!("--- guest {what}: fio summary ---");
    for l in &summary {
        println!("  {l}");
    }
    ensure!(
        out.exit_status == Some(0),
        "guest {what} failed (exit {:?}):\n{}",
        out.exit_status,
        summary.join("\n")
    );
    ensure!(
        out.console.contains("err= 0"),
        "guest {what}: fio's success line is missing:\n{}",
        summary.join("\n")
    );
    ensure!(
        !out.console.contains("verify: bad") && !out.console.contains("crc32c: verify failed"),
        "guest {what}: fio reported bad data:\n{}",
        summary.join("\n")
    );
    let md5 = console_value(out, "MD5=").unwrap_or_default();
    ensure!(
        md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit()),
        "guest {what}: no md5 of the region: {md5:?}"
    );
    Ok(md5)
}

/// Attaches `volume` to `NODE`/`instance` and waits for the node manager to create the
/// socket; returns the socket and the attach answer.
fn attach(t: &Transcript, volume: &str, instance: &str) -> Result<(PathBuf, Value)> {
    let a = t.json(&volume_args("attach", volume, NODE, instance, &[]))?;
    let socket = socket(&a)?;
    wait_path(&socket, true, Duration::from_secs(30))
        .context("the node manager did not create the attachment's socket")?;
    println!("  (socket {} is up)", socket.display());
    Ok((socket, a))
}

/// [`attach`] of `VOLUME`, checking the answer is a read-write attachment of `NODE`/`instance`;
/// returns the socket and the epoch.
fn attach_rw(t: &Transcript, instance: &str) -> Result<(PathBuf, u64)> {
    let (socket, a) = attach(t, VOLUME, instance)?;
    ensure!(
        a["node"] == NODE && a["instance"] == instance && a["mode"] == "read_write",
        "attach answer: {a}"
    );
    let epoch = a["epoch"].as_u64().context("attach printed no epoch")?;
    Ok((socket, epoch))
}

/// Detaches `volume` from `NODE`/`instance` (once the node reports the guest gone); the volume
/// is available again and the socket removed.
fn detach(t: &Transcript, volume: &str, instance: &str, socket: &Path) -> Result<()> {
    t.detach_retrying(volume, instance)?;
    let d = t.json(&["volume", "describe", volume])?;
    ensure!(
        d["state"] == "available" && d["attachments"].as_array().is_some_and(|a| a.is_empty()),
        "after detach: {d}"
    );
    wait_path(socket, false, Duration::from_secs(15))
        .context("the node manager did not remove the detached socket")?;
    println!("  (socket {} is gone)", socket.display());
    Ok(())
}

/// After a guest has exited: the attachment is still recorded; then [`detach`] of `VOLUME`.
fn detach_and_check(t: &Transcript, instance: &str, socket: &Path) -> Result<()> {
    let d = t.json(&["volume", "describe", VOLUME])?;
    let atts = d["attachments"].as_array().context("no attachments")?;
    ensure!(
        atts.len() == 1 && atts[0]["node"] == NODE && atts[0]["instance"] == instance,
        "after the guest exited, describe should still show {NODE}/{instance}: {d}"
    );
    detach(t, VOLUME, instance, socket)
}

/// create → attach vm1 → guest writes + verifies → detach → attach vm2 → guest verifies the
/// same data (fio `--verify_only`, md5) → detach.
#[test]
fn keelctl_up_guest_fio_detach_reattach_verifies() -> Result<()> {
    // Fails (not skips) without QEMU, a kernel, busybox or fio.
    guest::require_tools()?;
    let t = Transcript::up(2)?;

    t.ok(&["server", "list"])?;
    t.ok(&["node", "list"])?;

    let v = t.json(&["volume", "create", "256MiB", "--name", VOLUME])?;
    ensure!(v["size"] == 268_435_456u64, "size: {v}");
    ensure!(v["state"] == "available", "state: {v}");
    let copies = v["copies"].as_array().context("no copies")?;
    // The default: a primary and one mirror, on the two servers.
    ensure!(
        copies.len() == 2
            && copies[0]["role"] == "primary"
            && copies[1]["role"] == "mirror"
            && copies[0]["server"] != copies[1]["server"],
        "copies: {v}"
    );
    let id = v["id"].as_str().context("no id")?.to_string();

    // First guest: write and verify.
    let (sock1, epoch1) = attach_rw(&t, "vm1")?;
    let d = t.json(&["volume", "describe", VOLUME])?;
    ensure!(d["state"] == "attached", "after attach: {d}");
    t.ok(&["volume", "describe", VOLUME])?;
    let g = Instant::now();
    let out1 = guest::run(&guest_config(&sock1, guest_script("PASS1-WRITE", "")))?;
    let md5_1 = check_guest(&out1, "1 (vm1: randwrite + verify)")?;
    println!("  (guest 1 ran {:.1} s)", g.elapsed().as_secs_f64());
    let serial = console_value(&out1, "SERIAL=").unwrap_or_default();
    ensure!(
        !serial.is_empty() && serial.trim_start_matches('0') == id.trim_start_matches('0'),
        "the guest's disk serial {serial:?} is not the volume id {id}"
    );
    detach_and_check(&t, "vm1", &sock1)?;

    // Second guest, another instance: read everything back.
    let (sock2, epoch2) = attach_rw(&t, "vm2")?;
    ensure!(
        sock2 != sock1,
        "the new attachment reuses socket {}",
        sock1.display()
    );
    ensure!(
        epoch2 > epoch1,
        "a read-write attach must bump the epoch: {epoch1} -> {epoch2}"
    );
    t.ok(&["volume", "describe", VOLUME])?;
    let g = Instant::now();
    let out2 = guest::run(&guest_config(
        &sock2,
        guest_script("PASS2-VERIFY", "--verify_only"),
    ))?;
    let md5_2 = check_guest(&out2, "2 (vm2: verify_only)")?;
    println!("  (guest 2 ran {:.1} s)", g.elapsed().as_secs_f64());
    ensure!(
        md5_1 == md5_2,
        "the region's md5 changed across detach/attach: {md5_1} vs {md5_2}"
    );
    println!("=== md5 of the first {REGION_MIB} MiB: {md5_1} in both guests");
    detach_and_check(&t, "vm2", &sock2)?;
    t.ok(&["volume", "list"])?;
    // Nothing went wrong: registration while the controller starts, detaches (keel-vhost
    // exits without TLS close_notify), guests that exit, ... are logged below WARN.
    t.stop_without_warnings()
}

/// The volume [`keelctl_resize_reaches_a_running_guest`] grows.
const GROW: &str = "grow";

/// Guest side of [`keelctl_resize_reaches_a_running_guest`]: prints the size, polls (up to
/// 120 s; the host allows far less) until /dev/vda is 128 MiB, then writes 4 MiB of random
/// data at 100 MiB (beyond the old end) with O_DIRECT and reads it back with O_DIRECT.
const GROW_SCRIPT: &str = "\
    echo SIZE0=$(cat /sys/block/vda/size)\n\
    echo WAIT-RESIZE\n\
    i=0\n\
    while [ \"$(cat /sys/block/vda/size)\" != 262144 ]; do\n\
      i=$((i+1)); if [ $i -gt 1200 ]; then echo RESIZE-TIMEOUT size=$(cat /sys/block/vda/size); exit 1; fi; sleep 0.1\n\
    done\n\
    echo SIZE1=$(cat /sys/block/vda/size)\n\
    dmesg | grep -i 'capacity change' | sed 's/^/DMESG: /'\n\
    dd if=/dev/urandom of=/dev/shm/pat bs=1M count=4 2>/dev/null\n\
    dd if=/dev/shm/pat of=/dev/vda bs=1M seek=100 count=4 oflag=direct 2>/tmp/dd.err || { echo WRITE-FAILED; sed 's/^/DD: /' /tmp/dd.err; exit 1; }\n\
    a=$(md5sum < /dev/shm/pat | cut -d' ' -f1)\n\
    b=$(dd if=/dev/vda bs=1M skip=100 count=4 iflag=direct 2>/tmp/dd.err | md5sum | cut -d' ' -f1)\n\
    sed 's/^/DD: /' /tmp/dd.err\n\
    echo MD5 $a $b\n\
    [ -n \"$a\" ] && [ \"$a\" = \"$b\" ] || { echo MISMATCH; exit 1; }\n\
    echo SIZE2=$(cat /sys/block/vda/size)\n\
    echo RESIZE-OK\n";

/// What the control plane logged about the resize, for a guest that never saw it.
fn resize_diagnostics(cluster: &Cluster) -> String {
    let logs = std::fs::read_dir(cluster.dir.join("logs"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!(
        "logs: {logs}\n--- controller ---\n{}\n--- node1 ---\n{}\n{}\n--- s1 ---\n{}",
        cluster.log_grep("controller", "resize", 5),
        cluster.log_grep("node1", "attachment updated", 5),
        cluster.log_grep("node1", "size", 5),
        cluster.log_grep("s1", "esize", 5),
    )
}

/// Online resize through the whole control plane: `keelctl volume resize` grows a volume a
/// running guest has attached; the controller records it and pushes it to the copy, the node
/// manager sees the new size in its long-poll, rewrites keel-vhost's control file and sends
/// SIGHUP, keel-vhost sends QEMU a config-change message, and the guest's kernel picks up the
/// new capacity. Data written beyond the old end reads back; shrinking is refused.
#[test]
fn keelctl_resize_reaches_a_running_guest() -> Result<()> {
    // Fails (not skips) without QEMU, a kernel, busybox or fio.
    guest::require_tools()?;
    // Two servers: both copies grow.
    let t = Transcript::up(2)?;

    let v = t.json(&["volume", "create", "64MiB", "--name", GROW])?;
    ensure!(v["size"] == 67_108_864u64, "size: {v}");
    let (socket, _) = attach(&t, GROW, "vm1")?;

    let g = guest::spawn(&guest_config(&socket, GROW_SCRIPT))?;
    let size0 = g.wait_for_line("SIZE0=", Duration::from_secs(300))?;
    println!("  guest: {}", size0.trim());
    ensure!(
        size0.trim().ends_with("SIZE0=131072"),
        "before the resize the guest should see 64 MiB (131072 sectors): {size0}"
    );
    g.wait_for_line("WAIT-RESIZE", Duration::from_secs(60))?;

    let r = t.json(&["volume", "resize", GROW, "128MiB"])?;
    ensure!(r["size"] == 134_217_728u64, "resize answer: {r}");
    let resized = Instant::now();
    let seen = g
        .wait_for_line("SIZE1=", Duration::from_secs(20))
        .with_context(|| {
            format!(
                "the guest did not see the new size within 20 s of the resize\n{}",
                resize_diagnostics(&t.cluster)
            )
        })?;
    println!(
        "  guest: {} ({:.1} s after keelctl volume resize answered)",
        seen.trim(),
        resized.elapsed().as_secs_f64()
    );
    let done = g.wait_for_line("RESIZE-OK", Duration::from_secs(120));
    let console = g.console();
    let lines = console_lines(&console, RESIZE_LINES);
    println!("--- guest: resize and data beyond the old end ---");
    for l in &lines {
        println!("  {l}");
    }
    done.with_context(|| format!("guest script failed:\n{}", lines.join("\n")))?;
    ensure!(
        console.contains("SIZE2=262144"),
        "the guest's size changed after its I/O:\n{}",
        lines.join("\n")
    );

    let d = t.json(&["volume", "describe", GROW])?;
    ensure!(d["size"] == 134_217_728u64, "describe after resize: {d}");
    let copies = d["copies"].as_array().context("no copies")?;
    ensure!(
        copies.len() == 2
            && copies
                .iter()
                .all(|c| c["state"] == "ok" || c["state"] == "in_sync"),
        "both copies should be at the new size (primary ok, mirror in_sync): {d}"
    );

    let args = ["volume", "resize", GROW, "32MiB"];
    let out = t.cluster.ctl(&args)?;
    Transcript::show(&args, &out);
    ensure!(
        out.code == 5,
        "shrinking must be refused with exit 5 (grow only), got {}: {}",
        out.code,
        out.stderr
    );
    let d = t.json(&["volume", "describe", GROW])?;
    ensure!(
        d["size"] == 134_217_728u64,
        "a refused shrink changed the size: {d}"
    );

    // The script ends (the guest powers off) after RESIZE-OK.
    let out = g.wait()?;
    ensure!(
        out.exit_status == Some(0),
        "guest exited {:?}:\n{}",
        out.exit_status,
        console_lines(&out.console, RESIZE_LINES).join("\n")
    );

    detach(&t, GROW, "vm1", &socket)?;
    t.stop()
}

/// The volume [`guest_fio_verify_survives_primary_failure`] replicates.
const HA: &str = "ha";

/// fio's job for [`guest_fio_verify_survives_primary_failure`]: 4k random writes at QD32 over
/// the first `REGION_MIB` of /dev/vda (each block written once), each block with a crc32c
/// header, fixed seed (so `--verify_only` replays the same blocks); fio then reads every block
/// back and checks it (with a fixed block size fio also checks each header's write number, so
/// an older version of a block fails too). Under TCG the writes take about 6 s plus the stall,
/// the verify pass about 6 s. Not rate-limited: fio quiesces the queue before every rate
/// sleep, so a rate-limited job has only a few writes in flight when the primary stops.
fn ha_fio(extra: &str) -> String {
    format!(
        "fio --name=ha --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \
         --rw=randwrite --bs=4k --size={REGION_MIB}M --randseed=20261125 \
         --verify=crc32c --do_verify=1 --verify_fatal=1 --end_fsync=1 --group_reporting {extra}"
    )
}

/// Guest side of [`guest_fio_verify_survives_primary_failure`]: `FIO-START`, the write +
/// verify job (`FIO-RC=`), the kernel's block-layer errors (`DMESG-ERR:`, `DMESG-ERRORS=`),
/// then the same job with `--verify_only` (`VERIFY-RC=`).
fn ha_script() -> String {
    format!(
        "echo FIO-START\n\
         {write} > /tmp/fio.out 2>&1\n\
         rc=$?\nsed 's/^/FIO: /' /tmp/fio.out\necho FIO-RC=$rc\n\
         dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O' | sed 's/^/DMESG-ERR: /'\n\
         echo DMESG-ERRORS=$(dmesg | grep -ciE 'I/O error|blk_update_request|Buffer I/O') DMESG-LINES=$(dmesg | wc -l)\n\
         echo VERIFY-START\n\
         {verify} > /tmp/verify.out 2>&1\n\
         vrc=$?\nsed 's/^/VERIFY: /' /tmp/verify.out\necho VERIFY-RC=$vrc\n\
         [ $rc = 0 ] && [ $vrc = 0 ] || exit 1\n",
        write = ha_fio(""),
        verify = ha_fio("--verify_only"),
    )
}

/// A replicated volume (2 copies) under a QEMU guest running fio with crc32c verification at
/// QD32: the primary's storage server is killed (SIGKILL) mid-job and kept down for 8 s, the
/// controller promotes the in-sync mirror (R6), keel-vhost resends what was in flight to it,
/// and the guest sees no error: fio exits 0 with every block verified, the kernel logs no I/O
/// error, and a second fio pass (`--verify_only`) reads everything back from the new primary.
/// The old primary, restarted, is rebuilt as a mirror: full redundancy again.
#[test]
fn guest_fio_verify_survives_primary_failure() -> Result<()> {
    // Fails (not skips) without QEMU, a kernel, busybox or fio.
    guest::require_tools()?;
    let t = Transcript::up(2)?;

    let v = t.json(&[
        "volume",
        "create",
        "256MiB",
        "--name",
        HA,
        "--replicas",
        "2",
    ])?;
    ensure!(v["size"] == 268_435_456u64, "size: {v}");
    t.cluster.wait_for(
        Duration::from_secs(20),
        "primary ok and mirror in_sync",
        || {
            let c = copies(&t.cluster.describe(HA).ok()?);
            (c.len() == 2
                && c.iter().any(|x| x.1 == "primary" && x.2 == "ok")
                && c.iter().any(|x| x.1 == "mirror" && x.2 == "in_sync"))
            .then_some(())
        },
    )?;
    let d = t.json(&["volume", "describe", HA])?;
    let c = copies(&d);
    let primary = c
        .iter()
        .find(|x| x.1 == "primary")
        .context("no primary")?
        .0
        .clone();
    let mirror = c
        .iter()
        .find(|x| x.1 == "mirror")
        .context("no mirror")?
        .0
        .clone();

    let (sock, _) = attach(&t, HA, "vm1")?;
    let e0 = keel_tests::keel_up::epoch(&t.cluster.describe(HA)?);
    println!("=== primary {primary}, mirror {mirror}, epoch {e0} after attach");

    let booted = Instant::now();
    let g = guest::spawn(&guest_config(&sock, ha_script()))?;
    g.wait_for_line("FIO-START", Duration::from_secs(300))?;
    let fio_start = Instant::now();
    println!(
        "  (guest printed FIO-START {:.1} s after boot)",
        booted.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));

    // The primary's server dies (SIGKILL) and `keelctl up` keeps it down (a hold file), as if
    // its machine were gone: the mirror must take over while fio runs.
    let name = format!("storage-{primary}");
    t.cluster.hold(&name)?;
    let pid = t.cluster.kill9(&name)?;
    let stopped = Instant::now();
    println!(
        "=== SIGKILL {name} (pid {pid}), held down, {:.1} s after FIO-START",
        stopped.duration_since(fio_start).as_secs_f64()
    );
    let promoted = t
        .cluster
        .wait_for(Duration::from_secs(8), "the mirror to be promoted", || {
            let v = t.cluster.describe(HA).ok()?;
            copies(&v)
                .iter()
                .any(|x| x.0 == mirror && x.1 == "primary")
                .then(|| (stopped.elapsed(), v))
        });
    match &promoted {
        Ok((after, v)) => println!(
            "  (describe showed {mirror} primary {:.1} s after SIGKILL: {v})",
            after.as_secs_f64()
        ),
        Err(e) => println!("  (no promotion seen while down: {e})"),
    }
    let rest = Duration::from_secs(8).saturating_sub(stopped.elapsed());
    std::thread::sleep(rest);
    t.cluster.release(&name)?;
    println!(
        "=== {name} released after {:.1} s down: keelctl up restarts it",
        stopped.elapsed().as_secs_f64()
    );

    let out = g.wait()?;
    println!(
        "  (guest ran {:.1} s; fio finished about {:.1} s after FIO-START)",
        booted.elapsed().as_secs_f64(),
        fio_start.elapsed().as_secs_f64()
    );
    let summary = console_lines(
        &out.console,
        &[
            "IOPS=",
            "err=",
            "clat (",
            "IO depths",
            "lat (",
            "verify",
            "bw=",
            "FIO-RC=",
            "DMESG-",
            "VERIFY-RC=",
            "error",
        ],
    );
    println!("--- guest: fio summary ---");
    for l in &summary {
        println!("  {l}");
    }
    let summary = summary.join("\n");
    ensure!(
        console_value(&out, "FIO-RC=").as_deref() == Some("0"),
        "fio (write + verify) failed across the failover:\n{summary}"
    );
    ensure!(
        out.console
            .lines()
            .any(|l| l.starts_with("FIO: ") && l.contains("err= 0")),
        "fio's success line is missing:\n{summary}"
    );
    ensure!(
        !out.console.contains("verify: bad") && !out.console.contains("verify failed"),
        "fio reported bad data:\n{summary}"
    );
    let dmesg_lines: u32 = console_value(&out, "DMESG-LINES=")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ensure!(
        dmesg_lines > 0
            && out.console.contains("DMESG-ERRORS=0 ")
            && !out.console.contains("DMESG-ERR: ")
            && !["I/O error", "blk_update_request", "Buffer I/O"]
                .iter()
                .any(|e| out.console.contains(e)),
        "the guest's kernel logged I/O errors:\n{summary}"
    );
    ensure!(
        console_value(&out, "VERIFY-RC=").as_deref() == Some("0")
            && out
                .console
                .lines()
                .any(|l| l.starts_with("VERIFY: ") && l.contains("err= 0")),
        "fio --verify_only from the new primary failed:\n{summary}"
    );
    ensure!(
        out.exit_status == Some(0),
        "guest exited {:?}",
        out.exit_status
    );
    promoted.context("the controller did not promote the mirror within 8 s of SIGKILL")?;

    let d = t.json(&["volume", "describe", HA])?;
    let c = copies(&d);
    ensure!(
        c.iter().any(|x| x.0 == mirror && x.1 == "primary"),
        "the former mirror {mirror} must be the primary: {d}"
    );
    // The old primary was demoted to a mirror; once its server is back it is rebuilt and
    // rejoins (R7), so by now it may be stale, rebuilding or in sync again.
    ensure!(
        c.iter().any(|x| x.0 == primary && x.1 == "mirror"),
        "the old primary {primary} must be a mirror: {d}"
    );
    let e1 = keel_tests::keel_up::epoch(&d);
    ensure!(e1 > e0, "promotion must bump the epoch: {e0} -> {e1}");
    t.cluster
        .wait_for(Duration::from_secs(60), "full redundancy again", || {
            let d = t.json(&["volume", "describe", HA]).ok()?;
            copies(&d)
                .iter()
                .any(|x| x.0 == primary && x.1 == "mirror" && x.2 == "in_sync")
                .then_some(())
        })?;
    println!("=== epoch {e0} -> {e1}");

    detach(&t, HA, "vm1", &sock)?;
    t.stop()
}
