//! The I/O path: per-thread channels, `submit_request`, and forwarding to the backing bdev.
//!
//! Today every request passes straight through to the backing bdev (the cache bdev is only
//! claimed and has a channel open). The engine plugs in at [`submit`]: READ and WRITE
//! arrive already split at stripe edges (`optimal_io_boundary` + split bit), so each one
//! belongs to exactly one stripe and hence one shard; the engine would hand the request to
//! its shard's thread (`spdk_thread_send_msg`), and the shard would send the completion back
//! to the submitting thread, where [`BdevIo::complete`] must run. Nothing in flight may live
//! in the channel buffer, which SPDK frees on its own schedule.

use std::ffi::{c_int, c_void};
use std::ptr::{self, NonNull};

use super::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};
use super::log::{no_unwind, spdk_log};
use super::stats::IoCounters;
use super::vbdev::Pcache;

/// Per-thread channel context (what `spdk_io_channel_get_ctx` returns for our io_device).
pub(crate) struct Channel {
    node: *const Pcache,
    backing_ch: *mut ffi::spdk_io_channel,
    /// Held so the engine's shards can use it; unused by the passthrough path.
    cache_ch: *mut ffi::spdk_io_channel,
    stats: IoCounters,
}

impl Channel {
    pub(crate) fn stats(&self) -> &IoCounters {
        &self.stats
    }
}

/// Per-request context in `bdev_io->driver_ctx` (size given by the module's `get_ctx_size`).
/// SPDK neither initializes nor drops it: written at every submit, never read before that.
pub(crate) struct IoCtx {
    /// Our channel the request was submitted on (needed to resubmit after ENOMEM).
    ch: *mut ffi::spdk_io_channel,
    wait: ffi::spdk_bdev_io_wait_entry,
}

// driver_ctx sits at offset 1216 of an 8-aligned spdk_bdev_io.
const _: () = assert!(std::mem::align_of::<IoCtx>() <= 8);
const _: () = assert!(std::mem::offset_of!(ffi::spdk_bdev_io, driver_ctx) % 8 == 0);

/// io_device channel constructor: open this thread's channels to both base bdevs.
pub(crate) unsafe extern "C" fn channel_create(io_device: *mut c_void, buf: *mut c_void) -> c_int {
    no_unwind("channel_create", -libc::EINVAL, || {
        let node = io_device.cast::<Pcache>().cast_const();
        // SAFETY: `io_device` is the live `Pcache` we registered; it outlives its channels
        // (freed only in the io_device unregister callback). The descriptors are open.
        let (backing, cache) = unsafe { ((*node).backing.desc.get(), (*node).cache.desc.get()) };
        // SAFETY: called on the thread that will use the channels, with open descriptors.
        let backing_ch = unsafe { ffi::spdk_bdev_get_io_channel(backing) };
        // SAFETY: as above.
        let cache_ch = unsafe { ffi::spdk_bdev_get_io_channel(cache) };
        if backing_ch.is_null() || cache_ch.is_null() {
            for ch in [backing_ch, cache_ch] {
                if !ch.is_null() {
                    // SAFETY: we got it on this thread just above.
                    unsafe { ffi::spdk_put_io_channel(ch) };
                }
            }
            spdk_log!(ERROR, "cannot get base bdev channels");
            return -libc::ENOMEM;
        }
        let chan = Channel {
            node,
            backing_ch,
            cache_ch,
            stats: IoCounters::default(),
        };
        // SAFETY: SPDK allocated `size_of::<Channel>()` bytes for us at `buf` (we registered that
        // size), suitably aligned (the context follows a 96-byte, 8-aligned header).
        unsafe { ptr::write(buf.cast::<Channel>(), chan) };
        0
    })
}

/// io_device channel destructor, on the channel's thread.
pub(crate) unsafe extern "C" fn channel_destroy(_io_device: *mut c_void, buf: *mut c_void) {
    no_unwind("channel_destroy", (), || {
        // SAFETY: `buf` holds the Channel written by `channel_create`; SPDK calls this once, on
        // the channel's thread, after which it frees the buffer without dropping it.
        let chan = unsafe { ptr::read(buf.cast::<Channel>()) };
        // SAFETY: the node outlives its channels (see `channel_create`).
        unsafe { (*chan.node).retired.fold(&chan.stats.snapshot()) };
        // SAFETY: both channels were obtained on this thread in `channel_create`.
        unsafe {
            ffi::spdk_put_io_channel(chan.backing_ch);
            ffi::spdk_put_io_channel(chan.cache_ch);
        }
    })
}

