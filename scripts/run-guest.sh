#!/usr/bin/env bash
# Starts a local Keel data path and boots a VM on a Keel volume, console on this terminal.
#   PKI, a storage server holding a 1 GiB volume, and keel-vhost serving it, all under
#   $KEEL_DIR (default ~/.keel-demo; data persists across runs), then a tiny QEMU guest whose
#   /dev/vda is the volume. Leave the guest with `poweroff -f`; the daemons stop with it.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${KEEL_DIR:-$HOME/.keel-demo}"
VOLUME=1
SIZE=1GiB

scripts/deps.sh
cargo build --release --workspace --bins
BIN=target/release
mkdir -p "$DIR"
[ -f "$DIR/pki/ca.pem" ] || "$BIN/keelctl" pki init --pki-dir "$DIR/pki"
[ -f "$DIR/pki/storage-s1.pem" ] || "$BIN/keelctl" pki issue --pki-dir "$DIR/pki" --role storage --id s1 >/dev/null
[ -f "$DIR/pki/node-n1.pem" ] || "$BIN/keelctl" pki issue --pki-dir "$DIR/pki" --role node --id n1 >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/keel-storage" --listen 127.0.0.1:7500 --data-dir "$DIR/data" --pki-dir "$DIR/pki" --id s1 \
  --create "$VOLUME:$SIZE" --grant n1 --pid-file "$DIR/storage.pid" >"$DIR/storage.out" 2>"$DIR/storage.log" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$DIR/storage.out" 2>/dev/null && break; sleep 0.1; done
grep -q listening "$DIR/storage.out" || { cat "$DIR/storage.log"; echo "keel-storage did not start" >&2; exit 1; }

"$BIN/keel-vhost" --socket "$DIR/vda.sock" --server 127.0.0.1:7500 --volume "$VOLUME" --size "$SIZE" \
  --pki-dir "$DIR/pki" --id n1 --num-queues 2 --pid-file "$DIR/vhost.pid" >"$DIR/vhost.out" 2>"$DIR/vhost.log" &
pids+=($!)
for _ in $(seq 100); do grep -q serving "$DIR/vhost.out" 2>/dev/null && break; sleep 0.1; done
grep -q serving "$DIR/vhost.out" || { cat "$DIR/vhost.log"; echo "keel-vhost did not start" >&2; exit 1; }

echo "keel: volume $VOLUME ($SIZE) served on $DIR/vda.sock; logs in $DIR/*.log; booting the guest"
"$BIN/keel-guest" --num-queues 2 "$DIR/vda.sock"
