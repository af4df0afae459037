//! The JSON of `bdev_pcache_get_stats` and `bdev_pcache_flush_status`: each worker thread
//! reports its part ([`StatsPart`], [`FlushPart`]) and these merge the parts of a bdev's
//! workers into the RPC's body. Field names are the RPCs' wire format: keep them.

use serde_json::{json, Value};

use crate::engine::CacheStats;

/// What a worker thread counts (its `host` statistics).
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) requests: u64,
    pub(crate) requests_failed: u64,
    pub(crate) dev_reads: u64,
    pub(crate) dev_writes: u64,
    pub(crate) dev_copies: u64,
    /// Of those, made by the cache bdev itself (COPY), and such copies it failed (each
    /// then made through a host buffer).
    pub(crate) dev_copies_offloaded: u64,
    pub(crate) dev_copies_offload_failed: u64,
    /// Of those, written to the backing bdev straight from a registered mapped cache.
    pub(crate) dev_copies_from_mapping: u64,
    /// Of those, written back from one read of the cache bdev with others whose sources
    /// lie together in the cache (`copyrun`), and how many such reads (runs) there were.
    pub(crate) dev_copies_joined: u64,
    pub(crate) dev_copy_runs: u64,
    /// Of those, written back from the cache bdev's own memory, lent by a zero-copy read,
    /// and such copies whose zero-copy read failed or came in pieces (each then read again
    /// into a host buffer).
    pub(crate) dev_copies_lent: u64,
    pub(crate) dev_copies_lent_failed: u64,
    /// Of the lent copies, those whose backing write had to wait for a free `spdk_bdev_io`:
    /// their data was copied into a host buffer and the lent memory let go meanwhile.
    pub(crate) dev_copies_unlent: u64,
    /// Of the device writes asked for, those made together with others in one bdev write
    /// (data to adjacent cache blocks, `datarun`).
    pub(crate) dev_writes_joined: u64,
    pub(crate) dev_flushes: u64,
    pub(crate) dev_zeroes: u64,
    pub(crate) dev_errors: u64,
    /// Device I/Os (and requests served by their submitter) that waited for a free
    /// `spdk_bdev_io`.
    pub(crate) nomem_waits: u64,
    /// How requests arrived: from a thread on this core (inbox), through a queue pair from
    /// another core, or by message.
    pub(crate) arrived_same_core: u64,
    /// Of those, served by the submitting thread itself (`io::served`).
    pub(crate) served_by_submitter: u64,
    pub(crate) arrived_queue_pair: u64,
    pub(crate) arrived_by_message: u64,
    pub(crate) crc_mismatches: u64,
    pub(crate) resets: u64,
    /// Direct requests (read hits, in-place writes) whose cache I/O failed, served again
    /// the normal way.
    pub(crate) direct_retried: u64,
}

/// A worker's state beside its counters, as it reports it.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct HostState {
    pub(crate) requests_in_flight: usize,
    pub(crate) device_io_in_flight: u32,
    pub(crate) idle: bool,
    pub(crate) draining: bool,
}

impl Counters {
    /// The worker's `host` object.
    pub(crate) fn to_json(self, s: HostState) -> Value {
        let c = self;
        json!({
            "requests": c.requests,
            "requests_failed": c.requests_failed,
            "requests_in_flight": s.requests_in_flight,
            "device_reads": c.dev_reads,
            "device_writes": c.dev_writes,
            "device_writes_joined": c.dev_writes_joined,
            "device_copies": c.dev_copies,
            "device_copies_offloaded": c.dev_copies_offloaded,
            "device_copies_offload_failed": c.dev_copies_offload_failed,
            "device_copies_from_mapping": c.dev_copies_from_mapping,
            "device_copies_joined": c.dev_copies_joined,
            "device_copy_runs": c.dev_copy_runs,
            "device_copies_lent": c.dev_copies_lent,
            "device_copies_lent_failed": c.dev_copies_lent_failed,
            "device_copies_unlent": c.dev_copies_unlent,
            "device_flushes": c.dev_flushes,
            "device_write_zeroes": c.dev_zeroes,
            "device_errors": c.dev_errors,
            "device_io_in_flight": s.device_io_in_flight,
            "nomem_waits": c.nomem_waits,
            "requests_same_core": c.arrived_same_core,
            "requests_served_by_submitter": c.served_by_submitter,
            "requests_queue_pair": c.arrived_queue_pair,
            "requests_by_message": c.arrived_by_message,
            "crc_mismatches": c.crc_mismatches,
            "resets": c.resets,
            "direct_requests_retried": c.direct_retried,
            "idle": s.idle,
            "draining": s.draining,
        })
    }
}