/// An I/O submitted to a pcache bdev, owned by us until completed. Not `Copy`:
/// [`BdevIo::complete`] consumes it, so completing twice does not compile.
pub(crate) struct BdevIo(NonNull<ffi::spdk_bdev_io>);

impl BdevIo {
    /// # Safety
    /// `io` is a pending request on a pcache bdev that nobody else will complete.
    unsafe fn from_raw(io: *mut ffi::spdk_bdev_io) -> Option<Self> {
        NonNull::new(io).map(BdevIo)
    }

    fn into_raw(self) -> *mut ffi::spdk_bdev_io {
        self.0.as_ptr()
    }

    fn raw(&self) -> *mut ffi::spdk_bdev_io {
        self.0.as_ptr()
    }

    fn io_type(&self) -> t::Type {
        // SAFETY: live bdev_io (type invariant).
        t::Type::from(unsafe { (*self.raw()).type_ })
    }

    fn node(&self) -> *const Pcache {
        // SAFETY: live bdev_io of one of our bdevs, whose `ctxt` is its `Pcache`.
        unsafe { (*(*self.raw()).bdev).ctxt.cast::<Pcache>() }
    }

    fn ctx(&self) -> *mut IoCtx {
        // SAFETY: our bdevs' bdev_io carry `size_of::<IoCtx>()` bytes of driver context.
        unsafe { ffi::bdev_io_driver_ctx::<IoCtx>(self.raw()) }
    }

    /// Block parameters (`u.bdev`), as a raw pointer: only READ/WRITE/UNMAP/WRITE_ZEROES/
    /// FLUSH fill that union member, so read single fields, never the whole struct.
    fn block(&self) -> *const ffi::spdk_bdev_io_block_params {
        // SAFETY: live bdev_io; projecting to a union member forms no reference.
        unsafe { ptr::addr_of!((*self.raw()).u.bdev).cast() }
    }

    /// Bytes moved by a READ or WRITE.
    fn bytes(&self) -> u64 {
        // SAFETY: live bdev_io and its bdev; `num_blocks` is an integer field of u.bdev.
        let (blocklen, blocks) =
            unsafe { ((*(*self.raw()).bdev).blocklen, (*self.block()).num_blocks) };
        blocks.wrapping_mul(u64::from(blocklen))
    }

    /// Complete with `status`. Must run on the submitting thread.
    pub(crate) fn complete(self, status: st::Type) {
        // SAFETY: pending request, completed exactly once (by value), on its thread.
        unsafe { ffi::spdk_bdev_io_complete(self.raw(), status) };
    }

    /// Complete with the status of the base request `base` (keeps NVMe/errno detail).
    fn complete_from_base(self, base: *mut ffi::spdk_bdev_io) {
        // SAFETY: as `complete`; `base` is the live child request of this one.
        unsafe { ffi::spdk_bdev_io_complete_base_io_status(self.raw(), base) };
    }
}

/// `fn_table.submit_request`.
pub(crate) unsafe extern "C" fn submit_request(
    ch: *mut ffi::spdk_io_channel,
    io: *mut ffi::spdk_bdev_io,
) {
    no_unwind("submit_request", (), || {
        // SAFETY: SPDK hands us a pending request of our bdev.
        let Some(io) = (unsafe { BdevIo::from_raw(io) }) else {
            return;
        };
        let ctx = io.ctx();
        // SAFETY: `ctx` is this request's driver context, ours to (re)initialize at submit.
        unsafe {
            ptr::addr_of_mut!((*ctx).ch).write(ch);
        }
        submit(ch, io);
    })
}

