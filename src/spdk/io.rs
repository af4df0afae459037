//! The I/O path on the submitting threads: per-thread channels, `submit_request`, and the
//! completion message coming back from the worker thread.
//!
//! Every request goes to the worker thread of its stripe's shard. READ first gets a data
//! buffer from the bdev layer (`spdk_bdev_io_get_buf`) when the caller sent none.
//! - From a thread on another core, through a queue pair with that worker ([`link`]): a
//!   descriptor of the request goes on its submission queue, and the worker puts the
//!   bdev_io back on its completion queue, outcome in the low bit, which the channel's
//!   poller ([`channel_poll`]) completes, on the thread that submitted it, as SPDK requires.
//!   The worker never touches the bdev_io's lines, which stay on the submitting core.
//! - When a queue is full, or for a thread outside the reactors, by message
//!   (`worker::submit_msg`, the `spdk_bdev_io` as argument: no allocation); the worker
//!   answers by message ([`complete_remote_msg`]), only reading the request.
//! - From a thread pinned to the worker's own core, without a message either way: the
//!   request waits in the channel for its poller ([`channel_poll`]), which serves a read
//!   hit or an in-place rewrite itself with one I/O on its own channel to the cache bdev
//!   (`worker::local`), and puts any other request straight into the worker's inbox; the
//!   worker completes those as the submitting thread ([`complete_as_submitter`]). Both
//!   threads are polled by the same reactor, one at a time, so this is the same sequence
//!   of events minus the message rings (see `worker::inbox`).
//!
//! Nothing in flight lives in the channel buffer, which SPDK frees on its own schedule.

use std::ffi::{c_int, c_void};
use std::ptr;

use std::cell::{Cell, RefCell};

use super::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};
use super::link::{self, Desc, Finished, Link};
use super::log::{no_unwind, spdk_log};
use super::stats::IoCounters;
use super::vbdev::{Pcache, Route};
use super::worker;
use super::worker::Peer;

/// Per-thread channel context (what `spdk_io_channel_get_ctx` returns for our io_device).
/// The worker thread owns the base bdevs' channels; this only counts.
pub(crate) struct Channel {
    node: *const Pcache,
    stats: IoCounters,
    /// The one core this channel's thread may run on (its cpumask), if it has one.
    core: Option<u32>,
    /// Queue pairs with the team's workers on other cores (index: worker number), each
    /// made on the first request for that worker.
    links: RefCell<Vec<Option<Link>>>,
    /// Takes completions off `links` (registered with the first queue pair).
    poller: Cell<*mut ffi::spdk_poller>,
    /// Completions taken off the queues, completed once `links` is no longer borrowed (a
    /// completion callback may submit the next request).
    done: RefCell<Vec<Finished>>,
    /// This thread's channel to the cache bdev, for the requests it serves itself
    /// (`worker::local`); made on first use.
    cache_ch: Cell<*mut ffi::spdk_io_channel>,
    /// Requests for workers on this core, served (or handed to their worker) together by
    /// the channel's next poll, so that their index lookups overlap (`worker::local`).
    local: RefCell<Vec<(*mut ffi::spdk_bdev_io, Peer)>>,
}

impl Channel {
    pub(crate) fn stats(&self) -> &IoCounters {
        &self.stats
    }

    /// This thread's channel to the cache bdev (null: none, e.g. a mapped cache).
    pub(crate) fn cache_channel(&self) -> *mut ffi::spdk_io_channel {
        let ch = self.cache_ch.get();
        if !ch.is_null() {
            return ch;
        }
        // SAFETY: the node outlives its channels; its cache descriptor is closed only at
        // destruct, after every channel of the bdev is gone, and a descriptor may hand out
        // channels on any thread.
        let ch = unsafe {
            let desc = (*self.node).cache.desc.get();
            if desc.is_null() {
                return ptr::null_mut();
            }
            ffi::spdk_bdev_get_io_channel(desc)
        };
        self.cache_ch.set(ch);
        ch
    }
}

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
    /// Workers still to answer, and the worst status so far (submitting thread only).
    left: u32,
    worst: st::Type,
    /// Served by the submitting thread itself (`worker::local`): its worker and what it
    /// started, and the entry that waits for a free cache bdev_io.
    pub(crate) local_direct: Option<worker::local::Local>,
    pub(crate) wait: ffi::spdk_bdev_io_wait_entry,
}

// driver_ctx sits at offset 1216 of an 8-aligned spdk_bdev_io.
const _: () = assert!(std::mem::align_of::<IoCtx>() <= 8);
const _: () = assert!(std::mem::offset_of!(ffi::spdk_bdev_io, driver_ctx) % 8 == 0);

