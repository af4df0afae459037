//! Device I/O on the base bdevs: one [`DevIo`] per command (or direct request, open read,
//! formatting write), its buffers (a request's, a DMA buffer, or bytes the worker owns), its
//! submission with `-ENOMEM` retries, and its completion back to the cache.
//!
//! Owns the `spdk_bdev_*_blocks` calls and their callbacks; cache-device I/O of a mapped
//! cache is handed to [`mapped`](super::mapped). Calls the reply side for request buffers.

use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;

use super::copyrun::RunCopy;
use super::dma::DmaBuf;
use super::reply::Reply;
use super::{dev_index, State, Worker, DEV_NAMES};
use crate::engine::{Dev, Direct, IoDone, IoError, ReqId};
use crate::spdk::ffi;
use crate::spdk::log::{no_unwind, spdk_log};

// ---- device I/O ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// A command of the running cache.
    Cmd,
    /// The one I/O of a request served directly (`Cache::begin_direct`).
    Direct,
    /// A read for the opener.
    Open,
    /// A write (or the final flush) of formatting.
    Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Read,
    Write,
    Flush,
    Zeroes,
    CopyRead,
    CopyWrite,
    /// A copy within the cache bdev, by the bdev (`spdk_bdev_copy_blocks`).
    CopyBlocks,
}

/// One base-bdev I/O in flight. Boxed (its address is the callback argument of its
/// bdev I/O), recycled through `Worker::dio_free`.
pub(super) struct DevIo {
    pub(super) worker: *mut Worker,
    pub(super) purpose: Purpose,
    pub(super) tag: u64,
    pub(super) kind: Kind,
    pub(super) dev: Dev,
    /// In blocks of `dev`.
    pub(super) offset: u64,
    pub(super) blocks: u64,
    /// Length in 512-byte sectors (for the second half of a copy).
    pub(super) sectors: u64,
    pub(super) iovs: Vec<ffi::iovec>,
    /// Request slot whose buffer this uses (holds a reference).
    pub(super) req: Option<u32>,
    pub(super) verify: Option<u32>,
    pub(super) crc: Option<u32>,
    pub(super) dma: Option<DmaBuf>,
    /// Worker-owned bytes written straight from here (mapped cache only).
    pub(super) owned: Vec<u8>,
    pub(super) copy_dst: (Dev, u64),
    /// A `CopyBlocks`: its source, in cache bdev blocks.
    pub(super) copy_from: u64,
    /// A verified copy reads a whole extent: the part it writes, as (byte offset into the
    /// read, sectors).
    pub(super) copy_part: Option<(usize, u64)>,
    /// For `Purpose::Direct`: the request it serves and how to answer it.
    pub(super) direct: Option<(Direct, *mut ffi::spdk_bdev_io, Reply)>,
    /// The read of a run (`copyrun`): the other copies it reads for.
    pub(super) run: Vec<RunCopy>,
    /// A run's buffer, shared by its writes.
    pub(super) shared: Option<Rc<DmaBuf>>,
}

impl Worker {
    pub(super) fn new_dio(
        &mut self,
        purpose: Purpose,
        tag: u64,
        kind: Kind,
        dev: Dev,
    ) -> Box<DevIo> {
        let worker: *mut Worker = self;
        let mut d = self.dio_free.pop().unwrap_or_else(|| {
            Box::new(DevIo {
                worker,
                purpose,
                tag,
                kind,
                dev,
                offset: 0,
                blocks: 0,
                sectors: 0,
                iovs: Vec::new(),
                req: None,
                verify: None,
                crc: None,
                dma: None,
                owned: Vec::new(),
                copy_dst: (dev, 0),
                copy_from: 0,
                copy_part: None,
                direct: None,
                run: Vec::new(),
                shared: None,
            })
        });
        d.worker = worker;
        d.purpose = purpose;
        d.tag = tag;
        d.kind = kind;
        d.dev = dev;
        d.offset = 0;
        d.blocks = 0;
        d.sectors = 0;
        d.req = None;
        d.verify = None;
        d.crc = None;
        d.copy_part = None;
        d.direct = None;
        d
    }

    pub(super) fn recycle(&mut self, mut d: Box<DevIo>) {
        if let Some(b) = d.dma.take() {
            self.dma.put(b);
        }
        if let Some(shared) = d.shared.take() {
            self.release_shared(shared);
        }
        debug_assert!(
            d.run.is_empty(),
            "a run's copies were neither written nor failed"
        );
        d.run.clear();
        let owned = std::mem::take(&mut d.owned);
        if owned.capacity() > 0 {
            self.give_back(d.tag, owned);
        }
        if let Some(idx) = d.req.take() {
            self.unref(idx);
        }
        d.iovs.clear();
        if self.dio_free.len() < 1024 {
            self.dio_free.push(d);
        }
    }

