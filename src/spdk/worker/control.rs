//! Messages from the app thread to a bdev's workers (the control path of `vbdev` and
//! `rpc`): statistics, drain, flush start and status, writeback options, base removal and
//! stop. Each runs at the top level of the lead's thread and reaches the team by message.
//!
//! Called from above (`vbdev`, `rpc`); calls the team and `msg` below.

use serde_json::Value;

use super::team::{self, Gather};
use super::{dev_index, Done, Peer, SendPtr, Worker};
use crate::engine::{Cache, Dev, ReqError};
use crate::shell::config::Live;
use crate::shell::stats::{flush_status_json, render_stats, FlushPart};
use crate::spdk::ffi;
use crate::spdk::log::spdk_log;
use crate::spdk::msg;

/// Runs `f` on the worker at the top level of its thread. Err if the message cannot be sent.
pub(super) fn with_worker(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    f: impl FnOnce(&mut Worker) + 'static,
) -> Result<(), ()> {
    let p = SendPtr(worker);
    msg::send(thread, move || {
        // SAFETY: the worker lives until its teardown, which only follows a stop; callers
        // send no message after the stop message (same sender, FIFO delivery).
        let e = unsafe { &mut *p.0 };
        // Requests received before this message are handled before it.
        e.submit_incoming();
        f(e)
    })
}

/// Every worker of the team `e` leads (itself alone when it has none).
pub(super) fn members(e: &Worker) -> Vec<Peer> {
    if e.team.peers.is_empty() {
        vec![e.peer()]
    } else {
        e.team.peers.to_vec()
    }
}

/// Runs `f` on every worker of the lead's team (each on its thread), then `then` with the
/// results, on the thread of the last one to answer. A member that cannot be reached
/// counts as `missing`.
pub(super) fn on_team<T: 'static>(
    e: &Worker,
    f: impl Fn(&mut Worker) -> T + Clone + 'static,
    missing: impl Fn() -> T,
    then: impl FnOnce(Vec<T>) + 'static,
) {
    let peers = members(e);
    let g = Gather::new(peers.len(), then);
    for p in peers {
        let (g2, f) = (g.clone(), f.clone());
        if team::send(p, move |w| Gather::put(&g2, f(w))).is_err() {
            Gather::put(&g, missing());
        }
    }
}

/// Gathers the statistics of every worker; `done` runs on the app thread.
pub(crate) fn stats(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    done: Box<dyn FnOnce(Value)>,
) -> Result<(), ()> {
    with_worker(thread, worker, move |e| {
        let (app, name) = (e.app_thread, e.name.clone());
        on_team(
            e,
            |w| Some(w.stats_part()),
            || None,
            move |parts| {
                let v = render_stats(parts.into_iter().flatten().collect());
                if msg::send(app, move || done(v)).is_err() {
                    spdk_log!(ERROR, "{name}: cannot return stats to the app thread");
                }
            },
        );
    })
}

/// Writes back everything dirty; `done` runs on the app thread once every worker's cache
/// is clean (or writeback failed).
pub(crate) fn drain(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    done: Done,
) -> Result<(), ()> {
    with_worker(thread, worker, move |e| {
        let peers = members(e);
        let g = Gather::new(peers.len(), move |rs: Vec<Result<(), String>>| {
            done(rs.into_iter().find(Result::is_err).unwrap_or(Ok(())));
        });
        for p in peers {
            let g2 = g.clone();
            let sent = team::send(p, move |w| {
                if let Some(c) = w.cache.as_deref_mut() {
                    c.retry_writeback();
                }
                // Answered on the app thread by the worker's housekeeping.
                w.drain_waiters.push(Box::new(move |r| Gather::put(&g2, r)));
            });
            if sent.is_err() {
                Gather::put(&g, Err("cannot reach an engine thread".into()));
            }
        }
    })
}

/// Starts writing back everything dirty (`bdev_pcache_flush_start`).
pub(crate) fn flush_start(thread: *mut ffi::spdk_thread, worker: *mut Worker) -> Result<(), ()> {
    with_worker(thread, worker, |e| {
        for p in members(e) {
            let _ = team::send(p, |w| {
                if let Some(c) = w.cache.as_deref_mut() {
                    c.retry_writeback();
                }
                w.flushing = true;
            });
        }
    })
}

/// Writeback progress (`bdev_pcache_flush_status`); `done` runs on the app thread.
pub(crate) fn flush_status(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    done: Box<dyn FnOnce(Value)>,
) -> Result<(), ()> {
    with_worker(thread, worker, move |e| {
        let (app, name) = (e.app_thread, e.name.clone());
        on_team(
            e,
            |w| w.flush_part(),
            || FlushPart::UNREACHABLE,
            move |parts| {
                let v = flush_status_json(&parts);
                if msg::send(app, move || done(v)).is_err() {
                    spdk_log!(ERROR, "{name}: cannot return flush status");
                }
            },
        );
    })
}

/// Changes writeback pacing, gc_percent, the mode and the sequential cut-off: `f` maps the
/// current options to the new ones (or an error); `done` runs on the app thread with the
/// options in effect. The lead decides; the other workers take the same options.
pub(crate) fn set_options(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    f: impl FnOnce(Live) -> Result<Live, String> + 'static,
    done: Box<dyn FnOnce(Result<Live, String>)>,
) -> Result<(), ()> {
    with_worker(thread, worker, move |e| {
        let r = match e.cache.as_deref_mut() {
            None => Err("the cache is not running".to_string()),
            Some(c) => f(live_options(c)).and_then(|o| {
                apply_live(c, o)
                    .map(|()| live_options(c))
                    .map_err(|err| err.to_string())
            }),
        };
        e.kick = true;
        if let Ok(o) = r {
            for p in members(e).into_iter().skip(1) {
                let _ = team::send(p, move |w| {
                    if let Some(c) = w.cache.as_deref_mut() {
                        // Validated by the lead.
                        let _ = apply_live(c, o);
                    }
                    w.kick = true;
                });
            }
        }
        if msg::send(e.app_thread, move || done(r)).is_err() {
            spdk_log!(ERROR, "{}: cannot answer set_options", e.name);
        }
    })
}

/// A cache's options that `set_options` changes.
pub(crate) fn live_options(c: &Cache) -> Live {
    Live {
        wb: c.writeback_options(),
        mode: c.mode(),
        seq_cutoff: c.seq_cutoff(),
        write_admission: c.write_admission(),
    }
}

fn apply_live(c: &mut Cache, o: Live) -> Result<(), ReqError> {
    c.set_writeback_options(o.wb)?;
    c.set_seq_cutoff(o.seq_cutoff)?;
    c.set_mode(o.mode);
    c.set_write_admission(o.write_admission);
    Ok(())
}

/// A base bdev is being removed: fail every command for it from now on.
pub(crate) fn base_removed(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    dev: Dev,
) -> Result<(), ()> {
    with_worker(thread, worker, move |e| {
        for p in members(e) {
            let _ = team::send(p, move |w| {
                w.removed[dev_index(dev)] = true;
                w.kick = true;
            });
        }
    })
}

/// Stops every worker (after writing back everything when `drain`), releases their
/// channels and exits their threads, the lead last; `done` runs on the app thread
/// afterwards (Err if a drain failed).
pub(crate) fn stop(
    thread: *mut ffi::spdk_thread,
    worker: *mut Worker,
    drain: bool,
    done: Done,
) -> Result<(), ()> {
    with_worker(thread, worker, move |e| {
        e.stop_done = Some(done);
        e.begin_stop(drain);
        e.stop_followers(drain);
    })
}
