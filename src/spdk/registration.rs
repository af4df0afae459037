//! What the bdev layer knows pcache by: the one `spdk_bdev_module` "pcache", a static SPDK
//! links into its module list, and the module-wide shutdown flag.
//!
//! Per-bdev code (`vbdev`: claims, `bdev.module`, unregister) and the module's callbacks
//! (`module`) both need it, so it sits below both and calls nothing above: `module` fills
//! in its callbacks at load time ([`register`]).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

use super::ffi;

/// The module struct lives in a static: SPDK links it into its module list and writes its
/// `internal` fields, so it needs a stable address and interior mutability.
struct ModuleCell(UnsafeCell<ffi::spdk_bdev_module>);

// SAFETY: after registration only SPDK touches the struct (its `internal` fields, under its
// own locks); Rust code only ever takes its address (`register` writes it once, before
// anything else knows it).
unsafe impl Sync for ModuleCell {}

static MODULE: ModuleCell = ModuleCell(UnsafeCell::new(named()));

/// Set by `fini_start`: the app is shutting down and the bdev layer unregisters every bdev.
static FINISHING: AtomicBool = AtomicBool::new(false);

const fn named() -> ffi::spdk_bdev_module {
    // SAFETY: an all-zero spdk_bdev_module is valid: null pointers, `None` callbacks, false
    // flags, zeroed internals (SPDK initializes them in spdk_bdev_module_list_add).
    let mut m: ffi::spdk_bdev_module = unsafe { std::mem::zeroed() };
    m.name = c"pcache".as_ptr();
    m
}

/// Fills in the module's callbacks with `fill`, then adds the module to the bdev layer's
/// list (what `SPDK_BDEV_MODULE_REGISTER` does in C).
///
/// # Safety
/// Called once, at load time (from a constructor), before SPDK or any other thread knows
/// the module struct.
pub(crate) unsafe fn register(fill: impl FnOnce(&mut ffi::spdk_bdev_module)) {
    // SAFETY: per the contract nothing else accesses the struct yet: this borrow is unique.
    fill(unsafe { &mut *MODULE.0.get() });
    // SAFETY: `module()` points at a static that lives for the whole process; libspdk_bdev
    // is loaded (it is our DT_NEEDED dependency) and its constructors ran before ours.
    unsafe { ffi::spdk_bdev_module_list_add(module()) };
}

/// Our module, for `bdev.module`, claims and `spdk_bdev_unregister_by_name`.
pub(crate) fn module() -> *mut ffi::spdk_bdev_module {
    MODULE.0.get()
}

/// The app is shutting down (between `fini_start` and the next `module_init`).
pub(crate) fn finishing() -> bool {
    FINISHING.load(Ordering::Relaxed)
}

pub(crate) fn set_finishing(on: bool) {
    FINISHING.store(on, Ordering::Relaxed);
}
