/* Headers bindgen reads for pcache's SPDK shell (see build.rs). Keep this list narrow:
 * every header added here grows the generated bindings and their layout assertions. */
#include <spdk/stdinc.h>
#include <spdk/bdev.h>
#include <spdk/bdev_module.h>
#include <spdk/thread.h>
#include <spdk/rpc.h>
#include <spdk/jsonrpc.h>
#include <spdk/json.h>
#include <spdk/log.h>
#include <spdk/string.h>
#include <spdk/uuid.h>
#include <spdk/env.h>
#include <spdk/cpuset.h>
/* For struct spdk_bdev_nvme_opts only (enable_flush); the function is looked up at run
 * time, so libpcache.so does not depend on the NVMe bdev module. */
#include <spdk/module/bdev/nvme.h>
