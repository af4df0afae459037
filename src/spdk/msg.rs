//! Messages between SPDK threads: closures for the control path (create, delete, stats,
//! stop), sent with `spdk_thread_send_msg`. The I/O path uses plain function messages with
//! the `spdk_bdev_io` as argument instead (no allocation per request).

use std::ffi::c_void;

use super::ffi;
use super::log::no_unwind;

type Thunk = Box<dyn FnOnce()>;

unsafe extern "C" fn run_thunk(arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<Thunk>` leaked by `send`, delivered exactly once.
    let f = unsafe { Box::from_raw(arg.cast::<Thunk>()) };
    no_unwind("thread message", (), f);
}

/// Run `f` on `thread` (later, from its message queue; messages from one thread to another
/// arrive in the order they were sent). On failure (SPDK's message pool is exhausted) `f` is
/// dropped without running and `Err` is returned: the caller must answer whatever `f` would
/// have answered.
pub(crate) fn send(thread: *mut ffi::spdk_thread, f: impl FnOnce() + 'static) -> Result<(), ()> {
    let raw = Box::into_raw(Box::new(Box::new(f) as Thunk));
    // SAFETY: `thread` is a live SPDK thread (callers hold it for the lifetime of the bdev);
    // `run_thunk` takes ownership of `raw` when the message runs.
    let rc = unsafe { ffi::spdk_thread_send_msg(thread, Some(run_thunk), raw.cast()) };
    if rc != 0 {
        // SAFETY: the message was not queued, so `raw` is still ours.
        drop(unsafe { Box::from_raw(raw) });
        return Err(());
    }
    Ok(())
}

/// The current SPDK thread (null outside SPDK threads).
pub(crate) fn current() -> *mut ffi::spdk_thread {
    // SAFETY: plain getter of thread-local state.
    unsafe { ffi::spdk_get_thread() }
}