    /// Points `d` at bytes `off..off+len` of request `req`'s payload.
    pub(super) fn attach_req(&mut self, d: &mut DevIo, req: ReqId, off: u64, len: u64) -> bool {
        let Some(idx) = self.reqs.index(req) else {
            spdk_log!(
                ERROR,
                "{}: command names an unknown request {req:#x}",
                self.name
            );
            return false;
        };
        let s = &mut self.reqs.slots[idx as usize];
        let iovs = s.iovs();
        if iovs.is_empty() {
            return false;
        }
        if !sub_iovs(iovs, off, len, &mut d.iovs) {
            spdk_log!(
                ERROR,
                "{}: command range {off}+{len} exceeds its request's buffer",
                self.name
            );
            return false;
        }
        s.refs += 1;
        d.req = Some(idx);
        d.sectors = len / 512;
        true
    }

    /// Points `d` at worker-owned bytes: kept in `d` for the mapped cache, else copied into
    /// a DMA buffer.
    pub(super) fn attach_vec(&mut self, d: &mut DevIo, mut v: Vec<u8>) -> bool {
        if !(d.dev == Dev::Cache && self.dax.is_some()) {
            let ok = self.attach_owned(d, &v);
            self.give_back(d.tag, v);
            return ok;
        }
        v.resize(v.len().next_multiple_of(512), 0);
        d.iovs.push(ffi::iovec {
            iov_base: v.as_mut_ptr().cast(),
            iov_len: v.len(),
        });
        d.sectors = (v.len() / 512) as u64;
        // Moving the Vec keeps its heap buffer where the iovec points.
        d.owned = v;
        true
    }

    /// Returns the buffer of an engine-owned write of command `tag` to the engine.
    fn give_back(&mut self, tag: u64, buf: Vec<u8>) {
        if let Some(cache) = self.cache.as_deref_mut() {
            cache.give_back(tag, buf);
        }
    }

