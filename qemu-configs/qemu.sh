#!/usr/bin/env bash
# QEMU command line for a VM whose disk is a Keel volume served by keel-vhost.
#   qemu-configs/qemu.sh SOCKET [KERNEL INITRD] -- extra QEMU args
# Defaults boot a kernel from /boot; point it at your own disk image instead as needed.
set -euo pipefail
SOCK=${1:?usage: qemu.sh SOCKET [extra qemu args]}; shift
MEM=${KEEL_VM_MEM:-1G}
ACCEL=${KEEL_QEMU_ACCEL:-tcg,thread=multi}
QUEUES=${KEEL_NUM_QUEUES:-1}
exec qemu-system-x86_64 \
  -machine q35 -accel "$ACCEL" -smp 1,maxcpus=2 -m "$MEM" \
  -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
  -chardev socket,id=keel0,path="$SOCK",reconnect=1 \
  -device vhost-user-blk-pci,chardev=keel0,num-queues="$QUEUES" \
  -nographic "$@"
