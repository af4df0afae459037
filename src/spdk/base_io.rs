//! One-off work on the app thread, below the bdev layer: a one-shot timer ([`after`]) and
//! single reads, writes and flushes of a base bdev through an open descriptor
//! ([`block_io`], [`block_io_steps`]): the superblock probe of examine and the superblock
//! update of a create.
//!
//! Calls only `ffi`, `log` and `msg`.

use std::ffi::{c_int, c_void};
use std::ptr;

use super::ffi;
use super::log::no_unwind;
use crate::engine::geometry::SB_B_SECTOR;

// ---- a one-shot timer on the current thread ----

struct Timer {
    poller: *mut ffi::spdk_poller,
    f: Option<Box<dyn FnOnce()>>,
}

unsafe extern "C" fn timer_fire(arg: *mut c_void) -> c_int {
    no_unwind("timer", 0, || {
        // SAFETY: `arg` is the Timer leaked by `after`; the poller is unregistered below
        // before anything else runs, so it fires exactly once.
        let mut t = unsafe { Box::from_raw(arg.cast::<Timer>()) };
        // SAFETY: our poller, on the thread that registered it.
        unsafe { ffi::spdk_poller_unregister(&mut t.poller) };
        if let Some(f) = t.f.take() {
            f();
        }
        ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
    })
}

/// Runs `f` on the calling SPDK thread in `us` microseconds. Err (and `f` dropped) when
/// the poller cannot be registered.
pub(crate) fn after(us: u64, f: Box<dyn FnOnce()>) -> Result<(), ()> {
    let t = Box::into_raw(Box::new(Timer {
        poller: ptr::null_mut(),
        f: Some(f),
    }));
    // SAFETY: on an SPDK thread; the Timer lives until `timer_fire` takes it back (the
    // poller cannot fire before this function returns to the reactor).
    unsafe {
        let p = ffi::spdk_poller_register_named(
            Some(timer_fire),
            t.cast(),
            us,
            c"pcache_timer".as_ptr(),
        );
        if p.is_null() {
            drop(Box::from_raw(t));
            return Err(());
        }
        (*t).poller = p;
    }
    Ok(())
}

// ---- block I/O from the app thread (examine, superblock name) ----

/// One command of [`block_io`], in bytes: whole blocks of the bdev, whatever its block
/// size (a cache bdev may have 512-byte or 4 KiB blocks).
pub(crate) enum BlockOp {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// The whole bdev; skipped (success) when the bdev does not support FLUSH.
    Flush,
}

impl BlockOp {
    /// Both superblock replicas of a cache bdev (4 KiB each, at bytes 0 and 4096).
    pub(crate) fn read_superblocks() -> Self {
        BlockOp::Read {
            offset: 0,
            len: 2 * SB_B_SECTOR * 512,
        }
    }
}

/// Completion of [`block_io`]: the data read (empty for a write or flush), or why not.
pub(crate) type BlockDone = Box<dyn FnOnce(Result<Vec<u8>, String>)>;

struct BlockIo {
    ch: *mut ffi::spdk_io_channel,
    buf: *mut c_void,
    len: usize,
    read: bool,
    done: BlockDone,
}

impl BlockIo {
    /// Frees the DMA buffer and puts the channel (on the thread that got it).
    fn release(&self) {
        // SAFETY: allocated / got in `block_io` on this thread, released once (the BlockIo
        // is consumed right after).
        unsafe {
            if !self.buf.is_null() {
                ffi::spdk_dma_free(self.buf);
            }
            ffi::spdk_put_io_channel(self.ch);
        }
    }
}

