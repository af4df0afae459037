//! Requests served by the submitting thread itself, when the worker of their stripe runs on
//! the same core and can serve them directly (a read hit or an in-place rewrite:
//! `Cache::begin_direct`; a read miss the cache would not fill, read from the backing bdev:
//! `Cache::begin_backing_read`).
//!
//! A submitting thread pinned to a worker's core collects the requests for that worker in
//! its channel, served together ([`serve_batch`]) once the submitter's poller returns (or by
//! the channel's poller): for each, it
//! asks the worker where its data is (`Worker::begin_local`) and issues the one cache-bdev
//! I/O on its own channel to the cache bdev, completing the request from that I/O's
//! callback, on its own thread, while the index lines of the requests a few places behind it
//! load. That is a passthru vbdev's path plus an index lookup whose cache misses overlap the
//! requests before it, with no inbox, worker poll or thread switch. Requests it cannot serve
//! so go to the worker's inbox.
//!
//! The worker is never borrowed while a submitting thread uses it: both threads are pinned
//! to this core and polled by its reactor one at a time, and the worker's own callbacks
//! never reach the channel poller (a completion the worker delivers as the submitter may
//! submit again, which only queues the request in the channel). The worker's side of this
//! (what it counts, when it refuses) is in `worker::local`.
//!
//! A miss that admission declines (most misses once the cache is full: only a second miss
//! fills) is read the same way, on this thread's own channel to the backing bdev: the
//! request skips the worker's inbox, poll and command queue, as a passthru bdev's would.
//! A miss that fills the cache goes to the worker, which logs the fill.
//!
//! A request whose device I/O finds no free `spdk_bdev_io` is handed to the worker
//! (`Worker::cancel_local`), which queues its own device I/O until one is free.

use std::ffi::c_void;
use std::ptr;

use super::{to_inbox, Channel, Front};
use crate::engine::Op;
use crate::shell::lookahead;
use crate::spdk::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};
use crate::spdk::log::no_unwind;
use crate::spdk::worker::{self, complete, ctx, Local, Peer};

/// Serves the requests of `batch` (empty on return), each for a worker on this core,
/// collected by this thread's channel `chan`, at the top level of its thread (a post-poller
/// handler or the channel's poller). The index
/// lines of the requests behind the one being served load meanwhile, at the distances
/// [`lookahead`] sets.
pub(crate) fn serve_batch(batch: &mut Vec<(*mut ffi::spdk_bdev_io, Peer)>, chan: &Channel) {
    let n = batch.len();
    let lookup = |k: usize| {
        let (io, p) = batch[k];
        // SAFETY: the worker lives while its requests are pending and is not borrowed
        // (module docs): read only.
        unsafe { (*p.worker).lookup_of(io) }
    };
    let first = |k: usize| {
        if let Some((c, lba, len)) = lookup(k) {
            worker::prefetch_first(c, lba, len);
        }
    };
    let second = |k: usize| {
        if let Some((c, lba, len)) = lookup(k) {
            worker::prefetch_second(c, lba, len);
        }
    };
    let (warm_first, warm_second) = lookahead::warm_up(n);
    warm_first.for_each(first);
    warm_second.for_each(second);
    for (k, &(io, p)) in batch.iter().enumerate() {
        let (f, s) = lookahead::while_serving(k, n);
        if let Some(j) = f {
            first(j);
        }
        if let Some(j) = s {
            second(j);
        }
        worker::local::release(p);
        if !serve(p, io, chan) {
            to_inbox(io, p);
        }
    }
    batch.clear();
}

/// Serves `io` (a request of a pcache bdev, submitted on this thread through `chan`,
/// pinned to the core of `p`'s worker, where we run) if its worker can serve it directly.
/// False: hand it to the worker.
///
/// Inlined whole into the batch, with the worker's part (`begin_local` down to the index):
/// called, each returned its result through memory, and reading it back stalled on store
/// forwarding (about 2% of bdevperf's time over a malloc cache).
#[inline(always)]
fn serve(p: Peer, io: *mut ffi::spdk_bdev_io, chan: &Channel) -> bool {
    // SAFETY: a live request of this bdev; type read by value.
    let ty = t::Type::from(unsafe { (*io).type_ });
    let Some(op @ (Op::Read | Op::Write)) = worker::op_of(ty) else {
        return false;
    };
    // SAFETY: the worker's inbox lives as long as the worker (beyond this request).
    if unsafe { (*p.inbox).mapped() } {
        if op != Op::Read {
            return false;
        }
        // SAFETY: as for `e` below.
        let e = unsafe { &mut *p.worker };
        let Some(status) = e.read_mapped_local(io) else {
            return serve_miss(p, io, chan);
        };
        // On its own thread, at the top level of it (module docs): what the request's
        // submitter does next (submit again) only queues in the channel.
        complete(io, status);
        return true;
    }
    let ch = chan.cache_channel();
    if ch.is_null() {
        return false;
    }
    // SAFETY: the worker lives until after the bdev's last request and is not borrowed
    // while this thread's poller runs (module docs).
    let e = unsafe { &mut *p.worker };
    let Some((direct, blocks)) = e.begin_local(io, op) else {
        return op == Op::Read && serve_miss(p, io, chan);
    };
    // SAFETY: the node's front outlives its requests; read only.
    let desc = unsafe { Front::of(io).cache.desc.get() };
    start(p, io, ch, desc, direct, blocks);
    true
}

