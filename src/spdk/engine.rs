//! An engine thread of a pcache bdev: runs the sans-I/O [`Cache`] (or, in a team of engine
//! threads, its part of it: see `team`) and executes its device commands against the cache
//! and backing bdevs.
//!
//! The lead engine of a pcache bdev gets its own SPDK thread (bound to one core of the app's
//! mask, chosen round-robin from the last core), the others one each on the following
//! cores. Everything that touches an engine's [`Cache`] or its base bdev channels happens
//! on its thread:
//! - requests arrive in the engine's [`Inbox`]: by message from threads on other cores
//!   (`submit_msg`, the `spdk_bdev_io` as argument), pushed directly by threads pinned to
//!   the engine's own core; the next poll submits them to the cache together. Completions
//!   go back by message to the thread that submitted them (`io::complete_remote_msg`), or, for a
//!   thread on this core, are delivered at once as that thread (`io::complete_as_submitter`);
//! - a period-0 poller runs the cache (`poll`, drain commands, execute them) whenever a
//!   request or a device completion arrived, so concurrent requests are group-committed; a
//!   1 ms poller keeps writeback going, detects idleness (10 ms without requests), resolves
//!   drains and resets, and tears the engine down when it stops;
//! - opening (reading the superblock and replaying the log with the engine's [`Opener`]) and
//!   formatting run here too, with DMA buffers, before the bdev is registered.
//!
//! A request buffer a command names ([`Buf::Req`]) belongs to a live request: each request
//! holds a slot in [`Reqs`], addressed by the id handed to the engine (slot index and a
//! generation, so a stale id never reaches a recycled slot). A request completes only when
//! the engine completed it *and* no device command using its buffer is still in flight.
//!
//! With a mapped cache (`cache_path`: a [`DaxDevice`], no cache bdev) the same device I/O
//! descriptions are built, and `issue` executes those for the cache inline (`dax_run`: a
//! copy between the mapping and the buffers, persisted before it returns) and completes
//! them at once; backing I/O stays asynchronous.
//!
//! Device errors become `IoError::Device`; -ENOMEM from a submission waits on the base
//! bdev (`spdk_bdev_queue_io_wait`) and is retried. After a base bdev is hot-removed every
//! command for it fails at once, so requests that need it fail and the rest finish.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

mod inbox;
pub(crate) mod local;
mod team;
use inbox::Inbox;
pub(crate) use team::Peer;
use team::{Gather, TeamState};

use serde_json::{json, Value};

use crate::engine::shard::WritebackOptions;
use crate::engine::{
    format, BackingIdentity, Buf, Cache, CacheOptions, Command, Dev, Direct, FormatError,
    FormatOptions, IoDone, IoError, Op, OpenError, OpenStep, Opener, ReqError, ReqId, ReqResult,
    Request, Superblock,
};

use super::ffi::{self, spdk_bdev_io_status as st, spdk_bdev_io_type as t};
use super::io::{self, IoCtx};
use super::link::{Desc, EngineEnd, Finished, Iovs};
use super::log::{no_unwind, spdk_log};
use super::msg;
use crate::media::dax::DaxDevice;
use crate::media::BlockDevice;

/// What the app thread hands to a new engine.
pub(crate) struct Setup {
    pub name: String,
    /// Core for the engine thread; None: round-robin.
    pub core: Option<u32>,
    pub app_thread: *mut ffi::spdk_thread,
    /// Indexed by [`dev_index`]: cache, backing.
    pub desc: [*mut ffi::spdk_bdev_desc; 2],
    pub bdev: [*mut ffi::spdk_bdev; 2],
    pub identity: BackingIdentity,
    pub format: FormatOptions,
    pub cache_options: CacheOptions,
    /// Size of the cache bdev.
    pub cache_bytes: u64,
    /// The mapped cache (`cache_path`): `desc[0]` / `bdev[0]` are null and every cache
    /// command completes inline on the engine thread.
    pub dax: Option<DaxDevice>,
    /// Engine threads wanted (one per core by default; at most one per shard).
    pub workers: usize,
}

/// The outcome of a successful open.
pub(crate) struct OpenInfo {
    pub sb: Superblock,
    pub formatted: bool,
    pub problems: Vec<String>,
    pub gc_percent: u32,
    /// Dirty data found in the log (not yet on the backing bdev).
    pub dirty_bytes: u64,
    /// The engine threads, lead first (empty: the lead alone serves every request).
    pub team: Arc<[Peer]>,
}

pub(crate) type OpenDone = Box<dyn FnOnce(Result<OpenInfo, String>)>;
pub(crate) type Done = Box<dyn FnOnce(Result<(), String>)>;

/// A raw pointer moved into a message closure. The closures run on SPDK threads in an order
/// the code below guarantees; the wrapper only lets the pointer travel.
pub(crate) struct SendPtr<T>(pub *mut T);

/// The engine operation of a bdev_io type, if the engine serves it.
fn op_of(ty: t::Type) -> Option<Op> {
    match ty {
        t::SPDK_BDEV_IO_TYPE_READ => Some(Op::Read),
        t::SPDK_BDEV_IO_TYPE_WRITE => Some(Op::Write),
        t::SPDK_BDEV_IO_TYPE_FLUSH => Some(Op::Flush),
        t::SPDK_BDEV_IO_TYPE_UNMAP => Some(Op::Unmap),
        t::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => Some(Op::WriteZeroes),
        _ => None,
    }
}

fn dev_index(d: Dev) -> usize {
    match d {
        Dev::Cache => 0,
        Dev::Backing => 1,
    }
}

const DEV_NAMES: [&str; 2] = ["cache", "backing"];

// ---- DMA buffers ----

struct DmaBuf {
    ptr: *mut u8,
    cap: usize,
}

/// Power-of-two classes of `spdk_dma_zmalloc` buffers, kept for reuse up to a limit per
/// class (kset and header writes, writeback bounce buffers, open reads).
#[derive(Default)]
struct DmaPool {
    free: Vec<Vec<*mut u8>>,
}

impl DmaPool {
    fn class(len: usize) -> u32 {
        len.max(4096).next_power_of_two().trailing_zeros()
    }

    fn keep(class: u32) -> usize {
        match class {
            0..=16 => 256,
            17..=20 => 32,
            _ => 0,
        }
    }

    fn get(&mut self, len: usize) -> Option<DmaBuf> {
        let class = Self::class(len);
        let cap = 1usize.checked_shl(class)?;
        if let Some(p) = self.free.get_mut(class as usize).and_then(Vec::pop) {
            return Some(DmaBuf { ptr: p, cap });
        }
        // SAFETY: plain allocation from SPDK's DMA-able heap; null on failure.
        let p = unsafe { ffi::spdk_dma_zmalloc(cap, 4096, ptr::null_mut()) };
        (!p.is_null()).then_some(DmaBuf { ptr: p.cast(), cap })
    }

    fn put(&mut self, b: DmaBuf) {
        let class = b.cap.trailing_zeros();
        if self.free.len() <= class as usize {
            self.free.resize_with(class as usize + 1, Vec::new);
        }
        let list = &mut self.free[class as usize];
        if list.len() < Self::keep(class) {
            list.push(b.ptr);
        } else {
            // SAFETY: allocated by spdk_dma_zmalloc in `get`, no longer used.
            unsafe { ffi::spdk_dma_free(b.ptr.cast()) };
        }
    }

    fn clear(&mut self) {
        for p in self.free.drain(..).flatten() {
            // SAFETY: as in `put`.
            unsafe { ffi::spdk_dma_free(p.cast()) };
        }
    }
}

// ---- requests in flight ----

/// How a request reached the engine, hence how to answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// Through the inbox: its context says how (`IoCtx::local`, `fanout`, else a message).
    Inbox,
    /// On queue pair `k` of `Engine::links`: back on its completion queue.
    Link(usize),
}

struct ReqSlot {
    io: *mut ffi::spdk_bdev_io,
    /// The payload's iovecs (none for requests without data).
    iovs: Iovs,
    reply: Reply,
    /// Device commands in flight that use this request's buffer.
    refs: u32,
    /// The engine's verdict, once it completed the request.
    result: Option<bool>,
    gen: u32,
    live: bool,
}

#[derive(Default)]
struct Reqs {
    slots: Vec<ReqSlot>,
    free: Vec<u32>,
    live: usize,
}

impl ReqSlot {
    fn iovs(&self) -> &[ffi::iovec] {
        self.iovs.get()
    }
}

