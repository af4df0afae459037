//! Does the backing bdev honour FLUSH? pcache's writeback is ordered by flushes of the
//! backing device (epoch E must be durable there before E+1 is written, and the dirty tail
//! only moves past data a flush made durable), so a backing device with a volatile write
//! cache that acknowledges FLUSH without flushing it breaks that order across a power loss.
//!
//! The case that matters: SPDK's NVMe bdev (module `nvme`) completes FLUSH at once, without
//! sending it, when `bdev_nvme_set_options` `enable_flush` is false (v26.05's default), even
//! when the namespace has a volatile write cache (its `write_cache` is set). Every NVMe-oF
//! namespace advertises one (SPDK's target always sets VWC present). Nothing in the generic
//! bdev API tells this apart from an honoured FLUSH (`io_type_supported(FLUSH)` is true
//! either way), so the shell reads the option itself when the module is `nvme`.

use serde_json::{json, Value};

/// What the shell found out about the backing bdev (app thread, at create).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackingFacts {
    /// `spdk_bdev_has_write_cache`: completed writes may sit in a volatile cache.
    pub write_cache: bool,
    /// `spdk_bdev_io_type_supported(FLUSH)`.
    pub flush_supported: bool,
    /// The bdev belongs to SPDK's NVMe module: `Some(enable_flush)` as read from
    /// `spdk_bdev_nvme_get_opts`, `Some(None)` when the option could not be read; `None`
    /// for any other module.
    pub nvme_enable_flush: Option<Option<bool>>,
}

/// Whether FLUSH of the backing bdev makes completed writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFlush {
    /// No volatile write cache: a completed write is durable, FLUSH is not needed.
    NoWriteCache,
    /// Volatile write cache, and FLUSH reaches it.
    Honoured,
    /// Volatile write cache, and the bdev does not support FLUSH at all.
    Unsupported,
    /// NVMe bdev with a volatile write cache and `enable_flush` false: FLUSH completes
    /// without being sent to the device.
    NvmeFlushDisabled,
    /// NVMe bdev with a volatile write cache whose `enable_flush` could not be read.
    NvmeUnknown,
}

impl BackingFlush {
    pub fn classify(f: BackingFacts) -> Self {
        if !f.write_cache {
            return BackingFlush::NoWriteCache;
        }
        if !f.flush_supported {
            return BackingFlush::Unsupported;
        }
        match f.nvme_enable_flush {
            None | Some(Some(true)) => BackingFlush::Honoured,
            Some(Some(false)) => BackingFlush::NvmeFlushDisabled,
            Some(None) => BackingFlush::NvmeUnknown,
        }
    }

    /// Is ordered writeback durable across a power loss of the backing device?
    pub fn is_honoured(self) -> bool {
        matches!(self, BackingFlush::NoWriteCache | BackingFlush::Honoured)
    }

