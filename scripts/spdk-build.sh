#!/usr/bin/env bash
# Build and install the SPDK that pcache needs: SPDK v26.05 with shared libraries, vhost,
# NVMe-oF TCP and OCF (for scripts/bench's comparison), against Debian 12's DPDK 22.11.
#
# usage: scripts/spdk-build.sh [options]
#
# Where the SPDK sources come from (one of; default: a clone of the release tag):
#   --src DIR        an SPDK v26.05 source tree; built in place (its ocf/ must be filled in,
#                    or give --ocf-git)
#   --git DIR        an SPDK git repository (bare, or a clone) holding the tag v26.05; the tag
#                    is exported (git archive) into the build directory
#   (neither)        clone tag v26.05 from $SPDK_GIT_URL (default: SPDK's GitHub repository)
#                    and its ocf submodule; needs the machine to reach it
# Options:
#   --ocf-git DIR    an Open-CAS/ocf git repository holding the commit v26.05 pins (else the
#                    one in the SPDK clone's modules, else a clone of the submodule's URL)
#   --prefix DIR     install prefix (default /opt/spdk)
#   --build-dir DIR  where the source tree goes with --git or a clone (default /opt/spdk-src,
#                    where scripts/spdk-env.sh looks for rpc.py and bdevperf)
#   --without-ocf    no OCF (scripts/bench then reports OCF as not measured)
#   --ocf-pool-objects N
#                    objects in each of OCF's preallocated request pools (default 4095, as in
#                    docs/BENCHMARKS.md, so a 1 GiB OCF cache fits in 2 GiB of hugepages;
#                    stock SPDK: 16383)
#   --no-deps        do not apt-get install the build dependencies
#   -j, --jobs N     parallel make jobs (default: nproc)
#   -n, --dry-run    check the arguments and print the steps without running them
#   -h, --help       this text
#
# Runs as root on Debian 12 (apt-get, and writing the prefix). About 10 minutes on 2 cores.
# What it changes in SPDK, and why (each is needed on Debian 12 with its libdpdk-dev 22.11):
#  - configure gets a --without-isal option (ISA-L is otherwise required on x86_64 and
#    Debian's 2.30 lacks a CRC64 symbol): SPDK's built-in CRC/XOR code is used;
#  - lib/env_dpdk/env.mk: rte_log and rte_argparse dropped (not libraries in DPDK 22.11);
#  - lib/env_dpdk/pci_dpdk.c: accepts DPDK 22.11.5 to 22.11.11 (the PCI private headers are
#    the same as 22.11.4's);
#  - lib/env_ocf/Makefile: generates and installs spdk_ocfenv.pc, without which
#    `pkg-config spdk_bdev` fails when SPDK is built with OCF;
#  - mk/config.mk after configure: CONFIG_IPSEC_MB off (configure turns it on because
#    Debian's DPDK links libIPSec_MB; crypto is not built);
#  - libspdk_bdev_ocf.so is relinked with OCF inside it (stock SPDK leaves OCF in the static
#    libspdk_ocfenv.a that only its own apps link), so it can be LD_PRELOADed into bdevperf.
# `make install` needs patchelf (apt) and uv, jinja2 and tabulate for the python3 that make
# runs: they are installed with pip into a temporary venv put first on PATH for the build.
set -euo pipefail

