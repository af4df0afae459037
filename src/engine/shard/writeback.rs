//! Writeback and garbage collection of one shard.
//!
//! Writeback walks the log from the dirty tail in order, in groups of ksets. For each dirty
//! key it writes back only what the index still maps to that key (a later overwrite in
//! the log absorbs the earlier one), with a bounded number of copies in flight. When a
//! group's copies are done it flushes the backing device, then persists the new dirty tail
//! in the control slot. Keys of epoch E+1 are never written back before every shard has
//! written back and flushed epoch E: the coordinator hands each shard the highest epoch it
//! may write (`set_allowed_epoch`), the minimum of every shard's `frontier`.
//!
//! GC reclaims the oldest segment of the log once every kset in it is behind the dirty
//! tail: its clean extents leave the index, the log tail moves to the next segment in the
//! control slot, and the segment returns to the pool when no read still uses it.

use std::collections::{BTreeMap, VecDeque};

use super::ranges::{GroupRanges, InFlight};
use super::retry::Backoff;
use super::{Shard, TagOwner};
use crate::engine::format::{ControlSlot, KeyKind, LogPos, LogTail, MAX_POISON};
use crate::engine::index::{Reclaim, Rescue, State};
use crate::engine::io::{Buf, Command, Dev, IoError, Verify};
use crate::engine::pool::ToPool;

/// Reads of one copy whose data fails its CRC before its range is poisoned (a corrupted
/// transfer may read right the next time).
const CRC_READ_ATTEMPTS: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackOptions {
    /// Backing writes in flight per shard. Deeper than an application's usual QD32: a
    /// group ends with a flush and the pipeline drains there, so with 32 a slow (100 us)
    /// backing device absorbed sustained writes at only ~0.6-0.75x its own QD32 rate; with
    /// 64 at ~1.2x.
    pub max_inflight: u32,
    /// Ksets per writeback group (one backing flush and one control write per group).
    pub group_ksets: usize,
    /// Writeback starts when dirty data passes this share of the shard's cache space
    /// (defaults like dm-writecache's watermarks)...
    pub high_pct: u32,
    /// ...and stops below this one (unless space is short, the cache is idle, or draining).
    pub low_pct: u32,
    /// Writeback keeps `100 - gc_percent` of the cache as headroom for writes: free space
    /// plus segments holding no dirty data; GC keeps a small reserve free (see `GcSpace`).
    pub gc_percent: u32,
    /// A request that cannot make progress (no cache space, the log unwritable) fails
    /// after waiting this long; writeback failing this long is reported as failing, and
    /// the cache device failing every write this long closes the log.
    pub io_timeout_ms: u64,
}

/// Default [`WritebackOptions::io_timeout_ms`]: SCSI's and NVMe's usual command timeout.
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;

/// How writeback is doing, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritebackState {
    Ok,
    /// Failing since this host time (ms); retried with backoff.
    Retrying {
        since: u64,
    },
    /// Failing for longer than the I/O timeout, since this host time; still retried.
    Failing {
        since: u64,
    },
}

impl WritebackState {
    pub fn describe(&self) -> &'static str {
        match self {
            WritebackState::Ok => "ok",
            WritebackState::Retrying { .. } => "retrying",
            WritebackState::Failing { .. } => "failing",
        }
    }
}

impl Default for WritebackOptions {
    fn default() -> Self {
        WritebackOptions {
            max_inflight: 64,
            group_ksets: 64,
            high_pct: 50,
            low_pct: 40,
            gc_percent: 70,
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
        }
    }
}

/// Listed ranges a reclaim visits per step (a 1 MiB segment of 4 KiB blocks lists about
/// 256; a step of 32 takes about 8 us of the 70 a segment takes at once).
const RECLAIM_STEP_RANGES: usize = 32;

/// A segment GC is reclaiming (`Shard::reclaim_next`).
#[derive(Debug)]
pub(super) struct Reclaiming {
    seg: u32,
    /// None: its extents are not listed; the reclaim walks the map in one step.
    r: Option<Reclaim>,
    rescue: Rescue,
    /// What the rescue could keep at the start, to charge the credit what it kept.
    budget: u64,
}

/// When GC reclaims and when writeback must run regardless, from the space of the log.
///
/// The space kept for writes is *headroom*: free space plus the log's segments that hold
/// no dirty data (writeback passes those without a backing write, and GC then frees them
/// with a control write, as fast as writes take space). Writeback keeps the headroom at
/// `100 - gc_percent` of the cache: while it is short, writeback runs regardless of its
/// watermarks, so the dirty span of the log stays within `gc_percent`. GC reclaims only
/// while free space is under a small reserve (two segments per shard or 2 % of the cache
/// up to 1 GiB, at most the headroom), so the clean part of the headroom keeps serving reads until
/// writes need it: a fixed `100 - gc_percent` of free space held no data at all (a
/// mostly-read cache lost hit ratio to it).
/// The most the share-of-the-cache part of GC's reserve takes: 1 GiB, in sectors (a
/// second of writes at 1 GB/s; freeing a segment takes a control write and the last
/// reclaim's copies, well under that).
const MAX_SHARE_RESERVE: u64 = (1 << 30) / 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GcSpace {
    total: u64,
    headroom: u64,
    reserve: u64,
}

impl GcSpace {
    /// The reserve for `g`, before it is bounded by the headroom: what writes land in while
    /// GC frees the next segment. That takes as long on a large cache as on a small one, so
    /// the fiftieth of the cache stops at [`MAX_SHARE_RESERVE`] (a 1 TiB cache does not
    /// hold 20 GiB empty). Not more: each percent held empty is hit ratio lost (a twentieth
    /// cost a θ 0.8 zipfian read workload about a point against a fiftieth).
    pub(crate) fn reserve(g: &crate::engine::geometry::Geometry) -> u64 {
        let seg = u64::from(g.segment_sectors);
        let total = u64::from(g.segment_count) * seg;
        (2 * u64::from(g.shard_count) * seg).max((total / 50).min(MAX_SHARE_RESERVE))
    }

