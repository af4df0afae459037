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

use super::{Shard, TagOwner};
use crate::engine::format::{ControlSlot, KeyKind, LogPos, LogTail};
use crate::engine::index::{Extent, ExtentMap, State};
use crate::engine::io::{Buf, Command, Dev, IoError};
use crate::engine::pool::ToPool;

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
    /// GC reclaims segments while the log uses more than this share of the cache.
    pub gc_percent: u32,
}

impl Default for WritebackOptions {
    fn default() -> Self {
        WritebackOptions {
            max_inflight: 64,
            group_ksets: 64,
            high_pct: 50,
            low_pct: 40,
            gc_percent: 70,
        }
    }
}

/// Epoch of the first dirty key in `log`, if any.
pub(super) fn first_dirty_epoch(log: &VecDeque<Logged>) -> Option<u64> {
    log.iter().find_map(|k| k.keys.first()).map(|d| d.epoch)
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
    },
    Zero {
        lba: u64,
        len: u32,
        unmap: bool,
        epoch: u32,
    },
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
    wrote: bool,
    phase: Phase,
    new_dirty_tail: LogTail,
    sectors: u64,
}

#[derive(Debug, Default)]
pub(super) struct Writeback {
    queue: VecDeque<WbIo>,
    inflight: u32,
    /// Ranges queued or in flight: no in-place overwrite may touch them.
    ranges: BTreeMap<u64, u32>,
    group: Option<Group>,
    /// A backing write or flush failed: stopped until `retry_writeback`.
    pub failed: bool,
    active: bool,
    pub drain: bool,
}

