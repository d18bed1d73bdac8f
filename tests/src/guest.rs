//! Tiny Linux test guests for end-to-end tests and benchmarks.
//!
//! This module boots the host's distribution kernel under QEMU with a minimal
//! initramfs, attaches Keel volumes as `vhost-user-blk-pci` devices, runs a
//! caller-supplied shell script inside the guest and reports what it printed
//! and how it exited.
//!
//! # Design
//!
//! * **Base initramfs** ([`base_initramfs`]): an uncompressed newc cpio archive
//!   holding static busybox (plus one symlink per applet), `fio`, `sfdisk` and
//!   `mkfs.ext4` ([`GUEST_TOOLS`]) with every
//!   shared library `ldd` lists (at the paths `ldd` prints, plus the dynamic
//!   loader), the virtio-pci/virtio-blk and ext4 kernel modules (decompressed at build
//!   time if the distribution ships `.ko.xz`/`.ko.zst`), and a busybox-sh
//!   `/init`. The archive is written by a small newc writer in this file (no
//!   dependency on the `cpio` package), so device nodes such as `/dev/console`
//!   can be included without root. It is cached under
//!   `<target>/keel-guest/base-<kernel version>-<hash>.cpio`, where the hash
//!   covers the init script, every input path, size and mtime; it is built in
//!   a temporary file and atomically renamed, so concurrent test processes
//!   are safe (at worst both build it). It is left uncompressed on purpose:
//!   fio drags in ~80 MB of libraries (ceph, gluster, ...), and decompressing
//!   them inside a TCG guest costs more than copying the raw bytes.
//!   Superseded cache files are pruned after an hour.
//! * **Kernel** ([`boot_kernel`]): the bzImage's compressed payload is
//!   extracted once (with `xz`/`gzip`/`zstd`/`lz4`, whichever it uses) into
//!   an uncompressed ELF `vmlinux`, cached next to the initramfs, which QEMU
//!   boots through the PVH entry point. Under TCG this saves ~2 s per boot
//!   (kernel self-decompression and firmware). If extraction is impossible,
//!   the bzImage is booted as is.
//! * **Per-run archive**: Linux accepts several cpio archives concatenated in
//!   one initrd. Every run copies the base archive into a private temporary
//!   directory (`copy_file_range`, so cheap) and appends a tiny second archive
//!   containing `/test.sh`.
//! * **`/init`** mounts proc/sys/devtmpfs, `insmod`s the virtio modules in
//!   dependency order, waits (up to ~10 s) for `/dev/vda`, `/dev/vdb`, ... when
//!   the kernel command line says `keel.wait_disk=N` (set automatically to
//!   the number of disks), runs `sh /test.sh`, prints
//!   `KEEL-GUEST-EXIT <status>` on its own line and powers off with
//!   `poweroff -f`. Should anything go wrong the kernel panics, and
//!   `panic=-1` + QEMU's `-no-reboot` turn that into a QEMU exit as well.
//! * **QEMU** ([`spawn`]): `qemu-system-x86_64` (env `KEEL_QEMU`) with
//!   `-accel tcg,thread=multi -smp 1,maxcpus=2` by default (env
//!   `KEEL_QEMU_ACCEL`, e.g. `kvm`); single-threaded TCG was seen to lose
//!   virtqueue completions at high queue depths. Guest RAM is a shared memfd
//!   backend so vhost-user back-ends can map it. The serial console goes to
//!   QEMU's stdout, which a reader thread splits into lines, stores, and
//!   echoes to stderr prefixed with `[guest] ` (QEMU's own stderr is echoed
//!   with `[qemu] `). QEMU is killed when the [`Guest`] is dropped, and
//!   (via `PR_SET_PDEATHSIG`, armed from a process-lifetime spawner thread)
//!   when the test process dies.
//!
//! # Environment
//!
//! * `KEEL_GUEST_KERNEL`: kernel image (default: newest `/boot/vmlinuz-*`).
//! * `KEEL_GUEST_MODULES`: module directory (default: `/lib/modules/<version
//!   from the kernel file name>`, else the running kernel's, else the newest).
//! * `KEEL_GUEST_CACHE_DIR`: where the base initramfs is cached (default
//!   `$CARGO_TARGET_DIR/keel-guest`, else `<workspace>/target/keel-guest`).
//! * `KEEL_GUEST_PVH=0`: boot the bzImage instead of the extracted vmlinux.
//! * `KEEL_QEMU`, `KEEL_QEMU_ACCEL`: QEMU binary and `-accel` value.
//!
//! Debian packages needed: `qemu-system-x86`, `busybox-static`,
//! `linux-image-amd64`, `fio`, `fdisk` (sfdisk), `e2fsprogs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

/// Marker line printed by the guest's `/init` after `/test.sh` finished:
/// `KEEL-GUEST-EXIT <status>`.
pub const EXIT_MARKER: &str = "KEEL-GUEST-EXIT";

/// Kernel modules loaded by `/init`, in this order (their dependencies from
/// `modules.dep` are loaded first if not already listed).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    // ext4 (for partitioned-image tests) and the crc32c its metadata checksums ask the
    // crypto API for at mount time (not a modules.dep dependency).
    "crc32c_generic",
    "ext4",
];

/// Host programs copied into the guest with their libraries, besides busybox and fio, and
/// the Debian package of each: a partitioning tool and an ext4 formatter, as cloud images
/// are made.
pub const GUEST_TOOLS: &[(&str, &str)] = &[("sfdisk", "fdisk"), ("mkfs.ext4", "e2fsprogs")];

/// Bump when the layout of the base archive changes in a way the cache key
/// (init text + input files) would not notice.
const FORMAT_VERSION: u32 = 1;

/// How many lines of console (and QEMU stderr) tail go into error messages.
const ERROR_TAIL_LINES: usize = 40;

/// Default time a whole guest run may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's `/init`. `@MODULES@` and `@LD_LIBRARY_PATH@` are substituted
/// at build time.
const INIT_TEMPLATE: &str = r#"#!/bin/sh
# /init of a Keel test guest (generated by keel_tests::guest).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=@LD_LIBRARY_PATH@
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts /tmp /run
mount -t tmpfs tmpfs /dev/shm
for m in @MODULES@; do
    insmod "/keel/modules/$m.ko" || echo "keel-init: insmod $m failed"
done
ndisks=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        keel.wait_disk=*) ndisks="${arg#keel.wait_disk=}" ;;
    esac
done
if [ "$ndisks" -gt 0 ] 2>/dev/null; then
    i=0
    ticks=0
    for l in a b c d e f g h i j k l m n o p q r s t u v w x y z; do
        [ "$i" -ge "$ndisks" ] && break
        i=$((i + 1))
        while [ ! -b "/dev/vd$l" ] && [ "$ticks" -lt 100 ]; do
            sleep 0.1
            ticks=$((ticks + 1))
        done
        [ -b "/dev/vd$l" ] || echo "keel-init: /dev/vd$l did not appear within 10 s"
    done
fi
cd /tmp
if [ -f /test.sh ]; then
    sh /test.sh
    status=$?
else
    echo "keel-init: no /test.sh in the initramfs"
    status=127