impl Reqs {
    /// A slot for request `d`, whose payload `with_buf` says whether to keep.
    fn insert(&mut self, d: &Desc, with_buf: bool, reply: Reply) -> ReqId {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(ReqSlot {
                    io: ptr::null_mut(),
                    iovs: Iovs::default(),
                    reply: Reply::Inbox,
                    refs: 0,
                    result: None,
                    gen: 0,
                    live: false,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[idx as usize];
        s.gen = s.gen.wrapping_add(1);
        s.io = d.io;
        s.iovs = if with_buf { d.iovs } else { Iovs::default() };
        s.reply = reply;
        s.refs = 0;
        s.result = None;
        s.live = true;
        self.live += 1;
        (u64::from(s.gen) << 32) | u64::from(idx)
    }

    /// The live slot of request `id`.
    fn index(&self, id: ReqId) -> Option<u32> {
        let idx = (id & 0xffff_ffff) as u32;
        let s = self.slots.get(idx as usize)?;
        (s.live && u64::from(s.gen) == id >> 32).then_some(idx)
    }

    fn remove(&mut self, idx: u32) -> (*mut ffi::spdk_bdev_io, Reply) {
        let s = &mut self.slots[idx as usize];
        s.live = false;
        self.live -= 1;
        self.free.push(idx);
        (std::mem::replace(&mut s.io, ptr::null_mut()), s.reply)
    }
}

// ---- device I/O ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A command of the running cache.
    Cmd,
    /// The one I/O of a request served directly (`Cache::begin_direct`).
    Direct,
    /// A read for the opener.
    Open,
    /// A write (or the final flush) of formatting.
    Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Zeroes,
    CopyRead,
    CopyWrite,
}

/// One base-bdev I/O in flight. Boxed (the wait entry is linked into SPDK's queue while
/// waiting for memory), recycled through `Engine::dio_free`.
struct DevIo {
    eng: *mut Engine,
    purpose: Purpose,
    tag: u64,
    kind: Kind,
    dev: Dev,
    /// In blocks of `dev`.
    offset: u64,
    blocks: u64,
    /// Length in 512-byte sectors (for the second half of a copy).
    sectors: u64,
    iovs: Vec<ffi::iovec>,
    /// Request slot whose buffer this uses (holds a reference).
    req: Option<u32>,
    verify: Option<u32>,
    crc: Option<u32>,
    dma: Option<DmaBuf>,
    /// Engine-owned bytes written straight from here (mapped cache only).
    owned: Vec<u8>,
    copy_dst: (Dev, u64),
    /// For `Purpose::Direct`: the request it serves and how to answer it.
    direct: Option<(Direct, *mut ffi::spdk_bdev_io, Reply)>,
    wait: ffi::spdk_bdev_io_wait_entry,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    requests: u64,
    requests_failed: u64,
    dev_reads: u64,
    dev_writes: u64,
    dev_copies: u64,
    dev_flushes: u64,
    dev_zeroes: u64,
    dev_errors: u64,
    nomem_waits: u64,
    /// How requests arrived: from a thread on this core (inbox), through a queue pair from
    /// another core, or by message.
    arrived_same_core: u64,
    /// Of those, served by the submitting thread itself (`local`).
    served_by_submitter: u64,
    arrived_queue_pair: u64,
    arrived_by_message: u64,
    crc_mismatches: u64,
    resets: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Opening,
    Running,
    /// Stopping after writing back everything (delete).
    Draining,
    /// Stopping: no new work, waiting for device I/O in flight.
    Quiescing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FormatPhase {
    Idle,
    Writes { left: u32, failed: bool },
    Flush,
}

pub(crate) struct Engine {
    name: String,
    /// Place in the bdev's team of engine threads (0: the lead; see `team`).
    wid: usize,
    want_workers: usize,
    /// Core of this engine's thread (None: any).
    core: Option<u32>,
    team: TeamState,
    app_thread: *mut ffi::spdk_thread,
    desc: [*mut ffi::spdk_bdev_desc; 2],
    bdev: [*mut ffi::spdk_bdev; 2],
    ch: [*mut ffi::spdk_io_channel; 2],
    /// log2(block size / 512) per device.
    shift: [u32; 2],
    blocks: [u64; 2],
    flush_ok: [bool; 2],
    removed: [bool; 2],
    identity: BackingIdentity,
    fopts: FormatOptions,
    copts: CacheOptions,
    cache_bytes: u64,
    /// The mapped cache, when there is no cache bdev.
    dax: Option<DaxDevice>,
    /// Completions of inline (mapped-cache) commands, delivered in order by the outermost
    /// `issue` so a completion that issues more I/O does not recurse.
    dax_done: VecDeque<(Box<DevIo>, bool)>,
    dax_busy: bool,
    /// Scratch for iovecs that do not split on sector boundaries.
    dax_bounce: Vec<u8>,
    /// Scratch for the part of a request's iovecs a piece of an inline read fills.
    iov_scratch: Vec<ffi::iovec>,

    cache: Option<Box<Cache>>,
    state: State,
    opener: Option<Opener>,
    formatted: bool,
    format_phase: FormatPhase,
    open_done: Option<OpenDone>,
    open_error: Option<String>,
    open_problems: Vec<String>,
    stop_done: Option<Done>,

