//! RPC parameters and the validated options of a pcache bdev. Pure Rust: no SPDK calls.
//!
//! The option ranges mirror the engine's layout rules (`engine::geometry`): segment size
//! 1 MiB..1 GiB, stripe a multiple of 4 KiB and at most a quarter of a segment, 1..=256
//! shards, gc_percent 1..=90. The engine validates again when it formats. Defaults are the
//! engine's (`FormatOptions::default()`, `LayoutOptions::default()`).

use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::engine::shard::WritebackOptions;
use crate::engine::{CacheMode, SeqCutoff, SeqPolicy, UuidMismatch, WriteAdmission};

/// Maximum shard count (same as the engine's `MAX_SHARDS`).
pub(crate) const MAX_SHARDS: u32 = 256;

/// Longest bdev name we accept (SPDK has no fixed limit; this keeps messages and config sane).
const MAX_NAME: usize = 255;

/// `bdev_pcache_create` parameters as they arrive. Unknown fields are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    cache_bdev: Option<String>,
    cache_path: Option<String>,
    cache_size_mib: Option<u64>,
    backing_bdev: String,
    data_crc: Option<bool>,
    gc_percent: Option<u32>,
    stripe_size_kib: Option<u32>,
    segment_size_mib: Option<u32>,
    shards: Option<u32>,
    wb_max_inflight: Option<u32>,
    wb_group_ksets: Option<u32>,
    wb_high_pct: Option<u32>,
    wb_low_pct: Option<u32>,
    io_timeout_ms: Option<u64>,
    core: Option<u32>,
    defer: Option<bool>,
    backing_uuid_mismatch: Option<String>,
    mode: Option<String>,
    seq_cutoff_bytes: Option<u64>,
    seq_cutoff_policy: Option<String>,
    write_admission: Option<String>,
    zero_copy: Option<bool>,
}

/// The options a running cache changes live (`bdev_pcache_set_options`): writeback
/// pacing, gc_percent, the mode, the sequential cut-off and write admission. gc_percent,
/// the mode and the cut-off are persisted in the cache's control slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Live {
    pub wb: WritebackOptions,
    pub mode: CacheMode,
    pub seq_cutoff: SeqCutoff,
    pub write_admission: WriteAdmission,
}

impl Live {
    /// The options as `bdev_pcache_set_options` answers them and `save_config` echoes them.
    pub(crate) fn to_json(self) -> Value {
        let o = &self.wb;
        json!({
            "gc_percent": o.gc_percent,
            "wb_max_inflight": o.max_inflight,
            "wb_group_ksets": o.group_ksets,
            "wb_high_pct": o.high_pct,
            "wb_low_pct": o.low_pct,
            "io_timeout_ms": o.io_timeout_ms,
            "mode": self.mode.as_str(),
            "seq_cutoff_bytes": self.seq_cutoff.bytes,
            "seq_cutoff_policy": self.seq_cutoff.policy.as_str(),
            "write_admission": self.write_admission.as_str(),
        })
    }
}

/// A named setting (mode, cut-off policy, write admission), if given.
fn parse_named<T: std::str::FromStr<Err = crate::engine::mode::UnknownName>>(
    v: Option<&str>,
) -> Result<Option<T>, String> {
    v.map(|m| m.parse::<T>().map_err(|e| e.to_string()))
        .transpose()
}

