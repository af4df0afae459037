//! The `spdk_bdev_module` "pcache" and its registration at load time.
//!
//! SPDK v26.05 has no plugin loader: `libpcache.so` is LD_PRELOADed into a stock SPDK app
//! built with shared libraries, and a constructor adds the module to the bdev layer's list
//! and registers our RPC methods before `main` runs (what `SPDK_BDEV_MODULE_REGISTER` and
//! `SPDK_RPC_REGISTER` do in C).

use std::cell::UnsafeCell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{ffi, io, rpc, vbdev};

/// The module struct lives in a static: SPDK links it into its module list and writes its
/// `internal` fields, so it needs a stable address and interior mutability.
struct ModuleCell(UnsafeCell<ffi::spdk_bdev_module>);

// SAFETY: after registration only SPDK touches the struct (its `internal` fields, under its
// own locks); Rust code only ever takes its address.
unsafe impl Sync for ModuleCell {}

static MODULE: ModuleCell = ModuleCell(UnsafeCell::new(new_module()));

/// Set by `fini_start`: the app is shutting down and the bdev layer unregisters every bdev.
static FINISHING: AtomicBool = AtomicBool::new(false);

const fn new_module() -> ffi::spdk_bdev_module {
    // SAFETY: an all-zero spdk_bdev_module is valid: null pointers, `None` callbacks, false
    // flags, zeroed internals (SPDK initializes them in spdk_bdev_module_list_add).
    let mut m: ffi::spdk_bdev_module = unsafe { std::mem::zeroed() };
    m.name = c"pcache".as_ptr();
    m.module_init = Some(module_init);
    m.fini_start = Some(fini_start);
    m.module_fini = Some(module_fini);
    m.get_ctx_size = Some(get_ctx_size);
    m
}

/// Our module, for `bdev.module`, claims and `spdk_bdev_unregister_by_name`.
pub(crate) fn module() -> *mut ffi::spdk_bdev_module {
    MODULE.0.get()
}

pub(crate) fn finishing() -> bool {
    FINISHING.load(Ordering::Relaxed)
}

// Life before main: keep this to FFI registration calls only (no std I/O, nothing that
// can panic).
#[ctor::ctor(unsafe)]
fn register_pcache_module() {
    // SAFETY: `module()` points at a static that lives for the whole process; libspdk_bdev
    // is loaded (it is our DT_NEEDED dependency) and its constructors ran before ours.
    unsafe { ffi::spdk_bdev_module_list_add(module()) };
    rpc::register_methods();
}

unsafe extern "C" fn module_init() -> c_int {
    FINISHING.store(false, Ordering::Relaxed);
    0
}

unsafe extern "C" fn fini_start() {
    FINISHING.store(true, Ordering::Relaxed);
}

unsafe extern "C" fn module_fini() {
    // Every pcache bdev has been unregistered (and destructed) by now.
    vbdev::registry_clear();
}

unsafe extern "C" fn get_ctx_size() -> c_int {
    std::mem::size_of::<io::IoCtx>() as c_int
}