/// One worker's statistics, merged across a team by [`render_stats`].
pub(crate) struct StatsPart {
    /// Its `host` object ([`Counters::to_json`]).
    pub(crate) host: Value,
    /// Its part of the cache's statistics and the segment size (sectors), once open.
    pub(crate) cache: Option<(CacheStats, u32)>,
}

/// Adds the numbers of `b` into `a` (objects field by field; booleans: any).
pub(crate) fn add_json(a: &mut Value, b: &Value) {
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
pub(crate) fn render_stats(parts: Vec<StatsPart>) -> Value {
    let mut host = json!({});
    let mut cache: Option<(CacheStats, u32)> = None;
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
            "wb_cache_read_errors": t.wb_cache_read_errors,
            "wb_backing_write_errors": t.wb_backing_write_errors,
            "wb_backing_flush_errors": t.wb_backing_flush_errors,
            "wb_crc_errors": t.wb_crc_errors,
            "cache_write_errors": t.cache_write_errors,
            "cache_write_retries": t.cache_write_retries,
            "kset_retries": t.kset_retries,
            "timed_out": t.timed_out,
            "cache_read_fallbacks": t.cache_read_fallbacks,
            "poisoned_reads": t.poisoned_reads,
            "backing_write_errors": t.fwd_errors,
            "requests_failed": host["requests_failed"].clone(),
            "device_errors": host["device_errors"].clone(),
        },
        "writeback": {
            "dirty_bytes": s.wb_dirty_bytes,
            "failed": s.wb_failed,
            "state": s.writeback,
            "failing_for_ms": s.wb_failing_for_ms,
            "log_failed": s.log_failed,
            "poisoned": s.poisoned,
            "epoch": s.epoch,
            "gc_percent": s.gc_percent,
        },
        "mode": {
            "mode": s.mode,
            "seq_cutoff_policy": s.seq_cutoff_policy,
            "seq_cutoff_bytes": s.seq_cutoff_bytes,
            "write_around_requests": t.around_writes,
            "write_around_bytes": t.around_sectors * 512,
            "write_through_requests": t.through_writes,
            "write_through_bytes": t.through_sectors * 512,
            "logged_instead": t.around_logged,
            "seq_cutoff_bypassed_requests": t.seq_bypass_requests,
            "seq_cutoff_bypassed_bytes": t.seq_bypass_sectors * 512,
            "cache_full_around_requests": t.full_around_requests,
            "cache_full_around_bytes": t.full_around_sectors * 512,
            "write_admission": s.write_admission,
            "write_declined_requests": t.write_declined,
            "write_declined_bytes": t.write_declined_sectors * 512,
            "invalidations": t.invalidations,
            "backing_write_retries": t.fwd_retries,
            "backing_flushes_for_requests": t.request_flushes,
        },
        "engine": s,
        "host": host,
    })
}

/// One worker's writeback progress.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlushPart {
    pub(crate) dirty_bytes: u64,
    pub(crate) clean: bool,
    pub(crate) flushing: bool,
    pub(crate) writeback_failed: bool,
}

impl FlushPart {
    /// A worker that could not be asked: not clean, writeback failed.
    pub(crate) const UNREACHABLE: FlushPart = FlushPart {
        dirty_bytes: 0,
        clean: false,
        flushing: false,
        writeback_failed: true,
    };
}

