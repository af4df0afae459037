//! The `spdk_bdev_module` "pcache", its registration at load time, examine (autoload of
//! caches found on new bdevs) and requests that wait for their base bdevs.
//!
//! SPDK v26.05 has no plugin loader: `libpcache.so` is LD_PRELOADed into a stock SPDK app
//! built with shared libraries, and a constructor adds the module to the bdev layer's list
//! and registers our RPC methods before `main` runs (what `SPDK_BDEV_MODULE_REGISTER` and
//! `SPDK_RPC_REGISTER` do in C).
//!
//! Every new bdev goes through the bdev layer's examine, on the app thread:
//! - `examine_config` (synchronous, no I/O): a request waiting for its bases
//!   ([`Pending`]) whose last base just appeared is attached now: the create opens and
//!   claims both bases before any other module's `examine_disk` looks at them.
//! - `examine_disk` (asynchronous): a base of a pcache bdev being created waits for the
//!   create, so `bdev_wait_for_examine` covers it. Any other bdev with 512-byte to 4 KiB
//!   blocks is probed: both superblock replicas are read (bytes 0..8192); a pcache superblock that
//!   carries a bdev name and whose backing bdev is present (same UUID, else same name when
//!   either has none, and same size: the open's own rule) is reattached through the same
//!   create as `bdev_pcache_create`; without its backing bdev it waits for it (a
//!   [`Pending`] attached by the backing bdev's `examine_config`).
//!
//! `spdk_bdev_module_examine_done` is called exactly once per callback: by dropping an
//! [`ExamineDone`] token, which every path owns or hands on (to the probe's completion, to
//! the create's reply).

use std::ffi::{c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};

use super::base_io::{block_io, BlockOp};
use super::json::Writer;
use super::log::{no_unwind, spdk_log};
use super::registration::{self, finishing, module};
use super::vbdev::{self, Origin, RpcError};
use super::{ffi, worker};
use crate::engine::format::{uuid_string, FormatError, SB_BYTES};
use crate::engine::geometry::SB_B_SECTOR;
use crate::engine::{compare_backing, BackingIdentity, BackingMatch, Superblock};
use crate::shell::config::{CacheMedia, CreateConfig};
use crate::shell::identity::{mismatch_message, Mismatch};

/// `spdk_log` at WARN level (the shared `spdk_log!` knows ERROR and NOTICE).
macro_rules! warn_log {
    ($($arg:tt)*) => {
        super::log::log(
            ffi::spdk_log_level::SPDK_LOG_WARN,
            c"src/spdk/module.rs",
            line!(),
            &format!($($arg)*),
        )
    };
}

/// Fills in the module's callbacks and registers it with the bdev layer.
///
/// # Safety
/// As [`registration::register`]: once, at load time.
pub(crate) unsafe fn register() {
    // SAFETY: per the contract.
    unsafe {
        registration::register(|m| {
            m.module_init = Some(module_init);
            m.fini_start = Some(fini_start);
            m.module_fini = Some(module_fini);
            m.get_ctx_size = Some(get_ctx_size);
            m.config_json = Some(config_json);
            m.examine_config = Some(examine_config);
            m.examine_disk = Some(examine_disk);
        })
    };
}

unsafe extern "C" fn module_init() -> c_int {
    registration::set_finishing(false);
    let cores = super::worker::app_cores().len();
    crate::shell::config::DEFAULT_SHARDS
        .store(u32::try_from(cores).unwrap_or(1).max(1), Ordering::Relaxed);
    0
}

unsafe extern "C" fn fini_start() {
    registration::set_finishing(true);
}

unsafe extern "C" fn module_fini() {
    // Every pcache bdev has been unregistered (and destructed) by now.
    vbdev::registry_clear();
    pending().clear();
}

unsafe extern "C" fn get_ctx_size() -> c_int {
    std::mem::size_of::<worker::IoCtx>() as c_int
}

// ---- requests waiting for base bdevs ----

/// What a [`Pending`] request waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wait {
    /// `bdev_pcache_create` with `defer`: its bases, by name.
    Deferred,
    /// Examine found the cache: its backing bdev, as the superblock identifies it.
    Backing(BackingIdentity),
}

/// A pcache bdev to attach once its base bdevs exist (app thread only).
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub config: CreateConfig,
    pub wait: Wait,
}

static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<Pending>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes and returns the pending entries `f` selects.
fn take_pending(mut f: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
    let mut all = pending();
    let (taken, kept) = std::mem::take(&mut *all).into_iter().partition(|p| f(p));
    *all = kept;
    taken
}

