//! A pcache bdev: its two base bdevs, its `spdk_bdev`, the function table, and its life
//! from `bdev_pcache_create` to destruct.
//!
//! Threading: create, delete, hot-remove events, destruct and the JSON callbacks all run on
//! the app thread (the RPC thread, where the bases are opened). The cache itself runs on the
//! bdev's worker thread (`worker`), reached by message. The I/O path runs on any thread and
//! only reads the node's `io::Front`, fixed before `spdk_bdev_register` (the workers' roster).
//!
//! Create is asynchronous: open and claim both bases, start the worker thread, which reads
//! the cache bdev's superblock (reattach), formats it when it holds no pcache, or refuses
//! (another backing bdev's cache, damaged metadata); then register the bdev and answer.
//! Destruct is asynchronous too: stop the worker (after writing back everything if the
//! delete asked for it), which releases its channels and exits its thread; then close the
//! bases here and call `spdk_bdev_destruct_done`.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::{c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::base_io::{after, block_io, block_io_steps, BlockOp};
use super::ffi::{self, spdk_bdev_io_type as t};
use super::io::{self, Base, Front};
use super::json::Writer;
use super::log::{no_unwind, spdk_log};
use super::registration::{finishing, module};
use super::worker::{self, Describe, OpenInfo, SendPtr, Setup, Worker};
use crate::engine::format::{FORMAT_VERSION, SB_BYTES, SB_NAME_BYTES};
use crate::engine::geometry::{SB_A_SECTOR, SB_B_SECTOR};
use crate::engine::open::describe_backing;
use crate::engine::{
    BackingIdentity, CacheOptions, Dev, FormatOptions, LayoutOptions, SeqCutoff, Superblock,
};
use crate::media::dax::DaxDevice;
use crate::media::BlockDevice;
use crate::shell::backing::BackingFlush;
use crate::shell::config::SetOptions;
use crate::shell::config::{CacheMedia, CreateConfig};
use crate::shell::routing::Routing;

/// Namespace for pcache bdev UUIDs (SHA-1 of this and the base bdevs' UUIDs).
const UUID_NAMESPACE: &std::ffi::CStr = c"5f0c2a4e-8f57-4c8f-9b1e-6d3a2b7c9e10";

/// A failed RPC-level operation: JSON-RPC error code and message.
pub(crate) type RpcError = (i32, String);

/// A base bdev called `name`, not opened yet.
fn new_base(name: &str) -> Result<Base, RpcError> {
    let name = CString::new(name).map_err(|_| invalid("bdev name contains NUL"))?;
    Ok(Base::new(name))
}

/// How a pcache bdev came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `bdev_pcache_create` (also a deferred one, and an examined bdev a create adopted).
    Rpc,
    /// `examine_disk` found its cache bdev and reattached it from the superblock.
    Examine,
}

/// Where a pcache bdev is in its life (app thread only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeState {
    /// The worker is opening or formatting the cache; not registered yet.
    Creating,
    /// Registered, serving I/O.
    Running,
}

/// The io_device and `bdev.ctxt` of one pcache bdev. Heap-allocated, never moved; freed in
/// the io_device unregister callback, after the last channel is gone. `repr(C)`, its
/// [`Front`] first: the request path and the workers read that part from `bdev.ctxt`
/// without knowing this type.
#[repr(C)]
pub(crate) struct Pcache {
    /// What the request path reads: the workers, the cache bdev, retired counters.
    pub(crate) front: Front,
    bdev: UnsafeCell<ffi::spdk_bdev>,
    name: CString,
    config: CreateConfig,
    /// `bdev_pcache_create` params with the options in effect (from the superblock once the
    /// cache is open), cached for `write_config_json` (bdev-manager lock held).
    config_params: RefCell<Value>,
    pub(crate) backing: Base,
    /// The mapped cache (`cache_path`), until the worker takes it at create.
    dax: RefCell<Option<DaxDevice>>,
    /// An exclusive `flock` on the cache path while this bdev lives (no second pcache bdev,
    /// here or in another process, maps the same cache).
    _path_lock: Option<std::fs::File>,
    /// What holds the cache, for `bdev_get_bdevs` and `bdev_pcache_get_stats`.
    media: Value,
    /// Whether the backing bdev's FLUSH is honoured (`shell::backing`), for the same two.
    backing_flush: Value,
    /// Thread that opened the bases: their descriptors must be closed there.
    thread: *mut ffi::spdk_thread,
    state: Cell<NodeState>,
    origin: Cell<Origin>,
    /// Who waits for the create in progress: its requester first, then e.g. an
    /// `examine_disk` of a base bdev, or a create adopting an examined bdev.
    waiters: RefCell<Vec<CreateReply>>,
    /// A base bdev went away while the cache was being opened.
    base_gone: Cell<bool>,
    /// `spdk_bdev_unregister` was called (delete, hot-remove); app thread only.
    unregistering: Cell<bool>,
    /// A delete is in progress (draining or unregistering).
    pub(crate) deleting: Cell<bool>,
    /// Destruct writes back everything before stopping (delete without `no_drain`).
    pub(crate) drain_on_destruct: Cell<bool>,
    /// What the open found, for `bdev_get_bdevs`.
    info: RefCell<Value>,
}

const _: () = assert!(std::mem::offset_of!(Pcache, front) == 0);

