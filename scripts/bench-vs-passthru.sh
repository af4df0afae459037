#!/usr/bin/env bash
# pcache vs SPDK's C passthru over the same kind of malloc base, same bdevperf binary and
# flags (the pcache module is preloaded in both runs), one core, 4 KiB I/O:
#   randwrite QD32, then randread QD32 (after that write pass), randwrite QD1, randread QD1.
#
#   scripts/bench-vs-passthru.sh [SECONDS] [CONFIG.json]
#
# Default 5 s per workload and spdk-config/bdevperf-pcache-vs-passthru.json (PC0: 512 MiB
# cache over a 256 MiB backing bdev, so the working set fits in the cache; PT0: passthru
# over a 256 MiB malloc). Needs target/release/libpcache.so built with the spdk feature.
set -euo pipefail
# shellcheck source=scripts/spdk-env.sh
source "$(dirname "$0")/spdk-env.sh"
secs=${1:-5}
cfg=${2:-$PCACHE_ROOT/spdk-config/bdevperf-pcache-vs-passthru.json}
[ -n "$SPDK_BDEVPERF" ] && [ -n "$SPDK_BDEVPERF_PY" ] || { echo "bench: need bdevperf and bdevperf.py" >&2; exit 1; }
[ -e "$PCACHE_LIB" ] || { echo "bench: $PCACHE_LIB missing" >&2; exit 1; }
py_path=$SPDK_SRC/python

run_one() {
    local bdev=$1 sock=/var/tmp/pcache-bench.$$.sock log=/tmp/pcache-bench.$$.$1.log pid
    rm -f "$sock"
    # shellcheck disable=SC2086 # SPDK_MEM_ARGS is a word list
    env LD_PRELOAD="$PCACHE_LIB" "$SPDK_BDEVPERF" -u -m 0x1 -r "$sock" $SPDK_MEM_ARGS \
        --json "$cfg" -T "$bdev" -z -q 32 -o 4096 -w randwrite -t "$secs" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.2; done
    sleep 1
    local perf="python3 $SPDK_BDEVPERF_PY -s $sock -t $((secs + 60))"
    for w in "randwrite 32" "randread 32" "randwrite 1" "randread 1"; do
        set -- $w
        PYTHONPATH=$py_path $perf perform_tests -w "$1" -q "$2" -o 4096 -t "$secs" |
            python3 -c "
import json, sys
r = json.load(sys.stdin)['results'][0]
print(f\"$bdev  {'$1':9} QD{'$2':<3} {r['iops']:>12,.0f} IOPS  avg {r['avg_latency_us']:8.2f} us  fail {r['io_failed']}\")"
    done
    if [ "$bdev" = PC0 ]; then
        python3 "$SPDK_RPC_PY" -s "$sock" --plugin pcache_rpc bdev_pcache_get_stats -b PC0 |
            python3 -c "
import json, sys
s = json.load(sys.stdin)[0]
t = s['engine']['total']
print('PC0 engine: ksets %d for %d writes (%.1f keys/kset), in-place %d, written back %d MiB, GC segments %d' % (
    t['ksets_written'], t['writes'], t['keys_written'] / max(1, t['ksets_written']),
    t['in_place_writes'], t['wb_sectors'] // 2048, t['gc_segments']))"
    fi
    python3 "$SPDK_RPC_PY" -s "$sock" spdk_kill_instance SIGTERM >/dev/null
    wait "$pid" || true
    rm -f "$log"
}

run_one PT0
run_one PC0
