//! One shard: the index, log and request state for the stripes it owns.
//!
//! A shard is a state machine driven by its owning thread: `submit` requests, `poll` to
//! batch them, `complete` device commands, `grant` segments from the pool. Everything it
//! wants done comes out of its [`Outbox`]. It shares nothing with other shards.
//!
//! Log layout (format v2): in its current segment the shard writes ksets one after the
//! other from the start, and their data down from the end, each batch's just below the
//! last, so 4 KiB blocks stay 4 KiB-aligned whatever the ksets' sizes. Data is written
//! first; the kset is written when all of its data is durable; a request is acknowledged
//! when its kset and every earlier kset are durable. Each kset names the position of the
//! next one and the CRC of the previous one, so replay can follow the chain and stops at
//! the first kset that does not fit it.

use std::collections::VecDeque;

use super::format::{Key, KeyKind, Kset, LogPos, LogTail, SegmentHeader, MAX_KSET_KEYS};
use super::geometry::Geometry;
use super::index::{Extent, ExtentMap, Piece, State};
use super::io::{
    Buf, Command, Dev, IoDone, IoError, Op, ReqError, ReqId, ReqResult, ShardRequest, Tag, Verify,
};
use super::mode::{CacheMode, SeqCutoff, WriteAdmission};
use super::pool::{Grant, ToPool};
use super::slab::Slab;
use super::stats::ShardStats;

mod admission;
mod modes;
mod ranges;
mod retry;
mod writeback;
use modes::{BackingFlush, Fwd, Streams};
use retry::Backoff;
pub use retry::{RETRY_MAX_MS, RETRY_MIN_MS};
pub(crate) use writeback::GcSpace;
use writeback::{first_dirty, Control, DirtyFront, WbIo, Writeback};
pub use writeback::{DirtyKey, Logged, SegRec, WritebackOptions, WritebackState};

/// Segments a shard keeps ready (header durable) beyond the one it writes.
const RESERVE_SEGMENTS: u32 = 2;

/// How long GC's moves (second chances) wait at the head of the queue for a segment on its
/// way before their extents are dropped instead (ms).
const MOVE_WAIT_MS: u64 = 50;

/// GC's moves logged or being logged at once. A reclaim queues up to three quarters of a
/// segment of them; each copy holds a bounce buffer from the host, and issuing them all
/// at once outgrew the SPDK worker's pool of kept buffers (every copy then paid a DMA heap
/// allocation: θ 0.8 zipf reads lost 15 % of their IOPS). Few at once also bounds what
/// one poll does for GC: over a mapped cache a copy completes inline, and 128 at a time
/// let one reclaim's moves hold the reactor for about a millisecond, while the backing
/// device's completions waited (32: p99.9 latency about 3× lower; 16 cost 0.3 points of
/// θ 0.99 read hits).
const MAX_MOVES_OUT: usize = 32;

#[derive(Debug, Clone, Copy)]
pub struct ShardConfig {
    pub id: u32,
    pub geo: Geometry,
    pub crc_seed: u32,
    pub data_crc: bool,
    /// Insert read-miss data into the cache.
    pub read_fill: bool,
    pub wb: WritebackOptions,
    /// What writes do (persisted in the control slot).
    pub mode: CacheMode,
    /// The sequential cut-off (persisted in the control slot).
    pub seq_cutoff: SeqCutoff,
    /// Which writes a full cache takes in (persisted).
    pub write_admission: WriteAdmission,
}

/// Everything a shard wants from the outside world since the last drain.
#[derive(Debug, Default)]
pub struct Outbox {
    pub commands: Vec<Command>,
    pub completions: Vec<(ReqId, Result<(), ReqError>)>,
    pub to_pool: Vec<ToPool>,
    pub log: Vec<String>,
}

