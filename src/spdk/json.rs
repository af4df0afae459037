//! JSON between SPDK and serde.
//!
//! * In: the RPC server hands us `params` as a tree of `spdk_json_val` whose strings were
//!   decoded *in place*, so the raw text is not valid JSON. [`params_to_value`] re-serializes
//!   the tree with SPDK's own writer into a `Vec` and parses that with serde_json.
//! * Out: [`Writer`] wraps an `spdk_json_write_ctx` for the few shapes we emit and can write
//!   any `serde_json::Value` (used for RPC results and cached config).

use std::ffi::{c_int, c_void};

use serde_json::Value;

use super::ffi;

unsafe extern "C" fn collect(ctx: *mut c_void, data: *const c_void, size: usize) -> c_int {
    // SAFETY: `ctx` is the `Vec<u8>` passed to `spdk_json_write_begin` in `params_to_value`,
    // alive and exclusively ours for the whole write; `data` holds `size` bytes.
    let (buf, bytes) = unsafe {
        (
            &mut *ctx.cast::<Vec<u8>>(),
            std::slice::from_raw_parts(data.cast::<u8>(), size),
        )
    };
    buf.extend_from_slice(bytes);
    0
}

/// Re-serialize RPC `params` (may be null: no params) into a `serde_json::Value`.
///
/// # Safety
/// `params` is null or the `params` pointer an RPC handler received, still valid.
pub(crate) unsafe fn params_to_value(params: *const ffi::spdk_json_val) -> Result<Value, String> {
    if params.is_null() {
        return Ok(Value::Null);
    }
    let mut buf: Vec<u8> = Vec::new();
    // SAFETY: the callback and its context outlive the writer, which is ended before `buf` is
    // read; `params` is valid per the caller's contract.
    let rc = unsafe {
        let w = ffi::spdk_json_write_begin(Some(collect), std::ptr::addr_of_mut!(buf).cast(), 0);
        if w.is_null() {
            return Err("out of memory while decoding parameters".into());
        }
        let rc = ffi::spdk_json_write_val(w, params);
        let end = ffi::spdk_json_write_end(w);
        if rc != 0 {
            rc
        } else {
            end
        }
    };
    if rc != 0 {
        return Err("malformed parameters".into());
    }
    serde_json::from_slice(&buf).map_err(|e| format!("malformed parameters: {e}"))
}

/// A borrowed SPDK JSON writer, valid for the callback that handed it to us.
pub(crate) struct Writer(*mut ffi::spdk_json_write_ctx);

impl Writer {
    /// # Safety
    /// `w` must be a live write context that stays valid while the `Writer` is used.
    pub(crate) unsafe fn new(w: *mut ffi::spdk_json_write_ctx) -> Self {
        Writer(w)
    }

    fn name(&self, name: &str) {
        // SAFETY: `self.0` is live (constructor contract); `name` is `len` valid bytes.
        unsafe { ffi::spdk_json_write_name_raw(self.0, name.as_ptr().cast(), name.len()) };
    }

    /// Write `value` (any JSON) at the current position.
    pub(crate) fn value(&self, value: &Value) {
        // SAFETY: for all calls below, `self.0` is a live writer; string pointers come with
        // their lengths and are only read during the call.
        unsafe {
            match value {
                Value::Null => ffi::spdk_json_write_null(self.0),
                Value::Bool(b) => ffi::spdk_json_write_bool(self.0, *b),
                Value::Number(n) => {
                    if let Some(u) = n.as_u64() {
                        ffi::spdk_json_write_uint64(self.0, u)
                    } else if let Some(i) = n.as_i64() {
                        ffi::spdk_json_write_int64(self.0, i)
                    } else {
                        ffi::spdk_json_write_double(self.0, n.as_f64().unwrap_or(0.0))
                    }
                }
                Value::String(s) => {
                    ffi::spdk_json_write_string_raw(self.0, s.as_ptr().cast(), s.len())
                }
                Value::Array(items) => {
                    ffi::spdk_json_write_array_begin(self.0);
                    for item in items {
                        self.value(item);
                    }
                    ffi::spdk_json_write_array_end(self.0)
                }
                Value::Object(map) => {
                    ffi::spdk_json_write_object_begin(self.0);
                    for (k, v) in map {
                        self.name(k);
                        self.value(v);
                    }
                    ffi::spdk_json_write_object_end(self.0)
                }
            };
        }
    }

    /// Write `"name": value` inside an open object.
    pub(crate) fn named(&self, name: &str, value: &Value) {
        self.name(name);
        self.value(value);
    }
}
