//! The shards of one cache driven from one thread: request splitting, segment pool
//! messages and completion assembly. Hosts without threads (the `pcache` tool, tests,
//! benchmarks) drive all shards with one `Cache`; a threaded host [`Cache::split`]s it into
//! parts, one per thread, and carries between them what the parts cannot decide alone
//! (segment requests and grants, the writeback epoch barrier, space pressure): see
//! [`Coordination`].

use std::collections::HashMap;

use serde::Serialize;

use super::format::Superblock;
use super::geometry::Geometry;
use super::io::{Command, IoDone, IoError, Op, ReqError, ReqId, ReqResult, Request, ShardRequest};
use super::mode::{CacheMode, SeqCutoff, WriteAdmission};
use super::pool::{Grant, SegmentPool, ToPool};
use super::shard::{GcSpace, Shard, WritebackOptions, WritebackState};
use super::stats::ShardStats;

#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// Do not insert read-miss data into the cache as clean extents.
    pub no_read_fill: bool,
    /// Writeback pacing (its `gc_percent` is overridden by the value persisted at format).
    pub writeback: WritebackOptions,
    /// Opening: a backing device of the recorded size but another UUID is refused, or
    /// accepted and recorded (see [`UuidMismatch`](super::open::UuidMismatch)).
    pub backing_uuid_mismatch: super::open::UuidMismatch,
    /// Opening: the block size of the device the cache is on now (0: 512). A cache
    /// recorded with smaller blocks is refused: its metadata writes are partial blocks.
    pub device_block_bytes: u32,
    /// Opening: the cache mode to run in (persisted if it changes); None keeps the one
    /// persisted in the control slots (write-back for a new cache).
    pub mode: Option<CacheMode>,
    /// Opening: the sequential cut-off (as `mode`).
    pub seq_cutoff: Option<SeqCutoff>,
    /// Opening: which writes a full cache takes in (as `mode`; `always` for a new cache).
    pub write_admission: Option<WriteAdmission>,
}

/// A request served directly by the host (see [`Cache::begin_direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    /// Cache-device sector to read from or write to (the request's length); with
    /// `backing`, the backing-device sector to read from.
    pub sector: u64,
    pub write: bool,
    /// A read miss served from the backing device ([`Cache::begin_backing_read`]).
    pub backing: bool,
    /// Index in `Cache::shards`.
    shard: u32,
    /// The shard's key for `end_direct`: the pinned segment, or the rewritten LBA.
    key: u64,
}

struct Parent {
    left: u32,
    result: ReqResult,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("geometry", &self.sb.geometry)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Cross-part decisions a split cache's host hands every part (see [`Cache::split`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coordination {
    /// Oldest flush epoch some shard has not written back: no shard may write back a
    /// later one (the minimum of every part's [`Cache::frontier`]).
    pub allowed_epoch: u64,
    /// Space is short (from the part holding the pool: [`Cache::pool_pressure`]).
    pub pressure: bool,
}

