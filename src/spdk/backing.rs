//! What the backing bdev does with FLUSH (see `crate::shell::backing`): the SPDK facts the
//! decision needs, read on the app thread at create.

use std::ffi::CStr;

use super::ffi;
use crate::shell::backing::BackingFacts;

/// `spdk_bdev_nvme_get_opts`, looked up at run time: the NVMe bdev module is part of
/// spdk_tgt and bdevperf, but linking it would make libpcache.so depend on it everywhere.
type NvmeGetOpts = unsafe extern "C" fn(*mut ffi::spdk_bdev_nvme_opts, usize);

/// Reads the facts about `bdev`, an open base bdev (app thread).
///
/// The module name is compared with "nvme" on purpose: the generic bdev API cannot tell an
/// honoured FLUSH from the NVMe module's no-op (it reports FLUSH supported either way), and
/// `enable_flush` is that module's own option. It cannot change while any NVMe controller is
/// attached (`bdev_nvme_set_options` then fails with EPERM), so reading it once is enough.
pub(crate) fn facts(bdev: *mut ffi::spdk_bdev) -> BackingFacts {
    // SAFETY: `bdev` is open (caller); these read fields of a live bdev and, for the module
    // name, a static string.
    let (write_cache, flush_supported, module) = unsafe {
        let m = ffi::spdk_bdev_get_module_name(bdev);
        (
            ffi::spdk_bdev_has_write_cache(bdev),
            ffi::spdk_bdev_io_type_supported(bdev, ffi::spdk_bdev_io_type::SPDK_BDEV_IO_TYPE_FLUSH),
            (!m.is_null()).then(|| CStr::from_ptr(m).to_bytes() == b"nvme"),
        )
    };
    BackingFacts {
        write_cache,
        flush_supported,
        nvme_enable_flush: (module == Some(true)).then(nvme_enable_flush),
    }
}

/// The NVMe bdev module's `enable_flush`, or None if its options cannot be read.
fn nvme_enable_flush() -> Option<bool> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks the symbol up.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"spdk_bdev_nvme_get_opts".as_ptr()) };
    if sym.is_null() {
        return None;
    }
    // SAFETY: the symbol is SPDK v26.05's `void spdk_bdev_nvme_get_opts(struct
    // spdk_bdev_nvme_opts *, size_t)` (include/spdk/module/bdev/nvme.h), whose struct
    // bindgen generated from the same header.
    let get: NvmeGetOpts = unsafe { std::mem::transmute::<*mut libc::c_void, NvmeGetOpts>(sym) };
    // SAFETY: all-zero is a valid value of this plain C struct; the call fills in the
    // fields that fit in the size we pass.
    let mut opts: ffi::spdk_bdev_nvme_opts = unsafe { std::mem::zeroed() };
    // SAFETY: `opts` is valid and writable for its full size.
    unsafe { get(&mut opts, std::mem::size_of::<ffi::spdk_bdev_nvme_opts>()) };
    Some(opts.enable_flush)
}