    reqs: Reqs,
    /// Direct requests in flight (`issue_direct`).
    direct_live: usize,
    /// Direct writes copied to the mapped cache, awaiting the batch's fence.
    unfenced: Vec<(Box<DevIo>, bool)>,
    cmds: Vec<Command>,
    dones: Vec<IoDone>,
    comps: Vec<(ReqId, ReqResult)>,
    // Boxed on purpose: a DevIo's wait entry is linked into SPDK's queue by address.
    #[allow(clippy::vec_box)]
    dio_free: Vec<Box<DevIo>>,
    dma: DmaPool,
    /// DevIos issued and not yet completed (including those waiting for memory).
    inflight: u32,
    kick: bool,
    fast: *mut ffi::spdk_poller,
    slow: *mut ffi::spdk_poller,
    /// Requests seen by the last slow poll, and slow polls since one arrived.
    seen: u64,
    quiet_polls: u32,
    idle: bool,
    drain_on: bool,
    flushing: bool,
    drain_waiters: Vec<Done>,
    resets: Vec<*mut ffi::spdk_bdev_io>,
    /// Requests received (by message, or pushed by a thread on this core), submitted
    /// together by the next poll (or before any other message is handled), so their index
    /// lookups overlap; `batch` is the buffer they are moved to for that.
    inbox: std::rc::Rc<Inbox>,
    batch: Vec<*mut ffi::spdk_bdev_io>,
    /// Queue pairs with submitting threads on other cores (`link`); None: a free place.
    links: Vec<Option<EngineEnd>>,
    /// Scratch for `submit_incoming`.
    descs: Vec<(Desc, Reply)>,
    /// Completions whose message could not be sent yet ([`io::completion_arg`]s).
    unsent: Vec<*mut c_void>,
    /// Slow polls since a base bdev was removed with requests still pending.
    removed_polls: u32,
    counters: Counters,
}

/// Slow polls (1 ms each) without a request before the cache counts as idle.
const IDLE_POLLS: u32 = 10;
const SLOW_POLL_US: u64 = 1000;
/// Slow polls after a base bdev removal before stranded requests are failed.
const ABANDON_POLLS: u32 = 100;

// ---- thread creation ----

static NEXT_CORE: AtomicUsize = AtomicUsize::new(0);

/// A new SPDK thread bound to `want`, or to one core of the app's mask (round-robin from the
/// last core).
fn create_thread(
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

/// Cores for a team of `n` engines whose lead runs on `lead`: the app's cores in order
/// from the lead's, wrapping (None everywhere when the lead is not pinned).
fn team_cores(lead: Option<u32>, n: usize) -> Vec<Option<u32>> {
    let cores = app_cores();
    let Some(at) = lead.and_then(|l| cores.iter().position(|&c| c == l)) else {
        return vec![None; n];
    };
    (0..n)
        .map(|k| Some(cores[(at + k) % cores.len()]))
        .collect()
}

/// Creates the engine thread and starts opening (or formatting) the cache there. `done`
/// runs on the app thread with the outcome; on `Ok` the engine is running and takes
/// requests, on `Err` it is gone (thread exited, channels released). The descriptors stay
/// open either way: the caller closes them.
pub(crate) fn spawn(setup: Setup, done: OpenDone) -> Result<Peer, String> {
    let (thread, core) = create_thread(&setup.name, setup.core)?;
    let mut e = Engine::new(setup);
    e.core = core;
    let inbox = std::rc::Rc::as_ptr(&e.inbox);
    let eng = Box::into_raw(Box::new(e));
    let p = SendPtr(eng);
    if msg::send(thread, move || Engine::start(p.0, done)).is_err() {
        // SAFETY: the message was not queued; nobody else knows `eng`.
        drop(unsafe { Box::from_raw(eng) });
        // The idle thread is exited by the reactor at shutdown.
        return Err("cannot send the start message to the engine thread".into());
    }
    Ok(Peer {
        thread,
        eng,
        wid: 0,
        core,
        inbox,
    })
}

fn shift_of(bdev: *mut ffi::spdk_bdev) -> u32 {
    // SAFETY: an open base bdev.
    let bl = unsafe { ffi::spdk_bdev_get_block_size(bdev) };
    (bl / 512).max(1).trailing_zeros()
}

impl Engine {
    fn new(s: Setup) -> Self {
        // A mapped cache is served inline by the engine, with one fence per batch.
        let mapped = s.dax.is_some();
        let flush = |b| {
            // SAFETY: an open base bdev.
            unsafe { ffi::spdk_bdev_io_type_supported(b, t::SPDK_BDEV_IO_TYPE_FLUSH) }
        };
        let blocks = |b| {
            // SAFETY: an open base bdev.
            unsafe { ffi::spdk_bdev_get_num_blocks(b) }
        };
        // A mapped cache: 512-byte blocks, every write durable when it returns.
        let (cshift, cblocks, cflush) = match &s.dax {
            Some(d) => (0, d.sectors(), false),
            None => (shift_of(s.bdev[0]), blocks(s.bdev[0]), flush(s.bdev[0])),
        };
        Engine {
            name: s.name,
            wid: 0,
            want_workers: s.workers.max(1),
            core: None,
            team: TeamState::default(),
            app_thread: s.app_thread,
            desc: s.desc,
            bdev: s.bdev,
            ch: [ptr::null_mut(); 2],
            shift: [cshift, shift_of(s.bdev[1])],
            blocks: [cblocks, blocks(s.bdev[1])],
            flush_ok: [cflush, flush(s.bdev[1])],
            removed: [false; 2],
            identity: s.identity,
            fopts: s.format,
            copts: s.cache_options,
            cache_bytes: s.cache_bytes,
            dax: s.dax,
            dax_done: VecDeque::new(),
            dax_busy: false,
            dax_bounce: Vec::new(),
            iov_scratch: Vec::new(),
            cache: None,
            state: State::Opening,
            opener: None,
            formatted: false,
            format_phase: FormatPhase::Idle,
            open_done: None,
            open_error: None,
            open_problems: Vec::new(),
            stop_done: None,
            reqs: Reqs::default(),
            direct_live: 0,
            unfenced: Vec::new(),
            cmds: Vec::new(),
            dones: Vec::new(),
            comps: Vec::new(),
            dio_free: Vec::new(),
            dma: DmaPool::default(),
            inflight: 0,
            kick: false,
            fast: ptr::null_mut(),
            slow: ptr::null_mut(),
            seen: 0,
            quiet_polls: 0,
            idle: false,
            drain_on: false,
            flushing: false,
            drain_waiters: Vec::new(),
            resets: Vec::new(),
            inbox: std::rc::Rc::new(Inbox::new(mapped)),
            batch: Vec::with_capacity(64),
            links: Vec::new(),
            descs: Vec::with_capacity(64),
            unsent: Vec::new(),
            removed_polls: 0,
            counters: Counters::default(),
        }
    }

    /// First message on the engine thread: channels, pollers, then the opener.
    fn start(eng: *mut Engine, done: OpenDone) {
        // SAFETY: `eng` was leaked by `spawn` and is only used on this thread from now on.
        let e = unsafe { &mut *eng };
        e.open_done = Some(done);
        if let Err(err) = e.attach_thread(eng) {
            e.open_error = Some(err);
            // SAFETY: top level of a message; nothing else borrows the engine.
            unsafe { Engine::teardown(eng) };
            return;
        }
        e.open_begin();
    }

    /// The base bdevs' channels and the pollers, on this engine's thread.
    fn attach_thread(&mut self, eng: *mut Engine) -> Result<(), String> {
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
        // SAFETY: the engine outlives its pollers (unregistered in teardown, on this thread).
        unsafe {
            self.fast =
                ffi::spdk_poller_register_named(Some(fast_poll), eng.cast(), 0, fast_name.as_ptr());
            self.slow = ffi::spdk_poller_register_named(
                Some(slow_poll),
                eng.cast(),
                SLOW_POLL_US,
                slow_name.as_ptr(),
            );
        }
        if self.fast.is_null() || self.slow.is_null() {
            return Err("cannot register the engine pollers".into());
        }
        Ok(())
    }

    /// Engine `k` of the team, to drive `part` (made on the lead's thread, started on its
    /// own by `start_worker`).
    fn worker(&self, k: usize, part: Cache, dax: Option<DaxDevice>) -> Engine {
        let mut e = Engine::new(Setup {
            name: self.name.clone(),
            core: None,
            app_thread: self.app_thread,
            desc: self.desc,
            bdev: self.bdev,
            identity: self.identity.clone(),
            format: self.fopts.clone(),
            cache_options: self.copts.clone(),
            cache_bytes: self.cache_bytes,
            dax,
            workers: 1,
        });
        e.wid = k;
        e.cache = Some(Box::new(part));
        e
    }

    /// A worker's first message: channels and pollers; then it takes requests.
    fn start_worker(&mut self, eng: *mut Engine) -> Result<(), String> {
        self.attach_thread(eng)?;
        self.state = State::Running;
        self.kick = true;
        Ok(())
    }

    /// The cache is open and every engine runs: report to the app thread.
    fn open_succeeded(&mut self, mut info: OpenInfo) {
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

    // ---- opening and formatting ----

    fn open_begin(&mut self) {
        let opener = Opener::new(self.identity.clone(), self.copts.clone());
        let step = opener.start();
        self.opener = Some(opener);
        self.open_handle(step);
    }

    fn fail_open(&mut self, msg: String) {
        self.open_error = Some(msg);
        self.opener = None;
        self.state = State::Quiescing;
    }

    fn open_handle(&mut self, step: OpenStep) {
        match step {
            OpenStep::Read { sector, sectors } => {
                let len = sectors.saturating_mul(512);
                let Some(buf) = usize::try_from(len).ok().and_then(|l| self.dma.get(l)) else {
                    return self.fail_open(format!(
                        "cannot allocate a {len}-byte DMA buffer to read the cache bdev"
                    ));
                };
                let mut d = self.new_dio(Purpose::Open, 0, Kind::Read, Dev::Cache);
                d.iovs.push(ffi::iovec {
                    iov_base: buf.ptr.cast(),
                    iov_len: len as usize,
                });
                d.dma = Some(buf);
                if !self.set_range(&mut d, sector, sectors) {
                    self.recycle(d);
                    return self.fail_open("open read out of range".into());
                }
                self.issue(d);
            }
            OpenStep::Done(cache) => {
                self.opener = None;
                let sb = cache.superblock().clone();
                let have = self.cache_bytes / 512;
                if sb.geometry.cache_sectors > have {
                    return self.fail_open(format!(
                        "the cache bdev holds a pcache of {} bytes but has only {} bytes",
                        sb.geometry.cache_sectors * 512,
                        self.cache_bytes
                    ));
                }
                let info = OpenInfo {
                    gc_percent: cache.stats().gc_percent,
                    dirty_bytes: cache.dirty_bytes(),
                    sb,
                    formatted: self.formatted,
                    problems: std::mem::take(&mut self.open_problems),
                    team: Arc::from(Vec::new()),
                };
                self.spawn_team(cache, info);
            }
            OpenStep::Failed(OpenError::NoSuperblock {
                a: FormatError::BadMagic { .. },
                b: FormatError::BadMagic { .. },
            }) if !self.formatted => self.format_begin(),
            OpenStep::Failed(e) => {
                let hint = match &e {
                    OpenError::BackingMismatch { .. } => {
                        " (refusing to touch it: delete it from its own backing bdev, or wipe the cache bdev)"
                    }
                    OpenError::NoSuperblock { .. } => {
                        " (a damaged pcache superblock: refusing to format over it; wipe the cache bdev to start afresh)"
                    }
                    _ => "",
                };
                self.fail_open(format!("cannot open the cache: {e}{hint}"));
            }
        }
    }

    fn open_read_done(&mut self, data: Result<Vec<u8>, IoError>) {
        let Some(opener) = self.opener.as_mut() else {
            return;
        };
        let step = opener.step(data);
        if let OpenStep::Done(_) = step {
            // Keep the report for `OpenInfo` (the opener is dropped once done).
            self.open_problems = opener.report().problems.clone();
            for p in &self.open_problems {
                spdk_log!(NOTICE, "{}: open: {p}", self.name);
            }
        }
        self.open_handle(step);
    }

    fn format_begin(&mut self) {
        self.opener = None;
        let (_, writes) = match format(self.cache_bytes, self.identity.clone(), &self.fopts) {
            Ok(w) => w,
            Err(e) => return self.fail_open(format!("cannot format the cache bdev: {e}")),
        };
        spdk_log!(
            NOTICE,
            "{}: cache bdev holds no pcache: formatting ({} bytes)",
            self.name,
            self.cache_bytes
        );
        self.formatted = true;
        self.format_phase = FormatPhase::Writes {
            left: writes.len() as u32,
            failed: false,
        };
        for (sector, bytes) in writes {
            let mut d = self.new_dio(Purpose::Format, 0, Kind::Write, Dev::Cache);
            let ok = self.attach_vec(&mut d, bytes);
            let sectors = d.sectors;
            if !ok || !self.set_range(&mut d, sector, sectors) {
                self.recycle(d);
                self.format_io_done(false);
                continue;
            }
            self.issue(d);
        }
    }

    fn format_io_done(&mut self, ok: bool) {
        match self.format_phase {
            FormatPhase::Writes { left, failed } => {
                let failed = failed || !ok;
                if left > 1 {
                    self.format_phase = FormatPhase::Writes {
                        left: left - 1,
                        failed,
                    };
                    return;
                }
                if failed {
                    self.format_phase = FormatPhase::Idle;
                    return self
                        .fail_open("a write to the cache bdev failed while formatting".into());
                }
                if self.flush_ok[0] {
                    self.format_phase = FormatPhase::Flush;
                    let mut d = self.new_dio(Purpose::Format, 0, Kind::Flush, Dev::Cache);
                    d.offset = 0;
                    d.blocks = self.blocks[0];
                    self.issue(d);
                } else {
                    self.format_phase = FormatPhase::Idle;
                    self.open_begin();
                }
            }
            FormatPhase::Flush => {
                self.format_phase = FormatPhase::Idle;
                if ok {
                    self.open_begin();
                } else {
                    self.fail_open("flushing the cache bdev after formatting failed".into());
                }
            }
            FormatPhase::Idle => {}
        }
    }

    // ---- requests ----

    /// A request handed to this engine (`reply`: how it came, so how to answer).
    fn submit(&mut self, d: Desc, reply: Reply) {
        let io = d.io;
        self.counters.requests += 1;
        match reply {
            Reply::Link(_) => self.counters.arrived_queue_pair += 1,
            // SAFETY: a pending request; `local` was written before it reached the inbox.
            Reply::Inbox if unsafe { (*ffi::bdev_io_driver_ctx::<IoCtx>(io)).local } => {
                self.counters.arrived_same_core += 1
            }
            Reply::Inbox => self.counters.arrived_by_message += 1,
        }
        if !matches!(self.state, State::Running | State::Draining) || self.cache.is_none() {
            self.counters.requests_failed += 1;
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
            return;
        }
        let Some(op) = op_of(d.ty) else {
            self.counters.requests_failed += 1;
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
            return;
        };
        let shift = self.shift[1];
        let (lba, len) = if op == Op::Flush {
            (0, 0)
        } else {
            let len = u32::try_from(d.num << shift).unwrap_or(u32::MAX);
            (d.offset << shift, len)
        };
        self.wake();
        if op == Op::Read {
            if let Some(ok) = self.read_inline(&d, lba, len) {
                let status = if ok {
                    st::SPDK_BDEV_IO_STATUS_SUCCESS
                } else {
                    self.counters.dev_errors += 1;
                    self.counters.requests_failed += 1;
                    st::SPDK_BDEV_IO_STATUS_FAILED
                };
                self.finish_io(io, status, reply);
                return;
            }
        }
        if matches!(op, Op::Read | Op::Write) {
            let direct = self
                .cache
                .as_deref_mut()
                .and_then(|c| c.begin_direct(op, lba, len));
            if let Some(direct) = direct {
                return self.issue_direct(&d, reply, direct, u64::from(len));
            }
        }
        let id = self
            .reqs
            .insert(&d, matches!(op, Op::Read | Op::Write), reply);
        let Some(cache) = self.cache.as_deref_mut() else {
            return;
        };
        if let Err(e) = cache.submit(Request { id, op, lba, len }) {
            spdk_log!(ERROR, "{}: request refused: {e}", self.name);
            if let Some(idx) = self.reqs.index(id) {
                self.reqs.remove(idx);
            }
            self.counters.requests_failed += 1;
            self.finish_io(io, st::SPDK_BDEV_IO_STATUS_FAILED, reply);
            return;
        }
        self.kick = true;
    }

    /// Serves request `d` with one cache-device I/O of `sectors` straight from or into its
    /// buffer (see `Cache::begin_direct`): no request slot, command or tag.
    fn issue_direct(&mut self, d: &Desc, reply: Reply, direct: Direct, sectors: u64) {
        let kind = if direct.write {
            Kind::Write
        } else {
            Kind::Read
        };
        let mut dio = self.new_dio(Purpose::Direct, 0, kind, Dev::Cache);
        dio.iovs.extend_from_slice(d.iovs.get());
        dio.direct = Some((direct, d.io, reply));
        self.direct_live += 1;
        if !self.set_range(&mut dio, direct.sector, sectors) {
            self.counters.dev_errors += 1;
            return self.finish_direct(dio, false);
        }
        if direct.write {
            self.counters.dev_writes += 1;
        } else {
            self.counters.dev_reads += 1;
        }
        self.issue(dio);
    }

    /// The device I/O of a direct request finished: so did the request.
    fn finish_direct(&mut self, mut dio: Box<DevIo>, ok: bool) {
        let Some((direct, io, reply)) = dio.direct.take() else {
            return self.recycle(dio);
        };
        self.recycle(dio);
        let status = self.end_direct(direct, ok);
        self.finish_io(io, status, reply);
    }

    /// The device I/O of direct request `direct` (issued here or by its submitting thread:
    /// `local`) ended: the request's status.
    fn end_direct(&mut self, direct: Direct, ok: bool) -> st::Type {
        self.direct_live -= 1;
        let result = if ok { Ok(()) } else { Err(IoError::Device) };
        match self
            .cache
            .as_deref_mut()
            .map(|c| c.end_direct(direct, result))
        {
            Some(Ok(())) => st::SPDK_BDEV_IO_STATUS_SUCCESS,
            _ => {
                self.counters.requests_failed += 1;
                st::SPDK_BDEV_IO_STATUS_FAILED
            }
        }
    }

    /// Stops taking work: drains first when `drain` (unless a base bdev is gone, so nothing
    /// could be written back), else only waits for device I/O in flight.
    fn begin_stop(&mut self, drain: bool) {
        self.state = if drain && !self.removed.iter().any(|&r| r) {
            State::Draining
        } else {
            State::Quiescing
        };
        if let Some(c) = self.cache.as_deref_mut() {
            c.retry_writeback();
        }
    }

    /// With a mapped cache, serves a read of cached data at once: copied from the mapping
    /// into the request's buffer, no device command (see `Cache::read_inline`).
    fn read_inline(&mut self, d: &Desc, lba: u64, len: u32) -> Option<bool> {
        let (Some(cache), Some(dax)) = (self.cache.as_deref_mut(), self.dax.as_mut()) else {
            return None;
        };
        let iovs = d.iovs.get();
        if iovs.is_empty() {
            return None;
        }
        let (part, bounce) = (&mut self.iov_scratch, &mut self.dax_bounce);
        let mut copy = |sector: u64, off: u64, bytes: u64| {
            part.clear();
            sub_iovs(iovs, off, bytes, part) && dax_read(dax, sector, part, bounce)
        };
        cache.read_inline(lba, len, &mut copy)
    }

    /// Submits the requests received since the last poll: from the inbox and the queue
    /// pairs. Their index entries are prefetched first, all together: one request's cache
    /// misses then overlap the next ones' instead of each lookup stalling in turn. True if
    /// there were any.
    fn submit_incoming(&mut self) -> bool {
        let mut descs = std::mem::take(&mut self.descs);
        if !self.inbox.is_empty() {
            let mut batch = std::mem::take(&mut self.batch);
            self.inbox.take(&mut batch);
            descs.extend(batch.drain(..).map(|io| (Desc::of(io), Reply::Inbox)));
            self.batch = batch;
        }
        for (k, slot) in self.links.iter_mut().enumerate() {
            let Some(end) = slot else { continue };
            while let Ok(d) = end.sq.pop() {
                descs.push((d, Reply::Link(k)));
            }
            if end.closed() {
                *slot = None;
            }
        }
        if let (Some(cache), true) = (self.cache.as_deref(), descs.len() > 1) {
            let shift = self.shift[1];
            prefetch_lookups(descs.iter().map(|(d, _)| {
                let len = u32::try_from(d.num << shift).unwrap_or(u32::MAX);
                (cache, d.offset << shift, len)
            }));
        }
        for i in 0..descs.len() {
            self.prefetch_read(descs.get(i + 1));
            let (d, reply) = descs[i];
            self.submit(d, reply);
        }
        self.fence_direct_writes();
        let took = !descs.is_empty();
        descs.clear();
        self.descs = descs;
        took
    }

    /// Makes the direct writes of this batch to the mapped cache durable with one fence,
    /// then completes them: data durable before the acknowledgement, as for each alone.
    fn fence_direct_writes(&mut self) {
        if self.unfenced.is_empty() {
            return;
        }
        if let Some(dax) = self.dax.as_mut() {
            dax.fence();
        }
        let mut done = std::mem::take(&mut self.unfenced);
        for (d, ok) in done.drain(..) {
            self.complete_dio(d, ok);
        }
        self.unfenced = done;
    }

    /// Over a mapped cache, starts loading the data of `next` if it is a read hit, while
    /// the request before it runs: its copy then finds the lines on their way instead of
    /// waiting for DRAM (two requests ahead measured no better).
    fn prefetch_read(&self, next: Option<&(Desc, Reply)>) {
        if let (Some(next), Some(cache), Some(dax)) =
            (next, self.cache.as_deref(), self.dax.as_ref())
        {
            if next.0.ty == t::SPDK_BDEV_IO_TYPE_READ {
                let shift = self.shift[1];
                let (lba, len) = (next.0.offset << shift, next.0.num << shift);
                if let Some(sector) = u32::try_from(len)
                    .ok()
                    .and_then(|len| cache.cached_sector(lba, len))
                {
                    dax.prefetch(sector, (len * 512) as usize);
                }
            }
        }
    }

    /// A submitting thread on another core opened queue pair `end` with this engine.
    fn add_link(&mut self, end: EngineEnd) {
        match self.links.iter().position(Option::is_none) {
            Some(k) => self.links[k] = Some(end),
            None => self.links.push(Some(end)),
        }
    }

    /// Sends the completion of `io` to its submitting thread.
    fn finish_io(&mut self, io: *mut ffi::spdk_bdev_io, status: st::Type, reply: Reply) {
        if let Reply::Link(k) = reply {
            let done = Finished(io::completion_arg(io, status));
            let queued = self
                .links
                .get_mut(k)
                .and_then(Option::as_mut)
                .is_some_and(|end| end.cq.push(done).is_ok());
            if !queued && !send_completion(done.0) {
                self.unsent.push(done.0);
            }
            return;
        }
        // SAFETY: our bdevs' bdev_io carry an IoCtx as driver context.
        let ctx = unsafe { ffi::bdev_io_driver_ctx::<IoCtx>(io) };
        // SAFETY: a pending request; `fanout` was written by the submitting thread before
        // it sent the request to the engines, and is only read after that.
        if unsafe { (*ctx).fanout } {
            // Several engines answer this request: each sends its own status.
            let p = SendPtr(io);
            // SAFETY: a pending request; its thread lives until it completes.
            let th = unsafe { ffi::spdk_bdev_io_get_thread(io) };
            if msg::send(th, move || io::fanout_done(p.0, status)).is_err() {
                spdk_log!(ERROR, "{}: lost the completion of a request", self.name);
            }
            return;
        }
        // SAFETY: as above (`local` is written before the request reaches the inbox).
        if unsafe { (*ctx).local } {
            return io::complete_as_submitter(io, status);
        }
        let arg = io::completion_arg(io, status);
        if !send_completion(arg) {
            self.unsent.push(arg);
        }
    }

    fn request_done(&mut self, id: ReqId, res: ReqResult) {
        let Some(idx) = self.reqs.index(id) else {
            spdk_log!(
                ERROR,
                "{}: completion for an unknown request {id:#x}",
                self.name
            );
            return;
        };
        if let Err(e) = &res {
            self.counters.requests_failed += 1;
            if !matches!(e, ReqError::Io | ReqError::ShardFailed)
                || self.counters.requests_failed <= 10
            {
                spdk_log!(ERROR, "{}: request failed: {e}", self.name);
            }
        }
        let s = &mut self.reqs.slots[idx as usize];
        s.result = Some(res.is_ok());
        if s.refs == 0 {
            self.finish_slot(idx);
        }
    }

    fn finish_slot(&mut self, idx: u32) {
        let ok = self.reqs.slots[idx as usize].result.unwrap_or(false);
        let (io, reply) = self.reqs.remove(idx);
        self.finish_io(
            io,
            if ok {
                st::SPDK_BDEV_IO_STATUS_SUCCESS
            } else {
                st::SPDK_BDEV_IO_STATUS_FAILED
            },
            reply,
        );
    }

    fn unref(&mut self, idx: u32) {
        let s = &mut self.reqs.slots[idx as usize];
        s.refs = s.refs.saturating_sub(1);
        if s.live && s.refs == 0 && s.result.is_some() {
            self.finish_slot(idx);
        }
    }

    // ---- the cache pump ----

    /// Runs the cache until it has nothing more to say: poll, execute commands, hand back
    /// immediate results, complete requests. Returns whether anything happened.
    fn pump(&mut self) -> bool {
        let mut did = false;
        for _ in 0..64 {
            let Some(cache) = self.cache.as_deref_mut() else {
                break;
            };
            if !self.dones.is_empty() {
                did = true;
                for d in self.dones.drain(..) {
                    cache.complete(d);
                }
            }
            cache.poll();
            cache.drain_commands_into(&mut self.cmds);
            cache.drain_completions_into(&mut self.comps);
            let log = cache.take_log();
            for l in log {
                spdk_log!(NOTICE, "{}: {l}", self.name);
            }
            if self.cmds.is_empty() && self.comps.is_empty() {
                break;
            }
            did = true;
            let mut comps = std::mem::take(&mut self.comps);
            for (id, res) in comps.drain(..) {
                self.request_done(id, res);
            }
            self.comps = comps;
            let mut cmds = std::mem::take(&mut self.cmds);
            for c in cmds.drain(..) {
                self.execute(c);
            }
            self.cmds = cmds;
            if self.dones.is_empty() {
                break;
            }
        }
        self.exchange();
        did
    }

    fn new_dio(&mut self, purpose: Purpose, tag: u64, kind: Kind, dev: Dev) -> Box<DevIo> {
        let eng: *mut Engine = self;
        let mut d = self.dio_free.pop().unwrap_or_else(|| {
            Box::new(DevIo {
                eng,
                purpose,
                tag,
                kind,
                dev,
                offset: 0,
                blocks: 0,
                sectors: 0,
                iovs: Vec::new(),
                req: None,
                verify: None,
                crc: None,
                dma: None,
                owned: Vec::new(),
                copy_dst: (dev, 0),
                direct: None,
                // SAFETY: all-zero is a valid, unlinked wait entry.
                wait: unsafe { std::mem::zeroed() },
            })
        });
        d.eng = eng;
        d.purpose = purpose;
        d.tag = tag;
        d.kind = kind;
        d.dev = dev;
        d.offset = 0;
        d.blocks = 0;
        d.sectors = 0;
        d.req = None;
        d.verify = None;
        d.crc = None;
        d.direct = None;
        d
    }

    fn recycle(&mut self, mut d: Box<DevIo>) {
        if let Some(b) = d.dma.take() {
            self.dma.put(b);
        }
        d.owned = Vec::new();
        if let Some(idx) = d.req.take() {
            self.unref(idx);
        }
        d.iovs.clear();
        if self.dio_free.len() < 1024 {
            self.dio_free.push(d);
        }
    }

    /// Points `d` at bytes `off..off+len` of request `req`'s payload.
    fn attach_req(&mut self, d: &mut DevIo, req: ReqId, off: u64, len: u64) -> bool {
        let Some(idx) = self.reqs.index(req) else {
            spdk_log!(
                ERROR,
                "{}: command names an unknown request {req:#x}",
                self.name
            );
            return false;
        };
        let s = &mut self.reqs.slots[idx as usize];
        let iovs = s.iovs();
        if iovs.is_empty() {
            return false;
        }
        if !sub_iovs(iovs, off, len, &mut d.iovs) {
            spdk_log!(
                ERROR,
                "{}: command range {off}+{len} exceeds its request's buffer",
                self.name
            );
            return false;
        }
        s.refs += 1;
        d.req = Some(idx);
        d.sectors = len / 512;
        true
    }

    /// Points `d` at engine-owned bytes: kept in `d` for the mapped cache, else copied into
    /// a DMA buffer.
    fn attach_vec(&mut self, d: &mut DevIo, mut v: Vec<u8>) -> bool {
        if !(d.dev == Dev::Cache && self.dax.is_some()) {
            return self.attach_owned(d, &v);
        }
        v.resize(v.len().next_multiple_of(512), 0);
        d.iovs.push(ffi::iovec {
            iov_base: v.as_mut_ptr().cast(),
            iov_len: v.len(),
        });
        d.sectors = (v.len() / 512) as u64;
        // Moving the Vec keeps its heap buffer where the iovec points.
        d.owned = v;
        true
    }

    /// Copies engine-owned bytes into a DMA buffer for `d`.
    fn attach_owned(&mut self, d: &mut DevIo, bytes: &[u8]) -> bool {
        let len = bytes.len().next_multiple_of(512);
        let Some(buf) = self.dma.get(len) else {
            spdk_log!(
                ERROR,
                "{}: out of DMA memory for a {len}-byte write",
                self.name
            );
            return false;
        };
        // SAFETY: `buf` holds at least `len` ≥ `bytes.len()` bytes and does not overlap `bytes`.
        unsafe {
            ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr, bytes.len());
            ptr::write_bytes(buf.ptr.add(bytes.len()), 0, len - bytes.len());
        }
        d.iovs.push(ffi::iovec {
            iov_base: buf.ptr.cast(),
            iov_len: len,
        });
        d.dma = Some(buf);
        d.sectors = (len / 512) as u64;
        true
    }

    /// Sets `d`'s device range from 512-byte sectors; false if the device's block size
    /// does not divide it.
    fn set_range(&mut self, d: &mut DevIo, sector: u64, sectors: u64) -> bool {
        let i = dev_index(d.dev);
        let Some([offset, blocks]) = self.blocks_of(d.dev, sector, sectors) else {
            spdk_log!(
                ERROR,
                "{}: {} I/O at sector {sector} (+{sectors}) is not aligned to the block size",
                self.name,
                DEV_NAMES[i]
            );
            return false;
        };
        d.offset = offset;
        d.blocks = blocks;
        d.sectors = sectors;
        true
    }

    /// `sectors` 512-byte sectors at `sector` of `dev` as its blocks (offset, count), if
    /// they are whole blocks.
    fn blocks_of(&self, dev: Dev, sector: u64, sectors: u64) -> Option<[u64; 2]> {
        let shift = self.shift[dev_index(dev)];
        ((sector | sectors) & ((1u64 << shift) - 1) == 0)
            .then_some([sector >> shift, sectors >> shift])
    }

    /// A request arrived: the cache is no longer idle.
    fn wake(&mut self) {
        if self.idle {
            self.idle = false;
            if let Some(c) = self.cache.as_deref_mut() {
                c.set_idle(false);
            }
        }
    }

    fn execute(&mut self, cmd: Command) {
        match cmd {
            Command::ZeroBuf { buf } => {
                if let Buf::Req { req, off, len } = buf {
                    let mut scratch = Vec::new();
                    if let Some(idx) = self.reqs.index(req) {
                        let iovs = self.reqs.slots[idx as usize].iovs();
                        if !iovs.is_empty() && sub_iovs(iovs, off, len, &mut scratch) {
                            for v in &scratch {
                                // SAFETY: a sub-range of the pending request's buffer.
                                unsafe { ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                            }
                        }
                    }
                }
            }
            Command::Write {
                tag,
                dev,
                sector,
                buf,
                want_crc,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Write, dev);
                let ok = match buf {
                    Buf::Req { req, off, len } => {
                        let ok = self.attach_req(&mut d, req, off, len);
                        if ok && want_crc {
                            d.crc = Some(iov_crc(&d.iovs));
                        }
                        ok
                    }
                    Buf::Owned(v) => self.attach_vec(&mut d, v),
                };
                let sectors = d.sectors;
                if !ok || !self.set_range(&mut d, sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_writes += 1;
                self.issue(d);
            }
            Command::Read {
                tag,
                dev,
                sector,
                buf,
                verify_crc,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Read, dev);
                let ok = match &buf {
                    Buf::Req { req, off, len } => self.attach_req(&mut d, *req, *off, *len),
                    Buf::Owned(_) => false,
                };
                d.verify = verify_crc;
                let sectors = d.sectors;
                if !ok || !self.set_range(&mut d, sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_reads += 1;
                self.issue(d);
            }
            Command::Flush { tag, dev } => {
                let i = dev_index(dev);
                if !self.flush_ok[i] && !self.removed[i] {
                    // No volatile cache to flush: completed writes are durable.
                    self.dones.push(IoDone::ok(tag));
                    return;
                }
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Flush, dev);
                d.offset = 0;
                d.blocks = self.blocks[i];
                self.counters.dev_flushes += 1;
                self.issue(d);
            }
            // Both read as zeros afterwards: write zeroes (the bdev layer emulates it with
            // writes where the device has no native support). An UNMAP of the backing bdev
            // need not read back as zeros, which the engine relies on.
            Command::WriteZeroes {
                tag,
                dev,
                sector,
                sectors,
            }
            | Command::Unmap {
                tag,
                dev,
                sector,
                sectors,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Zeroes, dev);
                if !self.set_range(&mut d, sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_zeroes += 1;
                self.issue(d);
            }
            Command::Copy {
                tag,
                src,
                src_sector,
                dst,
                dst_sector,
                sectors,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::CopyRead, src);
                let len = usize::try_from(sectors.saturating_mul(512)).unwrap_or(usize::MAX);
                let Some(buf) = self.dma.get(len) else {
                    spdk_log!(
                        ERROR,
                        "{}: out of DMA memory for a {len}-byte copy",
                        self.name
                    );
                    return self.fail_now(d);
                };
                d.iovs.push(ffi::iovec {
                    iov_base: buf.ptr.cast(),
                    iov_len: len,
                });
                d.dma = Some(buf);
                d.copy_dst = (dst, dst_sector);
                if !self.set_range(&mut d, src_sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_copies += 1;
                self.issue(d);
            }
        }
    }

    /// A command that could not even be issued: fail it now.
    fn fail_now(&mut self, d: Box<DevIo>) {
        self.counters.dev_errors += 1;
        if d.purpose == Purpose::Cmd {
            self.dones.push(IoDone {
                tag: d.tag,
                result: Err(IoError::Device),
                crc: None,
            });
            self.kick = true;
        }
        self.recycle(d);
    }

    fn issue(&mut self, d: Box<DevIo>) {
        self.inflight += 1;
        let i = dev_index(d.dev);
        if self.removed[i] {
            return self.complete_dio(d, false);
        }
        if d.dev == Dev::Cache {
            if let Some(dax) = self.dax.as_mut() {
                if d.purpose == Purpose::Direct && d.kind == Kind::Write {
                    // Completed after the batch's one fence (`fence_direct_writes`).
                    let ok = dax_write(dax, d.offset, &d.iovs, &mut self.dax_bounce, false);
                    self.unfenced.push((d, ok));
                    return;
                }
                let ok = dax_run(dax, &d, &mut self.dax_bounce);
                if !ok {
                    spdk_log!(ERROR, "{}: mapped cache I/O failed", self.name);
                }
                self.dax_done.push_back((d, ok));
                if !self.dax_busy {
                    self.dax_busy = true;
                    while let Some((d, ok)) = self.dax_done.pop_front() {
                        self.complete_dio(d, ok);
                    }
                    self.dax_busy = false;
                }
                return;
            }
        }
        let raw = Box::into_raw(d);
        // SAFETY: `raw` is a live DevIo of this engine; its iovecs point at live buffers.
        let rc = unsafe { submit_raw(self, raw) };
        if rc == 0 {
            return;
        }
        // SAFETY: not submitted, so still ours.
        if rc == -libc::ENOMEM && unsafe { self.queue_wait(raw) } {
            return;
        }
        spdk_log!(
            ERROR,
            "{}: {} bdev I/O submission failed: rc {rc}",
            self.name,
            DEV_NAMES[i]
        );
        // SAFETY: not submitted nor queued: ours again.
        let d = unsafe { Box::from_raw(raw) };
        self.complete_dio(d, false);
    }

    /// Waits for a free `spdk_bdev_io` on `raw`'s device, then resubmits (`dev_retry`).
    ///
    /// # Safety
    /// `raw` is a live DevIo of this engine not submitted or queued anywhere.
    unsafe fn queue_wait(&mut self, raw: *mut DevIo) -> bool {
        self.counters.nomem_waits += 1;
        // SAFETY: per the contract; the entry lives in the boxed DevIo, which stays put
        // until the callback takes it back.
        unsafe {
            let i = dev_index((*raw).dev);
            let w = ptr::addr_of_mut!((*raw).wait);
            ptr::write_bytes(w, 0, 1);
            (*w).bdev = self.bdev[i];
            (*w).cb_fn = Some(dev_retry);
            (*w).cb_arg = raw.cast();
            ffi::spdk_bdev_queue_io_wait(self.bdev[i], self.ch[i], w) == 0
        }
    }

    /// A device I/O finished (or failed to start).
    fn complete_dio(&mut self, mut d: Box<DevIo>, ok: bool) {
        self.inflight -= 1;
        if !ok {
            self.counters.dev_errors += 1;
        }
        match d.purpose {
            Purpose::Cmd => {
                let mut ok = ok;
                if d.kind == Kind::CopyRead && ok {
                    let (dev, sector) = d.copy_dst;
                    d.kind = Kind::CopyWrite;
                    d.dev = dev;
                    let sectors = d.sectors;
                    if self.set_range(&mut d, sector, sectors) {
                        return self.issue(d);
                    }
                    ok = false;
                }
                let mut result = if ok { Ok(()) } else { Err(IoError::Device) };
                if ok && d.kind == Kind::Read {
                    if let Some(want) = d.verify {
                        if iov_crc(&d.iovs) != want {
                            self.counters.crc_mismatches += 1;
                            result = Err(IoError::CrcMismatch);
                        }
                    }
                }
                self.dones.push(IoDone {
                    tag: d.tag,
                    result,
                    crc: d.crc,
                });
                self.kick = true;
                self.recycle(d);
            }
            Purpose::Direct => self.finish_direct(d, ok),
            Purpose::Open => {
                let data = if ok {
                    let mut v = Vec::new();
                    for iov in &d.iovs {
                        // SAFETY: our DMA buffer, filled by the completed read.
                        v.extend_from_slice(unsafe {
                            std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
                        });
                    }
                    Ok(v)
                } else {
                    Err(IoError::Device)
                };
                self.recycle(d);
                if self.state == State::Opening {
                    self.open_read_done(data);
                }
            }
            Purpose::Format => {
                self.recycle(d);
                if self.state == State::Opening {
                    self.format_io_done(ok);
                }
            }
        }
    }

    // ---- housekeeping (slow poller) ----

    fn writeback_failed(&self) -> bool {
        self.cache
            .as_deref()
            .is_some_and(|c| c.shards().iter().any(|s| s.writeback_failed()))
    }

    fn housekeeping(&mut self) -> bool {
        let mut busy = false;
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
                    Err("writeback to the backing bdev failed (device error): dirty data stays in the cache".to_string())
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
    fn finish_resets(&mut self) {
        if !self.resets.is_empty()
            && self.reqs.live + self.direct_live == 0
            && self.inbox.held() == 0
        {
            for io in std::mem::take(&mut self.resets) {
                self.finish_io(io, st::SPDK_BDEV_IO_STATUS_SUCCESS, Reply::Inbox);
            }
        }
    }

    /// Fails every pending request whose buffer no device I/O uses; the engine's later
    /// commands or completions for them find no live slot and are dropped.
    fn fail_all_requests(&mut self) {
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

    fn ready_to_free(&self) -> bool {
        self.state == State::Quiescing && self.inflight == 0
    }

    /// Frees the engine and exits its thread. Reports to `open_done` / `stop_done` on the
    /// app thread.
    ///
    /// # Safety
    /// On the engine thread, at the top level of a message or poller (nothing borrows the
    /// engine), with no device I/O in flight.
    unsafe fn teardown(eng: *mut Engine) {
        // SAFETY: per the contract we own the engine now.
        let mut e = unsafe { Box::from_raw(eng) };
        for p in [&mut e.fast, &mut e.slow] {
            if !p.is_null() {
                // SAFETY: registered on this thread; unregistering from inside a poller is
                // allowed.
                unsafe { ffi::spdk_poller_unregister(p) };
            }
        }
        // Requests the engine still holds (a base bdev vanished under them) fail.
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
        // SAFETY: we are on the engine thread (its pollers and channels are gone).
        unsafe { ffi::spdk_thread_exit(msg::current()) };
    }

    /// This engine's share of the statistics (see [`render_stats`]).
    fn stats_part(&self) -> StatsPart {
        let c = self.counters;
        let host = json!({
            "requests": c.requests,
            "requests_failed": c.requests_failed,
            "requests_in_flight": self.reqs.live + self.direct_live,
            "device_reads": c.dev_reads,
            "device_writes": c.dev_writes,
            "device_copies": c.dev_copies,
            "device_flushes": c.dev_flushes,
            "device_write_zeroes": c.dev_zeroes,
            "device_errors": c.dev_errors,
            "device_io_in_flight": self.inflight,
            "nomem_waits": c.nomem_waits,
            "requests_same_core": c.arrived_same_core,
            "requests_served_by_submitter": c.served_by_submitter,
            "requests_queue_pair": c.arrived_queue_pair,
            "requests_by_message": c.arrived_by_message,
            "crc_mismatches": c.crc_mismatches,
            "resets": c.resets,
            "idle": self.idle,
            "draining": self.drain_on,
        });
        StatsPart {
            host,
            cache: self
                .cache
                .as_deref()
                .map(|c| (c.stats(), c.geometry().segment_sectors)),
        }
    }
}

/// One engine's statistics, merged across a team by [`render_stats`].
struct StatsPart {
    host: Value,
    cache: Option<(crate::engine::CacheStats, u32)>,
}

/// Adds the numbers of `b` into `a` (objects field by field; booleans: any).
fn add_json(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(x) => add_json(x, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x1), Some(y1)) = (x.as_u64(), y.as_u64()) {
                *x = (x1 + y1).into();
            }
        }
        (Value::Bool(x), Value::Bool(y)) => *x |= *y,
        _ => {}
    }
}

/// The `bdev_pcache_get_stats` body from every engine's part.
fn render_stats(parts: Vec<StatsPart>) -> Value {
    let mut host = json!({});
    let mut cache: Option<(crate::engine::CacheStats, u32)> = None;
    let engines = parts.len();
    for p in parts {
        add_json(&mut host, &p.host);
        match (&mut cache, p.cache) {
            (Some((s, _)), Some((o, _))) => s.merge(o),
            (None, Some(x)) => cache = Some(x),
            _ => {}
        }
    }
    host["engine_threads"] = json!(engines);
    let Some((s, segment_sectors)) = cache else {
        return json!({"host": host});
    };
    let seg_bytes = u64::from(segment_sectors) * 512;
    let capacity = u64::from(s.segments_total) * seg_bytes;
    let free = u64::from(s.segments_free) * seg_bytes;
    let pct = |x: u64| {
        if capacity == 0 {
            0.0
        } else {
            (x as f64 * 1000.0 / capacity as f64).round() / 10.0
        }
    };
    let t = &s.total;
    json!({
        "usage": {
            "capacity_bytes": capacity,
            "clean": {"bytes": s.clean_bytes, "percent": pct(s.clean_bytes)},
            "dirty": {"bytes": s.dirty_bytes, "percent": pct(s.dirty_bytes)},
            "free": {"bytes": free, "percent": pct(free)},
            "segments_total": s.segments_total,
            "segments_free": s.segments_free,
            "extents": s.extents,
        },
        "requests": {
            "reads": t.reads,
            "writes": t.writes,
            "discards": t.discards,
            "read_hit_sectors": t.read_hit_sectors,
            "read_miss_sectors": t.read_miss_sectors,
            "in_place_writes": t.in_place_writes,
            "inline_reads": t.inline_reads,
            "direct": t.direct,
            "cache_full_waits": t.cache_full_waits,
        },
        "errors": {
            "io_errors": t.io_errors,
            "crc_errors": t.crc_errors,
            "wb_errors": t.wb_errors,
            "kset_retries": t.kset_retries,
            "requests_failed": host["requests_failed"].clone(),
            "device_errors": host["device_errors"].clone(),
        },
        "writeback": {
            "dirty_bytes": s.wb_dirty_bytes,
            "failed": s.wb_failed,
            "epoch": s.epoch,
            "gc_percent": s.gc_percent,
        },
        "engine": s,
        "host": host,
    })
}

/// Splits bytes `off..off+len` of the buffer described by `iovs` into `out`.
fn sub_iovs(iovs: &[ffi::iovec], off: u64, len: u64, out: &mut Vec<ffi::iovec>) -> bool {
    out.clear();
    let mut skip = off;
    let mut want = len;
    for v in iovs {
        if want == 0 {
            break;
        }
        let l = v.iov_len as u64;
        if skip >= l {
            skip -= l;
            continue;
        }
        let take = (l - skip).min(want);
        out.push(ffi::iovec {
            // SAFETY: `skip < l`: still inside this iovec's buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip as usize).cast() },
            iov_len: take as usize,
        });
        want -= take;
        skip = 0;
    }
    want == 0
}

fn iov_crc(iovs: &[ffi::iovec]) -> u32 {
    let mut crc = 0;
    for v in iovs {
        // SAFETY: every iovec we build points at `iov_len` live bytes (a pending request's
        // buffer or our DMA buffer).
        let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
        crc = crc32c::crc32c_append(crc, s);
    }
    crc
}

/// Executes `d` on the mapped cache (512-byte blocks): done when this returns.
fn dax_run(dax: &mut DaxDevice, d: &DevIo, bounce: &mut Vec<u8>) -> bool {
    let sector = d.offset;
    match d.kind {
        Kind::Flush => dax.flush().is_ok(),
        Kind::Zeroes => dax.write_zeroes(sector, d.blocks).is_ok(),
        Kind::Read | Kind::CopyRead => dax_read(dax, sector, &d.iovs, bounce),
        Kind::Write | Kind::CopyWrite => dax_write(dax, sector, &d.iovs, bounce, true),
    }
}

/// The bytes an iovec we built names.
///
/// # Safety
/// `v` points at `iov_len` live bytes (a pending request's buffer, our DMA buffer or a
/// DevIo's owned bytes), none inside the mapping, not otherwise borrowed while the slice
/// lives.
unsafe fn iov_bytes<'a>(v: &ffi::iovec) -> &'a mut [u8] {
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) }
}

