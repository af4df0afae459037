//! Writes that go to the backing device from the request (write-around, pass-through, the
//! sequential cut-off, a full cache, write-through), backing flushes for FLUSH requests,
//! and sequential-stream detection.
//!
//! **The ordering rule.** A write may be written to the backing device by the request
//! itself only where nothing can overtake it there later and no stale copy stays readable:
//!
//! 1. nothing dirty overlaps it: no dirty, zeroing or poisoned extent in the index, no
//!    logged write still queued or in a batch, and no range of the current writeback group
//!    (a group that fails starts over and writes its ranges again);
//! 2. every shard has written back and flushed every flush epoch before the current one
//!    (the writeback barrier: the backing device stays at a flush boundary);
//! 3. write-through only: no other write to the backing device is in flight there.
//!
//! Otherwise the write is logged like a write-back write (write-through: logged, then
//! completed once writeback has copied it). A write sent around the cache drops the
//! cached copies it overlaps from the index at once, fills nothing there until it landed,
//! and when the log may still hold a key for the range (a cached copy, a fill in flight, a
//! segment reclaimed whose tail move is not yet durable, a copy dropped after a CRC
//! mismatch) it logs a clean unmap key (an *invalidation*) so replay cannot bring the old
//! copy back; the write completes once both the backing write and the invalidation are
//! done. A backing write (or its flush) that fails is retried with backoff, its range kept
//! reserved, until it succeeds or the I/O timeout passes (then the request fails: a failed
//! write may or may not have landed). It is not written through the log instead: that
//! would make it dirty data of its flush epoch after writes of later epochs may have
//! reached the backing device.

use super::{LogOp, Pending, Shard, TagOwner};
use crate::engine::index::State;
use crate::engine::io::{Buf, Command, Dev, IoError, Op, ReqError, ReqId, ReqResult, ShardRequest};
use crate::engine::mode::{CacheMode, SeqCutoff, SeqPolicy, WriteAdmission};

/// A write the shard sends to the backing device itself.
#[derive(Debug)]
pub(super) struct Fwd {
    req: ReqId,
    lba: u64,
    len: u32,
    buf_off: u64,
    /// Write-through: the batch and cache sector of its logged data, and whether nothing
    /// older was dirty there when it was logged (else only writeback may copy it).
    through: Option<Through>,
    /// A backing flush follows the backing write before the request completes.
    durable: bool,
    /// Still awaited: the backing write (and its flush) or, for write-through, its
    /// writeback; the invalidation.
    waits: u8,
    /// The request was answered (failed, or handed to the log).
    answered: bool,
    /// When it started (host ms): a write-through write that waits longer than the I/O
    /// timeout fails (its data stays logged and is written back).
    since: u64,
}

#[derive(Debug, Clone, Copy)]
struct Through {
    seq: u64,
    pos: u64,
    epoch: u64,
    may_write: bool,
}

/// Who waits for a backing flush.
#[derive(Debug, Clone, Copy)]
pub(super) enum Waiter {
    Req(ReqId),
    Fwd(u32),
}

/// Backing flushes for FLUSH requests and durable forwarded writes: one in flight, the
/// waiters that arrive meanwhile go to the next.
#[derive(Debug, Default)]
pub(super) struct BackingFlush {
    /// A forwarded write completed since the last backing flush was issued.
    unflushed: bool,
    inflight: Option<Vec<Waiter>>,
    next: Vec<Waiter>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    next: u64,
    sectors: u64,
    write: bool,
    used: u64,
}

/// Streams a shard follows for the sequential cut-off.
const STREAMS: usize = 8;

#[derive(Debug, Default)]
pub(super) struct Streams {
    s: [Stream; STREAMS],
    clock: u64,
}

impl Shard {
    pub fn mode(&self) -> CacheMode {
        self.cfg.mode
    }

    pub fn seq_cutoff(&self) -> SeqCutoff {
        self.cfg.seq_cutoff
    }

    /// Switches the mode at run time (persisted in the control slot). Nothing queued or in
    /// flight changes path; dirty data is written back from now on if the mode is not
    /// write-back.
    pub fn set_mode(&mut self, mode: CacheMode) {
        if mode != self.cfg.mode {
            self.cfg.mode = mode;
            self.control.rewrite = true;
        }
    }

