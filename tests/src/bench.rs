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

/// The benchmark's network peer without replication (**N**): `qemu-nbd` serving a raw file over
/// NBD with mutual x509 TLS on loopback, opened by a `qemu-storage-daemon` that exports it as
/// vhost-user-blk. Both sides use the cluster's CA; `TCP_NODELAY` is forced on with the
/// `libkeel_nodelay.so` preload (qemu-nbd 7.2 leaves Nagle on, see `tests/nodelay`) unless
/// `nodelay` is false.
pub struct NbdPeer {
    pub nbd: Child,
    pub qsd: Child,
    pub socket: PathBuf,
}

impl NbdPeer {
    pub fn pids(&self) -> [u32; 2] {
        [self.nbd.id(), self.qsd.id()]
    }
}

impl Drop for NbdPeer {
    fn drop(&mut self) {
        for c in [&mut self.qsd, &mut self.nbd] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where `libkeel_nodelay.so` is: next to the running binary (cargo's target dir), or
/// `KEEL_NODELAY_SO`.
pub fn nodelay_preload() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_NODELAY_SO") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = exe.parent() {
        dirs.push(d.to_path_buf());
        if let Some(up) = d.parent() {
            dirs.push(up.to_path_buf()); // target/release/deps/<test> → target/release
        }
    }
    for d in dirs {
        let p = d.join("libkeel_nodelay.so");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "libkeel_nodelay.so not found next to {} (build it: cargo build --release --workspace)",
        exe.display()
    )
}

fn x509_dir(pki: &Path, dir: &Path, side: &str, name: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(pki.join("ca.pem"), dir.join("ca-cert.pem"))?;
    std::fs::copy(
        pki.join(format!("{name}.pem")),
        dir.join(format!("{side}-cert.pem")),
    )?;
    std::fs::copy(
        pki.join(format!("{name}.key")),
        dir.join(format!("{side}-key.pem")),
    )?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the N peer in `dir` for a new raw file of `size` bytes. `pki` is a directory with
/// `ca.pem`/`ca.key` (certificates `storage-nbd` and `node-nbd` are issued in it).
pub fn start_nbd_peer(dir: &Path, pki: &Path, size: u64, nodelay: bool) -> Result<NbdPeer> {
    use keel_proto::pki;
    use keel_proto::types::Role;
    pki::issue(pki, Role::Storage, "nbd", &[])?;
    pki::issue(pki, Role::Node, "nbd", &[])?;
    let sdir = dir.join("nbd-server-tls");
    let cdir = dir.join("nbd-client-tls");
    x509_dir(pki, &sdir, "server", "storage-nbd")?;
    x509_dir(pki, &cdir, "client", "node-nbd")?;
    let img = dir.join("nbd.raw");
    std::fs::File::create(&img)?.set_len(size)?;
    let preload = if nodelay {
        Some(nodelay_preload()?)
    } else {
        None
    };
    let port = free_port()?;
    let mut nbd = Command::new("qemu-nbd");
    nbd.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            sdir.display()
        ))
        .args([
            "--tls-creds",
            "tls0",
            "--format",
            "raw",
            "--cache",
            "none",
            "--aio",
            "native",
        ])
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--export-name", "bench", "--persistent", "--shared", "4"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(p) = &preload {
        nbd.env("LD_PRELOAD", p);
    }
    let mut nbd = nbd
        .spawn()
        .context("starting qemu-nbd (apt-get install qemu-utils)")?;
    // qemu-nbd listens before it serves; wait for the port.
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        if let Ok(Some(st)) = nbd.try_wait() {
            bail!("qemu-nbd exited at start: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !up {
        let _ = nbd.kill();
        bail!("qemu-nbd did not listen on 127.0.0.1:{port}");
    }
    let sock = dir.join("nbd-qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            cdir.display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=nbd0,server.type=inet,server.host=127.0.0.1,server.port={port},export=bench,tls-creds=tls0"
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=nbd0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(p) = &preload {
        qsd.env("LD_PRELOAD", p);
    }
    let qsd = match qsd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = nbd.kill();
            return Err(e)
                .context("starting qemu-storage-daemon (apt-get install qemu-system-x86)");
        }
    };
    let mut peer = NbdPeer {
        nbd,
        qsd,
        socket: sock,
    };
    for _ in 0..200 {
        if peer.socket.exists() {
            return Ok(peer);
        }
        if let Ok(Some(st)) = peer.qsd.try_wait() {
            bail!("qemu-storage-daemon (NBD client) exited at start: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "qemu-storage-daemon (NBD client) did not create {}",
        peer.socket.display()
    )
}
