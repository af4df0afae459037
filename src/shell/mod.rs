//! What the SPDK shell (`src/spdk`, feature `spdk`) decides that needs no SPDK: plain,
//! safe Rust, compiled and unit-tested without the feature.
//!
//! - [`backing`]: whether the backing bdev's FLUSH reaches a volatile write cache;
//! - [`config`]: RPC parameters and validated options;
//! - [`routing`]: which worker threads a request's stripes go to;
//! - [`stats`]: the JSON of `bdev_pcache_get_stats` and `bdev_pcache_flush_status`, merged
//!   across a bdev's workers;
//! - [`lookahead`]: how far ahead a batch of requests prefetches its index lookups.
//!
//! The shell calls these; they call only the engine (`crate::engine`).

// Used by the shell only: without the `spdk` feature nothing but the tests calls them.
#![cfg_attr(not(feature = "spdk"), allow(dead_code))]

pub(crate) mod backing;
pub(crate) mod config;
pub(crate) mod identity;
pub(crate) mod lookahead;
pub(crate) mod routing;
pub(crate) mod stats;