    /// Changes the sequential cut-off at run time (persisted in the control slot).
    pub fn set_seq_cutoff(&mut self, c: SeqCutoff) {
        if c != self.cfg.seq_cutoff {
            self.cfg.seq_cutoff = c;
            self.control.rewrite = true;
        }
    }

    /// Changes which writes a full cache takes in (at run time; persisted in the control
    /// slot).
    pub fn set_write_admission(&mut self, a: WriteAdmission) {
        if a != self.cfg.write_admission {
            self.cfg.write_admission = a;
            self.control.rewrite = true;
        }
    }

    pub fn write_admission(&self) -> WriteAdmission {
        self.cfg.write_admission
    }

    /// Whether the admission policy sends this write to the backing device: the cache
    /// evicts, it holds nothing of the range (no invalidation needed), and the range has
    /// not missed or been written recently (a second touch is admitted).
    fn write_declined(&mut self, lba: u64, len: u32) -> bool {
        self.cfg.write_admission == WriteAdmission::SecondTouch
            && self.admission.evicting()
            && self.around_check(lba, len, self.pending.len()) == Some(false)
            && !self.admission.admit(lba, len)
    }

    /// Whether a write to the backing device is in flight over part of the range.
    pub(super) fn fwd_overlaps(&self, lba: u64, len: u32) -> bool {
        let end = lba + u64::from(len);
        self.fwd_ranges
            .iter()
            .any(|&(s, l)| s < end && s + u64::from(l) > lba)
    }

    /// Follows sequential streams; true when this request belongs to one past the
    /// cut-off threshold and the policy applies now.
    pub(super) fn seq_bypass(&mut self, lba: u64, len: u32, write: bool) -> bool {
        let c = self.cfg.seq_cutoff;
        // `full` follows streams only while space is short (nothing to decide otherwise,
        // and reads and writes stay free of the cost).
        let applies = match c.policy {
            SeqPolicy::Never => false,
            SeqPolicy::Always => true,
            SeqPolicy::Full => self.pressure || self.stalled,
        };
        if !applies {
            return false;
        }
        let g = &self.cfg.geo;
        let stripe = u64::from(g.stripe_sectors).max(1);
        // The shard's next stripe of a stream lies past the other shards' stripes: a
        // request at a stripe's start may continue a stream that ended `skip` before it.
        let skip = stripe * u64::from(g.shard_count.saturating_sub(1));
        let from_skip = (lba % stripe == 0).then(|| lba.checked_sub(skip)).flatten();
        let st = &mut self.streams;
        st.clock += 1;
        let mut lru = 0;
        let mut hit = None;
        for (i, s) in st.s.iter().enumerate() {
            if s.used > 0 && s.write == write && (s.next == lba || Some(s.next) == from_skip) {
                hit = Some(i);
                break;
            }
            if s.used < st.s[lru].used {
                lru = i;
            }
        }
        let i = match hit {
            Some(i) => i,
            None => {
                st.s[lru] = Stream {
                    next: lba,
                    sectors: 0,
                    write,
                    used: 0,
                };
                lru
            }
        };
        let s = &mut st.s[i];
        let before = s.sectors;
        s.sectors += u64::from(len);
        s.next = lba + u64::from(len);
        s.used = st.clock;
        before * 512 >= c.bytes
    }

    /// A write that is not an in-place rewrite: logged, written through, or sent around
    /// the cache.
    pub(super) fn route_write(&mut self, r: ShardRequest) {
        let fua = r.op == Op::WriteFua;
        let mode = self.cfg.mode;
        let seq = self.seq_bypass(r.lba, r.len, true);
        if seq || matches!(mode, CacheMode::WriteAround | CacheMode::PassThrough) {
            match self.around_check(r.lba, r.len, self.pending.len()) {
                Some(inval) => {
                    if seq {
                        self.stats.seq_bypass_requests += 1;
                        self.stats.seq_bypass_sectors += u64::from(r.len);
                    }
                    let now = self.now;
                    self.start_around(r.id, r.lba, r.len, r.buf_off, inval, fua, now);
                    return;
                }
                None => self.stats.around_logged += 1,
            }
        } else if self.write_declined(r.lba, r.len) {
            self.stats.write_declined += 1;
            self.stats.write_declined_sectors += u64::from(r.len);
            let now = self.now;
            self.start_around(r.id, r.lba, r.len, r.buf_off, false, fua, now);
            return;
        }
        self.pending.push_back(Pending {
            op: LogOp::Write {
                req: r.id,
                buf_off: r.buf_off,
            },
            lba: r.lba,
            len: r.len,
            epoch: self.epoch,
            since: self.now,
            through: mode == CacheMode::WriteThrough,
            fua,
        });
    }