fn check_seq_bytes(v: Option<u64>) -> Result<(), String> {
    match v {
        Some(bytes) => SeqCutoff {
            bytes,
            ..SeqCutoff::default()
        }
        .check()
        .map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Writeback pacing: given at create, changed at run time with `bdev_pcache_set_options`,
/// echoed by `save_config` (not stored on the cache bdev).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Writeback {
    /// Backing writes in flight per shard.
    pub max_inflight: u32,
    /// Ksets per writeback group (one backing flush and control write per group).
    pub group_ksets: u32,
    /// Writeback starts when dirty data passes this percentage of the cache...
    pub high_pct: u32,
    /// ...and stops below this one (unless space is short, the cache is idle or draining).
    pub low_pct: u32,
    /// A request that cannot make progress fails after waiting this long (ms).
    pub io_timeout_ms: u64,
}

/// Bounds of `io_timeout_ms`: 100 ms .. 1 hour.
const IO_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

impl Default for Writeback {
    fn default() -> Self {
        let w = WritebackOptions::default();
        Writeback {
            max_inflight: w.max_inflight,
            group_ksets: w.group_ksets as u32,
            high_pct: w.high_pct,
            low_pct: w.low_pct,
            io_timeout_ms: w.io_timeout_ms,
        }
    }
}

impl Writeback {
    fn check(&self) -> Result<(), String> {
        if !(1..=1024).contains(&self.max_inflight) {
            return Err(format!(
                "wb_max_inflight must be between 1 and 1024 (got {})",
                self.max_inflight
            ));
        }
        if !(1..=4096).contains(&self.group_ksets) {
            return Err(format!(
                "wb_group_ksets must be between 1 and 4096 (got {})",
                self.group_ksets
            ));
        }
        if !(1..=100).contains(&self.high_pct) || self.low_pct > self.high_pct {
            return Err(format!(
                "wb_high_pct must be between 1 and 100 and wb_low_pct at most wb_high_pct (got {} and {})",
                self.high_pct, self.low_pct
            ));
        }
        if !IO_TIMEOUT_MS.contains(&self.io_timeout_ms) {
            return Err(format!(
                "io_timeout_ms must be between {} and {} (got {})",
                IO_TIMEOUT_MS.start(),
                IO_TIMEOUT_MS.end(),
                self.io_timeout_ms
            ));
        }
        Ok(())
    }

    /// The engine's options with these limits and `gc_percent`.
    pub(crate) fn engine(&self, gc_percent: u32) -> WritebackOptions {
        WritebackOptions {
            max_inflight: self.max_inflight,
            group_ksets: self.group_ksets as usize,
            high_pct: self.high_pct,
            low_pct: self.low_pct,
            gc_percent,
            io_timeout_ms: self.io_timeout_ms,
        }
    }
}

/// Tunables stored with each pcache bdev, echoed in `save_config` and `bdev_get_bdevs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Options {
    /// Keep a CRC32C of every cached block and verify it on read.
    pub data_crc: bool,
    /// GC reclaims written-back segments while the log uses more than this share of the cache.
    pub gc_percent: u32,
    /// Stripe size: requests are split at stripe edges, stripes map to shards.
    pub stripe_size_kib: u32,
    /// Cache log segment size.
    pub segment_size_mib: u32,
    /// The request named no segment size / stripe: they are sized to the cache when it is
    /// formatted ([`Options::fit_to_cache`]), and `to_params` leaves them out until then.
    pub auto_segment: bool,
    pub auto_stripe: bool,
    /// Number of shards (engine threads' units of work; default one per app core).
    pub shards: u32,
    pub wb: Writeback,
    /// Runs a single engine thread, on this core (default: one engine thread per core of
    /// the app, at most one per shard).
    pub core: Option<u32>,
    /// The cache mode; None keeps the cache's (persisted; write-back for a new cache).
    pub mode: Option<CacheMode>,
    /// The sequential cut-off's threshold and policy; None keeps the cache's (persisted;
    /// 1 MiB and "full" for a new cache).
    pub seq_cutoff_bytes: Option<u64>,
    pub seq_cutoff_policy: Option<SeqPolicy>,
    /// Which writes a full cache takes in; None keeps the cache's (persisted; `always`
    /// for a new cache).
    pub write_admission: Option<WriteAdmission>,
    /// Writeback borrows a malloc cache bdev's memory (`spdk_bdev_zcopy_start`) rather than
    /// copying it into a buffer; false: always into a buffer.
    pub zero_copy: bool,
}

/// The stripe of a request that names none, with segments of `segment_size_mib`: the
/// default, or a quarter of a segment if that is less (a stripe is at most that), so a
/// segment size alone never fails on a stripe nobody set. Saturating: the segment size is
/// checked after this.
fn default_stripe_kib(segment_size_mib: u32) -> u32 {
    let default = (crate::engine::FormatOptions::default().layout.stripe_bytes / 1024) as u32;
    default.min(segment_size_mib.saturating_mul(256).max(4))
}

/// Shards of a new cache when the create names none: one per core of the app (set when
/// the module starts), so each core gets an engine thread.
pub(crate) static DEFAULT_SHARDS: AtomicU32 = AtomicU32::new(1);

impl Default for Options {
    fn default() -> Self {
        let f = crate::engine::FormatOptions::default();
        Options {
            data_crc: f.data_crc,
            gc_percent: f.gc_percent,
            stripe_size_kib: (f.layout.stripe_bytes / 1024) as u32,
            segment_size_mib: (f.layout.segment_bytes >> 20) as u32,
            auto_segment: true,
            auto_stripe: true,
            shards: DEFAULT_SHARDS
                .load(Ordering::Relaxed)
                .clamp(f.layout.shards, MAX_SHARDS),
            wb: Writeback::default(),
            core: None,
            mode: None,
            seq_cutoff_bytes: None,
            seq_cutoff_policy: None,
            write_admission: None,
            zero_copy: true,
        }
    }
}

impl Options {
    /// Sizes what the request left open to a cache of `cache_bytes`: segments of a
    /// 128th of each shard's part (a power of two from 1 to 16 MiB, and at least four
    /// stripes), so GC's reserve of two segments per shard stays small on a small cache
    /// (with 16 MiB segments, a quarter of a 128 MiB cache); the stripe at most a quarter
    /// of a segment.
    pub(crate) fn fit_to_cache(&mut self, cache_bytes: u64) {
        let default = Options::default();
        if self.auto_segment {
            let part_mib = (cache_bytes / u64::from(self.shards.max(1))) >> 20;
            let fit = (part_mib / 128).clamp(1, u64::from(default.segment_size_mib));
            let mut mib = 1u64 << fit.ilog2();
            if !self.auto_stripe {
                mib = mib.max(
                    u64::from(self.stripe_size_kib)
                        .div_ceil(256)
                        .next_power_of_two(),
                );
            }
            self.segment_size_mib = u32::try_from(mib).unwrap_or(default.segment_size_mib);
            self.auto_segment = false;
        }
        if self.auto_stripe {
            self.stripe_size_kib = default_stripe_kib(self.segment_size_mib);
            self.auto_stripe = false;
        }
    }

