# shellcheck shell=bash
# Source me: finds SPDK and pcache's pieces and exports
#   SPDK_DIR        SPDK install prefix (or built source tree): $SPDK_DIR, else pkg-config spdk_bdev, else /opt/spdk
#   SPDK_LIB_DIR    its shared libraries (also prepended to LD_LIBRARY_PATH)
#   SPDK_TGT        spdk_tgt binary
#   SPDK_BDEVPERF   bdevperf binary (installed spdk_bdevperf, or the source tree's build/examples/bdevperf)
#   SPDK_RPC_PY     scripts/rpc.py of an SPDK source tree ($SPDK_SRC, /opt/spdk-src, or $SPDK_DIR)
#   SPDK_BDEVPERF_PY examples/bdev/bdevperf/bdevperf.py of that tree (may be empty)
#   PCACHE_ROOT     this repository; PCACHE_LIB its target/release/libpcache.so
#   PYTHONPATH      with $PCACHE_ROOT/rpc added (for `rpc.py --plugin pcache_rpc`)
#   SPDK_MEM_ARGS   "" when >= 1 GiB of free 2 MiB hugepages is mounted, else "--no-huge -s 2048"
#                   (v26.05's spdk_tgt does not start in 1 GiB without hugepages: its iSCSI pools)
# Returns non-zero (without exiting the caller's shell) when SPDK is not found.

_pcache_env() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    export PCACHE_ROOT=${PCACHE_ROOT:-$(dirname "$here")}
    export PCACHE_LIB=${PCACHE_LIB:-$PCACHE_ROOT/target/release/libpcache.so}

    local dir=${SPDK_DIR:-}
    if [ -z "$dir" ] && command -v pkg-config >/dev/null 2>&1 && pkg-config --exists spdk_bdev 2>/dev/null; then
        dir=$(pkg-config --variable=prefix spdk_bdev)
    fi
    if [ -z "$dir" ] && [ -e /opt/spdk/lib/libspdk_bdev.so ]; then
        dir=/opt/spdk
    fi
    if [ -z "$dir" ]; then
        echo "spdk-env.sh: SPDK not found (set SPDK_DIR to an SPDK install prefix built with --with-shared)" >&2
        return 1
    fi
    export SPDK_DIR=$dir
    if [ -e "$dir/lib/libspdk_bdev.so" ]; then
        export SPDK_LIB_DIR=$dir/lib
    elif [ -e "$dir/build/lib/libspdk_bdev.so" ]; then
        export SPDK_LIB_DIR=$dir/build/lib
    else
        echo "spdk-env.sh: $dir has no lib/libspdk_bdev.so (SPDK must be built with --with-shared)" >&2
        return 1
    fi
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$SPDK_LIB_DIR:"*) ;;
        *) export LD_LIBRARY_PATH=$SPDK_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
    esac

    local src=${SPDK_SRC:-}
    if [ -z "$src" ]; then
        for c in "$dir" /opt/spdk-src; do
            if [ -e "$c/scripts/rpc.py" ]; then src=$c; break; fi
        done
    fi
    export SPDK_SRC=$src

    local f
    SPDK_TGT=
    for f in "$dir/bin/spdk_tgt" "$dir/build/bin/spdk_tgt" ${src:+"$src/build/bin/spdk_tgt"}; do
        if [ -x "$f" ]; then SPDK_TGT=$f; break; fi
    done
    SPDK_BDEVPERF=
    for f in "$dir/bin/spdk_bdevperf" "$dir/bin/bdevperf" "$dir/build/examples/bdevperf" ${src:+"$src/build/examples/bdevperf"}; do
        if [ -x "$f" ]; then SPDK_BDEVPERF=$f; break; fi
    done
    SPDK_RPC_PY=
    if [ -n "$src" ]; then SPDK_RPC_PY=$src/scripts/rpc.py; fi
    SPDK_BDEVPERF_PY=
    if [ -n "$src" ] && [ -e "$src/examples/bdev/bdevperf/bdevperf.py" ]; then
        SPDK_BDEVPERF_PY=$src/examples/bdev/bdevperf/bdevperf.py
    fi
    export SPDK_TGT SPDK_BDEVPERF SPDK_RPC_PY SPDK_BDEVPERF_PY

    case ":${PYTHONPATH:-}:" in
        *":$PCACHE_ROOT/rpc:"*) ;;
        *) export PYTHONPATH=$PCACHE_ROOT/rpc${PYTHONPATH:+:$PYTHONPATH} ;;
    esac

    local free
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo 2>/dev/null)
    if [ "${free:-0}" -ge 512 ] && [ "$(awk '/^Hugepagesize:/ {print $2}' /proc/meminfo)" = 2048 ] \
        && grep -q ' hugetlbfs ' /proc/mounts; then
        export SPDK_MEM_ARGS=""
    else
        export SPDK_MEM_ARGS="--no-huge -s 2048"
    fi
}
_pcache_env
