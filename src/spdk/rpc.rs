//! JSON-RPC methods: `bdev_pcache_create`, `bdev_pcache_delete`, `bdev_pcache_get_stats`,
//! `bdev_pcache_flush_start`, `bdev_pcache_flush_status`, `bdev_pcache_set_options`. All but
//! flush_start answer asynchronously (after messages to the bdev's worker thread).
//!
//! Registered `SPDK_RPC_RUNTIME` only. A `--json` config (spdk_tgt, bdevperf) still runs
//! them: SPDK's loader (`lib/init/json_config.c`) makes two passes over the config, first
//! the methods allowed in STARTUP state, then, after `framework_start_init`, the RUNTIME
//! ones, in file order. Verified with bdevperf: registered `STARTUP | RUNTIME`,
//! `bdev_pcache_create` runs in the first pass, before `bdev_malloc_create` (RUNTIME-only)
//! has created its base bdevs, and fails with "cache bdev ... does not exist".
//!
//! Parameters are re-serialized and parsed with serde (`json::params_to_value`,
//! `config::parse_*`); every bad parameter gets a JSON-RPC error with a message.
//!
//! `bdev_pcache_create` answers the new bdev's name, or `true` when `defer` lets it wait
//! for a missing base bdev (`module::create_request`). Such waiting requests, and caches
//! examine found whose backing bdev is missing, are listed by `bdev_pcache_get_stats` with
//! `"state": "waiting for ..."` and dropped by `bdev_pcache_delete`.

