//! Logging through SPDK's logger (`spdk_log`), so messages interleave with SPDK's own.
//! `SPDK_ERRLOG` and friends are C macros; these are their Rust counterparts.

use std::ffi::CString;

use super::ffi;

pub(crate) use ffi::spdk_log_level::{
    SPDK_LOG_ERROR as ERROR, SPDK_LOG_NOTICE as NOTICE, SPDK_LOG_WARN as WARN,
};

/// Log `msg` at `level`. Never panics (interior NULs are dropped).
pub(crate) fn log(
    level: ffi::spdk_log_level::Type,
    file: &'static std::ffi::CStr,
    line: u32,
    msg: &str,
) {
    let text = CString::new(msg.replace('\0', "")).unwrap_or_default();
    // SAFETY: every pointer is a valid NUL-terminated string for the duration of the call and
    // the format consumes exactly one `char *` argument.
    unsafe {
        ffi::spdk_log(
            level,
            file.as_ptr(),
            line as i32,
            c"pcache".as_ptr(),
            c"%s\n".as_ptr(),
            text.as_ptr(),
        );
    }
}

/// `spdk_log!(ERROR, "fmt", args..)`.
macro_rules! spdk_log {
    ($level:ident, $($arg:tt)*) => {
        $crate::spdk::log::log(
            $crate::spdk::log::$level,
            match ::std::ffi::CStr::from_bytes_with_nul(concat!(file!(), "\0").as_bytes()) {
                Ok(s) => s,
                Err(_) => c"?",
            },
            line!(),
            &format!($($arg)*),
        )
    };
}
pub(crate) use spdk_log;

/// Run the body of an `extern "C"` callback: a panic (a bug) is caught, logged and replaced
/// by `default` instead of unwinding into SPDK's C frames. Free on the non-panicking path.
#[inline(always)]
pub(crate) fn no_unwind<R>(what: &str, default: R, f: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            log(
                ERROR,
                c"(callback)",
                0,
                &format!("BUG: panic in {what}; continuing without it"),
            );
            default
        }
    }
}