/// Runs `f(first sector, bytes)` for each of `iovs` in turn, laid over consecutive sectors
/// from `sector`, until one fails. None: an iovec is not a whole number of sectors (the
/// caller goes through a bounce buffer instead).
fn per_iov(
    sector: u64,
    iovs: &[ffi::iovec],
    mut f: impl FnMut(u64, &mut [u8]) -> bool,
) -> Option<bool> {
    if iovs.iter().any(|v| v.iov_len % 512 != 0) {
        return None;
    }
    let mut s = sector;
    for v in iovs {
        // SAFETY: an iovec we built or were given (see `iov_bytes`); each slice is used
        // alone and dropped before the next one is made.
        if !f(s, unsafe { iov_bytes(v) }) {
            return Some(false);
        }
        s += (v.iov_len / 512) as u64;
    }
    Some(true)
}

/// Copies sectors from `sector` of the mapped cache into `iovs`.
fn dax_read(dax: &mut DaxDevice, sector: u64, iovs: &[ffi::iovec], bounce: &mut Vec<u8>) -> bool {
    if let Some(ok) = per_iov(sector, iovs, |s, b| dax.read(s, b).is_ok()) {
        return ok;
    }
    bounce.resize(iovs.iter().map(|v| v.iov_len).sum(), 0);
    if dax.read(sector, bounce).is_err() {
        return false;
    }
    let mut at = 0;
    for v in iovs {
        // SAFETY: as in `per_iov`.
        unsafe { iov_bytes(v) }.copy_from_slice(&bounce[at..at + v.iov_len]);
        at += v.iov_len;
    }
    true
}