    /// Short state for the JSON (`backing_flush`).
    pub fn label(self) -> &'static str {
        match self {
            BackingFlush::NoWriteCache => "not needed (no volatile write cache)",
            BackingFlush::Honoured => "honoured",
            BackingFlush::Unsupported => "not supported",
            BackingFlush::NvmeFlushDisabled => "ignored (bdev_nvme enable_flush is false)",
            BackingFlush::NvmeUnknown => "unknown (bdev_nvme enable_flush not readable)",
        }
    }

    /// The warning logged at create (and shown in the JSON), naming the fix; None when
    /// FLUSH is honoured.
    pub fn warning(self, backing: &str) -> Option<String> {
        let risk = "writeback is ordered by backing-device flushes, so after a power loss \
                    of the backing device it may hold a later epoch's writes without an \
                    earlier one's";
        match self {
            BackingFlush::NoWriteCache | BackingFlush::Honoured => None,
            BackingFlush::Unsupported => Some(format!(
                "backing bdev '{backing}' has a volatile write cache but does not support \
                 FLUSH: {risk}; disable its write cache or use a backing bdev that supports FLUSH"
            )),
            BackingFlush::NvmeFlushDisabled => Some(format!(
                "backing bdev '{backing}' is an NVMe namespace with a volatile write cache, \
                 and SPDK's NVMe bdev completes FLUSH without sending it because \
                 bdev_nvme_set_options enable_flush is false (its default): {risk}; fix: \
                 `bdev_nvme_set_options --enable-flush` (JSON-RPC \"enable_flush\": true) \
                 before the first bdev_nvme_attach_controller, i.e. first in the config"
            )),
            BackingFlush::NvmeUnknown => Some(format!(
                "backing bdev '{backing}' is an NVMe namespace with a volatile write cache \
                 and bdev_nvme's enable_flush option could not be read: unless \
                 `bdev_nvme_set_options --enable-flush` was set, FLUSH is not sent and {risk}"
            )),
        }
    }

    /// `{"backing_write_cache", "backing_flush", "backing_flush_honoured"
    /// [, "backing_flush_warning"]}`, merged into `bdev_get_bdevs` and
    /// `bdev_pcache_get_stats`.
    pub fn to_json(self, facts: BackingFacts, backing: &str) -> Value {
        let mut v = json!({
            "backing_write_cache": facts.write_cache,
            "backing_flush": self.label(),
            "backing_flush_honoured": self.is_honoured(),
        });
        if let Some(w) = self.warning(backing) {
            v["backing_flush_warning"] = json!(w);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(write_cache: bool, flush: bool, nvme: Option<Option<bool>>) -> BackingFacts {
        BackingFacts {
            write_cache,
            flush_supported: flush,
            nvme_enable_flush: nvme,
        }
    }

    #[test]
    fn no_write_cache_needs_no_flush_whatever_the_module() {
        for nvme in [None, Some(None), Some(Some(false)), Some(Some(true))] {
            let b = BackingFlush::classify(facts(false, true, nvme));
            assert_eq!(b, BackingFlush::NoWriteCache);
            assert!(b.is_honoured());
            assert_eq!(b.warning("N"), None);
        }
    }

    #[test]
    fn nvme_with_write_cache_depends_on_enable_flush() {
        let off = BackingFlush::classify(facts(true, true, Some(Some(false))));
        assert_eq!(off, BackingFlush::NvmeFlushDisabled);
        assert!(!off.is_honoured());
        let w = off.warning("Nvme0n1").unwrap_or_default();
        assert!(w.contains("Nvme0n1") && w.contains("bdev_nvme_set_options --enable-flush"));

        let on = BackingFlush::classify(facts(true, true, Some(Some(true))));
        assert_eq!(on, BackingFlush::Honoured);
        assert_eq!(on.warning("Nvme0n1"), None);

        let unknown = BackingFlush::classify(facts(true, true, Some(None)));
        assert_eq!(unknown, BackingFlush::NvmeUnknown);
        assert!(!unknown.is_honoured());
        assert!(unknown.warning("x").is_some());
    }

    #[test]
    fn other_modules_with_write_cache_are_trusted_unless_flush_is_unsupported() {
        assert_eq!(
            BackingFlush::classify(facts(true, true, None)),
            BackingFlush::Honoured
        );
        let u = BackingFlush::classify(facts(true, false, None));
        assert_eq!(u, BackingFlush::Unsupported);
        assert!(u
            .warning("A")
            .is_some_and(|w| w.contains("does not support FLUSH")));
    }

    #[test]
    fn json_carries_state_and_warning() {
        let f = facts(true, true, Some(Some(false)));
        let v = BackingFlush::classify(f).to_json(f, "Nvme0n1");
        assert_eq!(v["backing_write_cache"], json!(true));
        assert_eq!(v["backing_flush_honoured"], json!(false));
        assert_eq!(
            v["backing_flush"],
            json!("ignored (bdev_nvme enable_flush is false)")
        );
        assert!(v["backing_flush_warning"]
            .as_str()
            .is_some_and(|w| w.contains("--enable-flush")));
        let f = facts(true, true, None);
        let v = BackingFlush::classify(f).to_json(f, "Back0");
        assert_eq!(v["backing_flush"], json!("honoured"));
        assert_eq!(v["backing_flush_honoured"], json!(true));
        assert!(v.get("backing_flush_warning").is_none());
    }
}
