//! A worker's share of `bdev_pcache_get_stats`: its counters and state, and its part of the
//! cache's statistics. The JSON shape and the merge across a team are plain Rust, in
//! [`crate::shell::stats`].
//!
//! Reads the worker's own state; calls nothing else.

use super::Worker;
use crate::shell::stats::{FlushPart, HostState, StatsPart};

impl Worker {
    /// This worker's share of the statistics (see `shell::stats::render_stats`).
    pub(super) fn stats_part(&self) -> StatsPart {
        let host = self.counters.to_json(HostState {
            requests_in_flight: self.reqs.live + self.direct_live,
            device_io_in_flight: self.inflight,
            idle: self.idle,
            draining: self.drain_on,
        });
        StatsPart {
            host,
            cache: self
                .cache
                .as_deref()
                .map(|c| (c.stats(), c.geometry().segment_sectors)),
        }
    }

    /// This worker's writeback progress (see `shell::stats::flush_status_json`).
    pub(super) fn flush_part(&self) -> FlushPart {
        let failed = self.writeback_failed();
        match self.cache.as_deref() {
            Some(c) => FlushPart {
                dirty_bytes: c.dirty_bytes(),
                clean: c.is_clean(),
                flushing: self.flushing,
                writeback_failed: failed,
            },
            None => FlushPart {
                writeback_failed: failed,
                ..FlushPart::default()
            },
        }
    }
}