fn bdev_by_name(name: &str) -> *mut ffi::spdk_bdev {
    let Ok(c) = CString::new(name) else {
        return ptr::null_mut();
    };
    // SAFETY: valid C string; looks up bdevs and aliases under the bdev manager's lock.
    unsafe { ffi::spdk_bdev_get_by_name(c.as_ptr()) }
}

fn bdev_name(b: *mut ffi::spdk_bdev) -> String {
    // SAFETY: `b` is a live bdev; its name is a NUL-terminated string it owns.
    unsafe { CStr::from_ptr(ffi::spdk_bdev_get_name(b)) }
        .to_string_lossy()
        .into_owned()
}

/// Size of a bdev in 512-byte sectors.
fn bdev_sectors(b: *mut ffi::spdk_bdev) -> u64 {
    // SAFETY: `b` is a live bdev; plain getters.
    let (blocks, bs) = unsafe {
        (
            ffi::spdk_bdev_get_num_blocks(b),
            ffi::spdk_bdev_get_block_size(b),
        )
    };
    blocks.saturating_mul(u64::from(bs)) / 512
}

fn bdev_uuid(b: *mut ffi::spdk_bdev) -> [u8; 16] {
    // SAFETY: `b` is a live bdev; its UUID is 16 plain bytes inside it (bindgen's layout
    // assertions check the size), copied out.
    unsafe {
        let u = ffi::spdk_bdev_get_uuid(b);
        if u.is_null() {
            [0; 16]
        } else {
            ptr::read_unaligned(u.cast::<[u8; 16]>())
        }
    }
}

fn is_ours(b: *mut ffi::spdk_bdev) -> bool {
    // SAFETY: `b` is a live bdev; `module` is set before registration and never changes.
    ptr::eq(unsafe { (*b).module }, module())
}

/// What the open would see of `b` as a backing bdev.
fn identity_of(b: *mut ffi::spdk_bdev) -> BackingIdentity {
    BackingIdentity {
        sectors: bdev_sectors(b),
        // SAFETY: `b` is a live bdev; plain getter.
        block_size: unsafe { ffi::spdk_bdev_get_block_size(b) },
        uuid: bdev_uuid(b),
        name: bdev_name(b),
    }
}

/// Is `b` the backing bdev `id` describes, by the open's own rule
/// (`engine::compare_backing`: size, then UUID when the superblock records one, else
/// name)? Returns the backing bdev name the create must use.
fn backing_match(id: &BackingIdentity, b: *mut ffi::spdk_bdev) -> Option<String> {
    if is_ours(b) {
        return None;
    }
    let found = identity_of(b);
    (compare_backing(id, &found) == BackingMatch::Same).then_some(found.name)
}

/// Examine found the cache `cfg` describes (backing bdev as the superblock names it) and
/// `b` is a bdev of the recorded size under the recorded name, but another UUID: logs why
/// examine does not attach it and what the operator can do (`shell::identity`). Examine
/// never attaches such a bdev and claims nothing, so a create with
/// `backing_uuid_mismatch: accept` (or the bdev re-created with its UUID) attaches it.
fn explain_mismatch(cfg: &CreateConfig, id: &BackingIdentity, b: *mut ffi::spdk_bdev) {
    if b.is_null() || is_ours(b) {
        return;
    }
    let found = identity_of(b);
    if compare_backing(id, &found) != BackingMatch::Identity {
        return;
    }
    // SAFETY: live bdev; its module's name is a static string.
    let module = unsafe {
        let m = ffi::spdk_bdev_get_module_name(b);
        (!m.is_null()).then(|| CStr::from_ptr(m).to_string_lossy().into_owned())
    };
    let cfg = CreateConfig {
        backing_bdev: found.name.clone(),
        ..cfg.clone()
    };
    let msg = mismatch_message(&Mismatch {
        create_args: &cfg.create_args(),
        cache_label: &cfg.cache_label(),
        recorded: id,
        found: &found,
        found_module: module.as_deref(),
        dirty_bytes: None,
    });
    warn_log!(
        "examine: pcache '{}': {msg} Examine does not attach it: it waits for a backing bdev \
         with the recorded identity, and leaves both bdevs unclaimed.",
        cfg.name
    );
}