    pub(crate) fn stripe_bytes(&self) -> u64 {
        u64::from(self.stripe_size_kib) * 1024
    }

    /// The sequential cut-off the create asks for, from the cache's current one.
    pub(crate) fn seq_cutoff(&self, cur: SeqCutoff) -> SeqCutoff {
        SeqCutoff {
            policy: self.seq_cutoff_policy.unwrap_or(cur.policy),
            bytes: self.seq_cutoff_bytes.unwrap_or(cur.bytes),
        }
    }
}

/// Where the cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CacheMedia {
    /// A bdev, driven asynchronously like the backing bdev.
    Bdev(String),
    /// A DAX device or file mapped into the process (`media::dax::DaxDevice`); commands
    /// for it complete inline on the engine thread. `size_mib` creates / extends a regular
    /// file to that size.
    Path { path: String, size_mib: Option<u64> },
}

/// A validated `bdev_pcache_create` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreateConfig {
    pub name: String,
    pub cache: CacheMedia,
    pub backing_bdev: String,
    pub options: Options,
    /// A missing base bdev is not an error: the request waits for it (`defer`).
    pub defer: bool,
    /// A backing bdev of the recorded size but another UUID: refused (default), or
    /// accepted and its identity recorded in the cache. Never echoed by `save_config`: once
    /// recorded, a plain attach matches, and an echoed "accept" would accept any device of
    /// that size at every later start.
    pub backing_uuid_mismatch: UuidMismatch,
}

impl CreateConfig {
    /// The cache for messages: "cache bdev 'X'" or "cache path 'P'".
    pub(crate) fn cache_label(&self) -> String {
        match &self.cache {
            CacheMedia::Bdev(b) => format!("cache bdev '{b}'"),
            CacheMedia::Path { path, .. } => format!("cache path '{path}'"),
        }
    }

    /// rpc.py arguments of the `bdev_pcache_create` that attaches this cache to this
    /// backing bdev (for messages): `-b NAME -c CACHE -d BACKING` or `-p PATH`.
    pub(crate) fn create_args(&self) -> String {
        let cache = match &self.cache {
            CacheMedia::Bdev(b) => format!("-c {b}"),
            CacheMedia::Path { path, .. } => format!("-p {path}"),
        };
        format!("-b {} {cache} -d {}", self.name, self.backing_bdev)
    }

    /// The cache bdev's name (None for a mapped path).
    pub(crate) fn cache_bdev(&self) -> Option<&str> {
        match &self.cache {
            CacheMedia::Bdev(b) => Some(b),
            CacheMedia::Path { .. } => None,
        }
    }
}

/// Largest `cache_size_mib` (16 TiB).
const MAX_CACHE_MIB: u64 = 16 << 20;

fn check_name(field: &str, v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if v.len() > MAX_NAME {
        return Err(format!("{field} is longer than {MAX_NAME} bytes"));
    }
    if v.contains('\0') {
        return Err(format!("{field} must not contain NUL characters"));
    }
    Ok(())
}

fn missing_params() -> String {
    "missing parameters object".to_string()
}

/// serde would also fill a struct from a JSON array (by position): require an object.
fn require_object(params: &Value) -> Result<(), String> {
    if params.is_object() {
        Ok(())
    } else {
        Err(format!("parameters must be a JSON object (got {params})"))
    }
}

