//! Persistent memory mapped into the process: a devdax device (`/dev/daxX.Y`), a file on
//! a DAX filesystem (mapped with `MAP_SYNC`), or — for testing — an ordinary file.
//!
//! Writes are a copy into the mapping followed by a persist: for real persistent memory,
//! each touched cache line is written back with CLWB (else CLFLUSHOPT, else CLFLUSH) and
//! the stores are fenced with SFENCE; for an ordinary file, `msync(MS_SYNC)` of the pages.
//! Every write is durable when `write` returns, so the engine's order — data, then the kset
//! naming it, then the acknowledgement — holds by construction. Machine-check-safe reads
//! (recovering from poisoned lines) are out of scope: they would go in `read`, copying with
//! an exception-table-aware routine instead of `copy_from_slice`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::ptr::NonNull;

use thiserror::Error;

use super::BlockDevice;
use crate::engine::IoError;

const LINE: usize = 64;

#[derive(Debug, Error)]
pub enum DaxError {
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("{path} is empty or its size is unknown")]
    NoSize { path: String },
    #[error("cannot map {path}: {err}")]
    Map { path: String, err: std::io::Error },
}

/// How writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Persistent memory: flush cache lines, then fence.
    Cpu(FlushInsn),
    /// An ordinary file: `msync`. Not persistent memory; for tests and trials only.
    Msync,
    /// A file in RAM (tmpfs, hugetlbfs): stores are already where `msync` would put them; survives a
    /// process crash, not a power loss. Not persistent memory; for tests and benchmarks.
    Ram,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushInsn {
    Clwb,
    Clflushopt,
    Clflush,
}

impl FlushInsn {
    /// The best cache-line write-back instruction this CPU has.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID leaf 7, sub-leaf 0, EBX: bit 23 CLFLUSHOPT, bit 24 CLWB.
            let ebx = std::arch::x86_64::__cpuid_count(7, 0).ebx;
            if ebx & (1 << 24) != 0 {
                return FlushInsn::Clwb;
            }
            if ebx & (1 << 23) != 0 {
                return FlushInsn::Clflushopt;
            }
        }
        FlushInsn::Clflush
    }
}

/// One persist barrier, as recorded for tests of write ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistEvent {
    pub sector: u64,
    pub sectors: u64,
}

pub struct DaxDevice {
    base: NonNull<u8>,
    len: usize,
    persist: Persist,
    writable: bool,
    devdax: bool,
    /// Its pages stay where they are while mapped (devdax, hugetlbfs).
    pinned: bool,
    _file: File,
    /// When set, every persist barrier is appended here (tests).
    pub persist_log: Option<Vec<PersistEvent>>,
    /// Byte ranges written by `write_unfenced` and not yet fenced.
    unfenced: Vec<(usize, usize)>,
}

// SAFETY: the mapping is owned by this value and only accessed through `&mut self` (or
// `&self` reads); moving it to another thread moves that exclusive ownership with it.
unsafe impl Send for DaxDevice {}