/// Is bdev `name` claimed (by any module)? Such a bdev cannot be opened for writing.
fn claimed(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    let mut desc = ptr::null_mut();
    // SAFETY: app thread; valid name; the descriptor is closed right away, on this thread.
    unsafe {
        let rc = ffi::spdk_bdev_open_ext(
            c.as_ptr(),
            true,
            Some(probe_event),
            ptr::null_mut(),
            &mut desc,
        );
        if rc == 0 {
            ffi::spdk_bdev_close(desc);
        }
        rc == -libc::EPERM
    }
}

/// The present backing bdev `id` describes: by UUID first, then by name.
fn find_backing(id: &BackingIdentity) -> Option<String> {
    if id.uuid != [0; 16] {
        // SAFETY: app thread; walks the bdev manager's list, bdevs stay live meanwhile.
        let mut b = unsafe { ffi::spdk_bdev_first() };
        while !b.is_null() {
            if bdev_uuid(b) == id.uuid {
                if let Some(n) = backing_match(id, b) {
                    return Some(n);
                }
            }
            // SAFETY: `b` is a live bdev of the list.
            b = unsafe { ffi::spdk_bdev_next(b) };
        }
    }
    let b = bdev_by_name(&id.name);
    (!b.is_null()).then(|| backing_match(id, b)).flatten()
}

impl Pending {
    fn bases(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.config.cache_bdev().into_iter().collect();
        v.push(&self.config.backing_bdev);
        v
    }