/// Parse and validate `bdev_pcache_create` params.
pub(crate) fn parse_create(params: Value) -> Result<CreateConfig, String> {
    if params.is_null() {
        return Err(missing_params());
    }
    require_object(&params)?;
    let p: CreateParams =
        serde_json::from_value(params).map_err(|e| format!("invalid parameters: {e}"))?;
    check_name("name", &p.name)?;
    check_name("backing_bdev", &p.backing_bdev)?;
    let cache = match (p.cache_bdev, p.cache_path) {
        (Some(_), Some(_)) => {
            return Err("give exactly one of cache_bdev or cache_path, not both".into())
        }
        (None, None) => {
            return Err("give exactly one of cache_bdev or cache_path (got neither)".into())
        }
        (Some(b), None) => {
            check_name("cache_bdev", &b)?;
            if p.cache_size_mib.is_some() {
                return Err("cache_size_mib goes with cache_path, not cache_bdev".into());
            }
            if b == p.backing_bdev {
                return Err(format!(
                    "cache_bdev and backing_bdev are the same bdev '{b}'"
                ));
            }
            if p.name == b {
                return Err(format!("name '{}' is the name of a base bdev", p.name));
            }
            CacheMedia::Bdev(b)
        }
        (None, Some(path)) => {
            if path.is_empty() || path.contains('\0') {
                return Err("cache_path must be a non-empty path without NUL characters".into());
            }
            if let Some(m) = p.cache_size_mib {
                if !(1..=MAX_CACHE_MIB).contains(&m) {
                    return Err(format!(
                        "cache_size_mib must be between 1 and {MAX_CACHE_MIB} (got {m})"
                    ));
                }
            }
            CacheMedia::Path {
                path,
                size_mib: p.cache_size_mib,
            }
        }
    };
    if p.name == p.backing_bdev {
        return Err(format!("name '{}' is the name of a base bdev", p.name));
    }
    let backing_uuid_mismatch = match p.backing_uuid_mismatch.as_deref() {
        None | Some("refuse") => UuidMismatch::Refuse,
        Some("accept") => UuidMismatch::Accept,
        Some(v) => {
            return Err(format!(
                "backing_uuid_mismatch must be \"refuse\" (the default) or \"accept\" (got \"{v}\")"
            ))
        }
    };
    let d = Options::default();
    let segment_size_mib = p.segment_size_mib.unwrap_or(d.segment_size_mib);
    let o = Options {
        data_crc: p.data_crc.unwrap_or(d.data_crc),
        gc_percent: p.gc_percent.unwrap_or(d.gc_percent),
        stripe_size_kib: p
            .stripe_size_kib
            .unwrap_or_else(|| default_stripe_kib(segment_size_mib)),
        segment_size_mib,
        auto_segment: p.segment_size_mib.is_none(),
        auto_stripe: p.stripe_size_kib.is_none(),
        shards: p.shards.unwrap_or(d.shards),
        wb: Writeback {
            max_inflight: p.wb_max_inflight.unwrap_or(d.wb.max_inflight),
            group_ksets: p.wb_group_ksets.unwrap_or(d.wb.group_ksets),
            high_pct: p.wb_high_pct.unwrap_or(d.wb.high_pct),
            low_pct: p.wb_low_pct.unwrap_or(d.wb.low_pct),
            io_timeout_ms: p.io_timeout_ms.unwrap_or(d.wb.io_timeout_ms),
        },
        core: p.core,
        mode: parse_named(p.mode.as_deref())?,
        seq_cutoff_bytes: p.seq_cutoff_bytes,
        seq_cutoff_policy: parse_named(p.seq_cutoff_policy.as_deref())?,
        write_admission: parse_named(p.write_admission.as_deref())?,
        zero_copy: p.zero_copy.unwrap_or(d.zero_copy),
    };
    check_seq_bytes(o.seq_cutoff_bytes)?;
    o.wb.check()?;
    if !(1..=90).contains(&o.gc_percent) {
        return Err(format!(
            "gc_percent must be between 1 and 90 (got {})",
            o.gc_percent
        ));
    }
    if !(1..=1024).contains(&o.segment_size_mib) {
        return Err(format!(
            "segment_size_mib must be between 1 and 1024 (got {})",
            o.segment_size_mib
        ));
    }
    let max_stripe_kib = o.segment_size_mib * 1024 / 4;
    if o.stripe_size_kib == 0 || o.stripe_size_kib % 4 != 0 || o.stripe_size_kib > max_stripe_kib {
        return Err(format!(
            "stripe_size_kib must be a multiple of 4 between 4 and {max_stripe_kib} (a quarter of segment_size_mib) (got {})",
            o.stripe_size_kib
        ));
    }
    if !(1..=MAX_SHARDS).contains(&o.shards) {
        return Err(format!(
            "shards must be between 1 and {MAX_SHARDS} (got {})",
            o.shards
        ));
    }
    Ok(CreateConfig {
        name: p.name,
        cache,
        backing_bdev: p.backing_bdev,
        options: o,
        defer: p.defer.unwrap_or(false),
        backing_uuid_mismatch,
    })
}

impl CreateConfig {
    /// The request that reattaches a cache found by examine: named and laid out as its
    /// superblock says (`data_crc`, stripe, segment size, shards); writeback limits and the
    /// engine core take their defaults (they are not stored on the cache).
    pub(crate) fn from_superblock(
        name: String,
        cache_bdev: String,
        backing_bdev: String,
        sb: &crate::engine::Superblock,
    ) -> Self {
        let g = &sb.geometry;
        CreateConfig {
            name,
            cache: CacheMedia::Bdev(cache_bdev),
            backing_bdev,
            options: Options {
                data_crc: sb.data_crc,
                stripe_size_kib: g.stripe_sectors / 2,
                segment_size_mib: g.segment_sectors / 2048,
                auto_segment: false,
                auto_stripe: false,
                shards: g.shard_count,
                ..Options::default()
            },
            defer: false,
            backing_uuid_mismatch: UuidMismatch::Refuse,
        }
    }