/// Copies `iovs` to the mapped cache at `sector`: persisted when this returns if `fenced`,
/// else at the device's next fence (`DaxDevice::write_unfenced`).
fn dax_write(
    dax: &mut DaxDevice,
    sector: u64,
    iovs: &[ffi::iovec],
    bounce: &mut Vec<u8>,
    fenced: bool,
) -> bool {
    let mut write = |s: u64, b: &[u8]| {
        if fenced {
            dax.write(s, b).is_ok()
        } else {
            dax.write_unfenced(s, b).is_ok()
        }
    };
    if let Some(ok) = per_iov(sector, iovs, |s, b| write(s, b)) {
        return ok;
    }
    bounce.clear();
    for v in iovs {
        // SAFETY: as in `per_iov`.
        bounce.extend_from_slice(unsafe { iov_bytes(v) });
    }
    write(sector, bounce)
}

/// Starts loading what the index lookups of a batch of requests will read, `(cache, lba,
/// len)` each, in two passes whose cache misses overlap across the batch: each lookup's
/// first line, then the second line that the first leads to.
fn prefetch_lookups<'a>(lookups: impl Iterator<Item = (&'a Cache, u64, u32)> + Clone) {
    for (c, lba, len) in lookups.clone() {
        prefetch_first(c, lba, len);
    }
    for (c, lba, len) in lookups {
        prefetch_second(c, lba, len);
    }
}