fi
echo
echo "KEEL-GUEST-EXIT $status"
sync
poweroff -f
echo o > /proc/sysrq-trigger
sleep 10
"#;

// ---------------------------------------------------------------------------
// newc cpio writer
// ---------------------------------------------------------------------------

/// Streaming writer for the SVR4 "newc" cpio format (magic `070701`), the
/// format the Linux kernel unpacks initramfs images from.
///
/// Layout of every entry: a 110-byte ASCII header (magic + 13 fields of 8 hex
/// digits), the NUL-terminated name, zero padding to a multiple of 4 bytes,
/// the data, and zero padding to a multiple of 4 again. The archive ends with
/// an entry named `TRAILER!!!`; [`NewcWriter::finish`] additionally pads to a
/// multiple of 512 bytes so further archives can be concatenated after it.
pub struct NewcWriter<W: Write> {
    out: W,
    /// Bytes written so far (for padding).
    pos: u64,
    next_ino: u32,
}

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: Write> NewcWriter<W> {
    /// Starts an archive. `out` should be buffered for large archives.
    pub fn new(out: W) -> Self {
        NewcWriter {
            out,
            pos: 0,
            next_ino: 1,
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn write_raw(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> io::Result<()> {
        let rem = self.pos % align;
        if rem != 0 {
            let zeros = [0u8; 512];
            let n = (align - rem) as usize;
            self.write_raw(&zeros[..n])?;
        }
        Ok(())
    }

    /// Writes an entry header and its (padded) name.
    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        // The kernel (and cpio) want relative names.
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: file too large for newc (>4 GiB)"),
            )
        })?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let fields: [u32; 13] = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1, // name size including the NUL
            0,                     // check (only used by the "crc" variant)
        ];
        let mut hdr = String::with_capacity(110);
        hdr.push_str("070701");
        for f in fields {
            hdr.push_str(&format!("{f:08X}"));
        }
        debug_assert_eq!(hdr.len(), 110);
        self.write_raw(hdr.as_bytes())?;
        self.write_raw(name.as_bytes())?;
        self.write_raw(&[0])?;
        self.pad_to(4)
    }

    /// Adds a directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, S_IFDIR | (perm & 0o7777), 2, 0, (0, 0))
    }

    /// Adds a regular file holding `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.header(
            name,
            S_IFREG | (perm & 0o7777),
            1,
            data.len() as u64,
            (0, 0),
        )?;
        self.write_raw(data)?;
        self.pad_to(4)
    }

    /// Adds a regular file of exactly `len` bytes read from `src`.
    pub fn file_from_reader(
        &mut self,
        name: &str,
        perm: u32,
        len: u64,
        src: &mut impl Read,
    ) -> io::Result<()> {
        self.header(name, S_IFREG | (perm & 0o7777), 1, len, (0, 0))?;
        let copied = io::copy(&mut src.take(len), &mut self.out)?;
        self.pos += copied;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {len} bytes, source ended after {copied}"),
            ));
        }
        self.pad_to(4)
    }

    /// Adds a symbolic link `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, 1, target.len() as u64, (0, 0))?;
        self.write_raw(target.as_bytes())?;
        self.pad_to(4)
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | (perm & 0o7777), 1, 0, (major, minor))
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes,
    /// flushes and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))?;
        self.pad_to(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

// ---------------------------------------------------------------------------
// Host tool discovery
// ---------------------------------------------------------------------------

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Looks `name` up in `$PATH` (plus the sbin directories, which are often
/// missing from non-root `$PATH`s).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra: Vec<PathBuf> = ["/usr/local/sbin", "/usr/sbin", "/sbin"]
        .iter()
        .map(PathBuf::from)
        .collect();
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The QEMU binary: `$KEEL_QEMU` or `qemu-system-x86_64` from `$PATH`.
pub fn qemu_binary() -> Result<PathBuf> {
    if let Some(p) = env_path("KEEL_QEMU") {
        if is_executable(&p) {
            return Ok(p);
        }
        if let Some(found) = which(&p.to_string_lossy()) {
            return Ok(found);
        }
        bail!("KEEL_QEMU={} is not an executable", p.display());
    }
    which("qemu-system-x86_64")
        .ok_or_else(|| anyhow!("qemu-system-x86_64 not found in PATH (apt-get install qemu-system-x86, or set KEEL_QEMU)"))
}

/// The `-accel` value: `$KEEL_QEMU_ACCEL` or `tcg,thread=multi`.
pub fn qemu_accel() -> String {
    std::env::var("KEEL_QEMU_ACCEL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tcg,thread=multi".to_string())
}

/// Static busybox, which must be `/bin/busybox` from `busybox-static`.
fn busybox_path() -> Result<PathBuf> {
    let p = PathBuf::from("/bin/busybox");
    if !p.exists() {
        bail!("/bin/busybox not found (apt-get install busybox-static)");
    }
    if elf_has_interpreter(&p).with_context(|| format!("inspecting {}", p.display()))? {
        bail!(
            "/bin/busybox is dynamically linked; the test guest needs the static one (apt-get install busybox-static)"
        );
    }
    Ok(p)
}

/// Whether an ELF64 little-endian executable has a `PT_INTERP` program header
/// (i.e. is dynamically linked).
fn elf_has_interpreter(path: &Path) -> Result<bool> {
    let mut f = File::open(path)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).context("reading ELF header")?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into()?);
    let phentsize = u16::from_le_bytes(eh[54..56].try_into()?) as u64;
    let phnum = u16::from_le_bytes(eh[56..58].try_into()?) as u64;
    for i in 0..phnum {
        let mut ph = [0u8; 4];
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        f.read_exact(&mut ph)
            .context("reading ELF program header")?;
        if u32::from_le_bytes(ph) == 3 {
            return Ok(true); // PT_INTERP
        }
    }
    Ok(false)
}

fn fio_path() -> Result<PathBuf> {
    which("fio").ok_or_else(|| anyhow!("fio not found in PATH (apt-get install fio)"))
}

/// The host paths of [`GUEST_TOOLS`].
fn guest_tool_paths() -> Result<Vec<(&'static str, PathBuf)>> {
    GUEST_TOOLS
        .iter()
        .map(|(name, pkg)| {
            which(name)
                .map(|p| (*name, p))
                .ok_or_else(|| anyhow!("{name} not found in PATH (apt-get install {pkg})"))
        })
        .collect()
}