    /// What it still waits for, for messages and `bdev_pcache_get_stats`.
    fn waiting_for(&self) -> Vec<String> {
        match &self.wait {
            Wait::Deferred => self
                .bases()
                .into_iter()
                .filter(|b| bdev_by_name(b).is_null())
                .map(str::to_string)
                .collect(),
            Wait::Backing(id) => vec![format!(
                "{} (uuid {}, {} bytes)",
                id.name,
                uuid_string(&id.uuid),
                id.sectors * 512
            )],
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let waiting = self.waiting_for();
        let mut v = json!({
            "name": self.config.name,
            "state": format!("waiting for {}", waiting.join(", ")),
            "waiting_for": waiting,
            "backing_bdev": self.config.backing_bdev,
            "attach": match self.wait {
                Wait::Deferred => "bdev_pcache_create (defer)",
                Wait::Backing(_) => "examine",
            },
        });
        match &self.config.cache {
            CacheMedia::Bdev(b) => v["cache_bdev"] = json!(b),
            CacheMedia::Path { path, .. } => v["cache_path"] = json!(path),
        }
        v
    }
}

/// Pending entries as `bdev_pcache_get_stats` lists them (all, or the one named).
pub(crate) fn pending_json(name: Option<&str>) -> Vec<Value> {
    pending()
        .iter()
        .filter(|p| name.is_none_or(|n| p.config.name == n))
        .map(Pending::to_json)
        .collect()
}

/// `bdev_pcache_delete` of a pending name: forget it. False when there is none.
pub(crate) fn pending_delete(name: &str) -> bool {
    let gone = take_pending(|p| p.config.name == name);
    for p in &gone {
        spdk_log!(
            NOTICE,
            "pcache bdev '{name}' no longer waits for {}",
            p.waiting_for().join(", ")
        );
    }
    !gone.is_empty()
}

/// Why a new request (`cfg`) cannot wait next to the pending ones, if it cannot.
fn pending_conflict(cfg: &CreateConfig) -> Option<String> {
    let mut mine: Vec<&str> = cfg.cache_bdev().into_iter().collect();
    mine.push(&cfg.backing_bdev);
    let all = pending();
    for p in all.iter() {
        if p.config.name == cfg.name {
            return Some(format!(
                "pcache bdev '{}' already exists, waiting for {} (bdev_pcache_delete drops it)",
                cfg.name,
                p.waiting_for().join(", ")
            ));
        }
        let same_path = matches!((&p.config.cache, &cfg.cache),
            (CacheMedia::Path { path: a, .. }, CacheMedia::Path { path: b, .. }) if a == b);
        if let Some(b) = p.bases().into_iter().find(|b| mine.contains(b)) {
            return Some(format!(
                "bdev '{b}' is in use: pending pcache bdev '{}' waits to use it",
                p.config.name
            ));
        }
        if same_path {
            return Some(format!(
                "{} is in use: pending pcache bdev '{}' waits to use it",
                cfg.cache_label(),
                p.config.name
            ));
        }
    }
    None
}

/// `save_config` (module part): the deferred requests still waiting, so they survive a
/// restart. Live pcache bdevs are written by their own `write_config_json`; what examine
/// waits for is found again by examine and is not written.
unsafe extern "C" fn config_json(w: *mut ffi::spdk_json_write_ctx) -> c_int {
    no_unwind("config_json", 0, || {
        // SAFETY: `w` is valid for this callback.
        let w = unsafe { Writer::new(w) };
        for p in pending().iter().filter(|p| p.wait == Wait::Deferred) {
            let mut params = p.config.to_params();
            params["defer"] = json!(true);
            w.value(&json!({"method": "bdev_pcache_create", "params": params}));
        }
        0
    })
}

// ---- bdev_pcache_create ----

/// The answer to `bdev_pcache_create`: the name (created or adopted now), `true` (waits for
/// its base bdevs), or an error.
pub(crate) type RequestReply = Box<dyn FnOnce(Result<Value, RpcError>)>;

/// `bdev_pcache_create`: adopt the bdev examine attached for this very request, create now,
/// or (with `defer` and a base missing) remember the request until its bases exist.
pub(crate) fn create_request(cfg: CreateConfig, reply: RequestReply) {
    let named = |reply: RequestReply| -> vbdev::CreateReply {
        Box::new(move |r| reply(r.map(Value::String)))
    };
    if let Some(node) = vbdev::find(&cfg.name) {
        if vbdev::adoptable(node, &cfg) {
            return vbdev::adopt(node, cfg, named(reply));
        }
    }
    // What examine waits for on this cache (or under this name) gives way to the request.
    for p in take_pending(|p| {
        matches!(p.wait, Wait::Backing(_))
            && (p.config.name == cfg.name || p.config.cache == cfg.cache)
    }) {
        spdk_log!(
            NOTICE,
            "{}: bdev_pcache_create replaces the attach of '{}' examine was waiting for",
            cfg.name,
            p.config.name
        );
    }
    if let Some(msg) = pending_conflict(&cfg) {
        return reply(Err((-libc::EEXIST, msg)));
    }
    let missing: Vec<String> = cfg
        .cache_bdev()
        .into_iter()
        .chain([cfg.backing_bdev.as_str()])
        .filter(|b| bdev_by_name(b).is_null())
        .map(str::to_string)
        .collect();
    if missing.is_empty() || !cfg.defer {
        return vbdev::create(cfg, Origin::Rpc, named(reply));
    }
    if let Err(e) = vbdev::check_name_free(&cfg.name) {
        return reply(Err(e));
    }
    let mine: Vec<&str> = cfg
        .cache_bdev()
        .into_iter()
        .chain([cfg.backing_bdev.as_str()])
        .collect();
    for b in mine {
        if let Some(node) = vbdev::using(b) {
            // SAFETY: live node (registry, app thread).
            let other = unsafe { (*node).name().to_string() };
            return reply(Err((
                -libc::EBUSY,
                format!("bdev '{b}' is in use by pcache bdev '{other}'"),
            )));
        }
    }
    spdk_log!(
        NOTICE,
        "pcache bdev '{}' waits for {} (deferred create): it is attached when {}",
        cfg.name,
        missing.join(", "),
        if missing.len() > 1 {
            "they appear"
        } else {
            "it appears"
        }
    );
    pending().push(Pending {
        config: cfg,
        wait: Wait::Deferred,
    });
    reply(Ok(Value::Bool(true)));
}

// ---- examine ----

/// Owning this token means owing the bdev layer one `spdk_bdev_module_examine_done`: it
/// is called when the token is dropped, whatever the path (also on unwinding).
struct ExamineDone;

impl Drop for ExamineDone {
    fn drop(&mut self) {
        // SAFETY: our registered module; called once per token, and one token is made per
        // examine callback. SPDK runs the accounting on the app thread.
        unsafe { ffi::spdk_bdev_module_examine_done(module()) };
    }
}

unsafe extern "C" fn examine_config(bdev: *mut ffi::spdk_bdev) {
    let _done = ExamineDone;
    no_unwind("examine_config", (), || {
        if finishing() || is_ours(bdev) {
            return;
        }
        attach_ready(bdev);
    });
}

/// Attaches the pending requests `bdev` (just registered) completes.
fn attach_ready(bdev: *mut ffi::spdk_bdev) {
    // What examine found on a cache bdev that is gone since is forgotten (it is examined
    // again if it comes back).
    for p in take_pending(|p| {
        matches!(p.wait, Wait::Backing(_))
            && p.config
                .cache_bdev()
                .is_some_and(|c| bdev_by_name(c).is_null())
    }) {
        spdk_log!(
            NOTICE,
            "pcache bdev '{}' no longer waits for its backing bdev: {} is gone",
            p.config.name,
            p.config.cache_label()
        );
    }
    let mut backing_for: Vec<(String, String)> = Vec::new();
    let mut mismatched: Vec<(CreateConfig, BackingIdentity)> = Vec::new();
    let ready = take_pending(|p| match &p.wait {
        Wait::Deferred => p.bases().iter().all(|b| !bdev_by_name(b).is_null()),
        Wait::Backing(id) => match backing_match(id, bdev) {
            Some(name) => {
                backing_for.push((p.config.name.clone(), name));
                true
            }
            None => {
                if bdev_name(bdev) == id.name {
                    mismatched.push((p.config.clone(), id.clone()));
                }
                false
            }
        },
    });
    for (cfg, id) in &mismatched {
        explain_mismatch(cfg, id, bdev);
    }
    for mut p in ready {
        let origin = match p.wait {
            Wait::Deferred => Origin::Rpc,
            Wait::Backing(_) => {
                if let Some((_, b)) = backing_for.iter().find(|(n, _)| *n == p.config.name) {
                    p.config.backing_bdev = b.clone();
                }
                Origin::Examine
            }
        };
        let name = p.config.name.clone();
        spdk_log!(
            NOTICE,
            "pcache bdev '{name}': {} is here, attaching ({}, backing '{}')",
            bdev_name(bdev),
            p.config.cache_label(),
            p.config.backing_bdev
        );
        vbdev::create(
            p.config,
            origin,
            Box::new(move |r| {
                if let Err((_, e)) = r {
                    spdk_log!(ERROR, "cannot attach pcache bdev '{name}': {e}");
                }
            }),
        );
    }
}

unsafe extern "C" fn examine_disk(bdev: *mut ffi::spdk_bdev) {
    let done = ExamineDone;
    no_unwind("examine_disk", (), move || examine_disk_body(bdev, done));
}

fn examine_disk_body(bdev: *mut ffi::spdk_bdev, done: ExamineDone) {
    if finishing() || is_ours(bdev) {
        return;
    }
    let name = bdev_name(bdev);
    // A base of a pcache bdev being created (e.g. by `examine_config` just now): the
    // examine ends when the create does, so `bdev_wait_for_examine` covers the create.
    if let Some(node) = vbdev::with_base(bdev).or_else(|| vbdev::using(&name)) {
        return vbdev::when_created(node, Box::new(move |_| drop(done)));
    }
    // SAFETY: live bdev; plain getters.
    let (bs, blocks) = unsafe {
        (
            ffi::spdk_bdev_get_block_size(bdev),
            ffi::spdk_bdev_get_num_blocks(bdev),
        )
    };
    // Cache bdevs have 512-byte to 4 KiB blocks; the superblocks fill the first 8 KiB.
    let max_block = crate::engine::geometry::MAX_BLOCK_BYTES;
    if !bs.is_power_of_two()
        || !(512..=max_block).contains(&bs)
        || blocks.saturating_mul(u64::from(bs)) < 2 * SB_B_SECTOR * 512
    {
        return;
    }
    // The request that waits for this cache bdev decides what it holds.
    if pending()
        .iter()
        .any(|p| p.wait == Wait::Deferred && p.config.cache_bdev() == Some(name.as_str()))
    {
        return;
    }
    // What examine found earlier under this name is stale: this bdev is probed anew.
    take_pending(|p| p.config.cache_bdev() == Some(name.as_str()));
    probe(name, done);
}

unsafe extern "C" fn probe_event(
    _kind: ffi::spdk_bdev_event_type::Type,
    _bdev: *mut ffi::spdk_bdev,
    _ctx: *mut c_void,
) {
    // The probe closes its descriptor as soon as its read completes.
}

/// Reads both superblock replicas of `name` and acts on what they hold.
fn probe(name: String, done: ExamineDone) {
    let Ok(cname) = CString::new(name.clone()) else {
        return;
    };
    let mut desc = ptr::null_mut();
    // SAFETY: app thread; valid name; read-only open with a (no-op) event callback.
    let rc = unsafe {
        ffi::spdk_bdev_open_ext(
            cname.as_ptr(),
            false,
            Some(probe_event),
            ptr::null_mut(),
            &mut desc,
        )
    };
    if rc != 0 {
        spdk_log!(
            NOTICE,
            "examine: cannot open bdev '{name}' to look for a pcache superblock (rc {rc})"
        );
        return;
    }
    block_io(
        desc,
        BlockOp::read_superblocks(),
        Box::new(move |res| {
            // SAFETY: opened above on this (the app) thread; closed once.
            unsafe { ffi::spdk_bdev_close(desc) };
            match res {
                Ok(buf) => probed(name, &buf, done),
                Err(e) => spdk_log!(
                    NOTICE,
                    "examine: cannot read the superblock area of bdev '{name}': {e}"
                ),
            }
        }),
    );
}

/// What the probe of cache bdev candidate `cache` read (sectors 0..16).
fn probed(cache: String, buf: &[u8], done: ExamineDone) {
    if buf.len() < 2 * SB_BYTES {
        return;
    }
    let (a, b) = buf.split_at(SB_BYTES);
    let (sb, replica) = match (Superblock::decode(a), Superblock::decode(&b[..SB_BYTES])) {
        (Ok(sb), _) => (sb, a),
        (Err(_), Ok(sb)) => (sb, &b[..SB_BYTES]),
        (Err(FormatError::BadMagic { .. }), Err(FormatError::BadMagic { .. })) => return,
        (Err(ea), Err(eb)) => {
            warn_log!(
                "examine: bdev '{cache}' holds a damaged pcache superblock (replica A: {ea}; \
                 replica B: {eb}): not attaching it"
            );
            return;
        }
    };
    let name = match Superblock::decode_name(replica) {
        Ok(Some(n)) => n,
        Ok(None) => {
            spdk_log!(
                NOTICE,
                "examine: bdev '{cache}' holds a pcache without a bdev name (written before \
                 names were stored): attach it once with bdev_pcache_create (cache_bdev \
                 '{cache}', backing_bdev '{}'); it is attached by examine from then on",
                sb.backing.name
            );
            return;
        }
        Err(e) => {
            warn_log!("examine: bdev '{cache}' holds a pcache superblock with a bad name: {e}");
            return;
        }
    };
    if finishing() {
        return;
    }
    if let Some(node) = vbdev::find(&name).or_else(|| vbdev::using(&cache)) {
        // SAFETY: live node (registry, app thread).
        let other = unsafe { (*node).name().to_string() };
        spdk_log!(
            NOTICE,
            "examine: bdev '{cache}' holds pcache '{name}', but pcache bdev '{other}' exists: \
             not attaching it"
        );
        return;
    }
    let cfg =
        CreateConfig::from_superblock(name.clone(), cache.clone(), sb.backing.name.clone(), &sb);
    if let Some(why) = pending_conflict(&cfg) {
        spdk_log!(
            NOTICE,
            "examine: bdev '{cache}' holds pcache '{name}': not attaching it ({why})"
        );
        return;
    }
    if let Err((_, why)) = vbdev::check_name_free(&name) {
        warn_log!("examine: bdev '{cache}' holds pcache '{name}': not attaching it ({why})");
        return;
    }
    let Some(backing) = find_backing(&sb.backing) else {
        explain_mismatch(&cfg, &sb.backing, bdev_by_name(&sb.backing.name));
        spdk_log!(
            NOTICE,
            "examine: bdev '{cache}' holds pcache '{name}'; waiting for its backing bdev '{}' \
             (uuid {}, {} bytes)",
            sb.backing.name,
            uuid_string(&sb.backing.uuid),
            sb.backing.sectors * 512
        );
        pending().push(Pending {
            config: cfg,
            wait: Wait::Backing(sb.backing.clone()),
        });
        return;
    };
    let cfg = CreateConfig {
        backing_bdev: backing,
        ..cfg
    };
    for (role, b) in [
        ("cache", cache.as_str()),
        ("backing", cfg.backing_bdev.as_str()),
    ] {
        if claimed(b) {
            spdk_log!(
                NOTICE,
                "examine: bdev '{cache}' holds pcache '{name}': not attaching it, its {role} \
                 bdev '{b}' is claimed by another module"
            );
            return;
        }
    }
    spdk_log!(
        NOTICE,
        "examine: bdev '{cache}' holds pcache '{name}' of backing bdev '{}': attaching",
        cfg.backing_bdev
    );
    vbdev::create(
        cfg,
        Origin::Examine,
        Box::new(move |r| {
            if let Err((_, e)) = r {
                spdk_log!(ERROR, "examine: cannot attach pcache bdev '{name}': {e}");
            }
            drop(done);
        }),
    );
}
