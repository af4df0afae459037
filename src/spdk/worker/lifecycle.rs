//! A worker's life: its SPDK thread and core, spawning the lead worker, the first message
//! (channels to the base bdevs, pollers), followers made for a team, stopping, and the
//! teardown that frees the worker and exits its thread.
//!
//! Owns thread creation and the [`Worker::teardown`] contract; calls the open driver
//! ([`open`](super::open)) to start, and `msg`/`ffi` below.

use std::ffi::CString;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::commands::fast_poll;
use super::housekeeping::{slow_poll, SLOW_POLL_US};
use super::reply::{send_completion, Reply};
use super::{OpenDone, OpenInfo, Peer, SendPtr, Setup, State, Worker, DEV_NAMES};
use crate::engine::Cache;
use crate::media::dax::DaxDevice;
use crate::spdk::ffi::{self, spdk_bdev_io_status as st};
use crate::spdk::log::spdk_log;
use crate::spdk::msg;

// ---- thread creation ----

pub(super) static NEXT_CORE: AtomicUsize = AtomicUsize::new(0);

/// A new SPDK thread bound to `want`, or to one core of the app's mask (round-robin from the
/// last core).
pub(super) fn create_thread(
    name: &str,
    want: Option<u32>,
) -> Result<(*mut ffi::spdk_thread, Option<u32>), String> {
    let cores = app_cores();
    let core = match (want, cores.len()) {
        (Some(c), _) if cores.contains(&c) => Some(c),
        (Some(c), _) => {
            return Err(format!(
                "core {c} is not one of the app's cores {cores:?} (spdk_tgt -m)"
            ))
        }
        (None, 0) => None,
        (None, len) => Some(cores[len - 1 - NEXT_CORE.fetch_add(1, Ordering::Relaxed) % len]),
    };
    // SAFETY: all-zero is a valid (empty) cpuset; the calls only write into it.
    let mut set: ffi::spdk_cpuset = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpuset.
    unsafe { ffi::spdk_cpuset_zero(&mut set) };
    if let Some(core) = core {
        // SAFETY: `set` is valid; `core` is one of the app's cores.
        unsafe { ffi::spdk_cpuset_set_cpu(&mut set, core, true) };
    }
    let cname = CString::new(format!("pcache_{name}")).map_err(|_| "bad thread name")?;
    // SAFETY: valid name and cpumask (copied by SPDK); an empty mask means "any core".
    let th = unsafe {
        ffi::spdk_thread_create(
            cname.as_ptr(),
            if core.is_some() { &set } else { ptr::null() },
        )
    };
    if th.is_null() {
        return Err("cannot create the engine thread (spdk_thread_create failed)".into());
    }
    Ok((th, core))
}

/// The app's cores (`-m`), in order.
pub(crate) fn app_cores() -> Vec<u32> {
    let mut cores = Vec::new();
    // SAFETY: plain queries of the environment's core list.
    let mut c = unsafe { ffi::spdk_env_get_first_core() };
    while c != u32::MAX && cores.len() < 4096 {
        cores.push(c);
        // SAFETY: as above.
        c = unsafe { ffi::spdk_env_get_next_core(c) };
    }
    cores
}

/// Cores for a team of `n` workers whose lead runs on `lead`: the app's cores in order
/// from the lead's, wrapping (None everywhere when the lead is not pinned).
pub(super) fn team_cores(lead: Option<u32>, n: usize) -> Vec<Option<u32>> {
    let cores = app_cores();
    let Some(at) = lead.and_then(|l| cores.iter().position(|&c| c == l)) else {
        return vec![None; n];
    };
    (0..n)
        .map(|k| Some(cores[(at + k) % cores.len()]))
        .collect()
}

/// Creates the worker thread and starts opening (or formatting) the cache there. `done`
/// runs on the app thread with the outcome; on `Ok` the worker is running and takes
/// requests, on `Err` it is gone (thread exited, channels released). The descriptors stay
/// open either way: the caller closes them.
pub(crate) fn spawn(setup: Setup, done: OpenDone) -> Result<Peer, String> {
    let (thread, core) = create_thread(&setup.name, setup.core)?;
    let mut e = Worker::new(setup);
    e.core = core;
    let inbox = std::rc::Rc::as_ptr(&e.inbox);
    let worker = Box::into_raw(Box::new(e));
    let p = SendPtr(worker);
    if msg::send(thread, move || Worker::start(p.0, done)).is_err() {
        // SAFETY: the message was not queued; nobody else knows `worker`.
        drop(unsafe { Box::from_raw(worker) });
        // The idle thread is exited by the reactor at shutdown.
        return Err("cannot send the start message to the engine thread".into());
    }
    Ok(Peer {
        thread,
        worker,
        wid: 0,
        core,
        inbox,
    })
}

impl Worker {
    /// First message on the worker thread: channels, pollers, then the opener.
    pub(super) fn start(worker: *mut Worker, done: OpenDone) {
        // SAFETY: `worker` was leaked by `spawn` and is only used on this thread from now on.
        let e = unsafe { &mut *worker };
        e.open_done = Some(done);
        if let Err(err) = e.attach_thread(worker) {
            e.open_error = Some(err);
            // SAFETY: top level of a message; nothing else borrows the worker.
            unsafe { Worker::teardown(worker) };
            return;
        }
        e.open_begin();
    }

