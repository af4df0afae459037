//! A pcache bdev's team of engine threads, one per core by default.
//!
//! The lead engine (index 0) opens the cache, then [`Cache::split`]s it: engine `k` drives
//! the shards whose id is `k` modulo the team size, on its own SPDK thread with its own base
//! bdev channels (and its own mapping of a `cache_path`). A request goes to the engine of
//! its stripe's shard (`io::to_engine`); one spanning engines (a flush, a reset, a range
//! over several stripes) goes to each, and the submitting thread completes it when all
//! answered. What the parts cannot decide alone travels by message, never per request:
//! - segment requests and releases go to the lead, which holds the pool, and grants come
//!   back to the shard's engine ([`Engine::exchange`]);
//! - each engine reports its writeback frontier to the lead when it changes; the lead
//!   sends every engine the [`Coordination`] (the epoch all may write back, whether space
//!   is short) when it changes ([`Engine::recoordinate`]).
//!
//! Stopping is two-phase so no engine is freed while another may still message it: every
//! engine quiesces (drained or not, no device I/O in flight) and tells the lead, which then
//! tells them to exit, waits until all did, and exits last.

use std::sync::{Arc, Mutex};

use super::{msg, spdk_log, Engine, OpenInfo, State};
use crate::engine::pool::{Grant, ToPool};
use crate::engine::{Cache, Coordination};
use crate::spdk::ffi;

/// One engine of a team: its thread and the engine, which is only dereferenced there; the
/// core the thread is pinned to, and its inbox, which threads pinned to that core fill
/// directly (see [`Inbox`](super::inbox::Inbox)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    pub thread: *mut ffi::spdk_thread,
    pub eng: *mut Engine,
    /// Place in the team (0: the lead).
    pub wid: u32,
    pub core: Option<u32>,
    pub inbox: *const super::inbox::Inbox,
}

// SAFETY: a Peer is an address: the engine is only dereferenced by messages running on its
// own thread (`send`), the inbox only on its core (`Inbox::push`), never where it was copied.
unsafe impl Send for Peer {}
// SAFETY: as above; sharing the address shares nothing else.
unsafe impl Sync for Peer {}

/// Runs `f` on `p`'s engine, on its thread.
pub(super) fn send(p: Peer, f: impl FnOnce(&mut Engine) + 'static) -> Result<(), ()> {
    msg::send(p.thread, move || {
        // SAFETY: engines of a team live until the lead's final exit message, after which
        // nobody sends to them (two-phase stop, module docs); this runs on `p`'s thread at
        // the top level of a message.
        let e = unsafe { &mut *p.eng };
        e.submit_incoming();
        f(e);
    })
}

/// Team state of one engine.
#[derive(Default)]
pub(super) struct TeamState {
    /// Every engine (index = engine number); empty while the engine runs alone.
    pub peers: Arc<[Peer]>,
    /// Worker: the frontier last reported to the lead.
    reported: Option<u64>,
    /// Lead: the last frontier of each engine.
    frontiers: Vec<u64>,
    /// Lead: the coordination last sent.
    sent: Option<Coordination>,
    /// Lead: workers started (ok or not), and the first start error.
    started: usize,
    start_error: Option<String>,
    info: Option<OpenInfo>,
    /// Lead: workers quiesced / exited; whether the exit was sent.
    quiesced: usize,
    exited: usize,
    exit_sent: bool,
    /// Worker: quiesced and told the lead.
    pub parked: bool,
    /// The first error an engine reported while stopping.
    pub stop_error: Option<String>,
    pool_msgs: Vec<ToPool>,
    grants: Vec<(u32, Grant)>,
}

/// Results of one round trip to every engine, collected wherever the last one lands.
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

impl Engine {
    /// This engine as a peer (on its thread).
    pub(super) fn peer(&self) -> Peer {
        Peer {
            thread: msg::current(),
            eng: self as *const Engine as *mut Engine,
            wid: self.wid as u32,
            core: self.core,
            inbox: std::rc::Rc::as_ptr(&self.inbox),
        }
    }

    pub(super) fn team_size(&self) -> usize {
        self.team.peers.len().max(1)
    }

    pub(super) fn is_worker(&self) -> bool {
        self.wid > 0
    }

    fn lead(&self) -> Option<Peer> {
        self.team.peers.first().copied()
    }