impl DaxDevice {
    /// Maps `path`. A character device is taken as devdax; a regular file is mapped with
    /// `MAP_SYNC` when its filesystem supports DAX, else as an ordinary file (`Persist::Msync`).
    /// With `create_bytes`, a regular file is created or extended to that size.
    pub fn open(path: &Path, create_bytes: Option<u64>, writable: bool) -> Result<Self, DaxError> {
        let name = path.display().to_string();
        let open_err = |err| DaxError::Open {
            path: name.clone(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable && create_bytes.is_some())
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let devdax = meta.file_type().is_char_device();
        if let (Some(n), false) = (create_bytes, devdax) {
            if meta.len() < n {
                file.set_len(n).map_err(open_err)?;
            }
        }
        let len = if devdax {
            devdax_size(meta.rdev())
        } else {
            file.metadata().map_err(open_err)?.len()
        };
        let len = usize::try_from(len).unwrap_or(0);
        if len == 0 {
            return Err(DaxError::NoSize { path: name });
        }
        Self::map(file, len, writable, devdax, name)
    }

    /// Maps `file` (`len` bytes): with MAP_SYNC where the filesystem is DAX, else as an
    /// ordinary shared mapping persisted with msync (or nothing, on tmpfs).
    fn map(
        file: File,
        len: usize,
        writable: bool,
        devdax: bool,
        name: String,
    ) -> Result<Self, DaxError> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let fd = file.as_raw_fd();
        let sync = libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC;
        // SAFETY: mapping a file we hold open, with a length no larger than the file; the
        // result is checked against MAP_FAILED before use.
        let mut ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, sync, fd, 0) };
        let mut persist = Persist::Cpu(FlushInsn::detect());
        let fs = fs_magic(&file);
        if ptr == libc::MAP_FAILED && !devdax {
            // Not a DAX filesystem: an ordinary shared mapping, persisted with msync (or
            // with nothing at all on tmpfs, whose pages are the file).
            // SAFETY: as above.
            ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
            persist = if matches!(fs, Some(TMPFS_MAGIC | HUGETLBFS_MAGIC)) {
                Persist::Ram
            } else {
                Persist::Msync
            };
        }
        if ptr == libc::MAP_FAILED {
            return Err(DaxError::Map {
                path: name,
                err: std::io::Error::last_os_error(),
            });
        }
        // hugetlbfs pages are never swapped, merged or moved by compaction: the memory
        // SPDK's own DMA buffers come from.
        let pinned = devdax || fs == Some(HUGETLBFS_MAGIC);
        if persist == Persist::Ram && !pinned {
            // 4 KiB pages make every random copy a TLB miss; PMEM is mapped with 2 MiB
            // pages, and tmpfs gives them where the admin allows (shmem_enabled=advise).
            // SAFETY: advice on the mapping just made; failure changes nothing.
            unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(DaxError::Map {
            path: name,
            err: std::io::Error::other("mmap returned null"),
        })?;
        Ok(DaxDevice {
            base,
            len,
            persist,
            writable,
            devdax,
            pinned,
            _file: file,
            persist_log: None,
            unfenced: Vec::new(),
        })
    }

    /// A second mapping of the same memory, for another thread: each thread writes only
    /// the segments (and control slots) of its own shards, through its own mapping.
    pub fn map_again(&self) -> Result<Self, DaxError> {
        let file = self._file.try_clone().map_err(|err| DaxError::Open {
            path: "(mapped cache)".into(),
            err,
        })?;
        Self::map(
            file,
            self.len,
            self.writable,
            self.devdax,
            "(mapped cache)".into(),
        )
    }

    pub fn persistence(&self) -> Persist {
        self.persist
    }

    /// The whole mapping, when its pages stay where they are while it is mapped (devdax,
    /// hugetlbfs): then a device may transfer to and from it directly, once it is
    /// registered with the I/O layer. tmpfs pages may be migrated and a DAX filesystem's
    /// blocks moved under a live mapping, so those are not offered.
    pub fn pinned_region(&self) -> Option<(NonNull<u8>, usize)> {
        self.pinned.then_some((self.base, self.len))
    }

    /// The address of `bytes` bytes at `sector` of the mapping (None: out of range).
    pub fn addr(&self, sector: u64, bytes: usize) -> Option<NonNull<u8>> {
        let start = self.range(sector, bytes).ok()?;
        // SAFETY: `start` is inside the mapping (checked by `range`), so the pointer is
        // in bounds of the same allocation and not null.
        Some(unsafe { self.base.add(start) })
    }

    /// Whether this is real persistent memory (else writes are made durable with msync).
    pub fn is_persistent_memory(&self) -> bool {
        matches!(self.persist, Persist::Cpu(_))
    }

    /// One line for logs: what was mapped and how it persists.
    pub fn describe(&self) -> String {
        match self.persist {
            Persist::Cpu(i) => format!(
                "persistent memory, {} MiB mapped, persisted with {i:?} + SFENCE",
                self.len >> 20
            ),
            Persist::Msync => format!(
                "NOT persistent memory: an ordinary file, {} MiB mapped, persisted with msync \
                 (for tests and trials; no DAX speed)",
                self.len >> 20
            ),
            Persist::Ram => format!(
                "NOT persistent memory: a file in RAM (tmpfs or hugetlbfs), {} MiB mapped; \
                 survives a process crash, not a power loss (for tests and benchmarks)",
                self.len >> 20
            ),
        }
    }

    fn range(&self, sector: u64, bytes: usize) -> Result<usize, IoError> {
        let start = usize::try_from(sector)
            .ok()
            .and_then(|s| s.checked_mul(512))
            .ok_or(IoError::Device)?;
        match start.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(IoError::Device),
        }
    }

    /// Starts loading `bytes` from `sector` into the CPU caches without waiting (for a read
    /// about to come: its misses then overlap the work before it). Out of range: nothing.
    pub fn prefetch(&self, sector: u64, bytes: usize) {
        let Ok(start) = self.range(sector, bytes) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        for off in (start..start + bytes).step_by(64) {
            // SAFETY: `off` is inside the mapping (checked by `range`); a prefetch reads
            // nothing architecturally and cannot fault.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    self.base.as_ptr().add(off).cast(),
                )
            };
        }
    }

    /// Writes `buf` at `sector` like [`BlockDevice::write`] but leaves the closing store
    /// fence to [`DaxDevice::fence`]: durable once that returns. Writes issued together
    /// then share one fence instead of each waiting for its own stores to drain. (With
    /// `Persist::Msync` there is no fence to share: durable when this returns.)
    pub fn write_unfenced(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError> {
        if !self.writable {
            return Err(IoError::Device);
        }
        let start = self.range(sector, buf.len())?;
        // SAFETY: `buf` is a Rust slice we were given, so it cannot alias the mapping.
        unsafe { self.store(start, buf.as_ptr(), buf.len()) }
    }

    /// Copies `sectors` sectors from `src` to `dst` within the mapping (a GC move of
    /// cached data), durable when this returns like [`BlockDevice::write`]: one pass over
    /// the data, where a read into a buffer and a write out of it make two. The ranges may
    /// not overlap.
    pub fn copy(&mut self, src: u64, dst: u64, sectors: u64) -> Result<(), IoError> {
        if !self.writable {
            return Err(IoError::Device);
        }
        let bytes = usize::try_from(sectors)
            .ok()
            .and_then(|s| s.checked_mul(512))
            .ok_or(IoError::Device)?;
        let (from, to) = (self.range(src, bytes)?, self.range(dst, bytes)?);
        if from < to + bytes && to < from + bytes {
            return Err(IoError::Device);
        }
        // SAFETY: `from..from+bytes` is inside the mapping (checked by `range`), and no
        // `&mut` to it exists while this shared slice lives (`store` writes elsewhere).
        let src = unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(from), bytes) };
        // No `load_ahead`: the streaming copy's loads run ahead of its stores on their own
        // (on an AMD Zen 4, a 4 KiB copy out of DRAM took 10-15 % longer after asking for
        // every line first).
        // SAFETY: the source lies inside the mapping and apart from the destination
        // (checked above).
        unsafe { self.store(to, src.as_ptr(), bytes)? };
        self.fence();
        Ok(())
    }

    /// Stores `len` bytes from `src` at byte `start` of the mapping (bounds-checked by the
    /// caller): durable at the next fence, or now with `Persist::Msync`.
    ///
    /// # Safety
    /// `src` points at `len` readable bytes that do not overlap `start..start+len`.
    unsafe fn store(&mut self, start: usize, src: *const u8, len: usize) -> Result<(), IoError> {
        // SAFETY: per the contract, and the destination is inside the writable mapping,
        // exclusively ours via &mut self.
        let (dst, src) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.base.as_ptr().add(start), len),
                std::slice::from_raw_parts(src, len),
            )
        };
        if self.persist == Persist::Msync {
            dst.copy_from_slice(src);
            return self.persist_range(start, len);
        }
        // Non-temporal stores bypass the CPU caches: no line to write back, only the fence
        // (and no read of the cold destination lines before writing them).
        if !copy_streaming(dst, src) {
            dst.copy_from_slice(src);
            self.write_back(start, len);
        }
        self.unfenced.push((start, len));
        Ok(())
    }

    /// Makes every [`DaxDevice::write_unfenced`] since the last fence durable.
    pub fn fence(&mut self) {
        if self.unfenced.is_empty() {
            return;
        }
        sfence();
        for i in 0..self.unfenced.len() {
            let (start, bytes) = self.unfenced[i];
            self.log_persist(start, bytes);
        }
        self.unfenced.clear();
    }

    /// Starts writing [start, start+bytes) back from the CPU caches (durable at the next
    /// fence); nothing to do for RAM.
    fn write_back(&mut self, start: usize, bytes: usize) {
        let Persist::Cpu(insn) = self.persist else {
            return;
        };
        let first = start & !(LINE - 1);
        let mut line = first;
        while line < start + bytes {
            // SAFETY: `line` is inside the mapping (start..start+bytes was bounds-checked,
            // and rounding down to a line stays above the page-aligned base).
            unsafe { flush_line(self.base.as_ptr().add(line), insn) };
            line += LINE;
        }
    }

    /// Makes [start, start+bytes) of the mapping durable.
    fn persist_range(&mut self, start: usize, bytes: usize) -> Result<(), IoError> {
        match self.persist {
            Persist::Cpu(_) => {
                self.write_back(start, bytes);
                sfence();
            }
            Persist::Ram => {}
            Persist::Msync => {
                let page = 4096;
                let first = start & !(page - 1);
                let end = (start + bytes).div_ceil(page) * page;
                let end = end.min(self.len);
                // SAFETY: the page range lies inside the mapping we own.
                let rc = unsafe {
                    libc::msync(
                        self.base.as_ptr().add(first).cast(),
                        end - first,
                        libc::MS_SYNC,
                    )
                };
                if rc != 0 {
                    return Err(IoError::Device);
                }
            }
        }
        self.log_persist(start, bytes);
        Ok(())
    }

    fn log_persist(&mut self, start: usize, bytes: usize) {
        if let Some(log) = self.persist_log.as_mut() {
            log.push(PersistEvent {
                sector: (start / 512) as u64,
                sectors: bytes.div_ceil(512) as u64,
            });
        }
    }
}