TAG=v26.05
PREFIX=/opt/spdk
BUILD_DIR=/opt/spdk-src
SRC=
GIT_DIR=
OCF_GIT=
WITH_OCF=1
OCF_POOL=4095
DEPS=1
JOBS=$(nproc 2>/dev/null || echo 2)
DRY=0
URL=${SPDK_GIT_URL:-https://github.com/spdk/spdk.git}

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
    echo "spdk-build.sh: error: $*" >&2
    exit 1
}
bad_usage() {
    echo "spdk-build.sh: $*" >&2
    echo "usage: scripts/spdk-build.sh [--src DIR | --git DIR] [--ocf-git DIR] [--prefix DIR] [--build-dir DIR] [--without-ocf] [--no-deps] [-j N] [-n]  (--help for more)" >&2
    exit 2
}
need_arg() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then bad_usage "$1 needs a value"; fi
}
# Runs a command, or only prints it with --dry-run.
run() {
    echo "+ $*"
    if [ "$DRY" = 0 ]; then "$@"; fi
}
step() { echo; echo "== $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --src) need_arg "$@"; SRC=$2; shift 2 ;;
        --git) need_arg "$@"; GIT_DIR=$2; shift 2 ;;
        --ocf-git) need_arg "$@"; OCF_GIT=$2; shift 2 ;;
        --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
        --build-dir) need_arg "$@"; BUILD_DIR=$2; shift 2 ;;
        --without-ocf) WITH_OCF=0; shift ;;
        --ocf-pool-objects) need_arg "$@"; OCF_POOL=$2; shift 2 ;;
        --no-deps) DEPS=0; shift ;;
        -j|--jobs) need_arg "$@"; JOBS=$2; shift 2 ;;
        -n|--dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) bad_usage "unknown option: $1" ;;
    esac
done