pub struct Cache {
    sb: Superblock,
    /// The shards this cache drives (all of them unless split), in id order.
    shards: Vec<Shard>,
    /// Shard id -> index in `shards`, `None` for another part's shard.
    local: Vec<Option<u32>>,
    /// The segment pool; only part 0 of a split cache has it.
    pool: Option<SegmentPool>,
    /// Set when split: the host decides for all parts.
    coordination: Option<Coordination>,
    /// Messages for the pool held by another part.
    pool_out: Vec<ToPool>,
    /// Grants for shards of other parts.
    grants_out: Vec<(u32, Grant)>,
    epoch: u64,
    gc_percent: u32,
    opts: CacheOptions,
    parents: HashMap<ReqId, Parent>,
    commands: Vec<Command>,
    completions: Vec<(ReqId, ReqResult)>,
    scratch: Vec<(ReqId, ReqResult)>,
    log: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    pub total: ShardStats,
    /// Id of each shard in `shards` (and the other per-shard lists).
    pub shard_ids: Vec<u32>,
    pub shards: Vec<ShardStats>,
    pub dirty_bytes: u64,
    pub clean_bytes: u64,
    pub extents: u64,
    pub segments_total: u32,
    pub segments_free: u32,
    pub epoch: u64,
    pub gc_percent: u32,
    /// The cache mode ("write_back", ...).
    pub mode: &'static str,
    /// The sequential cut-off's policy and threshold.
    pub seq_cutoff_policy: &'static str,
    pub seq_cutoff_bytes: u64,
    /// Which writes a full cache takes in ("always", "second_touch").
    pub write_admission: &'static str,
    /// Dirty bytes still to write back.
    pub wb_dirty_bytes: u64,
    /// Current flush epoch of each shard.
    pub shard_epochs: Vec<u64>,
    /// Oldest epoch each shard has not yet written back and flushed.
    pub shard_frontiers: Vec<u64>,
    /// Writeback has failed for longer than the I/O timeout (it is still retried).
    pub wb_failed: bool,
    /// "ok", "retrying" (failing, retried with backoff) or "failing" (for longer than the
    /// I/O timeout): the worst of the shards'.
    pub writeback: &'static str,
    /// Host time (ms) since when writeback has been failing, if it is...
    pub wb_failing_since_ms: Option<u64>,
    /// ...and for how long (ms).
    pub wb_failing_for_ms: Option<u64>,
    /// A shard's log is closed: the cache device failed every write for the I/O timeout.
    /// Writes fail; cached data stays readable and is written back.
    pub log_failed: bool,
    /// Ranges (lba, sectors) whose dirty data failed its CRC in writeback: they read as
    /// errors until rewritten.
    pub poisoned: Vec<(u64, u32)>,
}

fn state_rank(s: &str) -> u8 {
    match s {
        "failing" => 2,
        "retrying" => 1,
        _ => 0,
    }
}

