//! The worker's side of the requests its submitting threads serve themselves
//! (`io::served`): a request for a worker on the submitting thread's core is counted while
//! it waits in that thread's batch ([`wait`]), started as a direct request of the cache
//! ([`Worker::begin_local`]) and ended when its cache-bdev I/O completes
//! ([`Worker::end_local`]); a read miss the cache would not fill is started as a read of
//! the backing bdev ([`Worker::begin_backing_local`]) and ended the same way.
//!
//! The worker counts what it has started here as its own (`inflight`, `direct_live`), and
//! requests held in a batch through its inbox (`Inbox::hold`), so it neither stops nor
//! completes a reset while one is pending. A worker that never serves directly (data CRCs,
//! checked by the worker) says so in its inbox (`Inbox::never_direct`), and its requests
//! skip the batch. Over a mapped cache, the submitting thread serves read hits whole
//! ([`Worker::read_mapped_local`]: a copy out of the mapping) and such misses, and writes
//! skip the batch (the worker makes a poll's writes durable with one fence).
//!
//! These run on the submitting thread, with the worker not borrowed (`io::served` says
//! why); they call nothing above the worker.

use std::ptr;

use super::reply::ctx;
use super::{Peer, State, Worker};
use crate::engine::{Cache, Dev, Direct, IoError, Op};
use crate::spdk::ffi::{self, spdk_bdev_io_status as st};
use crate::spdk::link::Desc;

/// Counts a request for `p`'s worker that a submitting thread on its core now holds.
pub(crate) fn wait(p: Peer) {
    // SAFETY: the inbox lives as long as its worker, which outlives the bdev's requests.
    unsafe { (*p.inbox).hold() };
}

/// One request [`wait`] counted was served or handed over. Inlined: it was part of the
/// batch (`io::served::serve_batch`).
#[inline(always)]
pub(crate) fn release(p: Peer) {
    // SAFETY: as in `wait`.
    unsafe { (*p.inbox).release() };
}

/// What a request its submitting thread serves started (kept in its driver context).
#[derive(Clone, Copy)]
pub(crate) struct Local {
    pub(crate) worker: *mut Worker,
    pub(crate) direct: Direct,
    /// Offset and length in blocks of the bdev read or written (the cache bdev, or the
    /// backing bdev for a miss: `direct.backing`).
    pub(crate) blocks: [u64; 2],
}

impl Worker {
    /// What `io`'s index lookup reads: the cache, and the request's first sector and length
    /// in sectors (as `Cache` takes them). Read only, by a submitting thread on this
    /// worker's core (`io::served`). Inlined: it was part of the batch there.
    #[inline(always)]
    pub(crate) fn lookup_of(&self, io: *mut ffi::spdk_bdev_io) -> Option<(&Cache, u64, u32)> {
        let b = ffi::bdev_io_block(io);
        let shift = self.front_shift;
        // SAFETY: a pending request's block range, read by value.
        let len = u32::try_from(unsafe { (*b).num_blocks } << shift).unwrap_or(u32::MAX);
        self.cache
            .as_deref()
            // SAFETY: as above.
            .map(|c| (c, unsafe { (*b).offset_blocks } << shift, len))
    }

    /// The worker's part of [`serve`]: starts `io` as a direct request and counts it, or
    /// None. Returns what was started and its extent in cache bdev blocks. Inlined into
    /// [`serve`] (see there).
    #[inline(always)]
    pub(crate) fn begin_local(
        &mut self,
        io: *mut ffi::spdk_bdev_io,
        op: Op,
    ) -> Option<(Direct, [u64; 2])> {
        if self.removed[0] || !matches!(self.state, State::Running | State::Draining) {
            return None;
        }
        if self.dax.is_some() {
            // Never asked (`io::served` asks `read_mapped_local`).
            return None;
        }
        let (sector, len) = self.range_of(io)?;
        let cache = self.cache.as_deref_mut()?;
        let Some(direct) = cache.begin_direct(op, sector, len) else {
            if cache.superblock().data_crc {
                // Every read is checked against its CRC by the worker.
                self.inbox.set_never_direct();
            }
            return None;
        };
        let Some(blocks) = self.blocks_of(Dev::Cache, direct.sector, u64::from(len)) else {
            // Never so: the cache bdev's blocks divide every extent. Undone, and left to
            // the worker, which reports it.
            if let Some(c) = self.cache.as_deref_mut() {
                let _ = c.end_direct(direct, Ok(()));
            }
            return None;
        };
        self.count_local(direct.write);
        Some((direct, blocks))
    }

    /// The sectors `io` (a live READ or WRITE) covers, in the cache's 512-byte sectors.
    #[inline(always)]
    fn range_of(&self, io: *mut ffi::spdk_bdev_io) -> Option<(u64, u32)> {
        // SAFETY: a live READ/WRITE request; its block parameters are read by value.
        let (offset, num) = unsafe {
            let b = ffi::bdev_io_block(io);
            ((*b).offset_blocks, (*b).num_blocks)
        };
        let shift = self.front_shift;
        Some((offset << shift, u32::try_from(num << shift).ok()?))
    }