    /// The `params` of the `bdev_pcache_create` call that recreates this bdev: every option
    /// spelled out, so a saved config does not depend on today's defaults.
    pub(crate) fn to_params(&self) -> Value {
        let o = &self.options;
        let mut v = json!({
            "name": self.name,
            "backing_bdev": self.backing_bdev,
            "data_crc": o.data_crc,
            "gc_percent": o.gc_percent,
            "shards": o.shards,
            "wb_max_inflight": o.wb.max_inflight,
            "wb_group_ksets": o.wb.group_ksets,
            "wb_high_pct": o.wb.high_pct,
            "wb_low_pct": o.wb.low_pct,
            "io_timeout_ms": o.wb.io_timeout_ms,
            "zero_copy": o.zero_copy,
        });
        match &self.cache {
            CacheMedia::Bdev(b) => v["cache_bdev"] = json!(b),
            CacheMedia::Path { path, size_mib } => {
                v["cache_path"] = json!(path);
                if let Some(m) = size_mib {
                    v["cache_size_mib"] = json!(m);
                }
            }
        }
        if !o.auto_stripe {
            v["stripe_size_kib"] = json!(o.stripe_size_kib);
        }
        if !o.auto_segment {
            v["segment_size_mib"] = json!(o.segment_size_mib);
        }
        if let Some(c) = o.core {
            v["core"] = json!(c);
        }
        if let Some(m) = o.mode {
            v["mode"] = json!(m.as_str());
        }
        if let Some(b) = o.seq_cutoff_bytes {
            v["seq_cutoff_bytes"] = json!(b);
        }
        if let Some(p) = o.seq_cutoff_policy {
            v["seq_cutoff_policy"] = json!(p.as_str());
        }
        if let Some(a) = o.write_admission {
            v["write_admission"] = json!(a.as_str());
        }
        v
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOptionsParams {
    name: String,
    gc_percent: Option<u32>,
    wb_max_inflight: Option<u32>,
    wb_group_ksets: Option<u32>,
    wb_high_pct: Option<u32>,
    wb_low_pct: Option<u32>,
    io_timeout_ms: Option<u64>,
    mode: Option<String>,
    seq_cutoff_bytes: Option<u64>,
    seq_cutoff_policy: Option<String>,
    write_admission: Option<String>,
}

/// `bdev_pcache_set_options`: the options to change (the others keep their values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetOptions {
    pub name: String,
    pub gc_percent: Option<u32>,
    pub max_inflight: Option<u32>,
    pub group_ksets: Option<u32>,
    pub high_pct: Option<u32>,
    pub low_pct: Option<u32>,
    pub io_timeout_ms: Option<u64>,
    pub mode: Option<CacheMode>,
    pub seq_cutoff_bytes: Option<u64>,
    pub seq_cutoff_policy: Option<SeqPolicy>,
    pub write_admission: Option<WriteAdmission>,
}

impl SetOptions {
    /// `cur` with the requested changes, validated.
    pub(crate) fn apply_live(&self, cur: Live) -> Result<Live, String> {
        let wb = self.apply(cur.wb)?;
        let seq_cutoff = SeqCutoff {
            policy: self.seq_cutoff_policy.unwrap_or(cur.seq_cutoff.policy),
            bytes: self.seq_cutoff_bytes.unwrap_or(cur.seq_cutoff.bytes),
        };
        seq_cutoff.check().map_err(|e| e.to_string())?;
        Ok(Live {
            wb,
            mode: self.mode.unwrap_or(cur.mode),
            seq_cutoff,
            write_admission: self.write_admission.unwrap_or(cur.write_admission),
        })
    }