    /// The base bdevs' channels and the pollers, on this worker's thread.
    pub(super) fn attach_thread(&mut self, worker: *mut Worker) -> Result<(), String> {
        for (i, role) in DEV_NAMES.iter().enumerate() {
            if self.desc[i].is_null() {
                continue; // the mapped cache
            }
            // SAFETY: open descriptor; we are on the thread that will use the channel.
            let ch = unsafe { ffi::spdk_bdev_get_io_channel(self.desc[i]) };
            if ch.is_null() {
                return Err(format!("cannot get an I/O channel to the {role} bdev"));
            }
            self.ch[i] = ch;
        }
        let fast_name = c"pcache_engine";
        let slow_name = c"pcache_housekeeping";
        // SAFETY: the worker outlives its pollers (unregistered in teardown, on this thread).
        unsafe {
            self.fast = ffi::spdk_poller_register_named(
                Some(fast_poll),
                worker.cast(),
                0,
                fast_name.as_ptr(),
            );
            self.slow = ffi::spdk_poller_register_named(
                Some(slow_poll),
                worker.cast(),
                SLOW_POLL_US,
                slow_name.as_ptr(),
            );
        }
        if self.fast.is_null() || self.slow.is_null() {
            return Err("cannot register the engine pollers".into());
        }
        Ok(())
    }

    /// Worker `k` of the team, to drive `part` (made on the lead's thread, started on its
    /// own by `start_follower`).
    pub(super) fn follower(&self, k: usize, part: Cache, dax: Option<DaxDevice>) -> Worker {
        let mut e = Worker::new(Setup {
            name: self.name.clone(),
            core: None,
            app_thread: self.app_thread,
            desc: self.desc,
            bdev: self.bdev,
            identity: self.identity.clone(),
            describe: self.describe.clone(),
            format: self.fopts.clone(),
            cache_options: self.copts.clone(),
            cache_bytes: self.cache_bytes,
            dax,
            workers: 1,
            zero_copy: self.zcopy,
        });
        e.wid = k;
        e.front_shift = super::front_shift_of(e.shift[1], &part);
        e.cache = Some(Box::new(part));
        e
    }

    /// A follower's first message: channels and pollers; then it takes requests.
    pub(super) fn start_follower(&mut self, worker: *mut Worker) -> Result<(), String> {
        self.attach_thread(worker)?;
        self.state = State::Running;
        self.kick = true;
        Ok(())
    }

    /// The cache is open and every worker runs: report to the app thread.
    pub(super) fn open_succeeded(&mut self, mut info: OpenInfo) {
        info.team = self.team.peers.clone();
        self.state = State::Running;
        self.kick = true;
        if let Some(done) = self.open_done.take() {
            if msg::send(self.app_thread, move || done(Ok(info))).is_err() {
                spdk_log!(
                    ERROR,
                    "{}: cannot report the open to the app thread",
                    self.name
                );
            }
        }
    }

    /// Stops taking work: drains first when `drain` (unless a base bdev is gone, so nothing
    /// could be written back), else only waits for device I/O in flight.
    pub(super) fn begin_stop(&mut self, drain: bool) {
        self.state = if drain && !self.removed.iter().any(|&r| r) {
            State::Draining
        } else {
            State::Quiescing
        };
        if let Some(c) = self.cache.as_deref_mut() {
            c.retry_writeback();
        }
    }

    pub(super) fn ready_to_free(&self) -> bool {
        self.state == State::Quiescing && self.inflight == 0
    }

    /// Frees the worker and exits its thread. Reports to `open_done` / `stop_done` on the
    /// app thread.
    ///
    /// # Safety
    /// On the worker thread, at the top level of a message or poller (nothing borrows the
    /// worker), with no device I/O in flight.
    pub(super) unsafe fn teardown(worker: *mut Worker) {
        // SAFETY: per the contract we own the worker now.
        let mut e = unsafe { Box::from_raw(worker) };
        for p in [&mut e.fast, &mut e.slow] {
            if !p.is_null() {
                // SAFETY: registered on this thread; unregistering from inside a poller is
                // allowed.
                unsafe { ffi::spdk_poller_unregister(p) };
            }
        }
        // Requests the worker still holds (a base bdev vanished under them) fail.
        e.fail_all_requests();
        for io in std::mem::take(&mut e.resets) {
            e.finish_io(io, st::SPDK_BDEV_IO_STATUS_SUCCESS, Reply::Inbox);
        }
        for io in std::mem::take(&mut e.unsent) {
            if !send_completion(io) {
                spdk_log!(ERROR, "{}: lost a request completion at teardown", e.name);
            }
        }
        for w in e.drain_waiters.drain(..) {
            let _ = msg::send(e.app_thread, move || {
                w(Err("the pcache bdev is going away".into()))
            });
        }
        for ch in e.ch {
            if !ch.is_null() {
                // SAFETY: obtained on this thread in `start`; no I/O in flight.
                unsafe { ffi::spdk_put_io_channel(ch) };
            }
        }
        e.cache = None;
        e.dio_free.clear();
        e.dma.clear();
        let app = e.app_thread;
        let name = std::mem::take(&mut e.name);
        let err = e.open_error.take().or_else(|| e.team.stop_error.take());
        let open_done = e.open_done.take();
        let stop_done = e.stop_done.take();
        drop(e);
        if let Some(d) = open_done {
            let err = err.clone().unwrap_or_else(|| "the engine stopped".into());
            if msg::send(app, move || d(Err(err))).is_err() {
                spdk_log!(ERROR, "{name}: cannot report the failed open");
            }
        }
        if let Some(d) = stop_done {
            let r = err.map_or(Ok(()), Err);
            if msg::send(app, move || d(r)).is_err() {
                spdk_log!(ERROR, "{name}: cannot report the engine stop");
            }
        }
        // SAFETY: we are on the worker thread (its pollers and channels are gone).
        unsafe { ffi::spdk_thread_exit(msg::current()) };
    }
}