    /// Counts a request its submitting thread serves with one device I/O, now started.
    #[inline(always)]
    fn count_local(&mut self, write: bool) {
        self.wake();
        let c = &mut self.counters;
        c.requests += 1;
        c.arrived_same_core += 1;
        c.served_by_submitter += 1;
        if write {
            c.dev_writes += 1;
        } else {
            c.dev_reads += 1;
        }
        self.inflight += 1;
        self.direct_live += 1;
    }

    /// The worker's part of a read miss [`serve`] serves with one backing-bdev read of its
    /// own (`Cache::begin_backing_read`: nothing of it cached, and it fills nothing):
    /// starts and counts it as [`Worker::begin_local`] does a hit, or None. Returns what
    /// was started, its extent in backing bdev blocks, and the backing bdev's descriptor.
    pub(crate) fn begin_backing_local(
        &mut self,
        io: *mut ffi::spdk_bdev_io,
    ) -> Option<(Direct, [u64; 2], *mut ffi::spdk_bdev_desc)> {
        if self.removed[1] || !matches!(self.state, State::Running | State::Draining) {
            return None;
        }
        let (sector, len) = self.range_of(io)?;
        // Before the cache counts it (a range the backing bdev's blocks do not divide goes
        // the normal way, which reports it).
        let blocks = self.blocks_of(Dev::Backing, sector, u64::from(len))?;
        let direct = self.cache.as_deref_mut()?.begin_backing_read(sector, len)?;
        self.count_local(false);
        Some((direct, blocks, self.desc[1]))
    }

    /// Over a mapped cache, serves read `io` here, on its submitting thread, if the cache
    /// holds all of it: copied out of the mapping into its buffer, as the worker's own poll
    /// would (`Worker::read_inline`); nothing is written, so no fence. None: not served
    /// here (a miss: the worker takes it); else the request's status.
    #[inline(always)]
    pub(crate) fn read_mapped_local(&mut self, io: *mut ffi::spdk_bdev_io) -> Option<st::Type> {
        if self.removed[0]
            || self.dax.is_none()
            || !matches!(self.state, State::Running | State::Draining)
        {
            return None;
        }
        let d = Desc::of(io);
        let shift = self.front_shift;
        let len = u32::try_from(d.num << shift).ok()?;
        let ok = self.read_inline(&d, d.offset << shift, len)?;
        self.wake();
        let c = &mut self.counters;
        c.requests += 1;
        c.arrived_same_core += 1;
        c.served_by_submitter += 1;
        Some(self.inline_read_status(ok))
    }

    /// The cache I/O of request `io` [`serve`] started failed: the cache forgets it, and
    /// the request goes to this worker's inbox to be served the normal way.
    pub(crate) fn retry_local(&mut self, direct: Direct, io: *mut ffi::spdk_bdev_io) {
        self.counters.dev_errors += 1;
        if let Some(c) = self.cache.as_deref_mut() {
            let _ = c.end_direct(direct, Err(IoError::Device));
        }
        self.counters.direct_retried += 1;
        self.hand_over_local(io);
    }

    /// No `spdk_bdev_io` was free for the cache I/O of request `io` [`serve`] started:
    /// the cache forgets it, uncounted, and the request goes to this worker's inbox; the
    /// worker's own device I/O waits for a free one (`Worker::resubmit_waiting`).
    pub(crate) fn cancel_local(&mut self, direct: Direct, io: *mut ffi::spdk_bdev_io) {
        // SAFETY: a pending READ/WRITE request; its length is read by value.
        let num = unsafe { (*ffi::bdev_io_block(io)).num_blocks };
        let len = u32::try_from(num << self.front_shift).unwrap_or(u32::MAX);
        if let Some(c) = self.cache.as_deref_mut() {
            c.cancel_direct(direct, len);
        }
        let c = &mut self.counters;
        c.nomem_waits += 1;
        c.requests -= 1;
        c.arrived_same_core -= 1;
        c.served_by_submitter -= 1;
        if direct.write {
            c.dev_writes -= 1;
        } else {
            c.dev_reads -= 1;
        }
        self.hand_over_local(io);
    }

    /// Gives `io`, begun by [`serve`] and not served so, to this worker's inbox (never to
    /// be served directly again).
    fn hand_over_local(&mut self, io: *mut ffi::spdk_bdev_io) {
        self.inflight -= 1;
        self.direct_live -= 1;
        // SAFETY: a pending request of this worker's bdev, on the worker's core (the
        // submitting thread is pinned to it); it is answered as that thread (`local`).
        unsafe {
            let c = ctx(io);
            ptr::addr_of_mut!((*c).no_direct).write(true);
            ptr::addr_of_mut!((*c).local).write(true);
            self.inbox.push(io);
        }
        self.kick = true;
    }

    /// The cache-bdev I/O of a request [`serve`] started finished: so did the request.
    pub(crate) fn end_local(&mut self, direct: Direct, ok: bool) -> st::Type {
        self.inflight -= 1;
        if !ok {
            self.counters.dev_errors += 1;
        }
        self.end_direct(direct, ok)
    }
}