/// The first stage of a lookup's prefetch ([`ExtentMap::first_line`](crate::engine::index::ExtentMap::first_line)).
fn prefetch_first(c: &Cache, lba: u64, len: u32) {
    io::prefetch(
        c.index_of(lba)
            .map_or(ptr::null(), |m| m.first_line(lba, len)),
    );
}

/// The second, once the first is loaded (none for a lookup inside one 4 KiB block).
fn prefetch_second(c: &Cache, lba: u64, len: u32) {
    io::prefetch(
        c.index_of(lba)
            .map_or(ptr::null(), |m| m.second_line(lba, len)),
    );
}

/// Sends a finished request ([`io::completion_arg`]) back to its submitting thread to be
/// completed there.
fn send_completion(arg: *mut c_void) -> bool {
    let (io, _) = io::from_completion_arg(arg);
    // SAFETY: a pending request; `io::complete_remote_msg` completes it on its own thread.
    unsafe {
        let th = ffi::spdk_bdev_io_get_thread(io);
        ffi::spdk_thread_send_msg(th, Some(io::complete_remote_msg), arg) == 0
    }
}

/// Issues `d` on its device.
///
/// # Safety
/// `d` is a live DevIo of `e`, owned by the caller; on success SPDK owns it until `dev_done`.
unsafe fn submit_raw(e: &Engine, d: *mut DevIo) -> c_int {
    // SAFETY: per the contract; every buffer named by the iovecs is live until completion.
    unsafe {
        let dio = &mut *d;
        let i = dev_index(dio.dev);
        let (desc, ch) = (e.desc[i], e.ch[i]);
        let cb = Some(dev_done as unsafe extern "C" fn(*mut ffi::spdk_bdev_io, bool, *mut c_void));
        let arg = d.cast::<c_void>();
        match dio.kind {
            Kind::Read | Kind::CopyRead => ffi::spdk_bdev_readv_blocks(
                desc,
                ch,
                dio.iovs.as_mut_ptr(),
                dio.iovs.len() as c_int,
                dio.offset,
                dio.blocks,
                cb,
                arg,
            ),
            Kind::Write | Kind::CopyWrite => ffi::spdk_bdev_writev_blocks(
                desc,
                ch,
                dio.iovs.as_mut_ptr(),
                dio.iovs.len() as c_int,
                dio.offset,
                dio.blocks,
                cb,
                arg,
            ),
            Kind::Flush => ffi::spdk_bdev_flush_blocks(desc, ch, dio.offset, dio.blocks, cb, arg),
            Kind::Zeroes => {
                ffi::spdk_bdev_write_zeroes_blocks(desc, ch, dio.offset, dio.blocks, cb, arg)
            }
        }
    }
}

