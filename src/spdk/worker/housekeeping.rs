//! Housekeeping, the slow (1 ms) poller: unsent completions, idleness (which paces
//! writeback), drains and flushes, resets, requests stranded by a removed base bdev, and
//! the signal to tear down once stopped.
//!
//! Calls the pump, the reply side and the team; nothing above the worker.

use std::ffi::{c_int, c_void};

use super::reply::{send_completion, Reply};
use super::{State, Worker};
use crate::engine::Cache;
use crate::spdk::ffi::{self, spdk_bdev_io_status as st};
use crate::spdk::log::{no_unwind, spdk_log};
use crate::spdk::msg;

/// Milliseconds since an arbitrary start (SPDK's tick counter).
fn now_ms() -> u64 {
    // SAFETY: plain reads of the environment's tick counter and its rate.
    let (ticks, hz) = unsafe { (ffi::spdk_get_ticks(), ffi::spdk_get_ticks_hz()) };
    (u128::from(ticks) * 1000 / u128::from(hz.max(1))) as u64
}

/// Slow polls (1 ms each) without a request before the cache counts as idle.
pub(super) const IDLE_POLLS: u32 = 10;
pub(super) const SLOW_POLL_US: u64 = 1000;
/// Slow polls after a base bdev removal before stranded requests are failed.
pub(super) const ABANDON_POLLS: u32 = 100;

impl Worker {
    // ---- housekeeping (slow poller) ----

    pub(super) fn writeback_failed(&self) -> bool {
        self.cache
            .as_deref()
            .is_some_and(|c| c.shards().iter().any(|s| s.writeback_failed()))
    }

    pub(super) fn housekeeping(&mut self) -> bool {
        let mut busy = false;
        // The engine's clock: paces retries of failed device I/O and bounds request waits.
        if let Some(c) = self.cache.as_deref_mut() {
            c.set_now(now_ms());
        }
        self.report_frontier();
        if !self.unsent.is_empty() {
            let mut keep = Vec::new();
            for io in self.unsent.drain(..) {
                if !send_completion(io) {
                    keep.push(io);
                }
            }
            self.unsent = keep;
            busy = true;
        }
        if matches!(self.state, State::Running | State::Draining) {
            // Idleness: no request for IDLE_POLLS slow polls.
            if self.counters.requests == self.seen {
                self.quiet_polls = self.quiet_polls.saturating_add(1);
                if !self.idle && self.quiet_polls >= IDLE_POLLS {
                    self.idle = true;
                    if let Some(c) = self.cache.as_deref_mut() {
                        c.set_idle(true);
                    }
                }
            } else {
                self.seen = self.counters.requests;
                self.quiet_polls = 0;
            }
            let want =
                self.flushing || !self.drain_waiters.is_empty() || self.state == State::Draining;
            if want != self.drain_on {
                self.drain_on = want;
                if let Some(c) = self.cache.as_deref_mut() {
                    c.set_drain(want);
                }
            }
            busy |= self.pump();
            let clean = self.cache.as_deref().is_none_or(Cache::is_clean);
            let failed = self.writeback_failed();
            if clean || failed {
                let res = if clean {
                    Ok(())
                } else {
                    Err("writeback has failed for longer than io_timeout_ms (a device error, see the log): dirty data stays in the cache and writeback keeps retrying".to_string())
                };
                if self.flushing {
                    self.flushing = false;
                    spdk_log!(
                        NOTICE,
                        "{}: flush {}",
                        self.name,
                        if clean {
                            "complete: the backing bdev holds every write"
                        } else {
                            "stopped: writeback failed"
                        }
                    );
                }
                for w in self.drain_waiters.drain(..) {
                    let r = res.clone();
                    if msg::send(self.app_thread, move || w(r)).is_err() {
                        spdk_log!(ERROR, "{}: cannot answer a drain", self.name);
                    }
                }
                if self.state == State::Draining {
                    if !clean {
                        self.open_error = res.err();
                    }
                    self.state = State::Quiescing;
                }
            }
            if self.removed.iter().any(|&r| r) && self.reqs.live > 0 {
                // Requests waiting for a device that is gone (e.g. for cache space that
                // writeback can no longer free) would hold up the unregistration forever.
                self.removed_polls += 1;
                if self.removed_polls >= ABANDON_POLLS {
                    self.fail_all_requests();
                }
            }
            self.finish_resets();
        }
        busy
    }

    /// Completes the resets waiting here once no request is in flight (the bdev layer
    /// holds new ones back until they complete; see `reset_io_drain_timeout`).
    pub(super) fn finish_resets(&mut self) {
        if !self.resets.is_empty()
            && self.reqs.live + self.direct_live == 0
            && self.inbox.held() == 0
        {
            for io in std::mem::take(&mut self.resets) {
                self.finish_io(io, st::SPDK_BDEV_IO_STATUS_SUCCESS, Reply::Inbox);
            }
        }
    }

    /// Fails every pending request whose buffer no device I/O uses; the worker's later
    /// commands or completions for them find no live slot and are dropped.
    pub(super) fn fail_all_requests(&mut self) {
        let stuck: Vec<u32> = (0..self.reqs.slots.len() as u32)
            .filter(|&i| {
                let s = &self.reqs.slots[i as usize];
                s.live && s.refs == 0
            })
            .collect();
        if !stuck.is_empty() {
            spdk_log!(
                ERROR,
                "{}: failing {} request(s) stranded by a removed base bdev",
                self.name,
                stuck.len()
            );
        }
        for idx in stuck {
            self.counters.requests_failed += 1;
            let (io, reply) = self.reqs.remove(idx);
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
        }
    }
}

pub(super) unsafe extern "C" fn slow_poll(arg: *mut c_void) -> c_int {
    no_unwind("pcache housekeeping poller", 0, || {
        let worker = arg.cast::<Worker>();
        // SAFETY: as in `fast_poll`.
        let e = unsafe { &mut *worker };
        let took = e.submit_incoming();
        if e.ready_to_free() {
            if e.is_follower() {
                // The lead ends the team (two-phase stop, see `team`).
                e.park();
                return ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int;
            }
            if !e.team_done() {
                e.report_frontier();
                return ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int;
            }
            // SAFETY: top level of a poller on the worker thread, nothing in flight.
            unsafe { Worker::teardown(worker) };
            return ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int;
        }
        if e.housekeeping() || took {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
        } else {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
        }
    })
}
