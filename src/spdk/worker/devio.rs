//! Device I/O on the base bdevs: one [`DevIo`] per command (or direct request, open read,
//! formatting write), its buffers (a request's, a DMA buffer, bytes the worker owns, or
//! memory the cache bdev lent a copy's zero-copy read), its submission with `-ENOMEM`
//! retries, and its completion back to the cache.
//!
//! Owns the `spdk_bdev_*_blocks` calls and their callbacks; cache-device I/O of a mapped
//! cache is handed to [`mapped`](super::mapped). Calls the reply side for request buffers.

use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;

use super::copyrun::RunCopy;
use super::dma::Held;
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
    pub(super) held: Option<Held>,
    /// A copy's read that asks the cache bdev to lend its own memory (`Worker::zcopy`).
    pub(super) lend: bool,
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
    /// A joined cache write (`datarun`): the other writes it makes, as (tag, request slot
    /// holding a reference, CRC of the part's data if asked for), completed with it.
    pub(super) parts: Vec<(u64, u32, Option<u32>)>,
    /// A run's buffer, shared by its writes.
    pub(super) shared: Option<Rc<Held>>,
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
                held: None,
                lend: false,
                owned: Vec::new(),
                copy_dst: (dev, 0),
                copy_from: 0,
                copy_part: None,
                direct: None,
                run: Vec::new(),
                parts: Vec::new(),
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
        d.lend = false;
        d
    }

    pub(super) fn recycle(&mut self, mut d: Box<DevIo>) {
        if let Some(h) = d.held.take() {
            self.release(h);
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
        debug_assert!(
            d.parts.is_empty(),
            "a joined write's parts were neither completed nor failed"
        );
        // Never left waiting: a part not yet answered fails.
        self.finish_parts(&mut d, Err(IoError::Device));
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

    /// Appends bytes `off..off+len` of request `req`'s payload to joined write `d`, as a
    /// part completed with it (`datarun`), with the CRC of those bytes if `want_crc`.
    /// False, and `d` unchanged, if it cannot.
    pub(super) fn attach_part(
        &mut self,
        d: &mut DevIo,
        tag: u64,
        (req, off, len): (ReqId, u64, u64),
        want_crc: bool,
    ) -> bool {
        let Some(idx) = self.reqs.index(req) else {
            return false;
        };
        let s = &mut self.reqs.slots[idx as usize];
        let before = d.iovs.len();
        if !append_sub_iovs(s.iovs(), off, len, &mut d.iovs) {
            d.iovs.truncate(before);
            return false;
        }
        s.refs += 1;
        let crc = want_crc.then(|| iov_crc(&d.iovs[before..]));
        d.parts.push((tag, idx, crc));
        true
    }

    /// Completes the writes joined into `d` (`datarun`) with its result.
    fn finish_parts(&mut self, d: &mut DevIo, result: Result<(), IoError>) {
        for (tag, idx, crc) in std::mem::take(&mut d.parts) {
            self.dones.push(IoDone { tag, result, crc });
            self.kick = true;
            self.unref(idx);
        }
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

    /// Points `d` (holding nothing yet) at a new pooled DMA buffer of `len` bytes, held until
    /// `d` is recycled; its address, or None if the pool has no memory.
    pub(super) fn hold_buffer(&mut self, d: &mut DevIo, len: usize) -> Option<*mut u8> {
        debug_assert!(d.held.is_none(), "a device I/O holds one buffer");
        let buf = self.dma.get(len)?;
        let at = buf.ptr;
        d.iovs.push(ffi::iovec {
            iov_base: at.cast(),
            iov_len: len,
        });
        d.held = Some(Held::Pooled(buf));
        Some(at)
    }

    /// Copies worker-owned bytes into a DMA buffer for `d`.
    pub(super) fn attach_owned(&mut self, d: &mut DevIo, bytes: &[u8]) -> bool {
        let len = bytes.len().next_multiple_of(512);
        let Some(at) = self.hold_buffer(d, len) else {
            spdk_log!(
                ERROR,
                "{}: out of DMA memory for a {len}-byte write",
                self.name
            );
            return false;
        };
        // SAFETY: `at` holds `len` ≥ `bytes.len()` bytes and does not overlap `bytes`.
        unsafe {
            ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len());
            ptr::write_bytes(at.add(bytes.len()), 0, len - bytes.len());
        }
        d.sectors = (len / 512) as u64;
        true
    }

    /// Gives back the memory a device I/O held: a pooled buffer to the pool, lent memory
    /// to the cache bdev (counted in flight until the bdev has it).
    pub(super) fn release(&mut self, h: Held) {
        match h {
            Held::Pooled(b) => self.dma.put(b),
            Held::Lent(io) => {
                self.inflight += 1;
                let cb = Some(
                    lent_back as unsafe extern "C" fn(*mut ffi::spdk_bdev_io, bool, *mut c_void),
                );
                let me: *mut Worker = self;
                // SAFETY: `io` is the live zero-copy start this worker completed and kept;
                // it is ended once, here.
                let rc = unsafe { ffi::spdk_bdev_zcopy_end(io, false, cb, me.cast()) };
                if rc != 0 {
                    // SAFETY: not resubmitted, so still ours to free.
                    unsafe { ffi::spdk_bdev_free_io(io) };
                    self.inflight -= 1;
                }
            }
        }
    }

    /// The cache bdev answered a copy's zero-copy read: with its own memory holding the
    /// data, the copy goes on from there; otherwise (a failure, or memory in pieces) the
    /// read is made again into a pooled buffer, which reports a failed read as such.
    fn lent(&mut self, mut d: Box<DevIo>, io: *mut ffi::spdk_bdev_io, success: bool) {
        let len = (d.blocks << self.shift[dev_index(d.dev)]) * 512;
        let mut iov: *mut ffi::iovec = ptr::null_mut();
        let mut n: c_int = 0;
        if success {
            // SAFETY: a completed zero-copy start: its iovecs name the lent memory.
            unsafe { ffi::spdk_bdev_io_get_iovec(io, &mut iov, &mut n) };
        }
        // SAFETY: `n` iovecs at `iov` (none when the start failed).
        let one = (n == 1 && !iov.is_null()).then(|| unsafe { *iov });
        if let Some(v) = one.filter(|v| !v.iov_base.is_null() && v.iov_len as u64 == len) {
            d.iovs.clear();
            d.iovs.push(v);
            d.held = Some(Held::Lent(io));
            self.counters.dev_copies_lent += 1 + d.run.len() as u64;
            return self.complete_dio(d, true);
        }
        if success {
            // Lent in pieces: this bdev's zero-copy is not used again.
            self.zcopy = false;
            self.release(Held::Lent(io));
        } else {
            // SAFETY: a failed start holds nothing; the bdev_io is ours to free.
            unsafe { ffi::spdk_bdev_free_io(io) };
        }
        self.counters.dev_copies_lent_failed += 1 + d.run.len() as u64;
        self.inflight -= 1;
        d.lend = false;
        d.iovs.clear();
        match usize::try_from(len) {
            Ok(l) if self.hold_buffer(&mut d, l).is_some() => self.issue(d),
            _ => self.fail_now(d),
        }
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
            self.finish_parts(&mut d, Err(IoError::Device));
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
        if let Some(mut d) = waits {
            self.counters.nomem_waits += 1;
            if !self.unlend(&mut d) {
                return self.fail_now(d);
            }
            self.nomem.push_back(d);
        }
    }

    /// A copy's write from lent cache memory that must wait for a free `spdk_bdev_io`: its
    /// data goes into a pooled buffer and its hold on the lent memory is dropped first.
    /// A lent start keeps its `spdk_bdev_io` until every write from it is done, so lent
    /// memory waiting on the pool could hold the whole pool and wait for ever. False if no
    /// buffer could be had (the write then fails, and writeback retries it).
    fn unlend(&mut self, d: &mut DevIo) -> bool {
        let lent = |h: Option<&Held>| matches!(h, Some(Held::Lent(_)));
        if d.kind != Kind::CopyWrite || !(lent(d.held.as_ref()) || lent(d.shared.as_deref())) {
            return true;
        }
        let len: usize = d.iovs.iter().map(|v| v.iov_len).sum();
        let Some(buf) = self.dma.get(len) else {
            return false;
        };
        let mut at = 0;
        for v in &d.iovs {
            // SAFETY: `v` names live bytes of the lent memory (its hold is dropped only
            // below); `buf` holds `len` bytes, the sum of the iovecs, and overlaps none.
            unsafe {
                ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), buf.ptr.add(at), v.iov_len)
            };
            at += v.iov_len;
        }
        d.iovs.clear();
        d.iovs.push(ffi::iovec {
            iov_base: buf.ptr.cast(),
            iov_len: len,
        });
        if let Some(h) = d.held.replace(Held::Pooled(buf)) {
            self.release(h);
        }
        if let Some(shared) = d.shared.take() {
            self.release_shared(shared);
        }
        self.counters.dev_copies_unlent += 1;
        true
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
                self.finish_parts(&mut d, result);
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
    append_sub_iovs(iovs, off, len, out)
}

