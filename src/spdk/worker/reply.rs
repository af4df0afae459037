//! Requests in flight on a worker and their completion: the slots that hold a request's
//! buffer while the cache and device commands use it, and the answer back to the thread
//! that submitted it (on its queue pair, by message, to each fanned-out part, or at once as
//! that thread when it shares the worker's core).
//!
//! Calls `link`, `msg`, `ffi` and `io`'s completion helpers; nothing else of the worker.

use std::ffi::c_void;
use std::ptr;

use super::{SendPtr, Worker};
use crate::engine::{ReqError, ReqId, ReqResult};
use crate::spdk::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};
use crate::spdk::link::{completion_arg, from_completion_arg, Desc, Finished, Iovs};
use crate::spdk::log::{no_unwind, spdk_log};
use crate::spdk::msg;
use crate::spdk::stats::IoCounters;

// ---- requests in flight ----

/// How a request reached the worker, hence how to answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
    /// Through the inbox: its context says how (`IoCtx::local`, `fanout`, else a message).
    Inbox,
    /// On queue pair `k` of `Worker::links`: back on its completion queue.
    Link(usize),
}

pub(super) struct ReqSlot {
    pub(super) io: *mut ffi::spdk_bdev_io,
    /// The payload's iovecs (none for requests without data).
    pub(super) iovs: Iovs,
    pub(super) reply: Reply,
    /// Device commands in flight that use this request's buffer.
    pub(super) refs: u32,
    /// The cache's verdict, once it completed the request.
    pub(super) result: Option<bool>,
    pub(super) gen: u32,
    pub(super) live: bool,
}

#[derive(Default)]
pub(super) struct Reqs {
    pub(super) slots: Vec<ReqSlot>,
    pub(super) free: Vec<u32>,
    pub(super) live: usize,
}

impl ReqSlot {
    pub(super) fn iovs(&self) -> &[ffi::iovec] {
        self.iovs.get()
    }
}