impl Pcache {
    fn bdev_ptr(&self) -> *mut ffi::spdk_bdev {
        self.bdev.get()
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn lead_thread(&self) -> *mut ffi::spdk_thread {
        self.front.workers.lead().thread
    }

    pub(crate) fn lead_worker(&self) -> *mut Worker {
        self.front.workers.lead().worker
    }

    pub(crate) fn state(&self) -> NodeState {
        self.state.get()
    }

    pub(crate) fn config(&self) -> &CreateConfig {
        &self.config
    }

    /// Is `bdev` one of this node's (open) base bdevs?
    fn has_base(&self, bdev: *mut ffi::spdk_bdev) -> bool {
        !bdev.is_null()
            && (ptr::eq(self.front.cache.bdev, bdev) || ptr::eq(self.backing.bdev, bdev))
    }

    /// `{"cache_bdev"}` or `{"cache_path", "persistent_memory", "persistence"}`.
    pub(crate) fn media(&self) -> &Value {
        &self.media
    }

    /// `{"backing_write_cache", "backing_flush", "backing_flush_honoured"[, "backing_flush_warning"]}`.
    pub(crate) fn backing_flush(&self) -> &Value {
        &self.backing_flush
    }

    /// Records options changed at run time, so `save_config` echoes them.
    pub(crate) fn update_params(&self, changes: &Value) {
        if let (Some(p), Some(c)) = (
            self.config_params.borrow_mut().as_object_mut(),
            changes.as_object(),
        ) {
            for (k, v) in c {
                p.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The answer to `bdev_pcache_create`: the new bdev's name, or an error.
pub(crate) type CreateReply = Box<dyn FnOnce(Result<String, RpcError>)>;

// ---- registry of live pcache bdevs (control path only) ----

struct NodePtr(*mut Pcache);
// SAFETY: the pointer is only dereferenced on the app thread (RPCs, destruct); the mutex
// just orders access to the list.
unsafe impl Send for NodePtr {}

static NODES: Mutex<Vec<NodePtr>> = Mutex::new(Vec::new());

fn nodes() -> std::sync::MutexGuard<'static, Vec<NodePtr>> {
    NODES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live pcache bdev called `name`.
pub(crate) fn find(name: &str) -> Option<*mut Pcache> {
    // SAFETY: registered nodes are live until `destruct` removes them (same thread).
    nodes()
        .iter()
        .map(|n| n.0)
        .find(|&n| unsafe { (*n).name() } == name)
}

/// All live pcache bdevs, in creation order.
pub(crate) fn all() -> Vec<*mut Pcache> {
    nodes().iter().map(|n| n.0).collect()
}

/// Is `node` still registered (so: alive, io_device not yet unregistered)?
pub(crate) fn is_live(node: *mut Pcache) -> bool {
    nodes().iter().any(|n| n.0 == node)
}

/// The live pcache bdev that has `bdev` as an open base.
pub(crate) fn with_base(bdev: *mut ffi::spdk_bdev) -> Option<*mut Pcache> {
    // SAFETY: registered nodes are live (same thread).
    nodes()
        .iter()
        .map(|n| n.0)
        .find(|&n| unsafe { (*n).has_base(bdev) })
}

/// The live pcache bdev whose configuration names `bdev` as its cache or backing bdev.
pub(crate) fn using(bdev: &str) -> Option<*mut Pcache> {
    nodes().iter().map(|n| n.0).find(|&n| {
        // SAFETY: registered nodes are live (same thread).
        let c = unsafe { (*n).config() };
        c.cache_bdev() == Some(bdev) || c.backing_bdev == bdev
    })
}

/// Runs `reply` once the create of `node` (live, app thread) has finished: at once with
/// its name when it runs already, else with the outcome of the create.
pub(crate) fn when_created(node: *mut Pcache, reply: CreateReply) {
    // SAFETY: live node (caller), app thread.
    let n = unsafe { &*node };
    match n.state.get() {
        NodeState::Running => reply(Ok(n.config.name.clone())),
        NodeState::Creating => n.waiters.borrow_mut().push(reply),
    }
}

/// Is the name free for a new pcache bdev (no pcache bdev, no other bdev or alias)?
pub(crate) fn check_name_free(name: &str) -> Result<(), RpcError> {
    if find(name).is_some() {
        return Err(errno(
            -libc::EEXIST,
            format!("pcache bdev '{name}' already exists"),
        ));
    }
    let c = CString::new(name).map_err(|_| invalid("name contains NUL"))?;
    // SAFETY: valid C string; looks up bdevs and aliases under the bdev manager's lock.
    if !unsafe { ffi::spdk_bdev_get_by_name(c.as_ptr()) }.is_null() {
        return Err(errno(
            -libc::EEXIST,
            format!("a bdev named '{name}' already exists"),
        ));
    }
    Ok(())
}

fn registry_remove(node: *mut Pcache) {
    nodes().retain(|n| n.0 != node);
}

pub(crate) fn registry_clear() {
    nodes().clear();
}

// ---- create ----

fn invalid(msg: impl Into<String>) -> RpcError {
    (ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS, msg.into())
}

fn errno(rc: c_int, msg: String) -> RpcError {
    (if rc < 0 { rc } else { -rc }, msg)
}

/// Why the base bdevs could not be opened and claimed.
enum OpenFailure {
    /// The claim was refused while the bdev was open for writing elsewhere: typically
    /// another module's examine still reading a bdev that just appeared. Retried shortly.
    Busy(RpcError),
    Failed(RpcError),
}

impl From<RpcError> for OpenFailure {
    fn from(e: RpcError) -> Self {
        OpenFailure::Failed(e)
    }
}

/// How often, and how far apart, a busy claim is retried (1 s in all).
const CLAIM_RETRIES: u32 = 100;
const CLAIM_RETRY_US: u64 = 10_000;

/// Open `base` for writing and claim it (read-many-write-one) for our module.
fn open_and_claim(node: *mut Pcache, role: &str, base: &mut Base) -> Result<(), OpenFailure> {
    let name = base.name.to_string_lossy().into_owned();
    let mut desc = ptr::null_mut();
    // SAFETY: on an SPDK thread; `name` is a valid C string; `node` stays alive while the
    // descriptor is open (it is closed before the node is freed), so the event callback
    // may use it.
    let rc = unsafe {
        ffi::spdk_bdev_open_ext(
            base.name.as_ptr(),
            true,
            Some(base_event),
            node.cast(),
            &mut desc,
        )
    };
    if rc == -libc::ENODEV {
        return Err(errno(rc, format!("{role} '{name}' does not exist")).into());
    }
    if rc == -libc::EPERM {
        return Err(errno(
            rc,
            format!("{role} '{name}' is in use: claimed by a bdev module (another pcache bdev?)"),
        )
        .into());
    }
    if rc != 0 {
        return Err(errno(
            rc,
            format!("cannot open {role} '{name}' for writing: {}", strerror(rc)),
        )
        .into());
    }
    base.desc.set(desc);
    // SAFETY: `desc` was just opened.
    base.bdev = unsafe { ffi::spdk_bdev_desc_get_bdev(desc) };

    // SAFETY: all-zero is valid; spdk_bdev_claim_opts_init then sets the defaults.
    let mut opts: ffi::spdk_bdev_claim_opts = unsafe { std::mem::zeroed() };
    // SAFETY: `opts` is a valid, writable struct of the size we pass.
    unsafe {
        ffi::spdk_bdev_claim_opts_init(&mut opts, std::mem::size_of::<ffi::spdk_bdev_claim_opts>())
    };
    for (dst, src) in opts.name.iter_mut().zip(b"pcache\0") {
        *dst = *src as std::ffi::c_char;
    }
    // SAFETY: open descriptor, valid opts, our static module. The claim is released when
    // the descriptor is closed.
    let rc = unsafe {
        ffi::spdk_bdev_module_claim_bdev_desc(
            desc,
            ffi::spdk_bdev_claim_type::SPDK_BDEV_CLAIM_READ_MANY_WRITE_ONE,
            &mut opts,
            module(),
        )
    };
    if rc != 0 {
        let e = errno(
            rc,
            format!(
                "cannot claim {role} '{name}': {} (is it used by another bdev module?)",
                strerror(rc)
            ),
        );
        // Open for writing worked, so no module holds a claim that excludes writers:
        // someone else has it open for writing (for now, usually).
        return Err(if rc == -libc::EPERM {
            OpenFailure::Busy(e)
        } else {
            OpenFailure::Failed(e)
        });
    }
    Ok(())
}

fn strerror(rc: c_int) -> String {
    // SAFETY: spdk_strerror returns a pointer to a static or thread-local NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffi::spdk_strerror(rc.abs())) }
        .to_string_lossy()
        .into_owned()
}

/// Close whatever base descriptors are open (releasing their claims). Caller's thread
/// must be the opening thread.
fn close_bases(node: &Pcache) {
    for base in [&node.front.cache, &node.backing] {
        let desc = base.desc.replace(ptr::null_mut());
        if !desc.is_null() {
            // SAFETY: opened on this thread, closed once (cleared above).
            unsafe { ffi::spdk_bdev_close(desc) };
        }
    }
}

fn uuid_bytes(u: &ffi::spdk_uuid) -> [u8; 16] {
    // SAFETY: spdk_uuid is 16 plain bytes (checked by bindgen's layout assertions).
    unsafe { std::mem::transmute_copy::<ffi::spdk_uuid, [u8; 16]>(u) }
}

/// The fields of a base bdev we look at, copied out field by field: SPDK keeps writing other
/// parts of a live `spdk_bdev`, so we never hold a reference to the whole struct.
struct BaseGeometry {
    blocklen: u32,
    blockcnt: u64,
    phys_blocklen: u32,
    required_alignment: u8,
    md_len: u32,
    dif_type: ffi::spdk_dif_type::Type,
    uuid: ffi::spdk_uuid,
    numa: ffi::spdk_bdev__bindgen_ty_2,
}

impl BaseGeometry {
    /// # Safety
    /// `b` is a live (open) bdev.
    unsafe fn read(b: *const ffi::spdk_bdev) -> Self {
        // SAFETY: per the contract; each field is read by value through the raw pointer.
        unsafe {
            BaseGeometry {
                blocklen: (*b).blocklen,
                blockcnt: (*b).blockcnt,
                phys_blocklen: (*b).phys_blocklen,
                required_alignment: (*b).required_alignment,
                md_len: (*b).md_len,
                dif_type: (*b).dif_type,
                uuid: (*b).uuid,
                numa: (*b).numa,
            }
        }
    }
}

/// Check the bases and fill in the bdev our users see. The bases are open.
fn fill_bdev(node: &mut Pcache) -> Result<(), RpcError> {
    if ptr::eq(node.backing.bdev, node.front.cache.bdev) {
        return Err(invalid(format!(
            "{} and backing_bdev '{}' are the same bdev",
            node.config.cache_label(),
            node.config.backing_bdev
        )));
    }
    let (bk, ca) = geometries(node);
    if bk.md_len != 0 || bk.dif_type != 0 {
        return Err(invalid(format!(
            "backing bdev '{}' has metadata/DIF, which pcache does not support",
            node.config.backing_bdev
        )));
    }
    let max_block = crate::engine::geometry::MAX_BLOCK_BYTES;
    if !ca.blocklen.is_power_of_two() || !(512..=max_block).contains(&ca.blocklen) {
        return Err(invalid(format!(
            "{} has {}-byte blocks: pcache supports cache bdevs of 512 to {max_block}-byte \
             blocks (powers of two)",
            node.config.cache_label(),
            ca.blocklen
        )));
    }
    if ca.md_len != 0 || ca.dif_type != 0 {
        return Err(invalid(format!(
            "{} has metadata/DIF, which pcache does not support",
            node.config.cache_label()
        )));
    }
    if bk.blocklen != 512 && bk.blocklen != 4096 {
        return Err(invalid(format!(
            "backing bdev '{}' has {}-byte blocks: pcache supports 512 and 4096",
            node.config.backing_bdev, bk.blocklen
        )));
    }
    let cache_bytes = ca.blockcnt.saturating_mul(u64::from(ca.blocklen));
    // What the request left open is sized to this cache (a reattach keeps its superblock's).
    node.config.options.fit_to_cache(cache_bytes);
    let o = &node.config.options;
    let stripe = o.stripe_bytes();
    for (role, b) in [("backing", &bk), ("cache", &ca)] {
        if b.blocklen == 0 || stripe % u64::from(b.blocklen) != 0 {
            return Err(invalid(format!(
                "stripe_size_kib {} is not a multiple of the {role} bdev block size {}",
                o.stripe_size_kib, b.blocklen
            )));
        }
    }
    let need = 2 * u64::from(o.shards) * (u64::from(o.segment_size_mib) << 20);
    if cache_bytes < need {
        return Err(invalid(format!(
            "{} is too small: {cache_bytes} bytes, {} shard(s) need at least {need} (two {} MiB segments each)",
            node.config.cache_label(), o.shards, o.segment_size_mib
        )));
    }

    let mut ns: ffi::spdk_uuid = uuid_zero();
    let mut uuid: ffi::spdk_uuid = uuid_zero();
    let mut seed = uuid_bytes(&bk.uuid).to_vec();
    match &node.config.cache {
        CacheMedia::Bdev(_) => seed.extend_from_slice(&uuid_bytes(&ca.uuid)),
        CacheMedia::Path { path, .. } => seed.extend_from_slice(path.as_bytes()),
    }
    // SAFETY: valid out-pointers and a NUL-terminated namespace string; `seed` is read only.
    let rc = unsafe {
        let rc = ffi::spdk_uuid_parse(&mut ns, UUID_NAMESPACE.as_ptr());
        if rc == 0 {
            ffi::spdk_uuid_generate_sha1(&mut uuid, &mut ns, seed.as_ptr().cast(), seed.len())
        } else {
            rc
        }
    };
    if rc != 0 {
        return Err(errno(rc, "cannot derive the bdev UUID".into()));
    }

    // A cache of 4 KiB blocks stores whole 4 KiB blocks: the bdev exports the larger block
    // size (as bcache and dm-writecache do), so no request needs a read-modify-write. A
    // reattached cache may record a larger block than its device has: `create_finish`
    // sets the block size from the superblock.
    let blocklen = bk.blocklen.max(ca.blocklen);
    let (phys, align, numa) = (
        bk.phys_blocklen.max(blocklen),
        bk.required_alignment.max(ca.required_alignment),
        bk.numa,
    );
    // SAFETY: the bdev is not registered yet, so we are its only user.
    let b = unsafe { &mut *node.bdev.get() };
    b.name = node.name.as_ptr().cast_mut();
    b.product_name = c"pcache".as_ptr().cast_mut();
    b.write_cache = 1;
    b.phys_blocklen = phys;
    b.required_alignment = align;
    set_block_size(b, blocklen, bk.blockcnt * u64::from(bk.blocklen), stripe)?;
    b.__bindgen_anon_1.set_split_on_optimal_io_boundary(1);
    // A reset reaches the workers at once and completes when their requests in flight
    // did. A drain timeout would have the bdev layer wait instead until no channel has I/O
    // outstanding, which counts the I/O it aborts during the reset: a submitter that
    // resubmits on abort (bdevperf's `reset` workload) kept it busy the whole 5 s.
    b.reset_io_drain_timeout = 0;
    b.uuid = uuid;
    b.numa = numa;
    b.ctxt = (node as *mut Pcache).cast();
    b.fn_table = &FN_TABLE;
    b.module = module();
    Ok(())
}

/// Sets the exported block size and what follows from it: the block count (a backing
/// device whose size is not a whole number of blocks loses its tail: the last partial
/// block is not exported), the split boundary (one stripe) and the discard limits.
fn set_block_size(
    b: &mut ffi::spdk_bdev,
    blocklen: u32,
    backing_bytes: u64,
    stripe: u64,
) -> Result<(), RpcError> {
    let boundary = u32::try_from(stripe / u64::from(blocklen))
        .ok()
        .filter(|&n| n > 0 && stripe % u64::from(blocklen) == 0)
        .ok_or_else(|| {
            invalid(format!(
                "the stripe ({stripe} bytes) is not a whole number of {blocklen}-byte blocks"
            ))
        })?;
    b.blocklen = blocklen;
    b.phys_blocklen = b.phys_blocklen.max(blocklen);
    b.blockcnt = backing_bytes / u64::from(blocklen);
    b.optimal_io_boundary = boundary;
    // Keep UNMAP / WRITE_ZEROES within the worker's 32-bit sector counts.
    let max_discard = (1u32 << 30) / blocklen;
    b.max_unmap = max_discard;
    b.max_unmap_segments = 1;
    b.max_write_zeroes = max_discard;
    Ok(())
}

/// The backing and cache geometries; a mapped cache looks like a bdev of 512-byte blocks.
/// The bases are open.
fn geometries(node: &Pcache) -> (BaseGeometry, BaseGeometry) {
    // SAFETY: the backing bdev is open (descriptor held), so live.
    let bk = unsafe { BaseGeometry::read(node.backing.bdev) };
    let ca = match node.dax.borrow().as_ref() {
        Some(d) => BaseGeometry {
            blocklen: 512,
            blockcnt: d.sectors(),
            phys_blocklen: 512,
            required_alignment: 0,
            md_len: 0,
            dif_type: 0,
            uuid: uuid_zero(),
            numa: bk.numa,
        },
        // SAFETY: the cache bdev is open, so live.
        None => unsafe { BaseGeometry::read(node.front.cache.bdev) },
    };
    (bk, ca)
}

fn uuid_zero() -> ffi::spdk_uuid {
    // SAFETY: a UUID is plain bytes; all-zero is the null UUID.
    unsafe { std::mem::zeroed() }
}

fn random_uuid() -> [u8; 16] {
    let mut u = uuid_zero();
    // SAFETY: writes 16 bytes into a valid spdk_uuid.
    unsafe { ffi::spdk_uuid_generate(&mut u) };
    uuid_bytes(&u)
}

/// `bdev_pcache_create` (and attach from examine): open and claim both bases, start the
/// worker thread, which opens (or formats) the cache; `reply` gets the new bdev's name once
/// it is registered.
pub(crate) fn create(config: CreateConfig, origin: Origin, reply: CreateReply) {
    let node = match new_node(config) {
        Ok(n) => n,
        Err(e) => return reply(Err(e)),
    };
    // SAFETY: `new_node` leaked a new node; only this thread knows it.
    let n = unsafe { &*node };
    n.origin.set(origin);
    n.waiters.borrow_mut().push(reply);
    // Registered (Creating) from here: the name is taken, examine sees the bases it names.
    nodes().push(NodePtr(node));
    attach_bases(node, CLAIM_RETRIES);
}

/// Opens and claims the bases (retrying a busy claim), then starts the worker.
fn attach_bases(node: *mut Pcache, retries: u32) {
    if finishing() {
        return fail_create(
            node,
            errno(-libc::ENODEV, "the application is shutting down".into()),
        );
    }
    match open_bases(node) {
        Ok(()) => start_workers(node),
        Err(OpenFailure::Busy(e)) if retries > 0 => {
            // SAFETY: live node (registry, Creating: only this path frees it), app thread.
            let n = unsafe { &mut *node };
            close_bases(n);
            n.front.cache.bdev = ptr::null_mut();
            n.backing.bdev = ptr::null_mut();
            if retries == CLAIM_RETRIES {
                spdk_log!(
                    NOTICE,
                    "{}: {}; retrying for up to {} ms",
                    n.name(),
                    e.1,
                    u64::from(CLAIM_RETRIES) * CLAIM_RETRY_US / 1000
                );
            }
            let again = Box::new(move || attach_bases(node, retries - 1));
            if after(CLAIM_RETRY_US, again).is_err() {
                fail_create(node, e);
            }
        }
        Err(OpenFailure::Busy(e) | OpenFailure::Failed(e)) => fail_create(node, e),
    }
}

/// A create failed before its worker started: undo and answer.
fn fail_create(node: *mut Pcache, e: RpcError) {
    // SAFETY: live node (registry, Creating: only this path frees it), app thread.
    let n = unsafe { &*node };
    registry_remove(node);
    close_bases(n);
    let waiters = n.waiters.take();
    // SAFETY: never registered with SPDK; the descriptors are closed; nobody else holds it.
    drop(unsafe { Box::from_raw(node) });
    reply_all(waiters, Err(e));
}

/// The bases are open and claimed: start the worker thread, which opens (or formats) the
/// cache and then calls `create_opened` here.
fn start_workers(node: *mut Pcache) {
    // SAFETY: live node (registry, Creating), app thread.
    let n = unsafe { &mut *node };
    check_backing_flush(n);
    let (bk, ca) = geometries(n);
    let o = &n.config.options;
    let cache = n.front.cache.bdev;
    // SAFETY: open base bdev (only checked for a cache bdev).
    if !cache.is_null() && unsafe { ffi::spdk_bdev_has_write_cache(cache) } {
        spdk_log!(
            NOTICE,
            "{}: {} has a volatile write cache: acknowledged writes survive a \
             crash of this process but not a power loss (use persistent memory for that)",
            n.config.name,
            n.config.cache_label()
        );
    }
    let setup = Setup {
        name: n.config.name.clone(),
        core: n.config.options.core,
        app_thread: n.thread,
        desc: [n.front.cache.desc.get(), n.backing.desc.get()],
        bdev: [n.front.cache.bdev, n.backing.bdev],
        identity: BackingIdentity {
            sectors: bk.blockcnt * u64::from(bk.blocklen) / 512,
            block_size: bk.blocklen,
            uuid: uuid_bytes(&bk.uuid),
            name: n.config.backing_bdev.clone(),
        },
        describe: Describe {
            create_args: n.config.create_args(),
            cache_label: n.config.cache_label(),
            // SAFETY: the backing bdev is open, so live; its module's name is a static string.
            backing_module: unsafe {
                let m = ffi::spdk_bdev_get_module_name(n.backing.bdev);
                (!m.is_null()).then(|| CStr::from_ptr(m).to_string_lossy().into_owned())
            },
        },
        format: FormatOptions {
            layout: LayoutOptions {
                segment_bytes: u64::from(o.segment_size_mib) << 20,
                stripe_bytes: o.stripe_bytes(),
                shards: o.shards,
                block_bytes: ca.blocklen,
            },
            data_crc: o.data_crc,
            cache_uuid: random_uuid(),
            gc_percent: o.gc_percent,
        },
        cache_options: CacheOptions {
            writeback: o.wb.engine(o.gc_percent),
            backing_uuid_mismatch: n.config.backing_uuid_mismatch,
            device_block_bytes: ca.blocklen,
            mode: o.mode,
            seq_cutoff: (o.seq_cutoff_bytes.is_some() || o.seq_cutoff_policy.is_some())
                .then(|| o.seq_cutoff(SeqCutoff::default())),
            write_admission: o.write_admission,
            ..CacheOptions::default()
        },
        cache_bytes: ca.blockcnt * u64::from(ca.blocklen),
        dax: n.dax.borrow_mut().take(),
        // One worker thread per core, unless pinned to one core (at most one per shard).
        workers: if n.config.options.core.is_some() {
            1
        } else {
            worker::app_cores().len().max(1)
        },
        zero_copy: o.zero_copy,
    };
    let p = SendPtr(node);
    match worker::spawn(setup, Box::new(move |res| create_opened(p.0, res))) {
        Ok(lead) => n.front.workers.set_lead(lead),
        Err(e) => fail_create(node, errno(-libc::ENOMEM, e)),
    }
}

/// Finds out whether FLUSH of the (open) backing bdev reaches its volatile write cache,
/// records it for the JSON and warns, naming the fix, when it does not.
fn check_backing_flush(n: &mut Pcache) {
    let facts = super::backing::facts(n.backing.bdev);
    let flush = BackingFlush::classify(facts);
    if let Some(w) = flush.warning(&n.config.backing_bdev) {
        spdk_log!(WARN, "{}: {w}", n.config.name);
    }
    n.backing_flush = flush.to_json(facts, &n.config.backing_bdev);
}

/// Does the create request `cfg` describe `node`, a bdev examine attached and no create
/// has adopted yet (same name, cache bdev and backing bdev)?
pub(crate) fn adoptable(node: *mut Pcache, cfg: &CreateConfig) -> bool {
    // SAFETY: live node (caller), app thread.
    let n = unsafe { &*node };
    n.origin.get() == Origin::Examine
        && n.config.name == cfg.name
        && matches!(cfg.cache, CacheMedia::Bdev(_))
        && n.config.cache == cfg.cache
        && n.config.backing_bdev == cfg.backing_bdev
}

/// A create request for a bdev examine attached (a saved config loading after examine
/// found the cache, or a script that creates what it expects): the bdev becomes the
/// request's. Its writeback limits are applied and `save_config` echoes the request's
/// options; the layout (superblock) and gc_percent (control slots) stay the cache's, as on
/// any reattach, and a `core` takes effect at the next attach. `reply` gets the name.
pub(crate) fn adopt(node: *mut Pcache, cfg: CreateConfig, reply: CreateReply) {
    // SAFETY: live node (caller), app thread.
    let n = unsafe { &*node };
    n.origin.set(Origin::Rpc);
    when_created(
        node,
        Box::new(move |res| match res {
            Err(e) => reply(Err(e)),
            Ok(_) => adopt_running(node, cfg, reply),
        }),
    );
}

fn adopt_running(node: *mut Pcache, cfg: CreateConfig, reply: CreateReply) {
    if !is_live(node) {
        return reply(Err(errno(
            -libc::ENODEV,
            format!("pcache bdev '{}' went away", cfg.name),
        )));
    }
    // SAFETY: live (checked, same thread).
    let n = unsafe { &*node };
    let wb = cfg.options.wb;
    let so = SetOptions {
        name: cfg.name.clone(),
        gc_percent: None,
        max_inflight: Some(wb.max_inflight),
        group_ksets: Some(wb.group_ksets),
        high_pct: Some(wb.high_pct),
        low_pct: Some(wb.low_pct),
        io_timeout_ms: Some(wb.io_timeout_ms),
        mode: cfg.options.mode,
        seq_cutoff_bytes: cfg.options.seq_cutoff_bytes,
        seq_cutoff_policy: cfg.options.seq_cutoff_policy,
        write_admission: cfg.options.write_admission,
    };
    let core = cfg.options.core;
    // The closure is dropped unrun if the message cannot be sent: keep the reply reachable.
    let slot = std::rc::Rc::new(RefCell::new(Some(reply)));
    let back = slot.clone();
    let name = cfg.name.clone();
    let sent = worker::set_options(
        n.lead_thread(),
        n.lead_worker(),
        move |cur| so.apply_live(cur),
        Box::new(move |res| {
            let Some(reply) = back.borrow_mut().take() else {
                return;
            };
            match res {
                Err(e) => reply(Err(invalid(e))),
                Ok(o) => {
                    if is_live(node) {
                        let mut v = o.to_json();
                        if let Some(c) = core {
                            v["core"] = json!(c);
                        }
                        // SAFETY: live (checked, same thread).
                        unsafe { (*node).update_params(&v) };
                    }
                    spdk_log!(
                        NOTICE,
                        "{name}: bdev_pcache_create adopted the bdev examine attached \
                         (writeback options applied{})",
                        if core.is_some() {
                            "; core applies at the next attach"
                        } else {
                            ""
                        }
                    );
                    reply(Ok(name));
                }
            }
        }),
    );
    if sent.is_err() {
        if let Some(reply) = slot.borrow_mut().take() {
            reply(Err(errno(
                -libc::ENOMEM,
                "cannot reach the engine thread".into(),
            )));
        }
    }
}

/// A new node for `config` (name checked, nothing opened yet), leaked.
fn new_node(config: CreateConfig) -> Result<*mut Pcache, RpcError> {
    check_name_free(&config.name)?;
    let name = CString::new(config.name.clone()).map_err(|_| invalid("name contains NUL"))?;
    let node = Box::new(Pcache {
        // SAFETY: all-zero is a valid unregistered spdk_bdev; fields are set by name below.
        bdev: UnsafeCell::new(unsafe { std::mem::zeroed() }),
        name,
        config_params: RefCell::new(config.to_params()),
        front: Front::new(new_base(config.cache_bdev().unwrap_or_default())?),
        backing: new_base(&config.backing_bdev)?,
        dax: RefCell::new(None),
        _path_lock: None,
        media: Value::Null,
        backing_flush: Value::Null,
        config,
        // SAFETY: called on an SPDK thread (the RPC thread).
        thread: unsafe { ffi::spdk_get_thread() },
        state: Cell::new(NodeState::Creating),
        origin: Cell::new(Origin::Rpc),
        waiters: RefCell::new(Vec::new()),
        base_gone: Cell::new(false),
        unregistering: Cell::new(false),
        deleting: Cell::new(false),
        drain_on_destruct: Cell::new(false),
        info: RefCell::new(Value::Null),
    });
    Ok(Box::into_raw(node))
}

/// Maps the cache (once) or opens and claims the cache bdev, opens and claims the backing
/// bdev, checks them and fills in the bdev. On failure the caller closes what is open.
fn open_bases(node: *mut Pcache) -> Result<(), OpenFailure> {
    // SAFETY: live node, not shared with SPDK yet (except as event context of descriptors
    // we close before freeing it); app thread.
    let n = unsafe { &mut *node };
    // `node` is only passed along as the (opaque) event context here.
    match n.config.cache.clone() {
        CacheMedia::Bdev(name) => {
            n.media = json!({"cache_bdev": name});
            open_and_claim(node, "cache bdev", &mut n.front.cache)?;
        }
        CacheMedia::Path { path, size_mib } => {
            if n.dax.borrow().is_none() {
                map_cache(n, &path, size_mib)?;
            }
        }
    }
    open_and_claim(node, "backing bdev", &mut n.backing)?;
    fill_bdev(n)?;
    Ok(())
}

/// An exclusive, non-blocking `flock` on `path` (None if it cannot be opened yet).
fn lock_path(path: &str) -> Result<Option<std::fs::File>, RpcError> {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(None);
    };
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(errno(
            -libc::EBUSY,
            format!(
                "cache path '{path}' is in use (another pcache bdev maps it, here or in another process)"
            ),
        ));
    }
    Ok(Some(f))
}

/// Maps the cache path (created / extended to `size_mib` when given) into `n.dax`.
fn map_cache(n: &mut Pcache, path: &str, size_mib: Option<u64>) -> Result<(), RpcError> {
    let bytes = size_mib.map(|m| m << 20);
    let lock = lock_path(path)?;
    let dax = DaxDevice::open(std::path::Path::new(path), bytes, true).map_err(|e| {
        errno(
            -libc::EINVAL,
            format!("cache_path: {e} (a DAX device, or a file: give cache_size_mib to create it)"),
        )
    })?;
    spdk_log!(
        NOTICE,
        "{}: cache path '{path}': {}",
        n.config.name,
        dax.describe()
    );
    n.media = json!({
        "cache_path": path,
        "cache_size_mib": size_mib,
        "mapped_bytes": dax.sectors() * 512,
        "persistent_memory": dax.is_persistent_memory(),
        "persistence": dax.describe(),
    });
    *n.dax.borrow_mut() = Some(dax);
    // A file created just now is locked now.
    n._path_lock = match lock {
        Some(l) => Some(l),
        None => lock_path(path)?,
    };
    Ok(())
}

/// The worker finished opening (app thread): register the bdev, or undo everything.
fn create_opened(node: *mut Pcache, res: Result<OpenInfo, String>) {
    // SAFETY: the node stays alive while its create is pending (only this path frees it).
    let n = unsafe { &*node };
    let info = match res {
        Ok(info) => info,
        Err(msg) => {
            // The worker is gone (thread exited, channels released).
            registry_remove(node);
            close_bases(n);
            let waiters = n.waiters.take();
            // SAFETY: never registered; nobody else holds the node.
            drop(unsafe { Box::from_raw(node) });
            return reply_all(waiters, Err(errno(-libc::EINVAL, msg)));
        }
    };
    let desc = n.front.cache.desc.get();
    if desc.is_null() || n.base_gone.get() {
        return create_finish(node, info);
    }
    let record = info.rebound.as_ref().map(|_| info.sb.backing.clone());
    update_superblock(
        n.name(),
        desc,
        record,
        Box::new(move || create_finish(node, info)),
    );
}

/// Answers everyone waiting for a create.
fn reply_all(waiters: Vec<CreateReply>, r: Result<String, RpcError>) {
    for w in waiters {
        w(r.clone());
    }
}

/// Brings both superblock replicas of the cache bdev up to date: the bdev name, when they
/// do not hold it yet (a fresh format, an image from before the name field, a reattach
/// under another name), and this build's format version, when the cache was written by an
/// older one (so that build refuses it instead of stopping its log at the first kset it
/// cannot read). Replica A, then B, each flushed before the next, so a crash leaves at
/// least one valid replica. Then `then`. Failures are logged and otherwise ignored: the
/// cache works without its name, only the attach by examine needs it. This runs before the
/// bdev is registered, so before any kset is written, and the worker never writes the
/// superblock sectors after format, so these writes race with nothing.
///
/// `record`: the backing identity to record (an open that accepted a backing bdev of the
/// recorded size but another UUID, `backing_uuid_mismatch: accept`), in the same writes.
/// If they fail, the superblock keeps (in at least one replica) the old identity, and the
/// next attach refuses the bdev again: nothing is lost.
fn update_superblock(
    name: &str,
    desc: *mut ffi::spdk_bdev_desc,
    record: Option<BackingIdentity>,
    then: Box<dyn FnOnce()>,
) {
    let store = name.len() < SB_NAME_BYTES;
    if !store {
        spdk_log!(
            NOTICE,
            "{name}: the name is longer than {} bytes and is not stored in the cache \
             superblock: examine will not attach this cache by itself",
            SB_NAME_BYTES - 1
        );
    }
    let name = name.to_string();
    block_io(
        desc,
        BlockOp::read_superblocks(),
        Box::new(move |res| {
            let buf = match res {
                Ok(b) if b.len() >= 2 * SB_BYTES => b,
                Ok(_) => return then(),
                Err(e) => {
                    spdk_log!(
                        ERROR,
                        "{name}: cannot read the superblock to update it: {e}"
                    );
                    return then();
                }
            };
            let (a, b) = buf.split_at(SB_BYTES);
            let named =
                |r: &[u8]| !store || matches!(Superblock::decode_name(r), Ok(Some(n)) if n == name);
            let version = |r: &[u8]| Superblock::decode(r).map(|s| s.version).ok();
            let recorded = |r: &[u8]| {
                record
                    .as_ref()
                    .is_none_or(|id| Superblock::decode(r).is_ok_and(|s| s.backing == *id))
            };
            let current = |r: &[u8]| named(r) && version(r) == Some(FORMAT_VERSION) && recorded(r);
            if current(a) && current(b) {
                return then();
            }
            // The replica the open used: A when valid, else B.
            let src = if Superblock::decode(a).is_ok() { a } else { b };
            let mut bytes = src.to_vec();
            if store && !named(src) {
                let old = Superblock::decode_name(src).ok().flatten();
                spdk_log!(
                    NOTICE,
                    "{name}: storing the bdev name in the cache superblock ({})",
                    match old {
                        Some(o) => format!("it held '{o}'"),
                        None => "it held none".into(),
                    }
                );
                bytes = match Superblock::rename(&bytes, Some(&name)) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        spdk_log!(ERROR, "{name}: cannot store the bdev name: {e}");
                        return then();
                    }
                };
            }
            if let Some(id) = record.as_ref().filter(|_| !recorded(src)) {
                spdk_log!(
                    NOTICE,
                    "{name}: recording backing bdev {} in the cache superblock \
                     (backing_uuid_mismatch: accept; it recorded {})",
                    describe_backing(id),
                    Superblock::decode(src)
                        .map(|s| describe_backing(&s.backing))
                        .unwrap_or_default()
                );
                bytes = match Superblock::rebind(&bytes, id) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        spdk_log!(ERROR, "{name}: cannot record the backing bdev: {e}");
                        return then();
                    }
                };
            }
            if let Some(v) = version(src).filter(|&v| v < FORMAT_VERSION) {
                spdk_log!(
                    NOTICE,
                    "{name}: the cache was written in format v{v}: marking it v{FORMAT_VERSION}, \
                     which older builds do not open"
                );
                bytes = match Superblock::upgrade(&bytes) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        spdk_log!(ERROR, "{name}: cannot update the format version: {e}");
                        return then();
                    }
                };
            }
            let mut steps = Vec::new();
            for sector in [SB_A_SECTOR, SB_B_SECTOR] {
                steps.push(BlockOp::Write {
                    offset: sector * 512,
                    data: bytes.clone(),
                });
                steps.push(BlockOp::Flush);
            }
            block_io_steps(
                desc,
                steps,
                Box::new(move |r| {
                    if let Err(e) = r {
                        spdk_log!(ERROR, "{name}: updating the superblock failed: {e}");
                    }
                    then();
                }),
            );
        }),
    );
}

