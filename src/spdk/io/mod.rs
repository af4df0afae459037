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
//!   answers by message (`worker::complete_remote_msg`), only reading the request.
//! - From a thread pinned to the worker's own core, without a message either way: the
//!   request waits in the channel until the poller that submitted it returns (a SPDK
//!   post-poller handler, [`Channel::serve_after_poller`]; else the channel's poller,
//!   [`channel_poll`]), which serves a read hit or an in-place rewrite itself with one I/O on its own channel to the cache bdev
//!   ([`served`]), and puts any other request straight into the worker's inbox; the
//!   worker completes those as the submitting thread (`worker::complete_as_submitter`). Both
//!   threads are polled by the same reactor, one at a time, so this is the same sequence
//!   of events minus the message rings (see `worker::inbox`).
//!
//! Nothing in flight lives in the channel buffer, which SPDK frees on its own schedule.
//!
//! What this path reads of a bdev is its [`Front`]: the bdev's workers, its cache bdev and
//! retired counters; the rest of the node (`vbdev::Pcache`) is the control path's. Calls go
//! down only: to the workers (`worker`: entry messages, the request context, completion),
//! `link`, `stats`, `msg` and `ffi`.

mod after_poller;
mod served;

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void, CString};
use std::ptr;
use std::sync::Arc;

use super::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};
use super::link::{self, from_completion_arg, Desc, Finished, Link};
use super::log::{no_unwind, spdk_log};
use super::stats::{IoCounters, Retired};
use super::worker::{self, bytes, complete, complete_here, ctx, fanout_done, Peer, Roster, Route};

/// One opened and claimed base bdev.
pub(crate) struct Base {
    pub(crate) name: CString,
    /// Open descriptor (null once closed). A `Cell`: destruct clears it through a shared
    /// reference while channel teardown on other threads may still read other node fields.
    pub(crate) desc: Cell<*mut ffi::spdk_bdev_desc>,
    pub(crate) bdev: *mut ffi::spdk_bdev,
}

impl Base {
    /// A base bdev called `name`, not opened yet.
    pub(crate) fn new(name: CString) -> Self {
        Base {
            name,
            desc: Cell::new(ptr::null_mut()),
            bdev: ptr::null_mut(),
        }
    }
}

/// What the request path reads of a pcache bdev: the first field of its node, so
/// `bdev.ctxt` and the io_device point at it. Fixed before registration (the cache bdev's
/// descriptor is closed only after the last channel is gone).
#[repr(C)]
pub(crate) struct Front {
    /// First: workers find it from `bdev.ctxt` ([`Roster::of`]).
    pub(crate) workers: Roster,
    /// The cache bdev (name empty, never opened, with `cache_path`).
    pub(crate) cache: Base,
    /// Counts of channels that no longer exist.
    pub(crate) retired: Arc<Retired>,
}

const _: () = assert!(std::mem::offset_of!(Front, workers) == 0);

impl Front {
    pub(crate) fn new(cache: Base) -> Self {
        Front {
            workers: Roster::new(),
            cache,
            retired: Arc::new(Retired::default()),
        }
    }

    /// The front of `io`'s bdev.
    ///
    /// # Safety
    /// `io` is a pending request of a pcache bdev (`bdev.ctxt` is its live node, which
    /// starts with its front: asserted in `vbdev`).
    unsafe fn of<'a>(io: *mut ffi::spdk_bdev_io) -> &'a Front {
        // SAFETY: per the contract.
        unsafe { &*(*(*io).bdev).ctxt.cast::<Front>() }
    }
}

