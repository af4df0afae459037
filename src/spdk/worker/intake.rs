//! Requests arriving at a worker: by message (`submit_msg`, `reset_msg`), in its inbox
//! from threads on its core, and on the queue pairs of submitting threads on other cores;
//! submitted to the cache together by the next poll, their index lookups prefetched as a
//! batch. Also the direct path: a request the cache serves with one cache-device I/O
//! straight from or into its buffer (`Cache::begin_direct`), issued here or by the
//! submitting thread itself ([`local`](super::local)).
//!
//! Calls the reply side ([`reply`](super::reply)), device I/O and the mapped path; below
//! the worker, `link`, `msg` and `io`'s request context.

use std::ffi::c_void;
use std::ptr;

use super::devio::{DevIo, Kind, Purpose};
use super::reply::{ctx, IoCtx, Reply};
use super::roster::Roster;
use super::{op_of, team, Peer, State, Worker};
use crate::engine::{Cache, Dev, Direct, IoError, Op, Request};
use crate::spdk::ffi::{self, spdk_bdev_io_status as st};
use crate::spdk::link::{Desc, WorkerEnd};
use crate::spdk::log::{no_unwind, spdk_log};

impl Worker {
    // ---- requests ----

    /// A request handed to this worker (`reply`: how it came, so how to answer).
    pub(super) fn submit(&mut self, d: Desc, reply: Reply) {
        let io = d.io;
        self.counters.requests += 1;
        match reply {
            Reply::Link(_) => self.counters.arrived_queue_pair += 1,
            // SAFETY: a pending request; `local` was written before it reached the inbox.
            Reply::Inbox if unsafe { (*ffi::bdev_io_driver_ctx::<IoCtx>(io)).local } => {
                self.counters.arrived_same_core += 1
            }
            Reply::Inbox => self.counters.arrived_by_message += 1,
        }
        if !matches!(self.state, State::Running | State::Draining) || self.cache.is_none() {
            self.counters.requests_failed += 1;
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
            return;
        }
        let Some(op) = op_of(d.ty) else {
            self.counters.requests_failed += 1;
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
            return;
        };
        let shift = self.front_shift;
        let (lba, len) = if op == Op::Flush {
            (0, 0)
        } else {
            let len = u32::try_from(d.num << shift).unwrap_or(u32::MAX);
            (d.offset << shift, len)
        };
        self.wake();
        if op == Op::Read {
            if let Some(ok) = self.read_inline(&d, lba, len) {
                let status = self.inline_read_status(ok);
                self.finish_io(io, status, reply);
                return;
            }
        }
        // SAFETY: a pending request of ours: its context is initialized.
        let no_direct = unsafe { (*ctx(io)).no_direct };
        if matches!(op, Op::Read | Op::Write) && !no_direct {
            // A hit or rewrite in place, else a miss the cache will not fill (read from
            // the backing bdev as is).
            let direct = self.cache.as_deref_mut().and_then(|c| {
                c.begin_direct(op, lba, len)
                    .or_else(|| (op == Op::Read).then(|| c.begin_backing_read(lba, len))?)
            });
            if let Some(direct) = direct {
                return self.issue_direct(&d, reply, direct, u64::from(len));
            }
        }
        let id = self
            .reqs
            .insert(&d, matches!(op, Op::Read | Op::Write), reply);
        let Some(cache) = self.cache.as_deref_mut() else {
            return;
        };
        if let Err(e) = cache.submit(Request { id, op, lba, len }) {
            spdk_log!(ERROR, "{}: request refused: {e}", self.name);
            if let Some(idx) = self.reqs.index(id) {
                self.reqs.remove(idx);
            }
            self.counters.requests_failed += 1;
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
            return;
        }
        self.kick = true;
    }