/// Compares version-ish strings ("6.1.0-9-amd64" < "6.1.0-10-amd64") by
/// treating runs of digits as numbers.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The guest kernel: `$KEEL_GUEST_KERNEL` or the newest `/boot/vmlinuz-*`.
pub fn kernel_path() -> Result<PathBuf> {
    let kernel = match env_path("KEEL_GUEST_KERNEL") {
        Some(p) => p,
        None => {
            let mut best: Option<(String, PathBuf)> = None;
            let entries = fs::read_dir("/boot")
                .context("listing /boot for vmlinuz-* (apt-get install linux-image-amd64, or set KEEL_GUEST_KERNEL)")?;
            for e in entries {
                let e = e.context("listing /boot")?;
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(ver) = name.strip_prefix("vmlinuz-") {
                    if best
                        .as_ref()
                        .is_none_or(|(b, _)| version_cmp(ver, b).is_gt())
                    {
                        best = Some((ver.to_string(), e.path()));
                    }
                }
            }
            best.map(|(_, p)| p).ok_or_else(|| {
                anyhow!("no /boot/vmlinuz-* kernel found (apt-get install linux-image-amd64, or set KEEL_GUEST_KERNEL)")
            })?
        }
    };
    match File::open(&kernel) {
        Ok(_) => Ok(kernel),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => bail!(
            "kernel {} is not readable by this user ({e}); run as root, or copy it somewhere readable and set KEEL_GUEST_KERNEL",
            kernel.display()
        ),
        Err(e) => Err(anyhow!(e)).with_context(|| {
            format!("opening kernel {} (apt-get install linux-image-amd64, or set KEEL_GUEST_KERNEL)", kernel.display())
        }),
    }
}

/// The module directory matching `kernel` (see the module docs).
fn modules_dir(kernel: &Path) -> Result<(String, PathBuf)> {
    if let Some(dir) = env_path("KEEL_GUEST_MODULES") {
        let ver = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok((ver, dir));
    }
    let root = Path::new("/lib/modules");
    let from_name = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string);
    let running = fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string());
    for ver in [from_name, running].into_iter().flatten() {
        let dir = root.join(&ver);
        if dir.join("modules.dep").exists() {
            return Ok((ver, dir));
        }
    }
    let mut best: Option<String> = None;
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().join("modules.dep").exists()
                && best.as_ref().is_none_or(|b| version_cmp(&name, b).is_gt())
            {
                best = Some(name);
            }
        }
    }
    let ver = best.ok_or_else(|| {
        anyhow!("no kernel modules under /lib/modules (apt-get install linux-image-amd64, or set KEEL_GUEST_MODULES)")
    })?;
    Ok((ver.clone(), root.join(ver)))
}

/// A module to put into the initramfs.
struct ModuleSrc {
    name: String,
    path: PathBuf,
}

fn module_name_of(rel: &str) -> String {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Resolves [`GUEST_MODULES`] plus their dependencies (from `modules.dep`)
/// into load order. Modules listed in `modules.builtin` are skipped.
fn resolve_modules(dir: &Path) -> Result<Vec<ModuleSrc>> {
    let dep_path = dir.join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path).with_context(|| {
        format!(
            "reading {} (apt-get install linux-image-amd64)",
            dep_path.display()
        )
    })?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let module = module.trim();
        let d = rest.split_whitespace().map(module_name_of).collect();
        deps.insert(module_name_of(module), (module.to_string(), d));
    }
    let builtin: BTreeSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name_of)
        .collect();

    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        builtin: &BTreeSet<String>,
        dir: &Path,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<ModuleSrc>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        match deps.get(name) {
            Some((rel, ds)) => {
                for d in ds {
                    visit(d, deps, builtin, dir, seen, out)?;
                }
                out.push(ModuleSrc {
                    name: name.to_string(),
                    path: dir.join(rel),
                });
                Ok(())
            }
            None if builtin.contains(name) => Ok(()),
            None => bail!(
                "kernel module {name} not found in {}/modules.dep (apt-get install linux-image-amd64 matching the guest kernel)",
                dir.display()
            ),
        }
    }

    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in GUEST_MODULES {
        visit(m, &deps, &builtin, dir, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// Reads a kernel module, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz`.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let (tool, pkg) = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    } else if name.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        bail!("unknown kernel module format: {}", path.display());
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {tool} to decompress {} (apt-get install {pkg})",
                path.display()
            )
        })?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// The shared libraries (and loader) `ldd` lists for `exe`, as printed.
fn ldd_libs(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("running ldd {} (apt-get install libc-bin)", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ldd {} failed ({}): {}{}",
            exe.display(),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd {}: missing library: {line}", exe.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        bail!("ldd {} listed no libraries:\n{text}", exe.display());
    }
    Ok(libs)
}