use std::ffi::{c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use serde_json::Value;

use super::ffi;
use super::io::Channel;
use super::json::{params_to_value, Writer};
use super::log::{no_unwind, spdk_log};
use super::stats::{Retired, Snapshot};
use super::vbdev::NodeState;
use super::{module, vbdev, worker};
use crate::shell::config;

type Handler = unsafe extern "C" fn(*mut ffi::spdk_jsonrpc_request, *const ffi::spdk_json_val);

const METHODS: [(&std::ffi::CStr, Handler); 6] = [
    (c"bdev_pcache_set_options", rpc_set_options),
    (c"bdev_pcache_create", rpc_create),
    (c"bdev_pcache_delete", rpc_delete),
    (c"bdev_pcache_get_stats", rpc_get_stats),
    (c"bdev_pcache_flush_start", rpc_flush_start),
    (c"bdev_pcache_flush_status", rpc_flush_status),
];

/// Called from the module constructor: no panics, no std I/O.
pub(crate) fn register_methods() {
    for (name, handler) in METHODS {
        // SAFETY: static method names and handlers with the expected signature;
        // libspdk_rpc is loaded (our dependency) and keeps the pointers.
        unsafe {
            ffi::spdk_rpc_register_method(name.as_ptr(), Some(handler), ffi::SPDK_RPC_RUNTIME)
        };
    }
}

/// A request that must be answered exactly once; consumed by the reply.
struct Request(*mut ffi::spdk_jsonrpc_request);

impl Request {
    fn error(self, code: i32, msg: &str) {
        spdk_log!(ERROR, "{msg}");
        let msg = CString::new(msg.replace('\0', "")).unwrap_or_default();
        // SAFETY: a pending request, answered once (self is consumed).
        unsafe { ffi::spdk_jsonrpc_send_error_response(self.0, code, msg.as_ptr()) };
    }

    fn reply(self, v: &Value) {
        // SAFETY: a pending request, answered once. begin_result returns null for a
        // notification (no id), in which case nothing is sent.
        unsafe {
            let w = ffi::spdk_jsonrpc_begin_result(self.0);
            if !w.is_null() {
                Writer::new(w).value(v);
                ffi::spdk_jsonrpc_end_result(self.0, w);
            }
        }
    }

    fn into_raw(self) -> *mut ffi::spdk_jsonrpc_request {
        self.0
    }
}

/// Run an RPC body; a panic (a bug) becomes an internal error, never an unwind into C.
fn guarded(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
    body: fn(Request, Value),
) {
    // SAFETY: `params` is what the RPC server handed to the handler calling us.
    let parsed = unsafe { params_to_value(params) };
    let outcome = catch_unwind(AssertUnwindSafe(|| match parsed {
        Ok(v) => body(Request(request), v),
        Err(e) => Request(request).error(ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS, &e),
    }));
    if outcome.is_err() {
        Request(request).error(
            ffi::SPDK_JSONRPC_ERROR_INTERNAL_ERROR,
            "internal error (panic) in pcache RPC handler",
        );
    }
}

unsafe extern "C" fn rpc_create(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
) {
    guarded(request, params, |req, params| {
        match config::parse_create(params) {
            Err(e) => req.error(
                ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS,
                &format!("bdev_pcache_create: {e}"),
            ),
            Ok(cfg) => module::create_request(
                cfg,
                Box::new(move |res| match res {
                    Ok(v) => req.reply(&v),
                    Err((code, msg)) => req.error(code, &format!("bdev_pcache_create: {msg}")),
                }),
            ),
        }
    });
}

unsafe extern "C" fn delete_done(arg: *mut c_void, rc: c_int) {
    no_unwind("delete_done", (), || {
        let req = Request(arg.cast());
        if rc == 0 {
            req.reply(&Value::Bool(true));
        } else {
            // SAFETY: spdk_strerror returns a valid static/thread-local string.
            let why = unsafe { std::ffi::CStr::from_ptr(ffi::spdk_strerror(rc.abs())) }
                .to_string_lossy()
                .into_owned();
            req.error(rc, &format!("bdev_pcache_delete: unregister failed: {why}"));
        }
    })
}

/// A running pcache bdev by name, or the error to answer with.
/// `running` for methods whose only parameter is `{name}`: the node and its name.
fn running_named(
    method: &str,
    params: Value,
) -> Result<(*mut vbdev::Pcache, String), (i32, String)> {
    let name = config::parse_name(params).map_err(|e| {
        (
            ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS,
            format!("{method}: {e}"),
        )
    })?;
    Ok((running(method, &name)?, name))
}

fn running(method: &str, name: &str) -> Result<*mut vbdev::Pcache, (i32, String)> {
    let Some(node) = vbdev::find(name) else {
        if let Some(p) = module::pending_json(Some(name)).first() {
            return Err((
                -libc::EBUSY,
                format!(
                    "{method}: pcache bdev '{name}' is not attached yet: {}",
                    p["state"].as_str().unwrap_or("waiting")
                ),
            ));
        }
        return Err((
            -libc::ENODEV,
            format!("{method}: no pcache bdev named '{name}'"),
        ));
    };
    // SAFETY: registered nodes are live (same thread).
    if unsafe { (*node).state() } != NodeState::Running {
        return Err((
            -libc::EBUSY,
            format!("{method}: pcache bdev '{name}' is still being created"),
        ));
    }
    Ok(node)
}

unsafe extern "C" fn rpc_delete(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
) {
    guarded(request, params, |req, params| {
        let d = match config::parse_delete(params) {
            Ok(d) => d,
            Err(e) => {
                return req.error(
                    ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS,
                    &format!("bdev_pcache_delete: {e}"),
                )
            }
        };
        // A request still waiting for its base bdevs is simply forgotten.
        if vbdev::find(&d.name).is_none() && module::pending_delete(&d.name) {
            return req.reply(&Value::Bool(true));
        }
        let node = match running("bdev_pcache_delete", &d.name) {
            Ok(n) => n,
            Err((code, msg)) => return req.error(code, &msg),
        };
        // SAFETY: live node (registry, same thread).
        let n = unsafe { &*node };
        if n.deleting.get() {
            return req.error(
                -libc::EBUSY,
                &format!("bdev_pcache_delete: '{}' is already being deleted", d.name),
            );
        }
        n.deleting.set(true);
        if d.no_drain {
            return unregister_and_reply(node, req);
        }
        // Write back everything while the bdev still serves I/O (a backing failure leaves
        // it usable), then unregister; destruct drains again what arrived meanwhile.
        let name = d.name.clone();
        let sent = worker::drain(
            n.lead_thread(),
            n.lead_worker(),
            Box::new(move |res| {
                if !vbdev::is_live(node) {
                    return req.error(
                        -libc::ENODEV,
                        &format!("bdev_pcache_delete: '{name}' went away while draining"),
                    );
                }
                // SAFETY: live (checked above, same thread).
                let n = unsafe { &*node };
                match res {
                    Ok(()) => {
                        n.drain_on_destruct.set(true);
                        unregister_and_reply(node, req);
                    }
                    Err(e) => {
                        n.deleting.set(false);
                        req.error(
                            -libc::EIO,
                            &format!(
                                "bdev_pcache_delete: '{name}' not deleted: {e} (no_drain=true deletes it anyway)"
                            ),
                        );
                    }
                }
            }),
        );
        if sent.is_err() {
            // The closure (and the request inside it) is gone: nothing can answer it.
            n.deleting.set(false);
            spdk_log!(ERROR, "bdev_pcache_delete: cannot reach the engine thread");
        }
    });
}

fn unregister_and_reply(node: *mut vbdev::Pcache, req: Request) {
    let raw = req.into_raw();
    let rc = vbdev::unregister(node, Some(delete_done), raw.cast());
    if rc != 0 {
        // The callback is not called when unregister_by_name fails up front.
        // SAFETY: same request, not answered yet.
        unsafe { delete_done(raw.cast(), rc) };
    }
}

unsafe extern "C" fn rpc_flush_start(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
) {
    guarded(request, params, |req, params| {
        let m = "bdev_pcache_flush_start";
        let (node, _) = match running_named(m, params) {
            Ok(n) => n,
            Err((code, msg)) => return req.error(code, &msg),
        };
        // SAFETY: live node.
        let n = unsafe { &*node };
        match worker::flush_start(n.lead_thread(), n.lead_worker()) {
            Ok(()) => req.reply(&Value::Bool(true)),
            Err(()) => req.error(
                -libc::ENOMEM,
                &format!("{m}: cannot reach the engine thread"),
            ),
        }
    });
}

unsafe extern "C" fn rpc_set_options(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
) {
    guarded(request, params, |req, params| {
        let m = "bdev_pcache_set_options";
        let so = match config::parse_set_options(params) {
            Ok(o) => o,
            Err(e) => {
                return req.error(ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS, &format!("{m}: {e}"))
            }
        };
        let node = match running(m, &so.name) {
            Ok(n) => n,
            Err((code, msg)) => return req.error(code, &msg),
        };
        // SAFETY: live node.
        let n = unsafe { &*node };
        let name = so.name.clone();
        let sent = worker::set_options(
            n.lead_thread(),
            n.lead_worker(),
            move |cur| so.apply_live(cur),
            Box::new(move |res| match res {
                Err(e) => req.error(ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS, &format!("{m}: {e}")),
                Ok(o) => {
                    let v = o.to_json();
                    if vbdev::is_live(node) {
                        // SAFETY: live (checked, same thread).
                        unsafe { (*node).update_params(&v) };
                    }
                    let mut out = v;
                    out["name"] = Value::String(name);
                    req.reply(&out);
                }
            }),
        );
        if sent.is_err() {
            spdk_log!(ERROR, "{m}: cannot reach the engine thread");
        }
    });
}

unsafe extern "C" fn rpc_flush_status(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
) {
    guarded(request, params, |req, params| {
        let m = "bdev_pcache_flush_status";
        let (node, name) = match running_named(m, params) {
            Ok(n) => n,
            Err((code, msg)) => return req.error(code, &msg),
        };
        // SAFETY: live node.
        let n = unsafe { &*node };
        let sent = worker::flush_status(
            n.lead_thread(),
            n.lead_worker(),
            Box::new(move |mut v| {
                v["name"] = Value::String(name);
                req.reply(&v)
            }),
        );
        if sent.is_err() {
            spdk_log!(ERROR, "{m}: cannot reach the engine thread");
        }
    });
}

// ---- get_stats: sum per-channel counters with spdk_for_each_channel ----

struct Collect {
    request: *mut ffi::spdk_jsonrpc_request,
    todo: std::vec::IntoIter<*mut vbdev::Pcache>,
    current: Option<(String, Arc<Retired>, *mut vbdev::Pcache)>,
    sum: Snapshot,
    channels: u64,
    out: Vec<Value>,
    /// Requests waiting for their base bdevs, listed after the live bdevs.
    pending: Vec<Value>,
}

/// Start on the next live bdev, or answer when none is left.
fn collect_next(mut c: Box<Collect>) {
    for node in c.todo.by_ref() {
        // The node may have been deleted since the list was taken: skip it then. A live
        // node's io_device stays registered until our walk over it completes.
        // SAFETY: a registered node is live (same thread).
        if !vbdev::is_live(node) || unsafe { (*node).state() } != NodeState::Running {
            continue;
        }
        // SAFETY: live node (registry, same thread).
        let (name, retired) =
            unsafe { ((*node).name().to_string(), (*node).front.retired.clone()) };
        c.current = Some((name, retired, node));
        c.sum = Snapshot::default();
        c.channels = 0;
        // SAFETY: `node` is a registered io_device; the context stays valid (leaked Box)
        // until `collect_done` takes it back.
        unsafe {
            ffi::spdk_for_each_channel(
                node.cast(),
                Some(collect_channel),
                Box::into_raw(c).cast(),
                Some(collect_done),
            )
        };
        return;
    }
    let mut out = std::mem::take(&mut c.out);
    out.append(&mut c.pending);
    Request(c.request).reply(&Value::Array(out));
}

unsafe extern "C" fn collect_channel(i: *mut ffi::spdk_io_channel_iter) {
    no_unwind("collect_channel", (), || {
        // SAFETY: the iterator context is our `Collect`; SPDK visits channels one at a time, so
        // this is the only access. The channel is one of our io_device's, on this thread.
        unsafe {
            let c = &mut *ffi::spdk_io_channel_iter_get_ctx(i).cast::<Collect>();
            let chan =
                &*ffi::io_channel_get_ctx::<Channel>(ffi::spdk_io_channel_iter_get_channel(i));
            c.sum.add(&chan.stats().snapshot());
            c.channels += 1;
            ffi::spdk_for_each_channel_continue(i, 0);
        }
    })
}

unsafe extern "C" fn collect_done(i: *mut ffi::spdk_io_channel_iter, _status: c_int) {
    // SAFETY: we leaked this Box in `collect_next`; the walk is over, so it is ours again.
    let mut c = unsafe { Box::from_raw(ffi::spdk_io_channel_iter_get_ctx(i).cast::<Collect>()) };
    let r = catch_unwind(AssertUnwindSafe(|| {
        c.current.take().map(|(name, retired, node)| {
            let mut total = c.sum;
            total.add(&retired.get());
            let mut v = total.to_json(&name, c.channels);
            if let Some(o) = v.as_object_mut() {
                o.insert("state".into(), Value::String("running".into()));
            }
            (v, node)
        })
    }));
    match r {
        Err(_) => Request(c.request).error(
            ffi::SPDK_JSONRPC_ERROR_INTERNAL_ERROR,
            "internal error collecting stats",
        ),
        Ok(None) => collect_next(c),
        Ok(Some((v, node))) => collect_workers(c, v, node),
    }
}

/// Adds the worker's statistics (by message to its thread) to `v`, then goes on.
fn collect_workers(mut c: Box<Collect>, v: Value, node: *mut vbdev::Pcache) {
    // SAFETY: the walk over the node's channels just ended on this thread.
    if !vbdev::is_live(node) || unsafe { (*node).state() } != NodeState::Running {
        c.out.push(v);
        return collect_next(c);
    }
    // SAFETY: live node.
    let (thread, worker, media, flush) = unsafe {
        (
            (*node).lead_thread(),
            (*node).lead_worker(),
            (*node).media().clone(),
            (*node).backing_flush().clone(),
        )
    };
    let mut v = v;
    for extra in [media, flush] {
        if let (Some(o), Value::Object(m)) = (v.as_object_mut(), extra) {
            o.extend(m);
        }
    }
    // The closure is dropped unrun if the message cannot be sent: keep the walk reachable.
    let slot = std::rc::Rc::new(std::cell::RefCell::new(Some((c, v))));
    let back = slot.clone();
    let sent = worker::stats(
        thread,
        worker,
        Box::new(move |e: Value| {
            if let Some((mut c, mut v)) = back.borrow_mut().take() {
                if let (Some(o), Value::Object(e)) = (v.as_object_mut(), e) {
                    o.extend(e);
                }
                c.out.push(v);
                collect_next(c);
            }
        }),
    );
    if sent.is_err() {
        let taken = slot.borrow_mut().take();
        if let Some((mut c, v)) = taken {
            c.out.push(v);
            collect_next(c);
        }
    }
}

unsafe extern "C" fn rpc_get_stats(
    request: *mut ffi::spdk_jsonrpc_request,
    params: *const ffi::spdk_json_val,
) {
    guarded(request, params, |req, params| {
        let (nodes, pending) = match config::parse_stats(params) {
            Err(e) => {
                return req.error(
                    ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS,
                    &format!("bdev_pcache_get_stats: {e}"),
                )
            }
            Ok(None) => (vbdev::all(), module::pending_json(None)),
            Ok(Some(name)) => match vbdev::find(&name) {
                Some(n) => (vec![n], Vec::new()),
                None => {
                    let p = module::pending_json(Some(&name));
                    if p.is_empty() {
                        return req.error(
                            -libc::ENODEV,
                            &format!("bdev_pcache_get_stats: no pcache bdev named '{name}'"),
                        );
                    }
                    (Vec::new(), p)
                }
            },
        };
        let c = Box::new(Collect {
            request: req.into_raw(),
            todo: nodes.into_iter(),
            current: None,
            sum: Snapshot::default(),
            channels: 0,
            out: Vec::new(),
            pending,
        });
        collect_next(c);
    });
}
