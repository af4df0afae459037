//! pcache: a persistent-memory write-back cache for block devices.
//!
//! - [`engine`]: the sans-I/O, deterministic cache engine (format, index, shards, recovery).
//! - [`media`]: hosts that run the engine's device commands (RAM, files, a simulator).
//! - `spdk` (feature `spdk`): the SPDK virtual bdev module shell.

pub mod engine;
pub mod media;
pub mod offline;
mod shell;

#[cfg(feature = "spdk")]
pub mod spdk;
