//! RPC parameters and the validated options of a pcache bdev. Pure Rust: no SPDK calls.
//!
//! The option ranges mirror the engine's layout rules (`engine::geometry`): segment size
//! 64 KiB..1 GiB, stripe a multiple of 4 KiB and at most a quarter of a segment, 1..=256
//! shards. When the engine is wired in, its own validation runs as well at attach time.

use serde::Deserialize;
use serde_json::{json, Value};

/// Maximum shard count (same as the engine's `MAX_SHARDS`).
pub(crate) const MAX_SHARDS: u32 = 256;

/// Longest bdev name we accept (SPDK has no fixed limit; this keeps messages and config sane).
const MAX_NAME: usize = 255;

/// `bdev_pcache_create` parameters as they arrive. Unknown fields are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    cache_bdev: String,
    backing_bdev: String,
    data_crc: Option<bool>,
    gc_percent: Option<u32>,
    stripe_size_kib: Option<u32>,
    segment_size_mib: Option<u32>,
    shards: Option<u32>,
}

/// Tunables stored with each pcache bdev, echoed in `save_config` and `bdev_get_bdevs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Options {
    /// Keep a CRC32C of every cached block and verify it on read.
    pub data_crc: bool,
    /// Garbage-collect a segment when at most this percentage of it is still live.
    pub gc_percent: u32,
    /// Stripe size: requests are split at stripe edges, stripes map to shards.
    pub stripe_size_kib: u32,
    /// Cache log segment size.
    pub segment_size_mib: u32,
    /// Number of shards (engine threads' units of work).
    pub shards: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            data_crc: true,
            gc_percent: 80,
            stripe_size_kib: 1024,
            segment_size_mib: 16,
            shards: 1,
        }
    }
}

impl Options {
    pub(crate) fn stripe_bytes(&self) -> u64 {
        u64::from(self.stripe_size_kib) * 1024
    }
}

/// A validated `bdev_pcache_create` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreateConfig {
    pub name: String,
    pub cache_bdev: String,
    pub backing_bdev: String,
    pub options: Options,
}

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
    check_name("cache_bdev", &p.cache_bdev)?;
    check_name("backing_bdev", &p.backing_bdev)?;
    if p.cache_bdev == p.backing_bdev {
        return Err(format!(
            "cache_bdev and backing_bdev are the same bdev '{}'",
            p.cache_bdev
        ));
    }
    if p.name == p.cache_bdev || p.name == p.backing_bdev {
        return Err(format!("name '{}' is the name of a base bdev", p.name));
    }
    let d = Options::default();
    let o = Options {
        data_crc: p.data_crc.unwrap_or(d.data_crc),
        gc_percent: p.gc_percent.unwrap_or(d.gc_percent),
        stripe_size_kib: p.stripe_size_kib.unwrap_or(d.stripe_size_kib),
        segment_size_mib: p.segment_size_mib.unwrap_or(d.segment_size_mib),
        shards: p.shards.unwrap_or(d.shards),
    };
    if !(1..=99).contains(&o.gc_percent) {
        return Err(format!(
            "gc_percent must be between 1 and 99 (got {})",
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
        cache_bdev: p.cache_bdev,
        backing_bdev: p.backing_bdev,
        options: o,
    })
}

impl CreateConfig {
    /// The `params` of the `bdev_pcache_create` call that recreates this bdev: every option
    /// spelled out, so a saved config does not depend on today's defaults.
    pub(crate) fn to_params(&self) -> Value {
        let o = &self.options;
        json!({
            "name": self.name,
            "cache_bdev": self.cache_bdev,
            "backing_bdev": self.backing_bdev,
            "data_crc": o.data_crc,
            "gc_percent": o.gc_percent,
            "stripe_size_kib": o.stripe_size_kib,
            "segment_size_mib": o.segment_size_mib,
            "shards": o.shards,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptNameParams {
    name: Option<String>,
}

/// Parse `bdev_pcache_delete` params: `{name}`.
pub(crate) fn parse_delete(params: Value) -> Result<String, String> {
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
                json!({"name": "PC0", "cache_bdev": "M0", "backing_bdev": "M1", "gc_percent": 100}),
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
        ];
        for (params, want) in cases {
            let err = parse_create(params.clone()).unwrap_err();
            assert!(err.contains(want), "{params}: {err}");
        }
    }

    #[test]
    fn delete_and_stats_params() {
        assert_eq!(parse_delete(json!({"name": "PC0"})).unwrap(), "PC0");
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
    }
}