/// The applet paths (`usr/bin/[`, `sbin/insmod`, ...) of busybox.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list-full failed: {}", busybox.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Checks that everything needed to boot a test guest is installed, with the
/// Debian package to install in the error otherwise.
pub fn require_tools() -> Result<()> {
    let mut problems = Vec::new();
    if let Err(e) = qemu_binary() {
        problems.push(format!("{e:#}"));
    }
    if let Err(e) = busybox_path() {
        problems.push(format!("{e:#}"));
    }
    match fio_path() {
        Ok(fio) => {
            if let Err(e) = ldd_libs(&fio) {
                problems.push(format!("{e:#}"));
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    match guest_tool_paths() {
        Ok(tools) => {
            for (_, p) in tools {
                if let Err(e) = ldd_libs(&p) {
                    problems.push(format!("{e:#}"));
                }
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    match kernel_path() {
        Ok(k) => {
            if let Err(e) = modules_dir(&k).and_then(|(_, dir)| resolve_modules(&dir)) {
                problems.push(format!("{e:#}"));
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "test guest prerequisites missing:\n  - {}",
            problems.join("\n  - ")
        )
    }
}

// ---------------------------------------------------------------------------
// Base initramfs
// ---------------------------------------------------------------------------

/// Content of one initramfs entry.
enum Entry {
    Dir,
    /// A host file, copied (following symlinks).
    HostFile {
        src: PathBuf,
        perm: u32,
    },
    Data {
        data: Vec<u8>,
        perm: u32,
    },
    Symlink(String),
    CharDev {
        perm: u32,
        major: u32,
        minor: u32,
    },
}

/// Stable 64-bit FNV-1a (std's `DefaultHasher` may change across releases,
/// and the cache key lives on disk).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Field separator, so ("ab", "c") != ("a", "bc").
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Where built images are cached.
fn cache_dir() -> PathBuf {
    if let Some(d) = env_path("KEEL_GUEST_CACHE_DIR") {
        return d;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let target = match env_path("CARGO_TARGET_DIR") {
        Some(t) if t.is_absolute() => t,
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    };
    target.join("keel-guest")
}

/// Everything that goes into the base archive, keyed by archive path.
struct Plan {
    kernel_version: String,
    entries: BTreeMap<String, Entry>,
}

fn plan_base() -> Result<Plan> {
    let busybox = busybox_path()?;
    let fio = fio_path()?;
    let kernel = kernel_path()?;
    let (kver, mdir) = modules_dir(&kernel)?;
    let modules = resolve_modules(&mdir)?;
    let mut libs = ldd_libs(&fio)?;
    let tools = guest_tool_paths()?;
    for (_, p) in &tools {
        for lib in ldd_libs(p)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    let applets = busybox_applets(&busybox)?;

    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "root",
        "mnt",
        "keel/modules",
    ] {
        entries.insert(d.to_string(), Entry::Dir);
    }
    entries.insert(
        "dev/console".into(),
        Entry::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1,
        },
    );
    entries.insert(
        "dev/null".into(),
        Entry::CharDev {
            perm: 0o666,
            major: 1,
            minor: 3,
        },
    );
    for applet in &applets {
        entries.insert(
            applet.trim_start_matches('/').to_string(),
            Entry::Symlink("/bin/busybox".into()),
        );
    }
    entries.insert(
        "bin/busybox".into(),
        Entry::HostFile {
            src: busybox,
            perm: 0o755,
        },
    );
    entries.insert(
        "usr/bin/fio".into(),
        Entry::HostFile {
            src: fio,
            perm: 0o755,
        },
    );
    for (name, src) in tools {
        entries.insert(
            format!("usr/sbin/{name}"),
            Entry::HostFile { src, perm: 0o755 },
        );
    }
    let mut lib_dirs: Vec<String> = Vec::new();
    for lib in &libs {
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        if let Some(parent) = lib.parent().map(|p| p.to_string_lossy().into_owned()) {
            if !lib_dirs.contains(&parent) && !rel.starts_with("lib64/") {
                lib_dirs.push(parent);
            }
        }
        entries.insert(
            rel,
            Entry::HostFile {
                src: lib.clone(),
                perm: 0o755,
            },
        );
    }
    let mut names = Vec::new();
    for m in &modules {
        let data = read_module(&m.path)?;
        entries.insert(
            format!("keel/modules/{}.ko", m.name),
            Entry::Data { data, perm: 0o644 },
        );
        names.push(m.name.clone());
    }
    let init = INIT_TEMPLATE
        .replace("@MODULES@", &names.join(" "))
        .replace("@LD_LIBRARY_PATH@", &lib_dirs.join(":"));
    entries.insert(
        "init".into(),
        Entry::Data {
            data: init.into_bytes(),
            perm: 0o755,
        },
    );

    // Every parent directory must precede its children; BTreeMap order
    // ("a" < "a/b") guarantees that once all parents are present.
    let mut parents = Vec::new();
    for name in entries.keys() {
        let mut p = Path::new(name).parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(dir.to_string_lossy().into_owned());
            p = dir.parent();
        }
    }
    for p in parents {
        entries.entry(p).or_insert(Entry::Dir);
    }
    Ok(Plan {
        kernel_version: kver,
        entries,
    })
}

/// Cache key: format version, and every entry's path plus its content (for
/// generated data) or its host file's path, size and mtime.
fn plan_key(plan: &Plan) -> Result<u64> {
    let mut h = Fnv::new();
    h.update(&FORMAT_VERSION.to_le_bytes());
    h.update(plan.kernel_version.as_bytes());
    for (name, e) in &plan.entries {
        h.update(name.as_bytes());
        match e {
            Entry::Dir => h.update(b"d"),
            Entry::HostFile { src, perm } => {
                let md = fs::metadata(src).with_context(|| format!("stat {}", src.display()))?;
                let mtime = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .unwrap_or_default();
                h.update(src.as_os_str().as_encoded_bytes());
                h.update(&md.len().to_le_bytes());
                h.update(&mtime.as_nanos().to_le_bytes());
                h.update(&perm.to_le_bytes());
            }
            Entry::Data { data, perm } => {
                h.update(data);
                h.update(&perm.to_le_bytes());
            }
            Entry::Symlink(t) => h.update(t.as_bytes()),
            Entry::CharDev { perm, major, minor } => {
                h.update(&perm.to_le_bytes());
                h.update(&major.to_le_bytes());
                h.update(&minor.to_le_bytes());
            }
        }
    }
    Ok(h.0)
}

fn write_plan(plan: &Plan, out: impl Write) -> Result<()> {
    let mut w = NewcWriter::new(out);
    for (name, e) in &plan.entries {
        match e {
            Entry::Dir => w.dir(name, 0o755),
            Entry::HostFile { src, perm } => {
                let mut f =
                    File::open(src).with_context(|| format!("opening {}", src.display()))?;
                let len = f
                    .metadata()
                    .with_context(|| format!("stat {}", src.display()))?
                    .len();
                w.file_from_reader(name, *perm, len, &mut f)
            }
            Entry::Data { data, perm } => w.file(name, *perm, data),
            Entry::Symlink(t) => w.symlink(name, t),
            Entry::CharDev { perm, major, minor } => w.char_dev(name, *perm, *major, *minor),
        }
        .with_context(|| format!("writing initramfs entry {name}"))?;
    }
    w.finish().context("finishing initramfs")?;
    Ok(())
}

/// Creates `path` atomically: `fill` writes a temporary file in the same
/// directory, which is then made world-readable and renamed into place.
fn write_atomically(path: &Path, fill: impl FnOnce(&File) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".keel-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    fill(tmp.as_file()).with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming a temporary file to {}", path.display()))?;
    Ok(())
}

/// Removes cache files named `<prefix>*<suffix>` other than `keep` that have
/// not been modified for an hour (superseded by new inputs). Best effort.
fn prune_cache(keep: &Path, prefix: &str, suffix: &str) {
    let Some(dir) = keep.parent() else { return };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if name.starts_with(prefix) && name.ends_with(suffix) && e.path() != keep && old {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Returns the path of the cached base initramfs (see the module docs),
/// building it first if needed. Safe to call concurrently from threads and
/// processes.
pub fn base_initramfs() -> Result<PathBuf> {
    // Serialize in-process callers; remember the result for this process.
    static BASE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = BASE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached.as_ref().filter(|p| p.exists()) {
        return Ok(p.clone());
    }
    let plan = plan_base().context("collecting test guest initramfs inputs")?;
    let key = plan_key(&plan)?;
    let path = cache_dir().join(format!("base-{}-{key:016x}.cpio", plan.kernel_version));
    if !path.exists() {
        let started = Instant::now();
        write_atomically(&path, |f| {
            write_plan(&plan, BufWriter::with_capacity(1 << 20, f))
        })?;
        prune_cache(&path, "base-", ".cpio");
        eprintln!(
            "[keel-guest] built {} in {:.2?}",
            path.display(),
            started.elapsed()
        );
    }
    *cached = Some(path.clone());
    Ok(path)
}

// ---------------------------------------------------------------------------
// PVH kernel extraction
// ---------------------------------------------------------------------------

/// Whether an ELF64 image has a Xen `PHYS32_ENTRY` note, i.e. can be booted
/// by QEMU's `-kernel` through the PVH entry point.
fn elf_has_pvh_note(elf: &[u8]) -> bool {
    fn u16_at(b: &[u8], o: usize) -> Option<usize> {
        Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?) as usize)
    }
    fn u32_at(b: &[u8], o: usize) -> Option<usize> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?) as usize)
    }
    fn u64_at(b: &[u8], o: usize) -> Option<usize> {
        usize::try_from(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)).ok()
    }
    let scan = || -> Option<bool> {
        if elf.get(..6)? != b"\x7fELF\x02\x01" {
            return Some(false);
        }
        let (phoff, phentsize, phnum) = (u64_at(elf, 32)?, u16_at(elf, 54)?, u16_at(elf, 56)?);
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(elf, ph)? != 4 {
                continue; // not PT_NOTE
            }
            let (off, size) = (u64_at(elf, ph + 8)?, u64_at(elf, ph + 32)?);
            let mut at = off;
            while at + 12 <= off + size {
                let (namesz, descsz, ty) =
                    (u32_at(elf, at)?, u32_at(elf, at + 4)?, u32_at(elf, at + 8)?);
                let name = elf.get(at + 12..at + 12 + namesz)?;
                // XEN_ELFNOTE_PHYS32_ENTRY
                if ty == 18 && name.starts_with(b"Xen") {
                    return Some(true);
                }
                at += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
            }
        }
        Some(false)
    };
    scan().unwrap_or(false)
}