    pub(crate) fn new(g: &crate::engine::geometry::Geometry, gc_percent: u32) -> Self {
        let total = u64::from(g.segment_count) * u64::from(g.segment_sectors);
        let headroom = total * u64::from(100 - gc_percent.min(100)) / 100;
        GcSpace {
            total,
            headroom,
            reserve: Self::reserve(g).min(headroom),
        }
    }

    /// GC reclaims while the log uses more than this many sectors.
    pub(crate) fn limit(&self) -> u64 {
        self.total - self.reserve
    }

    /// Whether writes are short of headroom with the log using `used` sectors, of which
    /// `reclaimable` hold no dirty data: writeback must run.
    pub(crate) fn short(&self, used: u64, reclaimable: u64) -> bool {
        self.total.saturating_sub(used) + reclaimable < self.headroom || used > self.limit()
    }
}

/// The first kset in `log` with a dirty key: its sequence number and that key's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DirtyFront {
    pub seq: u64,
    pub epoch: u64,
}

/// Where the first dirty key in `log` is, if any.
pub(super) fn first_dirty(log: &VecDeque<Logged>) -> Option<DirtyFront> {
    log.iter().find_map(|k| {
        k.keys.first().map(|d| DirtyFront {
            seq: k.seq,
            epoch: d.epoch,
        })
    })
}

/// A durable kset at or after the dirty tail, with the keys writeback needs.
#[derive(Debug, Clone)]
pub struct Logged {
    pub seq: u64,
    pub next: LogPos,
    pub crc: u32,
    pub keys: Vec<DirtyKey>,
}

#[derive(Debug, Clone, Copy)]
pub struct DirtyKey {
    pub lba: u64,
    pub len: u32,
    pub kind: KeyKind,
    /// Absolute cache sector of the data (data keys).
    pub pos: u64,
    pub epoch: u64,
    /// CRC32C of the key's whole data, when the cache keeps data CRCs.
    pub crc: Option<u32>,
    /// Written through: the backing device already has it (writeback only flushes).
    pub through: bool,
}