unsafe extern "C" fn dev_done(bdev_io: *mut ffi::spdk_bdev_io, success: bool, arg: *mut c_void) {
    no_unwind("pcache dev_done", (), || {
        // Free first: this may synchronously resubmit DevIos waiting for memory
        // (`dev_retry`), which borrow the engine themselves.
        // SAFETY: the base request SPDK allocated for us; we are done with it.
        unsafe { ffi::spdk_bdev_free_io(bdev_io) };
        // SAFETY: `arg` is the DevIo we submitted; it is ours again.
        let d = unsafe { Box::from_raw(arg.cast::<DevIo>()) };
        let eng = d.eng;
        // SAFETY: the engine outlives its device I/O (teardown waits for `inflight == 0`);
        // completions run on the engine thread, where nothing else borrows it now.
        unsafe { (*eng).complete_dio(d, success) };
    })
}

unsafe extern "C" fn dev_retry(arg: *mut c_void) {
    no_unwind("pcache dev_retry", (), || {
        let raw = arg.cast::<DevIo>();
        // SAFETY: the queued DevIo; its engine is alive (inflight counts it).
        let e = unsafe { &mut *(*raw).eng };
        // SAFETY: `raw` is ours again (the wait entry fired).
        let rc = unsafe { submit_raw(e, raw) };
        if rc == 0 {
            return;
        }
        // SAFETY: not submitted: still ours.
        if rc == -libc::ENOMEM && unsafe { e.queue_wait(raw) } {
            return;
        }
        // SAFETY: neither submitted nor queued.
        let d = unsafe { Box::from_raw(raw) };
        e.complete_dio(d, false);
    })
}

