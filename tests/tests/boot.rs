//! A VM boots from a Keel volume (issue 17, item 2).
//!
//! A test guest (QEMU, TCG, Linux) partitions a fresh volume the way cloud images are made
//! (`sfdisk`: a DOS label, one partition from 1 MiB), formats it with `mkfs.ext4`, writes files
//! and records their checksums, then writes boot code into the MBR (keeping the partition
//! table) and a per-run token into sector 5 with a single 512-byte `O_DIRECT` write. Then:
//!
//! * QEMU starts with the volume as its only disk and no `-kernel`: SeaBIOS reads the MBR
//!   through virtio-blk, the boot code prints `KEEL-BOOT-OK` on the serial port, reads sector 5
//!   through the BIOS (INT 13h) and prints the token. Both must appear.
//! * A new Linux guest ("after a reboot") mounts the partition and verifies every checksum.
//! * Negative control: the same volume served with `--block-size 4096` does not boot: SeaBIOS
//!   says `block size 4096 is unsupported` and the boot code never runs.
//!
//! The guest also reports what the kernel sees: 512-byte logical blocks, 4 KiB physical
//! blocks and minimum I/O.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::cluster::{DataPath, VhostOptions};
use keel_tests::guest::{self, Disk, GuestConfig, GuestOutput};

const VOLUME: &str = "b007";
const SIZE: &str = "256MiB";

/// Real-mode boot code for the MBR (its first 116 bytes; the partition table at 446..510 and
/// the 0x55AA signature are sfdisk's). Loaded by the BIOS at 0000:7C00 with the boot drive in
/// DL. Assembled from (GNU as, `.code16`, linked at 0):
///
/// ```text
/// start: cli; xor ax,ax; mov ds,ax; mov es,ax; mov ss,ax; mov sp,0x7c00; sti
///        mov bl,dl                    ; keep the boot drive
///        mov si,0x7c00+msg; call print
///        mov si,0x7c00+dap; mov ah,0x42; mov dl,bl; int 0x13   ; extended read
///        jc fail
///        mov si,0x8000; call print    ; the sector read, NUL-terminated
/// halt:  hlt; jmp halt
/// fail:  mov si,0x7c00+err; call print; jmp halt
/// print: mov dx,0x3f8                 ; COM1 data register
/// 1:     lodsb; test al,al; jz 2f; out dx,al; jmp 1b
/// 2:     ret
/// dap:   db 16,0; dw 1; dw 0x8000,0; dq 5      ; 1 sector of LBA 5 to 0000:8000
/// msg:   db "KEEL-BOOT-OK",13,10,0
/// err:   db "KEEL-BOOT-READ-FAILED",13,10,0
/// ```
#[rustfmt::skip]
const BOOT_CODE: [u8; 116] = [
    0xfa,                   // 00 cli
    0x31, 0xc0,             // 01 xor ax,ax
    0x8e, 0xd8,             // 03 mov ds,ax
    0x8e, 0xc0,             // 05 mov es,ax
    0x8e, 0xd0,             // 07 mov ss,ax
    0xbc, 0x00, 0x7c,       // 09 mov sp,0x7c00
    0xfb,                   // 0c sti
    0x88, 0xd3,             // 0d mov bl,dl
    0xbe, 0x4d, 0x7c,       // 0f mov si,0x7c4d (msg)
    0xe8, 0x1c, 0x00,       // 12 call 0x31 (print)
    0xbe, 0x3d, 0x7c,       // 15 mov si,0x7c3d (dap)
    0xb4, 0x42,             // 18 mov ah,0x42
    0x88, 0xda,             // 1a mov dl,bl
    0xcd, 0x13,             // 1c int 0x13
    0x72, 0x09,             // 1e jc 0x29 (fail)
    0xbe, 0x00, 0x80,       // 20 mov si,0x8000
    0xe8, 0x0b, 0x00,       // 23 call 0x31 (print)
    0xf4,                   // 26 hlt
    0xeb, 0xfd,             // 27 jmp 0x26
    0xbe, 0x5c, 0x7c,       // 29 mov si,0x7c5c (err)
    0xe8, 0x02, 0x00,       // 2c call 0x31 (print)
    0xeb, 0xf5,             // 2f jmp 0x26
    0xba, 0xf8, 0x03,       // 31 mov dx,0x3f8
    0xac,                   // 34 lodsb
    0x84, 0xc0,             // 35 test al,al
    0x74, 0x03,             // 37 jz 0x3c
    0xee,                   // 39 out dx,al
    0xeb, 0xf8,             // 3a jmp 0x34
    0xc3,                   // 3c ret
    // 3d dap: size 16, reserved, 1 sector, to 0x8000:0 (offset, segment), LBA 5
    0x10, 0x00, 0x01, 0x00, 0x00, 0x80, 0x00, 0x00,
    0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 4d msg: "KEEL-BOOT-OK\r\n\0"
    b'K', b'E', b'E', b'L', b'-', b'B', b'O', b'O', b'T', b'-', b'O', b'K', b'\r', b'\n', 0,
    // 5c err: "KEEL-BOOT-READ-FAILED\r\n\0"
    b'K', b'E', b'E', b'L', b'-', b'B', b'O', b'O', b'T', b'-', b'R', b'E', b'A', b'D', b'-',
    b'F', b'A', b'I', b'L', b'E', b'D', b'\r', b'\n', 0,
];

