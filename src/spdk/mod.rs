//! The SPDK shell (feature `spdk`): a virtual bdev module loaded into stock SPDK apps.
//!
//! `libpcache.so` is LD_PRELOADed into `spdk_tgt` or `bdevperf` (SPDK built with shared
//! libraries); its constructor registers the bdev module "pcache" and the RPC methods.
//! Each pcache bdev runs the cache on its own SPDK worker threads ([`worker`]).
//!
//! - [`ffi`]: bindgen output and SPDK's inline helpers in Rust.
//! - [`module`]: the `spdk_bdev_module` and load-time registration.
//! - [`rpc`]: `bdev_pcache_create` / `_delete` / `_get_stats` / `_flush_start` /
//!   `_flush_status`.
//! - [`config`]: RPC parameters and validated options (pure Rust).
//! - [`vbdev`]: one pcache bdev: bases, claims, registration, destruct, hot-remove, JSON.
//! - [`io`]: channels and the request path on the submitting threads.
//! - [`link`]: queue pairs from a submitting thread to a worker on another core.
//! - [`worker`]: the worker threads (a team, one per core): each runs its part of the
//!   `Cache` and executes its device commands; `worker::team` carries what the parts share.
//! - [`msg`]: messages between SPDK threads.
//! - [`stats`]: lock-free per-channel counters.
//! - [`json`], [`log`]: glue to SPDK's JSON writer and logger.
//!
//! `unsafe` is confined to this module tree.

pub mod ffi;

mod config;
mod io;
mod json;
mod link;
mod log;
mod module;
mod msg;
mod rpc;
mod stats;
mod vbdev;
mod worker;