/// Runs one read, write or flush on the open descriptor `desc` from the calling SPDK thread
/// (the app thread), with an I/O channel and DMA buffer of its own; `done` runs on this
/// thread (at once when the command cannot be submitted).
pub(crate) fn block_io(desc: *mut ffi::spdk_bdev_desc, op: BlockOp, done: BlockDone) {
    // SAFETY: `desc` is open (caller); plain getters of its live bdev.
    let (bdev, bs) = unsafe {
        let b = ffi::spdk_bdev_desc_get_bdev(desc);
        (b, u64::from(ffi::spdk_bdev_get_block_size(b)))
    };
    let (offset, len, read) = match &op {
        BlockOp::Read { offset, len } => (*offset, *len, true),
        BlockOp::Write { offset, data } => (*offset, data.len() as u64, false),
        BlockOp::Flush => (0, 0, false),
    };
    if let BlockOp::Flush = op {
        // SAFETY: live bdev.
        if !unsafe {
            ffi::spdk_bdev_io_type_supported(bdev, ffi::spdk_bdev_io_type::SPDK_BDEV_IO_TYPE_FLUSH)
        } {
            return done(Ok(Vec::new()));
        }
    }
    let Ok(len) = usize::try_from(len) else {
        return done(Err("I/O too large".into()));
    };
    if bs == 0 || len as u64 % bs != 0 || offset % bs != 0 {
        return done(Err(format!(
            "{len} bytes at byte {offset} are not whole {bs}-byte blocks"
        )));
    }
    let offset_blocks = offset / bs;
    // SAFETY: open descriptor, on the thread that will put the channel.
    let ch = unsafe { ffi::spdk_bdev_get_io_channel(desc) };
    if ch.is_null() {
        return done(Err("cannot get an I/O channel".into()));
    }
    let mut buf = ptr::null_mut();
    if len > 0 {
        // SAFETY: live bdev; plain allocation (freed in `release`).
        buf = unsafe {
            let align = ffi::spdk_bdev_get_buf_align(bdev).max(4096);
            ffi::spdk_dma_zmalloc(len, align, ptr::null_mut())
        };
        if buf.is_null() {
            // SAFETY: got above on this thread.
            unsafe { ffi::spdk_put_io_channel(ch) };
            return done(Err(format!("cannot allocate a {len}-byte DMA buffer")));
        }
    }
    if let BlockOp::Write { data, .. } = &op {
        // SAFETY: `buf` holds `len` = `data.len()` bytes and does not overlap `data`.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), buf.cast::<u8>(), len) };
    }
    let ctx = Box::into_raw(Box::new(BlockIo {
        ch,
        buf,
        len,
        read,
        done,
    }));
    let n = len as u64 / bs;
    // SAFETY: open descriptor and its channel on this thread; `buf` holds the blocks and
    // lives until the completion, which takes `ctx` back (exactly once).
    let rc = unsafe {
        match op {
            BlockOp::Read { .. } => ffi::spdk_bdev_read_blocks(
                desc,
                ch,
                buf,
                offset_blocks,
                n,
                Some(block_io_done),
                ctx.cast(),
            ),
            BlockOp::Write { .. } => ffi::spdk_bdev_write_blocks(
                desc,
                ch,
                buf,
                offset_blocks,
                n,
                Some(block_io_done),
                ctx.cast(),
            ),
            BlockOp::Flush => ffi::spdk_bdev_flush_blocks(
                desc,
                ch,
                0,
                ffi::spdk_bdev_get_num_blocks(bdev),
                Some(block_io_done),
                ctx.cast(),
            ),
        }
    };
    if rc != 0 {
        // SAFETY: not submitted: the completion never runs, `ctx` is still ours.
        let b = unsafe { Box::from_raw(ctx) };
        b.release();
        (b.done)(Err(format!("cannot submit the I/O (rc {rc})")));
    }
}

unsafe extern "C" fn block_io_done(io: *mut ffi::spdk_bdev_io, success: bool, arg: *mut c_void) {
    no_unwind("block_io_done", (), || {
        // SAFETY: the bdev_io of our submission, freed once; `arg` is the BlockIo leaked by
        // `block_io`, delivered exactly once, on the submitting thread.
        let b = unsafe {
            ffi::spdk_bdev_free_io(io);
            Box::from_raw(arg.cast::<BlockIo>())
        };
        let res = if !success {
            Err("the I/O failed".to_string())
        } else if b.read {
            // SAFETY: `buf` holds `len` bytes the read filled.
            Ok(unsafe { std::slice::from_raw_parts(b.buf.cast::<u8>(), b.len) }.to_vec())
        } else {
            Ok(Vec::new())
        };
        b.release();
        (b.done)(res);
    })
}

/// [`block_io`] over `steps` in order, stopping at the first failure.
pub(crate) fn block_io_steps(
    desc: *mut ffi::spdk_bdev_desc,
    steps: Vec<BlockOp>,
    done: Box<dyn FnOnce(Result<(), String>)>,
) {
    let mut steps = std::collections::VecDeque::from(steps);
    let Some(op) = steps.pop_front() else {
        return done(Ok(()));
    };
    block_io(
        desc,
        op,
        Box::new(move |r| match r {
            Ok(_) => block_io_steps(desc, steps.into(), done),
            Err(e) => done(Err(e)),
        }),
    );
}
