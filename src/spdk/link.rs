//! Queue pairs between a submitting thread and a worker thread on another core.
//!
//! A request for a worker on another core could travel as an SPDK message with the
//! `spdk_bdev_io` as argument, but then the worker reads the request's lines of the bdev_io
//! (header, block parameters, iovec, driver context), and they migrate between the cores
//! twice per request, on top of the message ring and message object. On hardware where a
//! cache line between two cores costs 300+ ns (this project's 2-vCPU VM, half the time),
//! that is most of a request's cost.
//!
//! So each submitting thread, on its first request for a given remote worker, makes a pair
//! of single-producer single-consumer rings with it (`rtrb`), like an NVMe queue pair:
//! - the submission queue carries a [`Desc`]: what the worker needs of the request, copied
//!   by the submitting thread (one cache line, the only one of the request that crosses);
//! - the completion queue carries the bdev_io back with its outcome in the low bit
//!   ([`completion_arg`]); the submitting thread's channel poller completes it.
//!
//! The worker never touches such a request's bdev_io. The worker learns of a new pair by
//! message (`worker::attach_link`), which it gets before any later stop (causality: the
//! pair is made while the bdev is open). The submitting side drops its ends when its channel
//! is destroyed, after every request on it completed; the worker sees the rings abandoned
//! and drops its ends. Either side falls back to messages when a ring is full, so a queue
//! pair is only ever a faster path, never a requirement.

use std::ffi::c_void;
use std::ptr;

use rtrb::{Consumer, Producer, RingBuffer};

use super::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};

/// Entries per ring: more than any single channel keeps in flight towards one worker in
/// practice (bdevperf -q 128, an NVMe-oF queue); a full ring only means the message path.
const DEPTH: usize = 1024;

/// What a worker needs of a request.
#[derive(Clone, Copy)]
pub(crate) struct Desc {
    pub io: *mut ffi::spdk_bdev_io,
    pub ty: t::Type,
    pub offset: u64,
    pub num: u64,
    /// The payload (READ and WRITE; none for the others).
    pub iovs: Iovs,
}

/// A request's iovecs: one copied inline, or the bdev layer's array of several (owned by
/// the bdev_io or its submitter, live while the request is pending).
#[derive(Clone, Copy)]
pub(crate) struct Iovs {
    one: ffi::iovec,
    many: *const ffi::iovec,
    count: u32,
}

impl Default for Iovs {
    fn default() -> Self {
        Iovs {
            one: ffi::iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0,
            },
            many: ptr::null(),
            count: 0,
        }
    }
}

impl Iovs {
    /// The iovecs (while the request they belong to is pending).
    pub(crate) fn get(&self) -> &[ffi::iovec] {
        match (self.many.is_null(), self.count) {
            (_, 0) => &[],
            (true, _) => std::slice::from_ref(&self.one),
            // SAFETY: `many` is the pending request's iovec array with `count` entries
            // (`Desc::of`); callers only hold an Iovs while that request is pending.
            (false, n) => unsafe { std::slice::from_raw_parts(self.many, n as usize) },
        }
    }
}

// SAFETY: a Desc is a copy of a pending request's parameters; the pointers in it are only
// dereferenced by the worker the request was sent to, while it is pending.
unsafe impl Send for Desc {}

impl Desc {
    /// Describes `io` (a pending request of a pcache bdev; READ, WRITE, FLUSH, UNMAP or
    /// WRITE_ZEROES, whose block parameters are filled).
    pub(crate) fn of(io: *mut ffi::spdk_bdev_io) -> Desc {
        // SAFETY: a live request; `u.bdev` holds its block parameters for these types,
        // read field by field; the iovec array is live and holds `iovcnt` entries when the
        // request carries data (READ/WRITE), and is only read then.
        unsafe {
            let b = ffi::bdev_io_block(io);
            let ty = t::Type::from((*io).type_);
            let (offset, num) = ((*b).offset_blocks, (*b).num_blocks);
            let data = matches!(ty, t::SPDK_BDEV_IO_TYPE_READ | t::SPDK_BDEV_IO_TYPE_WRITE);
            let (v, n) = ((*b).iovs.cast_const(), (*b).iovcnt);
            let iovs = match (data, v.is_null(), n) {
                (true, false, 1) => Iovs {
                    one: *v,
                    count: 1,
                    ..Iovs::default()
                },
                (true, false, n) if n > 1 => Iovs {
                    many: v,
                    count: n as u32,
                    ..Iovs::default()
                },
                _ => Iovs::default(),
            };
            Desc {
                io,
                ty,
                offset,
                num,
                iovs,
            }
        }
    }
}

/// A finished request on its way back: [`completion_arg`].
#[derive(Clone, Copy)]
pub(crate) struct Finished(pub *mut c_void);

// SAFETY: an address handed back to the thread that owns the request, which alone uses it.
unsafe impl Send for Finished {}

/// The submitting thread's ends.
pub(crate) struct Link {
    pub sq: Producer<Desc>,
    pub cq: Consumer<Finished>,
}

/// The worker's ends.
pub(crate) struct WorkerEnd {
    pub sq: Consumer<Desc>,
    pub cq: Producer<Finished>,
}

impl WorkerEnd {
    /// The submitting side is gone (its channel was destroyed, after all its requests
    /// completed) and nothing is left to take.
    pub(crate) fn closed(&self) -> bool {
        self.sq.is_abandoned() && self.sq.is_empty()
    }
}

/// A new queue pair.
pub(crate) fn pair() -> (Link, WorkerEnd) {
    let (sq_p, sq_c) = RingBuffer::new(DEPTH);
    let (cq_p, cq_c) = RingBuffer::new(DEPTH);
    (
        Link { sq: sq_p, cq: cq_c },
        WorkerEnd { sq: sq_c, cq: cq_p },
    )
}

/// A finished request as a message argument: the bdev_io, its low bit set if it failed (a
/// bdev_io holds pointers, so it is at least 8-aligned; the worker only ever reports success
/// or failure).
pub(crate) fn completion_arg(io: *mut ffi::spdk_bdev_io, status: st::Type) -> *mut c_void {
    let failed = usize::from(status != st::SPDK_BDEV_IO_STATUS_SUCCESS);
    io.cast::<u8>().wrapping_add(failed).cast()
}

pub(crate) fn from_completion_arg(arg: *mut c_void) -> (*mut ffi::spdk_bdev_io, st::Type) {
    let failed = arg as usize & 1;
    let io = arg.cast::<u8>().wrapping_sub(failed).cast();
    let status = if failed == 0 {
        st::SPDK_BDEV_IO_STATUS_SUCCESS
    } else {
        st::SPDK_BDEV_IO_STATUS_FAILED
    };
    (io, status)
}
