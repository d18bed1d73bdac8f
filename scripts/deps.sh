#!/usr/bin/env bash
# Installs the system packages Keel's tests and demo need, when missing.
# As root it runs apt-get; otherwise it says what to install and fails.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
command -v fio >/dev/null || need+=(fio)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "keel: missing packages: ${need[*]}" >&2
  echo "keel: install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "keel: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