/// Route one request. The engine hook: today everything goes to the backing bdev.
fn submit(ch: *mut ffi::spdk_io_channel, io: BdevIo) {
    match io.io_type() {
        // The caller may have sent no buffer: ask the bdev layer for one first.
        t::SPDK_BDEV_IO_TYPE_READ => {
            let len = io.bytes();
            // SAFETY: pending READ; the callback runs (maybe synchronously) on this thread.
            unsafe { ffi::spdk_bdev_io_get_buf(io.into_raw(), Some(read_get_buf_done), len) };
        }
        _ => forward(ch, io),
    }
}

unsafe extern "C" fn read_get_buf_done(
    ch: *mut ffi::spdk_io_channel,
    io: *mut ffi::spdk_bdev_io,
    success: bool,
) {
    no_unwind("read_get_buf_done", (), || {
        // SAFETY: the READ we passed to spdk_bdev_io_get_buf, still pending and ours.
        let Some(io) = (unsafe { BdevIo::from_raw(io) }) else {
            return;
        };
        if !success {
            io.complete(st::SPDK_BDEV_IO_STATUS_FAILED);
            return;
        }
        forward(ch, io);
    })
}

/// Ext-API options carrying the request's memory domain, metadata and DIF flags.
///
/// # Safety
/// `b` is the `u.bdev` of a live READ or WRITE.
unsafe fn ext_opts(b: *const ffi::spdk_bdev_io_block_params) -> ffi::spdk_bdev_ext_io_opts {
    // SAFETY: all-zero is a valid spdk_bdev_ext_io_opts (null pointers, zero flags).
    let mut o: ffi::spdk_bdev_ext_io_opts = unsafe { std::mem::zeroed() };
    o.size = std::mem::size_of::<ffi::spdk_bdev_ext_io_opts>();
    // SAFETY: per the contract, `b` points at filled block parameters.
    unsafe {
        o.memory_domain = (*b).memory_domain;
        o.memory_domain_ctx = (*b).memory_domain_ctx;
        o.metadata = (*b).md_buf;
        o.dif_check_flags_exclude_mask = !(*b).dif_check_flags;
    }
    o
}

/// Passthrough: issue the same request on the backing bdev through this thread's channel.
fn forward(ch: *mut ffi::spdk_io_channel, io: BdevIo) {
    // SAFETY: `ch` is our channel on this thread; its context is a live `Channel`.
    let chan = unsafe { &*ffi::io_channel_get_ctx::<Channel>(ch) };
    let node = io.node();
    // SAFETY: the node outlives every request on its bdev.
    let (desc, backing_flush) = unsafe { ((*node).backing.desc.get(), (*node).backing_flush) };
    let bch = chan.backing_ch;
    let b = io.block();
    let arg = io.raw().cast::<c_void>();
    let done =
        Some(forward_done as unsafe extern "C" fn(*mut ffi::spdk_bdev_io, bool, *mut c_void));
    // SAFETY: for every call below, `desc` is open and `bch` is its channel on this thread;
    // `b` is read only for the block request types that fill it; iovecs and buffers belong to the pending request `io`, which stays alive until
    // `forward_done` completes it; `opts` is only read during the call.
    let rc = unsafe {
        match io.io_type() {
            t::SPDK_BDEV_IO_TYPE_READ => {
                let mut opts = ext_opts(b);
                ffi::spdk_bdev_readv_blocks_ext(
                    desc,
                    bch,
                    (*b).iovs,
                    (*b).iovcnt,
                    (*b).offset_blocks,
                    (*b).num_blocks,
                    done,
                    arg,
                    &mut opts,
                )
            }
            t::SPDK_BDEV_IO_TYPE_WRITE => {
                let mut opts = ext_opts(b);
                ffi::spdk_bdev_writev_blocks_ext(
                    desc,
                    bch,
                    (*b).iovs,
                    (*b).iovcnt,
                    (*b).offset_blocks,
                    (*b).num_blocks,
                    done,
                    arg,
                    &mut opts,
                )
            }
            t::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => ffi::spdk_bdev_write_zeroes_blocks(
                desc,
                bch,
                (*b).offset_blocks,
                (*b).num_blocks,
                done,
                arg,
            ),
            t::SPDK_BDEV_IO_TYPE_UNMAP => ffi::spdk_bdev_unmap_blocks(
                desc,
                bch,
                (*b).offset_blocks,
                (*b).num_blocks,
                done,
                arg,
            ),
            t::SPDK_BDEV_IO_TYPE_FLUSH if !backing_flush => {
                // Nothing is cached yet and the backing bdev has no volatile cache to flush.
                chan.stats.record(t::SPDK_BDEV_IO_TYPE_FLUSH, 0, true);
                io.complete(st::SPDK_BDEV_IO_STATUS_SUCCESS);
                return;
            }
            t::SPDK_BDEV_IO_TYPE_FLUSH => ffi::spdk_bdev_flush_blocks(
                desc,
                bch,
                (*b).offset_blocks,
                (*b).num_blocks,
                done,
                arg,
            ),
            t::SPDK_BDEV_IO_TYPE_RESET => ffi::spdk_bdev_reset(desc, bch, done, arg),
            other => {
                spdk_log!(ERROR, "unsupported I/O type {other}");
                io.complete(st::SPDK_BDEV_IO_STATUS_FAILED);
                return;
            }
        }
    };
    match rc {
        0 => {}
        rc if rc == -libc::ENOMEM => queue_on_nomem(node, chan, io),
        rc => {
            spdk_log!(ERROR, "backing bdev submission failed: rc {rc}");
            chan.stats.record(io.io_type(), 0, false);
            io.complete(st::SPDK_BDEV_IO_STATUS_FAILED);
        }
    }
}

