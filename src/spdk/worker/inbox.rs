//! The requests waiting for a worker's next poll.
//!
//! Two kinds of producer fill an inbox, both on the worker's own reactor (OS thread):
//! - `submit_msg`, a message on the worker thread (requests from other cores);
//! - a submitting thread pinned to the worker's core, directly (`io::to_worker`): SPDK
//!   threads pinned to one core are all polled by that core's reactor, one at a time, so
//!   such a push runs between the worker's callbacks or nested inside one (a completion the
//!   worker delivers on the submitting thread's behalf may submit the next request), never
//!   concurrently with them.
//!
//! Hence an `UnsafeCell`, not a lock: nothing ever holds a reference into the vector across
//! a call that could push (`push` and `take` borrow it for their own duration only), and the
//! inbox is shared (`Rc`), never behind the worker's `&mut`.
//!
//! Holds raw request pointers only; calls nothing but `ffi` types.

use std::cell::{Cell, UnsafeCell};

use crate::spdk::ffi;

#[derive(Default)]
pub(crate) struct Inbox {
    queue: UnsafeCell<Vec<*mut ffi::spdk_bdev_io>>,
    /// Requests for this worker waiting in the batch of a submitting thread on its core
    /// (`local`), which a reset must wait for like those in flight.
    held: Cell<u32>,
    /// The worker never serves a request directly (data CRCs, checked by the worker):
    /// submitting threads send everything here at once.
    never_direct: Cell<bool>,
    /// The worker's cache is mapped: submitting threads on its core copy its read hits out
    /// of the mapping themselves and send it everything else (its writes share a fence per
    /// poll).
    mapped: bool,
}

impl Inbox {
    /// Queues `io` for the worker's next poll.
    ///
    /// # Safety
    /// Called on the worker's reactor: on the worker thread, or on a thread pinned to the
    /// worker's core (see the module docs).
    pub(crate) unsafe fn push(&self, io: *mut ffi::spdk_bdev_io) {
        // SAFETY: per the contract no other access runs concurrently, and no reference into
        // the vector outlives `push` or `take`, so this one is unique while it lives.
        unsafe { (*self.queue.get()).push(io) }
    }

    /// Moves the queued requests to `out` (empty on entry), leaving its old buffer here.
    pub(super) fn take(&self, out: &mut Vec<*mut ffi::spdk_bdev_io>) {
        // SAFETY: called by the worker on its thread; unique for the duration as in `push`.
        unsafe { std::ptr::swap(self.queue.get(), out) }
    }

    /// A submitting thread on this core holds one more request for the worker.
    pub(super) fn hold(&self) {
        self.held.set(self.held.get() + 1);
    }

    /// One request `hold` counted was served or handed over.
    pub(super) fn release(&self) {
        self.held.set(self.held.get().saturating_sub(1));
    }

    /// Requests held by submitting threads on this core.
    pub(super) fn held(&self) -> u32 {
        self.held.get()
    }

    /// Whether submitting threads should skip serving requests themselves.
    pub(crate) fn never_direct(&self) -> bool {
        self.never_direct.get()
    }

    /// Whether the worker's cache is mapped (see the field).
    pub(crate) fn mapped(&self) -> bool {
        self.mapped
    }

    /// For a worker whose cache is `mapped` (or a cache bdev).
    pub(super) fn new(mapped: bool) -> Self {
        Inbox {
            mapped,
            ..Inbox::default()
        }
    }

    pub(super) fn set_never_direct(&self) {
        self.never_direct.set(true);
    }

    pub(super) fn is_empty(&self) -> bool {
        // SAFETY: as in `take`; a read of the length only.
        unsafe { (*self.queue.get()).is_empty() }
    }
}