/// Per-thread channel context (what `spdk_io_channel_get_ctx` returns for our io_device).
/// The worker thread owns the base bdevs' channels; this only counts. `repr(C)` with the
/// counters first: completion, in the worker layer below, counts through the channel
/// without knowing this type (`worker::complete`).
#[repr(C)]
pub(crate) struct Channel {
    stats: IoCounters,
    front: *const Front,
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
    /// This thread's channel to the backing bdev, for the read misses it serves itself
    /// (`worker::local`); made on first use.
    backing_ch: Cell<*mut ffi::spdk_io_channel>,
    /// Requests for workers on this core, served (or handed to their worker) together
    /// right after the poller that submitted them ([`Channel::serve_after_poller`]), else by the
    /// channel's next poll, so that their index lookups overlap (`worker::local`).
    local: RefCell<Vec<(*mut ffi::spdk_bdev_io, Peer)>>,
    /// `local`'s other buffer: requests submitted while a batch is served (by the
    /// completions of its hits) go here, so neither buffer is allocated again.
    spare: RefCell<Vec<(*mut ffi::spdk_bdev_io, Peer)>>,
    /// Listed for the thread's post-poller handler (`after_poller`), which has not served
    /// it yet.
    after_poller: Cell<bool>,
}

const _: () = assert!(std::mem::offset_of!(Channel, stats) == 0);

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
        // SAFETY: the node (and its front) outlives its channels; its cache descriptor is closed only at
        // destruct, after every channel of the bdev is gone, and a descriptor may hand out
        // channels on any thread.
        let ch = unsafe {
            let desc = (*self.front).cache.desc.get();
            if desc.is_null() {
                return ptr::null_mut();
            }
            ffi::spdk_bdev_get_io_channel(desc)
        };
        self.cache_ch.set(ch);
        ch
    }

    /// This thread's channel to the backing bdev, whose descriptor is `desc` (null: none).
    pub(crate) fn backing_channel(
        &self,
        desc: *mut ffi::spdk_bdev_desc,
    ) -> *mut ffi::spdk_io_channel {
        let ch = self.backing_ch.get();
        if !ch.is_null() || desc.is_null() {
            return ch;
        }
        // SAFETY: as for the cache's: the backing descriptor is closed only at destruct,
        // after every channel of the bdev is gone, and hands out channels on any thread.
        let ch = unsafe { ffi::spdk_bdev_get_io_channel(desc) };
        self.backing_ch.set(ch);
        ch
    }
}