/// The open succeeded and the name is stored: register the bdev, or undo everything.
fn create_finish(node: *mut Pcache, info: OpenInfo) {
    // SAFETY: the node stays alive while its create is pending (only this path frees it).
    let n = unsafe { &*node };
    let waiters = n.waiters.take();
    let answer = move |r| reply_all(waiters, r);
    if n.base_gone.get() {
        stop_and_free(node, false);
        return answer(Err(errno(
            -libc::ENODEV,
            "a base bdev was removed while the cache was being opened".into(),
        )));
    }
    // The superblock decides the layout of a reattached cache.
    let g = info.sb.geometry;
    {
        let mut p = n.config_params.borrow_mut();
        p["data_crc"] = json!(info.sb.data_crc);
        p["gc_percent"] = json!(info.gc_percent);
        p["mode"] = json!(info.mode.as_str());
        p["seq_cutoff_bytes"] = json!(info.seq_cutoff.bytes);
        p["seq_cutoff_policy"] = json!(info.seq_cutoff.policy.as_str());
        p["write_admission"] = json!(info.write_admission.as_str());
        p["stripe_size_kib"] = json!(g.stripe_sectors / 2);
        p["segment_size_mib"] = json!(g.segment_sectors / 2048);
        p["shards"] = json!(g.shard_count);
        if *p != n.config.to_params() && !info.formatted {
            spdk_log!(
                NOTICE,
                "{}: reattached cache keeps its own layout/options: {}",
                n.name(),
                p
            );
        }
    }
    // Blocks of the backing bdev and of the cache (the superblock's, which may be larger
    // than its device's), split at the engine's stripes: the superblock's, which win over
    // the create options.
    {
        // SAFETY: not registered yet, so we are the bdev's only user.
        let b = unsafe { &mut *n.bdev_ptr() };
        let blocklen = b.blocklen.max(g.block_sectors * 512);
        let stripe = u64::from(g.stripe_sectors) * 512;
        if let Err(e) = set_block_size(b, blocklen, g.backing_sectors * 512, stripe) {
            stop_and_free(node, false);
            return answer(Err(e));
        }
    }
    if info.team.len() > 1 {
        // SAFETY: not registered yet: nothing reads the routing concurrently.
        let blocklen = unsafe { (*n.bdev_ptr()).blocklen };
        let routing = Routing {
            stripe: u64::from(g.stripe_sectors).max(1),
            shards: g.shard_count.max(1),
            shift: (blocklen / 512).max(1).trailing_zeros(),
        };
        n.front.workers.set_team(info.team.clone(), routing);
    }
    *n.info.borrow_mut() = json!({
        "formatted": info.formatted,
        "cache_uuid": info.sb.cache_uuid.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "segments": g.segment_count,
        "dirty_bytes_at_open": info.dirty_bytes,
        "open_problems": info.problems,
    });
    // SAFETY: `node` is a stable heap address used as the io_device key until
    // `spdk_io_device_unregister`; the callbacks match the registered context size.
    unsafe {
        ffi::spdk_io_device_register(
            node.cast(),
            Some(io::channel_create),
            Some(io::channel_destroy),
            std::mem::size_of::<io::Channel>() as u32,
            n.name.as_ptr(),
        )
    };
    n.state.set(NodeState::Running);
    // SAFETY: the bdev is fully initialized; after this SPDK owns its lifecycle and calls
    // our fn_table, ending with `destruct`.
    let rc = unsafe { ffi::spdk_bdev_register(n.bdev_ptr()) };
    if rc != 0 {
        stop_and_free(node, true);
        return answer(Err(errno(
            rc,
            format!("cannot register bdev: {}", strerror(rc)),
        )));
    }
    spdk_log!(
        NOTICE,
        "{} pcache bdev '{}' ({}, backing '{}', {} shard(s) on {} engine thread(s), {} \
         segments of {} MiB)",
        if info.formatted {
            "created"
        } else {
            "reattached"
        },
        n.name(),
        n.config.cache_label(),
        n.config.backing_bdev,
        g.shard_count,
        info.team.len().max(1),
        g.segment_count,
        g.segment_sectors / 2048
    );
    answer(Ok(n.config.name.clone()));
}