    /// Serves request `d` with one device I/O of `sectors` straight from or into its buffer
    /// (see `Cache::begin_direct`; a backing-bdev read for `Cache::begin_backing_read`): no
    /// request slot, command or tag.
    pub(super) fn issue_direct(&mut self, d: &Desc, reply: Reply, direct: Direct, sectors: u64) {
        let kind = if direct.write {
            Kind::Write
        } else {
            Kind::Read
        };
        let dev = if direct.backing {
            Dev::Backing
        } else {
            Dev::Cache
        };
        let mut dio = self.new_dio(Purpose::Direct, 0, kind, dev);
        dio.iovs.extend_from_slice(d.iovs.get());
        dio.direct = Some((direct, d.io, reply));
        self.direct_live += 1;
        if !self.set_range(&mut dio, direct.sector, sectors) {
            self.counters.dev_errors += 1;
            return self.finish_direct(dio, false);
        }
        if direct.write {
            self.counters.dev_writes += 1;
        } else {
            self.counters.dev_reads += 1;
        }
        self.issue(dio);
    }

    /// The device I/O of a direct request finished: so did the request.
    pub(super) fn finish_direct(&mut self, mut dio: Box<DevIo>, ok: bool) {
        let Some((direct, io, reply)) = dio.direct.take() else {
            return self.recycle(dio);
        };
        self.recycle(dio);
        if !ok {
            // Served again the normal way: a write through the log, whose cache writes are
            // retried; a read of clean data from the backing device if the cache fails.
            self.direct_live -= 1;
            if let Some(c) = self.cache.as_deref_mut() {
                let _ = c.end_direct(direct, Err(IoError::Device));
            }
            self.counters.direct_retried += 1;
            // SAFETY: a pending request of ours.
            unsafe { ptr::addr_of_mut!((*ctx(io)).no_direct).write(true) };
            self.counters.requests -= 1;
            return self.submit(Desc::of(io), reply);
        }
        let status = self.end_direct(direct, ok);
        self.finish_io(io, status, reply);
    }

    /// The device I/O of direct request `direct` (issued here or by its submitting thread:
    /// `local`) ended: the request's status.
    pub(super) fn end_direct(&mut self, direct: Direct, ok: bool) -> st::Type {
        self.direct_live -= 1;
        let result = if ok { Ok(()) } else { Err(IoError::Device) };
        match self
            .cache
            .as_deref_mut()
            .map(|c| c.end_direct(direct, result))
        {
            Some(Ok(())) => st::SPDK_BDEV_IO_STATUS_SUCCESS,
            _ => {
                self.counters.requests_failed += 1;
                st::SPDK_BDEV_IO_STATUS_FAILED
            }
        }
    }

    /// Submits the requests received since the last poll: from the inbox and the queue
    /// pairs. Their index entries are prefetched first, all together: one request's cache
    /// misses then overlap the next ones' instead of each lookup stalling in turn. True if
    /// there were any.
    pub(super) fn submit_incoming(&mut self) -> bool {
        let mut descs = std::mem::take(&mut self.descs);
        if !self.inbox.is_empty() {
            let mut batch = std::mem::take(&mut self.batch);
            self.inbox.take(&mut batch);
            descs.extend(batch.drain(..).map(|io| (Desc::of(io), Reply::Inbox)));
            self.batch = batch;
        }
        for (k, slot) in self.links.iter_mut().enumerate() {
            let Some(end) = slot else { continue };
            while let Ok(d) = end.sq.pop() {
                descs.push((d, Reply::Link(k)));
            }
            if end.closed() {
                *slot = None;
            }
        }
        if let (Some(cache), true) = (self.cache.as_deref(), descs.len() > 1) {
            let shift = self.front_shift;
            prefetch_lookups(descs.iter().map(|(d, _)| {
                let len = u32::try_from(d.num << shift).unwrap_or(u32::MAX);
                (cache, d.offset << shift, len)
            }));
        }
        for i in 0..descs.len() {
            self.prefetch_read(descs.get(i + 1));
            let (d, reply) = descs[i];
            self.submit(d, reply);
        }
        self.fence_direct_writes();
        let took = !descs.is_empty();
        descs.clear();
        self.descs = descs;
        took
    }

