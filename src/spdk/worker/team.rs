//! A pcache bdev's team of worker threads, one per core by default.
//!
//! The lead worker (index 0) opens the cache, then [`Cache::split`]s it: worker `k` drives
//! the shards whose id is `k` modulo the team size, on its own SPDK thread with its own base
//! bdev channels (and its own mapping of a `cache_path`). A request goes to the worker of
//! its stripe's shard (`io::to_worker`); one spanning workers (a flush, a reset, a range
//! over several stripes) goes to each, and the submitting thread completes it when all
//! answered. What the parts cannot decide alone travels by message, never per request:
//! - segment requests and releases go to the lead, which holds the pool, and grants come
//!   back to the shard's worker ([`Worker::exchange`]);
//! - each worker reports its writeback frontier to the lead when it changes; the lead
//!   sends every worker the [`Coordination`] (the epoch all may write back, whether space
//!   is short) when it changes ([`Worker::recoordinate`]).
//!
//! Stopping is two-phase so no worker is freed while another may still message it: every
//! worker quiesces (drained or not, no device I/O in flight) and tells the lead, which then
//! tells them to exit, waits until all did, and exits last.
//!
//! Calls the worker's lifecycle (threads, start, teardown) and `msg`; nothing above the
//! worker.

use std::sync::{Arc, Mutex};

use super::{OpenInfo, State, Worker};
use crate::engine::pool::{Grant, ToPool};
use crate::engine::{Cache, Coordination};
use crate::spdk::ffi;
use crate::spdk::log::spdk_log;
use crate::spdk::msg;

/// One worker of a team: its thread and the worker, which is only dereferenced there; the
/// core the thread is pinned to, and its inbox, which threads pinned to that core fill
/// directly (see [`Inbox`](super::inbox::Inbox)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    pub thread: *mut ffi::spdk_thread,
    pub worker: *mut Worker,
    /// Place in the team (0: the lead).
    pub wid: u32,
    pub core: Option<u32>,
    pub inbox: *const super::inbox::Inbox,
}

// SAFETY: a Peer is an address: the worker is only dereferenced by messages running on its
// own thread (`send`), the inbox only on its core (`Inbox::push`), never where it was copied.
unsafe impl Send for Peer {}
// SAFETY: as above; sharing the address shares nothing else.
unsafe impl Sync for Peer {}

/// Runs `f` on `p`'s worker, on its thread.
pub(super) fn send(p: Peer, f: impl FnOnce(&mut Worker) + 'static) -> Result<(), ()> {
    msg::send(p.thread, move || {
        // SAFETY: workers of a team live until the lead's final exit message, after which
        // nobody sends to them (two-phase stop, module docs); this runs on `p`'s thread at
        // the top level of a message.
        let e = unsafe { &mut *p.worker };
        e.submit_incoming();
        f(e);
    })
}

/// Team state of one worker.
#[derive(Default)]
pub(super) struct TeamState {
    /// Every worker (index = worker number); empty while the worker runs alone.
    pub peers: Arc<[Peer]>,
    /// Follower: the frontier last reported to the lead.
    reported: Option<u64>,
    /// Lead: the last frontier of each worker.
    frontiers: Vec<u64>,
    /// Lead: the coordination last sent.
    sent: Option<Coordination>,
    /// Lead: followers started (ok or not), and the first start error.
    started: usize,
    start_error: Option<String>,
    info: Option<OpenInfo>,
    /// Lead: followers quiesced / exited; whether the exit was sent.
    quiesced: usize,
    exited: usize,
    exit_sent: bool,
    /// Follower: quiesced and told the lead.
    pub parked: bool,
    /// The first error a worker reported while stopping.
    pub stop_error: Option<String>,
    pool_msgs: Vec<ToPool>,
    grants: Vec<(u32, Grant)>,
}

/// Results of one round trip to every worker, collected wherever the last one lands.
pub(super) struct Gather<T> {
    left: usize,
    items: Vec<T>,
    then: Option<Box<dyn FnOnce(Vec<T>)>>,
}

impl<T: 'static> Gather<T> {
    pub fn new(n: usize, then: impl FnOnce(Vec<T>) + 'static) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Gather {
            left: n,
            items: Vec::with_capacity(n),
            then: Some(Box::new(then)),
        }))
    }

    /// Adds one result; the last one runs `then` (here, on the caller's thread).
    pub fn put(g: &Arc<Mutex<Self>>, item: T) {
        let ready = {
            let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
            g.items.push(item);
            g.left = g.left.saturating_sub(1);
            if g.left == 0 {
                g.then.take().map(|f| (f, std::mem::take(&mut g.items)))
            } else {
                None
            }
        };
        if let Some((f, items)) = ready {
            f(items);
        }
    }
}