/// Stops the worker of a node that is not (or no longer) registered and frees it.
fn stop_and_free(node: *mut Pcache, io_device_registered: bool) {
    registry_remove(node);
    // SAFETY: live node (not freed before the stop completes).
    let n = unsafe { &*node };
    let p = SendPtr(node);
    let done = Box::new(move |_res: Result<(), String>| {
        // SAFETY: the node lives until here; the worker no longer uses the bases.
        let n = unsafe { &*p.0 };
        close_bases(n);
        if io_device_registered {
            // SAFETY: registered in `create_opened`; `free_node` runs after its channels.
            unsafe { ffi::spdk_io_device_unregister(p.0.cast(), Some(free_node)) };
        } else {
            // SAFETY: never shared with SPDK beyond the closed descriptors.
            drop(unsafe { Box::from_raw(p.0) });
        }
    });
    if worker::stop(n.lead_thread(), n.lead_worker(), false, done).is_err() {
        spdk_log!(ERROR, "{}: cannot stop the engine; leaking it", n.name());
    }
}

unsafe extern "C" fn free_node(io_device: *mut c_void) {
    no_unwind("free_node", (), || {
        // SAFETY: the io_device is the Box we leaked in `create`; SPDK calls this once, after
        // every channel is destroyed and no callback can reach the node any more.
        drop(unsafe { Box::from_raw(io_device.cast::<Pcache>()) });
    })
}