/// A segment of the log and how its first kset chains.
#[derive(Debug, Clone, Copy)]
pub struct SegRec {
    pub seg: u32,
    pub gen: u32,
    pub first: LogTail,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum WbIo {
    Copy {
        lba: u64,
        len: u32,
        src: u64,
        /// The whole key's data and CRC, checked before anything is written back.
        verify: Option<Verify>,
        /// Reads that failed the CRC so far.
        crc_fails: u8,
    },
    Zero {
        lba: u64,
        len: u32,
        unmap: bool,
        epoch: u32,
        /// The kset that logged the key: what the index keeps of it is dropped once it is
        /// written back, and nothing newer.
        seq: u64,
    },
}

impl WbIo {
    /// The backing range it writes.
    fn range(&self) -> (u64, u32) {
        match *self {
            WbIo::Copy { lba, len, .. } | WbIo::Zero { lba, len, .. } => (lba, len),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Io,
    Flush,
    Persist,
}

#[derive(Debug)]
struct Group {
    /// Whole ksets written back: the dirty tail moves past them.
    ksets: usize,
    /// Leading keys of the next kset also written back (a kset can straddle a flush, so
    /// its keys of the allowed epoch go first and the rest wait for the barrier).
    partial: usize,
    /// It ends with a backing flush: it copied something there, or holds written-through
    /// keys (durable on the backing device only once a flush is).
    flushes: bool,
    phase: Phase,
    new_dirty_tail: LogTail,
    sectors: u64,
    /// An I/O of the group failed: once the rest is in, it starts over (after backoff).
    failed: bool,
}

#[derive(Debug, Default)]
pub(super) struct Writeback {
    queue: VecDeque<WbIo>,
    inflight: u32,
    /// Ranges queued or in flight: no in-place overwrite may touch them.
    ranges: InFlight,
    /// Every range the current group writes (kept when it fails, until it is redone and
    /// done): a group that starts over writes them again, so no write may go to the
    /// backing device there meanwhile.
    pub group_ranges: GroupRanges,
    /// Keys written to the backing device that replay would still find dirty (after the
    /// durable dirty tail): the leading keys of a kset a group wrote back (the dirty tail
    /// cannot point inside a kset), and written-through keys; by kset sequence, dropped once
    /// the dirty tail passes them. Nothing may be sent around the cache there meanwhile:
    /// after a crash, writeback would copy them again over it.
    pub replay_dirty: BTreeMap<u64, Vec<(u64, u32)>>,
    group: Option<Group>,
    /// Failures of writeback I/O: retried with backoff, resumed on the first success.
    pub backoff: Backoff,
    active: bool,
    pub drain: bool,
    /// Scratch of `start_group`, kept so that a group allocates nothing.
    coverage: Coverage,
    pieces: Vec<(u64, u32)>,
    ios: Vec<WbIo>,
    /// The group's keys' ranges, sorted: whether any two overlap.
    spans: Vec<(u64, u32)>,
}

/// Disjoint sector ranges sorted by start: what the later keys of a writeback group
/// cover. Built only for a group in which two keys overlap (`Shard::start_group`): its
/// inserts shift the vector, O(keys) each.
#[derive(Debug, Default)]
struct Coverage(Vec<(u64, u64)>);

impl Coverage {
    fn clear(&mut self) {
        self.0.clear();
    }

    /// Appends to `out`, in order, the pieces of `lba..+len` that no range covers.
    fn uncovered(&self, lba: u64, len: u32, out: &mut Vec<(u64, u32)>) {
        let end = lba + u64::from(len);
        let mut at = lba;
        let first = self.0.partition_point(|&(_, e)| e <= lba);
        for &(s, e) in &self.0[first..] {
            if s >= end {
                break;
            }
            if s > at {
                out.push((at, (s - at) as u32));
            }
            at = at.max(e);
            if at >= end {
                return;
            }
        }
        if at < end {
            out.push((at, (end - at) as u32));
        }
    }

    /// Adds `lba..+len`, merged with the ranges it overlaps or touches.
    fn insert(&mut self, lba: u64, len: u32) {
        let (mut s, mut e) = (lba, lba + u64::from(len));
        let first = self.0.partition_point(|&(_, re)| re < s);
        let mut last = first;
        while let Some(&(rs, re)) = self.0.get(last).filter(|&&(rs, _)| rs <= e) {
            s = s.min(rs);
            e = e.max(re);
            last += 1;
        }
        if first == last {
            self.0.insert(first, (s, e));
        } else {
            self.0[first] = (s, e);
            self.0.drain(first + 1..last);
        }
    }
}

impl Writeback {
    pub fn replay_dirty_overlaps(&self, lba: u64, len: u32) -> bool {
        let end = lba + u64::from(len);
        self.replay_dirty
            .values()
            .flatten()
            .any(|&(s, l)| s < end && s + u64::from(l) > lba)
    }

    /// Whether [lba, lba+len) overlaps data being written back.
    #[inline]
    pub fn blocks(&self, lba: u64, len: u32) -> bool {
        self.ranges.overlaps(lba, len)
    }
}

/// Control-slot state of a shard: which replica is current and what is being written.
#[derive(Debug, Default)]
pub(super) struct Control {
    pub seq: u64,
    pub slot: u32,
    pub inflight: Option<(LogTail, LogTail)>,
    /// GC wants the tail moved here, freeing this segment.
    pub want_tail: Option<(LogTail, u32)>,
    /// Segments reclaimed, waiting for reads that still use them.
    pub releasing: Vec<u32>,
    /// An option stored in the slot changed: write it even if no tail moved.
    pub rewrite: bool,
}

impl Shard {
    /// One line of internal state, for diagnosing a stuck shard.
    pub fn debug_state(&self) -> String {
        format!(
            "shard {}: admission {} B evicting {} segs {:?} ready {} preparing {} wanted {} pending {} batches {} moves {} log {} \
             dirty_tail {:?} tail {:?} group {:?} queue {} inflight {} wb {:?} stalled {} \
             pressure {} allowed {} frontier {} want_tail {:?} releasing {:?} control_inflight {} \
             reads {} tags {} retry_data {:?} meta {:?} now {} failed {} batch_states {:?}",
            self.cfg.id,
            self.admission.bytes(),
            self.admission.evicting(),
            self.segments
                .iter()
                .map(|s| (s.seg, s.first.seq))
                .collect::<Vec<_>>(),
            self.ready.len(),
            self.preparing,
            self.wanted,
            self.pending.len(),
            self.batches.len(),
            self.moves.len(),
            self.log.len(),
            self.dirty_tail.seq,
            self.tail.seq,
            self.wb.group.as_ref().map(|g| (g.ksets, g.phase)),
            self.wb.queue.len(),
            self.wb.inflight,
            self.wb.backoff,
            self.stalled,
            self.pressure,
            self.allowed_epoch,
            self.frontier(),
            self.control.want_tail.map(|t| (t.0.seq, t.1)),
            self.control.releasing,
            self.control.inflight.is_some(),
            self.reads.len(),
            self.tags.len(),
            self.retry_data,
            self.meta,
            self.now,
            self.failed,
            self.batches
                .iter()
                .map(|b| (b.seq, b.state, b.data_pending))
                .collect::<Vec<_>>(),
        )
    }

    /// Lowest epoch with data this shard has not yet written back and flushed.
    pub fn frontier(&self) -> u64 {
        // Epochs never decrease along the log, then the batches, then the queue: the first
        // non-fill key found is the oldest.
        debug_assert_eq!(self.log_front, first_dirty(&self.log));
        if let Some(f) = self.log_front {
            return f.epoch;
        }
        for b in &self.batches {
            if let Some(e) = b.entries.iter().find(|e| !e.p.op.is_clean()) {
                return e.p.epoch;
            }
        }
        self.pending
            .iter()
            .find(|p| !p.op.is_clean())
            .map_or(self.epoch, |p| p.epoch)
    }

    /// The highest epoch this shard may write back (from the coordinator).
    pub fn set_allowed_epoch(&mut self, epoch: u64) {
        self.allowed_epoch = epoch;
    }

    /// Space is short somewhere: write back and reclaim regardless of watermarks.
    pub fn set_pressure(&mut self, on: bool) {
        self.pressure = on;
    }

    /// The host saw no requests for a while: use the time to write back.
    pub fn set_idle(&mut self, idle: bool) {
        self.idle = idle;
    }

    /// Write back everything (for detach/delete).
    pub fn set_drain(&mut self, on: bool) {
        self.wb.drain = on;
    }

    /// Changes writeback pacing and GC at run time. A new `gc_percent` is persisted in the
    /// control slot (it survives restarts).
    pub fn set_writeback_options(&mut self, o: WritebackOptions) {
        if o.gc_percent != self.cfg.wb.gc_percent {
            self.control.rewrite = true;
        }
        self.cfg.wb = o;
    }

    pub fn writeback_options(&self) -> WritebackOptions {
        self.cfg.wb
    }

    /// Retries failed writeback at once instead of after its backoff (an operator asked).
    pub fn retry_writeback(&mut self) {
        self.wb.backoff.expedite();
        self.meta.expedite();
    }

    /// Writeback has been failing for longer than the I/O timeout.
    pub fn writeback_failed(&self) -> bool {
        matches!(self.writeback_state(), WritebackState::Failing { .. })
    }

    pub fn writeback_state(&self) -> WritebackState {
        match self.wb.backoff.since() {
            None => WritebackState::Ok,
            Some(since)
                if self
                    .wb
                    .backoff
                    .outlasted(self.now, self.cfg.wb.io_timeout_ms) =>
            {
                WritebackState::Failing { since }
            }
            Some(since) => WritebackState::Retrying { since },
        }
    }

    /// When failed writeback is next retried, while it waits to be.
    pub(super) fn writeback_due(&self) -> Option<u64> {
        self.wb
            .backoff
            .due(self.now)
            .filter(|_| !self.log.is_empty() && self.wb.group.is_none())
    }

    /// Ranges whose data failed its CRC in writeback (they read as errors until rewritten).
    pub fn poisoned(&self) -> &[(u64, u32)] {
        &self.poison
    }

    /// Dirty data not yet written back, in sectors.
    pub fn dirty_sectors(&self) -> u64 {
        self.log_dirty_sectors
    }

    /// Nothing dirty: no logged, batched or queued write.
    pub fn is_clean(&self) -> bool {
        self.log_front.is_none() && self.frontier_is_idle()
    }

    fn frontier_is_idle(&self) -> bool {
        self.batches.is_empty() && self.pending.is_empty()
    }

    fn writeback_wanted(&mut self) -> bool {
        if !self.wb.backoff.ready(self.now) || self.log.is_empty() {
            return false;
        }
        if self.wb.drain || self.stalled || self.pressure || self.idle || self.headroom_short() {
            return true;
        }
        if self.cfg.mode != crate::engine::mode::CacheMode::WriteBack
            || !self.through_wait.is_empty()
        {
            // Outside write-back, dirty data is written back as soon as it is logged.
            return true;
        }
        // Compare dirty * 100 against pct * share without dividing on every poll.
        let g = &self.cfg.geo;
        let share = u64::from(g.segment_count) * u64::from(g.segment_sectors);
        let dirty = self.log_dirty_sectors * 100 * u64::from(g.shard_count);
        let o = self.cfg.wb;
        self.wb.active = if self.wb.active {
            dirty > u64::from(o.low_pct) * share
        } else {
            dirty >= u64::from(o.high_pct) * share
        };
        self.wb.active
    }

    pub(super) fn writeback_poll(&mut self) {
        if self.wb.group.is_none() && self.writeback_wanted() {
            self.start_group();
        }
        let failed = self.wb.group.as_ref().is_some_and(|g| g.failed);
        while self.wb.inflight < self.cfg.wb.max_inflight && !failed {
            let Some(io) = self.wb.queue.pop_front() else {
                break;
            };
            self.issue_wb(io);
        }
        self.advance_group();
        self.gc_poll();
        self.persist_control();
    }

    /// Queues the writeback of the longest prefix of the log (up to `group_ksets`) whose
    /// keys all belong to epochs the coordinator allows.
    fn start_group(&mut self) {
        let allowed = self.allowed_epoch;
        let n = self
            .log
            .iter()
            .take(self.cfg.wb.group_ksets)
            .take_while(|k| k.keys.iter().all(|d| d.epoch <= allowed))
            .count();
        let partial = match self.log.get(n) {
            Some(k) if n < self.cfg.wb.group_ksets => {
                k.keys.iter().take_while(|d| d.epoch <= allowed).count()
            }
            _ => 0,
        };
        if n == 0 && partial == 0 {
            return;
        }
        // Every key of a group belongs to the allowed epoch (the shard's frontier). Within
        // an epoch a later key absorbs an earlier one; across epochs it must not (the
        // backing device has to pass through this epoch's image). Coverage is taken from
        // later keys of the group only: writing an older value of the same epoch that a
        // later group overwrites is legal, and keeps the cost per group O(group).
        // Uncovered pieces are copied from the key's own data, which stays in place until
        // the dirty tail passes it.
        let mut coverage = std::mem::take(&mut self.wb.coverage);
        let mut pieces = std::mem::take(&mut self.wb.pieces);
        let mut ios = std::mem::take(&mut self.wb.ios);
        let mut spans = std::mem::take(&mut self.wb.spans);
        coverage.clear();
        ios.clear();
        let mut sectors = 0u64;
        let mut through = false;
        let group_keys = self.log.iter().enumerate().take(n + 1).flat_map(|(i, k)| {
            let keys = k.keys.iter().take(if i < n { usize::MAX } else { partial });
            keys.map(move |d| (k.seq, d))
        });
        // Where no two keys of the group overlap (random writes: nearly always), each is
        // copied whole and nothing needs the coverage, whose inserts into a sorted vector
        // cost O(keys) each.
        spans.clear();
        spans.extend(group_keys.clone().map(|(_, k)| (k.lba, k.len)));
        spans.sort_unstable_by_key(|&(s, _)| s);
        let disjoint = spans
            .windows(2)
            .all(|w| w[0].0 + u64::from(w[0].1) <= w[1].0);
        for (seq, k) in group_keys.rev() {
            sectors += u64::from(k.len);
            if k.through {
                // Already on the backing device, but durable there only once the group's
                // flush is (its own may have failed, or not been asked for); it still
                // covers what earlier keys of the group wrote.
                through = true;
                if !disjoint {
                    coverage.insert(k.lba, k.len);
                }
                continue;
            }
            pieces.clear();
            if disjoint {
                pieces.push((k.lba, k.len));
            } else {
                coverage.uncovered(k.lba, k.len, &mut pieces);
            }
            for &(lba, len) in pieces.iter() {
                ios.push(match k.kind {
                    KeyKind::Data => WbIo::Copy {
                        lba,
                        len,
                        src: k.pos + (lba - k.lba),
                        verify: k.crc.map(|crc| Verify {
                            sector: k.pos,
                            sectors: u64::from(k.len),
                            crc,
                        }),
                        crc_fails: 0,
                    },
                    KeyKind::Zeroes | KeyKind::Unmap => WbIo::Zero {
                        lba,
                        len,
                        unmap: k.kind == KeyKind::Unmap,
                        epoch: k.epoch as u32,
                        seq,
                    },
                });
            }
            if !disjoint {
                coverage.insert(k.lba, k.len);
            }
        }
        self.wb.coverage = coverage;
        self.wb.pieces = pieces;
        // The copies' ranges (disjoint: each piece is what later keys left uncovered).
        if disjoint && !through {
            self.wb.ranges.fill(spans.iter().copied());
        } else {
            self.wb.ranges.fill(ios.iter().map(WbIo::range));
        }
        self.wb.spans = spans;
        let landing = self
            .inplace
            .iter()
            .chain(self.fwd_ranges.iter())
            .any(|&(s, l)| self.wb.ranges.overlaps(s, l));
        if landing {
            // An in-place overwrite, or a write to the backing device, is landing in this
            // range: start once it has.
            self.wb.ranges.clear();
            self.wb.ios = ios;
            return;
        }
        self.wb.group_ranges.extend(self.wb.ranges.iter());
        // Issue in log order.
        self.wb.queue.extend(ios.drain(..).rev());
        self.wb.ios = ios;
        let new_dirty_tail = match n.checked_sub(1).map(|i| &self.log[i]) {
            Some(last) => LogTail {
                pos: last.next,
                seq: last.seq + 1,
                prev_crc: last.crc,
            },
            None => self.dirty_tail,
        };
        self.wb.group = Some(Group {
            ksets: n,
            partial,
            // A group of written-through keys alone flushes too: the dirty tail must not
            // pass data the backing device may still lose.
            flushes: through || !self.wb.queue.is_empty(),
            phase: Phase::Io,
            new_dirty_tail,
            sectors,
            failed: false,
        });
        self.stats.wb_groups += 1;
    }

    fn issue_wb(&mut self, io: WbIo) {
        self.wb.inflight += 1;
        let tag = self.tag(TagOwner::Wb(io));
        let cmd = match io {
            WbIo::Copy {
                lba,
                len,
                src,
                verify,
                ..
            } => Command::Copy {
                tag,
                src: Dev::Cache,
                src_sector: src,
                dst: Dev::Backing,
                dst_sector: lba,
                sectors: u64::from(len),
                verify,
            },
            WbIo::Zero {
                lba,
                len,
                unmap: true,
                ..
            } => Command::Unmap {
                tag,
                dev: Dev::Backing,
                sector: lba,
                sectors: u64::from(len),
            },
            WbIo::Zero { lba, len, .. } => Command::WriteZeroes {
                tag,
                dev: Dev::Backing,
                sector: lba,
                sectors: u64::from(len),
            },
        };
        self.out.commands.push(cmd);
    }

    pub(super) fn wb_done(&mut self, io: WbIo, result: Result<(), IoError>) {
        self.wb.inflight -= 1;
        let (lba, len) = io.range();
        match (io, result) {
            (_, Ok(())) => {}
            (
                WbIo::Copy {
                    src,
                    verify,
                    crc_fails,
                    ..
                },
                Err(IoError::CrcMismatch),
            ) => {
                self.stats.wb_crc_errors += 1;
                if crc_fails + 1 < CRC_READ_ATTEMPTS {
                    // Read it again: the range stays reserved for this copy.
                    self.wb.queue.push_front(WbIo::Copy {
                        lba,
                        len,
                        src,
                        verify,
                        crc_fails: crc_fails + 1,
                    });
                    return;
                }
                self.wb.ranges.remove(lba);
                self.poison_copy(lba, len, src);
                return;
            }
            (WbIo::Copy { src, .. }, Err(IoError::Source)) => {
                self.wb.ranges.remove(lba);
                self.stats.wb_cache_read_errors += 1;
                self.fail_writeback(format!(
                    "cache read of lba {lba}+{len} (cache sector {src}) failed"
                ));
                return;
            }
            (WbIo::Zero { unmap, .. }, Err(_)) => {
                self.wb.ranges.remove(lba);
                self.stats.wb_backing_write_errors += 1;
                let what = if unmap { "unmap" } else { "write-zeroes" };
                self.fail_writeback(format!("backing {what} of lba {lba}+{len} failed"));
                return;
            }
            (WbIo::Copy { .. }, Err(_)) => {
                self.wb.ranges.remove(lba);
                self.stats.wb_backing_write_errors += 1;
                self.fail_writeback(format!("backing write of lba {lba}+{len} failed"));
                return;
            }
        }
        self.wb.ranges.remove(lba);
        self.stats.wb_sectors += u64::from(len);
        match io {
            WbIo::Copy { lba, len, src, .. } => self.index.mark_clean(lba, len, src),
            WbIo::Zero {
                lba,
                len,
                unmap,
                epoch,
                seq,
            } => {
                let state = if unmap {
                    State::Unmapped
                } else {
                    State::Zeroes
                };
                self.index.punch_state(lba, len, state, epoch, seq);
            }
        }
    }

    /// A copy's data failed its CRC on every read: what the index still maps to it is
    /// poisoned (reads fail until rewritten) and nothing is written back, so the backing
    /// device keeps its older contents. The range is persisted in the control slot with
    /// the dirty tail that passes it.
    fn poison_copy(&mut self, lba: u64, len: u32, src: u64) {
        let ranges = self.index.poison(lba, len, src);
        let mut list = self.poison.clone();
        for &(l, n) in &ranges {
            super::trim_ranges(&mut list, l, n);
            list.push((l, n));
        }
        if list.len() > MAX_POISON {
            // Cannot be recorded: the dirty tail must not pass it. The group starts over
            // (and fails here again) until a write replaces the range.
            self.fail_writeback(format!(
                "data of lba {lba}+{len} (cache sector {src}) failed its CRC, and the control \
                 slot holds no more poisoned ranges"
            ));
            return;
        }
        self.poison = list;
        self.stats.poisoned_extents += ranges.len() as u64;
        self.out.log.push(format!(
            "shard {}: dirty data of lba {lba}+{len} (cache sector {src}) failed its CRC \
             {CRC_READ_ATTEMPTS} times; not written back (the backing device keeps its older \
             data); the range reads as an I/O error until it is rewritten",
            self.cfg.id
        ));
    }

    fn fail_writeback(&mut self, what: String) {
        if self.wb.backoff.fail(self.now) {
            self.out.log.push(format!(
                "shard {}: writeback failed: {what}; dirty data stays in the cache, retrying",
                self.cfg.id
            ));
        }
        self.stats.wb_errors += 1;
        if let Some(g) = self.wb.group.as_mut() {
            g.failed = true;
        }
    }

    /// Moves the current group on: copies done → backing flush → persist the dirty tail.
    fn advance_group(&mut self) {
        let Some(g) = self.wb.group.as_mut() else {
            return;
        };
        if g.phase != Phase::Io || self.wb.inflight > 0 {
            return;
        }
        if g.failed {
            // Start over from the same dirty tail once the backoff allows.
            self.wb.queue.clear();
            self.wb.ranges.clear();
            self.wb.group = None;
            return;
        }
        if !self.wb.queue.is_empty() {
            return;
        }
        if g.flushes {
            g.phase = Phase::Flush;
            let tag = self.tag(TagOwner::WbFlush);
            self.out.commands.push(Command::Flush {
                tag,
                dev: Dev::Backing,
            });
            self.stats.backing_flushes += 1;
        } else {
            g.phase = Phase::Persist;
            self.maybe_finish_group();
        }
    }

    pub(super) fn wb_flush_done(&mut self, result: Result<(), IoError>) {
        let Some(g) = self.wb.group.as_mut() else {
            return;
        };
        if result.is_err() {
            self.wb.group = None;
            self.stats.wb_backing_flush_errors += 1;
            self.fail_writeback("backing flush failed".into());
            return;
        }
        g.phase = Phase::Persist;
        self.maybe_finish_group();
    }

    /// Reclaims the oldest log segment once all of it is behind the dirty tail.
    fn gc_poll(&mut self) {
        if !self.control.releasing.is_empty() {
            self.release_segments();
        }
        if self.control.want_tail.is_some() || self.segments.len() < 2 {
            return;
        }
        self.gc_check();
    }

    fn release_segments(&mut self) {
        let mut reads = std::mem::take(&mut self.control.releasing);
        reads.retain(|&seg| {
            if self.reads_per_seg.get(seg as usize).copied().unwrap_or(0) == 0 {
                self.out.to_pool.push(ToPool::Release { seg });
                self.stats.gc_segments += 1;
                false
            } else {
                true
            }
        });
        self.control.releasing = reads;
    }

    /// The most GC may copy in a burst of reclaims (see `gc_check`): an eighth of the
    /// shard's share of segments, at least two.
    pub(super) fn max_move_credit(&self) -> u64 {
        let g = &self.cfg.geo;
        let share = u64::from(g.segment_count / g.shard_count.max(1));
        (share / 8).max(2) * u64::from(g.segment_sectors)
    }

    /// Whether this shard's log leaves writes short of headroom (`GcSpace::short`), its
    /// share scaled to the whole cache.
    fn headroom_short(&self) -> bool {
        let g = &self.cfg.geo;
        let reclaimable = self.reclaimable_sectors() * u64::from(g.shard_count);
        GcSpace::new(g, self.cfg.wb.gc_percent).short(self.log_sectors_scaled(), reclaimable)
    }

    /// Sectors of this shard's log, scaled to the whole cache (shards share the pool
    /// evenly): what `GcSpace` compares with its thresholds.
    fn log_sectors_scaled(&self) -> u64 {
        self.segments_scaled(self.segments.len())
    }

    /// `n` segments of this shard, in sectors scaled to the whole cache.
    fn segments_scaled(&self, n: usize) -> u64 {
        let g = &self.cfg.geo;
        n as u64 * u64::from(g.segment_sectors) * u64::from(g.shard_count)
    }

    /// Sectors of this shard's log in segments that hold no dirty data: GC reclaims them
    /// as soon as writeback has passed them, which for keys of clean data only is a
    /// control write (under read misses the dirty tail lags over fills until space is
    /// short).
    pub fn reclaimable_sectors(&self) -> u64 {
        // Segments are in log order; those whose successor starts at or before the first
        // dirty kset hold none of it. The head segment is never reclaimable.
        let clean = match self.log_front {
            Some(f) => self.segments.partition_point(|s| s.first.seq <= f.seq),
            None => self.segments.len(),
        };
        clean.saturating_sub(1) as u64 * u64::from(self.cfg.geo.segment_sectors)
    }

    /// Sectors this shard holds, scaled to the whole cache: its log and the segments it
    /// keeps ready ahead of its head (granted, not yet linked), which no other shard can
    /// use either. What GC compares with its limit: counting the log alone, no shard of
    /// a cache of several ever crossed it (each holds two segments ready, and two shards'
    /// ready segments are the whole reserve), so GC ran only in bursts of pool pressure
    /// that left a tenth of the cache free.
    fn held_sectors_scaled(&self) -> u64 {
        self.segments_scaled(self.segments.len() + self.ready.len() + self.preparing as usize)
    }

    fn gc_check(&mut self) {
        if self.reclaim.is_some() {
            return self.reclaim_next();
        }
        let used = self.held_sectors_scaled();
        let space = GcSpace::new(&self.cfg.geo, self.cfg.wb.gc_percent);
        if self.admission.evicting() && used * 2 < space.limit() {
            // The log shrank to under half of GC's threshold (a discard, a smaller working
            // set): fills have room again without evicting.
            self.admission.set_evicting(false);
        }
        let over = used > space.limit();
        // A shard waiting for a segment it has asked the pool for is not short of space
        // (if the pool is, `pressure` says so): reclaiming its own then only empties the
        // cache, without second chances.
        let starved = self.stalled && self.preparing + self.wanted == 0;
        if !(over || self.pressure || starved) {
            return;
        }
        // A stalled log reclaims even so: its writes come first, the moves wait behind them.
        if !self.moves.is_empty() && !self.stalled {
            // The last reclaim's second chances are still being logged (a few at a time):
            // its segment frees only once they are, and reclaiming more meanwhile would
            // only shrink the log.
            return;
        }
        let second = self.segments[1].first;
        if second.seq > self.dirty_tail.seq {
            return;
        }
        let seg = self.segments[0].seg;
        let g = &self.cfg.geo;
        let lo = g.segment_start(seg);
        // Second chance: clean extents read since they were logged or last moved (their
        // heat) move to the log head (as clean keys, heat less one) instead of leaving
        // the cache, the hottest first when not all fit. Heat ages: an extent not read
        // again leaves after as many passes of the log as it had heat. Copies are paid
        // from a credit that each reclaim raises by three quarters of a segment (up to an
        // eighth of the shard's segments): a hot run of segments may be kept whole, but
        // over a long run of reclaims GC copies at most three quarters of what it
        // reclaims, so it gains space however hot the data is. Nothing moves while writes
        // wait for space (they come first), or while cache writes fail or the log is
        // closed; nor in pass-through, which caches nothing new.
        let pass_through = self.cfg.mode == crate::engine::mode::CacheMode::PassThrough;
        let seg_sectors = u64::from(g.segment_sectors);
        self.move_credit = (self.move_credit + seg_sectors * 3 / 4).min(self.max_move_credit());
        let budget = if self.stalled || self.failed || pass_through || !self.meta.ready(self.now) {
            0
        } else {
            self.move_credit.min(seg_sectors)
        };
        let rescue = Rescue {
            budget,
            need_crc: self.cfg.data_crc,
        };
        let r = self.index.reclaim_begin(lo, lo + seg_sectors);
        self.reclaim = Some(Reclaiming {
            seg,
            r,
            rescue,
            budget,
        });
        self.reclaim_next();
    }

    /// Takes the next step of the reclaim in progress: a few dozen of the segment's
    /// listed ranges (all of them while writes wait for space, or where its extents are
    /// not listed), so that a reclaim, the longest single piece of work of a poll (about
    /// 70 us a segment at zipfian 70/30), does not hold the host's thread, and the
    /// completions of everything else, for all of it. Once done, the segment goes when
    /// the control slot moves the tail past it.
    fn reclaim_next(&mut self) {
        let Some(mut st) = self.reclaim.take() else {
            return;
        };
        let max = if self.stalled {
            // Writes wait for space: they come first, the rest goes at once, nothing kept.
            st.budget -= st.rescue.budget;
            st.rescue.budget = 0;
            usize::MAX
        } else {
            RECLAIM_STEP_RANGES
        };
        let mut moves = std::mem::take(&mut self.reclaimed);
        let before = self.index.len();
        let dirty = match st.r.as_mut() {
            Some(r) => self
                .index
                .reclaim_step(r, &mut st.rescue, &mut moves, max)
                .then(|| r.dirty()),
            None => {
                let g = &self.cfg.geo;
                let lo = g.segment_start(st.seg);
                let hi = lo + u64::from(g.segment_sectors);
                Some(
                    self.index
                        .reclaim_segment(lo, hi, &mut st.rescue, &mut moves),
                )
            }
        };
        if self.index.len() < before {
            // Clean data left the cache: from now on a fill evicts something.
            self.admission.set_evicting(true);
        }
        let seg = st.seg;
        for m in moves.drain(..) {
            if let Some(n) = self.reads_per_seg.get_mut(seg as usize) {
                // The extent stays readable in the segment until the move commits: it is
                // not released before.
                *n += 1;
            }
            self.moves.push_back(super::Pending {
                op: super::LogOp::Move {
                    src: m.src,
                    crc: m.crc,
                    probe: m.probe,
                },
                lba: m.lba,
                len: m.len,
                epoch: self.epoch,
                since: self.now,
                through: false,
                fua: false,
            });
        }
        self.reclaimed = moves;
        let Some(dirty) = dirty else {
            self.reclaim = Some(st);
            return;
        };
        // What the reclaim kept (moves queued) is paid from the credit.
        self.move_credit -= st.budget - st.rescue.budget;
        if dirty > 0 {
            self.out.log.push(format!(
                "shard {}: segment {seg} behind the dirty tail still holds {dirty} dirty extents; not reclaimed",
                self.cfg.id
            ));
            return;
        }
        // The log's segments stay as they were while the reclaim ran: only GC moves the
        // tail.
        let second = self.segments[1].first;
        self.control.want_tail = Some((second, seg));
    }

    /// Writes the control slot when the log tail or dirty tail should move.
    fn persist_control(&mut self) {
        if self.control.inflight.is_some() || !self.meta.ready(self.now) {
            return;
        }
        let tail = self.control.want_tail.map_or(self.tail, |t| t.0);
        let dirty = match &self.wb.group {
            Some(g) if g.phase == Phase::Persist => g.new_dirty_tail,
            _ => self.dirty_tail,
        };
        if tail == self.tail && dirty == self.dirty_tail && !self.control.rewrite {
            return;
        }
        self.control.rewrite = false;
        let slot = ControlSlot {
            shard: self.cfg.id,
            seq: self.control.seq + 1,
            tail,
            dirty_tail: dirty,
            gc_percent: self.cfg.wb.gc_percent,
            mode: self.cfg.mode,
            seq_cutoff: self.cfg.seq_cutoff,
            write_admission: self.cfg.write_admission,
            poison: self.poison.clone(),
        };
        let which = 1 - self.control.slot;
        let sector = self.cfg.geo.control_sector(self.cfg.id, which);
        self.control.inflight = Some((tail, dirty));
        let tag = self.tag(TagOwner::Control);
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Cache,
            sector,
            buf: Buf::Owned(self.cfg.geo.whole_blocks(slot.encode(self.cfg.crc_seed))),
            want_crc: false,
        });
        self.stats.control_writes += 1;
    }