impl Worker {
    /// This worker as a peer (on its thread).
    pub(super) fn peer(&self) -> Peer {
        Peer {
            thread: msg::current(),
            worker: self as *const Worker as *mut Worker,
            wid: self.wid as u32,
            core: self.core,
            inbox: std::rc::Rc::as_ptr(&self.inbox),
        }
    }

    pub(super) fn team_size(&self) -> usize {
        self.team.peers.len().max(1)
    }

    pub(super) fn is_follower(&self) -> bool {
        self.wid > 0
    }

    fn lead(&self) -> Option<Peer> {
        self.team.peers.first().copied()
    }

    /// Lead, after the open: split the cache over `want` workers and start the others.
    /// Reports the open (with the team) once every follower runs.
    pub(super) fn spawn_team(&mut self, cache: Box<Cache>, info: OpenInfo) {
        let want = self
            .want_workers
            .min(cache.geometry().shard_count as usize)
            .max(1);
        self.front_shift = super::front_shift_of(self.shift[1], &cache);
        if want == 1 {
            self.cache = Some(cache);
            return self.open_succeeded(info);
        }
        let mut parts = (*cache).split(want).into_iter();
        self.cache = parts.next().map(Box::new);
        let cores = super::lifecycle::team_cores(self.core, want);
        spdk_log!(
            NOTICE,
            "{}: {want} engine threads, on cores {:?}",
            self.name,
            cores
                .iter()
                .map(|c| c.map_or(-1, i64::from))
                .collect::<Vec<_>>()
        );
        let mut peers = vec![self.peer()];
        let mut followers = Vec::new();
        for (k, part) in parts.enumerate() {
            let k = k + 1;
            let made = self
                .dax
                .as_ref()
                .map(|d| d.map_again())
                .transpose()
                .map_err(|e| format!("cannot map the cache again for engine {k}: {e}"))
                .and_then(|dax| {
                    super::lifecycle::create_thread(&format!("{}_{k}", self.name), cores[k])
                        .map(|(thread, core)| (thread, core, dax))
                });
            let (thread, core, dax) = match made {
                Ok(x) => x,
                Err(e) => return self.team_failed_to_start(&peers, e),
            };
            let mut w = self.follower(k, part, dax);
            w.core = core;
            let inbox = std::rc::Rc::as_ptr(&w.inbox);
            let worker = Box::into_raw(Box::new(w));
            peers.push(Peer {
                thread,
                worker,
                wid: k as u32,
                core,
                inbox,
            });
            followers.push(k);
        }
        let peers: Arc<[Peer]> = peers.into();
        self.team.peers = peers.clone();
        self.team.frontiers = vec![0; want];
        self.team.info = Some(info);
        for k in followers {
            let p = peers[k];
            // SAFETY: just created, not yet running: nobody else touches it.
            unsafe { (*p.worker).team.peers = peers.clone() };
            let lead = peers[0];
            let sent = msg::send(p.thread, move || {
                // SAFETY: the follower's first message, on its thread.
                let e = unsafe { &mut *p.worker };
                let res = e.start_follower(p.worker);
                if let Err(err) = &res {
                    // Nothing runs there: park at once (the lead stops the team).
                    spdk_log!(ERROR, "{}: engine {k}: {err}", e.name);
                    e.state = State::Quiescing;
                    e.park();
                }
                let _ = send(lead, move |l| l.follower_started(res));
            });
            if sent.is_err() {
                self.follower_started(Err(format!("cannot start engine {k}")));
            }
        }
    }

    fn team_failed_to_start(&mut self, made: &[Peer], err: String) {
        // None of the workers made so far has started (they start after every one is
        // made), so dropping them is safe; their idle threads end with the app.
        for p in made.iter().skip(1) {
            // SAFETY: created by `spawn_team`, never started, known to nobody else.
            drop(unsafe { Box::from_raw(p.worker) });
        }
        self.cache = None;
        self.fail_open(err);
    }

    /// Lead: a follower started (or could not).
    fn follower_started(&mut self, res: Result<(), String>) {
        self.team.started += 1;
        if let Err(e) = res {
            self.team.start_error.get_or_insert(e);
        }
        if self.team.started + 1 < self.team_size() {
            return;
        }
        match self.team.start_error.take() {
            None => {
                if let Some(info) = self.team.info.take() {
                    self.open_succeeded(info);
                }
            }
            Some(e) => {
                self.team.info = None;
                self.fail_open(e);
                self.stop_followers(false);
            }
        }
    }

    /// Every follower stops (after a drain when `drain`); each reports when quiesced.
    pub(super) fn stop_followers(&mut self, drain: bool) {
        for p in self.team.peers.iter().skip(1).copied() {
            let sent = send(p, move |w| {
                if !w.team.parked {
                    w.begin_stop(drain);
                }
            });
            if sent.is_err() {
                spdk_log!(ERROR, "{}: cannot stop an engine thread", self.name);
            }
        }
    }