// ---- delete, hot-remove, destruct ----

/// Start unregistering the bdev (delete RPC / hot-remove). `cb` gets the result.
pub(crate) fn unregister(
    node: *mut Pcache,
    cb: ffi::spdk_bdev_unregister_cb,
    cb_arg: *mut c_void,
) -> c_int {
    // SAFETY: `node` is live (from the registry, same thread).
    let n = unsafe { &*node };
    n.unregistering.set(true);
    // SAFETY: name is a valid C string; our module owns the bdev.
    unsafe { ffi::spdk_bdev_unregister_by_name(n.name.as_ptr(), module(), cb, cb_arg) }
}

unsafe extern "C" fn base_event(
    kind: ffi::spdk_bdev_event_type::Type,
    bdev: *mut ffi::spdk_bdev,
    ctx: *mut c_void,
) {
    no_unwind("base_event", (), || {
        let node = ctx.cast::<Pcache>();
        // SAFETY: the event context is our node; events are delivered only while the
        // descriptor is open, and we close descriptors before freeing the node.
        let n = unsafe { &*node };
        // SAFETY: the bdev of an event is live during the callback.
        let base = unsafe { std::ffi::CStr::from_ptr(ffi::spdk_bdev_get_name(bdev)) }
            .to_string_lossy()
            .into_owned();
        match kind {
            ffi::spdk_bdev_event_type::SPDK_BDEV_EVENT_REMOVE => {
                let dev = if ptr::eq(bdev, n.front.cache.bdev) {
                    Dev::Cache
                } else {
                    Dev::Backing
                };
                // From now on every command for it fails at once, so nothing waits for it.
                if !n.lead_worker().is_null()
                    && worker::base_removed(n.lead_thread(), n.lead_worker(), dev).is_err()
                {
                    spdk_log!(
                        ERROR,
                        "{}: cannot tell the engine about the removal",
                        n.name()
                    );
                }
                if n.state.get() == NodeState::Creating {
                    n.base_gone.set(true);
                    return;
                }
                if n.unregistering.get() {
                    return;
                }
                spdk_log!(
                    NOTICE,
                    "base bdev '{base}' of '{}' is going away{}: unregistering",
                    n.name(),
                    if finishing() { " (shutdown)" } else { "" }
                );
                n.unregistering.set(true);
                // SAFETY: our registered bdev; unregistration ends in `destruct`.
                unsafe { ffi::spdk_bdev_unregister(n.bdev_ptr(), None, ptr::null_mut()) };
            }
            other => spdk_log!(
                NOTICE,
                "ignoring event {other} on base bdev '{base}' of '{}'",
                n.name()
            ),
        }
    })
}

