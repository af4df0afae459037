//! The SPDK shell (feature `spdk`): a virtual bdev module loaded into stock SPDK apps.
//!
//! `libpcache.so` is LD_PRELOADed into `spdk_tgt` or `bdevperf` (SPDK built with shared
//! libraries); its constructor (below) registers the bdev module "pcache" and the RPC
//! methods. Each pcache bdev runs the sans-I/O cache engine (`crate::engine::Cache`) on
//! SPDK threads of its own, its *workers* (`worker`). `docs/ARCHITECTURE.md` follows one
//! write and one read through these files.
//!
//! # Layers
//!
//! Each module calls only modules below it (`python3 scripts/spdk-deps.py` prints the
//! graph and fails on a cycle); where a lower module needs something from above, the type
//! moved down or the caller passes it in:
//!
//! ```text
//!  control   rpc        the JSON-RPC methods (bdev_pcache_create, _delete, _get_stats, ...)
//!              |
//!  bdev      module     the module's callbacks: init/fini, examine (autoload), pending creates
//!              |
//!            vbdev      one pcache bdev: bases, claims, create/register, destruct, hot-remove
//!              |
//!  requests  io         channels, submit_request, routing to workers, the submitter-served
//!              |        path (io::served); reads a bdev through io::Front only
//!            worker     the worker threads: intake, cache pump, device I/O, completion,
//!              |        housekeeping, control messages (one file per role)
//!              |
//!  below     link       queue pairs between a submitting thread and a worker
//!            msg        closures as SPDK thread messages
//!            stats      per-channel I/O counters
//!            base_io    one-off base bdev I/O and timers on the app thread
//!            backing    does the backing bdev's FLUSH reach its write cache
//!            registration  the spdk_bdev_module struct, the shutdown flag
//!            json, log  SPDK's JSON writer and logger
//!            ffi        bindgen output and SPDK's inline helpers
//! ```
//!
//! The graph (`A -> B`: A uses B):
//!
//! ```text
//! rpc          -> module, vbdev, io, worker, stats, json, log, ffi
//! module       -> vbdev, worker, base_io, registration, json, log, ffi
//! vbdev        -> io, worker, backing, base_io, registration, json, log, ffi
//! io           -> worker, link, stats, msg, log, ffi
//! worker       -> link, stats, msg, log, ffi
//! link, stats, registration, json, backing -> ffi;  msg, log, base_io -> log, ffi
//! ```
//!
//! Three inversions keep it one-way:
//! - the node's first field is the request path's `io::Front`, whose first field is the
//!   workers' `worker::Roster`: `io` and `worker` read a bdev from `bdev.ctxt` without
//!   knowing `vbdev::Pcache` (`repr(C)`, offsets asserted);
//! - a channel's context starts with its counters, so completion (in `worker`) counts a
//!   request without knowing `io::Channel`;
//! - `module` fills in the `spdk_bdev_module` that `registration` owns at load time, so
//!   `vbdev` names the module (claims, unregister) without depending on `module`.
//!
//! What needs no SPDK (options, routing, stats JSON, the batch look-ahead) is plain Rust in
//! `crate::shell`, unit-tested without this feature. `unsafe` is confined to this module
//! tree (and the media mapping), each block with its `// SAFETY:` reason.

pub mod ffi;

mod backing;
mod base_io;
mod io;
mod json;
mod link;
mod log;
mod module;
mod msg;
mod registration;
mod rpc;
mod stats;
mod vbdev;
mod worker;

// Life before main: keep this to FFI registration calls only (no std I/O, nothing that
// can panic).
#[ctor::ctor(unsafe)]
fn register_pcache() {
    // SAFETY: load time, before main: nothing else knows the module struct yet.
    unsafe { module::register() };
    rpc::register_methods();
}
