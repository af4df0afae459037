//! Where everything lives on the cache device, and how the LBA space maps to shards.

use thiserror::Error;

/// Sectors 0..8: superblock replica A; 8..16: replica B.
pub const SB_A_SECTOR: u64 = 0;
pub const SB_B_SECTOR: u64 = 8;
/// Control slots start here: two one-sector replicas per shard.
pub const CONTROL_SECTOR: u64 = 16;
pub const MAX_SHARDS: u32 = 256;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GeometryError {
    #[error("segment size must be a multiple of 4 KiB between 64 KiB and 1 GiB (got {0} bytes)")]
    SegmentSize(u64),
    #[error("stripe size must be a multiple of 4 KiB and at most a quarter of the segment size (got {0} bytes)")]
    StripeSize(u64),
    #[error("shard count must be between 1 and {MAX_SHARDS} (got {0})")]
    Shards(u32),
    #[error("cache device too small: {have} bytes hold {segments} segments, need at least {need} (two per shard)")]
    TooSmall { have: u64, segments: u64, need: u64 },
    #[error("gc_percent must be between 0 and 90 (got {0})")]
    GcPercent(u32),
    #[error("backing device is empty")]
    EmptyBacking,
    #[error("layout inconsistent: {0}")]
    Inconsistent(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cache_sectors: u64,
    pub segment_sectors: u32,
    pub segment_count: u32,
    /// First sector of segment 0.
    pub segments_start: u64,
    pub stripe_sectors: u32,
    pub shard_count: u32,
    pub backing_sectors: u64,
}

/// User-facing layout choices; everything else is derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutOptions {
    pub segment_bytes: u64,
    pub stripe_bytes: u64,
    pub shards: u32,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            segment_bytes: 16 << 20,
            stripe_bytes: 1 << 20,
            shards: 1,
        }
    }
}

impl Geometry {
    pub fn new(
        cache_bytes: u64,
        backing_sectors: u64,
        opts: LayoutOptions,
    ) -> Result<Self, GeometryError> {
        let seg = opts.segment_bytes;
        if seg % 4096 != 0 || !(64 << 10..=1 << 30).contains(&seg) {
            return Err(GeometryError::SegmentSize(seg));
        }
        let stripe = opts.stripe_bytes;
        if stripe == 0 || stripe % 4096 != 0 || stripe > seg / 4 {
            return Err(GeometryError::StripeSize(stripe));
        }
        if opts.shards == 0 || opts.shards > MAX_SHARDS {
            return Err(GeometryError::Shards(opts.shards));
        }
        let cache_sectors = cache_bytes / 512;
        let segment_sectors = (seg / 512) as u32;
        // Control slots, then segments aligned to 4 KiB.
        let segments_start = (CONTROL_SECTOR + 2 * u64::from(opts.shards)).next_multiple_of(8);
        let segments = cache_sectors.saturating_sub(segments_start) / u64::from(segment_sectors);
        let need = 2 * u64::from(opts.shards);
        if segments < need {
            return Err(GeometryError::TooSmall {
                have: cache_bytes,
                segments,
                need,
            });
        }
        let g = Geometry {
            cache_sectors,
            segment_sectors,
            segment_count: segments.min(u64::from(u32::MAX)) as u32,
            segments_start,
            stripe_sectors: (stripe / 512) as u32,
            shard_count: opts.shards,
            backing_sectors,
        };
        g.validate()?;
        Ok(g)
    }

    /// Checks a geometry read from media before anything is sized from it.
    pub fn validate(&self) -> Result<(), GeometryError> {
        let seg = u64::from(self.segment_sectors) * 512;
        if seg % 4096 != 0 || !(64 << 10..=1 << 30).contains(&seg) {
            return Err(GeometryError::SegmentSize(seg));
        }
        let stripe = u64::from(self.stripe_sectors) * 512;
        if stripe == 0 || stripe % 4096 != 0 || stripe > seg / 4 {
            return Err(GeometryError::StripeSize(stripe));
        }
        if self.shard_count == 0 || self.shard_count > MAX_SHARDS {
            return Err(GeometryError::Shards(self.shard_count));
        }
        if self.backing_sectors == 0 {
            return Err(GeometryError::EmptyBacking);
        }
        if self.segments_start < CONTROL_SECTOR + 2 * u64::from(self.shard_count) {
            return Err(GeometryError::Inconsistent(
                "segments overlap the control area",
            ));
        }
        let end = u64::from(self.segment_count)
            .checked_mul(u64::from(self.segment_sectors))
            .and_then(|s| s.checked_add(self.segments_start));
        if end.is_none_or(|e| e > self.cache_sectors) {
            return Err(GeometryError::Inconsistent(
                "segments extend past the cache device",
            ));
        }
        if u64::from(self.segment_count) < 2 * u64::from(self.shard_count) {
            return Err(GeometryError::TooSmall {
                have: self.cache_sectors * 512,
                segments: self.segment_count.into(),
                need: 2 * u64::from(self.shard_count),
            });
        }
        Ok(())
    }

    pub fn segment_start(&self, seg: u32) -> u64 {
        self.segments_start + u64::from(seg) * u64::from(self.segment_sectors)
    }

    pub fn control_sector(&self, shard: u32, slot: u32) -> u64 {
        CONTROL_SECTOR + 2 * u64::from(shard) + u64::from(slot)
    }

    #[inline]
    pub fn stripe_of(&self, lba: u64) -> u64 {
        div(lba, u64::from(self.stripe_sectors))
    }

    #[inline]
    pub fn shard_of(&self, lba: u64) -> u32 {
        self.shard_of_stripe(self.stripe_of(lba))
    }

    #[inline]
    pub fn shard_of_stripe(&self, stripe: u64) -> u32 {
        let n = u64::from(self.shard_count);
        (stripe - div(stripe, n) * n) as u32
    }

    /// Largest request a shard accepts in one piece: one stripe.
    pub fn max_piece_sectors(&self) -> u32 {
        self.stripe_sectors
    }

    pub fn cache_bytes(&self) -> u64 {
        self.cache_sectors * 512
    }
}

/// `n / d` (`d` > 0) with a shift when `d` is a power of two, as stripes, buckets and
/// shard counts usually are: a 64-bit division costs tens of cycles on the I/O path.
#[inline]
pub fn div(n: u64, d: u64) -> u64 {
    if d.is_power_of_two() {
        n >> d.trailing_zeros()
    } else {
        n / d
    }
}

#[cfg(test)]
mod tests {
    use super::div;

    #[test]
    fn div_matches_division_for_powers_of_two_and_others() {
        for d in [1u64, 2, 3, 8, 24, 2048, 2056, 1 << 40] {
            for n in [0u64, 1, 7, 8, 2047, 2048, 2049, 123_456_789, u64::MAX] {
                assert_eq!(div(n, d), n / d, "{n} / {d}");
            }
        }
    }
}
