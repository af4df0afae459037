//! Where everything lives on the cache device, and how the LBA space maps to shards.

use thiserror::Error;

/// Sectors 0..8: superblock replica A; 8..16: replica B.
pub const SB_A_SECTOR: u64 = 0;
pub const SB_B_SECTOR: u64 = 8;
/// Control slots start here: two replicas per shard, one cache block each.
pub const CONTROL_SECTOR: u64 = 16;
pub const MAX_SHARDS: u32 = 256;
/// Largest cache block size supported: a 4 KiB block (4Kn NVMe, most PMR/CXL devices).
/// Every on-media position is then a multiple of it (the superblock replicas, the control
/// area and segments are 4 KiB-aligned in every geometry).
pub const MAX_BLOCK_BYTES: u32 = 4096;

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
    #[error(
        "cache block size must be a power of two from 512 to {MAX_BLOCK_BYTES} bytes (got {0})"
    )]
    BlockSize(u32),
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
    /// The cache device's block size in sectors (1 for 512-byte blocks, 8 for 4 KiB):
    /// the unit of every cache write, so that no write is torn inside a block it does not
    /// own (format v3; v1 and v2 caches have 512-byte blocks).
    pub block_sectors: u32,
}

/// User-facing layout choices; everything else is derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutOptions {
    pub segment_bytes: u64,
    pub stripe_bytes: u64,
    pub shards: u32,
    /// The cache device's block size (not a choice: the device's).
    pub block_bytes: u32,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            segment_bytes: 16 << 20,
            stripe_bytes: 1 << 20,
            shards: 1,
            block_bytes: 512,
        }
    }
}

fn block_sectors_of(bytes: u32) -> Result<u32, GeometryError> {
    if bytes.is_power_of_two() && (512..=MAX_BLOCK_BYTES).contains(&bytes) {
        Ok(bytes / 512)
    } else {
        Err(GeometryError::BlockSize(bytes))
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
        let block_sectors = block_sectors_of(opts.block_bytes)?;
        let cache_sectors = cache_bytes / 512;
        let segment_sectors = (seg / 512) as u32;
        // Control slots, then segments aligned to 4 KiB.
        let segments_start = (CONTROL_SECTOR
            + 2 * u64::from(opts.shards) * u64::from(block_sectors))
        .next_multiple_of(8);
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
            block_sectors,
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
        let block = self.block_sectors;
        if block_sectors_of(block.saturating_mul(512)).is_err() {
            return Err(GeometryError::BlockSize(block.saturating_mul(512)));
        }
        if self.segments_start < CONTROL_SECTOR + 2 * u64::from(self.shard_count) * u64::from(block)
        {
            return Err(GeometryError::Inconsistent(
                "segments overlap the control area",
            ));
        }
        if self.segments_start % u64::from(block) != 0 {
            return Err(GeometryError::Inconsistent(
                "segments do not start on a cache block",
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
        CONTROL_SECTOR + (2 * u64::from(shard) + u64::from(slot)) * u64::from(self.block_sectors)
    }

    /// Sectors of the control area: both slots of every shard.
    pub fn control_sectors(&self) -> u64 {
        2 * u64::from(self.shard_count) * u64::from(self.block_sectors)
    }

    pub fn block_bytes(&self) -> usize {
        self.block_sectors as usize * 512
    }

    /// Where a segment's first kset goes: right after its header, which fills one block.
    pub fn first_kset_off(&self) -> u32 {
        self.block_sectors
    }

    /// Sectors a kset of `keys` keys occupies on this cache: whole blocks.
    pub fn kset_sectors(&self, keys: usize) -> u32 {
        super::format::kset_sectors(keys).next_multiple_of(self.block_sectors)
    }

    /// Whether `sector` (of the cache device, or of a segment) starts a cache block.
    #[inline]
    pub fn block_aligned(&self, sector: u64) -> bool {
        sector % u64::from(self.block_sectors.max(1)) == 0
    }

    /// `bytes` padded with zeros to whole cache blocks: a metadata record (control slot,
    /// segment header, kset) always owns the blocks it is written in.
    pub fn whole_blocks(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        bytes.resize(bytes.len().next_multiple_of(self.block_bytes()), 0);
        bytes
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
