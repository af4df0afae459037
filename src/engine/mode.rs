//! Cache modes, the sequential cut-off and write admission: what a shard does with a write
//! (log it, write it through, send it around the cache) and which read misses it fills.
//!
//! All three can be changed at run time ([`Cache::set_mode`](super::Cache::set_mode),
//! [`Cache::set_seq_cutoff`](super::Cache::set_seq_cutoff),
//! [`Cache::set_write_admission`](super::Cache::set_write_admission)); all three are
//! persisted in every shard's control slot (docs/FORMAT.md).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// What a cache does with writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// A write completes once its data and key are durable on the cache device; writeback
    /// copies it to the backing device later (the default).
    #[default]
    WriteBack,
    /// A write is logged as in write-back, then written to the backing device; it
    /// completes once the backing device has it, and the cache holds it clean.
    WriteThrough,
    /// A write goes to the backing device and drops the cached copies it overlaps; read
    /// misses fill the cache.
    WriteAround,
    /// Nothing new is cached: writes go to the backing device, reads of clean data and
    /// read misses are served from it; dirty data stays readable until written back.
    PassThrough,
}

impl CacheMode {
    pub const ALL: [CacheMode; 4] = [
        CacheMode::WriteBack,
        CacheMode::WriteThrough,
        CacheMode::WriteAround,
        CacheMode::PassThrough,
    ];

    /// The name used in RPCs, stats and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::WriteBack => "write_back",
            CacheMode::WriteThrough => "write_through",
            CacheMode::WriteAround => "write_around",
            CacheMode::PassThrough => "pass_through",
        }
    }

    /// Its code in the control slot (0 = write-back, so slots written before modes existed
    /// read as write-back).
    pub fn code(self) -> u8 {
        match self {
            CacheMode::WriteBack => 0,
            CacheMode::WriteThrough => 1,
            CacheMode::WriteAround => 2,
            CacheMode::PassThrough => 3,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        CacheMode::ALL.get(usize::from(c)).copied()
    }

    /// Writes that go to the backing device are durable when they complete in these modes
    /// (a backing flush follows them before they complete); in write-around and
    /// pass-through they are durable once a FLUSH completes (or at once with FUA), as on
    /// the backing device itself.
    pub(crate) fn around_is_durable(self) -> bool {
        matches!(self, CacheMode::WriteBack | CacheMode::WriteThrough)
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown {what} \"{got}\" (one of: {choices})")]
pub struct UnknownName {
    pub what: &'static str,
    pub got: String,
    pub choices: &'static str,
}

/// The member of `all` whose `name` is `s`, or the error that lists them (`choices`).
fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    s: &str,
    what: &'static str,
    choices: &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|&m| name(m) == s)
        .ok_or_else(|| UnknownName {
            what,
            got: s.into(),
            choices,
        })
}

impl FromStr for CacheMode {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let choices = "write_back, write_through, write_around, pass_through";
        by_name(&CacheMode::ALL, CacheMode::as_str, s, "mode", choices)
    }
}

/// When the sequential cut-off applies (OCF's policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeqPolicy {
    /// Only while cache space is short (the default, as in OCF).
    #[default]
    Full,
    /// Always.
    Always,
    /// Never: sequential streams are cached like everything else.
    Never,
}

impl SeqPolicy {
    pub const ALL: [SeqPolicy; 3] = [SeqPolicy::Full, SeqPolicy::Always, SeqPolicy::Never];

    pub fn as_str(self) -> &'static str {
        match self {
            SeqPolicy::Full => "full",
            SeqPolicy::Always => "always",
            SeqPolicy::Never => "never",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            SeqPolicy::Full => 0,
            SeqPolicy::Always => 1,
            SeqPolicy::Never => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        SeqPolicy::ALL.get(usize::from(c)).copied()
    }
}

impl fmt::Display for SeqPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SeqPolicy {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let choices = "full, always, never";
        by_name(
            &SeqPolicy::ALL,
            SeqPolicy::as_str,
            s,
            "seq_cutoff_policy",
            choices,
        )
    }
}

/// Which writes a write-back or write-through cache takes in, once it is full (GC drops
/// clean data to make room). A write-back write sent around the cache completes once the
/// backing device has it durably, as a logged one is durable on the cache when it
/// completes; so `SecondTouch` trades the latency of a cold write for cache space, cache
/// device writes and writeback work. Persisted like the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteAdmission {
    /// Every write is cached (the default).
    #[default]
    Always,
    /// While the cache evicts, a write to a range it does not hold goes to the backing
    /// device, unless the range missed or was written recently (the read fills' admission
    /// on a second miss, sharing its table): data written once does not displace data read
    /// again and again.
    SecondTouch,
}

