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

use super::format::{
    kset_sectors, Key, KeyKind, Kset, LogPos, LogTail, SegmentHeader, MAX_KSET_KEYS,
};
use super::geometry::Geometry;
use super::index::{Extent, ExtentMap, Piece, State};
use super::io::{
    Buf, Command, Dev, IoDone, IoError, Op, ReqError, ReqId, ReqResult, ShardRequest, Tag,
};
use super::pool::{Grant, ToPool};
use super::slab::Slab;
use super::stats::ShardStats;

mod writeback;
use writeback::{first_dirty_epoch, Control, WbIo, Writeback};
pub use writeback::{DirtyKey, Logged, SegRec, WritebackOptions};

/// Segments a shard keeps ready (header durable) beyond the one it writes.
const RESERVE_SEGMENTS: u32 = 2;
/// Attempts at writing one kset before the shard gives up its log.
const KSET_WRITE_ATTEMPTS: u8 = 3;

#[derive(Debug, Clone, Copy)]
pub struct ShardConfig {
    pub id: u32,
    pub geo: Geometry,
    pub crc_seed: u32,
    pub data_crc: bool,
    /// Insert read-miss data into the cache.
    pub read_fill: bool,
    pub wb: WritebackOptions,
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
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    op: LogOp,
    lba: u64,
    len: u32,
    epoch: u64,
}