[ -z "$SRC" ] || [ -z "$GIT_DIR" ] || bad_usage "give --src or --git, not both"
case $JOBS in ''|*[!0-9]*|0) bad_usage "--jobs needs a positive number, not '$JOBS'" ;; esac
case $OCF_POOL in ''|*[!0-9]*|0) bad_usage "--ocf-pool-objects needs a positive number, not '$OCF_POOL'" ;; esac
case $PREFIX in /*) ;; *) bad_usage "--prefix must be an absolute path" ;; esac
if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    [ "$DEPS" = 0 ] || die "run as root (apt-get install), or pass --no-deps with the dependencies installed"
    [ -w "$(dirname "$PREFIX")" ] || [ -w "$PREFIX" ] || die "cannot write $PREFIX: run as root or choose --prefix"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. Build dependencies (Debian 12; only the configured apt sources are used).
if [ "$DEPS" = 1 ]; then
    step "1. build dependencies (apt-get)"
    command -v apt-get >/dev/null || die "no apt-get: install the dependencies yourself and pass --no-deps"
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update
    run apt-get install -y build-essential pkg-config git patch patchelf libdpdk-dev \
        libnuma-dev libaio-dev uuid-dev libssl-dev libjson-c-dev libcunit1-dev libncurses-dev \
        libfuse3-dev libkeyutils-dev libclang-dev meson ninja-build python3-venv python3-pip \
        python3-jinja2 python3-tabulate
fi
if [ "$DRY" = 0 ]; then
    for tool in git patch make gcc pkg-config python3; do
        command -v "$tool" >/dev/null || die "$tool not found (drop --no-deps, or install it)"
    done
    dpdk=$(pkg-config --modversion libdpdk 2>/dev/null) ||
        die "pkg-config does not know libdpdk: install libdpdk-dev (Debian 12 has 22.11)"
    case $dpdk in
        22.11.*) echo "DPDK $dpdk (pkg-config libdpdk)" ;;
        *) echo "spdk-build.sh: warning: DPDK $dpdk: the local patches are for Debian 12's 22.11" >&2 ;;
    esac
fi

# 2. Sources: a plain tree of tag v26.05 with OCF at the commit the tag pins.
step "2. sources ($TAG)"
git_dir_of() { # a bare repository or a clone -> its git dir
    if [ -d "$1/.git" ]; then echo "$1/.git"; else echo "$1"; fi
}
fill_ocf() { # $1: SPDK git dir holding $TAG; $2: the tree whose ocf/ to fill
    local spdk_git=$1 tree=$2 commit ocf_git url
    commit=$(git --git-dir="$spdk_git" ls-tree "$TAG" ocf | awk '$2 == "commit" {print $3}')
    [ ${#commit} = 40 ] || die "cannot read the ocf submodule commit of $TAG in $spdk_git"
    echo "OCF commit pinned by $TAG: $commit"
    ocf_git=
    if [ -n "$OCF_GIT" ]; then
        ocf_git=$(git_dir_of "$OCF_GIT")
    elif [ -d "$spdk_git/modules/ocf" ]; then
        ocf_git=$spdk_git/modules/ocf
    fi
    if [ -z "$ocf_git" ]; then
        url=$(git --git-dir="$spdk_git" show "$TAG:.gitmodules" |
            git config -f - --get submodule.ocf.url) || die "no ocf URL in $TAG's .gitmodules"
        echo "cloning OCF from $url (give --ocf-git DIR when the machine cannot reach it)"
        run git clone --bare --quiet "$url" "$tmp/ocf.git" ||
            die "cannot clone $url: give --ocf-git DIR (an Open-CAS/ocf repository)"
        ocf_git=$tmp/ocf.git
    fi
    [ "$DRY" = 1 ] || git --git-dir="$ocf_git" cat-file -e "$commit^{commit}" 2>/dev/null ||
        die "$ocf_git does not hold OCF commit $commit"
    run mkdir -p "$tree/ocf"
    if [ "$DRY" = 0 ]; then
        git --git-dir="$ocf_git" archive --format=tar "$commit" | tar -x -C "$tree/ocf"
    fi
}
new_build_dir() {
    if [ -e "$BUILD_DIR" ] && [ -n "$(ls -A "$BUILD_DIR" 2>/dev/null)" ]; then
        die "$BUILD_DIR already exists and is not empty: move it away, choose --build-dir, or build it in place with --src $BUILD_DIR"
    fi
    run mkdir -p "$BUILD_DIR"
}
if [ -n "$SRC" ]; then
    if [ ! -x "$SRC/configure" ] || [ ! -e "$SRC/include/spdk/bdev.h" ]; then
        die "$SRC is not an SPDK source tree (no configure, include/spdk/bdev.h)"
    fi
    BUILD_DIR=$(cd "$SRC" && pwd)
    if [ "$WITH_OCF" = 1 ] && [ ! -e "$BUILD_DIR/ocf/Makefile" ]; then
        if [ -n "$OCF_GIT" ] || [ -e "$BUILD_DIR/.git" ]; then
            fill_ocf "$(git_dir_of "$BUILD_DIR")" "$BUILD_DIR"
        else
            die "$SRC/ocf is empty: give --ocf-git DIR, or --without-ocf"
        fi
    fi
elif [ -n "$GIT_DIR" ]; then
    spdk_git=$(git_dir_of "$GIT_DIR")
    git --git-dir="$spdk_git" rev-parse -q --verify "refs/tags/$TAG" >/dev/null ||
        die "$GIT_DIR has no tag $TAG"
    new_build_dir
    echo "+ git --git-dir=$spdk_git archive $TAG | tar -x -C $BUILD_DIR"
    if [ "$DRY" = 0 ]; then
        git --git-dir="$spdk_git" archive --format=tar "$TAG" | tar -x -C "$BUILD_DIR"
    fi
    if [ "$WITH_OCF" = 1 ]; then fill_ocf "$spdk_git" "$BUILD_DIR"; fi
else
    echo "no --src or --git: cloning $TAG from $URL"
    if [ "$DRY" = 0 ]; then
        timeout 60 git ls-remote --exit-code "$URL" "refs/tags/$TAG" >/dev/null 2>&1 ||
            die "cannot reach $URL (or it has no tag $TAG): give --src DIR or --git DIR"
    fi
    new_build_dir
    run git clone --quiet --depth 1 --branch "$TAG" "$URL" "$BUILD_DIR"
    if [ "$WITH_OCF" = 1 ]; then
        run git -C "$BUILD_DIR" submodule update --init ocf
    fi
fi
if [ "$DRY" = 0 ]; then
    # v26.05's tree names its version in VERSION (include/spdk/version.h is generated from
    # version.h.in by configure); older trees only in version.h.
    if [ -e "$BUILD_DIR/VERSION" ]; then
        ver=$(cut -d. -f1,2 "$BUILD_DIR/VERSION")
    else
        ver=$(awk '/#define SPDK_VERSION_(MAJOR|MINOR)[[:space:]]/ {printf "%02d.", $3}' \
            "$BUILD_DIR/include/spdk/version.h" 2>/dev/null) || ver=
        ver=${ver%.}
    fi
    case $ver in
        26.05) echo "SPDK tree $BUILD_DIR: version 26.05" ;;
        *) echo "spdk-build.sh: warning: $BUILD_DIR is SPDK ${ver:-of unknown version}, not 26.05: the patches may not apply" >&2 ;;
    esac
fi

# 3. Local patches (see the header); skipped when already applied.
step "3. local patches"
cat > "$tmp/pcache-spdk.patch" <<'SPDK_LOCAL_PATCH_EOF'
--- a/configure
+++ b/configure
@@ -573,6 +573,12 @@
 		--without-cuda)
 			CONFIG[CUDA]=n
 			;;
+		--without-isal)
+			# Local change: build without ISA-L (use SPDK's built-in CRC/XOR code).
+			CONFIG[ISAL]=n
+			CONFIG[ISAL_PATH]=
+			CONFIG[ISAL_INSTALLED]=n
+			;;
 		--with-isal) ;&
 		--with-isal=*)
 			# if set, set a default value
@@ -1237,6 +1243,8 @@
 		exit 1
 	fi
 	echo "Using ISA-L from ${CONFIG[ISAL_PATH]}"
+elif [[ "${CONFIG[ISAL]}" = "n" ]]; then
+	echo "ISA-L disabled (--without-isal)."
 elif [[ $arch == x86_64* ]] || [[ $arch == aarch64* ]]; then
 	CONFIG[ISAL]=y
 	# make sure the submodule is initialized
--- a/lib/env_dpdk/env.mk
+++ b/lib/env_dpdk/env.mk
@@ -35,7 +35,7 @@
 
 DPDK_INC := -I$(DPDK_INC_DIR)
 
-DPDK_LIB_LIST = rte_eal rte_kvargs rte_log rte_telemetry rte_argparse
+DPDK_LIB_LIST = rte_eal rte_kvargs rte_telemetry
 DPDK_LIB_LIST += rte_mempool_ring rte_mempool rte_ring
 DPDK_LIB_LIST += rte_bus_pci rte_pci
 
--- a/lib/env_dpdk/pci_dpdk.c
+++ b/lib/env_dpdk/pci_dpdk.c
@@ -46,7 +46,8 @@
 	}
 
 	if (year == 22 && month == 11) {
-		if (minor > 4) {
+		/* Local change: accept 22.11.5-22.11.11 (Debian 12 ships 22.11.11). */
+		if (minor > 11) {
 			/* It is possible that LTS minor release changed private ABI, so we
 			 * cannot assume fn_table_2211 works for minor releases.  As 22.11
 			 * minor releases occur, this will need to be updated to either affirm
--- a/lib/env_ocf/Makefile
+++ b/lib/env_ocf/Makefile
@@ -21,6 +21,17 @@
 
 LIB = $(call spdk_lib_list_to_static_libs,$(LIBNAME))
 
+# Local change: spdk_bdev_modules.pc lists spdk_ocfenv in Requires, so generate
+# and install a spdk_ocfenv.pc (and install libspdk_ocfenv.a) to keep
+# 'pkg-config spdk_bdev' usable with --with-ocf.
+PKGCONFIG = $(call pkgconfig_filename,spdk_$(LIBNAME))
+PKGCONFIG_INST = $(call pkgconfig_filename,tmp/spdk_$(LIBNAME))
+
+define ocfenv_pkgconfig_create
+	$(Q)mkdir -p $(dir $@)
+	$(Q)$(SPDK_ROOT_DIR)/scripts/pc.sh $(1) $(2) $(LIBNAME) 1.0 "" "" > $@
+endef
+
 
 ifeq ($(CONFIG_CUSTOMOCF),y)
 
@@ -45,7 +56,7 @@
 .PHONY: all clean install ocf_inc ocf_src ocf_distclean all exportlib
 
 all: ocf_inc ocf_src
-	$(Q)$(MAKE) $(LIB)
+	$(Q)$(MAKE) $(LIB) $(PKGCONFIG) $(PKGCONFIG_INST)
 
 ocf_inc:
 	$(Q)$(MAKE) -C "$(CONFIG_OCF_PATH)" inc O="$(SPDK_ROOT_DIR)/lib/env_ocf/" ENV= --quiet
@@ -64,12 +75,21 @@
 $(LIB): $(OBJS)
 	$(LIB_C)
 
+$(PKGCONFIG): $(LIB)
+	$(call ocfenv_pkgconfig_create,$(SPDK_ROOT_DIR)/build,"")
+
+$(PKGCONFIG_INST): $(LIB)
+	$(call ocfenv_pkgconfig_create,$(CONFIG_PREFIX),$(libdir))
+
 -include $(OBJS:.o=.d)
 
-install:
+install: all
+	$(INSTALL_LIB)
+	@$(call pkgconfig_install,$(PKGCONFIG_INST))
 
 uninstall:
 	$(UNINSTALL_LIB)
+	@$(call pkgconfig_uninstall,$(PKGCONFIG_INST))
 
 endif
 
SPDK_LOCAL_PATCH_EOF
if [ "$DRY" = 1 ]; then
    echo "+ patch -p1 -d $BUILD_DIR < (configure, lib/env_dpdk/env.mk, lib/env_dpdk/pci_dpdk.c, lib/env_ocf/Makefile)"
elif patch -p1 -R --dry-run -s -f -d "$BUILD_DIR" < "$tmp/pcache-spdk.patch" >/dev/null 2>&1; then
    echo "already applied"
else
    patch -p1 --dry-run -s -f -d "$BUILD_DIR" < "$tmp/pcache-spdk.patch" >/dev/null ||
        die "the local patches do not apply to $BUILD_DIR (not a clean SPDK $TAG tree?)"
    patch -p1 -s -d "$BUILD_DIR" < "$tmp/pcache-spdk.patch"
    cp "$tmp/pcache-spdk.patch" "$BUILD_DIR/pcache-local-patches.diff"
    echo "applied (kept as $BUILD_DIR/pcache-local-patches.diff)"
fi
if [ "$WITH_OCF" = 1 ]; then
    run sed -i "s/^#define ENV_ALLOCATOR_NBUFS [0-9]*$/#define ENV_ALLOCATOR_NBUFS $OCF_POOL/" \
        "$BUILD_DIR/lib/env_ocf/ocf_env.c"
    [ "$DRY" = 1 ] || grep -q "^#define ENV_ALLOCATOR_NBUFS $OCF_POOL$" "$BUILD_DIR/lib/env_ocf/ocf_env.c" ||
        die "cannot set ENV_ALLOCATOR_NBUFS in lib/env_ocf/ocf_env.c"
fi

# 4. Python tools for SPDK's make (uv for `make install`), in a throwaway venv.
step "4. python build tools (venv)"
run python3 -m venv --system-site-packages "$tmp/venv"
run "$tmp/venv/bin/pip" install --quiet jinja2 tabulate uv
export PATH="$tmp/venv/bin:$PATH"

# 5. Configure against the system DPDK, without ISA-L, with vhost, NVMe-oF TCP and OCF.
step "5. configure"
cfg=(--prefix="$PREFIX" --with-shared --with-dpdk --without-isal --with-vhost
    --disable-tests --disable-unit-tests)
if [ "$WITH_OCF" = 1 ]; then cfg+=(--with-ocf); fi
# NVMe-oF TCP is built by default (lib/nvmf, module/sock/posix); no option needed.
echo "+ cd $BUILD_DIR"
if [ "$DRY" = 0 ]; then cd "$BUILD_DIR"; fi
run ./configure "${cfg[@]}"
run sed -i 's/^CONFIG_IPSEC_MB?=y$/CONFIG_IPSEC_MB?=n/' mk/config.mk
[ "$DRY" = 1 ] || grep -q '^CONFIG_IPSEC_MB?=n$' mk/config.mk ||
    die "mk/config.mk has no CONFIG_IPSEC_MB line to turn off"

# 6. Build and install.
step "6. make -j$JOBS && make install (prefix $PREFIX)"
run make -j"$JOBS"
run make install

# 7. A libspdk_bdev_ocf.so with OCF inside, for LD_PRELOAD into stock bdevperf.
if [ "$WITH_OCF" = 1 ]; then
    step "7. self-contained libspdk_bdev_ocf.so"
    so=$PREFIX/lib/libspdk_bdev_ocf.so
    if [ "$DRY" = 1 ]; then
        echo "+ gcc -shared -o $so.<version> --whole-archive build/lib/libspdk_bdev_ocf.a build/lib/libspdk_ocfenv.a ..."
    else
        real=$(readlink -f "$so")
        [ -e "$real" ] || die "$so was not installed"
        soname=$(readelf -d "$real" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
        gcc -shared -o "$tmp/libspdk_bdev_ocf.so" ${soname:+-Wl,-soname,"$soname"} \
            -Wl,--whole-archive build/lib/libspdk_bdev_ocf.a build/lib/libspdk_ocfenv.a \
            -Wl,--no-whole-archive -L"$PREFIX/lib" -lspdk_bdev -lspdk_thread -lspdk_util \
            -lspdk_log -lspdk_json -lspdk_jsonrpc -lspdk_rpc -lspdk_env_dpdk -Wl,-z,defs ||
            die "relinking libspdk_bdev_ocf.so with OCF failed"
        install -m 755 "$tmp/libspdk_bdev_ocf.so" "$real"
        # Not `nm | grep -q`: under pipefail, grep quitting at the first match can kill nm
        # with SIGPIPE and fail the check.
        syms=$(nm -D --defined-only "$real")
        grep -q ' T ocf_mngt_cache_start$' <<<"$syms" ||
            die "$real has no OCF inside after relinking"
        echo "$real now holds OCF"
    fi
fi

# 8. Check what pcache uses.
step "8. check"
if [ "$DRY" = 0 ]; then
    for f in "$PREFIX/bin/spdk_tgt" "$PREFIX/lib/libspdk_bdev.so" "$PREFIX/lib/libspdk_vhost.so" \
        "$PREFIX/lib/libspdk_nvmf.so" "$BUILD_DIR/build/examples/bdevperf" "$BUILD_DIR/scripts/rpc.py"; do
        [ -e "$f" ] || die "$f missing after the build"
    done
    PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" pkg-config --exists spdk_bdev ||
        die "pkg-config spdk_bdev fails with PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig"
fi
echo
echo "SPDK $TAG: installed in $PREFIX, build tree (rpc.py, bdevperf) in $BUILD_DIR."
echo "pcache finds it through scripts/spdk-env.sh; for this build:"
exports="export SPDK_DIR=$PREFIX"
if [ "$BUILD_DIR" != /opt/spdk-src ] && [ "$BUILD_DIR" != "$PREFIX" ]; then
    exports="$exports SPDK_SRC=$BUILD_DIR"
fi
if [ "$PREFIX" = /opt/spdk ] && [ "$BUILD_DIR" = /opt/spdk-src ]; then
    echo "  (nothing to set: /opt/spdk and /opt/spdk-src are the defaults)"
else
    echo "  $exports"
fi
echo "Next: scripts/quickstart.sh (a pcache bdev in spdk_tgt with bdevperf I/O)."
