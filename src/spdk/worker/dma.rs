//! DMA-able buffers for the worker's own device I/O (kset and header writes, writeback
//! bounce buffers, open reads): `spdk_dma_zmalloc` in power-of-two classes, kept for reuse
//! up to a limit per class, and what a device I/O's data sits in ([`Held`]: a pooled buffer
//! or lent cache-bdev memory). Calls only `ffi`.

use std::ptr;

use crate::spdk::ffi;

// ---- DMA buffers ----

pub(super) struct DmaBuf {
    pub(super) ptr: *mut u8,
    pub(super) cap: usize,
}

/// The memory a device I/O's data sits in, held until the I/O (or the last write of the
/// run sharing it) is recycled: [`Worker::release`](super::Worker::release) gives it back.
pub(super) enum Held {
    /// A buffer of the worker's pool.
    Pooled(DmaBuf),
    /// The cache bdev's own memory, lent by a zero-copy read (`spdk_bdev_zcopy_start`,
    /// this `spdk_bdev_io`) and given back by `spdk_bdev_zcopy_end`.
    Lent(*mut ffi::spdk_bdev_io),
}

/// Power-of-two classes of `spdk_dma_zmalloc` buffers, kept for reuse up to a limit per
/// class (kset and header writes, writeback bounce buffers, open reads).
#[derive(Default)]
pub(super) struct DmaPool {
    pub(super) free: Vec<Vec<*mut u8>>,
}

impl DmaPool {
    pub(super) fn class(len: usize) -> u32 {
        len.max(4096).next_power_of_two().trailing_zeros()
    }

    pub(super) fn keep(class: u32) -> usize {
        match class {
            0..=16 => 256,
            17..=20 => 32,
            _ => 0,
        }
    }

    pub(super) fn get(&mut self, len: usize) -> Option<DmaBuf> {
        let class = Self::class(len);
        let cap = 1usize.checked_shl(class)?;
        if let Some(p) = self.free.get_mut(class as usize).and_then(Vec::pop) {
            return Some(DmaBuf { ptr: p, cap });
        }
        // SAFETY: plain allocation from SPDK's DMA-able heap; null on failure.
        let p = unsafe { ffi::spdk_dma_zmalloc(cap, 4096, ptr::null_mut()) };
        (!p.is_null()).then_some(DmaBuf { ptr: p.cast(), cap })
    }

    pub(super) fn put(&mut self, b: DmaBuf) {
        let class = b.cap.trailing_zeros();
        if self.free.len() <= class as usize {
            self.free.resize_with(class as usize + 1, Vec::new);
        }
        let list = &mut self.free[class as usize];
        if list.len() < Self::keep(class) {
            list.push(b.ptr);
        } else {
            // SAFETY: allocated by spdk_dma_zmalloc in `get`, no longer used.
            unsafe { ffi::spdk_dma_free(b.ptr.cast()) };
        }
    }

    pub(super) fn clear(&mut self) {
        for p in self.free.drain(..).flatten() {
            // SAFETY: as in `put`.
            unsafe { ffi::spdk_dma_free(p.cast()) };
        }
    }
}