/// [`sub_iovs`], appended to what `out` holds.
pub(super) fn append_sub_iovs(
    iovs: &[ffi::iovec],
    off: u64,
    len: u64,
    out: &mut Vec<ffi::iovec>,
) -> bool {
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
            // No iovecs of ours: the lent memory is named in the bdev_io's own, which
            // outlive this DevIo's (a passthru-style bdev sets them again when the end
            // completes; `Worker::lent` copies them out).
            Kind::CopyRead if dio.lend => ffi::spdk_bdev_zcopy_start(
                desc,
                ch,
                ptr::null_mut(),
                0,
                dio.offset,
                dio.blocks,
                true,
                Some(lent_done as unsafe extern "C" fn(*mut ffi::spdk_bdev_io, bool, *mut c_void)),
                arg,
            ),
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

/// Completion of a copy's zero-copy read: the `spdk_bdev_io` stays live, holding the lent
/// memory, until the copy's writes are done.
unsafe extern "C" fn lent_done(bdev_io: *mut ffi::spdk_bdev_io, success: bool, arg: *mut c_void) {
    no_unwind("pcache lent_done", (), || {
        // SAFETY: `arg` is the DevIo we submitted; it is ours again.
        let d = unsafe { Box::from_raw(arg.cast::<DevIo>()) };
        let worker = d.worker;
        // SAFETY: as in `dev_done`.
        unsafe { (*worker).lent(d, bdev_io, success) };
    })
}

/// The cache bdev has its lent memory back.
unsafe extern "C" fn lent_back(bdev_io: *mut ffi::spdk_bdev_io, _success: bool, arg: *mut c_void) {
    no_unwind("pcache lent_back", (), || {
        // SAFETY: the zero-copy end we submitted; we are done with it.
        unsafe { ffi::spdk_bdev_free_io(bdev_io) };
        // SAFETY: the worker outlives its device I/O (teardown waits for `inflight == 0`).
        unsafe { (*arg.cast::<Worker>()).inflight -= 1 };
    })
}
