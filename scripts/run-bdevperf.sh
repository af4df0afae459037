#!/usr/bin/env bash
# Run SPDK's bdevperf on a JSON bdev config with the pcache module preloaded.
#
#   scripts/run-bdevperf.sh CONFIG.json [bdevperf args]
#
# Default bdevperf args: -q 32 -o 4096 -w randwrite -t 5. Always added: -u (no PCI),
# --json CONFIG, a private RPC socket, and hugepage or --no-huge memory args.
# Example: scripts/run-bdevperf.sh spdk-config/bdevperf-malloc.json -q 32 -o 4096 -w verify -t 5
set -euo pipefail
# shellcheck source=scripts/spdk-env.sh
source "$(dirname "$0")/spdk-env.sh"

[ $# -ge 1 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
cfg=$1; shift
[ -r "$cfg" ] || { echo "run-bdevperf.sh: cannot read $cfg" >&2; exit 1; }
[ -n "$SPDK_BDEVPERF" ] || { echo "run-bdevperf.sh: no bdevperf under $SPDK_DIR" >&2; exit 1; }
[ -e "$PCACHE_LIB" ] || {
    echo "run-bdevperf.sh: $PCACHE_LIB missing; build it: SPDK_DIR=$SPDK_DIR cargo build --release --features spdk --lib" >&2
    exit 1
}
if [ $# -eq 0 ]; then set -- -q 32 -o 4096 -w randwrite -t 5; fi
# shellcheck disable=SC2086 # SPDK_MEM_ARGS is a word list
exec env LD_PRELOAD="$PCACHE_LIB" "$SPDK_BDEVPERF" -u -r "/var/tmp/pcache-bdevperf.$$.sock" $SPDK_MEM_ARGS --json "$cfg" "$@"