    /// Copies worker-owned bytes into a DMA buffer for `d`.
    pub(super) fn attach_owned(&mut self, d: &mut DevIo, bytes: &[u8]) -> bool {
        let len = bytes.len().next_multiple_of(512);
        let Some(buf) = self.dma.get(len) else {
            spdk_log!(
                ERROR,
                "{}: out of DMA memory for a {len}-byte write",
                self.name
            );
            return false;
        };
        // SAFETY: `buf` holds at least `len` ≥ `bytes.len()` bytes and does not overlap `bytes`.
        unsafe {
            ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr, bytes.len());
            ptr::write_bytes(buf.ptr.add(bytes.len()), 0, len - bytes.len());
        }
        d.iovs.push(ffi::iovec {
            iov_base: buf.ptr.cast(),
            iov_len: len,
        });
        d.dma = Some(buf);
        d.sectors = (len / 512) as u64;
        true
    }

    /// Sets `d`'s device range from 512-byte sectors; false if the device's block size
    /// does not divide it.
    pub(super) fn set_range(&mut self, d: &mut DevIo, sector: u64, sectors: u64) -> bool {
        let i = dev_index(d.dev);
        let Some([offset, blocks]) = self.blocks_of(d.dev, sector, sectors) else {
            spdk_log!(
                ERROR,
                "{}: {} I/O at sector {sector} (+{sectors}) is not aligned to the block size",
                self.name,
                DEV_NAMES[i]
            );
            return false;
        };
        d.offset = offset;
        d.blocks = blocks;
        d.sectors = sectors;
        true
    }

    /// `sectors` 512-byte sectors at `sector` of `dev` as its blocks (offset, count), if
    /// they are whole blocks.
    pub(super) fn blocks_of(&self, dev: Dev, sector: u64, sectors: u64) -> Option<[u64; 2]> {
        let shift = self.shift[dev_index(dev)];
        ((sector | sectors) & ((1u64 << shift) - 1) == 0)
            .then_some([sector >> shift, sectors >> shift])
    }

    /// A command that could not even be issued: fail it now.
    pub(super) fn fail_now(&mut self, mut d: Box<DevIo>) {
        self.counters.dev_errors += 1;
        if d.purpose == Purpose::Cmd {
            self.fail_run(&mut d, IoError::Device);
            self.dones.push(IoDone {
                tag: d.tag,
                result: Err(IoError::Device),
                crc: None,
            });
            self.kick = true;
        }
        self.recycle(d);
    }

    pub(super) fn issue(&mut self, d: Box<DevIo>) {
        self.inflight += 1;
        let i = dev_index(d.dev);
        if self.removed[i] {
            return self.complete_dio(d, false);
        }
        if d.dev == Dev::Cache && self.dax.is_some() {
            // Executed inline on the mapping (`mapped`).
            return self.issue_mapped(d);
        }
        // Behind those already waiting for a bdev_io, in order.
        let waits = if self.nomem.is_empty() {
            self.submit_dio(d)
        } else {
            Some(d)
        };
        if let Some(d) = waits {
            self.counters.nomem_waits += 1;
            self.nomem.push_back(d);
        }
    }

    /// Submits `d` to its bdev; returns it if no `spdk_bdev_io` was free (-ENOMEM), to be
    /// submitted again later. Any other refusal fails it.
    fn submit_dio(&mut self, d: Box<DevIo>) -> Option<Box<DevIo>> {
        let raw = Box::into_raw(d);
        // SAFETY: `raw` is a live DevIo of this worker; its iovecs point at live buffers.
        let rc = unsafe { submit_raw(self, raw) };
        if rc == 0 {
            return None;
        }
        // SAFETY: not submitted, so still ours.
        let d = unsafe { Box::from_raw(raw) };
        if rc == -libc::ENOMEM {
            return Some(d);
        }
        spdk_log!(
            ERROR,
            "{}: {} bdev I/O submission failed: rc {rc}",
            self.name,
            DEV_NAMES[dev_index(d.dev)]
        );
        self.complete_dio(d, false);
        None
    }

    /// Submits again, in order, the device I/O that found no free `spdk_bdev_io`, until
    /// one still finds none. Called by every engine poll while any waits: SPDK's own wait
    /// (`spdk_bdev_queue_io_wait`) fires only when a bdev_io is freed on this thread, and a
    /// worker whose own I/O have all completed would then wait for ever while the other
    /// threads free theirs to the global pool. True if any left the queue.
    pub(super) fn resubmit_waiting(&mut self) -> bool {
        let mut moved = false;
        while let Some(d) = self.nomem.pop_front() {
            if self.removed[dev_index(d.dev)] {
                self.complete_dio(d, false);
            } else if let Some(d) = self.submit_dio(d) {
                self.nomem.push_front(d);
                break;
            }
            moved = true;
        }
        moved
    }

    /// A device I/O finished (or failed to start).
    pub(super) fn complete_dio(&mut self, mut d: Box<DevIo>, ok: bool) {
        self.inflight -= 1;
        if !ok {
            self.counters.dev_errors += 1;
        }
        match d.purpose {
            Purpose::Cmd => {
                let mut ok = ok;
                // A copy's source read failed, or its data failed the extent's CRC: nothing
                // is written.
                let mut early = None;
                if d.kind == Kind::CopyBlocks && !ok && !self.removed[0] {
                    // Which side failed, the bdev does not say: copy through the host,
                    // which reports a failed source read apart from a failed write.
                    self.counters.dev_copies_offload_failed += 1;
                    let src = d.copy_from << self.shift[dev_index(Dev::Cache)];
                    let sectors = d.sectors;
                    d.iovs.clear();
                    d.dev = Dev::Cache;
                    return self.copy_through_host(d, src, sectors, None);
                }
                if d.kind == Kind::CopyRead && !ok {
                    early = Some(IoError::Source);
                    self.fail_run(&mut d, IoError::Source);
                }
                if d.kind == Kind::CopyRead && ok {
                    if d.verify.is_some_and(|want| iov_crc(&d.iovs) != want) {
                        self.counters.crc_mismatches += 1;
                        early = Some(IoError::CrcMismatch);
                    } else {
                        if !d.run.is_empty() {
                            self.write_run(&mut d);
                        }
                        let (dev, sector) = d.copy_dst;
                        d.kind = Kind::CopyWrite;
                        d.dev = dev;
                        let mut sectors = d.sectors;
                        if let (Some((skip, n)), Some(iov)) = (d.copy_part, d.iovs.first_mut()) {
                            // SAFETY: `skip + n * 512` lies inside the DMA buffer the read
                            // filled (checked when the copy was issued).
                            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(skip).cast() };
                            iov.iov_len = (n * 512) as usize;
                            sectors = n;
                        }
                        if self.set_range(&mut d, sector, sectors) {
                            return self.issue(d);
                        }
                        ok = false;
                    }
                }
                let mut result = match early {
                    Some(e) => Err(e),
                    None if ok => Ok(()),
                    None => Err(IoError::Device),
                };
                if ok && d.kind == Kind::Read {
                    if let Some(want) = d.verify {
                        if iov_crc(&d.iovs) != want {
                            self.counters.crc_mismatches += 1;
                            result = Err(IoError::CrcMismatch);
                        }
                    }
                }
                self.dones.push(IoDone {
                    tag: d.tag,
                    result,
                    crc: d.crc,
                });
                self.kick = true;
                self.recycle(d);
            }
            Purpose::Direct => self.finish_direct(d, ok),
            Purpose::Open => {
                let data = if ok {
                    let mut v = Vec::new();
                    for iov in &d.iovs {
                        // SAFETY: our DMA buffer, filled by the completed read.
                        v.extend_from_slice(unsafe {
                            std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
                        });
                    }
                    Ok(v)
                } else {
                    Err(IoError::Device)
                };
                self.recycle(d);
                if self.state == State::Opening {
                    self.open_read_done(data);
                }
            }
            Purpose::Format => {
                self.recycle(d);
                if self.state == State::Opening {
                    self.format_io_done(ok);
                }
            }
        }
    }
}

