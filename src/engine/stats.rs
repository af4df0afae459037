//! Counters a shard keeps; summed across shards for `get_stats`.

use serde::Serialize;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShardStats {
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub read_hit_sectors: u64,
    pub read_miss_sectors: u64,
    pub in_place_writes: u64,
    /// Reads served from mapped cache media at once (`Cache::read_inline`), counted in
    /// `reads` too.
    pub inline_reads: u64,
    /// Read hits and in-place writes the host served with one cache-device I/O of its own
    /// (`Cache::begin_direct`), and read misses it served with one backing-device read
    /// (`Cache::begin_backing_read`), counted in `reads` / `writes` too.
    pub direct: u64,
    pub fills: u64,
    /// Read-miss fills given up: no space at the log head, or GC's moves waited for the
    /// segment the fill would have opened.
    pub fill_bypass: u64,
    /// Clean extents GC gave a second chance (read since logged: copied to the log head).
    pub readmits: u64,
    pub readmit_sectors: u64,
    /// Second chances given up (no space at the log head, or the copy failed).
    pub readmit_dropped: u64,
    /// Extents given a second chance when read only once in their lap of the log (probes),
    /// seen again by GC; and those of them read again meanwhile. While under half are,
    /// such extents are dropped (`readmit_skipped`) but for one in eight.
    pub readmit_probes: u64,
    pub readmit_probes_read: u64,
    pub readmit_skipped: u64,
    /// Read-miss fills not admitted: the cache was evicting and the range had not missed
    /// recently (admission on a second miss).
    pub fill_declined: u64,
    pub ksets_written: u64,
    pub keys_written: u64,
    pub cache_full_waits: u64,
    pub crc_errors: u64,
    pub io_errors: u64,
    pub kset_retries: u64,
    pub wb_groups: u64,
    pub wb_sectors: u64,
    /// Sectors named by the dirty keys of completed writeback groups (≥ wb_sectors: the
    /// difference is what overwrite absorption saved).
    pub wb_group_sectors: u64,
    /// Failed writeback I/Os of every kind (each is retried with backoff).
    pub wb_errors: u64,
    /// Writeback's reads of the cache device that failed.
    pub wb_cache_read_errors: u64,
    /// Writeback's writes (and write-zeroes, unmaps) to the backing device that failed.
    pub wb_backing_write_errors: u64,
    pub wb_backing_flush_errors: u64,
    /// Writeback's reads of dirty data that failed its CRC (read again up to 3 times).
    pub wb_crc_errors: u64,
    /// Ranges poisoned: dirty data that failed its CRC on every read, not written back.
    pub poisoned_extents: u64,
    /// Read pieces that found a poisoned range (failed with a CRC error).
    pub poisoned_reads: u64,
    /// Writes to the cache device (data, ksets, headers, control slots) that failed.
    pub cache_write_errors: u64,
    /// Data writes to the cache device reissued after a failure.
    pub cache_write_retries: u64,
    /// Requests failed after waiting the I/O timeout for space or for the log.
    pub timed_out: u64,
    /// Reads of clean cached data whose cache read failed, served from the backing device.
    pub cache_read_fallbacks: u64,
    pub backing_flushes: u64,
    pub gc_segments: u64,
    pub control_writes: u64,
    /// Writes sent to the backing device around the cache (write-around, pass-through,
    /// the sequential cut-off, a full cache).
    pub around_writes: u64,
    /// Their sectors.
    pub around_sectors: u64,
    /// Write-through writes written to the backing device from the request.
    pub through_writes: u64,
    /// Their sectors.
    pub through_sectors: u64,
    /// Writes that would have gone to the backing device but were logged instead
    /// (dirty data, a writeback in flight or an older flush epoch not yet written back overlapped).
    pub around_logged: u64,
    /// Requests of sequential streams past the cut-off: writes sent around the cache,
    /// reads whose misses were not filled.
    pub seq_bypass_requests: u64,
    /// Their sectors (reads: the sectors not filled).
    pub seq_bypass_sectors: u64,
    /// Writes that found the cache full and went to the backing device instead of waiting.
    pub full_around_requests: u64,
    /// Their sectors.
    pub full_around_sectors: u64,
    /// Writes not admitted (`WriteAdmission::SecondTouch`): cold writes of a full cache
    /// sent to the backing device.
    pub write_declined: u64,
    /// Their sectors.
    pub write_declined_sectors: u64,
    /// Invalidation keys logged for writes sent around the cache.
    pub invalidations: u64,
    /// Backing writes of writes sent around the cache written again after they (or their
    /// flush) failed.
    pub fwd_retries: u64,
    /// Failed backing writes and flushes of requests (around, through, FLUSH).
    pub fwd_errors: u64,
    /// Backing flushes issued for FLUSH requests and durable writes sent to the backing device.
    pub request_flushes: u64,
}

impl ShardStats {
    pub fn add(&mut self, o: &ShardStats) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.discards += o.discards;
        self.read_hit_sectors += o.read_hit_sectors;
        self.read_miss_sectors += o.read_miss_sectors;
        self.in_place_writes += o.in_place_writes;
        self.inline_reads += o.inline_reads;
        self.direct += o.direct;
        self.fills += o.fills;
        self.fill_bypass += o.fill_bypass;
        self.readmits += o.readmits;
        self.readmit_sectors += o.readmit_sectors;
        self.readmit_dropped += o.readmit_dropped;
        self.readmit_probes += o.readmit_probes;
        self.readmit_probes_read += o.readmit_probes_read;
        self.readmit_skipped += o.readmit_skipped;
        self.fill_declined += o.fill_declined;
        self.ksets_written += o.ksets_written;
        self.keys_written += o.keys_written;
        self.cache_full_waits += o.cache_full_waits;
        self.crc_errors += o.crc_errors;
        self.io_errors += o.io_errors;
        self.kset_retries += o.kset_retries;
        self.wb_groups += o.wb_groups;
        self.wb_sectors += o.wb_sectors;
        self.wb_group_sectors += o.wb_group_sectors;
        self.wb_errors += o.wb_errors;
        self.wb_cache_read_errors += o.wb_cache_read_errors;
        self.wb_backing_write_errors += o.wb_backing_write_errors;
        self.wb_backing_flush_errors += o.wb_backing_flush_errors;
        self.wb_crc_errors += o.wb_crc_errors;
        self.poisoned_extents += o.poisoned_extents;
        self.poisoned_reads += o.poisoned_reads;
        self.cache_write_errors += o.cache_write_errors;
        self.cache_write_retries += o.cache_write_retries;
        self.timed_out += o.timed_out;
        self.cache_read_fallbacks += o.cache_read_fallbacks;
        self.backing_flushes += o.backing_flushes;
        self.gc_segments += o.gc_segments;
        self.control_writes += o.control_writes;
        self.around_writes += o.around_writes;
        self.around_sectors += o.around_sectors;
        self.through_writes += o.through_writes;
        self.through_sectors += o.through_sectors;
        self.around_logged += o.around_logged;
        self.seq_bypass_requests += o.seq_bypass_requests;
        self.seq_bypass_sectors += o.seq_bypass_sectors;
        self.full_around_requests += o.full_around_requests;
        self.full_around_sectors += o.full_around_sectors;
        self.write_declined += o.write_declined;
        self.write_declined_sectors += o.write_declined_sectors;
        self.invalidations += o.invalidations;
        self.fwd_retries += o.fwd_retries;
        self.fwd_errors += o.fwd_errors;
        self.request_flushes += o.request_flushes;
    }
}