impl CacheStats {
    /// Folds in the statistics of another part of a split cache (per-shard lists stay in
    /// shard id order).
    pub fn merge(&mut self, o: CacheStats) {
        self.total.add(&o.total);
        let mut rows: Vec<_> = std::mem::take(&mut self.shard_ids)
            .into_iter()
            .zip(std::mem::take(&mut self.shards))
            .zip(std::mem::take(&mut self.shard_epochs))
            .zip(std::mem::take(&mut self.shard_frontiers))
            .chain(
                o.shard_ids
                    .into_iter()
                    .zip(o.shards)
                    .zip(o.shard_epochs)
                    .zip(o.shard_frontiers),
            )
            .collect();
        rows.sort_by_key(|(((id, _), _), _)| *id);
        for (((id, s), e), f) in rows {
            self.shard_ids.push(id);
            self.shards.push(s);
            self.shard_epochs.push(e);
            self.shard_frontiers.push(f);
        }
        self.dirty_bytes += o.dirty_bytes;
        self.clean_bytes += o.clean_bytes;
        self.extents += o.extents;
        self.segments_total += o.segments_total;
        self.segments_free += o.segments_free;
        self.epoch = self.epoch.max(o.epoch);
        self.wb_dirty_bytes += o.wb_dirty_bytes;
        self.wb_failed |= o.wb_failed;
        if state_rank(o.writeback) > state_rank(self.writeback) {
            self.writeback = o.writeback;
        }
        self.wb_failing_since_ms = match (self.wb_failing_since_ms, o.wb_failing_since_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.wb_failing_for_ms = self.wb_failing_for_ms.max(o.wb_failing_for_ms);
        self.log_failed |= o.log_failed;
        self.poisoned.extend(o.poisoned);
    }
}

impl Cache {
    pub(crate) fn from_parts(
        sb: Superblock,
        shards: Vec<Shard>,
        pool: SegmentPool,
        epoch: u64,
        gc_percent: u32,
        opts: CacheOptions,
    ) -> Self {
        let local = (0..shards.len() as u32).map(Some).collect();
        let mut c = Cache {
            sb,
            shards,
            local,
            pool: Some(pool),
            coordination: None,
            pool_out: Vec::new(),
            grants_out: Vec::new(),
            epoch,
            gc_percent,
            opts,
            parents: HashMap::new(),
            commands: Vec::new(),
            completions: Vec::new(),
            scratch: Vec::new(),
            log: Vec::new(),
        };
        // The writeback barrier is known from the start (writes may go to the backing
        // device before the first poll).
        c.coordinate();
        c
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn geometry(&self) -> &Geometry {
        &self.sb.geometry
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Splits the cache into `parts` caches to run on as many threads: part `i` drives the
    /// shards whose id is `i` modulo `parts`; part 0 keeps the segment pool. From then on
    /// the host must carry between the parts: [`Cache::take_pool_messages`] to part 0's
    /// [`Cache::pool_message`], [`Cache::take_grants`] to the owning part's
    /// [`Cache::grant`], and a [`Coordination`] built from every part's
    /// [`Cache::frontier`] and part 0's [`Cache::pool_pressure`] to every part's
    /// [`Cache::coordinate_with`]. A request goes to every part that owns one of its
    /// stripes (a flush to all parts) and completes when each of them completed it.
    pub fn split(self, parts: usize) -> Vec<Cache> {
        let parts = parts.clamp(1, self.shards.len().max(1));
        if parts == 1 {
            return vec![self];
        }
        let n = self.shards.len();
        let mut buckets: Vec<Vec<Shard>> = (0..parts).map(|_| Vec::new()).collect();
        for (i, s) in self.shards.into_iter().enumerate() {
            buckets[Self::part_of_shard(i as u32, parts)].push(s);
        }
        let first = Coordination {
            allowed_epoch: 0,
            pressure: false,
        };
        let mut pool = self.pool;
        buckets
            .into_iter()
            .enumerate()
            .map(|(p, shards)| {
                let mut local = vec![None; n];
                let ids = (0..n).filter(|&id| Self::part_of_shard(id as u32, parts) == p);
                for (li, id) in ids.enumerate() {
                    local[id] = Some(li as u32);
                }
                Cache {
                    sb: self.sb.clone(),
                    shards,
                    local,
                    pool: if p == 0 { pool.take() } else { None },
                    coordination: Some(first),
                    pool_out: Vec::new(),
                    grants_out: Vec::new(),
                    epoch: self.epoch,
                    gc_percent: self.gc_percent,
                    opts: self.opts.clone(),
                    parents: HashMap::new(),
                    commands: Vec::new(),
                    completions: Vec::new(),
                    scratch: Vec::new(),
                    log: Vec::new(),
                }
            })
            .collect()
    }

    /// The part that drives shard `shard` when a cache is split into `parts`.
    pub fn part_of_shard(shard: u32, parts: usize) -> usize {
        shard as usize % parts.max(1)
    }

    /// Whether this cache drives shard `id`.
    pub fn owns_shard(&self, id: u32) -> bool {
        self.local.get(id as usize).is_some_and(Option::is_some)
    }

    /// Oldest epoch one of this cache's shards has not written back and flushed.
    pub fn frontier(&self) -> u64 {
        self.shards
            .iter()
            .map(Shard::frontier)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Whether space is short, for the part holding the pool (None elsewhere).
    pub fn pool_pressure(&self) -> Option<bool> {
        let pool = self.pool.as_ref()?;
        let g = &self.sb.geometry;
        let used = u64::from(pool.total() - pool.free_count()) * u64::from(g.segment_sectors);
        Some(pool.waiting() > 0 || used > GcSpace::new(g, self.gc_percent).limit())
    }

    /// Applies the host's cross-part decisions (split caches only).
    pub fn coordinate_with(&mut self, c: Coordination) {
        if self.coordination.is_some() {
            self.coordination = Some(c);
        }
    }

    /// Messages for the pool, which another part holds.
    pub fn take_pool_messages(&mut self, out: &mut Vec<ToPool>) {
        out.append(&mut self.pool_out);
    }

    /// Grants for shards of other parts.
    pub fn take_grants(&mut self, out: &mut Vec<(u32, Grant)>) {
        out.append(&mut self.grants_out);
    }

    /// A pool message from a shard of another part (part 0 only; ignored elsewhere).
    pub fn pool_message(&mut self, msg: ToPool) {
        let grants = match self.pool.as_mut() {
            Some(pool) => pool.handle(msg),
            None => return,
        };
        for (shard, g) in grants {
            self.grant(shard, g);
        }
    }

    /// A segment for shard `shard`: applied if it is ours, else queued for its part.
    pub fn grant(&mut self, shard: u32, g: Grant) {
        match self.local.get(shard as usize).copied().flatten() {
            Some(li) => self.shards[li as usize].grant(g),
            None => self.grants_out.push((shard, g)),
        }
    }

    /// Accepts a request; its completion comes out of [`Cache::take_completions`]. A split
    /// cache serves only the parts of the request in its own shards.
    pub fn submit(&mut self, r: Request) -> Result<(), ReqError> {
        let limit = self.sb.geometry.backing_sectors;
        if r.op != Op::Flush {
            if r.len == 0 {
                return Err(ReqError::Invalid("zero-length request"));
            }
            if r.lba
                .checked_add(u64::from(r.len))
                .is_none_or(|e| e > limit)
            {
                return Err(ReqError::OutOfRange {
                    lba: r.lba,
                    len: r.len.into(),
                    limit,
                });
            }
            // The cache stores whole blocks of its device: hosts export that block size
            // (or a larger one), so a request never needs a read-modify-write.
            let g = &self.sb.geometry;
            if !g.block_aligned(r.lba) || !g.block_aligned(r.len.into()) {
                return Err(ReqError::Invalid(
                    "request not aligned to the cache block size",
                ));
            }
        }
        if r.op == Op::Flush {
            // Every acknowledged write the cache holds is already durable: a flush closes
            // the epoch, and flushes the backing device where writes went there directly.
            self.epoch += 1;
            let mut waiting = 0;
            for s in &mut self.shards {
                s.set_epoch(self.epoch);
                if !s.flush_request(r.id) {
                    waiting += 1;
                }
            }
            if self.coordination.is_none() {
                // The barrier moves with the epoch (a split cache's host decides it).
                self.coordinate();
            }
            match waiting {
                0 => self.completions.push((r.id, Ok(()))),
                1 => {}
                n => {
                    self.parents.insert(
                        r.id,
                        Parent {
                            left: n,
                            result: Ok(()),
                        },
                    );
                }
            }
            return Ok(());
        }
        let g = self.sb.geometry;
        let stripe = u64::from(g.stripe_sectors);
        let end = r.lba + u64::from(r.len);
        let pieces = if self.shards.len() == self.local.len() {
            g.stripe_of(end - 1) - g.stripe_of(r.lba) + 1
        } else {
            let mut n = 0;
            let mut s = g.stripe_of(r.lba);
            while s * stripe < end {
                n += u64::from(self.owns_shard(g.shard_of_stripe(s)));
                s += 1;
            }
            n
        };
        if pieces == 0 {
            // Another part's stripes only: nothing to do here.
            self.completions.push((r.id, Ok(())));
            return Ok(());
        }
        if pieces > 1 {
            self.parents.insert(
                r.id,
                Parent {
                    left: pieces as u32,
                    result: Ok(()),
                },
            );
        }
        let mut lba = r.lba;
        while lba < end {
            let piece_end = ((g.stripe_of(lba) + 1) * stripe).min(end);
            let shard = g.shard_of(lba) as usize;
            if let Some(li) = self.local.get(shard).copied().flatten() {
                self.shards[li as usize].submit(ShardRequest {
                    id: r.id,
                    op: r.op,
                    lba,
                    len: (piece_end - lba) as u32,
                    buf_off: (lba - r.lba) * 512,
                });
            }
            lba = piece_end;
        }
        Ok(())
    }

    /// Serves a read of cached data at once, if it can (see [`Shard::read_inline`]): the
    /// range lies in one stripe of a shard this part drives, and every sector is cached.
    /// None: submit it as a request instead.
    pub fn read_inline(
        &mut self,
        lba: u64,
        len: u32,
        copy: &mut dyn FnMut(u64, u64, u64) -> bool,
    ) -> Option<bool> {
        let li = self.sole_shard(lba, len)?;
        let g = &self.sb.geometry;
        if g.block_sectors > 1 && !(g.block_aligned(lba) && g.block_aligned(len.into())) {
            return None; // refused by `submit`
        }
        self.shards[li].read_inline(lba, len, copy)
    }

    /// Where the cached data of `lba..+len` lives when one data extent holds all of it
    /// (what [`Cache::read_inline`] would copy), without counting a read: for prefetching.
    #[inline]
    pub fn cached_sector(&self, lba: u64, len: u32) -> Option<u64> {
        let li = self.sole_shard(lba, len)?;
        let e = self.shards[li].index().covering(lba, len)?;
        e.is_data().then_some(e.pos)
    }

    /// Starts a read hit or an in-place write that the host serves with one cache-device
    /// I/O of its own, at [`Direct::sector`], from or into the request's buffer: no
    /// commands, tags or completions to carry. The host reports the I/O's outcome with
    /// [`Cache::end_direct`], whose result is the request's. None: submit it normally.
    // Inlined into the SPDK shell's direct path: a call returned this through memory and
    // reading it back stalled on store forwarding.
    #[inline(always)]
    pub fn begin_direct(&mut self, op: Op, lba: u64, len: u32) -> Option<Direct> {
        let li = self.sole_shard(lba, len)?;
        let g = &self.sb.geometry;
        if g.block_sectors > 1 && !(g.block_aligned(lba) && g.block_aligned(len.into())) {
            return None; // refused by `submit`
        }
        let (sector, key) = self.shards[li].begin_direct(op, lba, len)?;
        Some(Direct {
            sector,
            write: op == Op::Write,
            backing: false,
            shard: li as u32,
            key,
        })
    }

    /// Starts a read miss that the host serves with one backing-device read of its own
    /// (see [`Shard::begin_backing_read`]), at [`Direct::sector`], into the request's
    /// buffer; ended by [`Cache::end_direct`] or [`Cache::cancel_direct`] like the others.
    /// None: submit it normally (a fill, or anything cached there).
    pub fn begin_backing_read(&mut self, lba: u64, len: u32) -> Option<Direct> {
        let li = self.sole_shard(lba, len)?;
        let g = &self.sb.geometry;
        if g.block_sectors > 1 && !(g.block_aligned(lba) && g.block_aligned(len.into())) {
            return None; // refused by `submit`
        }
        self.shards[li]
            .begin_backing_read(lba, len)
            .then_some(Direct {
                sector: lba,
                write: false,
                backing: true,
                shard: li as u32,
                key: 0,
            })
    }

    /// Forgets `d` (of `len` sectors, as begun) when its device I/O could not be issued:
    /// nothing was read or written, nothing is counted, and the request may be submitted
    /// normally instead.
    pub fn cancel_direct(&mut self, d: Direct, len: u32) {
        let op = if d.write { Op::Write } else { Op::Read };
        if let Some(s) = self.shards.get_mut(d.shard as usize) {
            if d.backing {
                s.cancel_backing_read(len);
            } else {
                s.cancel_direct(op, d.key, len);
            }
        }
    }

    /// The device I/O of `d` finished with `result`: the request's result.
    #[inline]
    pub fn end_direct(&mut self, d: Direct, result: Result<(), IoError>) -> ReqResult {
        let op = if d.write { Op::Write } else { Op::Read };
        match self.shards.get_mut(d.shard as usize) {
            Some(s) if d.backing => s.end_backing_read(result),
            Some(s) => s.end_direct(op, d.key, result),
            None => Err(ReqError::Invalid("direct request of an unknown shard")),
        }
    }

    /// The index in `shards` of the local shard serving all of `lba..+len` (inside the
    /// device and one stripe), or None.
    #[inline(always)]
    fn sole_shard(&self, lba: u64, len: u32) -> Option<usize> {
        let end = lba.checked_add(u64::from(len))?;
        if len == 0 || end > self.sb.geometry.backing_sectors {
            return None;
        }
        let g = &self.sb.geometry;
        let stripe = g.stripe_of(lba);
        if g.stripe_of(end - 1) != stripe {
            return None;
        }
        let shard = g.shard_of_stripe(stripe) as usize;
        self.local
            .get(shard)
            .copied()
            .flatten()
            .map(|li| li as usize)
    }

    /// The index a request at `lba` is looked up in (None: no local shard serves it), for
    /// the host's prefetches ([`ExtentMap::first_line`](super::index::ExtentMap::first_line),
    /// [`ExtentMap::second_line`](super::index::ExtentMap::second_line)).
    #[inline]
    pub fn index_of(&self, lba: u64) -> Option<&super::index::ExtentMap> {
        self.sole_shard(lba, 1).map(|li| self.shards[li].index())
    }

    /// Lets every shard batch what it was given and exchanges pool messages until quiet.
    pub fn poll(&mut self) {
        loop {
            self.coordinate();
            let mut grants = Vec::new();
            for i in 0..self.shards.len() {
                let s = &mut self.shards[i];
                s.poll();
                let out = s.outbox();
                self.commands.append(&mut out.commands);
                if !out.log.is_empty() {
                    self.log.append(&mut out.log);
                }
                match self.pool.as_mut() {
                    Some(pool) => {
                        for msg in out.to_pool.drain(..) {
                            grants.extend(pool.handle(msg));
                        }
                    }
                    None => self.pool_out.append(&mut out.to_pool),
                }
                std::mem::swap(&mut self.scratch, &mut out.completions);
                let mut done = std::mem::take(&mut self.scratch);
                for (id, res) in done.drain(..) {
                    self.finish_piece(id, res);
                }
                self.scratch = done;
            }
            if grants.is_empty() {
                return;
            }
            for (shard, g) in grants {
                self.grant(shard, g);
            }
        }
    }

    /// The cross-shard decisions: which epoch may be written back (no shard writes back
    /// epoch E+1 before every shard has written back and flushed epoch E), and whether
    /// space is short.
    fn coordinate(&mut self) {
        let (allowed, pressure) = match self.coordination {
            Some(c) => (c.allowed_epoch, c.pressure),
            None => (
                self.shards
                    .iter()
                    .map(Shard::frontier)
                    .min()
                    .unwrap_or(self.epoch),
                self.pool_pressure().unwrap_or(false),
            ),
        };
        for s in &mut self.shards {
            s.set_allowed_epoch(allowed);
            s.set_pressure(pressure);
        }
    }

    /// Writes back everything dirty (for detach): progress is [`Cache::dirty_bytes`].
    pub fn set_drain(&mut self, on: bool) {
        for s in &mut self.shards {
            s.set_drain(on);
        }
    }

    /// The host saw no requests for a while: write back in the meantime.
    pub fn set_idle(&mut self, idle: bool) {
        for s in &mut self.shards {
            s.set_idle(idle);
        }
    }

    /// Changes writeback pacing and `gc_percent` (0-90, persisted) at run time.
    pub fn set_writeback_options(&mut self, o: WritebackOptions) -> Result<(), ReqError> {
        if o.gc_percent > 90
            || o.low_pct > o.high_pct
            || o.max_inflight == 0
            || o.group_ksets == 0
            || o.io_timeout_ms == 0
        {
            return Err(ReqError::Invalid(
                "gc_percent must be 0-90, low <= high watermark, limits and timeout above 0",
            ));
        }
        self.gc_percent = o.gc_percent;
        for s in &mut self.shards {
            s.set_writeback_options(o);
        }
        Ok(())
    }

    /// Switches the cache mode at run time (persisted). Leaving write-back, dirty data
    /// stays readable and is written back in the background ([`Cache::dirty_bytes`]);
    /// nothing acknowledged is reordered or lost (see `shard::modes`).
    pub fn set_mode(&mut self, mode: CacheMode) {
        for s in &mut self.shards {
            s.set_mode(mode);
        }
    }

    pub fn mode(&self) -> CacheMode {
        self.shards
            .first()
            .map_or_else(CacheMode::default, Shard::mode)
    }

    /// Changes the sequential cut-off at run time (persisted).
    pub fn set_seq_cutoff(&mut self, c: SeqCutoff) -> Result<(), ReqError> {
        c.check().map_err(|_| {
            ReqError::Invalid("seq_cutoff_bytes must be a multiple of 4096, 4 KiB to 256 MiB")
        })?;
        for s in &mut self.shards {
            s.set_seq_cutoff(c);
        }
        Ok(())
    }

    pub fn seq_cutoff(&self) -> SeqCutoff {
        self.shards
            .first()
            .map_or_else(SeqCutoff::default, Shard::seq_cutoff)
    }

    /// Changes which writes a full cache takes in (at run time; persisted).
    pub fn set_write_admission(&mut self, a: WriteAdmission) {
        for s in &mut self.shards {
            s.set_write_admission(a);
        }
    }

    pub fn write_admission(&self) -> WriteAdmission {
        self.shards
            .first()
            .map_or_else(WriteAdmission::default, Shard::write_admission)
    }

    pub fn writeback_options(&self) -> WritebackOptions {
        self.shards
            .first()
            .map_or_else(WritebackOptions::default, |s| s.writeback_options())
    }

    /// The host's clock in ms (monotonic, any origin): paces retries of failed I/O and
    /// bounds how long a request may wait (see [`WritebackOptions::io_timeout_ms`]).
    pub fn set_now(&mut self, now_ms: u64) {
        for s in &mut self.shards {
            s.set_now(now_ms);
        }
    }

    /// The earliest time at which a shard has something to do without a device completion
    /// (retry a failed I/O, fail a request that waited too long). A host whose clock is
    /// simulated may jump to it when nothing else can happen.
    pub fn next_deadline(&self) -> Option<u64> {
        self.shards.iter().filter_map(Shard::next_deadline).min()
    }

    /// Some request or failed cache write is waiting for time to pass.
    pub fn waits_for_time(&self) -> bool {
        self.shards.iter().any(Shard::waits_for_time)
    }

    /// Retries failed writeback (and cache writes) now instead of after their backoff.
    pub fn retry_writeback(&mut self) {
        for s in &mut self.shards {
            s.retry_writeback();
        }
    }

    /// Dirty data not yet written back to the backing device.
    pub fn dirty_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.dirty_sectors() * 512).sum()
    }

    /// Nothing is dirty: the backing device holds every acknowledged write.
    pub fn is_clean(&self) -> bool {
        self.shards.iter().all(Shard::is_clean)
    }

    fn finish_piece(&mut self, id: ReqId, res: ReqResult) {
        let Some(p) = self.parents.get_mut(&id) else {
            self.completions.push((id, res));
            return;
        };
        p.left -= 1;
        if p.result.is_ok() {
            p.result = res;
        }
        if p.left == 0 {
            if let Some(p) = self.parents.remove(&id) {
                self.completions.push((id, p.result));
            }
        }
    }

    /// Loads the index lines that completing `dones` will change, before they are
    /// completed one by one (optional, a hint): their extents were last touched when the
    /// data was logged or copied, and a loop of loads alone overlaps their cache misses
    /// where the completions would wait for each in turn.
    pub fn warm_dones(&self, dones: &[IoDone]) {
        for d in dones {
            if let Some(s) = self.issuer_at(d.tag).and_then(|i| self.shards.get(i)) {
                s.warm_done(d.tag);
            }
        }
    }

    /// Hands a device completion to the shard that issued the command.
    pub fn complete(&mut self, done: IoDone) {
        if let Some(s) = self.issuer(done.tag) {
            s.complete(done);
        }
    }

    /// Gives back the buffer of a [`Buf::Owned`](super::io::Buf::Owned) write of command
    /// `tag` once the device has it (optional: a dropped buffer is simply freed).
    pub fn give_back(&mut self, tag: u64, buf: Vec<u8>) {
        if let Some(s) = self.issuer(tag) {
            s.give_back(buf);
        }
    }

    /// The local shard that issued command `tag` (its id is the tag's top 16 bits).
    #[inline]
    fn issuer(&mut self, tag: u64) -> Option<&mut Shard> {
        let i = self.issuer_at(tag)?;
        self.shards.get_mut(i)
    }

    /// Where [`Cache::issuer`] is in `shards`.
    #[inline]
    fn issuer_at(&self, tag: u64) -> Option<usize> {
        let li = self.local.get((tag >> 48) as usize).copied().flatten()?;
        Some(li as usize)
    }

    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    pub fn drain_commands_into(&mut self, out: &mut Vec<Command>) {
        out.append(&mut self.commands);
    }

    /// Moves finished requests into `out` (no allocation once `out` has grown).
    pub fn drain_completions_into(&mut self, out: &mut Vec<(ReqId, ReqResult)>) {
        out.append(&mut self.completions);
    }

    pub fn take_completions(&mut self) -> Vec<(ReqId, ReqResult)> {
        std::mem::take(&mut self.completions)
    }

    pub fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    /// No request or device command is outstanding.
    pub fn is_idle(&self) -> bool {
        self.parents.is_empty() && self.shards.iter().all(|s| s.is_idle())
    }

    /// Ids of the shards this cache drives.
    pub fn shard_ids(&self) -> Vec<u32> {
        (0..self.local.len() as u32)
            .filter(|&id| self.owns_shard(id))
            .collect()
    }

    pub fn stats(&self) -> CacheStats {
        let mut total = ShardStats::default();
        let mut dirty = 0;
        let mut clean = 0;
        let mut extents = 0;
        let shards: Vec<ShardStats> = self.shards.iter().map(Shard::stats).collect();
        for (s, st) in self.shards.iter().zip(&shards) {
            total.add(st);
            let (d, c, e) = s.index().usage();
            dirty += d;
            clean += c;
            extents += e as u64;
        }
        CacheStats {
            total,
            shard_ids: self.shard_ids(),
            shards,
            dirty_bytes: dirty * 512,
            clean_bytes: clean * 512,
            extents,
            segments_total: self.pool.as_ref().map_or(0, SegmentPool::total),
            segments_free: self.pool.as_ref().map_or(0, SegmentPool::free_count),
            epoch: self.epoch,
            gc_percent: self.gc_percent,
            mode: self.mode().as_str(),
            seq_cutoff_policy: self.seq_cutoff().policy.as_str(),
            seq_cutoff_bytes: self.seq_cutoff().bytes,
            write_admission: self.write_admission().as_str(),
            wb_dirty_bytes: self.dirty_bytes(),
            shard_epochs: self.shards.iter().map(Shard::epoch).collect(),
            shard_frontiers: self.shards.iter().map(Shard::frontier).collect(),
            wb_failed: self.shards.iter().any(Shard::writeback_failed),
            writeback: self
                .shards
                .iter()
                .map(|s| s.writeback_state().describe())
                .max_by_key(|s| state_rank(s))
                .unwrap_or("ok"),
            wb_failing_since_ms: self
                .shards
                .iter()
                .filter_map(|s| match s.writeback_state() {
                    WritebackState::Ok => None,
                    WritebackState::Retrying { since } | WritebackState::Failing { since } => {
                        Some(since)
                    }
                })
                .min(),
            wb_failing_for_ms: self
                .shards
                .iter()
                .filter_map(|s| match s.writeback_state() {
                    WritebackState::Ok => None,
                    WritebackState::Retrying { since } | WritebackState::Failing { since } => {
                        Some(s.now().saturating_sub(since))
                    }
                })
                .max(),
            log_failed: self.shards.iter().any(Shard::log_failed),
            poisoned: self
                .shards
                .iter()
                .flat_map(|s| s.poisoned().iter().copied())
                .collect(),
        }
    }
}