/// Splits bytes `off..off+len` of the buffer described by `iovs` into `out`.
pub(super) fn sub_iovs(iovs: &[ffi::iovec], off: u64, len: u64, out: &mut Vec<ffi::iovec>) -> bool {
    out.clear();
    let mut skip = off;
    let mut want = len;
    for v in iovs {
        if want == 0 {
            break;
        }
        let l = v.iov_len as u64;
        if skip >= l {
            skip -= l;
            continue;
        }
        let take = (l - skip).min(want);
        out.push(ffi::iovec {
            // SAFETY: `skip < l`: still inside this iovec's buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip as usize).cast() },
            iov_len: take as usize,
        });
        want -= take;
        skip = 0;
    }
    want == 0
}

pub(super) fn iov_crc(iovs: &[ffi::iovec]) -> u32 {
    let mut crc = 0;
    for v in iovs {
        // SAFETY: every iovec we build points at `iov_len` live bytes (a pending request's
        // buffer or our DMA buffer).
        let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
        crc = crc32c::crc32c_append(crc, s);
    }
    crc
}

/// Issues `d` on its device.
///
/// # Safety
/// `d` is a live DevIo of `e`, owned by the caller; on success SPDK owns it until `dev_done`.
pub(super) unsafe fn submit_raw(e: &Worker, d: *mut DevIo) -> c_int {
    // SAFETY: per the contract; every buffer named by the iovecs is live until completion.
    unsafe {
        let dio = &mut *d;
        let i = dev_index(dio.dev);
        let (desc, ch) = (e.desc[i], e.ch[i]);
        let cb = Some(dev_done as unsafe extern "C" fn(*mut ffi::spdk_bdev_io, bool, *mut c_void));
        let arg = d.cast::<c_void>();
        match dio.kind {
            Kind::Read | Kind::CopyRead => ffi::spdk_bdev_readv_blocks(
                desc,
                ch,
                dio.iovs.as_mut_ptr(),
                dio.iovs.len() as c_int,
                dio.offset,
                dio.blocks,
                cb,
                arg,
            ),
            Kind::Write | Kind::CopyWrite => ffi::spdk_bdev_writev_blocks(
                desc,
                ch,
                dio.iovs.as_mut_ptr(),
                dio.iovs.len() as c_int,
                dio.offset,
                dio.blocks,
                cb,
                arg,
            ),
            Kind::Flush => ffi::spdk_bdev_flush_blocks(desc, ch, dio.offset, dio.blocks, cb, arg),
            Kind::CopyBlocks => {
                ffi::spdk_bdev_copy_blocks(desc, ch, dio.offset, dio.copy_from, dio.blocks, cb, arg)
            }
            Kind::Zeroes => {
                ffi::spdk_bdev_write_zeroes_blocks(desc, ch, dio.offset, dio.blocks, cb, arg)
            }
        }
    }
}

pub(super) unsafe extern "C" fn dev_done(
    bdev_io: *mut ffi::spdk_bdev_io,
    success: bool,
    arg: *mut c_void,
) {
    no_unwind("pcache dev_done", (), || {
        // SAFETY: the base request SPDK allocated for us; we are done with it.
        unsafe { ffi::spdk_bdev_free_io(bdev_io) };
        // SAFETY: `arg` is the DevIo we submitted; it is ours again.
        let d = unsafe { Box::from_raw(arg.cast::<DevIo>()) };
        let worker = d.worker;
        // SAFETY: the worker outlives its device I/O (teardown waits for `inflight == 0`);
        // completions run on the worker thread, where nothing else borrows it now.
        unsafe { (*worker).complete_dio(d, success) };
    })
}