    /// Whether a write of the range may go to the backing device now (rules 1 and 2 of
    /// the module doc; `queued`: how many queued entries are older than it). Some(true)
    /// when it must log an invalidation.
    fn around_check(&mut self, lba: u64, len: u32, queued: usize) -> Option<bool> {
        if self.failed
            || self.allowed_epoch < self.epoch
            || self.wb.group_ranges.overlaps(lba, len)
            || self.wb.replay_dirty_overlaps(lba, len)
        {
            return None;
        }
        let mut inval = self.ghosts || self.control.want_tail.is_some();
        let mut pieces = std::mem::take(&mut self.scratch);
        self.index.lookup(lba, len, &mut pieces);
        let mut ok = true;
        for p in &pieces {
            match p.extent.map(|e| e.state()) {
                None => {}
                Some(State::Clean | State::Placeholder) => inval = true,
                Some(_) => ok = false,
            }
        }
        self.scratch = pieces;
        if !ok {
            return None;
        }
        let end = lba + u64::from(len);
        let queued = self
            .batches
            .iter()
            .flat_map(|b| b.entries.iter().map(|e| &e.p))
            .chain(self.pending.iter().take(queued));
        for p in queued {
            if p.lba < end && lba < p.lba + u64::from(p.len) {
                // A fill or GC move in flight is a clean copy: dropped like the cached ones.
                if !p.op.takes_placeholder() {
                    return None;
                }
                inval = true;
            }
        }
        Some(inval)
    }

    /// Sends a write to the backing device, dropping the cached copies it overlaps
    /// (`since`: when its request arrived; it fails once it waited the I/O timeout).
    #[allow(clippy::too_many_arguments)]
    fn start_around(
        &mut self,
        req: ReqId,
        lba: u64,
        len: u32,
        buf_off: u64,
        inval: bool,
        fua: bool,
        since: u64,
    ) {
        self.index.punch(lba, len);
        let id = self.fwd.insert(Fwd {
            req,
            lba,
            len,
            buf_off,
            through: None,
            durable: fua || self.cfg.mode.around_is_durable(),
            waits: 1 + u8::from(inval),
            answered: false,
            since,
        });
        self.stats.around_writes += 1;
        self.stats.around_sectors += u64::from(len);
        if inval {
            self.stats.invalidations += 1;
            self.pending.push_back(Pending {
                op: LogOp::Invalidate { req, fwd: id },
                lba,
                len,
                epoch: self.epoch,
                since: self.now,
                through: false,
                fua: false,
            });
        }
        self.issue_fwd(id, req, lba, len, buf_off);
    }

    fn issue_fwd(&mut self, id: u32, req: ReqId, lba: u64, len: u32, buf_off: u64) {
        // Kept until it landed or was given up: writeback copies nothing there (a newer
        // write's copy could land first) and read misses fill nothing there.
        self.fwd_ranges.push((lba, len));
        self.write_fwd(id, req, lba, len, buf_off);
    }

    /// The backing write of forwarded write `id`, from its request's buffer.
    fn write_fwd(&mut self, id: u32, req: ReqId, lba: u64, len: u32, buf_off: u64) {
        let tag = self.tag(TagOwner::Fwd { id });
        self.out.commands.push(Command::Write {
            tag,
            dev: Dev::Backing,
            sector: lba,
            buf: Buf::Req {
                req,
                off: buf_off,
                len: u64::from(len) * 512,
            },
            want_crc: false,
        });
    }