impl Writeback {
    /// Whether [lba, lba+len) overlaps data being written back.
    #[inline]
    pub fn blocks(&self, lba: u64, len: u32) -> bool {
        if self.ranges.is_empty() {
            return false;
        }
        let end = lba + u64::from(len);
        if let Some((&s, &l)) = self.ranges.range(..end).next_back() {
            return s + u64::from(l) > lba;
        }
        false
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
            "shard {}: segs {:?} ready {} preparing {} wanted {} pending {} batches {} log {} \
             dirty_tail {:?} tail {:?} group {:?} queue {} inflight {} failed {} stalled {} \
             pressure {} allowed {} frontier {} want_tail {:?} releasing {:?} control_inflight {}",
            self.cfg.id,
            self.segments
                .iter()
                .map(|s| (s.seg, s.first.seq))
                .collect::<Vec<_>>(),
            self.ready.len(),
            self.preparing,
            self.wanted,
            self.pending.len(),
            self.batches.len(),
            self.log.len(),
            self.dirty_tail.seq,
            self.tail.seq,
            self.wb.group.as_ref().map(|g| (g.ksets, g.phase)),
            self.wb.queue.len(),
            self.wb.inflight,
            self.wb.failed,
            self.stalled,
            self.pressure,
            self.allowed_epoch,
            self.frontier(),
            self.control.want_tail.map(|t| (t.0.seq, t.1)),
            self.control.releasing,
            self.control.inflight.is_some(),
        )
    }

    /// Lowest epoch with data this shard has not yet written back and flushed.
    pub fn frontier(&self) -> u64 {
        // Epochs never decrease along the log, then the batches, then the queue: the first
        // non-fill key found is the oldest.
        debug_assert_eq!(self.log_front_epoch, first_dirty_epoch(&self.log));
        if let Some(epoch) = self.log_front_epoch {
            return epoch;
        }
        let is_fill = |op: &super::LogOp| matches!(op, super::LogOp::Fill { .. });
        for b in &self.batches {
            if let Some(e) = b.entries.iter().find(|e| !is_fill(&e.p.op)) {
                return e.p.epoch;
            }
        }
        self.pending
            .iter()
            .find(|p| !is_fill(&p.op))
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

    /// Resumes writeback after a backing-device error.
    pub fn retry_writeback(&mut self) {
        self.wb.failed = false;
    }

    pub fn writeback_failed(&self) -> bool {
        self.wb.failed
    }

    /// Dirty data not yet written back, in sectors.
    pub fn dirty_sectors(&self) -> u64 {
        self.log_dirty_sectors
    }

    /// Nothing dirty: no logged, batched or queued write.
    pub fn is_clean(&self) -> bool {
        self.log_front_epoch.is_none() && self.frontier_is_idle()
    }

    fn frontier_is_idle(&self) -> bool {
        self.batches.is_empty() && self.pending.is_empty()
    }

    fn writeback_wanted(&mut self) -> bool {
        if self.wb.failed || self.log.is_empty() {
            return false;
        }
        if self.wb.drain || self.stalled || self.pressure || self.idle {
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
        while self.wb.inflight < self.cfg.wb.max_inflight && !self.wb.failed {
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
        let group_keys: Vec<DirtyKey> = self
            .log
            .iter()
            .enumerate()
            .take(n + 1)
            .flat_map(|(i, k)| k.keys.iter().take(if i < n { usize::MAX } else { partial }))
            .copied()
            .collect();
        let mut coverage = ExtentMap::new();
        let mut pieces = Vec::new();
        let mut sectors = 0u64;
        let mut ios = Vec::new();
        for k in group_keys.iter().rev() {
            sectors += u64::from(k.len);
            coverage.lookup(k.lba, k.len, &mut pieces);
            for p in pieces.iter().filter(|p| p.extent.is_none()) {
                ios.push(match k.kind {
                    KeyKind::Data => WbIo::Copy {
                        lba: p.lba,
                        len: p.len,
                        src: k.pos + (p.lba - k.lba),
                    },
                    KeyKind::Zeroes | KeyKind::Unmap => WbIo::Zero {
                        lba: p.lba,
                        len: p.len,
                        unmap: k.kind == KeyKind::Unmap,
                        epoch: k.epoch as u32,
                    },
                });
            }
            coverage.insert(k.lba, Extent::new(0, k.len, State::Clean, None, 0));
        }
        let landing = ios.iter().any(|io| {
            let (lba, len) = match *io {
                WbIo::Copy { lba, len, .. } | WbIo::Zero { lba, len, .. } => (lba, len),
            };
            let end = lba + u64::from(len);
            self.inplace
                .iter()
                .any(|&(s, l)| s < end && s + u64::from(l) > lba)
        });
        if landing {
            // An in-place overwrite is landing in this range: start once it has.
            return;
        }
        // Issue in log order.
        for io in ios.into_iter().rev() {
            let (lba, len) = match io {
                WbIo::Copy { lba, len, .. } | WbIo::Zero { lba, len, .. } => (lba, len),
            };
            self.wb.ranges.insert(lba, len);
            self.wb.queue.push_back(io);
        }
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
            wrote: !self.wb.queue.is_empty(),
            phase: Phase::Io,
            new_dirty_tail,
            sectors,
        });
        self.stats.wb_groups += 1;
    }

    fn issue_wb(&mut self, io: WbIo) {
        self.wb.inflight += 1;
        let tag = self.tag(TagOwner::Wb(io));
        let cmd = match io {
            WbIo::Copy { lba, len, src } => Command::Copy {
                tag,
                src: Dev::Cache,
                src_sector: src,
                dst: Dev::Backing,
                dst_sector: lba,
                sectors: u64::from(len),
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
        let (lba, len) = match io {
            WbIo::Copy { lba, len, .. } | WbIo::Zero { lba, len, .. } => (lba, len),
        };
        self.wb.ranges.remove(&lba);
        if result.is_err() {
            self.fail_writeback(format!("backing write at lba {lba}+{len} failed"));
            return;
        }
        self.stats.wb_sectors += u64::from(len);
        match io {
            WbIo::Copy { lba, len, src } => self.index.mark_clean(lba, len, src),
            WbIo::Zero {
                lba,
                len,
                unmap,
                epoch,
            } => {
                let state = if unmap {
                    State::Unmapped
                } else {
                    State::Zeroes
                };
                self.index.punch_state(lba, len, state, epoch);
            }
        }
    }

    fn fail_writeback(&mut self, what: String) {
        if !self.wb.failed {
            self.out.log.push(format!(
                "shard {}: writeback stopped: {what}; dirty data stays in the cache",
                self.cfg.id
            ));
        }
        self.stats.wb_errors += 1;
        self.wb.failed = true;
    }

    /// Moves the current group on: copies done → backing flush → persist the dirty tail.
    fn advance_group(&mut self) {
        let Some(g) = self.wb.group.as_mut() else {
            return;
        };
        if g.phase != Phase::Io || self.wb.inflight > 0 {
            return;
        }
        if self.wb.failed {
            // Start over from the same dirty tail once retried.
            self.wb.queue.clear();
            self.wb.ranges.clear();
            self.wb.group = None;
            return;
        }
        if !self.wb.queue.is_empty() {
            return;
        }
        if g.wrote {
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

    fn gc_check(&mut self) {
        let g = &self.cfg.geo;
        let over = self.segments.len() as u64 * 100 * u64::from(g.shard_count)
            > u64::from(self.cfg.wb.gc_percent) * u64::from(g.segment_count);
        if !(over || self.pressure || self.stalled) {
            return;
        }
        let second = self.segments[1].first;
        if second.seq > self.dirty_tail.seq {
            return;
        }
        let seg = self.segments[0].seg;
        let lo = g.segment_start(seg);
        let dirty = self
            .index
            .drop_segment(lo, lo + u64::from(g.segment_sectors));
        if dirty > 0 {
            self.out.log.push(format!(
                "shard {}: segment {seg} behind the dirty tail still holds {dirty} dirty extents; not reclaimed",
                self.cfg.id
            ));
            return;
        }
        self.control.want_tail = Some((second, seg));
    }

    /// Writes the control slot when the log tail or dirty tail should move.
    fn persist_control(&mut self) {
        if self.control.inflight.is_some() {
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
        };
        let which = 1 - self.control.slot;
        let sector = self.cfg.geo.control_sector(self.cfg.id, which);
        self.control.inflight = Some((tail, dirty));
        let tag = self.tag(TagOwner::Control);
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Cache,
            sector,
            buf: Buf::Owned(slot.encode(self.cfg.crc_seed)),
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
            self.stats.io_errors += 1;
            self.control.rewrite = true;
            return;
        }
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
        for _ in 0..g.ksets {
            if let Some(k) = self.log.pop_front() {
                let s: u64 = k.keys.iter().map(|d| u64::from(d.len)).sum();
                self.log_dirty_sectors -= s;
            }
        }
        if let Some(k) = self.log.front_mut() {
            for d in k.keys.drain(..g.partial) {
                self.log_dirty_sectors -= u64::from(d.len);
            }
        }
        // Once per group: the ksets of fills it did not reach are scanned again later.
        self.log_front_epoch = first_dirty_epoch(&self.log);
        self.stats.wb_group_sectors += g.sectors;
    }
}