/// `fn_table.destruct`: the bdev is unregistered and has no open descriptors. Asynchronous:
/// the worker stops (writing back everything first for a draining delete), then the bases
/// are closed and `spdk_bdev_destruct_done` reports the outcome.
unsafe extern "C" fn destruct(ctx: *mut c_void) -> c_int {
    no_unwind("destruct", 0, || {
        let node = ctx.cast::<Pcache>();
        registry_remove(node);
        // SAFETY: `ctxt` is our live node; from here only SPDK's channel teardown and the
        // stop below use it.
        let n = unsafe { &*node };
        let drain = n.drain_on_destruct.get() && !finishing();
        let p = SendPtr(node);
        let done = Box::new(move |res: Result<(), String>| destruct_finish(p.0, res));
        if worker::stop(n.lead_thread(), n.lead_worker(), drain, done).is_err() {
            spdk_log!(
                ERROR,
                "{}: cannot stop the engine (out of messages); leaking the bdev",
                n.name()
            );
            return 0;
        }
        1
    })
}

/// The worker stopped (app thread = the thread that opened the bases).
fn destruct_finish(node: *mut Pcache, res: Result<(), String>) {
    // SAFETY: the node lives until `free_node`, which only follows the unregister below.
    let n = unsafe { &*node };
    close_bases(n);
    let rc = match &res {
        Ok(()) => 0,
        Err(e) => {
            spdk_log!(ERROR, "{}: {e}", n.name());
            -libc::EIO
        }
    };
    spdk_log!(NOTICE, "destructed pcache bdev '{}'", n.name());
    // SAFETY: our unregistered bdev; this reports the end of the destruct we deferred.
    unsafe { ffi::spdk_bdev_destruct_done(n.bdev_ptr(), rc) };
    // SAFETY: registered in `create_opened`; `free_node` runs after the last channel.
    unsafe { ffi::spdk_io_device_unregister(node.cast(), Some(free_node)) };
}