/// Serves read `io` with one backing-bdev read of this thread's own if it is a miss the
/// cache would not fill (`Cache::begin_backing_read`): no inbox, worker poll or engine
/// command, as a passthru bdev would read it. False: hand it to the worker.
#[inline(always)]
fn serve_miss(p: Peer, io: *mut ffi::spdk_bdev_io, chan: &Channel) -> bool {
    // SAFETY: as in `serve`.
    let e = unsafe { &mut *p.worker };
    let Some((direct, blocks, desc)) = e.begin_backing_local(io) else {
        return false;
    };
    let ch = chan.backing_channel(desc);
    if ch.is_null() {
        // No channel (out of memory): the worker serves it.
        e.cancel_local(direct, io);
        return true;
    }
    start(p, io, ch, desc, direct, blocks);
    true
}

/// Issues the one I/O `direct` of `io` started, on channel `ch` to the bdev of `desc`, and
/// completes `io` from its callback (or hands it to the worker).
#[inline(always)]
fn start(
    p: Peer,
    io: *mut ffi::spdk_bdev_io,
    ch: *mut ffi::spdk_io_channel,
    desc: *mut ffi::spdk_bdev_desc,
    direct: crate::engine::Direct,
    blocks: [u64; 2],
) {
    // SAFETY: as in `serve`.
    let e = unsafe { &mut *p.worker };
    let local = Local {
        worker: p.worker,
        direct,
        blocks,
    };
    // SAFETY: this request's driver context, ours while it is pending.
    unsafe { ptr::addr_of_mut!((*ctx(io)).local_direct).write(Some(local)) };
    match submit(io, ch, desc, local) {
        Submitted::Yes => {}
        // Not waited for here: a wait (`spdk_bdev_queue_io_wait`) fires only when a bdev_io
        // is freed on this thread, which may never happen if the others hold them all.
        // The worker takes it, and retries its own device I/O from its poller.
        Submitted::NoMemory => {
            // SAFETY: as above.
            unsafe { ptr::addr_of_mut!((*ctx(io)).local_direct).write(None) };
            e.cancel_local(direct, io);
        }
        Submitted::Failed => finish(io, false),
    }
}

enum Submitted {
    Yes,
    /// No `spdk_bdev_io` was free.
    NoMemory,
    Failed,
}

/// Issues the device I/O of `io` (what `l` started) on this thread's channel `ch` to the
/// bdev of `desc`.
fn submit(
    io: *mut ffi::spdk_bdev_io,
    ch: *mut ffi::spdk_io_channel,
    desc: *mut ffi::spdk_bdev_desc,
    l: Local,
) -> Submitted {
    // SAFETY: a pending request of a live node, whose base descriptors stay open while it
    // is pending; its iovecs are live until it completes, which is after this I/O does.
    let rc = unsafe {
        let b = ffi::bdev_io_block(io);
        let (iovs, iovcnt) = ((*b).iovs, (*b).iovcnt);
        let cb = Some(done as unsafe extern "C" fn(*mut ffi::spdk_bdev_io, bool, *mut c_void));
        let [offset, num] = l.blocks;
        if l.direct.write {
            ffi::spdk_bdev_writev_blocks(desc, ch, iovs, iovcnt, offset, num, cb, io.cast())
        } else {
            ffi::spdk_bdev_readv_blocks(desc, ch, iovs, iovcnt, offset, num, cb, io.cast())
        }
    };
    match rc {
        0 => Submitted::Yes,
        rc if rc == -libc::ENOMEM => Submitted::NoMemory,
        _ => Submitted::Failed,
    }
}

/// Completion of the cache-bdev I/O of a request its submitting thread serves, on that thread.
unsafe extern "C" fn done(child: *mut ffi::spdk_bdev_io, ok: bool, arg: *mut c_void) {
    no_unwind("pcache local done", (), || {
        // SAFETY: the cache bdev_io we submitted; we are done with it.
        unsafe { ffi::spdk_bdev_free_io(child) };
        finish(arg.cast(), ok);
    })
}

/// Ends request `io`, served by its submitting thread, whose cache-bdev I/O succeeded or
/// not. At the top level of a poller or message of that thread.
fn finish(io: *mut ffi::spdk_bdev_io, ok: bool) {
    // SAFETY: a pending request `serve` started, on its submitting thread; its context
    // names the worker, alive while the request is pending and not borrowed now (its
    // reactor runs this thread's callback, at the top level: completions of the cache bdev
    // are delivered by a poller, and failures by `serve` or a message).
    let status = unsafe {
        match (*ctx(io)).local_direct.take() {
            // A failed read hit or rewrite in place goes to the worker's inbox, to be served
            // the normal way (cache writes retried through the log, clean data read from
            // the backing device); the worker completes it.
            Some(l) if !ok => {
                (*l.worker).retry_local(l.direct, io);
                return;
            }
            Some(l) => (*l.worker).end_local(l.direct, ok),
            None => st::SPDK_BDEV_IO_STATUS_FAILED,
        }
    };
    complete(io, status);
}
