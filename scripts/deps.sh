#!/usr/bin/env bash
# Installs the system packages Keel's tests and demo need, when missing.
# As root it runs apt-get; otherwise it says what to install and fails.
# Then it installs the Python package openapi-spec-validator for the python3 on PATH, which
# controller/tests/openapi.rs runs to validate the API document.
set -euo pipefail
# Installing Debian 12's qemu-system-x86 (7.2) removes a newer qemu-utils from backports
# (qemu-block-extra 7.2 conflicts with it), taking qemu-nbd away: qemu-utils is then installed
# with it, at the same version, and every tool is checked again after the install.
missing_tools() {
  need=()
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86 qemu-utils)
  command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-x86 qemu-utils)
  command -v qemu-nbd >/dev/null || need+=(qemu-utils)
  dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
  ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
  command -v fio >/dev/null || need+=(fio)
  command -v cpio >/dev/null || need+=(cpio)
}
missing_tools
have_validator() { python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; }
if ! have_validator; then
  command -v python3 >/dev/null || need+=(python3)
  { python3 -m pip --version || pip3 --version; } >/dev/null 2>&1 || need+=(python3-pip)
fi
if [ ${#need[@]} -gt 0 ]; then
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
  missing_tools
  if [ ${#need[@]} -gt 0 ]; then
    echo "keel: still missing after apt-get install: ${need[*]}" >&2
    exit 1
  fi
fi
if ! have_validator; then
  echo "keel: installing openapi-spec-validator for $(command -v python3)" >&2
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  # A Debian system python refuses pip installs (PEP 668) without --break-system-packages;
  # pip3 may belong to another python3, hence the check after.
  for pip in "python3 -m pip" pip3; do
    $pip install -q openapi-spec-validator 2>/dev/null ||
      $pip install -q --break-system-packages openapi-spec-validator || continue
    have_validator && break
  done
  if ! have_validator; then
    echo "keel: openapi-spec-validator is still not importable by $(command -v python3);" \
      "install it for that interpreter: python3 -m pip install openapi-spec-validator" >&2
    exit 1
  fi
fi