/// The boot code's first line on the serial port.
const BOOTED: &str = "KEEL-BOOT-OK";

/// `printf` format for `bytes` (octal escapes: busybox sh's printf builtin understands them).
fn printf_octal(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:03o}")).collect()
}

/// Guest script: report the block sizes the kernel sees, partition and format the volume,
/// write files and print their checksums (`SUM <sha256>  <name>`), then write the boot code
/// and the token of sector 5.
fn install_script(token: &str) -> String {
    format!(
        r#"set -e
for f in logical_block_size physical_block_size minimum_io_size optimal_io_size discard_granularity; do
    echo "QUEUE $f=$(cat /sys/block/vda/queue/$f)"
done
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q /dev/vda
sfdisk -d /dev/vda | sed 's/^/TABLE /'
i=0; while [ ! -b /dev/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkfs.ext4 -q -F -L keelroot /dev/vda1
mkdir -p /mnt/p
mount -t ext4 /dev/vda1 /mnt/p
head -c 3000000 /dev/urandom > /mnt/p/big
head -c 12345 /dev/urandom > /mnt/p/odd
mkdir /mnt/p/etc
echo "keel volume {token}" > /mnt/p/etc/hostname
(cd /mnt/p && sha256sum big odd etc/hostname) | sed 's/^/SUM /'
umount /mnt/p
printf '{boot}' > /tmp/boot.bin
dd if=/tmp/boot.bin of=/dev/vda bs={len} count=1 conv=notrunc,fsync 2>/dev/null
printf 'KEEL-SECTOR5-{token}\r\n' > /tmp/s5
dd if=/tmp/s5 of=/tmp/s5.pad bs=512 count=1 conv=sync 2>/dev/null
dd if=/tmp/s5.pad of=/dev/vda bs=512 seek=5 count=1 oflag=direct 2>/dev/null
echo INSTALLED
"#,
        boot = printf_octal(&BOOT_CODE),
        len = BOOT_CODE.len(),
    )
}

/// Guest script: mount the partition and check the recorded checksums.
fn verify_script(sums: &str) -> String {
    format!(
        "set -e\n\
         mkdir -p /mnt/p\n\
         mount -t ext4 /dev/vda1 /mnt/p\n\
         cat > /tmp/sums <<'EOF'\n{sums}EOF\n\
         (cd /mnt/p && sha256sum -c /tmp/sums)\n\
         umount /mnt/p\n\
         echo VERIFIED\n"
    )
}

fn guest_config(socket: &Path, script: String) -> GuestConfig {
    let disk = Disk {
        socket: socket.to_path_buf(),
        num_queues: 1,
        reconnect: false,
    };
    GuestConfig::one_disk(disk, script, Duration::from_secs(900))
}

fn lines_with<'a>(out: &'a GuestOutput, prefix: &str) -> Vec<&'a str> {
    out.console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .collect()
}

/// QEMU booting its firmware (SeaBIOS) with one vhost-user-blk disk and no kernel: the serial
/// port and SeaBIOS's debug port (0x402) go to files. Killed when dropped.
struct FirmwareVm {
    child: Child,
    serial: PathBuf,
    bios_log: PathBuf,
}

