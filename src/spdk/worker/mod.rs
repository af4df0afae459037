//! The worker threads of a pcache bdev: SPDK threads that each run the sans-I/O
//! [`Cache`] (or, in a team, its part of it: see [`team`]) and execute its device commands
//! against the cache and backing bdevs.
//!
//! The lead worker of a pcache bdev gets its own SPDK thread (bound to one core of the app's
//! mask, chosen round-robin from the last core), the others one each on the following
//! cores. Everything that touches a worker's [`Cache`] or its base bdev channels happens
//! on its thread:
//! - requests arrive in the worker's [`Inbox`]: by message from threads on other cores
//!   (`submit_msg`, the `spdk_bdev_io` as argument), pushed directly by threads pinned to
//!   the worker's own core, or on the queue pairs of [`link`](super::link); the next poll
//!   submits them to the cache together. Completions go back by message to the thread that
//!   submitted them, or on the queue pair, or, for a thread on this core, are delivered at
//!   once as that thread (see [`reply`]);
//! - a period-0 poller runs the cache (poll, drain commands, execute them) whenever a
//!   request or a device completion arrived, so concurrent requests are group-committed; a
//!   1 ms poller keeps writeback going, detects idleness (10 ms without requests), resolves
//!   drains and resets, and tears the worker down when it stops;
//! - opening (reading the superblock and replaying the log with the engine's [`Opener`]) and
//!   formatting run here too, with DMA buffers, before the bdev is registered.
//!
//! A request buffer a command names ([`Buf::Req`]) belongs to a live request: each request
//! holds a slot in `reply::Reqs`, addressed by the id handed to the cache (slot index and a
//! generation, so a stale id never reaches a recycled slot). A request completes only when
//! the cache completed it *and* no device command using its buffer is still in flight.
//!
//! With a mapped cache (`cache_path`: a [`DaxDevice`], no cache bdev) the same device I/O
//! descriptions are built, and `issue` executes those for the cache inline (see [`mapped`])
//! and completes them at once; backing I/O stays asynchronous.
//!
//! Device errors become `IoError::Device`; a submission refused for want of a
//! `spdk_bdev_io` (-ENOMEM) is queued by the worker and submitted again by its next polls
//! (not `spdk_bdev_queue_io_wait`, which only wakes on a bdev_io freed on the same
//! thread). After a base bdev is hot-removed every command for it fails at once, so
//! requests that need it fail and the rest finish.
//!
//! One file per role, each an `impl Worker` block or free functions over it:
//! - this file: the [`Worker`] state, what creates it ([`Setup`]) and what an open reports;
//! - [`lifecycle`]: threads and cores, spawn, start, stop and teardown;
//! - [`open`]: the open/format driver (superblock reads, replay, formatting writes);
//! - [`intake`]: requests arriving (messages, inbox, queue pairs), the batch's look-ahead,
//!   and requests served directly from the cache device;
//! - [`reply`]: request slots, the request's driver context ([`IoCtx`]) and completions
//!   back to the submitting threads;
//! - [`commands`]: the fast poller and the cache pump (poll, execute commands);
//! - [`devio`]: device I/O on the base bdevs ([`dma`]: its DMA buffer pool);
//! - [`mapped`]: the mapped-cache (DAX) path, inline copies and one fence per batch;
//! - [`housekeeping`]: the slow poller: idleness, drains, resets, stranded requests;
//! - [`control`]: messages from the app thread (stats, flush, options, removal, stop);
//! - [`stats`]: this worker's share of `bdev_pcache_get_stats`;
//! - [`team`]: what the workers of one bdev share; [`roster`]: the workers as the request
//!   path sees them (lead, team, routing); [`inbox`]: the same-core queue; [`local`]: the
//!   worker's side of requests served by the submitting thread itself (`io::served`).
//!
//! Called from above by `io` (requests), `vbdev` and `rpc` (control); calls go down only:
//! to `link`, `msg`, `stats`, `ffi`, `log`, and the plain Rust of `crate::shell`.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;

mod commands;
mod control;
mod copyrun;
mod datarun;
mod devio;
mod dma;
mod housekeeping;
mod inbox;
mod intake;
mod lifecycle;
pub(crate) mod local;
mod mapped;
mod open;
mod reply;
mod roster;
mod stats;
mod team;

pub(crate) use control::{
    base_removed, drain, flush_start, flush_status, set_options, stats, stop,
};
use inbox::Inbox;
pub(crate) use intake::{attach_link, prefetch_first, prefetch_second, reset_msg, submit_msg};
pub(crate) use lifecycle::{app_cores, spawn};
pub(crate) use local::Local;
pub(crate) use reply::{bytes, complete, complete_here, ctx, fanout_done, IoCtx};
pub(crate) use roster::{Roster, Route};
pub(crate) use team::Peer;
use team::TeamState;

