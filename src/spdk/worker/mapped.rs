//! The mapped-cache path (`cache_path`, a [`DaxDevice`] instead of a cache bdev): reads of
//! cached data served inline from the mapping, cache-device I/O executed as copies between
//! the mapping and the buffers, direct writes of one batch made durable by one fence, and
//! the read-ahead of the next request's data.
//!
//! The only file that copies to or from the mapping; calls device I/O to complete. A base
//! bdev reads from the mapping only once it is registered here ([`DmaRegistration`]).

use super::devio::{sub_iovs, DevIo, Kind, Purpose};
use super::reply::Reply;
use super::Worker;
use crate::media::dax::DaxDevice;
use crate::media::BlockDevice;
use crate::spdk::ffi::{self, spdk_bdev_io_type as t};
use crate::spdk::link::Desc;
use crate::spdk::log::spdk_log;
use std::ptr::NonNull;

impl Worker {
    /// Executes cache-device I/O `d` on the mapped cache at once: a copy between the
    /// mapping and the buffers, persisted before it returns, except the direct writes of a
    /// batch, which wait for its one fence (`fence_direct_writes`). Completions are
    /// delivered in order by the outermost call, so one that issues more I/O does not recurse.
    pub(super) fn issue_mapped(&mut self, d: Box<DevIo>) {
        let Some(dax) = self.dax.as_mut() else {
            return self.complete_dio(d, false);
        };
        if d.purpose == Purpose::Direct && d.kind == Kind::Write {
            // Completed after the batch's one fence (`fence_direct_writes`).
            let ok = dax_write(dax, d.offset, &d.iovs, &mut self.dax_bounce, false);
            self.unfenced.push((d, ok));
            return;
        }
        let ok = dax_run(dax, &d, &mut self.dax_bounce);
        if !ok {
            spdk_log!(ERROR, "{}: mapped cache I/O failed", self.name);
        }
        self.dax_done.push_back((d, ok));
        if !self.dax_busy {
            self.dax_busy = true;
            while let Some((d, ok)) = self.dax_done.pop_front() {
                self.complete_dio(d, ok);
            }
            self.dax_busy = false;
        }
    }

    /// With a mapped cache, serves a read of cached data at once: copied from the mapping
    /// into the request's buffer, no device command (see `Cache::read_inline`).
    pub(super) fn read_inline(&mut self, d: &Desc, lba: u64, len: u32) -> Option<bool> {
        let (Some(cache), Some(dax)) = (self.cache.as_deref_mut(), self.dax.as_mut()) else {
            return None;
        };
        let iovs = d.iovs.get();
        if iovs.is_empty() {
            return None;
        }
        let (part, bounce) = (&mut self.iov_scratch, &mut self.dax_bounce);
        let mut copy = |sector: u64, off: u64, bytes: u64| {
            part.clear();
            sub_iovs(iovs, off, bytes, part) && dax_read(dax, sector, part, bounce)
        };
        cache.read_inline(lba, len, &mut copy)
    }

    /// The status of a request [`Worker::read_inline`] served, counting a failed copy.
    pub(super) fn inline_read_status(&mut self, ok: bool) -> ffi::spdk_bdev_io_status::Type {
        if ok {
            ffi::spdk_bdev_io_status::SPDK_BDEV_IO_STATUS_SUCCESS
        } else {
            self.counters.dev_errors += 1;
            self.counters.requests_failed += 1;
            ffi::spdk_bdev_io_status::SPDK_BDEV_IO_STATUS_FAILED
        }
    }

    /// Makes the direct writes of this batch to the mapped cache durable with one fence,
    /// then completes them: data durable before the acknowledgement, as for each alone.
    pub(super) fn fence_direct_writes(&mut self) {
        if self.unfenced.is_empty() {
            return;
        }
        if let Some(dax) = self.dax.as_mut() {
            dax.fence();
        }
        let mut done = std::mem::take(&mut self.unfenced);
        for (d, ok) in done.drain(..) {
            self.complete_dio(d, ok);
        }
        self.unfenced = done;
    }

    /// Over a mapped cache, starts loading the data of `next` if it is a read hit, while
    /// the request before it runs: its copy then finds the lines on their way instead of
    /// waiting for DRAM (two requests ahead measured no better).
    pub(super) fn prefetch_read(&self, next: Option<&(Desc, Reply)>) {
        if let (Some(next), Some(cache), Some(dax)) =
            (next, self.cache.as_deref(), self.dax.as_ref())
        {
            if next.0.ty == t::SPDK_BDEV_IO_TYPE_READ {
                let shift = self.front_shift;
                let (lba, len) = (next.0.offset << shift, next.0.num << shift);
                if let Some(sector) = u32::try_from(len)
                    .ok()
                    .and_then(|len| cache.cached_sector(lba, len))
                {
                    dax.prefetch(sector, (len * 512) as usize);
                }
            }
        }
    }
}

/// A mapped cache registered with SPDK's memory maps, so that a base bdev may transfer
/// straight from it (writeback's writes to the backing bdev). Unregistered when dropped,
/// which must come before the mapping goes.
pub(super) struct DmaRegistration {
    addr: NonNull<u8>,
    len: usize,
}