    /// Follower, quiesced: tell the lead once and wait for its exit message.
    pub(super) fn park(&mut self) {
        if self.team.parked {
            return;
        }
        self.team.parked = true;
        let err = self.open_error.take();
        if let Some(lead) = self.lead() {
            if send(lead, move |l| {
                l.team.quiesced += 1;
                if let Some(e) = err {
                    l.team.stop_error.get_or_insert(e);
                }
            })
            .is_err()
            {
                spdk_log!(ERROR, "{}: cannot report a stopped engine", self.name);
            }
        }
    }

    /// Lead, quiesced: once every follower is, make them exit; true when all exited (the
    /// lead may then exit itself).
    pub(super) fn team_done(&mut self) -> bool {
        let followers = self.team_size() - 1;
        if followers == 0 {
            return true;
        }
        if self.team.quiesced < followers {
            return false;
        }
        if !self.team.exit_sent {
            self.team.exit_sent = true;
            for p in self.team.peers.iter().skip(1).copied() {
                let lead = self.team.peers[0];
                let sent = msg::send(p.thread, move || {
                    // SAFETY: a parked follower: no device I/O in flight, nothing else
                    // running there; the lead outlives it (waits for `exited`).
                    unsafe { Worker::teardown(p.worker) };
                    let _ = send(lead, |l| l.team.exited += 1);
                });
                if sent.is_err() {
                    spdk_log!(ERROR, "{}: cannot end an engine thread", self.name);
                    self.team.exited += 1;
                }
            }
        }
        self.team.exited >= followers
    }

    /// After each pump: carry pool messages to the lead and grants to their workers; the
    /// lead recoordinates.
    pub(super) fn exchange(&mut self) {
        if self.team_size() == 1 {
            return;
        }
        let Some(cache) = self.cache.as_deref_mut() else {
            return;
        };
        cache.take_pool_messages(&mut self.team.pool_msgs);
        cache.take_grants(&mut self.team.grants);
        if !self.team.pool_msgs.is_empty() {
            if let Some(lead) = self.lead() {
                let msgs = std::mem::take(&mut self.team.pool_msgs);
                if send(lead, move |l| {
                    if let Some(c) = l.cache.as_deref_mut() {
                        for m in msgs {
                            c.pool_message(m);
                        }
                    }
                    l.kick = true;
                    l.exchange();
                    l.recoordinate();
                })
                .is_err()
                {
                    spdk_log!(ERROR, "{}: lost segment messages to the lead", self.name);
                }
            }
        }
        // The lead's: the pool's pressure follows what this pump took and gave back.
        self.recoordinate();
        for (shard, g) in std::mem::take(&mut self.team.grants) {
            let p = self.team.peers[Cache::part_of_shard(shard, self.team_size())];
            if send(p, move |w| {
                if let Some(c) = w.cache.as_deref_mut() {
                    c.grant(shard, g);
                }
                w.kick = true;
            })
            .is_err()
            {
                spdk_log!(ERROR, "{}: lost a segment grant", self.name);
            }
        }
    }

    /// Follower (housekeeping): report a changed frontier to the lead. Lead: recoordinate.
    pub(super) fn report_frontier(&mut self) {
        if self.team_size() == 1 {
            return;
        }
        if !self.is_follower() {
            return self.recoordinate();
        }
        let Some(f) = self.cache.as_deref().map(Cache::frontier) else {
            return;
        };
        if self.team.reported == Some(f) {
            return;
        }
        self.team.reported = Some(f);
        let k = self.wid;
        if let Some(lead) = self.lead() {
            let _ = send(lead, move |l| {
                if let Some(x) = l.team.frontiers.get_mut(k) {
                    *x = (*x).max(f);
                }
                l.recoordinate();
            });
        }
    }

    /// Lead: the epoch every worker may write back and whether space is short, sent to all
    /// when it changes. Stale frontiers only hold writeback back (they never decrease).
    pub(super) fn recoordinate(&mut self) {
        if self.team_size() == 1 || self.is_follower() {
            return;
        }
        let Some(cache) = self.cache.as_deref_mut() else {
            return;
        };
        if let Some(x) = self.team.frontiers.first_mut() {
            *x = cache.frontier();
        }
        let c = Coordination {
            allowed_epoch: self.team.frontiers.iter().copied().min().unwrap_or(0),
            pressure: cache.pool_pressure().unwrap_or(false),
        };
        if self.team.sent == Some(c) || self.team.exit_sent {
            return;
        }
        self.team.sent = Some(c);
        cache.coordinate_with(c);
        self.kick = true;
        for p in self.team.peers.iter().skip(1).copied() {
            let _ = send(p, move |w| {
                if let Some(cache) = w.cache.as_deref_mut() {
                    cache.coordinate_with(c);
                }
                w.kick = true;
            });
        }
    }
}