    /// Reissues the forwarded writes whose backing write or flush failed, once the
    /// backoff allows.
    pub(super) fn retry_fwd(&mut self) {
        if self.fwd_retry.is_empty() || !self.fwd_backoff.ready(self.now) {
            return;
        }
        for id in std::mem::take(&mut self.fwd_retry) {
            let Some(f) = self.fwd.get(id) else { continue };
            let (req, lba, len, buf_off) = (f.req, f.lba, f.len, f.buf_off);
            self.stats.fwd_retries += 1;
            self.write_fwd(id, req, lba, len, buf_off);
        }
    }

    /// When failed forwarded writes are retried next.
    pub(super) fn fwd_retry_due(&self) -> Option<u64> {
        self.fwd_backoff
            .due(self.now)
            .filter(|_| !self.fwd_retry.is_empty())
    }

    /// A cache full: queued writes that may go around the cache (and need no
    /// invalidation, which would need log space too) go to the backing device instead of
    /// waiting for space.
    pub(super) fn full_cache_around(&mut self) {
        if self.fwd_backoff.since().is_some() {
            // Backing writes of requests are failing: they wait (and time out) as before.
            return;
        }
        let mut i = 0;
        while i < self.pending.len().min(256) {
            let p = self.pending[i];
            let LogOp::Write { req, buf_off } = p.op else {
                i += 1;
                continue;
            };
            if self.around_check(p.lba, p.len, i) == Some(false) {
                self.pending.remove(i);
                self.stats.full_around_requests += 1;
                self.stats.full_around_sectors += u64::from(p.len);
                self.start_around(req, p.lba, p.len, buf_off, false, p.fua, p.since);
            } else {
                i += 1;
            }
        }
    }

