#!/usr/bin/env bash
# Installs the system packages Keel's tests, scripts/test.sh and the demo need, when missing,
# then checks every tool again. As root on Debian it runs apt-get; otherwise it prints exactly
# what to install and fails. Then it installs the Python package openapi-spec-validator for
# the python3 on PATH, which controller/tests/openapi.rs runs to validate the API document.
#
# Environment:
#   KEEL_DEPS_SKIP_PIP=1  skip the openapi-spec-validator part (no PyPI access, or a machine
#                         that does not run controller/tests/openapi.rs)
#
# QEMU: the tests run qemu-system-x86_64, qemu-storage-daemon, qemu-nbd and qemu-img. Debian 12
# has QEMU 7.2 only, and qemu-system-x86 7.2 needs qemu-utils at its own version
# (qemu-block-extra conflicts otherwise). A machine may carry qemu-utils 10 from
# bookworm-backports, installed from a .deb with no backports source configured; it
# `Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)`, so a plain
# `apt-get install qemu-system-x86 qemu-utils` fails ("held broken packages"). Hence the QEMU
# packages are installed in an apt-get run of their own, both pinned to one version
# (qemu-system-x86's candidate, 7.2 on Debian 12: `qemu-system-x86=V qemu-utils=V`), with
# --allow-downgrades (only in that run), after a simulation (`apt-get install -s`) that must
# show nothing removed and nothing but QEMU packages downgraded.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # the tests look there too
export LC_ALL=C

say() { echo "keel: $*" >&2; }
die() {
  say "$@"
  exit 1
}

# Each command the tests or scripts/test.sh run, and the Debian package that provides it:
#   tests/src/guest.rs: qemu-system-x86_64, fio, cpio, ldd, xz (Debian's kernel is
#     xz-compressed), qemu-storage-daemon; plus /bin/busybox (static) and a kernel in /boot
#     with its modules, checked below; tests/src/bench.rs, vmm.rs: qemu-storage-daemon,
#     qemu-nbd; qemu-img (qemu-utils) makes and inspects images by hand;
#   tests/src/guest.rs also copies sfdisk (fdisk) and mkfs.ext4 (e2fsprogs) into the guest;
#   tests/tests/boot.rs boots QEMU's default BIOS, SeaBIOS (seabios, a dependency of
#   qemu-system-x86: checked below);
#   tests/tests/storage.rs: mount, umount; controller/tests/openapi.rs: python3;
#   scripts/test.sh: cc (ring's and other build scripts), c++ (cargo-fuzz's libfuzzer-sys),
#     git. No test runs ip (iproute2).
# qemu-storage-daemon is in qemu-system-common (qemu-system-x86's dependency) at 7.2.
TOOLS=(
  qemu-system-x86_64:qemu-system-x86
  qemu-storage-daemon:qemu-system-x86
  qemu-nbd:qemu-utils
  qemu-img:qemu-utils
  fio:fio
  sfdisk:fdisk
  mkfs.ext4:e2fsprogs
  cpio:cpio
  xz:xz-utils
  ldd:libc-bin
  mount:mount
  umount:mount
  cc:gcc
  c++:g++
  git:git
  python3:python3
)
QEMU_PKGS=(qemu-system-x86 qemu-utils)

have_validator() { python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; }
skip_pip() { [ "${KEEL_DEPS_SKIP_PIP:-0}" = 1 ]; }

# Sets need (packages to install) and missing (what is wrong, for messages).
missing_tools() {
  need=()
  missing=()
  local t
  for t in "${TOOLS[@]}"; do
    if ! command -v "${t%%:*}" >/dev/null; then
      need+=("${t#*:}")
      missing+=("${t%%:*} (${t#*:})")
    fi
  done
  # The test guest's userland: a statically linked /bin/busybox.
  if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    need+=(busybox-static)
    missing+=("static /bin/busybox (busybox-static)")
  fi
  # The firmware a VM boots from a Keel volume with (tests/tests/boot.rs).
  if [ ! -e /usr/share/seabios/bios-256k.bin ]; then
    need+=(seabios)
    missing+=("SeaBIOS /usr/share/seabios/bios-256k.bin (seabios)")
  fi
  # The test guest's kernel, and the modules it loads.
  local k found=0
  for k in /boot/vmlinuz-*; do
    [ -e "$k" ] && [ -d "/lib/modules/${k#/boot/vmlinuz-}" ] && found=1
  done
  if [ $found = 0 ]; then
    need+=(linux-image-amd64)
    missing+=("a kernel in /boot with its modules (linux-image-amd64)")
  fi
  if ! skip_pip && ! have_validator &&
    ! { python3 -m pip --version || pip3 --version; } >/dev/null 2>&1; then
    need+=(python3-pip)
    missing+=("pip, to install openapi-spec-validator (python3-pip)")
  fi
  if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  fi
}

# Splits need into qemu (both QEMU packages if either is needed: they go together, at one
# version) and other.
split_need() {
  qemu=()
  other=()
  local p
  for p in "${need[@]}"; do
    case " ${QEMU_PKGS[*]} " in
      *" $p "*) qemu=("${QEMU_PKGS[@]}") ;;
      *) other+=("$p") ;;
    esac
  done
}

# The installed version of package $1, or nothing.
installed_version() {
  { dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } |
    awk '$1 == "ii" { print $2 }'
}