impl Reqs {
    /// A slot for request `d`, whose payload `with_buf` says whether to keep.
    pub(super) fn insert(&mut self, d: &Desc, with_buf: bool, reply: Reply) -> ReqId {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(ReqSlot {
                    io: ptr::null_mut(),
                    iovs: Iovs::default(),
                    reply: Reply::Inbox,
                    refs: 0,
                    result: None,
                    gen: 0,
                    live: false,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[idx as usize];
        s.gen = s.gen.wrapping_add(1);
        s.io = d.io;
        s.iovs = if with_buf { d.iovs } else { Iovs::default() };
        s.reply = reply;
        s.refs = 0;
        s.result = None;
        s.live = true;
        self.live += 1;
        (u64::from(s.gen) << 32) | u64::from(idx)
    }

    /// The live slot of request `id`.
    pub(super) fn index(&self, id: ReqId) -> Option<u32> {
        let idx = (id & 0xffff_ffff) as u32;
        let s = self.slots.get(idx as usize)?;
        (s.live && u64::from(s.gen) == id >> 32).then_some(idx)
    }

    pub(super) fn remove(&mut self, idx: u32) -> (*mut ffi::spdk_bdev_io, Reply) {
        let s = &mut self.slots[idx as usize];
        s.live = false;
        self.live -= 1;
        self.free.push(idx);
        (std::mem::replace(&mut s.io, ptr::null_mut()), s.reply)
    }
}

impl Worker {
    /// Sends the completion of `io` to its submitting thread.
    pub(super) fn finish_io(&mut self, io: *mut ffi::spdk_bdev_io, status: st::Type, reply: Reply) {
        if let Reply::Link(k) = reply {
            let done = Finished(completion_arg(io, status));
            let queued = self
                .links
                .get_mut(k)
                .and_then(Option::as_mut)
                .is_some_and(|end| end.cq.push(done).is_ok());
            if !queued && !send_completion(done.0) {
                self.unsent.push(done.0);
            }
            return;
        }
        // SAFETY: our bdevs' bdev_io carry an IoCtx as driver context.
        let ctx = unsafe { ffi::bdev_io_driver_ctx::<IoCtx>(io) };
        // SAFETY: a pending request; `fanout` was written by the submitting thread before
        // it sent the request to the workers, and is only read after that.
        if unsafe { (*ctx).fanout } {
            // Several workers answer this request: each sends its own status.
            let p = SendPtr(io);
            // SAFETY: a pending request; its thread lives until it completes.
            let th = unsafe { ffi::spdk_bdev_io_get_thread(io) };
            if msg::send(th, move || fanout_done(p.0, status)).is_err() {
                spdk_log!(ERROR, "{}: lost the completion of a request", self.name);
            }
            return;
        }
        // SAFETY: as above (`local` is written before the request reaches the inbox).
        if unsafe { (*ctx).local } {
            return complete_as_submitter(io, status);
        }
        let arg = completion_arg(io, status);
        if !send_completion(arg) {
            self.unsent.push(arg);
        }
    }

    pub(super) fn request_done(&mut self, id: ReqId, res: ReqResult) {
        let Some(idx) = self.reqs.index(id) else {
            spdk_log!(
                ERROR,
                "{}: completion for an unknown request {id:#x}",
                self.name
            );
            return;
        };
        if let Err(e) = &res {
            self.counters.requests_failed += 1;
            if !matches!(e, ReqError::Io | ReqError::ShardFailed)
                || self.counters.requests_failed <= 10
            {
                spdk_log!(ERROR, "{}: request failed: {e}", self.name);
            }
        }
        let s = &mut self.reqs.slots[idx as usize];
        s.result = Some(res.is_ok());
        if s.refs == 0 {
            self.finish_slot(idx);
        }
    }

    pub(super) fn finish_slot(&mut self, idx: u32) {
        let ok = self.reqs.slots[idx as usize].result.unwrap_or(false);
        let (io, reply) = self.reqs.remove(idx);
        self.finish_io(
            io,
            if ok {
                st::SPDK_BDEV_IO_STATUS_SUCCESS
            } else {
                st::SPDK_BDEV_IO_STATUS_FAILED
            },
            reply,
        );
    }

    pub(super) fn unref(&mut self, idx: u32) {
        let s = &mut self.reqs.slots[idx as usize];
        s.refs = s.refs.saturating_sub(1);
        if s.live && s.refs == 0 && s.result.is_some() {
            self.finish_slot(idx);
        }
    }
}

/// Sends a finished request ([`completion_arg`]) back to its submitting thread to be
/// completed there.
pub(super) fn send_completion(arg: *mut c_void) -> bool {
    let (io, _) = from_completion_arg(arg);
    // SAFETY: a pending request; `io::complete_remote_msg` completes it on its own thread.
    unsafe {
        let th = ffi::spdk_bdev_io_get_thread(io);
        ffi::spdk_thread_send_msg(th, Some(complete_remote_msg), arg) == 0
    }
}

// ---- on the submitting thread ----

/// Per-request context in `bdev_io->driver_ctx` (size given by the module's `get_ctx_size`).
/// SPDK neither initializes nor drops it: written at submit, read at completion.
pub(crate) struct IoCtx {
    /// Our channel the request was submitted on (for the counters).
    pub(crate) ch: *mut ffi::spdk_io_channel,
    /// Sent to several workers, which then answer by [`fanout_done`] (set before sending).
    pub(crate) fanout: bool,
    /// Put straight into the inbox of a worker on this thread's core: the worker
    /// completes it as this thread ([`complete_as_submitter`]).
    pub(crate) local: bool,
    /// Its direct write failed: the worker submits it to the cache, whose path retries
    /// cache writes, instead of serving it directly again.
    pub(crate) no_direct: bool,
    /// Workers still to answer, and the worst status so far (submitting thread only).
    pub(crate) left: u32,
    pub(crate) worst: st::Type,
    /// Served by the submitting thread itself (`worker::local`): its worker and what it
    /// started.
    pub(crate) local_direct: Option<super::local::Local>,
}

// driver_ctx sits at offset 1216 of an 8-aligned spdk_bdev_io.
const _: () = assert!(std::mem::align_of::<IoCtx>() <= 8);
const _: () = assert!(std::mem::offset_of!(ffi::spdk_bdev_io, driver_ctx) % 8 == 0);

/// Bytes moved by a READ or WRITE.
pub(crate) fn bytes(io: *mut ffi::spdk_bdev_io) -> u64 {
    // SAFETY: live READ/WRITE bdev_io of a live bdev; integer fields read by value.
    unsafe {
        (*ffi::bdev_io_block(io))
            .num_blocks
            .wrapping_mul(u64::from((*(*io).bdev).blocklen))
    }
}

pub(crate) fn ctx(io: *mut ffi::spdk_bdev_io) -> *mut IoCtx {
    // SAFETY: our bdevs' bdev_io carry `size_of::<IoCtx>()` bytes of driver context.
    unsafe { ffi::bdev_io_driver_ctx::<IoCtx>(io) }
}

/// Complete `io` here and now (submitting thread) with `status`.
pub(crate) fn complete_here(io: *mut ffi::spdk_bdev_io, status: st::Type) {
    // SAFETY: a pending request on this thread, completed exactly once.
    unsafe { ffi::spdk_bdev_io_complete(io, status) };
}

/// One worker's answer to a request sent to several (on the submitting thread): the last
/// completes it, failed if any part failed.
pub(crate) fn fanout_done(io: *mut ffi::spdk_bdev_io, status: st::Type) {
    // SAFETY: a pending fanned-out request on its submitting thread: `left` and `worst`
    // are only touched here.
    let (left, worst) = unsafe {
        let c = ctx(io);
        if status != st::SPDK_BDEV_IO_STATUS_SUCCESS {
            (*c).worst = st::SPDK_BDEV_IO_STATUS_FAILED;
        }
        (*c).left = (*c).left.saturating_sub(1);
        ((*c).left, (*c).worst)
    };
    if left == 0 {
        // The request's own thread, completed exactly once (the last answer).
        complete(io, worst);
    }
}

/// Completes a request that came through the inbox ([`IoCtx::local`]) from its worker's
/// thread, as the thread that submitted it: both are pinned to this core, so the submitting
/// thread is not running now, and this is what its `complete_msg` message would do.
pub(crate) fn complete_as_submitter(io: *mut ffi::spdk_bdev_io, status: st::Type) {
    let me = msg::current();
    // SAFETY: the request's thread lives until it completes; switching SPDK's notion of the
    // current thread to it (and back) is sound because it shares this OS thread (above), so
    // its state is not in use; `complete` then runs exactly as it would there.
    unsafe { ffi::spdk_set_thread(ffi::spdk_bdev_io_get_thread(io)) };
    no_unwind("complete_as_submitter", (), || complete(io, status));
    // SAFETY: back to the worker thread we were called on.
    unsafe { ffi::spdk_set_thread(me) };
}

/// A worker on another core is done with a request (message back to the submitting
/// thread; the argument from [`completion_arg`]).
pub(crate) unsafe extern "C" fn complete_remote_msg(arg: *mut c_void) {
    no_unwind("complete_remote_msg", (), || {
        let (io, status) = from_completion_arg(arg);
        complete(io, status);
    })
}

/// Counts `io` on its channel and completes it with `status` (on its submitting thread).
pub(crate) fn complete(io: *mut ffi::spdk_bdev_io, status: st::Type) {
    // SAFETY: a pending request on its submitting thread (this one), handed back by the
    // workers; its type, size and channel are read by value.
    let (ch, ty, bytes) = unsafe {
        let ty = t::Type::from((*io).type_);
        let bytes = match ty {
            t::SPDK_BDEV_IO_TYPE_READ | t::SPDK_BDEV_IO_TYPE_WRITE => bytes(io),
            _ => 0,
        };
        ((*ctx(io)).ch, ty, bytes)
    };
    if !ch.is_null() {
        // SAFETY: our channel on this thread; it outlives the requests submitted on it. Its
        // context begins with its counters (`io::Channel` is `repr(C)`, `stats` first).
        let stats = unsafe { &*ffi::io_channel_get_ctx::<IoCounters>(ch) };
        stats.record(ty, bytes, status == st::SPDK_BDEV_IO_STATUS_SUCCESS);
    }
    complete_here(io, status);
}