    /// A submitting thread on another core opened queue pair `end` with this worker.
    pub(super) fn add_link(&mut self, end: WorkerEnd) {
        match self.links.iter().position(Option::is_none) {
            Some(k) => self.links[k] = Some(end),
            None => self.links.push(Some(end)),
        }
    }

    /// A request arrived: the cache is no longer idle.
    pub(super) fn wake(&mut self) {
        if self.idle {
            self.idle = false;
            if let Some(c) = self.cache.as_deref_mut() {
                c.set_idle(false);
            }
        }
    }
}

/// Starts loading what the index lookups of a batch of requests will read, `(cache, lba,
/// len)` each, in two passes whose cache misses overlap across the batch: each lookup's
/// first line, then the second line that the first leads to.
pub(super) fn prefetch_lookups<'a>(lookups: impl Iterator<Item = (&'a Cache, u64, u32)> + Clone) {
    for (c, lba, len) in lookups.clone() {
        prefetch_first(c, lba, len);
    }
    for (c, lba, len) in lookups {
        prefetch_second(c, lba, len);
    }
}

/// The first stage of a lookup's prefetch ([`ExtentMap::first_line`](crate::engine::index::ExtentMap::first_line)).
pub(crate) fn prefetch_first(c: &Cache, lba: u64, len: u32) {
    prefetch(
        c.index_of(lba)
            .map_or(ptr::null(), |m| m.first_line(lba, len)),
    );
}

/// The second, once the first is loaded (none for a lookup inside one 4 KiB block).
pub(crate) fn prefetch_second(c: &Cache, lba: u64, len: u32) {
    prefetch(
        c.index_of(lba)
            .map_or(ptr::null(), |m| m.second_line(lba, len)),
    );
}

// ---- messages from other threads ----

/// The worker of `io`'s bdev that runs on this thread.
pub(super) fn worker_here(io: *mut ffi::spdk_bdev_io) -> *mut Worker {
    // SAFETY: a pending request of a pcache bdev; its roster was set before registration
    // and stays valid while requests are pending.
    unsafe { Roster::of(io) }.here()
}

/// Gives `p`'s worker the worker's ends of a new queue pair (`link`), by message.
pub(crate) fn attach_link(p: Peer, end: WorkerEnd) -> Result<(), ()> {
    team::send(p, move |e| e.add_link(end))
}

/// Worker-thread entry of a request (`spdk_thread_send_msg` argument: the bdev_io).
pub(crate) unsafe extern "C" fn submit_msg(arg: *mut c_void) {
    no_unwind("pcache submit", (), || {
        let io = arg.cast::<ffi::spdk_bdev_io>();
        // SAFETY: on the worker thread at the top level of a message.
        let e = unsafe { &mut *worker_here(io) };
        prefetch_request(io);
        // SAFETY: on the worker thread.
        unsafe { e.inbox.push(io) };
    })
}

/// Worker-thread entry of a RESET: completes once no request is in flight.
pub(crate) unsafe extern "C" fn reset_msg(arg: *mut c_void) {
    no_unwind("pcache reset", (), || {
        let io = arg.cast::<ffi::spdk_bdev_io>();
        // SAFETY: as in `submit_msg`.
        let e = unsafe { &mut *worker_here(io) };
        e.submit_incoming();
        e.counters.resets += 1;
        e.resets.push(io);
    })
}

/// Starts loading the lines of `io` a worker on another core reads (its header, block
/// parameters and driver context), so that a batch of requests arriving by message misses
/// on them all at once rather than one by one when it is submitted.
pub(crate) fn prefetch_request(io: *mut ffi::spdk_bdev_io) {
    // Addresses of fields of a live request: projections only, nothing is read here.
    let b = ffi::bdev_io_block(io).cast::<u8>();
    prefetch(io.cast());
    prefetch(b);
    prefetch(b.wrapping_add(64));
    prefetch(ctx(io).cast());
}

/// Starts loading the cache line at `p` (null: nothing) without waiting for it.
#[inline]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    if !p.is_null() {
        // SAFETY: a prefetch is a hint: it reads nothing architecturally and cannot fault,
        // whatever the address; SSE is part of the x86_64 baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