/// Extracts the uncompressed `vmlinux` from a bzImage: the payload is
/// located through the boot protocol header and decompressed with the
/// matching command-line tool.
fn extract_vmlinux(bzimage: &Path, out: &File) -> Result<()> {
    let img = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let field = |o: usize| -> Result<usize> {
        let b = img
            .get(o..o + 4)
            .ok_or_else(|| anyhow!("truncated bzImage header"))?;
        Ok(u32::from_le_bytes(b.try_into()?) as usize)
    };
    if img.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS boot header)");
    }
    let version = img
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if version < 0x208 {
        bail!("boot protocol {version:#x} has no payload fields");
    }
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + field(0x248)?;
    let len = field(0x24c)?;
    let payload = img
        .get(start..start + len)
        .ok_or_else(|| anyhow!("payload outside the image"))?;
    // Kernel builds append the uncompressed size (4 bytes) to the payload.
    let payload = &payload[..payload.len().saturating_sub(4)];
    let (tool, args): (&str, &[&str]) = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dc", "--single-stream"]),
        [0x1f, 0x8b, ..] => ("gzip", &["-dc"]),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dc"]),
        [0x02, 0x21, 0x4c, 0x18, ..] => ("lz4", &["-dc"]),
        _ => bail!("unsupported kernel payload compression"),
    };
    let mut payload_file = tempfile::tempfile().context("creating a temporary file")?;
    payload_file
        .write_all(payload)
        .context("writing the kernel payload")?;
    payload_file.seek(SeekFrom::Start(0))?;
    let status = Command::new(tool)
        .args(args)
        .stdin(payload_file)
        .stdout(out.try_clone().context("dup")?)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !status.status.success() {
        bail!(
            "{tool} failed ({}): {}",
            status.status,
            String::from_utf8_lossy(&status.stderr)
        );
    }
    let mut f = out.try_clone().context("dup")?;
    f.seek(SeekFrom::Start(0))?;
    let mut elf = Vec::new();
    f.read_to_end(&mut elf).context("reading back vmlinux")?;
    if !elf_has_pvh_note(&elf) {
        bail!("the decompressed kernel has no PVH entry point (CONFIG_PVH)");
    }
    Ok(())
}

/// The image actually given to QEMU's `-kernel`. Booting a bzImage under TCG
/// spends ~2 s decompressing the kernel inside the guest (plus firmware
/// time); an uncompressed `vmlinux` with a PVH entry point starts in ~0.3 s.
/// So the payload of [`kernel_path`] is extracted once and cached next to the
/// base initramfs. Falls back to the bzImage if that is not possible, or if
/// `KEEL_GUEST_PVH=0`.
pub fn boot_kernel() -> Result<PathBuf> {
    static BOOT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached.as_ref().filter(|p| p.exists()) {
        return Ok(p.clone());
    }
    let kernel = kernel_path()?;
    if std::env::var("KEEL_GUEST_PVH").is_ok_and(|v| v == "0") {
        return Ok(kernel);
    }
    let md = fs::metadata(&kernel).with_context(|| format!("stat {}", kernel.display()))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let mut h = Fnv::new();
    h.update(kernel.as_os_str().as_encoded_bytes());
    h.update(&md.len().to_le_bytes());
    h.update(&mtime.as_nanos().to_le_bytes());
    let name = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = cache_dir().join(format!("{name}-{:016x}.pvh.elf", h.0));
    if !path.exists() {
        let started = Instant::now();
        if let Err(e) = write_atomically(&path, |f| extract_vmlinux(&kernel, f)) {
            eprintln!(
                "[keel-guest] booting the bzImage {} (slower): cannot extract a PVH vmlinux: {e:#}",
                kernel.display()
            );
            *cached = Some(kernel.clone());
            return Ok(kernel);
        }
        prune_cache(&path, &format!("{name}-"), ".pvh.elf");
        eprintln!(
            "[keel-guest] extracted {} in {:.2?}",
            path.display(),
            started.elapsed()
        );
    }
    *cached = Some(path.clone());
    Ok(path)
}

/// Copies the base archive into `dir` and appends an archive with `/test.sh`.
fn build_run_initrd(dir: &Path, script: &str) -> Result<PathBuf> {
    let base = base_initramfs()?;
    let path = dir.join("initrd.cpio");
    fs::copy(&base, &path)
        .with_context(|| format!("copying {} to {}", base.display(), path.display()))?;
    let f = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    if len % 4 != 0 {
        bail!(
            "base initramfs {} is not 4-byte aligned ({len} bytes)",
            base.display()
        );
    }
    let mut w = NewcWriter::new(BufWriter::new(f));
    w.file("test.sh", 0o755, script.as_bytes())
        .context("writing /test.sh")?;
    w.finish()
        .with_context(|| format!("appending /test.sh to {}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------------------
// Guest configuration and QEMU
// ---------------------------------------------------------------------------

/// One vhost-user-blk disk; the first is `/dev/vda` in the guest, then
/// `/dev/vdb`, ...
#[derive(Debug, Clone)]
pub struct Disk {
    /// The vhost-user back-end's UNIX socket (QEMU connects as client).
    pub socket: PathBuf,
    /// `num-queues` of the virtio-blk device.
    pub num_queues: u16,
    /// Add `reconnect=1` to the chardev so QEMU reconnects to a restarted
    /// back-end (every second).
    pub reconnect: bool,
}

impl Disk {
    /// A single-queue disk without reconnect.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Disk {
            socket: socket.into(),
            ..Disk::default()
        }
    }
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            socket: PathBuf::new(),
            num_queues: 1,
            reconnect: false,
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// vhost-user-blk disks, in guest order.
    pub disks: Vec<Disk>,
    /// Body of `/test.sh` (run with busybox `sh`; its exit status becomes
    /// [`GuestOutput::exit_status`]).
    pub script: String,
    /// Guest RAM (shared memfd), MiB.
    pub mem_mib: u32,
    /// Limit for the whole run, counted from [`spawn`].
    pub timeout: Duration,
    /// Appended to the QEMU command line.
    pub extra_qemu_args: Vec<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            disks: Vec::new(),
            script: String::new(),
            mem_mib: 1024,
            timeout: DEFAULT_TIMEOUT,
            extra_qemu_args: Vec::new(),
        }
    }
}

impl GuestConfig {
    /// Default configuration running `script`.
    pub fn with_script(script: impl Into<String>) -> Self {
        GuestConfig {
            script: script.into(),
            ..GuestConfig::default()
        }
    }

    /// Default configuration running `script` on one `disk` (`/dev/vda`), for up to `timeout`.
    pub fn one_disk(disk: Disk, script: impl Into<String>, timeout: Duration) -> Self {
        GuestConfig {
            disks: vec![disk],
            timeout,
            ..GuestConfig::with_script(script)
        }
    }
}