/// io_device channel constructor.
pub(crate) unsafe extern "C" fn channel_create(io_device: *mut c_void, buf: *mut c_void) -> c_int {
    no_unwind("channel_create", -libc::EINVAL, || {
        let chan = Channel {
            node: io_device.cast::<Pcache>().cast_const(),
            stats: IoCounters::default(),
            core: pinned_core(),
            links: RefCell::new(Vec::new()),
            poller: Cell::new(ptr::null_mut()),
            done: RefCell::new(Vec::new()),
            cache_ch: Cell::new(ptr::null_mut()),
            local: RefCell::new(Vec::new()),
        };
        // SAFETY: SPDK allocated `size_of::<Channel>()` bytes for us at `buf` (we registered
        // that size), suitably aligned (the context follows a 96-byte, 8-aligned header).
        unsafe { ptr::write(buf.cast::<Channel>(), chan) };
        0
    })
}

/// The core the current SPDK thread is bound to, if its cpumask names exactly one (and it
/// runs there now: a reactor-driven app). Such a thread never moves: SPDK's schedulers
/// only place a thread within its cpumask, which only the thread itself could change.
fn pinned_core() -> Option<u32> {
    // SAFETY: queries of the current thread and its cpumask (valid while the thread lives,
    // which it does while we run on it).
    unsafe {
        let th = ffi::spdk_get_thread();
        if th.is_null() {
            return None;
        }
        let mask = ffi::spdk_thread_get_cpumask(th);
        if mask.is_null() || ffi::spdk_cpuset_count(mask) != 1 {
            return None;
        }
        let core = ffi::spdk_env_get_current_core();
        (core != u32::MAX && ffi::spdk_cpuset_get_cpu(mask, core)).then_some(core)
    }
}

/// io_device channel destructor, on the channel's thread.
pub(crate) unsafe extern "C" fn channel_destroy(_io_device: *mut c_void, buf: *mut c_void) {
    no_unwind("channel_destroy", (), || {
        // SAFETY: `buf` holds the Channel written by `channel_create`; SPDK calls this once,
        // on the channel's thread, after which it frees the buffer without dropping it.
        let chan = unsafe { ptr::read(buf.cast::<Channel>()) };
        let mut poller = chan.poller.get();
        if !poller.is_null() {
            // SAFETY: our poller, registered on this thread, unregistered once.
            unsafe { ffi::spdk_poller_unregister(&mut poller) };
        }
        // Every request on the channel completed, so the queues are empty: dropping our
        // ends tells the workers (`WorkerEnd::closed`).
        drop(chan.links.take());
        let ch = chan.cache_ch.get();
        if !ch.is_null() {
            // SAFETY: our reference to the cache bdev's channel on this thread, put once.
            unsafe { ffi::spdk_put_io_channel(ch) };
        }
        // SAFETY: the node outlives its channels (freed in the io_device unregister callback).
        unsafe { (*chan.node).retired.fold(&chan.stats.snapshot()) };
    })
}

/// Block parameters (`u.bdev`) of a request, as a raw pointer: only READ/WRITE/UNMAP/
/// WRITE_ZEROES/FLUSH fill that union member, so read single fields, never the whole struct.
pub(crate) fn block(io: *mut ffi::spdk_bdev_io) -> *const ffi::spdk_bdev_io_block_params {
    // SAFETY: projecting to a union member of a live bdev_io forms no reference.
    unsafe { ptr::addr_of!((*io).u.bdev).cast() }
}

/// Bytes moved by a READ or WRITE.
fn bytes(io: *mut ffi::spdk_bdev_io) -> u64 {
    // SAFETY: live READ/WRITE bdev_io of a live bdev; integer fields read by value.
    unsafe {
        (*block(io))
            .num_blocks
            .wrapping_mul(u64::from((*(*io).bdev).blocklen))
    }
}

pub(crate) fn ctx(io: *mut ffi::spdk_bdev_io) -> *mut IoCtx {
    // SAFETY: our bdevs' bdev_io carry `size_of::<IoCtx>()` bytes of driver context.
    unsafe { ffi::bdev_io_driver_ctx::<IoCtx>(io) }
}

