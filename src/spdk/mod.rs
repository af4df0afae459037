//! The SPDK shell (feature `spdk`): a virtual bdev module loaded into stock SPDK apps.
//!
//! `libpcache.so` is LD_PRELOADed into `spdk_tgt` or `bdevperf` (SPDK built with shared
//! libraries); its constructor registers the bdev module "pcache" and the RPC methods.
//! Today the bdev passes every request through to the backing bdev; the cache engine
//! plugs in at [`io`]'s `submit`.
//!
//! - [`ffi`]: bindgen output and SPDK's inline helpers in Rust.
//! - [`module`]: the `spdk_bdev_module` and load-time registration.
//! - [`rpc`]: `bdev_pcache_create` / `_delete` / `_get_stats`.
//! - [`config`]: RPC parameters and validated options (pure Rust).
//! - [`vbdev`]: one pcache bdev: bases, claims, registration, destruct, hot-remove, JSON.
//! - [`io`]: channels and the request path.
//! - [`stats`]: lock-free per-channel counters.
//! - [`json`], [`log`]: glue to SPDK's JSON writer and logger.
//!
//! `unsafe` is confined to this module tree.

pub mod ffi;

mod config;
mod io;
mod json;
mod log;
mod module;
mod rpc;
mod stats;
mod vbdev;
