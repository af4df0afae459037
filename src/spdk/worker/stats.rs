//! A worker's share of `bdev_pcache_get_stats` and the merge of every worker's share into
//! the RPC's JSON body.
//!
//! Reads the worker's counters and cache; calls nothing.

use serde_json::{json, Value};

use super::Worker;

impl Worker {
    /// This worker's share of the statistics (see [`render_stats`]).
    pub(super) fn stats_part(&self) -> StatsPart {
        let c = self.counters;
        let host = json!({
            "requests": c.requests,
            "requests_failed": c.requests_failed,
            "requests_in_flight": self.reqs.live + self.direct_live,
            "device_reads": c.dev_reads,
            "device_writes": c.dev_writes,
            "device_copies": c.dev_copies,
            "device_flushes": c.dev_flushes,
            "device_write_zeroes": c.dev_zeroes,
            "device_errors": c.dev_errors,
            "device_io_in_flight": self.inflight,
            "nomem_waits": c.nomem_waits,
            "requests_same_core": c.arrived_same_core,
            "requests_served_by_submitter": c.served_by_submitter,
            "requests_queue_pair": c.arrived_queue_pair,
            "requests_by_message": c.arrived_by_message,
            "crc_mismatches": c.crc_mismatches,
            "resets": c.resets,
            "idle": self.idle,
            "draining": self.drain_on,
        });
        StatsPart {
            host,
            cache: self
                .cache
                .as_deref()
                .map(|c| (c.stats(), c.geometry().segment_sectors)),
        }
    }
}

/// One worker's statistics, merged across a team by [`render_stats`].
pub(super) struct StatsPart {
    host: Value,
    cache: Option<(crate::engine::CacheStats, u32)>,
}

/// Adds the numbers of `b` into `a` (objects field by field; booleans: any).
pub(super) fn add_json(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(x) => add_json(x, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x1), Some(y1)) = (x.as_u64(), y.as_u64()) {
                *x = (x1 + y1).into();
            }
        }
        (Value::Bool(x), Value::Bool(y)) => *x |= *y,
        _ => {}
    }
}

/// The `bdev_pcache_get_stats` body from every worker's part.
pub(super) fn render_stats(parts: Vec<StatsPart>) -> Value {
    let mut host = json!({});
    let mut cache: Option<(crate::engine::CacheStats, u32)> = None;
    let engines = parts.len();
    for p in parts {
        add_json(&mut host, &p.host);
        match (&mut cache, p.cache) {
            (Some((s, _)), Some((o, _))) => s.merge(o),
            (None, Some(x)) => cache = Some(x),
            _ => {}
        }
    }
    host["engine_threads"] = json!(engines);
    let Some((s, segment_sectors)) = cache else {
        return json!({"host": host});
    };
    let seg_bytes = u64::from(segment_sectors) * 512;
    let capacity = u64::from(s.segments_total) * seg_bytes;
    let free = u64::from(s.segments_free) * seg_bytes;
    let pct = |x: u64| {
        if capacity == 0 {
            0.0
        } else {
            (x as f64 * 1000.0 / capacity as f64).round() / 10.0
        }
    };
    let t = &s.total;
    json!({
        "usage": {
            "capacity_bytes": capacity,
            "clean": {"bytes": s.clean_bytes, "percent": pct(s.clean_bytes)},
            "dirty": {"bytes": s.dirty_bytes, "percent": pct(s.dirty_bytes)},
            "free": {"bytes": free, "percent": pct(free)},
            "segments_total": s.segments_total,
            "segments_free": s.segments_free,
            "extents": s.extents,
        },
        "requests": {
            "reads": t.reads,
            "writes": t.writes,
            "discards": t.discards,
            "read_hit_sectors": t.read_hit_sectors,
            "read_miss_sectors": t.read_miss_sectors,
            "in_place_writes": t.in_place_writes,
            "inline_reads": t.inline_reads,
            "direct": t.direct,
            "cache_full_waits": t.cache_full_waits,
        },
        "errors": {
            "io_errors": t.io_errors,
            "crc_errors": t.crc_errors,
            "wb_errors": t.wb_errors,
            "kset_retries": t.kset_retries,
            "requests_failed": host["requests_failed"].clone(),
            "device_errors": host["device_errors"].clone(),
        },
        "writeback": {
            "dirty_bytes": s.wb_dirty_bytes,
            "failed": s.wb_failed,
            "epoch": s.epoch,
            "gc_percent": s.gc_percent,
        },
        "engine": s,
        "host": host,
    })
}