/// Asks for every line of `src` at once, before a read copies it out: the hardware
/// prefetcher ramps up per stream and stops at 4 KiB page edges, which cached data at
/// 512-byte offsets straddles (measured: +8% random 4 KiB read hits through bdevperf).
fn load_ahead(src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in src.chunks(LINE) {
        // SAFETY: a prefetch reads nothing architecturally and cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = src;
}

/// Copies `src` into `dst` with non-temporal stores when both suit them (at least 256
/// bytes, a multiple of 64, `dst` 16-byte aligned); returns false, copying nothing,
/// otherwise. The caller fences.
#[cfg(target_arch = "x86_64")]
fn copy_streaming(dst: &mut [u8], src: &[u8]) -> bool {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let n = dst.len();
    if n != src.len() || n < 256 || n % 64 != 0 || (dst.as_ptr() as usize) % 16 != 0 {
        return false;
    }
    let d = dst.as_mut_ptr().cast::<__m128i>();
    let s = src.as_ptr().cast::<__m128i>();
    for i in (0..n / 16).step_by(4) {
        // SAFETY: SSE2 is part of x86_64. i+3 < n/16, so every 16-byte load and store is
        // inside `src` / `dst` (distinct slices); `dst` is 16-byte aligned as streaming
        // stores require, loads are unaligned ones.
        unsafe {
            let a = _mm_loadu_si128(s.add(i));
            let b = _mm_loadu_si128(s.add(i + 1));
            let c = _mm_loadu_si128(s.add(i + 2));
            let e = _mm_loadu_si128(s.add(i + 3));
            _mm_stream_si128(d.add(i), a);
            _mm_stream_si128(d.add(i + 1), b);
            _mm_stream_si128(d.add(i + 2), c);
            _mm_stream_si128(d.add(i + 3), e);
        }
    }
    true
}

#[cfg(not(target_arch = "x86_64"))]
fn copy_streaming(_dst: &mut [u8], _src: &[u8]) -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
/// # Safety
/// `p` must point into mapped memory.
unsafe fn flush_line(p: *const u8, insn: FlushInsn) {
    // SAFETY: the caller guarantees `p` is mapped; these instructions only write the line
    // back from the CPU caches and have no other effect on memory.
    unsafe {
        match insn {
            FlushInsn::Clwb => std::arch::asm!("clwb [{}]", in(reg) p, options(nostack)),
            FlushInsn::Clflushopt => {
                std::arch::asm!("clflushopt [{}]", in(reg) p, options(nostack))
            }
            FlushInsn::Clflush => std::arch::x86_64::_mm_clflush(p),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
/// # Safety
/// `p` must point into mapped memory.
unsafe fn flush_line(_p: *const u8, _insn: FlushInsn) {}

fn sfence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE only orders stores; it touches no memory.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The magic number of the filesystem `file` lives on.
fn fs_magic(file: &File) -> Option<i64> {
    // SAFETY: statfs is plain old data; fstatfs fills it for an open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is open for the duration of the call and `st` is a valid out-pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// A devdax device's size, from sysfs.
fn devdax_size(rdev: u64) -> u64 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/char/{major}:{minor}/size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for DaxDevice {
    fn drop(&mut self) {
        self.fence();
        // SAFETY: unmapping exactly the mapping this value created; nothing refers to it
        // after drop.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl BlockDevice for DaxDevice {
    fn sectors(&self) -> u64 {
        (self.len / 512) as u64
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let start = self.range(sector, buf.len())?;
        // SAFETY: start..start+len is inside the mapping (checked by `range`); the mapping
        // outlives this call and `buf` cannot alias it (it is a Rust slice we were given).
        let src = unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(start), buf.len()) };
        load_ahead(src);
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError> {
        self.write_unfenced(sector, buf)?;
        self.fence();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        // Every write was persisted before it returned.
        Ok(())
    }

    fn write_zeroes(&mut self, sector: u64, sectors: u64) -> Result<(), IoError> {
        if !self.writable {
            return Err(IoError::Device);
        }
        let bytes = usize::try_from(sectors * 512).map_err(|_| IoError::Device)?;
        let start = self.range(sector, bytes)?;
        // SAFETY: as in `write`.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(start), bytes) };
        dst.fill(0);
        self.persist_range(start, bytes)
    }
}

/// Opens a path for the offline tool: a char device through DAX, anything else as a file.
pub fn is_char_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn streaming_copy_copies_exactly_and_refuses_what_it_cannot_do() {
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u64; 1024 + 8];
        // SAFETY: viewing a u64 buffer (8-aligned, so offset 8 is 16-aligned or not) as bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), 8256) };
        let off = if (bytes.as_ptr() as usize) % 16 == 0 {
            0
        } else {
            8
        };
        assert!(copy_streaming(&mut bytes[off..off + 4096], &src[..4096]));
        sfence();
        assert_eq!(&bytes[off..off + 4096], &src[..4096]);
        assert!(
            !copy_streaming(&mut bytes[off..off + 100], &src[..100]),
            "too short"
        );
        assert!(
            !copy_streaming(&mut bytes[off + 8..off + 520], &src[..512]),
            "unaligned"
        );
    }

    /// The write-back instructions are legal on any memory: run each one this CPU has.
    #[test]
    fn flush_instructions_run_on_ordinary_memory() {
        let buf = vec![7u8; 4096];
        let best = FlushInsn::detect();
        let mut insns = vec![FlushInsn::Clflush];
        if matches!(best, FlushInsn::Clwb | FlushInsn::Clflushopt) {
            insns.push(FlushInsn::Clflushopt);
        }
        if best == FlushInsn::Clwb {
            insns.push(FlushInsn::Clwb);
        }
        for insn in insns {
            for line in (0..buf.len()).step_by(LINE) {
                // SAFETY: every line address is inside `buf`, which lives across the loop.
                unsafe { flush_line(buf.as_ptr().add(line), insn) };
            }
            sfence();
        }
        assert!(
            buf.iter().all(|&b| b == 7),
            "write-back leaves the data as it was"
        );
    }
}