/// Starts loading the lines of `io` a worker on another core reads (its header, block
/// parameters and driver context), so that a batch of requests arriving by message misses
/// on them all at once rather than one by one when it is submitted.
pub(crate) fn prefetch_request(io: *mut ffi::spdk_bdev_io) {
    // Addresses of fields of a live request: projections only, nothing is read here.
    let b = block(io).cast::<u8>();
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

/// Complete `io` here and now (submitting thread) with `status`.
fn complete_here(io: *mut ffi::spdk_bdev_io, status: st::Type) {
    // SAFETY: a pending request on this thread, completed exactly once.
    unsafe { ffi::spdk_bdev_io_complete(io, status) };
}

/// `fn_table.submit_request`.
pub(crate) unsafe extern "C" fn submit_request(
    ch: *mut ffi::spdk_io_channel,
    io: *mut ffi::spdk_bdev_io,
) {
    no_unwind("submit_request", (), || {
        if io.is_null() {
            return;
        }
        // SAFETY: `ctx` is this request's driver context, ours to (re)initialize at submit.
        unsafe {
            ptr::addr_of_mut!((*ctx(io)).ch).write(ch);
            ptr::addr_of_mut!((*ctx(io)).fanout).write(false);
            ptr::addr_of_mut!((*ctx(io)).local).write(false);
        }
        // SAFETY: a live bdev_io handed to us.
        let ty = t::Type::from(unsafe { (*io).type_ });
        match ty {
            // The caller may have sent no buffer: ask the bdev layer for one first.
            t::SPDK_BDEV_IO_TYPE_READ => {
                let len = bytes(io);
                // SAFETY: pending READ; the callback runs (maybe synchronously) on this thread.
                unsafe { ffi::spdk_bdev_io_get_buf(io, Some(read_get_buf_done), len) };
            }
            t::SPDK_BDEV_IO_TYPE_RESET => to_worker(io, Entry::Reset),
            t::SPDK_BDEV_IO_TYPE_WRITE
            | t::SPDK_BDEV_IO_TYPE_FLUSH
            | t::SPDK_BDEV_IO_TYPE_UNMAP
            | t::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => to_worker(io, Entry::Submit),
            other => {
                spdk_log!(ERROR, "unsupported I/O type {other}");
                complete_here(io, st::SPDK_BDEV_IO_STATUS_FAILED);
            }
        }
    })
}

/// How a request enters a worker.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Through its queue pair with this thread, its inbox, or a message (READ, WRITE,
    /// FLUSH, UNMAP, WRITE_ZEROES).
    Submit,
    /// By message always: a RESET waits on the worker's requests in flight.
    Reset,
}

/// Hands `io` to the worker thread of its stripe's shard, or to each worker it concerns.
fn to_worker(io: *mut ffi::spdk_bdev_io, entry: Entry) {
    // SAFETY: live bdev_io of our bdev, whose `ctxt` is its node; the worker threads and
    // the team were set before registration.
    let node = unsafe { &*(*(*io).bdev).ctxt.cast::<Pcache>() };
    let f = match entry {
        Entry::Submit => worker::submit_msg,
        Entry::Reset => worker::reset_msg,
    };
    let p = match node.route(io) {
        Route::One(p) => p,
        Route::Many(v) => return fan_out(io, f, &v),
    };
    if entry == Entry::Submit {
        // SAFETY: the request's channel, written at submit on this thread, alive while it is.
        let chan = unsafe { &*ffi::io_channel_get_ctx::<Channel>((*ctx(io)).ch) };
        match p.core.filter(|&c| chan.core == Some(c)) {
            // SAFETY: plain query of the current reactor.
            Some(core) if unsafe { ffi::spdk_env_get_current_core() } == core => {
                // SAFETY: the worker's inbox lives as long as it does (beyond this request).
                let direct = unsafe { !(*p.inbox).never_direct() };
                if direct && chan.start_polling() {
                    worker::local::wait(p);
                    chan.local.borrow_mut().push((io, p));
                } else {
                    to_inbox(io, p);
                }
                return;
            }
            Some(_) => {}
            None if via_link(chan, io, p) => return,
            None => {}
        }
    }
    // SAFETY: the worker threads live until the bdev is destructed, after all I/O.
    let rc = unsafe { ffi::spdk_thread_send_msg(p.thread, Some(f), io.cast()) };
    if rc != 0 {
        // Out of message buffers: the bdev layer retries NOMEM requests later.
        complete_here(io, st::SPDK_BDEV_IO_STATUS_NOMEM);
    }
}

/// Queues `io` to `p`'s worker, not on this channel's core, through the channel's queue
/// pair with it (made now if this is the first request for it). False: use a message
/// instead (a ring is full, or no pair could be made).
fn via_link(chan: &Channel, io: *mut ffi::spdk_bdev_io, p: Peer) -> bool {
    let k = p.wid as usize;
    let mut links = chan.links.borrow_mut();
    if links.get(k).is_none_or(Option::is_none) {
        if !chan.start_polling() {
            return false;
        }
        let (mine, theirs) = link::pair();
        if worker::attach_link(p, theirs).is_err() {
            return false;
        }
        if links.len() <= k {
            links.resize_with(k + 1, || None);
        }
        links[k] = Some(mine);
    }
    let Some(l) = links.get_mut(k).and_then(Option::as_mut) else {
        return false;
    };
    l.sq.push(Desc::of(io)).is_ok()
}