/// io_device channel constructor.
pub(crate) unsafe extern "C" fn channel_create(io_device: *mut c_void, buf: *mut c_void) -> c_int {
    no_unwind("channel_create", -libc::EINVAL, || {
        let chan = Channel {
            front: io_device.cast::<Front>().cast_const(),
            stats: IoCounters::default(),
            core: pinned_core(),
            links: RefCell::new(Vec::new()),
            poller: Cell::new(ptr::null_mut()),
            done: RefCell::new(Vec::new()),
            cache_ch: Cell::new(ptr::null_mut()),
            backing_ch: Cell::new(ptr::null_mut()),
            local: RefCell::new(Vec::new()),
            spare: RefCell::new(Vec::new()),
            after_poller: Cell::new(false),
        };
        // SAFETY: SPDK allocated `size_of::<Channel>()` bytes for us at `buf` (we registered
        // that size), suitably aligned (the context follows a 96-byte, 8-aligned header).
        unsafe { ptr::write(buf.cast::<Channel>(), chan) };
        // SAFETY: just written; SPDK keeps the context at `buf` until `channel_destroy`.
        let chan = unsafe { &*buf.cast::<Channel>() };
        chan.prepare_serving();
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
        after_poller::forget(buf.cast::<Channel>().cast_const());
        let mut poller = chan.poller.get();
        if !poller.is_null() {
            // SAFETY: our poller, registered on this thread, unregistered once.
            unsafe { ffi::spdk_poller_unregister(&mut poller) };
        }
        // Every request on the channel completed, so the queues are empty: dropping our
        // ends tells the workers (`WorkerEnd::closed`).
        drop(chan.links.take());
        for ch in [chan.cache_ch.get(), chan.backing_ch.get()] {
            if !ch.is_null() {
                // SAFETY: our reference to a base bdev's channel on this thread, put once.
                unsafe { ffi::spdk_put_io_channel(ch) };
            }
        }
        // SAFETY: the node outlives its channels (freed in the io_device unregister callback).
        unsafe { (*chan.front).retired.fold(&chan.stats.snapshot()) };
    })
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
            ptr::addr_of_mut!((*ctx(io)).no_direct).write(false);
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
    // SAFETY: live bdev_io of our bdev; the worker threads and the team were set before
    // registration.
    let front = unsafe { Front::of(io) };
    let f = match entry {
        Entry::Submit => worker::submit_msg,
        Entry::Reset => worker::reset_msg,
    };
    let p = match front.workers.route(io) {
        Route::One(p) => p,
        Route::Many(v) => return fan_out(io, f, &v),
    };
    if entry == Entry::Submit {
        // SAFETY: the request's channel, written at submit on this thread, alive while it is.
        let chan = unsafe { &*ffi::io_channel_get_ctx::<Channel>((*ctx(io)).ch) };
        match p.core.filter(|&c| chan.core == Some(c)) {
            // SAFETY: plain query of the current reactor.
            Some(core) if unsafe { ffi::spdk_env_get_current_core() } == core => {
                // SAFETY: the worker's inbox lives as long as it does (beyond this request);
                // a live request's type, read by value.
                let worker_only = unsafe {
                    (*p.inbox).never_direct()
                        || ((*p.inbox).mapped()
                            && t::Type::from((*io).type_) != t::SPDK_BDEV_IO_TYPE_READ)
                };
                if !worker_only && chan.start_polling() {
                    worker::local::wait(p);
                    chan.local.borrow_mut().push((io, p));
                    chan.serve_after_poller();
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

impl Channel {
    /// On a thread pinned to the core of one of the bdev's workers, which serves that
    /// worker's hits itself: takes its channel to the cache bdev and registers its poller
    /// now, while the submitter sets up, rather than at the first request. SPDK runs a
    /// thread's pollers newest first, so pollers registered after the submitter's own (a
    /// vhost session registers its request poller right after taking this channel) run
    /// before it: a cache-bdev completion (malloc's, accel's poller) then waited a whole
    /// reactor iteration, where a passthru's base channel, taken with its own, completes
    /// in the same one.
    fn prepare_serving(&self) {
        let Some(core) = self.core else { return };
        // SAFETY: the node outlives its channels; its roster was fixed before registration.
        let Some(p) = (unsafe { (*self.front).workers.on_core(core) }) else {
            return;
        };
        // SAFETY: the worker's inbox lives as long as the worker, beyond the bdev's channels.
        if unsafe { (*p.inbox).never_direct() } {
            return;
        }
        self.cache_channel();
        self.start_polling();
    }

    /// Serves the requests collected in `local` once the poller (or message) running now
    /// has returned: a submitter usually sends a burst from one poller (a vhost session
    /// taking its ring, bdevperf's completions), and they are then served together, in the
    /// same reactor iteration. The channel's own poller would take them only in the next
    /// one: SPDK runs a thread's active pollers newest first, and this channel's poller is
    /// younger than the submitter's, so every request waited a whole reactor iteration (the
    /// other threads of the core included), which a vhost target, waiting on its initiator
    /// between requests, pays in full. One SPDK post-poller handler serves all of the
    /// thread's channels (`after_poller`); the channel poller serves what it cannot.
    fn serve_after_poller(&self) {
        if !self.after_poller.get() && after_poller::enqueue(self) {
            self.after_poller.set(true);
        }
    }
}

/// Serves the requests collected in `chan.local`; true if there were any.
fn serve_local(chan: &Channel) -> bool {
    if chan.local.borrow().is_empty() {
        return false;
    }
    let mut batch = chan.local.replace(chan.spare.take());
    served::serve_batch(&mut batch, chan);
    // Requests submitted meanwhile (by completions) are in `local` and wait for the next
    // poll or handler; the served buffer, empty, is the spare again.
    chan.spare.replace(batch);
    true
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
        // Its handler has not run yet (registered by a message or a timed poller, or
        // refused by SPDK): served now, the handler finds nothing. Work all the same, for
        // SPDK's busy/idle accounting (and any scheduler reading it).
        let drained = chan.after_poller.get() && after_poller::drain();
        let mut busy = serve_local(chan) || drained;
        if chan.links.borrow().is_empty() {
            return if busy {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
            } else {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
            };
        }
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