impl DmaRegistration {
    /// Registers `dax` when its pages stay put while mapped (`DaxDevice::pinned_region`)
    /// and lie on 2 MiB boundaries, as `spdk_mem_register` needs; None (logged): its data
    /// goes through host buffers as before.
    pub(super) fn new(dax: &DaxDevice, name: &str) -> Option<Self> {
        const TWO_MIB: usize = 2 << 20;
        let (addr, len) = dax.pinned_region()?;
        if (addr.as_ptr() as usize | len) % TWO_MIB != 0 {
            spdk_log!(
                NOTICE,
                "{name}: the mapped cache is not in whole 2 MiB pages: writeback copies its \
                 data through host buffers"
            );
            return None;
        }
        // SAFETY: a live mapping of `len` bytes, registered once and unregistered (by
        // `drop`) while still mapped.
        let rc = unsafe { ffi::spdk_mem_register(addr.as_ptr().cast(), len) };
        if rc != 0 {
            spdk_log!(
                NOTICE,
                "{name}: the mapped cache could not be registered for device transfers \
                 (rc {rc}): writeback copies its data through host buffers"
            );
            return None;
        }
        spdk_log!(
            NOTICE,
            "{name}: the mapped cache is registered: writeback writes from it directly"
        );
        Some(DmaRegistration { addr, len })
    }
}

impl Drop for DmaRegistration {
    fn drop(&mut self) {
        // SAFETY: the region registered in `new`, still mapped (see the type's contract).
        let rc = unsafe { ffi::spdk_mem_unregister(self.addr.as_ptr().cast(), self.len) };
        if rc != 0 {
            spdk_log!(ERROR, "unregistering a mapped cache failed: rc {rc}");
        }
    }
}

impl Worker {
    /// The iovec of `sectors` sectors at `sector` of the mapped cache, when a base bdev may
    /// transfer from there directly ([`DmaRegistration`]).
    pub(super) fn mapped_iov(&self, sector: u64, sectors: u64) -> Option<ffi::iovec> {
        self.dax_dma.as_ref()?;
        let len = usize::try_from(sectors.checked_mul(512)?).ok()?;
        let at = self.dax.as_ref()?.addr(sector, len)?;
        Some(ffi::iovec {
            iov_base: at.as_ptr().cast(),
            iov_len: len,
        })
    }
}

/// Executes `d` on the mapped cache (512-byte blocks): done when this returns.
pub(super) fn dax_run(dax: &mut DaxDevice, d: &DevIo, bounce: &mut Vec<u8>) -> bool {
    let sector = d.offset;
    match d.kind {
        Kind::Flush => dax.flush().is_ok(),
        Kind::Zeroes => dax.write_zeroes(sector, d.blocks).is_ok(),
        Kind::Read | Kind::CopyRead => dax_read(dax, sector, &d.iovs, bounce),
        Kind::Write | Kind::CopyWrite => dax_write(dax, sector, &d.iovs, bounce, true),
        // A copy within the cache: from the mapping to itself, no buffer between.
        Kind::CopyBlocks => dax.copy(d.copy_from, sector, d.blocks).is_ok(),
    }
}

/// The bytes an iovec we built names.
///
/// # Safety
/// `v` points at `iov_len` live bytes (a pending request's buffer, our DMA buffer or a
/// DevIo's owned bytes), none inside the mapping, not otherwise borrowed while the slice
/// lives.
pub(super) unsafe fn iov_bytes<'a>(v: &ffi::iovec) -> &'a mut [u8] {
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) }
}

/// Runs `f(first sector, bytes)` for each of `iovs` in turn, laid over consecutive sectors
/// from `sector`, until one fails. None: an iovec is not a whole number of sectors (the
/// caller goes through a bounce buffer instead).
pub(super) fn per_iov(
    sector: u64,
    iovs: &[ffi::iovec],
    mut f: impl FnMut(u64, &mut [u8]) -> bool,
) -> Option<bool> {
    if iovs.iter().any(|v| v.iov_len % 512 != 0) {
        return None;
    }
    let mut s = sector;
    for v in iovs {
        // SAFETY: an iovec we built or were given (see `iov_bytes`); each slice is used
        // alone and dropped before the next one is made.
        if !f(s, unsafe { iov_bytes(v) }) {
            return Some(false);
        }
        s += (v.iov_len / 512) as u64;
    }
    Some(true)
}

/// Copies sectors from `sector` of the mapped cache into `iovs`.
pub(super) fn dax_read(
    dax: &mut DaxDevice,
    sector: u64,
    iovs: &[ffi::iovec],
    bounce: &mut Vec<u8>,
) -> bool {
    if let Some(ok) = per_iov(sector, iovs, |s, b| dax.read(s, b).is_ok()) {
        return ok;
    }
    bounce.resize(iovs.iter().map(|v| v.iov_len).sum(), 0);
    if dax.read(sector, bounce).is_err() {
        return false;
    }
    let mut at = 0;
    for v in iovs {
        // SAFETY: as in `per_iov`.
        unsafe { iov_bytes(v) }.copy_from_slice(&bounce[at..at + v.iov_len]);
        at += v.iov_len;
    }
    true
}

/// Copies `iovs` to the mapped cache at `sector`: persisted when this returns if `fenced`,
/// else at the device's next fence (`DaxDevice::write_unfenced`).
pub(super) fn dax_write(
    dax: &mut DaxDevice,
    sector: u64,
    iovs: &[ffi::iovec],
    bounce: &mut Vec<u8>,
    fenced: bool,
) -> bool {
    let mut write = |s: u64, b: &[u8]| {
        if fenced {
            dax.write(s, b).is_ok()
        } else {
            dax.write_unfenced(s, b).is_ok()
        }
    };
    if let Some(ok) = per_iov(sector, iovs, |s, b| write(s, b)) {
        return ok;
    }
    bounce.clear();
    for v in iovs {
        // SAFETY: as in `per_iov`.
        bounce.extend_from_slice(unsafe { iov_bytes(v) });
    }
    write(sector, bounce)
}