unsafe extern "C" fn fast_poll(arg: *mut c_void) -> c_int {
    no_unwind("pcache engine poller", 0, || {
        // SAFETY: the engine registered this poller with itself as argument and unregisters
        // it before being freed; pollers run at the top level of the engine thread.
        let e = unsafe { &mut *arg.cast::<Engine>() };
        // Requests served directly leave nothing to pump but were work all the same.
        let took = e.submit_incoming();
        if matches!(e.state, State::Running | State::Draining) {
            e.finish_resets();
        }
        if !e.kick && e.dones.is_empty() {
            return if took {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
            } else {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
            };
        }
        e.kick = false;
        if matches!(e.state, State::Running | State::Draining) && (e.pump() || took) {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
        } else {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
        }
    })
}

unsafe extern "C" fn slow_poll(arg: *mut c_void) -> c_int {
    no_unwind("pcache housekeeping poller", 0, || {
        let eng = arg.cast::<Engine>();
        // SAFETY: as in `fast_poll`.
        let e = unsafe { &mut *eng };
        let took = e.submit_incoming();
        if e.ready_to_free() {
            if e.is_worker() {
                // The lead ends the team (two-phase stop, see `team`).
                e.park();
                return ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int;
            }
            if !e.team_done() {
                e.report_frontier();
                return ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int;
            }
            // SAFETY: top level of a poller on the engine thread, nothing in flight.
            unsafe { Engine::teardown(eng) };
            return ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int;
        }
        if e.housekeeping() || took {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
        } else {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
        }
    })
}

// ---- messages from other threads ----

/// The engine of `io`'s bdev that runs on this thread.
fn engine_here(io: *mut ffi::spdk_bdev_io) -> *mut Engine {
    // SAFETY: a pending request of a pcache bdev; `ctxt` is its live node, whose engine
    // and team were set before registration and stay valid while requests are pending.
    let node = unsafe { &*(*(*io).bdev).ctxt.cast::<super::vbdev::Pcache>() };
    let here = msg::current();
    node.team()
        .iter()
        .find(|p| p.thread == here)
        .map_or_else(|| node.engine(), |p| p.eng)
}

/// Gives `p`'s engine the engine's ends of a new queue pair (`link`), by message.
pub(crate) fn attach_link(p: Peer, end: EngineEnd) -> Result<(), ()> {
    team::send(p, move |e| e.add_link(end))
}

/// Engine-thread entry of a request (`spdk_thread_send_msg` argument: the bdev_io).
pub(crate) unsafe extern "C" fn submit_msg(arg: *mut c_void) {
    no_unwind("pcache submit", (), || {
        let io = arg.cast::<ffi::spdk_bdev_io>();
        // SAFETY: on the engine thread at the top level of a message.
        let e = unsafe { &mut *engine_here(io) };
        io::prefetch_request(io);
        // SAFETY: on the engine thread.
        unsafe { e.inbox.push(io) };
    })
}

/// Engine-thread entry of a RESET: completes once no request is in flight.
pub(crate) unsafe extern "C" fn reset_msg(arg: *mut c_void) {
    no_unwind("pcache reset", (), || {
        let io = arg.cast::<ffi::spdk_bdev_io>();
        // SAFETY: as in `submit_msg`.
        let e = unsafe { &mut *engine_here(io) };
        e.submit_incoming();
        e.counters.resets += 1;
        e.resets.push(io);
    })
}

/// Runs `f` on the engine at the top level of its thread. Err if the message cannot be sent.
fn with_engine(
    thread: *mut ffi::spdk_thread,
    eng: *mut Engine,
    f: impl FnOnce(&mut Engine) + 'static,
) -> Result<(), ()> {
    let p = SendPtr(eng);
    msg::send(thread, move || {
        // SAFETY: the engine lives until its teardown, which only follows a stop; callers
        // send no message after the stop message (same sender, FIFO delivery).
        let e = unsafe { &mut *p.0 };
        // Requests received before this message are handled before it.
        e.submit_incoming();
        f(e)
    })
}

/// Every engine of the team `e` leads (itself alone when it has none).
fn members(e: &Engine) -> Vec<Peer> {
    if e.team.peers.is_empty() {
        vec![e.peer()]
    } else {
        e.team.peers.to_vec()
    }
}

/// Runs `f` on every engine of the lead's team (each on its thread), then `then` with the
/// results, on the thread of the last one to answer. A member that cannot be reached
/// counts as `missing`.
fn on_team<T: 'static>(
    e: &Engine,
    f: impl Fn(&mut Engine) -> T + Clone + 'static,
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

/// Gathers the statistics of every engine; `done` runs on the app thread.
pub(crate) fn stats(
    thread: *mut ffi::spdk_thread,
    eng: *mut Engine,
    done: Box<dyn FnOnce(Value)>,
) -> Result<(), ()> {
    with_engine(thread, eng, move |e| {
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

/// Writes back everything dirty; `done` runs on the app thread once every engine's cache
/// is clean (or writeback failed).
pub(crate) fn drain(thread: *mut ffi::spdk_thread, eng: *mut Engine, done: Done) -> Result<(), ()> {
    with_engine(thread, eng, move |e| {
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
                // Answered on the app thread by the engine's housekeeping.
                w.drain_waiters.push(Box::new(move |r| Gather::put(&g2, r)));
            });
            if sent.is_err() {
                Gather::put(&g, Err("cannot reach an engine thread".into()));
            }
        }
    })
}

/// Starts writing back everything dirty (`bdev_pcache_flush_start`).
pub(crate) fn flush_start(thread: *mut ffi::spdk_thread, eng: *mut Engine) -> Result<(), ()> {
    with_engine(thread, eng, |e| {
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
    eng: *mut Engine,
    done: Box<dyn FnOnce(Value)>,
) -> Result<(), ()> {
    with_engine(thread, eng, move |e| {
        let (app, name) = (e.app_thread, e.name.clone());
        on_team(
            e,
            |w| {
                let failed = w.writeback_failed();
                match w.cache.as_deref() {
                    Some(c) => (c.dirty_bytes(), c.is_clean(), w.flushing, failed),
                    None => (0, false, false, failed),
                }
            },
            || (0, false, false, true),
            move |parts| {
                let v = json!({
                    "dirty_bytes": parts.iter().map(|p| p.0).sum::<u64>(),
                    "clean": parts.iter().all(|p| p.1),
                    "flushing": parts.iter().any(|p| p.2),
                    "writeback_failed": parts.iter().any(|p| p.3),
                });
                if msg::send(app, move || done(v)).is_err() {
                    spdk_log!(ERROR, "{name}: cannot return flush status");
                }
            },
        );
    })
}

/// Changes writeback pacing / gc_percent: `f` maps the current options to the new ones (or
/// an error); `done` runs on the app thread with the options in effect. The lead decides;
/// the other engines take the same options.
pub(crate) fn set_options(
    thread: *mut ffi::spdk_thread,
    eng: *mut Engine,
    f: impl FnOnce(WritebackOptions) -> Result<WritebackOptions, String> + 'static,
    done: Box<dyn FnOnce(Result<WritebackOptions, String>)>,
) -> Result<(), ()> {
    with_engine(thread, eng, move |e| {
        let r = match e.cache.as_deref_mut() {
            None => Err("the cache is not running".to_string()),
            Some(c) => f(c.writeback_options()).and_then(|o| {
                c.set_writeback_options(o)
                    .map(|()| c.writeback_options())
                    .map_err(|err| err.to_string())
            }),
        };
        e.kick = true;
        if let Ok(o) = r {
            for p in members(e).into_iter().skip(1) {
                let _ = team::send(p, move |w| {
                    if let Some(c) = w.cache.as_deref_mut() {
                        // Validated by the lead.
                        let _ = c.set_writeback_options(o);
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

/// A base bdev is being removed: fail every command for it from now on.
pub(crate) fn base_removed(
    thread: *mut ffi::spdk_thread,
    eng: *mut Engine,
    dev: Dev,
) -> Result<(), ()> {
    with_engine(thread, eng, move |e| {
        for p in members(e) {
            let _ = team::send(p, move |w| {
                w.removed[dev_index(dev)] = true;
                w.kick = true;
            });
        }
    })
}

/// Stops every engine (after writing back everything when `drain`), releases their
/// channels and exits their threads, the lead last; `done` runs on the app thread
/// afterwards (Err if a drain failed).
pub(crate) fn stop(
    thread: *mut ffi::spdk_thread,
    eng: *mut Engine,
    drain: bool,
    done: Done,
) -> Result<(), ()> {
    with_engine(thread, eng, move |e| {
        e.stop_done = Some(done);
        e.begin_stop(drain);
        e.stop_workers(drain);
    })
}