    /// Lead, after the open: split the cache over `want` engines and start the others.
    /// Reports the open (with the team) once every worker runs.
    pub(super) fn spawn_team(&mut self, cache: Box<Cache>, info: OpenInfo) {
        let want = self
            .want_workers
            .min(cache.geometry().shard_count as usize)
            .max(1);
        if want == 1 {
            self.cache = Some(cache);
            return self.open_succeeded(info);
        }
        let mut parts = (*cache).split(want).into_iter();
        self.cache = parts.next().map(Box::new);
        let cores = super::team_cores(self.core, want);
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
        let mut workers = Vec::new();
        for (k, part) in parts.enumerate() {
            let k = k + 1;
            let made = self
                .dax
                .as_ref()
                .map(|d| d.map_again())
                .transpose()
                .map_err(|e| format!("cannot map the cache again for engine {k}: {e}"))
                .and_then(|dax| {
                    super::create_thread(&format!("{}_{k}", self.name), cores[k])
                        .map(|(thread, core)| (thread, core, dax))
                });
            let (thread, core, dax) = match made {
                Ok(x) => x,
                Err(e) => return self.team_failed_to_start(&peers, e),
            };
            let mut w = self.worker(k, part, dax);
            w.core = core;
            let inbox = std::rc::Rc::as_ptr(&w.inbox);
            let eng = Box::into_raw(Box::new(w));
            peers.push(Peer {
                thread,
                eng,
                wid: k as u32,
                core,
                inbox,
            });
            workers.push(k);
        }
        let peers: Arc<[Peer]> = peers.into();
        self.team.peers = peers.clone();
        self.team.frontiers = vec![0; want];
        self.team.info = Some(info);
        for k in workers {
            let p = peers[k];
            // SAFETY: just created, not yet running: nobody else touches it.
            unsafe { (*p.eng).team.peers = peers.clone() };
            let lead = peers[0];
            let sent = msg::send(p.thread, move || {
                // SAFETY: the worker's first message, on its thread.
                let e = unsafe { &mut *p.eng };
                let res = e.start_worker(p.eng);
                if let Err(err) = &res {
                    // Nothing runs there: park at once (the lead stops the team).
                    spdk_log!(ERROR, "{}: engine {k}: {err}", e.name);
                    e.state = State::Quiescing;
                    e.park();
                }
                let _ = send(lead, move |l| l.worker_started(res));
            });
            if sent.is_err() {
                self.worker_started(Err(format!("cannot start engine {k}")));
            }
        }
    }

    fn team_failed_to_start(&mut self, made: &[Peer], err: String) {
        // None of the engines made so far has started (they start after every one is
        // made), so dropping them is safe; their idle threads end with the app.
        for p in made.iter().skip(1) {
            // SAFETY: created by `spawn_team`, never started, known to nobody else.
            drop(unsafe { Box::from_raw(p.eng) });
        }
        self.cache = None;
        self.fail_open(err);
    }

    /// Lead: a worker started (or could not).
    fn worker_started(&mut self, res: Result<(), String>) {
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
                self.stop_workers(false);
            }
        }
    }

    /// Every worker stops (after a drain when `drain`); each reports when quiesced.
    pub(super) fn stop_workers(&mut self, drain: bool) {
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

    /// Worker, quiesced: tell the lead once and wait for its exit message.
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

    /// Lead, quiesced: once every worker is, make them exit; true when all exited (the
    /// lead may then exit itself).
    pub(super) fn team_done(&mut self) -> bool {
        let workers = self.team_size() - 1;
        if workers == 0 {
            return true;
        }
        if self.team.quiesced < workers {
            return false;
        }
        if !self.team.exit_sent {
            self.team.exit_sent = true;
            for p in self.team.peers.iter().skip(1).copied() {
                let lead = self.team.peers[0];
                let sent = msg::send(p.thread, move || {
                    // SAFETY: a parked worker: no device I/O in flight, nothing else
                    // running there; the lead outlives it (waits for `exited`).
                    unsafe { Engine::teardown(p.eng) };
                    let _ = send(lead, |l| l.team.exited += 1);
                });
                if sent.is_err() {
                    spdk_log!(ERROR, "{}: cannot end an engine thread", self.name);
                    self.team.exited += 1;
                }
            }
        }
        self.team.exited >= workers
    }

    /// After each pump: carry pool messages to the lead and grants to their engines.
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

    /// Worker (housekeeping): report a changed frontier to the lead. Lead: recoordinate.
    pub(super) fn report_frontier(&mut self) {
        if self.team_size() == 1 {
            return;
        }
        if !self.is_worker() {
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

    /// Lead: the epoch every engine may write back and whether space is short, sent to all
    /// when it changes. Stale frontiers only hold writeback back (they never decrease).
    pub(super) fn recoordinate(&mut self) {
        if self.team_size() == 1 || self.is_worker() {
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
