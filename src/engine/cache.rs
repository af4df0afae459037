//! All shards of one cache driven from one thread: request splitting, segment pool
//! messages and completion assembly. Hosts without threads (the `pcache` tool, tests,
//! benchmarks) use this; the SPDK shell runs the same shards on their own threads.

use std::collections::HashMap;

use serde::Serialize;

use super::format::Superblock;
use super::geometry::Geometry;
use super::io::{Command, IoDone, Op, ReqError, ReqId, ReqResult, Request, ShardRequest};
use super::pool::SegmentPool;
use super::shard::{Shard, WritebackOptions};
use super::stats::ShardStats;

#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// Do not insert read-miss data into the cache as clean extents.
    pub no_read_fill: bool,
    /// Writeback pacing (its `gc_percent` is overridden by the value persisted at format).
    pub writeback: WritebackOptions,
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

pub struct Cache {
    sb: Superblock,
    shards: Vec<Shard>,
    pool: SegmentPool,
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
    pub shards: Vec<ShardStats>,
    pub dirty_bytes: u64,
    pub clean_bytes: u64,
    pub extents: u64,
    pub segments_total: u32,
    pub segments_free: u32,
    pub epoch: u64,
    pub gc_percent: u32,
    /// Dirty bytes still to write back.
    pub wb_dirty_bytes: u64,
    /// Current flush epoch of each shard.
    pub shard_epochs: Vec<u64>,
    /// Oldest epoch each shard has not yet written back and flushed.
    pub shard_frontiers: Vec<u64>,
    /// Writeback stopped on a backing-device error (see `retry_writeback`).
    pub wb_failed: bool,
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
        Cache {
            sb,
            shards,
            pool,
            epoch,
            gc_percent,
            opts,
            parents: HashMap::new(),
            commands: Vec::new(),
            completions: Vec::new(),
            scratch: Vec::new(),
            log: Vec::new(),
        }
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

    /// Accepts a request; its completion comes out of [`Cache::take_completions`].
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
        }
        if r.op == Op::Flush {
            // Every acknowledged write is already durable: a flush only closes the epoch.
            self.epoch += 1;
            for s in &mut self.shards {
                s.set_epoch(self.epoch);
            }
            self.completions.push((r.id, Ok(())));
            return Ok(());
        }
        let stripe = u64::from(self.sb.geometry.stripe_sectors);
        let end = r.lba + u64::from(r.len);
        let pieces = (end - 1) / stripe - r.lba / stripe + 1;
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
            let piece_end = ((lba / stripe + 1) * stripe).min(end);
            let shard = self.sb.geometry.shard_of(lba) as usize;
            self.shards[shard].submit(ShardRequest {
                id: r.id,
                op: r.op,
                lba,
                len: (piece_end - lba) as u32,
                buf_off: (lba - r.lba) * 512,
            });
            lba = piece_end;
        }
        Ok(())
    }

    /// Loads the index entry a request at `lba` will need and returns a word of it (see
    /// [`ExtentMap::touch`](super::index::ExtentMap::touch)).
    #[inline]
    pub fn touch(&self, lba: u64) -> u64 {
        if lba >= self.sb.geometry.backing_sectors {
            return 0;
        }
        let shard = self.sb.geometry.shard_of(lba) as usize;
        self.shards.get(shard).map_or(0, |s| s.index().touch(lba))
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
                for msg in out.to_pool.drain(..) {
                    grants.extend(self.pool.handle(msg));
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
                self.shards[shard as usize].grant(g);
            }
        }
    }

    /// The cross-shard decisions: which epoch may be written back (no shard writes back
    /// epoch E+1 before every shard has written back and flushed epoch E), and whether
    /// space is short.
    fn coordinate(&mut self) {
        let allowed = self
            .shards
            .iter()
            .map(Shard::frontier)
            .min()
            .unwrap_or(self.epoch);
        let total = u64::from(self.pool.total());
        let used = total - u64::from(self.pool.free_count());
        let pressure = self.pool.waiting() > 0 || used * 100 > total * u64::from(self.gc_percent);
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
        if o.gc_percent > 90 || o.low_pct > o.high_pct || o.max_inflight == 0 || o.group_ksets == 0
        {
            return Err(ReqError::Invalid(
                "gc_percent must be 0-90, low <= high watermark, limits above 0",
            ));
        }
        self.gc_percent = o.gc_percent;
        for s in &mut self.shards {
            s.set_writeback_options(o);
        }
        Ok(())
    }

    pub fn writeback_options(&self) -> WritebackOptions {
        self.shards
            .first()
            .map_or_else(WritebackOptions::default, |s| s.writeback_options())
    }

    /// Resumes writeback stopped by a backing-device error.
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

    /// Hands a device completion to the shard that issued the command.
    pub fn complete(&mut self, done: IoDone) {
        let shard = (done.tag >> 48) as usize;
        if let Some(s) = self.shards.get_mut(shard) {
            s.complete(done);
        }
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

    pub fn stats(&self) -> CacheStats {
        let mut total = ShardStats::default();
        let mut dirty = 0;
        let mut clean = 0;
        let mut extents = 0;
        for s in &self.shards {
            total.add(&s.stats);
            let (d, c, e) = s.index().usage();
            dirty += d;
            clean += c;
            extents += e as u64;
        }
        CacheStats {
            total,
            shards: self.shards.iter().map(|s| s.stats).collect(),
            dirty_bytes: dirty * 512,
            clean_bytes: clean * 512,
            extents,
            segments_total: self.pool.total(),
            segments_free: self.pool.free_count(),
            epoch: self.epoch,
            gc_percent: self.gc_percent,
            wb_dirty_bytes: self.dirty_bytes(),
            shard_epochs: self.shards.iter().map(Shard::epoch).collect(),
            shard_frontiers: self.shards.iter().map(Shard::frontier).collect(),
            wb_failed: self.shards.iter().any(Shard::writeback_failed),
        }
    }
}