use crate::engine::{
    BackingIdentity, Cache, CacheOptions, Command, Dev, FormatOptions, IoDone, Op, Opener, ReqId,
    ReqResult, Superblock,
};
use crate::media::dax::DaxDevice;
use crate::media::BlockDevice;
use crate::shell::stats::Counters;

use super::ffi::{self, spdk_bdev_io_type as t};
use super::link::{Desc, WorkerEnd};
use devio::DevIo;
use dma::DmaPool;
use open::FormatPhase;
use reply::{Reply, Reqs};

/// What the app thread hands to a new worker.
pub(crate) struct Setup {
    pub name: String,
    /// Core for the worker thread; None: round-robin.
    pub core: Option<u32>,
    pub app_thread: *mut ffi::spdk_thread,
    /// Indexed by [`dev_index`]: cache, backing.
    pub desc: [*mut ffi::spdk_bdev_desc; 2],
    pub bdev: [*mut ffi::spdk_bdev; 2],
    pub identity: BackingIdentity,
    /// For the message of an open that refuses the backing bdev (`shell::identity`).
    pub describe: Describe,
    pub format: FormatOptions,
    pub cache_options: CacheOptions,
    /// Size of the cache bdev.
    pub cache_bytes: u64,
    /// The mapped cache (`cache_path`): `desc[0]` / `bdev[0]` are null and every cache
    /// command completes inline on the worker thread.
    pub dax: Option<DaxDevice>,
    /// Worker threads wanted (one per core by default; at most one per shard).
    pub workers: usize,
    /// Writeback may borrow the cache bdev's memory (`Options::zero_copy`).
    pub zero_copy: bool,
}

/// What the worker needs to explain a refused backing bdev (`shell::identity::Mismatch`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Describe {
    /// rpc.py arguments of the create (`CreateConfig::create_args`).
    pub create_args: String,
    /// `CreateConfig::cache_label`.
    pub cache_label: String,
    /// The SPDK module of the backing bdev ("aio", "malloc", "nvme", ...).
    pub backing_module: Option<String>,
}

/// The outcome of a successful open.
pub(crate) struct OpenInfo {
    pub sb: Superblock,
    pub formatted: bool,
    pub problems: Vec<String>,
    pub gc_percent: u32,
    /// The cache mode, sequential cut-off and write admission in effect (persisted, or the
    /// create's).
    pub mode: crate::engine::CacheMode,
    pub seq_cutoff: crate::engine::SeqCutoff,
    pub write_admission: crate::engine::WriteAdmission,
    /// Dirty data found in the log (not yet on the backing bdev).
    pub dirty_bytes: u64,
    /// The open accepted a backing bdev of another identity (`backing_uuid_mismatch:
    /// accept`): the identity the superblock recorded. The new one (`sb.backing`) is
    /// written to the superblock before the bdev is registered (a mapped cache's by the
    /// worker, a cache bdev's by `vbdev::update_superblock`).
    pub rebound: Option<BackingIdentity>,
    /// The worker threads, lead first (empty: the lead alone serves every request).
    pub team: Arc<[Peer]>,
}

pub(crate) type OpenDone = Box<dyn FnOnce(Result<OpenInfo, String>)>;
pub(crate) type Done = Box<dyn FnOnce(Result<(), String>)>;

/// A raw pointer moved into a message closure. The closures run on SPDK threads in an order
/// the code below guarantees; the wrapper only lets the pointer travel.
pub(crate) struct SendPtr<T>(pub *mut T);

/// The worker operation of a bdev_io type, if the worker serves it.
pub(crate) fn op_of(ty: t::Type) -> Option<Op> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Opening,
    Running,
    /// Stopping after writing back everything (delete).
    Draining,
    /// Stopping: no new work, waiting for device I/O in flight.
    Quiescing,
}

pub(crate) struct Worker {
    name: String,
    /// Place in the bdev's team of worker threads (0: the lead; see `team`).
    wid: usize,
    want_workers: usize,
    /// Core of this worker's thread (None: any).
    core: Option<u32>,
    team: TeamState,
    app_thread: *mut ffi::spdk_thread,
    desc: [*mut ffi::spdk_bdev_desc; 2],
    bdev: [*mut ffi::spdk_bdev; 2],
    ch: [*mut ffi::spdk_io_channel; 2],
    /// log2(block size / 512) per device.
    shift: [u32; 2],
    /// log2(block size / 512) of the pcache bdev: the larger of the backing bdev's and the
    /// cache's block size (set with the cache, see [`Worker::front_shift_of`]).
    front_shift: u32,
    blocks: [u64; 2],
    flush_ok: [bool; 2],
    /// The cache copies within itself (a cache bdev by COPY, a mapped cache from the
    /// mapping to itself): GC's moves go to it instead of through a host buffer.
    copy_offload: bool,
    /// The cache bdev lends its own memory (`spdk_bdev_zcopy_start`): writeback's reads of
    /// it copy nothing (`DevIo::lend`).
    zcopy: bool,
    removed: [bool; 2],
    identity: BackingIdentity,
    describe: Describe,
    fopts: FormatOptions,
    copts: CacheOptions,
    cache_bytes: u64,
    /// The mapped cache registered for base bdev transfers. Declared before `dax`, so
    /// dropped (unregistered) before the mapping is.
    dax_dma: Option<mapped::DmaRegistration>,
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
    /// The recorded identity an accepting open replaced (`OpenInfo::rebound`).
    open_rebound: Option<BackingIdentity>,
    stop_done: Option<Done>,

