#!/usr/bin/env bash
# Quick start: a pcache bdev in spdk_tgt with I/O running through it.
#
#   scripts/quickstart.sh [-t SECONDS] [-w WORKLOAD] [-p PORT] [-k]
#
#   -t SECONDS   how long bdevperf runs (default 10)
#   -w WORKLOAD  bdevperf workload: randrw (70% reads, default), randwrite, randread, verify
#   -p PORT      NVMe/TCP port on 127.0.0.1 (default 4420)
#   -k           keep spdk_tgt running at the end (socket /var/tmp/pcache-quickstart.sock)
#
# What it does (run as root; needs SPDK, e.g. from scripts/spdk-build.sh):
#  1. builds target/release/libpcache.so (cargo build --release --features spdk --lib) when
#     it is missing;
#  2. starts spdk_tgt with the module preloaded (scripts/start-target.sh);
#  3. creates malloc bdevs Cache0 (128 MiB, 512-byte blocks) and Back0 (512 MiB, 4 KiB
#     blocks) and the pcache bdev PC0 over them (rpc.py --plugin pcache_rpc);
#  4. exports PC0 over NVMe/TCP on 127.0.0.1 and runs SPDK's bdevperf against it from a
#     second process (4 KiB, QD 32);
#  5. prints PC0's stats, deletes it (writing back every dirty block) and stops spdk_tgt.
# Logs: /tmp/pcache-quickstart-tgt.log and /tmp/pcache-quickstart-bdevperf.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

secs=10
workload=randrw
port=4420
keep=0
usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
bad_usage() {
    echo "quickstart.sh: $*" >&2
    echo "usage: scripts/quickstart.sh [-t SECONDS] [-w WORKLOAD] [-p PORT] [-k]  (-h for more)" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        -t) [ $# -ge 2 ] || bad_usage "-t needs a value"; secs=$2; shift 2 ;;
        -w) [ $# -ge 2 ] || bad_usage "-w needs a value"; workload=$2; shift 2 ;;
        -p) [ $# -ge 2 ] || bad_usage "-p needs a value"; port=$2; shift 2 ;;
        -k) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) bad_usage "unknown option: $1" ;;
    esac
done
case $secs in ''|*[!0-9]*|0) bad_usage "-t needs a positive number of seconds" ;; esac
case $port in ''|*[!0-9]*) bad_usage "-p needs a port number" ;; esac
case $workload in
    randrw) wargs=(-w randrw -M 70) ;;
    randwrite|randread|verify|write|read) wargs=(-w "$workload") ;;
    *) bad_usage "unknown workload '$workload'" ;;
esac

# shellcheck source=scripts/spdk-env.sh
source "$here/spdk-env.sh" || {
    echo "quickstart.sh: build SPDK first: scripts/spdk-build.sh (see the README, Getting SPDK)" >&2
    exit 1
}
[ -n "$SPDK_TGT" ] || { echo "quickstart.sh: no spdk_tgt under $SPDK_DIR" >&2; exit 1; }
[ -n "$SPDK_BDEVPERF" ] || { echo "quickstart.sh: no bdevperf under $SPDK_DIR or $SPDK_SRC" >&2; exit 1; }
[ -n "$SPDK_RPC_PY" ] || {
    echo "quickstart.sh: no SPDK scripts/rpc.py: set SPDK_SRC to the SPDK source tree" >&2
    exit 1
}

# 1. The module.
if [ ! -e "$PCACHE_LIB" ]; then
    echo "== building $PCACHE_LIB"
    (cd "$PCACHE_ROOT" && SPDK_DIR=$SPDK_DIR cargo build --release --features spdk --lib)
fi

# 2. spdk_tgt on core 0; bdevperf on core 1 when there is one.
sock=/var/tmp/pcache-quickstart.sock
tgt_log=/tmp/pcache-quickstart-tgt.log
perf_log=/tmp/pcache-quickstart-bdevperf.log
rpc() { "$SPDK_RPC_PY" -s "$sock" --plugin pcache_rpc "$@"; }
rm -f "$sock"
echo "== starting spdk_tgt (log $tgt_log)"
"$here/start-target.sh" -s "$sock" -m 0x1 -- --disable-cpumask-locks >"$tgt_log" 2>&1 &
tgt=$!
cleanup() {
    if [ "$keep" = 0 ] && kill -0 "$tgt" 2>/dev/null; then
        kill "$tgt" 2>/dev/null || true
        wait "$tgt" 2>/dev/null || true
    fi
    rm -f "${cfg:-}"
}
trap cleanup EXIT
for _ in $(seq 1 300); do
    if ! kill -0 "$tgt" 2>/dev/null; then
        echo "quickstart.sh: spdk_tgt exited at start-up; its log:" >&2
        tail -20 "$tgt_log" >&2
        exit 1
    fi
    if [ -S "$sock" ] && rpc spdk_get_version >/dev/null 2>&1; then break; fi
    sleep 0.2
done
rpc spdk_get_version >/dev/null || { echo "quickstart.sh: spdk_tgt does not answer RPCs" >&2; exit 1; }

# 3. Base bdevs and the pcache bdev.
echo "== creating Cache0 (128 MiB, 512 B blocks), Back0 (512 MiB, 4 KiB blocks) and PC0"
rpc bdev_malloc_create -b Cache0 128 512 >/dev/null
rpc bdev_malloc_create -b Back0 512 4096 >/dev/null
rpc bdev_pcache_create -b PC0 -c Cache0 -d Back0 --segment-size-mib 4

# 4. Export over NVMe/TCP; bdevperf attaches to it and runs.
nqn=nqn.2016-06.io.spdk:pcache-quickstart
rpc nvmf_create_transport -t TCP >/dev/null
rpc nvmf_create_subsystem "$nqn" -a -s SPDK00000000000001 >/dev/null
rpc nvmf_subsystem_add_ns "$nqn" PC0 >/dev/null
rpc nvmf_subsystem_add_listener "$nqn" -t tcp -a 127.0.0.1 -s "$port" >/dev/null
cfg=$(mktemp /tmp/pcache-quickstart-XXXXXX.json)
cat >"$cfg" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "tcp",
   "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "$port", "subnqn": "$nqn"}},
  {"method": "bdev_wait_for_examine"}]}]}
EOF
mask=0x1
if [ "$(nproc)" -gt 1 ]; then mask=0x2; fi
echo "== bdevperf over NVMe/TCP: ${wargs[*]} -q 32 -o 4096 -t $secs (log $perf_log)"
# shellcheck disable=SC2086 # SPDK_MEM_ARGS is a word list
if ! "$SPDK_BDEVPERF" -u --disable-cpumask-locks -m "$mask" -r /var/tmp/pcache-quickstart-bdevperf.sock \
    $SPDK_MEM_ARGS --json "$cfg" -q 32 -o 4096 "${wargs[@]}" -t "$secs" >"$perf_log" 2>&1; then
    echo "quickstart.sh: bdevperf failed; its log:" >&2
    tail -30 "$perf_log" >&2
    exit 1
fi
grep -E "Device Information|^Job:|Nvme0n1 +:|^ Total" "$perf_log" | tail -4

# 5. What pcache saw, then a draining delete.
echo "== bdev_pcache_get_stats -b PC0"
rpc bdev_pcache_get_stats -b PC0
if [ "$keep" = 1 ]; then
    echo "spdk_tgt keeps running (pid $tgt): $SPDK_RPC_PY -s $sock --plugin pcache_rpc ..."
    exit 0
fi
rpc bdev_pcache_delete PC0 >/dev/null
echo "== done: PC0 written back and deleted, spdk_tgt stopped"