# 1:10.0.2+ds-2+deb13u1~bpo12+1 -> 10.0.2
upstream() {
  local v=${1#*:}
  echo "${v%%[-+~]*}"
}

# Sets QEMU_VERSION to qemu-system-x86's candidate version, after checking that qemu-utils
# exists at that version too; and prints why QEMU is installed the way it is.
plan_qemu() {
  QEMU_VERSION=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
  if [ -z "$QEMU_VERSION" ] || [ "$QEMU_VERSION" = "(none)" ]; then
    die "apt has no qemu-system-x86 to install (check /etc/apt/sources.list*: Debian main is needed)"
  fi
  if ! apt-cache madison qemu-utils | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' |
    grep -qxF "$QEMU_VERSION"; then
    die "qemu-system-x86 $QEMU_VERSION needs qemu-utils $QEMU_VERSION, which apt does not offer:" \
      "$(apt-cache madison qemu-utils | tr -s ' ' | tr '\n' ';')"
  fi
  local utils debian
  utils=$(installed_version qemu-utils)
  debian=$(cut -d. -f1 /etc/debian_version 2>/dev/null || true)
  if [ -n "$utils" ] && dpkg --compare-versions "$utils" gt "$QEMU_VERSION"; then
    local from="newer than the distribution's"
    case $utils in *bpo*) from="from backports" ;; esac
    say "qemu-utils $(upstream "$utils") $from ($utils) conflicts with Debian${debian:+ $debian}'s" \
      "qemu-system-x86 $(upstream "$QEMU_VERSION") ($QEMU_VERSION): qemu-system-x86 needs qemu-utils" \
      "at its own version; installing both at $(upstream "$QEMU_VERSION") (qemu-utils is downgraded)"
  else
    say "installing qemu-system-x86 and qemu-utils together at one version, $QEMU_VERSION" \
      "(qemu-system-x86 needs qemu-utils at its own version)"
  fi
  qemu_args=(--allow-downgrades)
  local p
  for p in "${QEMU_PKGS[@]}"; do qemu_args+=("$p=$QEMU_VERSION"); done
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs apt-get install "$@" as a simulation, then for real; the simulation must remove
# nothing and downgrade only packages matching $downgradable. The output is shown on failure.
apt_install() {
  local downgradable=$1
  shift
  if ! apt-get install -s -y "$@" >"$log" 2>&1; then
    cat "$log" >&2
    die "apt-get install -s $* fails (simulation; nothing was changed)"
  fi
  local removed downgraded
  removed=$(awk '$1 == "Remv" { print $2 }' "$log" | paste -sd' ')
  [ -z "$removed" ] || {
    cat "$log" >&2
    die "apt-get install $* would remove: $removed; not doing it"
  }
  # "Inst pkg [installed] (new ..." is an upgrade or a downgrade.
  downgraded=$(awk '$1 == "Inst" && $3 ~ /^\[/ { v = $3; gsub(/[][]/, "", v); n = $4; sub(/^\(/, "", n); print $2, v, n }' "$log" |
    while read -r pkg old new; do
      if dpkg --compare-versions "$old" gt "$new"; then echo "$pkg"; fi
    done | paste -sd' ')
  for p in $downgraded; do
    [[ $p =~ $downgradable ]] || {
      cat "$log" >&2
      die "apt-get install $* would downgrade $p; not doing it"
    }
  done
  [ -z "$downgraded" ] || say "downgrading: $downgraded"
  say "apt-get install -y $*"
  if ! apt-get install -y -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    die "apt-get install $* failed"
  fi
}

missing_tools
if [ ${#need[@]} -gt 0 ]; then
  say "missing: ${missing[*]}"
  split_need
  if [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then
    say "this is not a Debian system: install the equivalents of the Debian packages ${need[*]}" \
      "(QEMU >= 7.2 with qemu-system-x86_64, qemu-storage-daemon, qemu-nbd, qemu-img;" \
      "a static busybox at /bin/busybox; a kernel in /boot/vmlinuz-* with /lib/modules)"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "run this as root (sudo $0), or install them yourself:"
    say "  apt-get update"
    if [ ${#qemu[@]} -gt 0 ]; then
      v=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
      if [ -n "$v" ] && [ "$v" != "(none)" ]; then
        say "  apt-get install -y --allow-downgrades qemu-system-x86=$v qemu-utils=$v" \
          "  # one version for both; downgrades a qemu-utils from backports"
      else
        say "  apt-get install -y --allow-downgrades qemu-system-x86 qemu-utils/$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)" \
          "  # one version for both; downgrades a qemu-utils from backports"
      fi
    fi
    [ ${#other[@]} -eq 0 ] || say "  apt-get install -y ${other[*]}"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  say "apt-get update"
  apt-get update -q >"$log" 2>&1 || {
    cat "$log" >&2
    die "apt-get update failed"
  }
  if [ ${#qemu[@]} -gt 0 ]; then
    plan_qemu
    apt_install '^qemu-' "${qemu_args[@]}"
  fi
  [ ${#other[@]} -eq 0 ] || apt_install '^$' "${other[@]}"
  missing_tools
  if [ ${#need[@]} -gt 0 ]; then
    die "still missing after apt-get install: ${missing[*]}"
  fi
  say "installed; qemu-system-x86 $(installed_version qemu-system-x86), qemu-utils $(installed_version qemu-utils)"
fi

if ! skip_pip && ! have_validator; then
  say "installing openapi-spec-validator for $(command -v python3)"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  # A Debian system python refuses pip installs (PEP 668) without --break-system-packages;
  # pip3 may belong to another python3, hence the check after.
  for pip in "python3 -m pip" pip3; do
    $pip install -q openapi-spec-validator 2>/dev/null ||
      $pip install -q --break-system-packages openapi-spec-validator || continue
    have_validator && break
  done
  if ! have_validator; then
    die "openapi-spec-validator is still not importable by $(command -v python3);" \
      "install it for that interpreter: python3 -m pip install openapi-spec-validator"
  fi
fi