/// The backing bdev ran out of `spdk_bdev_io`s: wait on its channel, then resubmit.
fn queue_on_nomem(node: *const Pcache, chan: &Channel, io: BdevIo) {
    let ctx = io.ctx();
    // SAFETY: node outlives the request.
    let backing = unsafe { (*node).backing.bdev };
    // SAFETY: `ctx` is this request's driver context; the wait entry lives there until the
    // callback fires (the request stays pending meanwhile). The bdev must match the one
    // the channel belongs to.
    let rc = unsafe {
        let w = ptr::addr_of_mut!((*ctx).wait);
        ptr::write_bytes(w, 0, 1);
        (*w).bdev = backing;
        (*w).cb_fn = Some(resubmit);
        (*w).cb_arg = io.raw().cast();
        ffi::spdk_bdev_queue_io_wait(backing, chan.backing_ch, w)
    };
    if rc != 0 {
        spdk_log!(ERROR, "spdk_bdev_queue_io_wait failed: rc {rc}");
        io.complete(st::SPDK_BDEV_IO_STATUS_FAILED);
    }
    // else: ownership passed to the wait entry (its cb_arg).
}

unsafe extern "C" fn resubmit(arg: *mut c_void) {
    no_unwind("resubmit", (), || {
        // SAFETY: `arg` is the pending request we queued in `queue_on_nomem`.
        let Some(io) = (unsafe { BdevIo::from_raw(arg.cast()) }) else {
            return;
        };
        // SAFETY: its driver context holds the channel it was submitted on.
        let ch = unsafe { (*io.ctx()).ch };
        submit(ch, io);
    })
}

unsafe extern "C" fn forward_done(base: *mut ffi::spdk_bdev_io, success: bool, arg: *mut c_void) {
    no_unwind("forward_done", (), || {
        // SAFETY: `arg` is the original request we forwarded; it is pending and ours.
        let Some(io) = (unsafe { BdevIo::from_raw(arg.cast()) }) else {
            return;
        };
        // SAFETY: completions of base requests run on the thread that submitted them, which is
        // the thread of the channel recorded at submit.
        let chan = unsafe { &*ffi::io_channel_get_ctx::<Channel>((*io.ctx()).ch) };
        let io_type = io.io_type();
        let bytes = match io_type {
            t::SPDK_BDEV_IO_TYPE_READ | t::SPDK_BDEV_IO_TYPE_WRITE => io.bytes(),
            _ => 0,
        };
        chan.stats.record(io_type, bytes, success);
        io.complete_from_base(base);
        // SAFETY: `base` is the child request SPDK allocated for us; we are done with it.
        unsafe { ffi::spdk_bdev_free_io(base) };
    })
}