/// The `bdev_pcache_flush_status` body from every worker's part: clean when all are.
pub(crate) fn flush_status_json(parts: &[FlushPart]) -> Value {
    json!({
        "dirty_bytes": parts.iter().map(|p| p.dirty_bytes).sum::<u64>(),
        "clean": parts.iter().all(|p| p.clean),
        "flushing": parts.iter().any(|p| p.flushing),
        "writeback_failed": parts.iter().any(|p| p.writeback_failed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stats::ShardStats;

    fn cache_stats(reads: u64, segments: [u32; 2], dirty: u64) -> CacheStats {
        let [segments_total, segments_free] = segments;
        CacheStats {
            total: ShardStats {
                reads,
                ..ShardStats::default()
            },
            shard_ids: vec![],
            shards: vec![],
            dirty_bytes: dirty,
            clean_bytes: 0,
            extents: 0,
            segments_total,
            segments_free,
            epoch: 1,
            gc_percent: 80,
            mode: "write_back",
            seq_cutoff_policy: "full",
            seq_cutoff_bytes: 1 << 20,
            write_admission: "always",
            wb_dirty_bytes: dirty,
            shard_epochs: vec![],
            shard_frontiers: vec![],
            wb_failed: false,
            writeback: "ok",
            wb_failing_since_ms: None,
            wb_failing_for_ms: None,
            log_failed: false,
            poisoned: vec![],
        }
    }

    fn part(requests: u64, idle: bool, cache: Option<CacheStats>) -> StatsPart {
        let c = Counters {
            requests,
            requests_failed: 1,
            dev_errors: 2,
            ..Counters::default()
        };
        StatsPart {
            host: c.to_json(HostState {
                requests_in_flight: 3,
                idle,
                ..HostState::default()
            }),
            cache: cache.map(|s| (s, 2048)),
        }
    }

    #[test]
    fn add_json_sums_numbers_ors_flags_and_keeps_new_fields() {
        let mut a = json!({"n": 1, "f": false, "o": {"m": 2}});
        add_json(
            &mut a,
            &json!({"n": 2, "f": true, "o": {"m": 3, "k": 4}, "x": 5}),
        );
        assert_eq!(a, json!({"n": 3, "f": true, "o": {"m": 5, "k": 4}, "x": 5}));
    }

    #[test]
    fn a_worker_without_a_cache_reports_its_host_counters_only() {
        let v = render_stats(vec![part(5, true, None)]);
        assert_eq!(v.as_object().map(|o| o.len()), Some(1));
        assert_eq!(v["host"]["requests"], 5);
        assert_eq!(v["host"]["requests_in_flight"], 3);
        assert_eq!(v["host"]["idle"], true);
        assert_eq!(v["host"]["engine_threads"], 1);
    }

    #[test]
    fn a_team_sums_its_workers_parts() {
        let v = render_stats(vec![
            // The lead holds the segment pool; a follower reports none.
            part(5, true, Some(cache_stats(10, [8, 2], 1 << 20))),
            part(7, false, Some(cache_stats(20, [0, 0], 1 << 20))),
        ]);
        assert_eq!(v["host"]["requests"], 12);
        assert_eq!(v["host"]["idle"], true);
        assert_eq!(v["host"]["engine_threads"], 2);
        assert_eq!(v["requests"]["reads"], 30);
        assert_eq!(v["errors"]["requests_failed"], 2);
        assert_eq!(v["errors"]["device_errors"], 4);
        // 8 segments of 1 MiB (2048 sectors), 2 free, 2 MiB dirty in all.
        assert_eq!(v["usage"]["capacity_bytes"], 8u64 << 20);
        assert_eq!(v["usage"]["free"]["bytes"], 2u64 << 20);
        assert_eq!(v["usage"]["free"]["percent"], 25.0);
        assert_eq!(v["usage"]["dirty"]["bytes"], 2u64 << 20);
        assert_eq!(v["usage"]["dirty"]["percent"], 25.0);
        assert_eq!(v["writeback"]["gc_percent"], 80);
        assert_eq!(v["mode"]["mode"], "write_back");
        assert_eq!(v["mode"]["seq_cutoff_bytes"], 1 << 20);
        assert!(v["engine"].is_object());
    }

    #[test]
    fn host_counters_keep_their_wire_names() {
        let v = Counters::default().to_json(HostState::default());
        let mut keys: Vec<&str> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "crc_mismatches",
                "device_copies",
                "device_copies_from_mapping",
                "device_copies_joined",
                "device_copies_lent",
                "device_copies_lent_failed",
                "device_copies_offload_failed",
                "device_copies_offloaded",
                "device_copies_unlent",
                "device_copy_runs",
                "device_errors",
                "device_flushes",
                "device_io_in_flight",
                "device_reads",
                "device_write_zeroes",
                "device_writes",
                "device_writes_joined",
                "direct_requests_retried",
                "draining",
                "idle",
                "nomem_waits",
                "requests",
                "requests_by_message",
                "requests_failed",
                "requests_in_flight",
                "requests_queue_pair",
                "requests_same_core",
                "requests_served_by_submitter",
                "resets",
            ]
        );
    }

    #[test]
    fn flush_status_is_clean_only_when_every_worker_is() {
        let clean = FlushPart {
            clean: true,
            ..FlushPart::default()
        };
        let dirty = FlushPart {
            dirty_bytes: 4096,
            flushing: true,
            ..FlushPart::default()
        };
        assert_eq!(
            flush_status_json(&[clean, dirty]),
            json!({"dirty_bytes": 4096, "clean": false, "flushing": true, "writeback_failed": false})
        );
        assert_eq!(flush_status_json(&[clean, clean])["clean"], true);
        assert_eq!(
            flush_status_json(&[clean, FlushPart::UNREACHABLE])["writeback_failed"],
            true
        );
    }
}