// ---- function table ----

static FN_TABLE: ffi::spdk_bdev_fn_table = fn_table();

const fn fn_table() -> ffi::spdk_bdev_fn_table {
    // SAFETY: all-zero is valid: every member is an optional callback.
    let mut f: ffi::spdk_bdev_fn_table = unsafe { std::mem::zeroed() };
    f.destruct = Some(destruct);
    f.submit_request = Some(io::submit_request);
    f.io_type_supported = Some(io_type_supported);
    f.get_io_channel = Some(get_io_channel);
    f.dump_info_json = Some(dump_info_json);
    f.write_config_json = Some(write_config_json);
    f
}

/// Asked once, at `spdk_bdev_register`; the answers are cached by the bdev layer.
unsafe extern "C" fn io_type_supported(
    ctx: *mut c_void,
    kind: ffi::spdk_bdev_io_type::Type,
) -> bool {
    no_unwind("io_type_supported", false, || {
        let _ = ctx;
        // The worker handles all of these itself (UNMAP / WRITE_ZEROES are logged as keys
        // that read as zeros and written back as write-zeroes).
        matches!(
            kind,
            t::SPDK_BDEV_IO_TYPE_READ
                | t::SPDK_BDEV_IO_TYPE_WRITE
                | t::SPDK_BDEV_IO_TYPE_FLUSH
                | t::SPDK_BDEV_IO_TYPE_UNMAP
                | t::SPDK_BDEV_IO_TYPE_WRITE_ZEROES
                | t::SPDK_BDEV_IO_TYPE_RESET
        )
    })
}