/// The lines of `console` containing any of `keys`, trimmed: what a test shows of a guest's
/// console instead of all of it.
pub fn console_lines<'a>(console: &'a str, keys: &[&str]) -> Vec<&'a str> {
    console
        .lines()
        .filter(|l| keys.iter().any(|k| l.contains(k)))
        .map(str::trim)
        .collect()
}

/// What [`console_lines`] keeps of an online-resize guest script: its sizes, the kernel's
/// capacity messages, `dd`'s errors, checksums, verdicts and the script's exit marker.
pub const RESIZE_LINES: &[&str] = &[
    "SIZE",
    "DMESG",
    "DD:",
    "MD5",
    "RESIZE",
    "MISMATCH",
    "FAILED",
    "capacity",
    "KEEL-GUEST-EXIT",
];

/// Result of a finished guest.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// Everything the guest printed on its serial console, `\n`-separated.
    pub console: String,
    /// `/test.sh`'s exit status, from the `KEEL-GUEST-EXIT` marker; `None` if
    /// the guest never printed it (kernel panic, killed, ...).
    pub exit_status: Option<i32>,
}

impl GuestOutput {
    /// Errors (with the console tail) unless `/test.sh` exited with 0.
    pub fn expect_success(self) -> Result<Self> {
        if self.exit_status == Some(0) {
            return Ok(self);
        }
        let lines: Vec<String> = self.console.lines().map(str::to_string).collect();
        bail!(
            "guest script failed: exit status {:?}\n--- guest console (tail) ---\n{}",
            self.exit_status,
            tail(&lines, ERROR_TAIL_LINES)
        )
    }
}

/// Parses the status from the last `KEEL-GUEST-EXIT <n>` on the console.
fn parse_exit_status<'a>(lines: impl DoubleEndedIterator<Item = &'a String>) -> Option<i32> {
    lines.rev().find_map(|l| {
        let at = l.find(EXIT_MARKER)?;
        l[at + EXIT_MARKER.len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Builds the QEMU command line (without spawning it).
fn qemu_command(cfg: &GuestConfig, kernel: &Path, initrd: &Path) -> Result<Command> {
    let mut cmd = Command::new(qemu_binary()?);
    let mem = cfg.mem_mib;
    let mut append = String::from("console=ttyS0 quiet panic=-1 rdinit=/init");
    // Skip slow or pointless probing in the tiny guest.
    append
        .push_str(" i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check");
    if !cfg.disks.is_empty() {
        append.push_str(&format!(" keel.wait_disk={}", cfg.disks.len()));
    }
    cmd.args(["-machine", "q35", "-accel"])
        .arg(qemu_accel())
        .args(["-smp", "1,maxcpus=2", "-m"])
        .arg(format!("{mem}M"))
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ]);
    for (i, d) in cfg.disks.iter().enumerate() {
        let mut chardev = format!(
            "socket,id=ch{i},path={}",
            qemu_opt_escape(&d.socket.to_string_lossy())
        );
        if d.reconnect {
            chardev.push_str(",reconnect=1");
        }
        cmd.arg("-chardev").arg(chardev);
        cmd.arg("-device").arg(format!(
            "vhost-user-blk-pci,chardev=ch{i},num-queues={}",
            d.num_queues
        ));
    }
    cmd.args(&cfg.extra_qemu_args);
    Ok(cmd)
}

/// Spawns `cmd` from a thread that lives as long as the process, with
/// `PR_SET_PDEATHSIG=SIGKILL`, so QEMU dies with the test process but not
/// with the (possibly short-lived) thread that asked for it.
fn spawn_with_deathsig(mut cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<Request>>>> = OnceLock::new();

    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let pre_exec = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) only affects the calling (child)
        // process and is async-signal-safe; no allocation happens here.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before prctl took effect.
        // SAFETY: getppid has no preconditions and is async-signal-safe.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure only calls async-signal-safe functions and does not
    // allocate or touch locks, as required between fork and exec.
    unsafe {
        cmd.pre_exec(pre_exec);
    }

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("keel-guest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let Some(spawner) = spawner else {
        // Could not start the spawner thread: fall back to this thread.
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("keel-guest spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("keel-guest spawner thread did not reply"))?
}

// ---------------------------------------------------------------------------
// Running guest
// ---------------------------------------------------------------------------

#[derive(Default)]
struct ConsoleState {
    /// Serial console lines (QEMU stdout).
    lines: Vec<String>,
    /// QEMU's own stderr lines.
    qemu_stderr: Vec<String>,
    /// QEMU's stdout reached EOF (QEMU exited or closed it).
    stdout_closed: bool,
    /// QEMU's stderr reached EOF.
    stderr_closed: bool,
}

struct Shared {
    state: Mutex<ConsoleState>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads `src` line by line into the shared state until EOF.
fn reader_thread(
    src: impl Read + Send + 'static,
    shared: Arc<Shared>,
    is_stdout: bool,
) -> io::Result<JoinHandle<()>> {
    let name = if is_stdout {
        "keel-guest-console"
    } else {
        "keel-guest-stderr"
    };
    thread::Builder::new().name(name.into()).spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line: String = String::from_utf8_lossy(&buf)
                        .chars()
                        .filter(|c| *c != '\r' && *c != '\n')
                        .collect();
                    if is_stdout {
                        eprintln!("[guest] {line}");
                        shared.lock().lines.push(line);
                    } else {
                        eprintln!("[qemu] {line}");
                        shared.lock().qemu_stderr.push(line);
                    }
                    shared.cond.notify_all();
                }
            }
        }
        let mut st = shared.lock();
        if is_stdout {
            st.stdout_closed = true;
        } else {
            st.stderr_closed = true;
        }
        drop(st);
        shared.cond.notify_all();
    })
}

/// A running QEMU guest. QEMU is killed when this is dropped.
pub struct Guest {
    child: Option<Child>,
    /// Kept open so QEMU's serial input never sees EOF.
    _stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    pid: u32,
    deadline: Instant,
    timeout: Duration,
    /// Holds the per-run initrd.
    _run_dir: tempfile::TempDir,
}

/// The per-run temp dir (holding the initrd with `cfg.script`) and the QEMU command to boot it.
fn prepare(cfg: &GuestConfig) -> Result<(tempfile::TempDir, Command)> {
    let kernel = boot_kernel()?;
    let run_dir = tempfile::Builder::new()
        .prefix("keel-guest-")
        .tempdir()
        .context("creating a per-run temp dir")?;
    let initrd = build_run_initrd(run_dir.path(), &cfg.script)?;
    let cmd = qemu_command(cfg, &kernel, &initrd)?;
    Ok((run_dir, cmd))
}

/// Boots a guest with the console on this process's terminal (for people, not tests); returns
/// QEMU's exit status when the guest powers off.
pub fn interactive(cfg: &GuestConfig) -> Result<std::process::ExitStatus> {
    let (_run_dir, mut cmd) = prepare(cfg)?;
    cmd.stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    cmd.status().context("running QEMU")
}

