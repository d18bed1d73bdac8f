#!/usr/bin/env bash
# Starts a QEMU VM whose disk (/dev/vda) is a Keel volume served by keel-vhost on SOCKET.
#   qemu-configs/qemu.sh [--kernel KERNEL [--initrd INITRD] [--append CMDLINE]] SOCKET [-- QEMU ARGS...]
# With a kernel (--kernel/--initrd/--append, or KEEL_KERNEL/KEEL_INITRD/KEEL_APPEND), QEMU boots
# that kernel directly (command line "console=ttyS0 root=/dev/vda" unless given). Without one,
# the firmware boots from the Keel volume itself (bootindex=1), so the volume must hold a
# bootable image; while it does not, the firmware falls through to the other boot devices,
# e.g. an installer given with `-- -cdrom installer.iso`.
# Everything after `--` goes to QEMU as is (more drives, networking, -display, ...).
# Environment: KEEL_VM_MEM (guest RAM, default 1G), KEEL_QEMU_ACCEL (default tcg,thread=multi;
# kvm where /dev/kvm is usable), KEEL_NUM_QUEUES (default 1; at most keel-vhost's
# --num-queues), KEEL_QEMU (the QEMU binary, default qemu-system-x86_64).
set -euo pipefail
usage() {
  echo "usage: qemu.sh [--kernel KERNEL [--initrd INITRD] [--append CMDLINE]] SOCKET [-- QEMU ARGS...]" >&2
  exit 2
}
KERNEL=${KEEL_KERNEL:-}
INITRD=${KEEL_INITRD:-}
APPEND=${KEEL_APPEND:-console=ttyS0 root=/dev/vda}
SOCK=
while [ $# -gt 0 ]; do
  case $1 in
    --kernel) [ $# -ge 2 ] || usage; KERNEL=$2; shift 2 ;;
    --initrd) [ $# -ge 2 ] || usage; INITRD=$2; shift 2 ;;
    --append) [ $# -ge 2 ] || usage; APPEND=$2; shift 2 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) echo "qemu.sh: unknown option $1 (QEMU options go after --)" >&2; usage ;;
    *)
      if [ -n "$SOCK" ]; then
        echo "qemu.sh: unexpected argument $1 (QEMU options go after --)" >&2
        usage
      fi
      SOCK=$1
      shift
      ;;
  esac
done
[ -n "$SOCK" ] || usage
[ -S "$SOCK" ] || echo "qemu.sh: warning: $SOCK is not a socket (yet); QEMU needs keel-vhost serving it" >&2
if [ -n "$INITRD" ] && [ -z "$KERNEL" ]; then
  echo "qemu.sh: --initrd (KEEL_INITRD) needs --kernel (KEEL_KERNEL)" >&2
  exit 2
fi

MEM=${KEEL_VM_MEM:-1G}
ACCEL=${KEEL_QEMU_ACCEL:-tcg,thread=multi}
QUEUES=${KEEL_NUM_QUEUES:-1}
DISK="vhost-user-blk-pci,chardev=keel0,num-queues=$QUEUES"
boot=()
if [ -n "$KERNEL" ]; then
  boot=(-kernel "$KERNEL" -append "$APPEND")
  [ -z "$INITRD" ] || boot+=(-initrd "$INITRD")
else
  DISK+=",bootindex=1"
  cat >&2 <<EOF
qemu.sh: booting from the Keel volume itself (bootindex=1). An empty volume has nothing to
  boot: write a bootable image to it first, e.g. install onto it from an installer ISO
  (qemu.sh $SOCK -- -cdrom debian-12-amd64-netinst.iso: while the volume is not bootable the
  firmware falls through to the CD), or boot a kernel directly with --kernel/--initrd
  (KEEL_KERNEL/KEEL_INITRD), e.g. --kernel /boot/vmlinuz-\$(uname -r) --initrd /boot/initrd.img-\$(uname -r)
EOF
fi
# vhost-user: keel-vhost reads and writes the guest's buffers itself, so guest RAM must be
# shared memory (memfd, share=on) of the same size as -m. A comma in an option value is doubled.
# reconnect=1, not reconnect-ms (QEMU 9.2+): QEMU 7.2 (Debian 12) refuses reconnect-ms.
exec "${KEEL_QEMU:-qemu-system-x86_64}" \
  -machine q35 -accel "$ACCEL" -smp 1,maxcpus=2 -m "$MEM" \
  -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
  -chardev socket,id=keel0,path="${SOCK//,/,,}",reconnect=1 \
  -device "$DISK" \
  "${boot[@]}" \
  -nographic "$@"
