#!/usr/bin/env bash
# Start spdk_tgt with the pcache module preloaded (LD_PRELOAD is set on spdk_tgt only).
#
#   scripts/start-target.sh [-s RPC_SOCKET] [-m CORE_MASK] [-- extra spdk_tgt args]
#
# Defaults: socket /var/tmp/pcache.sock, core mask 0x1. Runs in the foreground (append `&`
# to background it). Needs target/release/libpcache.so built with:
#   SPDK_DIR=<spdk prefix> cargo build --release --features spdk --lib
# Then talk to it with:
#   PYTHONPATH=rpc $SPDK_RPC_PY -s /var/tmp/pcache.sock --plugin pcache_rpc bdev_pcache_get_stats
set -euo pipefail
# shellcheck source=scripts/spdk-env.sh
source "$(dirname "$0")/spdk-env.sh"

sock=/var/tmp/pcache.sock
mask=0x1
while [ $# -gt 0 ]; do
    case "$1" in
        -s) sock=$2; shift 2 ;;
        -m) mask=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) break ;;
    esac
done

[ -n "$SPDK_TGT" ] || { echo "start-target.sh: no spdk_tgt under $SPDK_DIR" >&2; exit 1; }
[ -e "$PCACHE_LIB" ] || {
    echo "start-target.sh: $PCACHE_LIB missing; build it: SPDK_DIR=$SPDK_DIR cargo build --release --features spdk --lib" >&2
    exit 1
}
# shellcheck disable=SC2086 # SPDK_MEM_ARGS is a word list
exec env LD_PRELOAD="$PCACHE_LIB" "$SPDK_TGT" -u -m "$mask" -r "$sock" $SPDK_MEM_ARGS "$@"