    pub(super) fn control_done(&mut self, result: Result<(), IoError>) {
        let Some((tail, dirty)) = self.control.inflight.take() else {
            return;
        };
        if result.is_err() {
            // The other replica still holds the previous state; write this one again.
            let (shard, now) = (self.cfg.id, self.now);
            self.cache_write_failed(now, format_args!("control slot of shard {shard}"));
            self.control.rewrite = true;
            return;
        }
        self.cache_write_ok();
        self.control.seq += 1;
        self.control.slot = 1 - self.control.slot;
        self.tail = tail;
        self.dirty_tail = dirty;
        if let Some((t, seg)) = self.control.want_tail {
            if t == tail {
                self.control.want_tail = None;
                self.segments.pop_front();
                self.control.releasing.push(seg);
            }
        }
        self.maybe_finish_group();
    }

    /// A group is done once its dirty tail is persisted (or it needed none).
    fn maybe_finish_group(&mut self) {
        let done = matches!(&self.wb.group,
            Some(g) if g.phase == Phase::Persist && g.new_dirty_tail == self.dirty_tail);
        if !done {
            return;
        }
        let Some(g) = self.wb.group.take() else {
            return;
        };
        self.wb.group_ranges.clear();
        for _ in 0..g.ksets {
            if let Some(k) = self.log.pop_front() {
                let s: u64 = k.keys.iter().map(|d| u64::from(d.len)).sum();
                self.log_dirty_sectors -= s;
                self.reuse.give_dirty(k.keys);
            }
        }
        // The dirty tail moved past these ksets for good.
        let tail = self.dirty_tail.seq;
        self.wb.replay_dirty = self.wb.replay_dirty.split_off(&tail);
        if let Some(k) = self.log.front_mut() {
            let seq = k.seq;
            for d in k.keys.drain(..g.partial) {
                self.log_dirty_sectors -= u64::from(d.len);
                self.wb
                    .replay_dirty
                    .entry(seq)
                    .or_default()
                    .push((d.lba, d.len));
            }
        }
        // Once per group: the ksets of fills it did not reach are scanned again later.
        self.log_front = first_dirty(&self.log);
        self.stats.wb_group_sectors += g.sectors;
        // Only a group that went to the backing device proves it healthy.
        if let Some((n, since)) = g.flushes.then(|| self.wb.backoff.succeed()).flatten() {
            self.out.log.push(format!(
                "shard {}: writeback resumed after {n} failures over {} ms",
                self.cfg.id,
                self.now.saturating_sub(since)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Coverage, GcSpace};
    use crate::engine::geometry::{Geometry, LayoutOptions};

    /// 128 MiB of 4 MiB segments, one shard: 31 segments (the control slots take the rest).
    fn geo(shards: u32) -> Geometry {
        let layout = LayoutOptions {
            segment_bytes: 4 << 20,
            shards,
            ..LayoutOptions::default()
        };
        Geometry::new(128 << 20, 1 << 21, layout).expect("a valid layout")
    }

    #[test]
    fn gc_keeps_a_reserve_free_and_writeback_keeps_the_headroom() {
        let g = geo(1);
        let seg = u64::from(g.segment_sectors);
        let total = u64::from(g.segment_count) * seg;
        assert_eq!(g.segment_count, 31);
        let s = GcSpace::new(&g, 70);
        // GC reclaims only into the reserve: two segments here (more than a fiftieth).
        assert_eq!(GcSpace::reserve(&g), 2 * seg);
        assert_eq!(s.limit(), total - 2 * seg);
        // Headroom (free plus reclaimable) of 30 %: enough, whatever of it is free...
        let headroom = total * 30 / 100;
        assert!(!s.short(total - headroom, 0));
        assert!(!s.short(total - 2 * seg, headroom));
        // ...short when the dirty span takes more than gc_percent, or free space is under
        // the reserve.
        assert!(s.short(total - headroom + seg, 0));
        assert!(s.short(total - 2 * seg, headroom - 3 * seg));
        assert!(s.short(total - seg, total));
        // The reserve never exceeds the headroom: gc_percent 90 on a small cache.
        let s90 = GcSpace::new(&g, 90);
        assert_eq!(s90.limit(), total - (2 * seg).min(total / 10));
        // gc_percent 0: all of the cache is headroom, so writeback always runs.
        assert!(GcSpace::new(&g, 0).short(seg, 0));
    }

    #[test]
    fn the_reserve_grows_with_shards_and_size() {
        // Two segments per shard.
        let g = geo(4);
        assert_eq!(GcSpace::reserve(&g), 8 * u64::from(g.segment_sectors));
        // A fiftieth of a large cache.
        let layout = LayoutOptions {
            segment_bytes: 4 << 20,
            ..LayoutOptions::default()
        };
        let big = Geometry::new(4 << 30, 1 << 24, layout).expect("a valid layout");
        let total = u64::from(big.segment_count) * u64::from(big.segment_sectors);
        assert_eq!(GcSpace::reserve(&big), total / 50);
        // ...up to 1 GiB: a 1 TiB cache keeps 1 GiB free, not 20.
        let huge = Geometry::new(1 << 40, 1 << 24, layout).expect("a valid layout");
        assert_eq!(GcSpace::reserve(&huge), (1 << 30) / 512);
        // Two segments per shard still win over it.
        let wide = Geometry::new(
            1 << 40,
            1 << 24,
            LayoutOptions {
                segment_bytes: 1 << 30,
                shards: 2,
                stripe_bytes: 1 << 20,
                ..LayoutOptions::default()
            },
        )
        .expect("a valid layout");
        assert_eq!(GcSpace::reserve(&wide), 4 * u64::from(wide.segment_sectors));
    }

    #[test]
    fn coverage_leaves_exactly_what_no_later_key_wrote() {
        // Against a bitmap of 512 sectors: random ranges inserted, random ranges asked.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut cover = Coverage::default();
            let mut bits = [false; 512];
            for _ in 0..next(12) {
                let lba = next(480);
                let len = 1 + next(32) as u32;
                let mut pieces = Vec::new();
                cover.uncovered(lba, len, &mut pieces);
                let mut want = Vec::new();
                let mut run: Option<(u64, u32)> = None;
                for s in lba..lba + u64::from(len) {
                    match (bits[s as usize], run.as_mut()) {
                        (false, Some((_, n))) => *n += 1,
                        (false, None) => run = Some((s, 1)),
                        (true, _) => want.extend(run.take()),
                    }
                }
                want.extend(run);
                assert_eq!(pieces, want, "uncovered {lba}+{len} of {:?}", cover.0);
                cover.insert(lba, len);
                for b in &mut bits[lba as usize..(lba + u64::from(len)) as usize] {
                    *b = true;
                }
                assert!(cover.0.windows(2).all(|w| w[0].1 < w[1].0), "{:?}", cover.0);
            }
        }
    }
}