    reqs: Reqs,
    /// Direct requests in flight (`issue_direct`).
    direct_live: usize,
    /// Direct writes copied to the mapped cache, awaiting the batch's fence.
    unfenced: Vec<(Box<DevIo>, bool)>,
    cmds: Vec<Command>,
    /// Copies gathered to be joined into runs (`execute_all`), kept for their room.
    copies: Vec<copyrun::HostCopy>,
    /// Cache writes gathered to be joined (`execute_all`), kept for their room.
    writes: Vec<datarun::HostWrite>,
    dones: Vec<IoDone>,
    comps: Vec<(ReqId, ReqResult)>,
    // Boxed on purpose: a DevIo's address is its bdev I/O's callback argument.
    #[allow(clippy::vec_box)]
    dio_free: Vec<Box<DevIo>>,
    /// DevIos that found no free `spdk_bdev_io`, submitted again by the engine poller in
    /// this order (`resubmit_waiting`).
    nomem: VecDeque<Box<DevIo>>,
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
    links: Vec<Option<WorkerEnd>>,
    /// Scratch for `submit_incoming`.
    descs: Vec<(Desc, Reply)>,
    /// Completions whose message could not be sent yet (`link::completion_arg`s).
    unsent: Vec<*mut c_void>,
    /// Slow polls since a base bdev was removed with requests still pending.
    removed_polls: u32,
    counters: Counters,
}

fn shift_of(bdev: *mut ffi::spdk_bdev) -> u32 {
    // SAFETY: an open base bdev.
    let bl = unsafe { ffi::spdk_bdev_get_block_size(bdev) };
    (bl / 512).max(1).trailing_zeros()
}

/// The cache bdev lends its memory to zero-copy reads, and gives it back: a malloc bdev.
/// Modules that wrap another bdev pass zero-copy I/O on, but not soundly in SPDK v26.05:
/// a `bdev_part` module (error, split, gpt) marks the bdev_io as split, so its
/// `spdk_bdev_zcopy_end` never completes, and passthru starts the base's zero-copy
/// again instead of ending it.
fn lends_memory(bdev: *mut ffi::spdk_bdev) -> bool {
    // SAFETY: an open base bdev; its module's name is a static string.
    unsafe {
        let m = ffi::spdk_bdev_get_module_name(bdev);
        ffi::spdk_bdev_io_type_supported(bdev, t::SPDK_BDEV_IO_TYPE_ZCOPY)
            && !m.is_null()
            && std::ffi::CStr::from_ptr(m).to_bytes() == b"malloc"
    }
}

/// log2(block size / 512) of a pcache bdev over a backing bdev of `backing_shift` and
/// `cache`: requests must be whole blocks of both (see `fill_bdev`).
pub(crate) fn front_shift_of(backing_shift: u32, cache: &Cache) -> u32 {
    backing_shift.max(cache.geometry().block_sectors.trailing_zeros())
}

impl Worker {
    fn new(s: Setup) -> Self {
        // A mapped cache: same-core submitters copy its read hits out themselves; the
        // worker serves the rest inline, with one fence per batch of writes.
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
        let dax_dma = s
            .dax
            .as_ref()
            .and_then(|d| mapped::DmaRegistration::new(d, &s.name));
        let copy_offload = s.dax.is_some()
            // SAFETY: an open base bdev.
            || unsafe { ffi::spdk_bdev_io_type_supported(s.bdev[0], t::SPDK_BDEV_IO_TYPE_COPY) };
        let zcopy = s.zero_copy && s.dax.is_none() && lends_memory(s.bdev[0]);
        Worker {
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
            front_shift: shift_of(s.bdev[1]),
            blocks: [cblocks, blocks(s.bdev[1])],
            flush_ok: [cflush, flush(s.bdev[1])],
            copy_offload,
            zcopy,
            removed: [false; 2],
            identity: s.identity,
            describe: s.describe,
            fopts: s.format,
            copts: s.cache_options,
            cache_bytes: s.cache_bytes,
            dax_dma,
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
            open_rebound: None,
            stop_done: None,
            reqs: Reqs::default(),
            direct_live: 0,
            unfenced: Vec::new(),
            cmds: Vec::new(),
            copies: Vec::new(),
            writes: Vec::new(),
            dones: Vec::new(),
            comps: Vec::new(),
            dio_free: Vec::new(),
            nomem: VecDeque::new(),
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
}