    /// A write-through write was logged (its key is in `self.log`, about to enter the
    /// index at `pos`): writes it to the backing device when nothing older can overtake it
    /// there, else leaves it to writeback. True: its request is answered later.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_through(
        &mut self,
        req: ReqId,
        lba: u64,
        len: u32,
        buf_off: u64,
        pos: u64,
        seq: u64,
        p: Pending,
    ) -> bool {
        // Rule 1 against what is older: the index before this key enters it.
        let mut pieces = std::mem::take(&mut self.scratch);
        self.index.lookup(lba, len, &mut pieces);
        let older_dirty = pieces.iter().any(|p| {
            p.extent
                .is_some_and(|e| e.is_dirty() || e.state() == State::Poisoned)
        });
        self.scratch = pieces;
        let id = self.fwd.insert(Fwd {
            req,
            lba,
            len,
            buf_off,
            through: Some(Through {
                seq,
                pos,
                epoch: p.epoch,
                may_write: !older_dirty,
            }),
            durable: p.fua,
            waits: 1,
            answered: false,
            since: p.since,
        });
        if older_dirty {
            self.stats.around_logged += 1;
        }
        self.through_wait.push(id);
        true
    }

    /// Write-through writes waiting to be written to the backing device, or for writeback
    /// to copy them: issued or answered when they can be.
    pub(super) fn poll_through(&mut self) {
        if self.through_wait.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.through_wait);
        for id in waiting {
            let Some(f) = self.fwd.get(id) else { continue };
            let Some(t) = f.through else { continue };
            let (lba, len, req, buf_off) = (f.lba, f.len, f.req, f.buf_off);
            let late = self.now >= f.since.saturating_add(self.cfg.wb.io_timeout_ms) && !f.answered;
            let ours = self
                .index
                .get(lba)
                .filter(|e| e.pos == t.pos && e.len() == len);
            match ours.map(|e| e.state()) {
                // Write-through was left: it completes as in the mode it is now in (its
                // data is logged), rather than wait for writeback that may not run.
                Some(State::Dirty) if self.cfg.mode != CacheMode::WriteThrough => {
                    self.fwd_wait_done(id);
                    continue;
                }
                Some(State::Dirty) => {}
                Some(State::Clean) => {
                    // Writeback copied it.
                    self.fwd_landed(id);
                    continue;
                }
                // A newer write replaced it (and goes to the backing device after it).
                _ => {
                    self.fwd_wait_done(id);
                    continue;
                }
            }
            if late {
                self.stats.timed_out += 1;
                self.fwd_answer(id, Err(ReqError::TimedOut));
            }
            let may = t.may_write
                && self.allowed_epoch >= t.epoch
                && !self.wb.group_ranges.overlaps(lba, len)
                && !self.wb.blocks(lba, len)
                && !self.fwd_overlaps(lba, len)
                && !self.inplace_overlaps(lba, len);
            if !may {
                self.through_wait.push(id);
                continue;
            }
            self.stats.through_writes += 1;
            self.stats.through_sectors += u64::from(len);
            self.issue_fwd(id, req, lba, len, buf_off);
        }
    }

    fn inplace_overlaps(&self, lba: u64, len: u32) -> bool {
        let end = lba + u64::from(len);
        self.inplace
            .iter()
            .any(|&(s, l)| s < end && s + u64::from(l) > lba)
    }

    /// When a write-through write waiting for its backing write times out.
    pub(super) fn through_deadline(&self) -> Option<u64> {
        self.through_wait
            .iter()
            .filter_map(|&id| self.fwd.get(id))
            .filter(|f| !f.answered)
            .map(|f| f.since.saturating_add(self.cfg.wb.io_timeout_ms))
            .min()
    }

    /// The backing write of forwarded write `id` finished.
    pub(super) fn fwd_done(&mut self, id: u32, result: Result<(), IoError>) {
        let Some(f) = self.fwd.get(id) else { return };
        let (lba, len, through) = (f.lba, f.len, f.through);
        if result.is_ok() || through.is_some() {
            self.release_fwd_range(lba, len);
        }
        if result.is_ok() {
            if let Some((n, since)) = self.fwd_backoff.succeed() {
                self.out.log.push(format!(
                    "shard {}: backing writes of requests succeed again after {n} failures \
                     over {} ms",
                    self.cfg.id,
                    self.now.saturating_sub(since)
                ));
            }
        }
        match (result, through) {
            (Ok(()), Some(t)) => {
                self.index.mark_clean(lba, len, t.pos);
                self.mark_through(t.seq, lba, len, t.pos);
                self.fwd_landed(id);
            }
            (Ok(()), None) => self.fwd_landed(id),
            (Err(_), Some(_)) => {
                // Its data is logged: writeback copies it, then it completes.
                self.stats.io_errors += 1;
                self.stats.fwd_errors += 1;
                if let Some(Fwd {
                    through: Some(t), ..
                }) = self.fwd.get_mut(id)
                {
                    t.may_write = false;
                }
                self.through_wait.push(id);
            }
            (Err(_), None) => {
                self.stats.io_errors += 1;
                self.stats.fwd_errors += 1;
                self.fwd_failed(id, "write");
            }
        }
    }

    fn release_fwd_range(&mut self, lba: u64, len: u32) {
        if let Some(i) = self.fwd_ranges.iter().position(|&r| r == (lba, len)) {
            self.fwd_ranges.swap_remove(i);
        }
    }

    /// Its data is on the backing device: durable ones wait for a backing flush.
    fn fwd_landed(&mut self, id: u32) {
        let durable = self.fwd.get(id).is_some_and(|f| f.durable);
        if durable {
            self.want_backing_flush(Waiter::Fwd(id));
        } else {
            self.bflush.unflushed = true;
            self.fwd_wait_done(id);
        }
    }

    /// Flags the written-through key in the log: writeback has nothing to copy.
    fn mark_through(&mut self, seq: u64, lba: u64, len: u32, pos: u64) {
        let front = self.log.front().map_or(u64::MAX, |k| k.seq);
        let Some(k) = seq
            .checked_sub(front)
            .and_then(|i| self.log.get_mut(i as usize))
        else {
            return;
        };
        if let Some(d) = k
            .keys
            .iter_mut()
            .find(|d| d.lba == lba && d.len == len && d.pos == pos)
        {
            d.through = true;
            // Until the dirty tail passes it, replay would copy it again.
            self.wb
                .replay_dirty
                .entry(seq)
                .or_default()
                .push((lba, len));
        }
    }

    /// A write sent around the cache could not be written (or made durable) there: it is
    /// written again after a backoff, until the I/O timeout; then its request fails
    /// (`TimedOut`).
    fn fwd_failed(&mut self, id: u32, what: &str) {
        let Some(f) = self.fwd.get(id) else { return };
        let (lba, len) = (f.lba, f.len);
        if self.now.saturating_sub(f.since) >= self.cfg.wb.io_timeout_ms || f.answered {
            self.release_fwd_range(lba, len);
            self.out.log.push(format!(
                "shard {}: backing {what} of a request at lba {lba}+{len} kept failing for \
                 the I/O timeout; failing the request",
                self.cfg.id
            ));
            self.stats.timed_out += 1;
            self.fwd_answer(id, Err(ReqError::TimedOut));
            self.fwd_wait_done(id);
            return;
        }
        if self.fwd_backoff.fail(self.now) {
            self.out.log.push(format!(
                "shard {}: backing {what} of a request at lba {lba}+{len} failed; retrying",
                self.cfg.id
            ));
        }
        self.fwd_retry.push(id);
    }

    fn fwd_wait_done(&mut self, id: u32) {
        let Some(f) = self.fwd.get_mut(id) else {
            return;
        };
        f.waits = f.waits.saturating_sub(1);
        if f.waits > 0 {
            return;
        }
        if let Some(f) = self.fwd.remove(id) {
            if !f.answered {
                self.out.completions.push((f.req, Ok(())));
            }
        }
    }

    /// Answers the request of forwarded write `id` now (it failed).
    pub(super) fn fwd_answer(&mut self, id: u32, res: ReqResult) {
        if let Some(f) = self.fwd.get_mut(id) {
            if !f.answered {
                f.answered = true;
                self.out.completions.push((f.req, res));
            }
        }
    }

    /// The invalidation of forwarded write `id` is durable.
    pub(super) fn fwd_inval_done(&mut self, id: u32) {
        self.fwd_wait_done(id);
    }

    /// The invalidation of forwarded write `id` will never be logged.
    pub(super) fn fwd_inval_failed(&mut self, id: u32, err: ReqError) {
        // What it was to drop may still be in the log, so replay could bring it back over
        // a later write sent around the cache: from now on every such write logs its own.
        self.ghosts = true;
        self.fwd_answer(id, Err(err));
        self.fwd_wait_done(id);
    }

    /// A FLUSH request: true if it is done at once (no write sent to the backing device
    /// since the last backing flush), else it completes with a backing flush.
    pub fn flush_request(&mut self, req: ReqId) -> bool {
        if !self.bflush.unflushed {
            match self.bflush.inflight.as_mut() {
                Some(w) => w.push(Waiter::Req(req)),
                None => return true,
            }
            return false;
        }
        self.want_backing_flush(Waiter::Req(req));
        false
    }

    fn want_backing_flush(&mut self, w: Waiter) {
        if self.bflush.inflight.is_some() {
            self.bflush.next.push(w);
        } else {
            self.issue_backing_flush(vec![w]);
        }
    }

    fn issue_backing_flush(&mut self, waiters: Vec<Waiter>) {
        self.bflush.unflushed = false;
        self.bflush.inflight = Some(waiters);
        let tag = self.tag(TagOwner::BackingFlush);
        self.out.commands.push(Command::Flush {
            tag,
            dev: Dev::Backing,
        });
        self.stats.backing_flushes += 1;
        self.stats.request_flushes += 1;
    }

    pub(super) fn backing_flush_done(&mut self, result: Result<(), IoError>) {
        let waiters = self.bflush.inflight.take().unwrap_or_default();
        if result.is_err() {
            self.stats.io_errors += 1;
            self.stats.fwd_errors += 1;
            self.bflush.unflushed = true;
        }
        for w in waiters {
            match (w, result) {
                (Waiter::Req(req), Ok(())) => self.out.completions.push((req, Ok(()))),
                (Waiter::Req(req), Err(_)) => self.out.completions.push((req, Err(ReqError::Io))),
                (Waiter::Fwd(id), Ok(())) => self.fwd_wait_done(id),
                (Waiter::Fwd(id), Err(_)) => {
                    if self.fwd.get(id).is_some_and(|f| f.through.is_some()) {
                        // Durable in the cache anyway.
                        self.fwd_wait_done(id);
                    } else {
                        // Written (and flushed) again: its range is reserved again meanwhile.
                        if let Some(f) = self.fwd.get(id) {
                            self.fwd_ranges.push((f.lba, f.len));
                        }
                        self.fwd_failed(id, "flush");
                    }
                }
            }
        }
        let next = std::mem::take(&mut self.bflush.next);
        if !next.is_empty() {
            self.issue_backing_flush(next);
        }
    }
}