impl WriteAdmission {
    pub const ALL: [WriteAdmission; 2] = [WriteAdmission::Always, WriteAdmission::SecondTouch];

    pub fn as_str(self) -> &'static str {
        match self {
            WriteAdmission::Always => "always",
            WriteAdmission::SecondTouch => "second_touch",
        }
    }

    /// Its code in the control slot (0 = always, so slots written before write admission
    /// existed read as `always`).
    pub fn code(self) -> u8 {
        match self {
            WriteAdmission::Always => 0,
            WriteAdmission::SecondTouch => 1,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        WriteAdmission::ALL.get(usize::from(c)).copied()
    }
}

impl fmt::Display for WriteAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WriteAdmission {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let choices = "always, second_touch";
        by_name(
            &WriteAdmission::ALL,
            WriteAdmission::as_str,
            s,
            "write_admission",
            choices,
        )
    }
}

/// Unit of the persisted threshold.
pub const SEQ_CUTOFF_UNIT: u64 = 4096;
/// Default threshold: 1 MiB.
pub const DEFAULT_SEQ_CUTOFF_BYTES: u64 = 1 << 20;
/// Largest threshold the control slot holds (u16 of 4 KiB units).
pub const MAX_SEQ_CUTOFF_BYTES: u64 = u16::MAX as u64 * SEQ_CUTOFF_UNIT;

/// The sequential cut-off: once a shard has seen `bytes` of one sequential stream, the
/// stream's writes go to the backing device (after dropping cached copies they overlap)
/// and its read misses are not filled, when `policy` says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqCutoff {
    pub policy: SeqPolicy,
    /// A multiple of 4 KiB, 4 KiB ..= [`MAX_SEQ_CUTOFF_BYTES`].
    pub bytes: u64,
}

impl Default for SeqCutoff {
    fn default() -> Self {
        SeqCutoff {
            policy: SeqPolicy::default(),
            bytes: DEFAULT_SEQ_CUTOFF_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "seq_cutoff_bytes must be a multiple of 4096 between 4096 and {MAX_SEQ_CUTOFF_BYTES} (got {0})"
)]
pub struct BadSeqCutoff(pub u64);

impl SeqCutoff {
    pub fn check(&self) -> Result<(), BadSeqCutoff> {
        if self.bytes == 0 || self.bytes % SEQ_CUTOFF_UNIT != 0 || self.bytes > MAX_SEQ_CUTOFF_BYTES
        {
            return Err(BadSeqCutoff(self.bytes));
        }
        Ok(())
    }

    /// The threshold in the control slot's units (0 is read as the default).
    pub(crate) fn units(&self) -> u16 {
        u16::try_from(self.bytes / SEQ_CUTOFF_UNIT).unwrap_or(u16::MAX)
    }

    pub(crate) fn from_units(policy: SeqPolicy, units: u16) -> Self {
        SeqCutoff {
            policy,
            bytes: if units == 0 {
                DEFAULT_SEQ_CUTOFF_BYTES
            } else {
                u64::from(units) * SEQ_CUTOFF_UNIT
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for m in CacheMode::ALL {
            assert_eq!(m.as_str().parse::<CacheMode>(), Ok(m));
            assert_eq!(CacheMode::from_code(m.code()), Some(m));
        }
        for p in SeqPolicy::ALL {
            assert_eq!(p.as_str().parse::<SeqPolicy>(), Ok(p));
            assert_eq!(SeqPolicy::from_code(p.code()), Some(p));
        }
        for a in WriteAdmission::ALL {
            assert_eq!(a.as_str().parse::<WriteAdmission>(), Ok(a));
        }
        assert!("second".parse::<WriteAdmission>().is_err());
        assert_eq!(CacheMode::from_code(0), Some(CacheMode::WriteBack));
        assert!(CacheMode::from_code(4).is_none());
        assert!("writeback".parse::<CacheMode>().is_err());
        let s = SeqCutoff::default();
        assert_eq!(SeqCutoff::from_units(s.policy, 0), s);
        assert_eq!(SeqCutoff::from_units(s.policy, s.units()), s);
        assert!(SeqCutoff { bytes: 4095, ..s }.check().is_err());
        assert!(SeqCutoff {
            bytes: MAX_SEQ_CUTOFF_BYTES + 4096,
            ..s
        }
        .check()
        .is_err());
    }
}