/// Recovered log state handed to [`Shard::new`].
#[derive(Debug, Clone)]
pub struct LogState {
    /// Where the next kset goes.
    pub head: LogPos,
    /// The lowest sector of the head segment holding data of a kset (the segment's size if
    /// none): the next batch's data goes below it.
    pub data_low: u32,
    pub next_seq: u64,
    pub prev_crc: u32,
    /// Segments of the log, oldest first; the last one holds `head`.
    pub segments: VecDeque<SegRec>,
    /// The head segment's header must be (re)written before use.
    pub head_needs_header: bool,
    /// Durable ksets from the dirty tail on.
    pub log: VecDeque<Logged>,
    pub tail: LogTail,
    pub dirty_tail: LogTail,
    /// Sequence and index of the current control slot.
    pub control_seq: u64,
    pub control_slot: u32,
    /// Poisoned ranges recorded in the control slot (see [`ControlSlot::poison`]).
    ///
    /// [`ControlSlot::poison`]: super::format::ControlSlot::poison
    pub poison: Vec<(u64, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogOp {
    Write {
        req: ReqId,
        buf_off: u64,
    },
    Zeroes {
        req: ReqId,
    },
    Unmap {
        req: ReqId,
    },
    Fill {
        read: u32,
        fill: u64,
        req: ReqId,
        buf_off: u64,
    },
    /// A clean unmap key that drops what the log may still hold for a range whose new data
    /// went to the backing device (write `fwd` in flight there).
    Invalidate {
        req: ReqId,
        fwd: u32,
    },
    /// GC's second chance: a clean extent read since it was logged, copied from cache
    /// sector `src` (in the segment being reclaimed, pinned until the move commits or is
    /// dropped, so the extent stays readable there meanwhile) to the log head and logged as
    /// a clean key, like a fill whose data comes from the cache. It commits only where the
    /// index still maps the range to that same extent.
    Move {
        src: u64,
        /// The extent's data CRC (with data CRCs, only whole extents move): the copy checks
        /// it, and the key carries it.
        crc: Option<u32>,
        /// Kept at a heat of one: a probe of GC's second chance.
        probe: bool,
    },
}

impl LogOp {
    /// Logs no dirty data (read-miss fills, invalidations, GC moves).
    fn is_clean(&self) -> bool {
        matches!(
            self,
            LogOp::Fill { .. } | LogOp::Invalidate { .. } | LogOp::Move { .. }
        )
    }

    /// A clean key with data (a read-miss fill or a GC move): committed only where its
    /// placeholder survived.
    fn takes_placeholder(&self) -> bool {
        matches!(self, LogOp::Fill { .. } | LogOp::Move { .. })
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    op: LogOp,
    lba: u64,
    len: u32,
    epoch: u64,
    /// When it was queued (host time, ms): it fails once it waited the I/O timeout.
    since: u64,
    /// Write-through: once logged, written to the backing device too.
    through: bool,
    /// The request asked for forced unit access.
    fua: bool,
}

impl Pending {
    fn data_sectors(&self) -> u32 {
        match self.op {
            LogOp::Write { .. } | LogOp::Fill { .. } | LogOp::Move { .. } => self.len,
            LogOp::Zeroes { .. } | LogOp::Unmap { .. } | LogOp::Invalidate { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchState {
    /// Data writes in flight.
    Data,
    /// Data done; waiting for earlier ksets to be encoded (they give us prev_crc).
    Ready,
    KsetInFlight,
    /// The kset write failed: written again once the cache device's backoff allows.
    KsetRetry,
    Durable,
}

#[derive(Debug)]
struct Entry {
    p: Pending,
    data_off: u32,
    crc: Option<u32>,
    failed: bool,
    /// Made it into the kset (fills whose placeholder was overwritten do not).
    logged: bool,
    /// When its data write first failed (it is retried for the I/O timeout).
    first_fail: Option<u64>,
    /// Its data write completed (a fill's read was answered then).
    written: bool,
    /// Its request was already answered (failed at its deadline while the cache device's
    /// writes were retried); the key may still be logged, as a failed write may land.
    answered: bool,
}

#[derive(Debug)]
struct Batch {
    seq: u64,
    pos: LogPos,
    next: LogPos,
    entries: Vec<Entry>,
    data_pending: u32,
    state: BatchState,
    /// The CRC its kset chains to (set when it is encoded; a retry encodes it again).
    prev_crc: u32,
    crc: u32,
    attempts: u32,
    /// When its kset write first failed (retried for the I/O timeout, then the log closes).
    first_fail: Option<u64>,
}

/// Vectors a shard reuses from batch to batch, so that logging allocates nothing in steady
/// state (under a CPU-bound mixed workload the allocator took ~5 % of the core).
#[derive(Debug, Default)]
struct Reuse {
    entries: Vec<Vec<Entry>>,
    dirty: Vec<Vec<DirtyKey>>,
    /// A kset's keys while it is encoded.
    keys: Vec<Key>,
    /// Ranges of earlier batches' writes while `encode_ready` picks the keys to log.
    earlier: Vec<(u64, u32)>,
    /// Kset buffers the host gave back once written ([`Shard::give_back`]).
    bufs: Vec<Vec<u8>>,
}

/// What [`Reuse`] keeps: a batch's entries for the batches in flight, and the dirty keys
/// of a writeback group's ksets (up to 64 ksets) until as many new ksets retire; bounded so
/// that the pool holds well under a MiB.
const REUSED_ENTRIES: usize = 16;
const REUSED_DIRTY: usize = 256;
/// Longer key lists (a kset of many small writes) go back to the allocator.
const REUSED_DIRTY_KEYS: usize = 32;
/// Kset buffers kept (about one per kset in flight; a block each, larger than
/// [`REUSED_BUF_BYTES`] freed): at most 256 KiB.
const REUSED_BUFS: usize = 16;
const REUSED_BUF_BYTES: usize = 16 << 10;

impl Reuse {
    fn entries(&mut self) -> Vec<Entry> {
        self.entries.pop().unwrap_or_default()
    }

    fn give_entries(&mut self, mut v: Vec<Entry>) {
        if v.capacity() > 0 && self.entries.len() < REUSED_ENTRIES {
            v.clear();
            self.entries.push(v);
        }
    }

    fn dirty(&mut self) -> Vec<DirtyKey> {
        self.dirty.pop().unwrap_or_default()
    }

    fn give_dirty(&mut self, mut v: Vec<DirtyKey>) {
        if (1..=REUSED_DIRTY_KEYS).contains(&v.capacity()) && self.dirty.len() < REUSED_DIRTY {
            v.clear();
            self.dirty.push(v);
        }
    }

    fn buf(&mut self) -> Vec<u8> {
        self.bufs.pop().unwrap_or_default()
    }

    fn give_buf(&mut self, v: Vec<u8>) {
        if (1..=REUSED_BUF_BYTES).contains(&v.capacity()) && self.bufs.len() < REUSED_BUFS {
            self.bufs.push(v);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ReadSrc {
    /// From the cache; `ext` is the extent slice read, `whole` when CRC-verified.
    Cache {
        ext: Extent,
    },
    Backing {
        fill: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy)]
enum TagOwner {
    Data {
        seq: u64,
        entry: u32,
    },
    Kset {
        seq: u64,
    },
    SegHeader {
        seg: u32,
        gen: u32,
    },
    InPlace {
        req: ReqId,
        lba: u64,
        len: u32,
        buf_off: u64,
    },
    Wb(WbIo),
    WbFlush,
    Control,
    /// The backing write of a write sent around the cache or written through.
    Fwd {
        id: u32,
    },
    /// A backing flush for FLUSH requests and for writes that must be durable.
    BackingFlush,
    Read {
        read: u32,
        lba: u64,
        len: u32,
        buf_off: u64,
        src: ReadSrc,
    },
}

#[derive(Debug)]
struct ReadCtx {
    req: ReqId,
    pending: u32,
    error: Option<ReqError>,
}

pub struct Shard {
    cfg: ShardConfig,
    index: ExtentMap,
    epoch: u64,
    head: LogPos,
    /// Ksets grow up from the head segment's start to `head`, data down from its end to
    /// here (format v2), so a batch's data lands on a 4 KiB boundary whatever its kset's
    /// size.
    data_low: u32,
    next_seq: u64,
    prev_crc: u32,
    segments: VecDeque<SegRec>,
    log: VecDeque<Logged>,
    log_dirty_sectors: u64,
    /// Where the first dirty key in `log` is (None: it has none). Ksets of fills only
    /// stay in `log` until a writeback group passes them, so under read misses there can
    /// be many before the first dirty key: this keeps `frontier`, asked on every poll, and
    /// GC's threshold (`reclaimable_sectors`) from scanning them.
    log_front: Option<DirtyFront>,
    tail: LogTail,
    dirty_tail: LogTail,
    control: Control,
    wb: Writeback,
    allowed_epoch: u64,
    pressure: bool,
    idle: bool,
    /// Cache reads in flight per segment: a reclaimed segment waits for them.
    reads_per_seg: Vec<u32>,
    /// In-place overwrites in flight, by extent start: (length, count). Writeback does not
    /// copy an extent while one is landing, or it could mark it clean with the old data.
    inplace: Vec<(u64, u32)>,
    head_header: HeadHeader,
    ready: VecDeque<Grant>,
    preparing: u32,
    wanted: u32,
    pending: VecDeque<Pending>,
    /// GC's moves (second chances) waiting to be logged: they go behind the requests'
    /// writes and fills (a reclaim queues up to a segment of them at once, and a read miss
    /// completes only once its fill's data is written).
    moves: VecDeque<Pending>,
    /// What a reclaim chose to move, before it is queued in `moves` (kept: no allocation
    /// per reclaim).
    reclaimed: Vec<crate::engine::index::Move>,
    /// Moves taken from `moves` and not yet committed or dropped.
    moves_out: usize,
    /// Sectors GC may still copy as second chances (see `gc_check`).
    move_credit: u64,
    /// A segment GC is reclaiming, a step per poll (`reclaim_next`).
    reclaim: Option<writeback::Reclaiming>,
    batches: VecDeque<Batch>,
    tags: Slab<TagOwner>,
    reads: Slab<ReadCtx>,
    next_fill: u64,
    /// Which read misses fill the cache while it evicts (admission on a second miss).
    admission: admission::Admission,
    failed: bool,
    stalled: bool,
    /// Host time in ms ([`Shard::set_now`]).
    now: u64,
    /// Failures of the cache device's writes (data, ksets, headers, control slots).
    meta: Backoff,
    /// Data writes to retry once `meta` allows: (batch seq, entry).
    retry_data: Vec<(u64, u32)>,
    /// Ranges poisoned by writeback (their data failed its CRC), persisted in the control
    /// slot; a write over one trims it.
    poison: Vec<(u64, u32)>,
    /// Writes sent to the backing device (around the cache, or through it).
    fwd: Slab<Fwd>,
    /// Ranges of those backing writes in flight: writeback copies nothing there and read
    /// misses fill nothing there until they land.
    fwd_ranges: Vec<(u64, u32)>,
    /// Write-through writes logged and waiting to be written to the backing device (or
    /// copied there by writeback).
    through_wait: Vec<u32>,
    /// Forwarded writes whose backing write or flush failed, retried after `fwd_backoff`.
    fwd_retry: Vec<u32>,
    fwd_backoff: Backoff,
    /// Backing flushes asked by FLUSH requests and durable forwarded writes.
    bflush: BackingFlush,
    /// Recent sequential streams (the sequential cut-off).
    streams: Streams,
    /// A clean extent left the index while the log may still replay its key (its data
    /// failed its CRC, or the invalidation of a write sent around the cache was given up
    /// before it was durable): every write sent around the cache logs an invalidation.
    ghosts: bool,
    out: Outbox,
    pub stats: ShardStats,
    scratch: Vec<Piece>,
    reuse: Reuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadHeader {
    Durable,
    Needed,
    InFlight,
}

impl Shard {
    pub fn new(cfg: ShardConfig, log: LogState, index: ExtentMap, epoch: u64) -> Self {
        let mut shard = Shard {
            cfg,
            index,
            epoch,
            head: log.head,
            data_low: log.data_low,
            next_seq: log.next_seq,
            prev_crc: log.prev_crc,
            segments: log.segments,
            log_dirty_sectors: log
                .log
                .iter()
                .flat_map(|k| k.keys.iter())
                .map(|k| u64::from(k.len))
                .sum(),
            log_front: first_dirty(&log.log),
            log: log.log,
            tail: log.tail,
            dirty_tail: log.dirty_tail,
            control: Control {
                seq: log.control_seq,
                slot: log.control_slot,
                ..Control::default()
            },
            wb: Writeback::default(),
            allowed_epoch: 0,
            pressure: false,
            idle: false,
            reads_per_seg: vec![0; cfg.geo.segment_count as usize],
            inplace: Vec::new(),
            head_header: if log.head_needs_header {
                HeadHeader::Needed
            } else {
                HeadHeader::Durable
            },
            ready: VecDeque::new(),
            preparing: 0,
            wanted: 0,
            pending: VecDeque::new(),
            moves: VecDeque::new(),
            reclaimed: Vec::new(),
            moves_out: 0,
            move_credit: 0,
            reclaim: None,
            batches: VecDeque::new(),
            tags: Slab::new(),
            reads: Slab::new(),
            next_fill: 1,
            admission: admission::Admission::new(&cfg.geo),
            failed: false,
            stalled: false,
            now: 0,
            meta: Backoff::default(),
            retry_data: Vec::new(),
            poison: log.poison,
            fwd: Slab::new(),
            fwd_ranges: Vec::new(),
            through_wait: Vec::new(),
            fwd_retry: Vec::new(),
            fwd_backoff: Backoff::default(),
            bflush: BackingFlush::default(),
            streams: Streams::default(),
            ghosts: false,
            out: Outbox::default(),
            stats: ShardStats::default(),
            scratch: Vec::new(),
            reuse: Reuse::default(),
        };
        shard.move_credit = shard.max_move_credit();
        shard
    }

    pub fn id(&self) -> u32 {
        self.cfg.id
    }

    pub fn index(&self) -> &ExtentMap {
        &self.index
    }

    /// Its counters, with those of GC's second chance, which the index keeps.
    pub fn stats(&self) -> ShardStats {
        let c = self.index.second_chance();
        ShardStats {
            readmit_probes: c.probes,
            readmit_probes_read: c.probes_read,
            readmit_skipped: c.skipped,
            ..self.stats
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The host's clock in ms (any origin, never decreasing): paces retries and bounds
    /// how long a request may wait.
    pub fn set_now(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// The host time last given.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The earliest host time at which something waits to happen (a retry, a request's
    /// timeout), while the shard holds work that waits for time.
    pub fn next_deadline(&self) -> Option<u64> {
        let timeout = self.cfg.wb.io_timeout_ms;
        let pending = self.pending.front().map(|p| p.since + timeout);
        let batched = self
            .batches
            .iter()
            .flat_map(|b| b.entries.iter())
            .filter(|e| self.meta.since().is_some() && !e.answered && !e.failed)
            .filter(|e| !e.p.op.takes_placeholder())
            .map(|e| e.p.since + timeout)
            .min();
        let meta = self.meta.due(self.now).filter(|_| {
            !self.retry_data.is_empty()
                || self.control.rewrite
                || self.head_header == HeadHeader::Needed
                || self
                    .batches
                    .iter()
                    .any(|b| b.state == BatchState::KsetRetry)
                || (self.ready.len() as u32 + self.preparing + self.wanted) < RESERVE_SEGMENTS
        });
        let wb = self.writeback_due();
        let through = self.through_deadline();
        let fwd = self.fwd_retry_due();
        [pending, batched, meta, wb, through, fwd]
            .into_iter()
            .flatten()
            .min()
    }

    /// The log is closed: the cache device failed every write for the I/O timeout.
    pub fn log_failed(&self) -> bool {
        self.failed
    }

    /// Requests or retries wait for time to pass (not only for device completions).
    pub fn waits_for_time(&self) -> bool {
        !self.pending.is_empty()
            || !self.through_wait.is_empty()
            || !self.fwd_retry.is_empty()
            || !self.retry_data.is_empty()
            || self
                .batches
                .iter()
                .any(|b| b.state == BatchState::KsetRetry)
    }

    /// Starts a new flush epoch: writes submitted from now on belong to it.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    pub fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }

    /// Requests still owed a completion, and whether the shard has work in flight.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.moves.is_empty()
            && self.batches.is_empty()
            && self.tags.is_empty()
            && self.fwd.is_empty()
    }

    fn tag(&mut self, owner: TagOwner) -> Tag {
        (u64::from(self.cfg.id) << 48) | u64::from(self.tags.insert(owner))
    }

    fn seg_sector(&self, pos: LogPos) -> u64 {
        self.cfg.geo.segment_start(pos.seg) + u64::from(pos.off)
    }

    pub fn submit(&mut self, r: ShardRequest) {
        match r.op {
            Op::Read => {
                self.stats.reads += 1;
                self.start_read(r);
            }
            Op::Write | Op::WriteFua => {
                self.stats.writes += 1;
                if self.failed {
                    self.out
                        .completions
                        .push((r.id, Err(ReqError::ShardFailed)));
                } else if !self.try_in_place(&r) {
                    self.route_write(r);
                }
            }
            Op::WriteZeroes | Op::Unmap => {
                self.stats.discards += 1;
                let op = if r.op == Op::Unmap {
                    LogOp::Unmap { req: r.id }
                } else {
                    LogOp::Zeroes { req: r.id }
                };
                if self.failed {
                    self.out
                        .completions
                        .push((r.id, Err(ReqError::ShardFailed)));
                } else {
                    self.queue(r, op);
                }
            }
            Op::Flush => {
                if self.flush_request(r.id) {
                    self.out.completions.push((r.id, Ok(())));
                }
            }
        }
    }

    fn queue(&mut self, r: ShardRequest, op: LogOp) {
        self.pending.push_back(Pending {
            op,
            lba: r.lba,
            len: r.len,
            epoch: self.epoch,
            since: self.now,
            through: false,
            fua: false,
        });
    }

    /// A write that exactly covers a dirty extent of the current epoch rewrites it in place:
    /// no new key, no space used. Crash-safe because the epoch's writes carry no order and
    /// a torn unacknowledged write may leave old and new sectors mixed.
    fn try_in_place(&mut self, r: &ShardRequest) -> bool {
        let Some(pos) = self.in_place_target(r.lba, r.len) else {
            return false;
        };
        let tag = self.tag(TagOwner::InPlace {
            req: r.id,
            lba: r.lba,
            len: r.len,
            buf_off: r.buf_off,
        });
        // A short list: at most one entry per write in flight.
        self.inplace.push((r.lba, r.len));
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Cache,
            sector: pos,
            buf: Buf::Req {
                req: r.id,
                off: r.buf_off,
                len: u64::from(r.len) * 512,
            },
            want_crc: false,
        });
        self.stats.in_place_writes += 1;
        true
    }

    /// Where a write of `lba..+len` may go in place, if it may: it covers exactly a dirty
    /// extent of the current epoch that writeback is not copying.
    #[inline(always)]
    fn in_place_target(&self, lba: u64, len: u32) -> Option<u64> {
        // Write-through: a rewrite completes only once the backing device has it.
        if self.cfg.data_crc || self.wb.drain || self.cfg.mode == CacheMode::WriteThrough {
            return None;
        }
        let e = self.index.get(lba)?;
        // Writeback's ranges last: most writes find no dirty extent of theirs, and the
        // index answers that from a line it loads anyway.
        (e.state() == State::Dirty
            && e.len() == len
            && e.epoch() == Some(self.epoch as u32)
            && !self.wb.blocks(lba, len))
        .then_some(e.pos)
    }

    /// Starts a request the host serves with one cache-device I/O of its own, at the
    /// returned cache sector, skipping commands and tags: a read of one cached data extent
    /// (its segment is pinned against GC until [`Shard::end_direct`]), or a write that
    /// rewrites a dirty extent in place (under the same conditions as a submitted one).
    /// Also returns the key `end_direct` needs. None: submit it normally.
    // Inlined into the SPDK shell's direct path: a call returned this through memory and
    // reading it back stalled on store forwarding.
    #[inline(always)]
    pub fn begin_direct(&mut self, op: Op, lba: u64, len: u32) -> Option<(u64, u64)> {
        if self.failed || self.cfg.data_crc {
            return None;
        }
        match op {
            Op::Read => {
                let pt = self.cfg.mode == CacheMode::PassThrough;
                let e = self
                    .index
                    .covering_touch(lba, len)
                    .filter(|e| e.is_data() && !(pt && e.state() == State::Clean))?;
                let seg = self.seg_of(e.pos);
                *self.reads_per_seg.get_mut(seg as usize)? += 1;
                self.stats.reads += 1;
                self.stats.read_hit_sectors += u64::from(len);
                self.stats.direct += 1;
                Some((e.pos, u64::from(seg)))
            }
            Op::Write => {
                let pos = self.in_place_target(lba, len)?;
                self.inplace.push((lba, len));
                self.stats.writes += 1;
                self.stats.in_place_writes += 1;
                self.stats.direct += 1;
                Some((pos, lba))
            }
            _ => None,
        }
    }

    /// Starts a read miss that the host serves with one backing-device read of its own,
    /// at the request's own sectors and into its buffer: nothing of [lba, lba+len) is in
    /// the index (no data, zeroes or fill in flight) and the miss fills nothing (admission
    /// declines it, the sequential cut-off bypasses it, or the mode fills nothing). Counted
    /// as [`Shard::submit`] counts such a miss, which it serves the same way, through
    /// commands. False: submit it normally (it fills the cache, or something is cached).
    ///
    /// As consistent as the normal path: a write that completed before this read began is
    /// in the index, so the read would not be a miss; one still in flight may be seen
    /// either way.
    pub fn begin_backing_read(&mut self, lba: u64, len: u32) -> bool {
        if self.failed || self.index.overlaps(lba, len) {
            return false;
        }
        let may_fill = self.fills_misses() && !self.fwd_overlaps(lba, len);
        // Admitted unless the cut-off bypasses it: the normal path decides (and admits).
        if may_fill && self.admission.would_admit(lba, len) {
            return false;
        }
        let seq = self.seq_bypass(lba, len, false);
        if may_fill && !seq {
            let declined = self.declines_fill(lba, len);
            debug_assert!(declined, "admission changed its answer");
        } else if seq {
            self.stats.seq_bypass_requests += 1;
            self.stats.seq_bypass_sectors += u64::from(len);
        }
        self.stats.reads += 1;
        self.stats.read_miss_sectors += u64::from(len);
        self.stats.direct += 1;
        true
    }

    /// Whether read misses fill the cache at all now (admission and the sequential
    /// cut-off still decide for each): not in pass-through, nor once the shard failed.
    fn fills_misses(&self) -> bool {
        self.cfg.read_fill && !self.failed && self.cfg.mode != CacheMode::PassThrough
    }

    /// Asks admission about a miss of [lba, lba+len) that could fill: true (and counted)
    /// if it declines; it remembers the miss, so a second one fills.
    fn declines_fill(&mut self, lba: u64, len: u32) -> bool {
        let declined = !self.admission.admit(lba, len);
        self.stats.fill_declined += u64::from(declined);
        declined
    }

    /// The backing read of a miss [`Shard::begin_backing_read`] started finished: the
    /// request's result, as the normal path gives it.
    pub fn end_backing_read(&mut self, result: Result<(), IoError>) -> ReqResult {
        result.map_err(|_| {
            self.stats.io_errors += 1;
            ReqError::Io
        })
    }

    /// Uncounts a miss [`Shard::begin_backing_read`] started (`len` sectors) whose read
    /// was never issued, so that the normal path counts it. What admission and the
    /// sequential cut-off saw of it stays, so the normal path sees the request twice (and
    /// admission then takes it for a second miss: rare, as this follows a failed
    /// allocation).
    pub fn cancel_backing_read(&mut self, len: u32) {
        let s = &mut self.stats;
        s.direct = s.direct.saturating_sub(1);
        s.reads = s.reads.saturating_sub(1);
        s.read_miss_sectors = s.read_miss_sectors.saturating_sub(u64::from(len));
    }

    /// The device I/O of a request [`Shard::begin_direct`] started finished.
    #[inline]
    pub fn end_direct(&mut self, op: Op, key: u64, result: Result<(), IoError>) -> ReqResult {
        match op {
            Op::Read => {
                self.unpin_segment(key as usize);
                result.map_err(|_| {
                    self.stats.io_errors += 1;
                    ReqError::Io
                })
            }
            _ => self.in_place_done(key, result),
        }
    }

    /// Forgets a request [`Shard::begin_direct`] started (`len` sectors) whose device I/O
    /// was never issued, as if it had not begun: nothing was read or written.
    pub fn cancel_direct(&mut self, op: Op, key: u64, len: u32) {
        let s = &mut self.stats;
        s.direct = s.direct.saturating_sub(1);
        match op {
            Op::Read => {
                s.reads = s.reads.saturating_sub(1);
                s.read_hit_sectors = s.read_hit_sectors.saturating_sub(u64::from(len));
                self.unpin_segment(key as usize);
            }
            _ => {
                s.writes = s.writes.saturating_sub(1);
                s.in_place_writes = s.in_place_writes.saturating_sub(1);
                if let Some(i) = self.inplace.iter().position(|e| e.0 == key) {
                    self.inplace.swap_remove(i);
                }
            }
        }
    }

    /// A read of segment `seg` finished: GC may reclaim it again once none is left.
    #[inline]
    fn unpin_segment(&mut self, seg: usize) {
        if let Some(n) = self.reads_per_seg.get_mut(seg) {
            *n = n.saturating_sub(1);
        }
    }

    /// The in-place rewrite at `lba` finished (writeback may copy the range again): the
    /// request's result.
    #[inline]
    fn in_place_done(&mut self, lba: u64, result: Result<(), IoError>) -> ReqResult {
        if let Some(i) = self.inplace.iter().position(|e| e.0 == lba) {
            self.inplace.swap_remove(i);
        }
        result.map_err(|_| {
            self.stats.io_errors += 1;
            ReqError::Io
        })
    }

    fn start_read(&mut self, r: ShardRequest) {
        let read = self.reads.insert(ReadCtx {
            req: r.id,
            pending: 0,
            error: None,
        });
        let mut pieces = std::mem::take(&mut self.scratch);
        self.index.lookup(r.lba, r.len, &mut pieces);
        // Pass-through serves only dirty data from the cache, and fills nothing; the
        // sequential cut-off fills nothing either.
        let serve_clean = self.cfg.mode != CacheMode::PassThrough;
        let seq = self.seq_bypass(r.lba, r.len, false);
        let fill = self.fills_misses() && !seq;
        let mut unfilled = 0u64;
        if pieces.iter().any(|p| p.extent.is_some_and(|e| e.is_data())) {
            // Hits: their extents were read (GC gives them a second chance).
            self.index.touch(r.lba, r.len);
        }
        let mut issued = 0;
        for p in &pieces {
            let buf_off = r.buf_off + (p.lba - r.lba) * 512;
            let buf = Buf::Req {
                req: r.id,
                off: buf_off,
                len: u64::from(p.len) * 512,
            };
            let src = match p.extent {
                Some(e) if e.is_data() && (serve_clean || e.state() == State::Dirty) => {
                    self.stats.read_hit_sectors += u64::from(p.len);
                    let verify = e.crc().filter(|_| p.whole);
                    let seg = self.seg_of(e.pos) as usize;
                    if let Some(n) = self.reads_per_seg.get_mut(seg) {
                        *n += 1;
                    }
                    let tag = self.tag(TagOwner::Read {
                        read,
                        lba: p.lba,
                        len: p.len,
                        buf_off,
                        src: ReadSrc::Cache { ext: e },
                    });
                    self.out.commands.push(Command::Read {
                        tag,
                        dev: Dev::Cache,
                        sector: e.pos,
                        buf,
                        verify_crc: verify,
                    });
                    issued += 1;
                    continue;
                }
                // Pass-through: clean data is read where it also is.
                Some(e) if e.state() == State::Clean => ReadSrc::Backing { fill: None },
                Some(e) if e.state() == State::Poisoned => {
                    self.stats.poisoned_reads += 1;
                    if let Some(ctx) = self.reads.get_mut(read) {
                        ctx.error.get_or_insert(ReqError::Corrupt);
                    }
                    continue;
                }
                Some(e) if e.state() != State::Placeholder => {
                    self.stats.read_hit_sectors += u64::from(p.len);
                    self.out.commands.push(Command::ZeroBuf { buf });
                    continue;
                }
                // A fill of the same range is already in flight: just read the backing.
                Some(_) => ReadSrc::Backing { fill: None },
                // No fill under a write in flight to the backing device: it could read the
                // older data.
                None if fill
                    && !self.fwd_overlaps(p.lba, p.len)
                    && self.declines_fill(p.lba, p.len) =>
                {
                    ReadSrc::Backing { fill: None }
                }
                None if fill && !self.fwd_overlaps(p.lba, p.len) => {
                    let id = self.next_fill;
                    self.next_fill += 1;
                    self.index
                        .insert(p.lba, Extent::new(id, p.len, State::Placeholder, None, 0));
                    ReadSrc::Backing { fill: Some(id) }
                }
                None => {
                    unfilled += u64::from(p.len);
                    ReadSrc::Backing { fill: None }
                }
            };
            self.stats.read_miss_sectors += u64::from(p.len);
            self.issue_backing_read(read, p.lba, p.len, buf_off, src, r.id);
            issued += 1;
        }
        self.scratch = pieces;
        if seq && unfilled > 0 {
            self.stats.seq_bypass_requests += 1;
            self.stats.seq_bypass_sectors += unfilled;
        }
        if let Some(ctx) = self.reads.get_mut(read) {
            ctx.pending = issued;
        }
        self.maybe_finish_read(read);
    }

    /// Serves a read entirely from cached data, at once: `copy(cache_sector, buf_off,
    /// bytes)` moves each piece from the cache media into the request's buffer (for a host
    /// whose cache is mapped memory, or synchronous). None: the read needs the normal path
    /// (a miss or a hole, zeroed or unmapped ranges, a fill in flight, data CRCs to verify,
    /// a failed shard). Some(false): a copy failed.
    ///
    /// As consistent as the normal path: the index only names data that is durable (or
    /// being rewritten in place by a write in flight, which a concurrent read may see either
    /// way), and no segment can be reclaimed while the copies run.
    pub fn read_inline(
        &mut self,
        lba: u64,
        len: u32,
        copy: &mut dyn FnMut(u64, u64, u64) -> bool,
    ) -> Option<bool> {
        if self.failed || self.cfg.data_crc {
            return None;
        }
        let pt = self.cfg.mode == CacheMode::PassThrough;
        let servable = |e: &Extent| e.is_data() && !(pt && e.state() == State::Clean);
        // One extent covers it (any 4 KiB hit): found in the hints' line the host
        // prefetched, with no walk of the map's bucket (and heated there).
        let ok = if let Some(e) = self.index.covering_touch(lba, len) {
            if !servable(&e) {
                return None;
            }
            copy(e.pos, 0, u64::from(len) * 512)
        } else {
            let mut pieces = std::mem::take(&mut self.scratch);
            self.index.lookup(lba, len, &mut pieces);
            let res = pieces
                .iter()
                .all(|p| p.extent.is_some_and(|e| servable(&e)))
                .then(|| {
                    pieces.iter().all(|p| {
                        p.extent.is_some_and(|e| {
                            copy(e.pos, (p.lba - lba) * 512, u64::from(p.len) * 512)
                        })
                    })
                });
            self.scratch = pieces;
            let ok = res?;
            self.index.touch(lba, len);
            ok
        };
        self.stats.reads += 1;
        self.stats.read_hit_sectors += u64::from(len);
        self.stats.inline_reads += 1;
        Some(ok)
    }

    fn issue_backing_read(
        &mut self,
        read: u32,
        lba: u64,
        len: u32,
        buf_off: u64,
        src: ReadSrc,
        req: ReqId,
    ) {
        let tag = self.tag(TagOwner::Read {
            read,
            lba,
            len,
            buf_off,
            src,
        });
        self.out.commands.push(Command::Read {
            tag,
            dev: Dev::Backing,
            sector: lba,
            buf: Buf::Req {
                req,
                off: buf_off,
                len: u64::from(len) * 512,
            },
            verify_crc: None,
        });
    }

    /// GC's move of a clean extent will not happen (no space at the head, the copy
    /// failed, the log closed): the extent leaves the index if it is still there, in the
    /// reclaimed segment, and that segment is unpinned.
    fn abort_move(&mut self, lba: u64, len: u32, src: u64) {
        self.move_done();
        self.stats.readmit_dropped += 1;
        self.index.drop_clean_at(lba, len, src);
        self.unpin_segment(self.seg_of(src) as usize);
    }

    /// Reads a piece of clean cached data from the backing device instead (its cache copy
    /// failed its CRC or its read).
    fn reread_from_backing(&mut self, read: u32, lba: u64, len: u32, buf_off: u64) {
        let req = self.reads.get(read).map(|c| c.req).unwrap_or_default();
        let src = ReadSrc::Backing { fill: None };
        self.issue_backing_read(read, lba, len, buf_off, src, req);
    }

    fn maybe_finish_read(&mut self, read: u32) {
        if self.reads.get(read).is_some_and(|c| c.pending == 0) {
            if let Some(ctx) = self.reads.remove(read) {
                let res = ctx.error.map_or(Ok(()), Err);
                self.out.completions.push((ctx.req, res));
            }
        }
    }

    fn read_piece_done(&mut self, read: u32) {
        if let Some(ctx) = self.reads.get_mut(read) {
            ctx.pending -= 1;
        }
        self.maybe_finish_read(read);
    }

    fn read_fail(&mut self, read: u32, err: ReqError) {
        if let Some(ctx) = self.reads.get_mut(read) {
            ctx.error.get_or_insert(err);
        }
        self.read_piece_done(read);
    }

    /// Gives the shard a segment from the pool.
    pub fn grant(&mut self, g: Grant) {
        self.wanted = self.wanted.saturating_sub(1);
        self.write_segment_header(g);
    }

    fn write_segment_header(&mut self, g: Grant) {
        self.preparing += 1;
        let tag = self.tag(TagOwner::SegHeader {
            seg: g.seg,
            gen: g.gen,
        });
        let hdr = SegmentHeader {
            seg: g.seg,
            gen: g.gen,
            shard: self.cfg.id,
        }
        .encode(self.cfg.crc_seed);
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Cache,
            sector: self.cfg.geo.segment_start(g.seg),
            buf: Buf::Owned(self.cfg.geo.whole_blocks(hdr)),
            want_crc: false,
        });
    }

    /// Turns queued log operations into batches (a kset and its data) and issues their
    /// writes.
    pub fn poll(&mut self) {
        let meta_ready = self.meta.ready(self.now);
        if self.head_header == HeadHeader::Needed && meta_ready {
            self.head_header = HeadHeader::InFlight;
            self.write_segment_header(Grant {
                seg: self.head.seg,
                gen: self.head.gen,
            });
        }
        if meta_ready {
            self.retry_cache_writes();
        }
        self.expire_pending();
        if self.meta.since().is_some() && self.now >= self.cfg.wb.io_timeout_ms {
            self.expire_batched();
        }
        self.form_batches();
        if meta_ready {
            self.ask_for_segments();
        }
        if !self.fwd_retry.is_empty() {
            self.retry_fwd();
        }
        if !self.through_wait.is_empty() {
            // Before writeback, which would copy what waits to be written through.
            self.poll_through();
        }
        self.writeback_poll();
    }

    /// Fails the requests that waited for space (or for the log) past the I/O timeout: a
    /// block device must answer, even when it cannot make progress.
    fn expire_pending(&mut self) {
        let timeout = self.cfg.wb.io_timeout_ms;
        while let Some(p) = self.pending.front().copied() {
            if self.now < p.since.saturating_add(timeout) {
                return;
            }
            self.pending.pop_front();
            match p.op {
                LogOp::Fill { read, fill, .. } => {
                    self.stats.fill_bypass += 1;
                    self.index.abort_fill(fill, p.lba, p.len);
                    self.read_piece_done(read);
                }
                LogOp::Move { src, .. } => self.abort_move(p.lba, p.len, src),
                LogOp::Write { req, .. } | LogOp::Zeroes { req } | LogOp::Unmap { req } => {
                    if self.stats.timed_out == 0 || self.pending.is_empty() {
                        self.out.log.push(format!(
                            "shard {}: a request at lba {}+{} waited {} ms for cache space \
                             (writeback {}); failing it",
                            self.cfg.id,
                            p.lba,
                            p.len,
                            self.now - p.since,
                            self.writeback_state().describe(),
                        ));
                    }
                    self.stats.timed_out += 1;
                    self.out.completions.push((req, Err(ReqError::TimedOut)));
                }
                LogOp::Invalidate { fwd, .. } => {
                    self.stats.timed_out += 1;
                    self.fwd_inval_failed(fwd, ReqError::TimedOut);
                }
            }
        }
    }

    /// While the cache device's writes fail and are retried, fails the requests in
    /// batches that have waited past the I/O timeout (their keys may still be logged: a
    /// failed write may land).
    fn expire_batched(&mut self) {
        let deadline = self.now.saturating_sub(self.cfg.wb.io_timeout_ms);
        let mut late = Vec::new();
        for b in self.batches.iter_mut() {
            for e in b.entries.iter_mut() {
                if e.answered || e.failed || e.p.since > deadline {
                    continue;
                }
                match e.p.op {
                    LogOp::Write { req, .. } | LogOp::Zeroes { req } | LogOp::Unmap { req } => {
                        e.answered = true;
                        late.push((req, None));
                    }
                    LogOp::Invalidate { req, fwd } => {
                        e.answered = true;
                        // Not durable yet, maybe never: as in `fwd_inval_failed`.
                        self.ghosts = true;
                        late.push((req, Some(fwd)));
                    }
                    LogOp::Fill { .. } | LogOp::Move { .. } => {}
                }
            }
        }
        for (req, fwd) in late {
            self.stats.timed_out += 1;
            match fwd {
                // Its entry may still be logged: the forwarded write waits for that.
                Some(fwd) => self.fwd_answer(fwd, Err(ReqError::TimedOut)),
                None => self.out.completions.push((req, Err(ReqError::TimedOut))),
            }
        }
    }

    /// Reissues the cache writes that failed, once the backoff allows.
    fn retry_cache_writes(&mut self) {
        for (seq, entry) in std::mem::take(&mut self.retry_data) {
            self.stats.cache_write_retries += 1;
            self.write_data(seq, entry as usize);
        }
        for i in 0..self.batches.len() {
            if self.batches[i].state == BatchState::KsetRetry {
                self.batches[i].state = BatchState::KsetInFlight;
                self.stats.kset_retries += 1;
                let seq = self.batches[i].seq;
                let (bytes, crc, _) = self.encode_kset(i);
                debug_assert_eq!(crc, self.batches[i].crc, "a kset encoded again differs");
                self.write_kset(i, seq, bytes);
            }
        }
    }

    /// A cache-device write that first failed at `first_fail` failed (again): true while
    /// it should be retried (its failures have not yet lasted the I/O timeout).
    fn cache_write_failed(&mut self, first_fail: u64, what: std::fmt::Arguments) -> bool {
        self.stats.io_errors += 1;
        self.stats.cache_write_errors += 1;
        if self.meta.fail(self.now) {
            self.out.log.push(format!(
                "shard {}: cache device write failed: {what}; retrying",
                self.cfg.id
            ));
        }
        self.now.saturating_sub(first_fail) < self.cfg.wb.io_timeout_ms
    }

    /// A cache-device write succeeded: a failure burst, if any, is over.
    fn cache_write_ok(&mut self) {
        if let Some((n, since)) = self.meta.succeed() {
            self.out.log.push(format!(
                "shard {}: cache device writes succeed again after {n} failures over {} ms",
                self.cfg.id,
                self.now - since
            ));
        }
    }

    #[inline]
    fn seg_of(&self, pos: u64) -> u32 {
        let g = &self.cfg.geo;
        super::geometry::div(
            pos.saturating_sub(g.segments_start),
            u64::from(g.segment_sectors),
        ) as u32
    }

    /// Writes the data of entry `entry` of batch `seq` to its place in the segment.
    fn write_data(&mut self, seq: u64, entry: usize) {
        let Some(i) = self.batch_index(seq) else {
            return;
        };
        let b = &self.batches[i];
        let Some(e) = b.entries.get(entry) else {
            return;
        };
        let sector = self.cfg.geo.segment_start(b.pos.seg) + u64::from(e.data_off);
        let (op, len) = (e.p.op, e.p.len);
        if let LogOp::Move { src, crc, .. } = op {
            let tag = self.tag(TagOwner::Data {
                seq,
                entry: entry as u32,
            });
            self.out.commands.push(Command::Copy {
                tag,
                src: Dev::Cache,
                src_sector: src,
                dst: Dev::Cache,
                dst_sector: sector,
                sectors: u64::from(len),
                verify: crc.map(|crc| Verify {
                    sector: src,
                    sectors: u64::from(len),
                    crc,
                }),
            });
            return;
        }
        let (LogOp::Write { req, buf_off } | LogOp::Fill { req, buf_off, .. }) = op else {
            return;
        };
        let len = u64::from(len) * 512;
        let tag = self.tag(TagOwner::Data {
            seq,
            entry: entry as u32,
        });
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Cache,
            sector,
            buf: Buf::Req {
                req,
                off: buf_off,
                len,
            },
            want_crc: self.cfg.data_crc,
        });
    }

    fn ask_for_segments(&mut self) {
        while self.ready.len() as u32 + self.preparing + self.wanted < RESERVE_SEGMENTS {
            self.wanted += 1;
            self.out.to_pool.push(ToPool::Need { shard: self.cfg.id });
        }
    }

    /// Queues some of GC's moves when no request waits to be batched, up to
    /// [`MAX_MOVES_OUT`] at once: true if any.
    fn feed_moves(&mut self) -> bool {
        let room = MAX_MOVES_OUT.saturating_sub(self.moves_out);
        let n = self.moves.len().min(MAX_KSET_KEYS).min(room);
        self.pending.extend(self.moves.drain(..n));
        self.moves_out += n;
        n > 0
    }

    /// A move taken from `moves` was committed or dropped (within a completion, which the
    /// host follows with a poll: `form_batches` feeds the next).
    fn move_done(&mut self) {
        debug_assert!(self.moves_out > 0, "a move done that was never fed");
        self.moves_out = self.moves_out.saturating_sub(1);
    }

    /// Forms the next batch from the pending entries: one batch at a time (group commit).
    /// While a batch is being written (data, then kset), what arrives waits and goes
    /// together in the next one, which grows with the load. Each batch costs a kset write
    /// and its completion besides its data; at θ 0.8 randrw over a malloc cache this cut
    /// ksets by a third and gained about 2 % IOPS side by side (22 rounds; over a mapped
    /// cache, whose ksets are stores, nothing; randread +0.8 %).
    fn form_batches(&mut self) {
        self.stalled = false;
        while !self.failed && (!self.pending.is_empty() || self.feed_moves()) {
            if self.head_header != HeadHeader::Durable {
                return;
            }
            if !self.batches.is_empty() {
                return;
            }
            // One block between the ksets and the data stays free for a link kset.
            let limit = self.data_low.saturating_sub(self.cfg.geo.block_sectors);
            let mut n = 0usize;
            let mut data = 0u32;
            for p in self.pending.iter().take(MAX_KSET_KEYS) {
                let d = p.data_sectors();
                if self.head.off + self.cfg.geo.kset_sectors(n + 1) + data + d > limit {
                    break;
                }
                n += 1;
                data += d;
            }
            if n > 0 {
                let (n, start) = self.place_batch(n, data, limit);
                self.build_batch(n, start);
                continue;
            }
            // Nothing fits in this segment: move to a ready one, or wait for space.
            let front = self.pending.front().copied();
            if let Some(p) = front {
                if let LogOp::Fill { read, fill, .. } = p.op {
                    // Fills never wait for space: the read completes without caching. Nor
                    // do they open a segment while GC's second chances (moves) wait: a move
                    // frees the segment it copies from only once it is logged, so fills
                    // must not take the ready segments the moves need (the scan test found
                    // moves waiting for a segment only their own commit would free).
                    if self.ready.is_empty()
                        || !self.moves.is_empty()
                        || self
                            .pending
                            .iter()
                            .any(|q| matches!(q.op, LogOp::Move { .. }))
                    {
                        self.pending.pop_front();
                        self.stats.fill_bypass += 1;
                        self.index.abort_fill(fill, p.lba, p.len);
                        self.read_piece_done(read);
                        continue;
                    }
                }
            }
            if let Some(g) = self.ready.pop_front() {
                self.link_to(g);
                continue;
            }
            if let Some(front) = front {
                if let LogOp::Move { src, .. } = front.op {
                    // GC's moves wait briefly for a segment already on its way, unless a
                    // write waits behind them; else the extent is dropped: a move pins the
                    // segment it copies from, which the pool may need back.
                    let coming = self.preparing + self.wanted > 0;
                    let writes = self.pending.iter().any(|p| !p.op.takes_placeholder());
                    if coming && !writes && self.now < front.since + MOVE_WAIT_MS {
                        return;
                    }
                    self.pending.pop_front();
                    self.abort_move(front.lba, front.len, src);
                    continue;
                }
            }
            if !self.stalled {
                self.stats.cache_full_waits += 1;
            }
            self.stalled = true;
            self.full_cache_around();
            return;
        }
    }

    /// Writes a key-less kset at the head that moves the log to segment `g`.
    fn link_to(&mut self, g: Grant) {
        let next = LogPos {
            seg: g.seg,
            gen: g.gen,
            off: self.cfg.geo.first_kset_off(),
        };
        self.segments.push_back(SegRec {
            seg: g.seg,
            gen: g.gen,
            first: LogTail {
                pos: next,
                seq: self.next_seq + 1,
                prev_crc: 0, // the link kset's CRC, known once it is encoded
            },
        });
        let batch = Batch {
            seq: self.next_seq,
            pos: self.head,
            next,
            entries: Vec::new(),
            data_pending: 0,
            state: BatchState::Ready,
            prev_crc: 0,
            crc: 0,
            attempts: 0,
            first_fail: None,
        };
        self.next_seq += 1;
        self.head = next;
        self.data_low = self.cfg.geo.segment_sectors;
        self.batches.push_back(batch);
        self.encode_ready();
    }

    /// How many of the `n` pending entries that fit (`data` sectors of data) to take, and
    /// the sector where their data starts: just below the data already in the segment,
    /// moved down to a 4 KiB boundary when the batch's data is whole 4 KiB blocks. A 4 KiB
    /// block then lies in one page, which the CPU's prefetchers (they stop at page edges)
    /// and mapped-memory copies handle best. Data below a block that is not whole (a
    /// 512-byte write) is realigned by the next batch of whole blocks, leaving at most 7
    /// sectors unused. If that gap does not fit, trailing entries wait for the next batch.
    /// Keys name their data's offset, so replay needs nothing.
    fn place_batch(&self, mut n: usize, mut data: u32, limit: u32) -> (usize, u32) {
        let seg_start = self.cfg.geo.segment_start(self.head.seg);
        let all = (n, self.data_low - data);
        loop {
            let start = self.data_low - data;
            let pad = if data > 0 && data % 8 == 0 {
                ((seg_start + u64::from(start)) % 8) as u32
            } else {
                0
            };
            if pad == 0 {
                return (n, start);
            }
            if self.head.off + self.cfg.geo.kset_sectors(n) + pad + data <= limit {
                return (n, start - pad);
            }
            if n == 1 {
                return all;
            }
            n -= 1;
            data -= self.pending.get(n).map_or(0, Pending::data_sectors);
        }
    }

    /// Takes the first `n` pending entries into a batch whose kset goes at the head and
    /// whose data starts at sector `start` of the head segment.
    fn build_batch(&mut self, n: usize, start: u32) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let pos = self.head;
        let mut off = start;
        let mut entries = self.reuse.entries();
        entries.reserve(n);
        let mut data_pending = 0;
        for _ in 0..n {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let data_off = off;
            match p.op {
                LogOp::Write { .. } | LogOp::Fill { .. } | LogOp::Move { .. } => {
                    data_pending += 1;
                    off += p.len;
                }
                LogOp::Zeroes { .. } | LogOp::Unmap { .. } | LogOp::Invalidate { .. } => {}
            }
            if !p.op.takes_placeholder() {
                // Logged after any fill still in flight there, so that fill must not commit.
                self.index.punch_placeholders(p.lba, p.len);
            }
            entries.push(Entry {
                p,
                data_off,
                crc: None,
                failed: false,
                logged: false,
                first_fail: None,
                written: false,
                answered: false,
            });
        }
        let next = LogPos {
            off: pos.off + self.cfg.geo.kset_sectors(n),
            ..pos
        };
        self.head = next;
        self.data_low = start;
        let count = entries.len();
        self.batches.push_back(Batch {
            seq,
            pos,
            next,
            entries,
            data_pending,
            state: if data_pending == 0 {
                BatchState::Ready
            } else {
                BatchState::Data
            },
            prev_crc: 0,
            crc: 0,
            attempts: 0,
            first_fail: None,
        });
        let at = self.batches.len() - 1;
        for i in 0..count {
            if self.batches[at].entries[i].p.data_sectors() > 0 {
                self.write_data(seq, i);
            }
        }
        self.encode_ready();
    }

    /// Encodes and writes the ksets of batches whose data is durable, in log order (each
    /// kset carries the CRC of the one before it).
    fn encode_ready(&mut self) {
        for i in 0..self.batches.len() {
            match self.batches[i].state {
                BatchState::KsetInFlight | BatchState::KsetRetry | BatchState::Durable => continue,
                BatchState::Data => return,
                BatchState::Ready => {}
            }
            self.choose_logged(i);
            self.batches[i].prev_crc = self.prev_crc;
            let (bytes, crc, keys) = self.encode_kset(i);
            self.prev_crc = crc;
            let b = &mut self.batches[i];
            b.crc = crc;
            if b.next.seg != b.pos.seg {
                let next = b.next;
                if let Some(r) = self.segments.iter_mut().rev().find(|r| r.first.pos == next) {
                    r.first.prev_crc = crc;
                }
            }
            b.state = BatchState::KsetInFlight;
            self.stats.ksets_written += 1;
            self.stats.keys_written += keys as u64;
            let seq = b.seq;
            self.write_kset(i, seq, bytes);
        }
    }

    /// Marks the entries of batch `i` that its kset logs: every one not failed, except
    /// fills and moves whose range was written since they started.
    fn choose_logged(&mut self, i: usize) {
        // Ranges written by earlier batches not yet applied to the index: a fill that
        // overlaps one would be replayed after it and shadow it with stale data.
        let mut earlier = std::mem::take(&mut self.reuse.earlier);
        earlier.clear();
        earlier.extend(
            self.batches
                .iter()
                .take(i)
                .flat_map(|b| b.entries.iter())
                .filter(|e| !e.failed && !e.p.op.takes_placeholder())
                .map(|e| (e.p.lba, e.p.len)),
        );
        // Entries from here up to the current one are not yet in `earlier`.
        let mut seen = 0;
        for j in 0..self.batches[i].entries.len() {
            let e = &self.batches[i].entries[j];
            if e.failed {
                continue;
            }
            let p = e.p;
            if matches!(p.op, LogOp::Move { .. }) {
                // A move has no placeholder for a write to punch: a write ahead of it in
                // this very batch (logged before it in the kset) shadows it too.
                earlier.extend(
                    self.batches[i].entries[seen..j]
                        .iter()
                        .filter(|e| e.logged && !e.p.op.is_clean())
                        .map(|e| (e.p.lba, e.p.len)),
                );
                seen = j;
            }
            if let LogOp::Fill { .. } | LogOp::Move { .. } = p.op {
                let intact = match p.op {
                    LogOp::Fill { fill, .. } => {
                        self.index.placeholder_pieces(fill, p.lba, p.len) == [(p.lba, p.len)]
                    }
                    LogOp::Move { src, .. } => self.index.holds_clean(p.lba, p.len, src),
                    _ => false,
                };
                let end = p.lba + u64::from(p.len);
                let shadowed = earlier
                    .iter()
                    .any(|&(l, n)| l < end && p.lba < l + u64::from(n));
                if !intact || shadowed {
                    continue;
                }
            }
            self.batches[i].entries[j].logged = true;
        }
        self.reuse.earlier = earlier;
    }

    /// Batch `i`'s kset, padded to whole blocks, its CRC and its key count: from the
    /// entries it logs, so the same bytes every time (a failed kset write is retried
    /// with them; later ksets chain to its CRC).
    fn encode_kset(&mut self, i: usize) -> (Vec<u8>, u32, usize) {
        let mut keys = std::mem::take(&mut self.reuse.keys);
        keys.clear();
        let b = &self.batches[i];
        keys.extend(b.entries.iter().filter(|e| e.logged).map(|e| {
            let p = e.p;
            let kind = match p.op {
                LogOp::Write { .. } | LogOp::Fill { .. } | LogOp::Move { .. } => KeyKind::Data,
                LogOp::Zeroes { .. } => KeyKind::Zeroes,
                LogOp::Unmap { .. } | LogOp::Invalidate { .. } => KeyKind::Unmap,
            };
            Key {
                lba: p.lba,
                len: p.len,
                kind,
                data_off: if kind == KeyKind::Data { e.data_off } else { 0 },
                gen: b.pos.gen,
                epoch: p.epoch,
                clean: p.op.is_clean(),
                crc: e.crc,
            }
        }));
        let kset = Kset {
            seq: b.seq,
            prev_crc: b.prev_crc,
            shard: self.cfg.id,
            pos: b.pos,
            next: b.next,
            // What its batch reserved at the head for all its entries' keys (format
            // v2); failed entries and shadowed fills log none, so the kset may be shorter.
            region_sectors: self.cfg.geo.kset_sectors(b.entries.len()),
            keys,
        };
        let mut bytes = self.reuse.buf();
        let crc = kset.encode_into(self.cfg.crc_seed, &mut bytes, self.cfg.geo.block_bytes());
        let n = kset.keys.len();
        self.reuse.keys = kset.keys;
        (bytes, crc, n)
    }

    fn write_kset(&mut self, i: usize, seq: u64, bytes: Vec<u8>) {
        let pos = self.batches[i].pos;
        self.batches[i].attempts += 1;
        let tag = self.tag(TagOwner::Kset { seq });
        let sector = self.seg_sector(pos);
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Cache,
            sector,
            buf: Buf::Owned(bytes),
            want_crc: false,
        });
    }

    fn batch_index(&self, seq: u64) -> Option<usize> {
        let first = self.batches.front()?.seq;
        let i = seq.checked_sub(first)? as usize;
        (i < self.batches.len()).then_some(i)
    }

    /// Loads the index lines that completing command `tag` will change (see
    /// [`Cache::warm_dones`](super::Cache::warm_dones)): a writeback copy marks its extent
    /// clean, a kset puts its keys in the index.
    #[inline]
    pub fn warm_done(&self, tag: Tag) {
        match self.tags.get(tag_slot(tag)) {
            Some(TagOwner::Wb(WbIo::Copy { lba, .. })) => {
                self.index.warm_all(std::iter::once(*lba))
            }
            Some(TagOwner::Kset { seq }) => {
                if let Some(b) = self.batch_index(*seq).and_then(|i| self.batches.get(i)) {
                    self.index.warm_all(b.entries.iter().map(|e| e.p.lba));
                }
            }
            _ => {}
        }
    }

    /// Takes back the buffer of a [`Buf::Owned`] write of this shard once the device has
    /// it, to encode a later kset into (no allocation per kset).
    pub fn give_back(&mut self, buf: Vec<u8>) {
        self.reuse.give_buf(buf);
    }

    /// Takes a device completion.
    pub fn complete(&mut self, done: IoDone) {
        let local = tag_slot(done.tag);
        let Some(owner) = self.tags.remove(local) else {
            self.out.log.push(format!(
                "shard {}: completion for unknown tag {:#x}",
                self.cfg.id, done.tag
            ));
            return;
        };
        match owner {
            TagOwner::Data { seq, entry } => self.data_done(seq, entry as usize, done),
            TagOwner::Kset { seq } => self.kset_done(seq, done.result),
            TagOwner::SegHeader { seg, gen } => {
                self.preparing -= 1;
                match done.result {
                    Ok(()) if self.head_header == HeadHeader::InFlight && seg == self.head.seg => {
                        self.cache_write_ok();
                        self.head_header = HeadHeader::Durable;
                    }
                    Ok(()) => {
                        self.cache_write_ok();
                        self.ready.push_back(Grant { seg, gen });
                    }
                    Err(_) if self.head_header == HeadHeader::InFlight && seg == self.head.seg => {
                        let now = self.now;
                        self.cache_write_failed(now, format_args!("header of segment {seg}"));
                        self.head_header = HeadHeader::Needed;
                    }
                    Err(_) => {
                        let now = self.now;
                        self.cache_write_failed(now, format_args!("header of segment {seg}"));
                        self.out.to_pool.push(ToPool::Release { seg });
                    }
                }
            }
            TagOwner::Wb(io) => self.wb_done(io, done.result),
            TagOwner::WbFlush => self.wb_flush_done(done.result),
            TagOwner::Fwd { id } => self.fwd_done(id, done.result),
            TagOwner::BackingFlush => self.backing_flush_done(done.result),
            TagOwner::Control => self.control_done(done.result),
            TagOwner::InPlace {
                req,
                lba,
                len,
                buf_off,
            } => match self.in_place_done(lba, done.result) {
                Ok(()) => self.out.completions.push((req, Ok(()))),
                Err(_) => {
                    // Written again through the log, whose data writes are retried.
                    self.stats.cache_write_errors += 1;
                    if self.meta.fail(self.now) {
                        self.out.log.push(format!(
                            "shard {}: cache device write failed: in-place rewrite of lba \
                             {lba}+{len}; retrying through the log",
                            self.cfg.id
                        ));
                    }
                    let r = ShardRequest {
                        id: req,
                        op: Op::Write,
                        lba,
                        len,
                        buf_off,
                    };
                    self.queue(r, LogOp::Write { req, buf_off });
                }
            },
            TagOwner::Read {
                read,
                lba,
                len,
                buf_off,
                src,
            } => self.read_done(read, lba, len, buf_off, src, done.result),
        }
    }

    fn data_done(&mut self, seq: u64, entry: usize, done: IoDone) {
        let Some(i) = self.batch_index(seq) else {
            return;
        };
        let b = &self.batches[i];
        let Some(e) = b.entries.get(entry) else {
            return;
        };
        let is_fill = e.p.op.takes_placeholder();
        let at = self.cfg.geo.segment_start(b.pos.seg) + u64::from(e.data_off);
        let (lba, len) = (e.p.lba, e.p.len);
        if done.result.is_err() && !is_fill {
            let first = *self.batches[i].entries[entry]
                .first_fail
                .get_or_insert(self.now);
            // Half the I/O timeout: the batch's other writes wait for this one, and must
            // still be acknowledged in time when it is given up.
            self.cache_write_failed(
                first,
                format_args!("data of lba {lba}+{len} at cache sector {at}"),
            );
            let retry = self.now.saturating_sub(first) < self.cfg.wb.io_timeout_ms / 2;
            if retry {
                // The batch keeps waiting for this entry; the same bytes go to the same place.
                self.retry_data.push((seq, entry as u32));
                return;
            }
        } else if done.result.is_ok() {
            self.cache_write_ok();
        }
        let b = &mut self.batches[i];
        let Some(e) = b.entries.get_mut(entry) else {
            return;
        };
        b.data_pending -= 1;
        e.written = true;
        let mut failed_req = None;
        match done.result {
            // A move's copy reports no CRC: its key carries the extent's own.
            Ok(()) => match e.p.op {
                LogOp::Move { crc, .. } => e.crc = crc,
                _ => e.crc = done.crc,
            },
            Err(_) => {
                e.failed = true;
                failed_req = (!e.answered).then_some(e.p);
            }
        }
        let p = e.p;
        if let LogOp::Fill { read, fill, .. } = p.op {
            // The read's data is in its buffer; it no longer needs to wait for the fill.
            if failed_req.is_some() {
                self.index.abort_fill(fill, p.lba, p.len);
                failed_req = None;
            }
            self.read_piece_done(read);
        }
        if let LogOp::Move { .. } = p.op {
            // A failed copy logs no key; `retire` drops the extent and unpins its segment.
            failed_req = None;
            if done.result == Err(IoError::CrcMismatch) {
                // Cached data found corrupt by GC's copy is reported like a read's.
                self.stats.crc_errors += 1;
            }
        }
        if self.batches[i].data_pending == 0 && self.batches[i].state == BatchState::Data {
            self.batches[i].state = BatchState::Ready;
        }
        if let Some(p) = failed_req {
            // Only the request whose data did not land fails; its key stays out of the kset.
            if let LogOp::Write { req, .. } = p.op {
                self.out.completions.push((req, Err(ReqError::Io)));
            }
        }
        self.encode_ready();
    }

    fn kset_done(&mut self, seq: u64, result: Result<(), IoError>) {
        let Some(i) = self.batch_index(seq) else {
            return;
        };
        match result {
            Ok(()) => {
                self.cache_write_ok();
                self.batches[i].state = BatchState::Durable;
                self.retire();
            }
            Err(_) => {
                let at = self.seg_sector(self.batches[i].pos);
                let first = *self.batches[i].first_fail.get_or_insert(self.now);
                if self.cache_write_failed(first, format_args!("kset {seq} at cache sector {at}")) {
                    // Rewrite the same bytes later: later ksets already chain to its CRC.
                    self.batches[i].state = BatchState::KsetRetry;
                } else {
                    self.fail_log(i);
                }
            }
        }
    }

    /// The kset at batch `i` cannot be written: nothing from it on can be acknowledged.
    fn fail_log(&mut self, i: usize) {
        self.out.log.push(format!(
            "shard {}: the cache device kept failing the write of a kset for {} ms ({} \
             attempts at kset {}); the log is closed: writes fail, cached data stays readable \
             and is written back; reattach once the device is healthy",
            self.cfg.id,
            self.cfg.wb.io_timeout_ms,
            self.batches.get(i).map_or(0, |b| b.attempts),
            self.batches.get(i).map_or(0, |b| b.seq),
        ));
        self.failed = true;
        let doomed: Vec<Batch> = self.batches.drain(i..).collect();
        self.retry_data
            .retain(|&(seq, _)| doomed.iter().all(|b| b.seq != seq));
        for b in doomed {
            for e in b.entries {
                self.fail_entry(&e);
            }
        }
        let moves = std::mem::take(&mut self.moves);
        self.moves_out += moves.len();
        self.pending.extend(moves);
        while let Some(p) = self.pending.pop_front() {
            let e = Entry {
                p,
                data_off: 0,
                crc: None,
                failed: false,
                logged: false,
                first_fail: None,
                written: false,
                answered: false,
            };
            self.fail_entry(&e);
        }
    }

    fn fail_entry(&mut self, e: &Entry) {
        match e.p.op {
            LogOp::Write { req, .. } | LogOp::Zeroes { req } | LogOp::Unmap { req }
                if !e.failed && !e.answered =>
            {
                self.out.completions.push((req, Err(ReqError::ShardFailed)));
            }
            LogOp::Write { .. } | LogOp::Zeroes { .. } | LogOp::Unmap { .. } => {}
            LogOp::Invalidate { fwd, .. } => self.fwd_inval_failed(fwd, ReqError::ShardFailed),
            LogOp::Fill { fill, read, .. } => {
                self.index.abort_fill(fill, e.p.lba, e.p.len);
                if !e.written {
                    // Its read waited for the fill's data write, which will not be awaited.
                    self.read_piece_done(read);
                }
            }
            LogOp::Move { src, .. } => self.abort_move(e.p.lba, e.p.len, src),
        }
    }

    /// Applies and acknowledges every batch at the front whose kset is durable.
    fn retire(&mut self) {
        while self
            .batches
            .front()
            .is_some_and(|b| b.state == BatchState::Durable)
        {
            let Some(b) = self.batches.pop_front() else {
                break;
            };
            let base = self.cfg.geo.segment_start(b.pos.seg);
            let mut dirty = self.reuse.dirty();
            for e in &b.entries {
                let p = e.p;
                let kind = match p.op {
                    LogOp::Write { .. } => KeyKind::Data,
                    LogOp::Zeroes { .. } => KeyKind::Zeroes,
                    LogOp::Unmap { .. } => KeyKind::Unmap,
                    LogOp::Fill { .. } | LogOp::Invalidate { .. } | LogOp::Move { .. } => continue,
                };
                if e.logged && !e.failed {
                    self.log_dirty_sectors += u64::from(p.len);
                    if !self.poison.is_empty() {
                        trim_ranges(&mut self.poison, p.lba, p.len);
                    }
                    dirty.push(DirtyKey {
                        lba: p.lba,
                        len: p.len,
                        kind,
                        crc: e.crc,
                        pos: base + u64::from(e.data_off),
                        epoch: p.epoch,
                        through: false,
                    });
                }
            }
            if dirty.is_empty() {
                // Most ksets of a read-mostly log hold no dirty key and stay in it a while.
                self.reuse.give_dirty(std::mem::take(&mut dirty));
            }
            if self.log_front.is_none() {
                self.log_front = dirty.first().map(|d| DirtyFront {
                    seq: b.seq,
                    epoch: d.epoch,
                });
            }
            self.log.push_back(Logged {
                seq: b.seq,
                next: b.next,
                crc: b.crc,
                keys: dirty,
            });
            for e in &b.entries {
                let p = e.p;
                let epoch = p.epoch as u32;
                match p.op {
                    LogOp::Write { req, buf_off } if !e.failed => {
                        let pos = base + u64::from(e.data_off);
                        // Write-through: to the backing device too, if nothing older can
                        // overtake it there; answered once it landed.
                        let through = p.through
                            && !e.answered
                            && self.start_through(req, p.lba, p.len, buf_off, pos, b.seq, p);
                        self.index.insert_rewrite(
                            p.lba,
                            Extent::new(pos, p.len, State::Dirty, e.crc, epoch),
                        );
                        if !e.answered && !through {
                            self.out.completions.push((req, Ok(())));
                        }
                    }
                    LogOp::Invalidate { fwd, .. } => self.fwd_inval_done(fwd),
                    LogOp::Zeroes { req } | LogOp::Unmap { req } => {
                        let state = if matches!(p.op, LogOp::Unmap { .. }) {
                            State::Unmapped
                        } else {
                            State::Zeroes
                        };
                        self.index
                            .insert(p.lba, Extent::new(b.seq, p.len, state, None, epoch));
                        if !e.answered {
                            self.out.completions.push((req, Ok(())));
                        }
                    }
                    LogOp::Move { src, probe, .. } if e.logged => {
                        self.stats.readmits += 1;
                        self.stats.readmit_sectors += u64::from(p.len);
                        let at = base + u64::from(e.data_off);
                        self.index.commit_move(p.lba, p.len, src, at, e.crc, probe);
                        self.unpin_segment(self.seg_of(src) as usize);
                        self.move_done();
                    }
                    LogOp::Move { src, .. } => self.abort_move(p.lba, p.len, src),
                    LogOp::Fill { fill, .. } if e.logged => {
                        self.stats.fills += 1;
                        self.index.commit_fill(
                            fill,
                            p.lba,
                            p.len,
                            base + u64::from(e.data_off),
                            epoch,
                            e.crc,
                        );
                    }
                    LogOp::Fill { fill, .. } => self.index.abort_fill(fill, p.lba, p.len),
                    LogOp::Write { .. } => {}
                }
            }
            self.reuse.give_entries(b.entries);
        }
    }

    fn read_done(
        &mut self,
        read: u32,
        lba: u64,
        len: u32,
        buf_off: u64,
        src: ReadSrc,
        result: Result<(), IoError>,
    ) {
        if let ReadSrc::Cache { ext } = src {
            self.unpin_segment(self.seg_of(ext.pos) as usize);
        }
        match (src, result) {
            (ReadSrc::Cache { .. }, Ok(())) => self.read_piece_done(read),
            (ReadSrc::Cache { ext }, Err(IoError::CrcMismatch)) => {
                self.stats.crc_errors += 1;
                if ext.state() == State::Clean {
                    // Clean data is also on the backing device: drop the key, read there.
                    // The log still holds its key: writes sent around the cache from now
                    // on log an invalidation.
                    self.ghosts |= self.index.remove_if_same(lba, &ext);
                    self.out.log.push(format!(
                        "shard {}: data CRC mismatch on clean extent at lba {lba}+{len}; \
                         dropped it, reading the backing device",
                        self.cfg.id
                    ));
                    self.reread_from_backing(read, lba, len, buf_off);
                } else {
                    self.out.log.push(format!(
                        "shard {}: data CRC mismatch on dirty extent at lba {lba}+{len}; \
                         failing the read",
                        self.cfg.id
                    ));
                    self.read_fail(read, ReqError::Corrupt);
                }
            }
            (ReadSrc::Cache { ext }, Err(_)) if ext.state() == State::Clean => {
                // Clean data is also on the backing device: read it there instead.
                self.stats.io_errors += 1;
                self.stats.cache_read_fallbacks += 1;
                self.reread_from_backing(read, lba, len, buf_off);
            }
            (ReadSrc::Cache { .. }, Err(_)) => {
                self.stats.io_errors += 1;
                self.read_fail(read, ReqError::Io);
            }
            (ReadSrc::Backing { fill }, Ok(())) => {
                let Some(fill) = fill else {
                    return self.read_piece_done(read);
                };
                let intact = self.index.placeholder_pieces(fill, lba, len) == [(lba, len)];
                if !intact || self.stalled || self.failed {
                    if self.stalled {
                        self.stats.fill_bypass += 1;
                    }
                    self.index.abort_fill(fill, lba, len);
                    return self.read_piece_done(read);
                }
                let req = self.reads.get(read).map(|c| c.req).unwrap_or_default();
                self.pending.push_back(Pending {
                    op: LogOp::Fill {
                        read,
                        fill,
                        req,
                        buf_off,
                    },
                    lba,
                    len,
                    epoch: self.epoch,
                    since: self.now,
                    through: false,
                    fua: false,
                });
            }
            (ReadSrc::Backing { fill }, Err(_)) => {
                if let Some(fill) = fill {
                    self.index.abort_fill(fill, lba, len);
                }
                self.stats.io_errors += 1;
                self.read_fail(read, ReqError::Io);
            }
        }
    }

    /// Sequence of the first kset not yet written back.
    pub fn dirty_tail(&self) -> LogTail {
        self.dirty_tail
    }

    /// The current log head, for inspection.
    pub fn head(&self) -> LogPos {
        self.head
    }
}

/// The slot of command `tag` in its shard's `tags` (the tag's low 48 bits; the shard's
/// id is above them, [`Shard::tag`]).
#[inline]
fn tag_slot(tag: Tag) -> u32 {
    (tag & ((1 << 48) - 1)) as u32
}

/// Removes [lba, lba+len) from a list of ranges, splitting those it cuts.
fn trim_ranges(ranges: &mut Vec<(u64, u32)>, lba: u64, len: u32) {
    let end = lba + u64::from(len);
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(s, l) in ranges.iter() {
        let e = s + u64::from(l);
        if e <= lba || s >= end {
            out.push((s, l));
            continue;
        }
        if s < lba {
            out.push((s, (lba - s) as u32));
        }
        if e > end {
            out.push((end, (e - end) as u32));
        }
    }
    *ranges = out;
}

#[cfg(test)]
mod tests {
    use super::trim_ranges;

    #[test]
    fn trimming_splits_and_drops_ranges() {
        let mut r = vec![(0, 16), (100, 8), (200, 4)];
        trim_ranges(&mut r, 4, 4);
        assert_eq!(r, vec![(0, 4), (8, 8), (100, 8), (200, 4)]);
        trim_ranges(&mut r, 96, 20);
        assert_eq!(r, vec![(0, 4), (8, 8), (200, 4)]);
        trim_ranges(&mut r, 202, 10);
        assert_eq!(r, vec![(0, 4), (8, 8), (200, 2)]);
    }
}