/// Boots a guest as described by `cfg` and returns without waiting.
pub fn spawn(cfg: &GuestConfig) -> Result<Guest> {
    let (run_dir, mut cmd) = prepare(cfg)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let args: Vec<OsString> = std::iter::once(cmd.get_program().to_owned())
        .chain(cmd.get_args().map(|a| a.to_owned()))
        .collect();
    let started = Instant::now();
    let mut child = spawn_with_deathsig(cmd).with_context(|| {
        format!(
            "spawning QEMU: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )
    })?;
    let pid = child.id();
    let shared = Arc::new(Shared {
        state: Mutex::new(ConsoleState::default()),
        cond: Condvar::new(),
    });
    let mut guest = Guest {
        _stdin: child.stdin.take(),
        readers: Vec::new(),
        shared: shared.clone(),
        pid,
        deadline: started + cfg.timeout,
        timeout: cfg.timeout,
        _run_dir: run_dir,
        child: None,
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    guest.child = Some(child); // from here on, Drop kills QEMU on error
    let stdout = stdout.ok_or_else(|| anyhow!("QEMU stdout was not captured"))?;
    let stderr = stderr.ok_or_else(|| anyhow!("QEMU stderr was not captured"))?;
    guest.readers.push(
        reader_thread(stdout, shared.clone(), true)
            .context("starting the console reader thread")?,
    );
    guest
        .readers
        .push(reader_thread(stderr, shared, false).context("starting the stderr reader thread")?);
    Ok(guest)
}

impl Guest {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        self.shared.lock().lines.join("\n")
    }

    fn describe(&self, st: &ConsoleState) -> String {
        let mut s = format!(
            "--- guest console (last {ERROR_TAIL_LINES} lines) ---\n{}",
            tail(&st.lines, ERROR_TAIL_LINES)
        );
        if !st.qemu_stderr.is_empty() {
            s.push_str(&format!(
                "\n--- qemu stderr ---\n{}",
                tail(&st.qemu_stderr, ERROR_TAIL_LINES)
            ));
        }
        s
    }

    /// Waits until a console line contains `needle` and returns the first
    /// such line (searching from the start of the output). Errors, with the
    /// console tail, after `timeout` or once QEMU has exited.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        let mut scanned = 0;
        loop {
            if let Some(l) = st.lines[scanned..].iter().find(|l| l.contains(needle)) {
                return Ok(l.clone());
            }
            scanned = st.lines.len();
            if st.stdout_closed {
                // Give the stderr reader a moment to collect QEMU's last words.
                let grace = Instant::now() + Duration::from_millis(500);
                while !st.stderr_closed && Instant::now() < grace {
                    st = self
                        .shared
                        .cond
                        .wait_timeout(st, Duration::from_millis(50))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                bail!(
                    "QEMU exited before the guest printed {needle:?}\n{}",
                    self.describe(&st)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for guest line {needle:?}\n{}",
                    self.describe(&st)
                );
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Kills QEMU now (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited, which is fine.
            let _ = child.kill();
            child.wait().context("reaping QEMU")?;
        }
        self.join_readers();
        Ok(())
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Waits for QEMU to exit (up to the config's timeout, counted from
    /// [`spawn`]); on timeout kills it and errors with the console tail.
    ///
    /// Returns `Ok` if the guest printed the exit marker, or if QEMU exited
    /// successfully without it (e.g. the guest kernel panicked and rebooted:
    /// `exit_status` is then `None`). Errors if QEMU itself failed.
    pub fn wait(mut self) -> Result<GuestOutput> {
        let status: ExitStatus = {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("QEMU was already killed"))?;
            loop {
                if let Some(status) = child.try_wait().context("waiting for QEMU")? {
                    break status;
                }
                if Instant::now() >= self.deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.child = None;
                    self.join_readers();
                    let st = self.shared.lock();
                    bail!(
                        "guest did not finish within {:?}; killed QEMU\n{}",
                        self.timeout,
                        self.describe(&st)
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        };
        self.child = None;
        // QEMU is gone, so the pipes hit EOF and the readers finish.
        self.join_readers();
        let st = self.shared.lock();
        let exit_status = parse_exit_status(st.lines.iter());
        if exit_status.is_none() && !status.success() {
            bail!(
                "QEMU failed ({status}) before the guest finished its script\n{}",
                self.describe(&st)
            );
        }
        Ok(GuestOutput {
            console: st.lines.join("\n"),
            exit_status,
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_readers();
    }
}

/// Boots a guest and waits for it: [`spawn`] + [`Guest::wait`].
pub fn run(cfg: &GuestConfig) -> Result<GuestOutput> {
    spawn(cfg)?.wait()
}

/// Like [`run`], but errors unless the script exited with status 0.
pub fn run_ok(cfg: &GuestConfig) -> Result<GuestOutput> {
    run(cfg)?.expect_success()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_hex(b: &[u8]) -> u32 {
        u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap()
    }

    #[test]
    fn newc_header_layout_and_padding() {
        let mut w = NewcWriter::new(Vec::new());
        w.file("/abc", 0o644, b"hello").unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(&buf[..6], b"070701");
        // mode, nlink, filesize, namesize
        assert_eq!(parse_hex(&buf[14..22]), S_IFREG | 0o644);
        assert_eq!(parse_hex(&buf[38..46]), 1);
        assert_eq!(parse_hex(&buf[54..62]), 5);
        assert_eq!(parse_hex(&buf[94..102]), 4); // "abc\0", leading '/' stripped
                                                 // 110 + 4 = 114 -> name padded to 116; data 5 -> padded to 124.
        assert_eq!(&buf[110..114], b"abc\0");
        assert_eq!(&buf[114..116], &[0, 0]);
        assert_eq!(&buf[116..121], b"hello");
        assert_eq!(&buf[121..124], &[0, 0, 0]);
        assert_eq!(&buf[124..130], b"070701");
        assert_eq!(&buf[124 + 110..124 + 121], b"TRAILER!!!\0");
        assert_eq!(buf.len() % 512, 0);
        assert!(buf[124 + 124..].iter().all(|b| *b == 0));
    }

    #[test]
    fn newc_entries_are_aligned() {
        let mut w = NewcWriter::new(Vec::new());
        for n in 1..9 {
            let name = "x".repeat(n);
            w.file(&name, 0o600, &vec![7u8; n]).unwrap();
            assert_eq!(w.position() % 4, 0);
            w.symlink(&format!("{name}l"), &"t".repeat(n)).unwrap();
            assert_eq!(w.position() % 4, 0);
            w.dir(&format!("{name}d"), 0o755).unwrap();
            assert_eq!(w.position() % 4, 0);
        }
        w.char_dev("console", 0o600, 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 512, 0);
    }

    #[test]
    fn newc_roundtrip_with_cpio_tool() {
        let cpio = which("cpio").expect("cpio is required: apt-get install cpio");
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        let mut w = NewcWriter::new(File::create(&archive).unwrap());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o644, b"content\n").unwrap();
        w.file_from_reader("d/g", 0o755, 3, &mut &b"xyz"[..])
            .unwrap();
        w.symlink("d/l", "f").unwrap();
        w.finish().unwrap();
        // Append a second archive, as the per-run initrd does; cpio reads
        // only the first, so check it separately below.
        let out = Command::new(&cpio)
            .arg("-it")
            .stdin(File::open(&archive).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(listing, ["d", "d/f", "d/g", "d/l"]);
        let x = dir.path().join("x");
        fs::create_dir(&x).unwrap();
        let out = Command::new(&cpio)
            .args(["-id", "--quiet"])
            .current_dir(&x)
            .stdin(File::open(&archive).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fs::read(x.join("d/f")).unwrap(), b"content\n");
        assert_eq!(fs::read(x.join("d/g")).unwrap(), b"xyz");
        assert_eq!(fs::read_link(x.join("d/l")).unwrap(), PathBuf::from("f"));
    }

    #[test]
    fn version_ordering() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("6.1.0-9-amd64", "6.1.0-10-amd64"), Less);
        assert_eq!(version_cmp("6.10.0", "6.9.0"), Greater);
        assert_eq!(version_cmp("6.1.0", "6.1.0"), Equal);
    }

    #[test]
    fn exit_marker_parsing() {
        let lines: Vec<String> = [
            "a",
            "KEEL-GUEST-EXIT 1",
            "[  1.0] x KEEL-GUEST-EXIT 3 ",
            "b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(parse_exit_status(lines.iter()), Some(3));
        let none: Vec<String> = vec!["KEEL-GUEST-EXIT".into()];
        assert_eq!(parse_exit_status(none.iter()), None);
    }

    #[test]
    fn qemu_command_line() {
        let cfg = GuestConfig {
            disks: vec![
                Disk::new("/tmp/a,b.sock"),
                Disk {
                    socket: "/s2".into(),
                    num_queues: 4,
                    reconnect: true,
                },
            ],
            ..GuestConfig::default()
        };
        let cmd = qemu_command(&cfg, Path::new("/k"), Path::new("/i"))
            .expect("QEMU is required: apt-get install qemu-system-x86");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-chardev socket,id=ch0,path=/tmp/a,,b.sock -device vhost-user-blk-pci,chardev=ch0,num-queues=1"));
        assert!(joined.contains("-chardev socket,id=ch1,path=/s2,reconnect=1 -device vhost-user-blk-pci,chardev=ch1,num-queues=4"));
        assert!(joined.contains("keel.wait_disk=2"));
        assert!(joined.contains("-smp 1,maxcpus=2"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=1024M,share=on"));
    }

    #[test]
    fn boots_and_runs_script() {
        require_tools().unwrap();
        let t = Instant::now();
        base_initramfs().unwrap();
        eprintln!("base initramfs ready after {:.2?}", t.elapsed());
        let cfg = GuestConfig {
            script: "echo hello-from-guest; exit 3".into(),
            timeout: Duration::from_secs(120),
            ..GuestConfig::default()
        };
        let t = Instant::now();
        let guest = spawn(&cfg).unwrap();
        let line = guest
            .wait_for_line("hello-from-guest", Duration::from_secs(60))
            .unwrap();
        eprintln!("script output after {:.2?}", t.elapsed());
        assert_eq!(line.trim(), "hello-from-guest");
        let out = guest.wait().unwrap();
        eprintln!("guest exited after {:.2?}", t.elapsed());
        assert!(
            out.console.lines().any(|l| l.trim() == "hello-from-guest"),
            "{}",
            out.console
        );
        assert_eq!(out.exit_status, Some(3));
        assert!(out.expect_success().is_err());
    }

    #[test]
    fn fio_runs_in_guest() {
        let cfg = GuestConfig::with_script(
            "fio --version\n\
             fio --name=t --filename=/tmp/f --size=4M --rw=randrw --bs=4k --ioengine=psync --runtime=1 --time_based >/tmp/fio.log 2>&1 \
             && echo fio-job-ok || cat /tmp/fio.log",
        );
        let t = Instant::now();
        let out = run_ok(&cfg).unwrap();
        eprintln!("fio guest finished after {:.2?}", t.elapsed());
        // `fio --version` prints e.g. "fio-3.33".
        let version = out.console.lines().map(str::trim).find(|l| {
            l.strip_prefix("fio-")
                .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        });
        assert!(version.is_some(), "{}", out.console);
        assert!(out.console.contains("fio-job-ok"), "{}", out.console);
    }

    /// End-to-end check of the disk plumbing with a reference vhost-user-blk
    /// back-end (QEMU's storage daemon), if installed.
    #[test]
    fn vhost_user_disk_with_qemu_storage_daemon() {
        let qsd = which("qemu-storage-daemon")
            .expect("qemu-storage-daemon is required: apt-get install qemu-system-x86");
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let sock = dir.path().join("vhost.sock");
        let mut daemon = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!("driver=file,filename={},node-name=disk", img.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,writable=on,num-queues=2,addr.type=unix,addr.path={}",
                sock.display()
            ))
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(20));
        }
        let cfg = GuestConfig {
            disks: vec![Disk { socket: sock, num_queues: 2, reconnect: false }],
            script: "set -e\n\
                     cat /sys/block/vda/size\n\
                     echo keel-data | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null\n\
                     fio --name=t --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --rw=randread \\
\
                         --bs=4k --size=8M --io_size=4M --output-format=terse >/dev/null\n\
                     echo fio-disk-ok\n"
                .into(),
            timeout: Duration::from_secs(120),
            ..GuestConfig::default()
        };
        let t = Instant::now();
        let result = run_ok(&cfg);
        eprintln!("disk guest finished after {:.2?}", t.elapsed());
        let _ = daemon.kill();
        let _ = daemon.wait();
        let out = result.unwrap();
        assert!(
            out.console.lines().any(|l| l.trim() == "131072"),
            "{}",
            out.console
        );
        assert!(out.console.contains("fio-disk-ok"), "{}", out.console);
        assert_eq!(&fs::read(&img).unwrap()[..10], b"keel-data\n");
    }

    #[test]
    fn errors_carry_qemu_stderr_and_console_tail() {
        // QEMU cannot connect to a missing vhost-user socket.
        let cfg = GuestConfig {
            disks: vec![Disk::new("/nonexistent/keel.sock")],
            script: "true".into(),
            ..GuestConfig::default()
        };
        let err = format!("{:#}", run(&cfg).unwrap_err());
        eprintln!("{err}");
        assert!(
            err.contains("QEMU failed") && err.contains("keel.sock"),
            "{err}"
        );

        // A script that outlives the timeout is killed.
        let cfg = GuestConfig {
            script: "echo about-to-hang; sleep 600".into(),
            // Counted from spawn; wait_for_line below does not kill QEMU, so
            // even a slow boot ends with the line on the console.
            timeout: Duration::from_secs(6),
            ..GuestConfig::default()
        };
        let guest = spawn(&cfg).unwrap();
        guest
            .wait_for_line("about-to-hang", Duration::from_secs(20))
            .unwrap();
        let err = guest
            .wait_for_line("never-printed", Duration::from_millis(200))
            .unwrap_err();
        assert!(format!("{err:#}").contains("about-to-hang"), "{err:#}");
        let err = format!("{:#}", guest.wait().unwrap_err());
        eprintln!("{err}");
        assert!(
            err.contains("did not finish") && err.contains("about-to-hang"),
            "{err}"
        );
    }
}