    /// `cur` with the requested writeback changes, validated.
    pub(crate) fn apply(&self, cur: WritebackOptions) -> Result<WritebackOptions, String> {
        let wb = Writeback {
            max_inflight: self.max_inflight.unwrap_or(cur.max_inflight),
            group_ksets: self.group_ksets.unwrap_or(cur.group_ksets as u32),
            high_pct: self.high_pct.unwrap_or(cur.high_pct),
            low_pct: self.low_pct.unwrap_or(cur.low_pct),
            io_timeout_ms: self.io_timeout_ms.unwrap_or(cur.io_timeout_ms),
        };
        wb.check()?;
        let gc = self.gc_percent.unwrap_or(cur.gc_percent);
        if !(1..=90).contains(&gc) {
            return Err(format!("gc_percent must be between 1 and 90 (got {gc})"));
        }
        Ok(wb.engine(gc))
    }
}

/// Parse `bdev_pcache_set_options` params: `{name, gc_percent?, wb_*?}`, at least one option.
pub(crate) fn parse_set_options(params: Value) -> Result<SetOptions, String> {
    if params.is_null() {
        return Err(missing_params());
    }
    require_object(&params)?;
    let p: SetOptionsParams =
        serde_json::from_value(params).map_err(|e| format!("invalid parameters: {e}"))?;
    check_name("name", &p.name)?;
    let o = SetOptions {
        name: p.name,
        gc_percent: p.gc_percent,
        max_inflight: p.wb_max_inflight,
        group_ksets: p.wb_group_ksets,
        high_pct: p.wb_high_pct,
        low_pct: p.wb_low_pct,
        io_timeout_ms: p.io_timeout_ms,
        mode: parse_named(p.mode.as_deref())?,
        seq_cutoff_bytes: p.seq_cutoff_bytes,
        seq_cutoff_policy: parse_named(p.seq_cutoff_policy.as_deref())?,
        write_admission: parse_named(p.write_admission.as_deref())?,
    };
    if o.gc_percent.is_none()
        && o.max_inflight.is_none()
        && o.group_ksets.is_none()
        && o.high_pct.is_none()
        && o.low_pct.is_none()
        && o.io_timeout_ms.is_none()
        && o.mode.is_none()
        && o.seq_cutoff_bytes.is_none()
        && o.seq_cutoff_policy.is_none()
        && o.write_admission.is_none()
    {
        return Err("no option to set (gc_percent, wb_max_inflight, wb_group_ksets, wb_high_pct, wb_low_pct, io_timeout_ms, mode, seq_cutoff_bytes, seq_cutoff_policy, write_admission)".into());
    }
    check_seq_bytes(o.seq_cutoff_bytes)?;
    // Range checks that do not depend on the current values.
    o.apply(WritebackOptions {
        max_inflight: o.max_inflight.unwrap_or(1),
        group_ksets: o.group_ksets.unwrap_or(1) as usize,
        high_pct: o.high_pct.unwrap_or(100),
        low_pct: o.low_pct.unwrap_or(0),
        gc_percent: o.gc_percent.unwrap_or(1),
        io_timeout_ms: o.io_timeout_ms.unwrap_or(*IO_TIMEOUT_MS.start()),
    })?;
    Ok(o)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    name: String,
    no_drain: Option<bool>,
}

/// `bdev_pcache_delete` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delete {
    pub name: String,
    /// Skip writing back dirty data: it stays on the cache bdev (reattach to get it).
    pub no_drain: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptNameParams {
    name: Option<String>,
}

/// Parse `bdev_pcache_delete` params: `{name, no_drain?}`.
pub(crate) fn parse_delete(params: Value) -> Result<Delete, String> {
    if params.is_null() {
        return Err(missing_params());
    }
    require_object(&params)?;
    let p: DeleteParams =
        serde_json::from_value(params).map_err(|e| format!("invalid parameters: {e}"))?;
    check_name("name", &p.name)?;
    Ok(Delete {
        name: p.name,
        no_drain: p.no_drain.unwrap_or(false),
    })
}

/// Parse params of the form `{name}` (`bdev_pcache_flush_start`, `_flush_status`).
pub(crate) fn parse_name(params: Value) -> Result<String, String> {
    if params.is_null() {
        return Err(missing_params());
    }
    require_object(&params)?;
    let p: NameParams =
        serde_json::from_value(params).map_err(|e| format!("invalid parameters: {e}"))?;
    check_name("name", &p.name)?;
    Ok(p.name)
}

/// Parse `bdev_pcache_get_stats` params: none, or `{name?}`.
pub(crate) fn parse_stats(params: Value) -> Result<Option<String>, String> {
    if params.is_null() {
        return Ok(None);
    }
    require_object(&params)?;
    let p: OptNameParams =
        serde_json::from_value(params).map_err(|e| format!("invalid parameters: {e}"))?;
    if let Some(n) = &p.name {
        check_name("name", n)?;
    }
    Ok(p.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1"})
    }

    #[test]
    fn defaults_and_echo() {
        let c = parse_create(base()).unwrap();
        assert_eq!(c.options, Options::default());
        let again = parse_create(c.to_params()).unwrap();
        assert_eq!(again, c);
        let p = json!({"name": "PC0", "cache_path": "/dev/shm/pc", "cache_size_mib": 64, "backing_bdev": "M1"});
        let c = parse_create(p).unwrap();
        assert_eq!(
            c.cache,
            CacheMedia::Path {
                path: "/dev/shm/pc".into(),
                size_mib: Some(64)
            }
        );
        assert_eq!(c.to_params()["cache_path"], "/dev/shm/pc");
        assert_eq!(parse_create(c.to_params()).unwrap(), c);
    }

    #[test]
    fn an_unnamed_layout_is_sized_to_the_cache() {
        let fit = |p: Value, cache_mib: u64| {
            let mut c = parse_create(p).unwrap();
            c.options.fit_to_cache(cache_mib << 20);
            assert!(!c.options.auto_segment && !c.options.auto_stripe);
            let echoed = c.to_params();
            assert_eq!(echoed["segment_size_mib"], c.options.segment_size_mib);
            assert_eq!(parse_create(echoed).unwrap(), c, "echoed as resolved");
            (c.options.segment_size_mib, c.options.stripe_size_kib)
        };
        let mut one = base();
        one["shards"] = json!(1);
        assert_eq!(fit(one.clone(), 128), (1, 256));
        assert_eq!(fit(one.clone(), 64), (1, 256), "never under 1 MiB");
        assert_eq!(fit(one.clone(), 1000), (4, 1024));
        assert_eq!(fit(one.clone(), 2048), (16, 1024));
        assert_eq!(
            fit(one.clone(), 1 << 20),
            (16, 1024),
            "never over the default"
        );
        let mut four = base();
        four["shards"] = json!(4);
        assert_eq!(fit(four, 2048), (4, 1024), "a 128th of each shard's part");
        // A stripe named: segments hold four of them.
        let mut striped = one.clone();
        striped["stripe_size_kib"] = json!(1024);
        assert_eq!(fit(striped, 128), (4, 1024));
        // A segment size named: kept, and the stripe fits it.
        let mut named = one;
        named["segment_size_mib"] = json!(2);
        assert_eq!(fit(named, 1 << 20), (2, 512));
        // Not yet sized: no layout echoed.
        let c = parse_create(base()).unwrap();
        assert!(c.to_params().get("segment_size_mib").is_none());
    }

    #[test]
    fn small_segments_take_a_stripe_that_fits_unless_one_is_given() {
        let mut p = base();
        p["segment_size_mib"] = json!(1);
        let c = parse_create(p.clone()).unwrap();
        assert_eq!(c.options.stripe_size_kib, 256);
        assert_eq!(parse_create(c.to_params()).unwrap(), c);
        p["stripe_size_kib"] = json!(1024);
        assert!(parse_create(p).unwrap_err().contains("stripe_size_kib"));
        // A segment size far out of range is refused for what it is.
        let mut p = base();
        p["segment_size_mib"] = json!(u32::MAX);
        assert!(parse_create(p).unwrap_err().contains("segment_size_mib"));
    }

    #[test]
    fn mode_and_cut_off_are_parsed_and_echoed() {
        let c = parse_create(base()).unwrap();
        assert_eq!(c.options.mode, None, "the cache's own");
        assert!(c.to_params().get("mode").is_none());
        let mut p = base();
        p["mode"] = json!("write_around");
        p["seq_cutoff_bytes"] = json!(2 << 20);
        p["seq_cutoff_policy"] = json!("never");
        let c = parse_create(p).unwrap();
        assert_eq!(c.options.mode, Some(CacheMode::WriteAround));
        assert_eq!(c.to_params()["mode"], "write_around");
        assert_eq!(c.to_params()["seq_cutoff_policy"], "never");
        assert_eq!(parse_create(c.to_params()).unwrap(), c);
        let mut p = base();
        p["mode"] = json!("fast");
        assert!(parse_create(p).unwrap_err().contains("unknown mode"));
        let mut p = base();
        p["seq_cutoff_bytes"] = json!(0);
        assert!(parse_create(p).unwrap_err().contains("seq_cutoff_bytes"));
    }

    #[test]
    fn write_admission_is_parsed_and_echoed() {
        let c = parse_create(base()).unwrap();
        assert_eq!(c.options.write_admission, None, "keeps the cache's");
        assert!(c.to_params().get("write_admission").is_none());
        let mut p = base();
        p["write_admission"] = json!("second_touch");
        let c = parse_create(p).unwrap();
        assert_eq!(c.options.write_admission, Some(WriteAdmission::SecondTouch));
        assert_eq!(c.to_params()["write_admission"], "second_touch");
        assert_eq!(parse_create(c.to_params()).unwrap(), c);
        let mut p = base();
        p["write_admission"] = json!("sometimes");
        assert!(parse_create(p)
            .unwrap_err()
            .contains("unknown write_admission \"sometimes\""));
    }

    #[test]
    fn zero_copy_defaults_on_and_is_echoed() {
        let c = parse_create(base()).unwrap();
        assert!(c.options.zero_copy);
        assert_eq!(c.to_params()["zero_copy"], true);
        let mut p = base();
        p["zero_copy"] = json!(false);
        let c = parse_create(p).unwrap();
        assert!(!c.options.zero_copy);
        assert_eq!(c.to_params()["zero_copy"], false);
        assert_eq!(parse_create(c.to_params()).unwrap(), c);
        let mut p = base();
        p["zero_copy"] = json!("no");
        assert!(parse_create(p).is_err());
    }

    #[test]
    fn defer_flag() {
        assert!(!parse_create(base()).unwrap().defer);
        let mut p = base();
        p["defer"] = json!(true);
        let c = parse_create(p).unwrap();
        assert!(c.defer);
        assert!(
            c.to_params().get("defer").is_none(),
            "added when the config is written"
        );
        p = base();
        p["defer"] = json!("yes");
        assert!(parse_create(p).unwrap_err().contains("invalid type"));
    }

    #[test]
    fn backing_uuid_mismatch_is_parsed_and_never_echoed() {
        assert_eq!(
            parse_create(base()).unwrap().backing_uuid_mismatch,
            UuidMismatch::Refuse
        );
        let mut p = base();
        p["backing_uuid_mismatch"] = json!("refuse");
        assert_eq!(
            parse_create(p).unwrap().backing_uuid_mismatch,
            UuidMismatch::Refuse
        );
        let mut p = base();
        p["backing_uuid_mismatch"] = json!("accept");
        let c = parse_create(p).unwrap();
        assert_eq!(c.backing_uuid_mismatch, UuidMismatch::Accept);
        // Once accepted the identity is recorded: a saved config must not accept again.
        let saved = c.to_params();
        assert!(saved.get("backing_uuid_mismatch").is_none(), "{saved}");
        assert_eq!(
            parse_create(saved).unwrap().backing_uuid_mismatch,
            UuidMismatch::Refuse
        );
        let mut p = base();
        p["backing_uuid_mismatch"] = json!("yes");
        assert!(parse_create(p)
            .unwrap_err()
            .contains("\"refuse\" (the default) or \"accept\""));
        assert_eq!(
            parse_create(base()).unwrap().create_args(),
            "-b PC0 -c M0 -d M1"
        );
    }

    #[test]
    fn bad_inputs_have_messages() {
        let cases = [
            (Value::Null, "missing parameters"),
            (
                json!({"name": "PC0", "cache_bdev": "M0"}),
                "missing field `backing_bdev`",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "cache_path": "/dev/shm/x", "backing_bdev": "M1"}),
                "not both",
            ),
            (json!({"name": "PC0", "backing_bdev": "M1"}), "got neither"),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "cache_size_mib": 64, "backing_bdev": "M1"}),
                "goes with cache_path",
            ),
            (
                json!({"name": "PC0", "cache_path": "", "backing_bdev": "M1"}),
                "cache_path",
            ),
            (
                json!({"name": "PC0", "cache_path": "/dev/shm/x", "cache_size_mib": 0, "backing_bdev": "M1"}),
                "cache_size_mib",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M0"}),
                "same bdev",
            ),
            (
                json!({"name": "M0", "cache_bdev": "M0", "backing_bdev": "M1"}),
                "name of a base bdev",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "bogus": 1}),
                "unknown field `bogus`",
            ),
            (
                json!({"name": "", "cache_bdev": "M0", "backing_bdev": "M1"}),
                "must not be empty",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "gc_percent": 91}),
                "gc_percent",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "stripe_size_kib": 6}),
                "stripe_size_kib",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "segment_size_mib": 1, "stripe_size_kib": 512}),
                "stripe_size_kib",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "shards": 0}),
                "shards",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "data_crc": "yes"}),
                "invalid type",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "wb_high_pct": 5, "wb_low_pct": 6}),
                "wb_low_pct",
            ),
            (
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "wb_max_inflight": 0}),
                "wb_max_inflight",
            ),
        ];
        for (params, want) in cases {
            let err = parse_create(params.clone()).unwrap_err();
            assert!(err.contains(want), "{params}: {err}");
        }
    }

    #[test]
    fn delete_and_stats_params() {
        assert_eq!(parse_delete(json!({"name": "PC0"})).unwrap().name, "PC0");
        assert!(
            parse_delete(json!({"name": "PC0", "no_drain": true}))
                .unwrap()
                .no_drain
        );
        assert_eq!(parse_name(json!({"name": "PC0"})).unwrap(), "PC0");
        assert!(parse_name(json!({})).is_err());
        assert!(parse_delete(Value::Null).is_err());
        assert!(parse_delete(json!({"name": "PC0", "x": 1}))
            .unwrap_err()
            .contains("unknown field"));
        assert_eq!(parse_stats(Value::Null).unwrap(), None);
        assert_eq!(parse_stats(json!({})).unwrap(), None);
        assert_eq!(
            parse_stats(json!({"name": "PC0"})).unwrap().as_deref(),
            Some("PC0")
        );
        assert!(parse_stats(json!({"nam": "PC0"})).is_err());
        let so = parse_set_options(json!({"name": "PC0", "wb_high_pct": 50})).unwrap();
        let o = so.apply(WritebackOptions::default()).unwrap();
        let d = WritebackOptions::default();
        assert_eq!(
            (o.high_pct, o.low_pct, o.gc_percent),
            (50, d.low_pct, d.gc_percent)
        );
        assert!(parse_set_options(json!({"name": "PC0"}))
            .unwrap_err()
            .contains("no option"));
        assert!(parse_set_options(json!({"name": "PC0", "gc_percent": 95})).is_err());
        let live = Live {
            wb: WritebackOptions::default(),
            mode: CacheMode::WriteBack,
            seq_cutoff: SeqCutoff::default(),
            write_admission: WriteAdmission::Always,
        };
        let so = parse_set_options(json!({"name": "PC0", "mode": "write_through", "seq_cutoff_policy": "always", "seq_cutoff_bytes": 65536})).unwrap();
        let l = so.apply_live(live).unwrap();
        assert_eq!(l.mode, CacheMode::WriteThrough);
        assert_eq!(
            l.seq_cutoff,
            SeqCutoff {
                policy: SeqPolicy::Always,
                bytes: 65536
            }
        );
        assert_eq!(l.to_json()["mode"], "write_through");
        assert_eq!(l.write_admission, WriteAdmission::Always, "kept");
        let so =
            parse_set_options(json!({"name": "PC0", "write_admission": "second_touch"})).unwrap();
        let l = so.apply_live(l).unwrap();
        assert_eq!(l.write_admission, WriteAdmission::SecondTouch);
        assert_eq!(l.mode, CacheMode::WriteThrough, "kept");
        assert_eq!(l.to_json()["write_admission"], "second_touch");
        assert!(
            parse_set_options(json!({"name": "PC0", "write_admission": "never"}))
                .unwrap_err()
                .contains("always, second_touch")
        );
        assert!(
            parse_set_options(json!({"name": "PC0", "mode": "writeback"}))
                .unwrap_err()
                .contains("write_back, write_through")
        );
        assert!(
            parse_set_options(json!({"name": "PC0", "seq_cutoff_bytes": 1000}))
                .unwrap_err()
                .contains("multiple of 4096")
        );
        assert!(
            parse_set_options(json!({"name": "PC0", "seq_cutoff_policy": "sometimes"})).is_err()
        );
        let low = parse_set_options(json!({"name": "PC0", "wb_low_pct": 95})).unwrap();
        assert!(
            low.apply(WritebackOptions::default()).is_err(),
            "low above high"
        );
    }
}
