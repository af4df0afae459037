//! One SPDK post-poller handler per reactor for all of pcache's channels: the channels of
//! the SPDK thread that registered it, whose batches wait for the poller that submitted
//! them to return (`Channel::serve_after_poller`).
//!
//! SPDK keeps at most 4 post-poller handlers per thread and refuses (with an error log)
//! any registration while its handlers run. A handler per channel overflowed that as soon
//! as one poller submitted to more than 4 pcache bdevs (a RAID0 over 6 of them logged
//! "Too many handlers registered" on every request), and a completion delivered inside one
//! handler that submitted to another bdev was refused too. So one handler serves every
//! channel in [`Pending`], and requests submitted while it runs join it.
//!
//! Thread-local per OS thread (a reactor), tagged with the SPDK thread whose handler is
//! registered: SPDK threads of one reactor are polled one at a time, and a channel of
//! another SPDK thread meanwhile (a registration made by a timed poller runs only in the
//! next round) is left to its own channel poller.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::ptr;

use super::{serve_local, Channel};
use crate::spdk::ffi;
use crate::spdk::log::no_unwind;
use crate::spdk::msg;

/// Rounds [`drain`] serves at most: the later ones serve what the completions of the
/// earlier ones submitted (over a mapped cache, hits complete inline).
const SERVE_ROUNDS: usize = 4;

struct Pending {
    /// The SPDK thread whose handler is registered and has not run yet (null: none).
    thread: Cell<*mut ffi::spdk_thread>,
    /// Its channels with requests waiting (each has `after_poller` set).
    channels: RefCell<Vec<*const Channel>>,
}

thread_local! {
    static PENDING: Pending = const {
        Pending {
            thread: Cell::new(ptr::null_mut()),
            channels: RefCell::new(Vec::new()),
        }
    };
}

/// Has `chan` (of the current SPDK thread, with requests in its batch) served once the
/// running poller returns. False: it cannot be (another SPDK thread of this reactor has
/// the handler); its channel poller serves it.
pub(super) fn enqueue(chan: &Channel) -> bool {
    let me = msg::current();
    PENDING.with(|p| {
        let t = p.thread.get();
        if t.is_null() {
            // SAFETY: registers on the current thread; `drain` reads only the channels
            // listed, each alive while listed (`forget` at its destruction).
            unsafe {
                ffi::spdk_thread_register_post_poller_handler(Some(handler), ptr::null_mut())
            };
            p.thread.set(me);
        } else if t != me {
            return false;
        }
        p.channels.borrow_mut().push(chan);
        true
    })
}

/// `chan` is being destroyed: no longer listed.
pub(super) fn forget(chan: *const Channel) {
    PENDING.with(|p| p.channels.borrow_mut().retain(|&c| c != chan));
}

/// Serves every listed channel's batch, then the batches their completions filled, up to
/// [`SERVE_ROUNDS`], and ends the registration; what is left waits for the channels'
/// pollers. Called by the handler, and by a channel's poller that finds its channel still
/// listed (its handler pending, or never run if SPDK refused it: a drain makes the late
/// handler find nothing). True if it served any request.
pub(super) fn drain() -> bool {
    PENDING.with(|p| {
        if p.thread.get() != msg::current() {
            return false;
        }
        let mut served = false;
        for _ in 0..SERVE_ROUNDS {
            let mut any = false;
            // By index: serving may list more channels (borrowed only to read one).
            for i in 0.. {
                let Some(c) = p.channels.borrow().get(i).copied() else {
                    break;
                };
                // SAFETY: listed channels are alive (`forget`) and belong to this thread.
                any |= serve_local(unsafe { &*c });
            }
            if !any {
                break;
            }
            served = true;
        }
        for c in p.channels.borrow_mut().drain(..) {
            // SAFETY: as above.
            unsafe { (*c).after_poller.set(false) };
        }
        p.thread.set(ptr::null_mut());
        served
    })
}

unsafe extern "C" fn handler(_arg: *mut c_void) {
    no_unwind("pcache serve after poller", (), || {
        drain();
    })
}