impl Pending {
    fn data_sectors(&self) -> u32 {
        match self.op {
            LogOp::Write { .. } | LogOp::Fill { .. } => self.len,
            LogOp::Zeroes { .. } | LogOp::Unmap { .. } => 0,
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
}

#[derive(Debug)]
struct Batch {
    seq: u64,
    pos: LogPos,
    next: LogPos,
    entries: Vec<Entry>,
    data_pending: u32,
    state: BatchState,
    kset: Option<Vec<u8>>,
    crc: u32,
    attempts: u8,
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
    },
    Wb(WbIo),
    WbFlush,
    Control,
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
    /// Epoch of the first dirty key in `log` (None: it has none). Ksets of fills only
    /// stay in `log` until a writeback group passes them, so under read misses there can
    /// be many before the first dirty key: this keeps `frontier`, asked on every poll, from
    /// scanning them.
    log_front_epoch: Option<u64>,
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
    batches: VecDeque<Batch>,
    tags: Slab<TagOwner>,
    reads: Slab<ReadCtx>,
    next_fill: u64,
    failed: bool,
    stalled: bool,
    out: Outbox,
    pub stats: ShardStats,
    scratch: Vec<Piece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadHeader {
    Durable,
    Needed,
    InFlight,
}

impl Shard {
    pub fn new(cfg: ShardConfig, log: LogState, index: ExtentMap, epoch: u64) -> Self {
        Shard {
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
            log_front_epoch: first_dirty_epoch(&log.log),
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
            batches: VecDeque::new(),
            tags: Slab::new(),
            reads: Slab::new(),
            next_fill: 1,
            failed: false,
            stalled: false,
            out: Outbox::default(),
            stats: ShardStats::default(),
            scratch: Vec::new(),
        }
    }

    pub fn id(&self) -> u32 {
        self.cfg.id
    }

    pub fn index(&self) -> &ExtentMap {
        &self.index
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
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
        self.pending.is_empty() && self.batches.is_empty() && self.tags.is_empty()
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
                    self.queue(
                        r,
                        LogOp::Write {
                            req: r.id,
                            buf_off: r.buf_off,
                        },
                    );
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
            Op::Flush => self.out.completions.push((r.id, Ok(()))),
        }
    }

    fn queue(&mut self, r: ShardRequest, op: LogOp) {
        self.pending.push_back(Pending {
            op,
            lba: r.lba,
            len: r.len,
            epoch: self.epoch,
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
        if self.cfg.data_crc || self.wb.drain || self.wb.blocks(lba, len) {
            return None;
        }
        let e = self.index.get(lba)?;
        (e.state() == State::Dirty && e.len() == len && e.epoch() == Some(self.epoch as u32))
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
                let e = self.index.covering(lba, len).filter(|e| e.is_data())?;
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
        let mut issued = 0;
        for p in &pieces {
            let buf_off = r.buf_off + (p.lba - r.lba) * 512;
            let buf = Buf::Req {
                req: r.id,
                off: buf_off,
                len: u64::from(p.len) * 512,
            };
            let src = match p.extent {
                Some(e) if e.is_data() => {
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
                Some(e) if e.state() != State::Placeholder => {
                    self.stats.read_hit_sectors += u64::from(p.len);
                    self.out.commands.push(Command::ZeroBuf { buf });
                    continue;
                }
                // A fill of the same range is already in flight: just read the backing.
                Some(_) => ReadSrc::Backing { fill: None },
                None if self.cfg.read_fill && !self.failed => {
                    let id = self.next_fill;
                    self.next_fill += 1;
                    self.index
                        .insert(p.lba, Extent::new(id, p.len, State::Placeholder, None, 0));
                    ReadSrc::Backing { fill: Some(id) }
                }
                None => ReadSrc::Backing { fill: None },
            };
            self.stats.read_miss_sectors += u64::from(p.len);
            self.issue_backing_read(read, p.lba, p.len, buf_off, src, r.id);
            issued += 1;
        }
        self.scratch = pieces;
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
        let mut pieces = std::mem::take(&mut self.scratch);
        self.index.lookup(lba, len, &mut pieces);
        let res = pieces
            .iter()
            .all(|p| p.extent.is_some_and(|e| e.is_data()))
            .then(|| {
                pieces.iter().all(|p| {
                    p.extent
                        .is_some_and(|e| copy(e.pos, (p.lba - lba) * 512, u64::from(p.len) * 512))
                })
            });
        self.scratch = pieces;
        if res.is_some() {
            self.stats.reads += 1;
            self.stats.read_hit_sectors += u64::from(len);
            self.stats.inline_reads += 1;
        }
        res
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
            buf: Buf::Owned(hdr),
            want_crc: false,
        });
    }

    /// Turns queued log operations into batches (a kset and its data) and issues their
    /// writes.
    pub fn poll(&mut self) {
        if self.head_header == HeadHeader::Needed {
            self.head_header = HeadHeader::InFlight;
            self.write_segment_header(Grant {
                seg: self.head.seg,
                gen: self.head.gen,
            });
        }
        self.form_batches();
        self.ask_for_segments();
        self.writeback_poll();
    }

    #[inline]
    fn seg_of(&self, pos: u64) -> u32 {
        let g = &self.cfg.geo;
        super::geometry::div(
            pos.saturating_sub(g.segments_start),
            u64::from(g.segment_sectors),
        ) as u32
    }

    fn ask_for_segments(&mut self) {
        while self.ready.len() as u32 + self.preparing + self.wanted < RESERVE_SEGMENTS {
            self.wanted += 1;
            self.out.to_pool.push(ToPool::Need { shard: self.cfg.id });
        }
    }

    fn form_batches(&mut self) {
        self.stalled = false;
        while !self.pending.is_empty() && !self.failed {
            if self.head_header != HeadHeader::Durable {
                return;
            }
            // One sector between the ksets and the data stays free for a link kset.
            let limit = self.data_low.saturating_sub(1);
            let mut n = 0usize;
            let mut data = 0u32;
            for p in self.pending.iter().take(MAX_KSET_KEYS) {
                let d = p.data_sectors();
                if self.head.off + kset_sectors(n + 1) + data + d > limit {
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
            if let Some(g) = self.ready.pop_front() {
                self.link_to(g);
                continue;
            }
            if let Some(front) = self.pending.front().copied() {
                if let LogOp::Fill { read, fill, .. } = front.op {
                    // Fills never wait for space: the read completes without caching.
                    self.pending.pop_front();
                    self.stats.fill_bypass += 1;
                    self.index.abort_fill(fill, front.lba, front.len);
                    self.read_piece_done(read);
                    continue;
                }
            }
            if !self.stalled {
                self.stats.cache_full_waits += 1;
            }
            self.stalled = true;
            return;
        }
    }

    /// Writes a key-less kset at the head that moves the log to segment `g`.
    fn link_to(&mut self, g: Grant) {
        let next = LogPos {
            seg: g.seg,
            gen: g.gen,
            off: 1,
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
            kset: None,
            crc: 0,
            attempts: 0,
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
            if self.head.off + kset_sectors(n) + pad + data <= limit {
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
        let mut entries = Vec::with_capacity(n);
        let mut data_pending = 0;
        for i in 0..n {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let data_off = off;
            match p.op {
                LogOp::Write { req, buf_off } | LogOp::Fill { req, buf_off, .. } => {
                    let tag = self.tag(TagOwner::Data {
                        seq,
                        entry: i as u32,
                    });
                    self.out.commands.push(Command::Write {
                        tag,
                        dev: Dev::Cache,
                        sector: self.cfg.geo.segment_start(pos.seg) + u64::from(data_off),
                        buf: Buf::Req {
                            req,
                            off: buf_off,
                            len: u64::from(p.len) * 512,
                        },
                        want_crc: self.cfg.data_crc,
                    });
                    data_pending += 1;
                    off += p.len;
                }
                LogOp::Zeroes { .. } | LogOp::Unmap { .. } => {}
            }
            if !matches!(p.op, LogOp::Fill { .. }) {
                // Logged after any fill still in flight there, so that fill must not commit.
                self.index.punch_placeholders(p.lba, p.len);
            }
            entries.push(Entry {
                p,
                data_off,
                crc: None,
                failed: false,
                logged: false,
            });
        }
        let next = LogPos {
            off: pos.off + kset_sectors(n),
            ..pos
        };
        self.head = next;
        self.data_low = start;
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
            kset: None,
            crc: 0,
            attempts: 0,
        });
        self.encode_ready();
    }

    /// Encodes and writes the ksets of batches whose data is durable, in log order (each
    /// kset carries the CRC of the one before it).
    fn encode_ready(&mut self) {
        for i in 0..self.batches.len() {
            match self.batches[i].state {
                BatchState::KsetInFlight | BatchState::Durable => continue,
                BatchState::Data => return,
                BatchState::Ready => {}
            }
            // Ranges written by earlier batches not yet applied to the index: a fill that
            // overlaps one would be replayed after it and shadow it with stale data.
            let earlier: Vec<(u64, u32)> = self
                .batches
                .iter()
                .take(i)
                .flat_map(|b| b.entries.iter())
                .filter(|e| !e.failed && !matches!(e.p.op, LogOp::Fill { .. }))
                .map(|e| (e.p.lba, e.p.len))
                .collect();
            let b = &mut self.batches[i];
            let mut keys = Vec::with_capacity(b.entries.len());
            for e in b.entries.iter_mut() {
                if e.failed {
                    continue;
                }
                let p = e.p;
                let kind = match p.op {
                    LogOp::Write { .. } => KeyKind::Data,
                    LogOp::Fill { fill, .. } => {
                        let intact =
                            self.index.placeholder_pieces(fill, p.lba, p.len) == [(p.lba, p.len)];
                        let end = p.lba + u64::from(p.len);
                        let shadowed = earlier
                            .iter()
                            .any(|&(l, n)| l < end && p.lba < l + u64::from(n));
                        if !intact || shadowed {
                            continue;
                        }
                        KeyKind::Data
                    }
                    LogOp::Zeroes { .. } => KeyKind::Zeroes,
                    LogOp::Unmap { .. } => KeyKind::Unmap,
                };
                e.logged = true;
                keys.push(Key {
                    lba: p.lba,
                    len: p.len,
                    kind,
                    data_off: if kind == KeyKind::Data { e.data_off } else { 0 },
                    gen: b.pos.gen,
                    epoch: p.epoch,
                    clean: matches!(p.op, LogOp::Fill { .. }),
                    crc: e.crc,
                });
            }
            let kset = Kset {
                seq: b.seq,
                prev_crc: self.prev_crc,
                shard: self.cfg.id,
                pos: b.pos,
                next: b.next,
                // What its batch reserved at the head for all its entries' keys (format
                // v2); failed entries and shadowed fills log none, so the kset may be shorter.
                region_sectors: kset_sectors(b.entries.len()),
                keys,
            };
            let (bytes, crc) = kset.encode(self.cfg.crc_seed);
            self.prev_crc = crc;
            b.kset = Some(bytes);
            b.crc = crc;
            if b.next.seg != b.pos.seg {
                let next = b.next;
                if let Some(r) = self.segments.iter_mut().rev().find(|r| r.first.pos == next) {
                    r.first.prev_crc = crc;
                }
            }
            b.state = BatchState::KsetInFlight;
            self.stats.ksets_written += 1;
            self.stats.keys_written += kset.keys.len() as u64;
            let seq = b.seq;
            self.write_kset(i, seq);
        }
    }

    fn write_kset(&mut self, i: usize, seq: u64) {
        let pos = self.batches[i].pos;
        let Some(bytes) = self.batches[i].kset.clone() else {
            return;
        };
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

    /// Takes a device completion.
    pub fn complete(&mut self, done: IoDone) {
        let local = (done.tag & ((1 << 48) - 1)) as u32;
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
                        self.head_header = HeadHeader::Durable;
                    }
                    Ok(()) => self.ready.push_back(Grant { seg, gen }),
                    Err(_) if self.head_header == HeadHeader::InFlight && seg == self.head.seg => {
                        self.stats.io_errors += 1;
                        self.head_header = HeadHeader::Needed;
                    }
                    Err(_) => {
                        self.stats.io_errors += 1;
                        self.out.to_pool.push(ToPool::Release { seg });
                    }
                }
            }
            TagOwner::Wb(io) => self.wb_done(io, done.result),
            TagOwner::WbFlush => self.wb_flush_done(done.result),
            TagOwner::Control => self.control_done(done.result),
            TagOwner::InPlace { req, lba } => {
                let res = self.in_place_done(lba, done.result);
                self.out.completions.push((req, res));
            }
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
        let b = &mut self.batches[i];
        let Some(e) = b.entries.get_mut(entry) else {
            return;
        };
        b.data_pending -= 1;
        let mut failed_req = None;
        match done.result {
            Ok(()) => e.crc = done.crc,
            Err(_) => {
                e.failed = true;
                failed_req = Some(e.p);
            }
        }
        if let LogOp::Fill { read, fill, .. } = e.p.op {
            // The read's data is in its buffer; it no longer needs to wait for the fill.
            let p = e.p;
            if failed_req.is_some() {
                self.index.abort_fill(fill, p.lba, p.len);
                failed_req = None;
            }
            self.read_piece_done(read);
        }
        if self.batches[i].data_pending == 0 && self.batches[i].state == BatchState::Data {
            self.batches[i].state = BatchState::Ready;
        }
        if let Some(p) = failed_req {
            // Only the request whose data did not land fails; its key stays out of the kset.
            self.stats.io_errors += 1;
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
                self.batches[i].state = BatchState::Durable;
                self.batches[i].kset = None;
                self.retire();
            }
            Err(_) if self.batches[i].attempts < KSET_WRITE_ATTEMPTS => {
                // Rewrite the same bytes: later ksets already chain to this one's CRC.
                self.stats.io_errors += 1;
                self.stats.kset_retries += 1;
                self.write_kset(i, seq);
            }
            Err(_) => {
                self.stats.io_errors += 1;
                self.fail_log(i);
            }
        }
    }

    /// The kset at batch `i` cannot be written: nothing from it on can be acknowledged.
    fn fail_log(&mut self, i: usize) {
        self.out.log.push(format!(
            "shard {}: kset write failed {KSET_WRITE_ATTEMPTS} times; log closed, writes fail",
            self.cfg.id
        ));
        self.failed = true;
        let doomed: Vec<Batch> = self.batches.drain(i..).collect();
        for b in doomed {
            for e in b.entries {
                self.fail_entry(&e);
            }
        }
        while let Some(p) = self.pending.pop_front() {
            let e = Entry {
                p,
                data_off: 0,
                crc: None,
                failed: false,
                logged: false,
            };
            self.fail_entry(&e);
        }
    }

    fn fail_entry(&mut self, e: &Entry) {
        match e.p.op {
            LogOp::Write { req, .. } | LogOp::Zeroes { req } | LogOp::Unmap { req }
                if !e.failed =>
            {
                self.out.completions.push((req, Err(ReqError::ShardFailed)));
            }
            LogOp::Write { .. } | LogOp::Zeroes { .. } | LogOp::Unmap { .. } => {}
            LogOp::Fill { fill, .. } => self.index.abort_fill(fill, e.p.lba, e.p.len),
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
            let mut dirty = Vec::new();
            for e in &b.entries {
                let p = e.p;
                let kind = match p.op {
                    LogOp::Write { .. } => KeyKind::Data,
                    LogOp::Zeroes { .. } => KeyKind::Zeroes,
                    LogOp::Unmap { .. } => KeyKind::Unmap,
                    LogOp::Fill { .. } => continue,
                };
                if e.logged && !e.failed {
                    self.log_dirty_sectors += u64::from(p.len);
                    dirty.push(DirtyKey {
                        lba: p.lba,
                        len: p.len,
                        kind,
                        pos: base + u64::from(e.data_off),
                        epoch: p.epoch,
                    });
                }
            }
            if self.log_front_epoch.is_none() {
                self.log_front_epoch = dirty.first().map(|d| d.epoch);
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
                    LogOp::Write { req, .. } if !e.failed => {
                        self.index.insert(
                            p.lba,
                            Extent::new(
                                base + u64::from(e.data_off),
                                p.len,
                                State::Dirty,
                                e.crc,
                                epoch,
                            ),
                        );
                        self.out.completions.push((req, Ok(())));
                    }
                    LogOp::Zeroes { req } | LogOp::Unmap { req } => {
                        let state = if matches!(p.op, LogOp::Unmap { .. }) {
                            State::Unmapped
                        } else {
                            State::Zeroes
                        };
                        self.index
                            .insert(p.lba, Extent::new(0, p.len, state, None, epoch));
                        self.out.completions.push((req, Ok(())));
                    }
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
                    self.index.remove_if_same(lba, &ext);
                    self.out.log.push(format!(
                        "shard {}: data CRC mismatch on clean extent at lba {lba}+{len}; \
                         dropped it, reading the backing device",
                        self.cfg.id
                    ));
                    let req = self.reads.get(read).map(|c| c.req).unwrap_or_default();
                    self.issue_backing_read(
                        read,
                        lba,
                        len,
                        buf_off,
                        ReadSrc::Backing { fill: None },
                        req,
                    );
                } else {
                    self.out.log.push(format!(
                        "shard {}: data CRC mismatch on dirty extent at lba {lba}+{len}; \
                         failing the read",
                        self.cfg.id
                    ));
                    self.read_fail(read, ReqError::Corrupt);
                }
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
