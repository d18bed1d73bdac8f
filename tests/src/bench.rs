//! Pieces the benchmarks share: the qemu-storage-daemon baseline and CPU accounting.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Starts `qemu-storage-daemon` exporting a new raw file of `size` bytes in `dir` as
/// vhost-user-blk (`aio=native,cache.direct=on`, one queue). Returns the child and its socket.
pub fn start_qsd(dir: &Path, size: u64) -> Result<(Child, PathBuf)> {
    let img = dir.join("qsd.raw");
    std::fs::File::create(&img)?.set_len(size)?;
    let sock = dir.join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},aio=native,cache.direct=on",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-storage-daemon (apt-get install qemu-system-x86)")?;
    for _ in 0..100 {
        if sock.exists() {
            return Ok((child, sock));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("qemu-storage-daemon did not create {}", sock.display())
}

/// User + system CPU time of a process, in clock ticks (0 if it cannot be read).
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The fields after the command name (which may contain spaces) start after the last ')';
    // utime and stime are fields 14 and 15 of the line, i.e. 11 and 12 after it.
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Clock ticks per second.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
