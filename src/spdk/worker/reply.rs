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
use crate::spdk::ffi::{self, spdk_bdev_io_status as st};
use crate::spdk::io::{self, IoCtx};
use crate::spdk::link::{Desc, Finished, Iovs};
use crate::spdk::log::spdk_log;
use crate::spdk::msg;

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
    /// The worker's verdict, once it completed the request.
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
            let done = Finished(io::completion_arg(io, status));
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
            if msg::send(th, move || io::fanout_done(p.0, status)).is_err() {
                spdk_log!(ERROR, "{}: lost the completion of a request", self.name);
            }
            return;
        }
        // SAFETY: as above (`local` is written before the request reaches the inbox).
        if unsafe { (*ctx).local } {
            return io::complete_as_submitter(io, status);
        }
        let arg = io::completion_arg(io, status);
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

/// Sends a finished request ([`io::completion_arg`]) back to its submitting thread to be
/// completed there.
pub(super) fn send_completion(arg: *mut c_void) -> bool {
    let (io, _) = io::from_completion_arg(arg);
    // SAFETY: a pending request; `io::complete_remote_msg` completes it on its own thread.
    unsafe {
        let th = ffi::spdk_bdev_io_get_thread(io);
        ffi::spdk_thread_send_msg(th, Some(io::complete_remote_msg), arg) == 0
    }
}