impl Channel {
    /// Registers the poller that completes what the workers put on the queues.
    fn start_polling(&self) -> bool {
        if !self.poller.get().is_null() {
            return true;
        }
        let name = c"pcache_channel";
        // SAFETY: the channel context outlives the poller (unregistered in
        // `channel_destroy` before the context is freed); registered on this thread.
        let p = unsafe {
            ffi::spdk_poller_register_named(
                Some(channel_poll),
                (self as *const Channel).cast_mut().cast(),
                0,
                name.as_ptr(),
            )
        };
        self.poller.set(p);
        !p.is_null()
    }
}

/// Hands `io`, for the worker `p` on this core, to that worker's inbox: the worker
/// completes it as this thread ([`complete_as_submitter`]).
pub(crate) fn to_inbox(io: *mut ffi::spdk_bdev_io, p: Peer) {
    // SAFETY: the request's context, ours until the worker takes it; the worker's thread
    // and ours are pinned to this core, where we run now (`Inbox::push`).
    unsafe {
        ptr::addr_of_mut!((*ctx(io)).local).write(true);
        (*p.inbox).push(io);
    }
}

/// The channel poller: serves the requests for workers on this core that arrived since the
/// last poll, and completes the requests the workers on other cores finished.
unsafe extern "C" fn channel_poll(arg: *mut c_void) -> c_int {
    no_unwind("pcache channel poller", 0, || {
        // SAFETY: the channel registered this poller with itself as argument and
        // unregisters it before it is freed; pollers run on the channel's thread.
        let chan = unsafe { &*arg.cast::<Channel>() };
        let mut batch = chan.local.take();
        let mut busy = !batch.is_empty();
        worker::local::serve_batch(&mut batch, chan);
        // Requests submitted meanwhile (by completions) wait for the next poll.
        let mut cur = chan.local.borrow_mut();
        if cur.is_empty() {
            std::mem::swap(&mut *cur, &mut batch);
        }
        drop(cur);
        let mut done = chan.done.take();
        for l in chan.links.borrow_mut().iter_mut().flatten() {
            while let Ok(d) = l.cq.pop() {
                done.push(d);
            }
        }
        busy |= !done.is_empty();
        for d in done.drain(..) {
            let (io, status) = from_completion_arg(d.0);
            complete(io, status);
        }
        chan.done.replace(done);
        if busy {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
        } else {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
        }
    })
}

/// Sends `io` to each of `targets`; [`fanout_done`] collects their answers.
fn fan_out(io: *mut ffi::spdk_bdev_io, f: unsafe extern "C" fn(*mut c_void), targets: &[Peer]) {
    // SAFETY: this request's context, written before any worker sees the request.
    unsafe {
        let c = ctx(io);
        ptr::addr_of_mut!((*c).fanout).write(true);
        ptr::addr_of_mut!((*c).left).write(targets.len() as u32);
        ptr::addr_of_mut!((*c).worst).write(st::SPDK_BDEV_IO_STATUS_SUCCESS);
    }
    for p in targets.iter() {
        // SAFETY: as above.
        let rc = unsafe { ffi::spdk_thread_send_msg(p.thread, Some(f), io.cast()) };
        if rc != 0 {
            fanout_done(io, st::SPDK_BDEV_IO_STATUS_FAILED);
        }
    }
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

unsafe extern "C" fn read_get_buf_done(
    _ch: *mut ffi::spdk_io_channel,
    io: *mut ffi::spdk_bdev_io,
    success: bool,
) {
    no_unwind("read_get_buf_done", (), || {
        if io.is_null() {
            return;
        }
        if !success {
            complete_here(io, st::SPDK_BDEV_IO_STATUS_FAILED);
            return;
        }
        to_worker(io, Entry::Submit);
    })
}

/// Completes a request that came through the inbox ([`IoCtx::local`]) from its worker's
/// thread, as the thread that submitted it: both are pinned to this core, so the submitting
/// thread is not running now, and this is what its `complete_msg` message would do.
pub(crate) fn complete_as_submitter(io: *mut ffi::spdk_bdev_io, status: st::Type) {
    let me = super::msg::current();
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
        // SAFETY: our channel on this thread; it outlives the requests submitted on it.
        let chan = unsafe { &*ffi::io_channel_get_ctx::<Channel>(ch) };
        chan.stats
            .record(ty, bytes, status == st::SPDK_BDEV_IO_STATUS_SUCCESS);
    }
    complete_here(io, status);
}