impl FirmwareVm {
    fn start(socket: &Path, dir: &Path) -> Result<FirmwareVm> {
        let serial = dir.join("serial.log");
        let bios_log = dir.join("seabios.log");
        for f in [&serial, &bios_log] {
            let _ = fs::remove_file(f);
        }
        let mut cmd = Command::new(guest::qemu_binary()?);
        cmd.args(["-machine", "q35", "-accel"])
            .arg(guest::qemu_accel())
            .args(["-smp", "1", "-m", "128M"])
            .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-chardev")
            .arg(format!("file,id=dbg,path={}", bios_log.display()))
            .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ch0,path={}",
                socket.display().to_string().replace(',', ",,")
            ))
            .args([
                "-device",
                "vhost-user-blk-pci,chardev=ch0,num-queues=1,bootindex=1",
            ])
            .args(["-boot", "c"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().context("starting QEMU (firmware boot)")?;
        Ok(FirmwareVm {
            child,
            serial,
            bios_log,
        })
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    fn bios_log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.bios_log).unwrap_or_default()).into_owned()
    }

    /// Waits until `done` holds for (serial, SeaBIOS log), QEMU exits, or `limit` passes.
    fn wait(&mut self, limit: Duration, done: impl Fn(&str, &str) -> bool) -> Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.serial(), &self.bios_log()) {
                return Ok(true);
            }
            if let Some(st) = self.child.try_wait()? {
                eprintln!("QEMU exited: {st}");
                return Ok(done(&self.serial(), &self.bios_log()));
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for FirmwareVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generous: SeaBIOS under TCG on a loaded 2-core machine.
const FIRMWARE_LIMIT: Duration = Duration::from_secs(300);

#[test]
fn vm_boots_from_a_keel_volume_and_its_partitions_survive_a_reboot() -> Result<()> {
    guest::require_tools()?;
    let mut s = DataPath::start(&format!("{VOLUME}:{SIZE}"), "vda.sock", |_, o| {
        VhostOptions {
            extra: vec!["--request-timeout-ms".into(), "60000".into()],
            ..o
        }
    })?;
    let socket = s.vhost.opts.socket.clone();
    let token = format!(
        "{:x}{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
        std::process::id()
    );

    // 1. Install through a guest.
    let out = guest::run(&guest_config(&socket, install_script(&token)))?;
    ensure!(
        out.exit_status == Some(0) && out.console.contains("INSTALLED"),
        "installing failed (exit {:?}):\n{}",
        out.exit_status,
        out.console
    );
    let queue = lines_with(&out, "QUEUE ");
    eprintln!("guest queue limits: {queue:?}");
    for want in [
        "logical_block_size=512",
        "physical_block_size=4096",
        "minimum_io_size=4096",
        "discard_granularity=4096",
    ] {
        ensure!(queue.contains(&want), "guest sees {queue:?}, not {want}");
    }
    let table = lines_with(&out, "TABLE ");
    ensure!(
        table
            .iter()
            .any(|l| l.replace(' ', "").contains("start=2048,")),
        "partition does not start at sector 2048: {table:?}"
    );
    let sums: String = lines_with(&out, "SUM ")
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    ensure!(
        sums.lines().count() == 3,
        "checksums missing:\n{}",
        out.console
    );

    // 2. Boot from the volume alone: firmware, no kernel.
    let t = Instant::now();
    let want = format!("KEEL-SECTOR5-{token}");
    let mut vm = FirmwareVm::start(&socket, s.dir.path())?;
    let booted = vm.wait(FIRMWARE_LIMIT, |serial, _| serial.contains(&want))?;
    let (serial, bios) = (vm.serial(), vm.bios_log());
    drop(vm);
    ensure!(
        booted && serial.contains(BOOTED),
        "the VM did not boot from the volume within {FIRMWARE_LIMIT:?}.\nserial:\n{serial}\nSeaBIOS:\n{}",
        tail(&bios, 30)
    );
    ensure!(!serial.contains("READ-FAILED"), "serial:\n{serial}");
    eprintln!(
        "booted from the volume in {:.1?}; serial: {:?}",
        t.elapsed(),
        serial.trim()
    );

    // 3. "Reboot": a new Linux guest mounts the partition and checks every file.
    let out = guest::run(&guest_config(&socket, verify_script(&sums)))?;
    ensure!(
        out.exit_status == Some(0) && out.console.contains("VERIFIED"),
        "verifying after the reboot failed (exit {:?}):\n{}",
        out.exit_status,
        out.console
    );
    for name in ["big: OK", "odd: OK", "etc/hostname: OK"] {
        ensure!(
            out.console.contains(name),
            "{name} missing:\n{}",
            out.console
        );
    }

    // 4. Negative control: the same volume with 4 KiB logical blocks does not boot.
    s.vhost
        .opts
        .extra
        .extend(["--block-size".into(), "4096".into()]);
    s.vhost.restart()?;
    let mut vm = FirmwareVm::start(&socket, s.dir.path())?;
    let refused = vm.wait(FIRMWARE_LIMIT, |_, bios| {
        bios.contains("No bootable device")
    })?;
    let (serial, bios) = (vm.serial(), vm.bios_log());
    drop(vm);
    if !refused {
        bail!(
            "SeaBIOS did not give up on the 4096-byte disk within {FIRMWARE_LIMIT:?}:\n{}",
            tail(&bios, 30)
        );
    }
    ensure!(
        bios.contains("block size 4096 is unsupported"),
        "SeaBIOS log:\n{}",
        tail(&bios, 30)
    );
    ensure!(
        !serial.contains(BOOTED),
        "booted with 4 KiB blocks?\n{serial}"
    );
    eprintln!("negative control: with --block-size 4096 SeaBIOS refuses the disk");
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