unsafe extern "C" fn get_io_channel(ctx: *mut c_void) -> *mut ffi::spdk_io_channel {
    no_unwind("get_io_channel", std::ptr::null_mut(), || {
        // SAFETY: `ctx` is our registered io_device.
        unsafe { ffi::spdk_get_io_channel(ctx) }
    })
}

/// `bdev_get_bdevs` → `driver_specific.pcache`.
unsafe extern "C" fn dump_info_json(ctx: *mut c_void, w: *mut ffi::spdk_json_write_ctx) -> c_int {
    no_unwind("dump_info_json", 0, || {
        // SAFETY: `ctx` is our live node; `w` is valid for this callback.
        let (n, w) = unsafe { (&*ctx.cast::<Pcache>(), Writer::new(w)) };
        let mut options = n.config_params.borrow().clone();
        if let Some(o) = options.as_object_mut() {
            for k in [
                "name",
                "cache_bdev",
                "cache_path",
                "cache_size_mib",
                "backing_bdev",
            ] {
                o.remove(k);
            }
        }
        // SAFETY: our registered bdev; plain field read.
        let stripe_blocks = unsafe { (*n.bdev_ptr()).optimal_io_boundary };
        // The mode in effect: the open's, then each live switch's (`update_params`).
        let mode = options.get("mode").cloned().unwrap_or(Value::Null);
        let mut info = json!({
            "name": n.config.name,
            "backing_bdev": n.config.backing_bdev,
            "attached_by": match n.origin.get() {
                Origin::Rpc => "rpc",
                Origin::Examine => "examine",
            },
            "mode": mode,
            "stripe_blocks": stripe_blocks,
            "options": options,
            "cache": *n.info.borrow(),
        });
        for extra in [&n.media, &n.backing_flush] {
            if let (Some(o), Some(m)) = (info.as_object_mut(), extra.as_object()) {
                o.extend(m.clone());
            }
        }
        w.named("pcache", &info);
        0
    })
}

/// `save_config`: one `bdev_pcache_create` with every option and `defer: true` (a config
/// loads even when a base bdev comes later, e.g. from an NVMe attach). Runs under the bdev
/// manager's spinlock: uses cached data only, never looks a bdev up.
unsafe extern "C" fn write_config_json(
    bdev: *mut ffi::spdk_bdev,
    w: *mut ffi::spdk_json_write_ctx,
) {
    no_unwind("write_config_json", (), || {
        // SAFETY: `bdev` is ours, `ctxt` our live node; `w` is valid for this callback.
        let (n, w) = unsafe { (&*(*bdev).ctxt.cast::<Pcache>(), Writer::new(w)) };
        let mut params = n.config_params.borrow().clone();
        params["defer"] = json!(true);
        w.value(&json!({"method": "bdev_pcache_create", "params": params}));
    })
}
