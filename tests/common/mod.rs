//! Shared test support: devices, patterned data that names its writer, and a
//! reference model of a block device.
#![allow(dead_code)]

use pcache::engine::shard::WritebackOptions;
use pcache::engine::{BackingIdentity, CacheOptions, FormatOptions, LayoutOptions};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::Sim;

pub const SECTOR: usize = 512;

pub fn identity(backing_sectors: u64) -> BackingIdentity {
    BackingIdentity {
        sectors: backing_sectors,
        block_size: 512,
        uuid: [7; 16],
        name: "backing0".into(),
    }
}

/// Small geometry so tests exercise segment switches and a full cache.
pub fn small_format(shards: u32, data_crc: bool) -> FormatOptions {
    small_format_blocks(shards, data_crc, 512)
}

/// [`small_format`] for a cache device of `block_bytes`-byte blocks.
pub fn small_format_blocks(shards: u32, data_crc: bool, block_bytes: u32) -> FormatOptions {
    FormatOptions {
        layout: LayoutOptions {
            segment_bytes: 64 << 10,
            stripe_bytes: 16 << 10,
            shards,
            block_bytes,
        },
        data_crc,
        cache_uuid: [0xc4; 16],
        gc_percent: 70,
    }
}

pub type MemHost = SyncHost<MemDevice, MemDevice>;

pub fn new_host(cache_bytes: u64, backing_sectors: u64, fopts: &FormatOptions) -> MemHost {
    SyncHost::format(
        MemDevice::new(cache_bytes),
        MemDevice::new(backing_sectors * 512),
        identity(backing_sectors),
        fopts,
        CacheOptions::default(),
    )
    .expect("format")
}

pub fn reopen(host: MemHost) -> MemHost {
    let backing = host.cache.superblock().backing.clone();
    let (c, b) = host.into_devices();
    SyncHost::open(c, b, backing, CacheOptions::default())
        .expect("reopen")
        .0
}

/// `lba..+len` widened to whole blocks of `block` sectors, inside `0..limit` (a pcache bdev
/// over a cache of 4 KiB blocks exports 4 KiB blocks: its requests are whole blocks).
pub fn align_range(lba: u64, len: u32, block: u32, limit: u64) -> (u64, u32) {
    let b = u64::from(block);
    let start = lba / b * b;
    let end = (lba + u64::from(len))
        .next_multiple_of(b)
        .min(limit / b * b);
    (start, (end.max(start + b) - start) as u32)
}

/// One sector written by write `id` at `lba`: the id and lba, then a pattern derived from
/// both, so a torn or misplaced sector is recognised.
pub fn sector_of(id: u64, lba: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(&id.to_le_bytes());
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba;
    for chunk in s[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    s
}

pub fn data_of(id: u64, lba: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize * SECTOR);
    for i in 0..u64::from(len) {
        v.extend_from_slice(&sector_of(id, lba + i));
    }
    v
}

/// What a sector holds: `Some(0)` for zeros, `Some(id)` for write `id`'s data at that
/// lba, `None` for anything else (garbage, torn, or misplaced data).
pub fn decode_sector(s: &[u8], lba: u64) -> Option<u64> {
    if s.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(s[..8].try_into().ok()?);
    (id != 0 && s == sector_of(id, lba)).then_some(id)
}

/// Up to `max_qd` random writes of 1..=`max_len` sectors below `backing_sectors` that do not
/// overlap one another (so they may run concurrently), each with data naming its writer
/// (ids from `next_id`), applied to `model` (a byte image of the device) in order.
pub fn random_write_batch(
    rng: &mut pcache::media::sim::Rng,
    max_qd: u64,
    max_len: u64,
    backing_sectors: u64,
    next_id: &mut u64,
    model: &mut [u8],
) -> Vec<(u64, u32, Vec<u8>)> {
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(max_qd) {
        let len = 1 + rng.below(max_len) as u32;
        let lba = rng.below(backing_sectors - u64::from(len));
        let end = lba + u64::from(len);
        if taken.iter().any(|&(a, b)| lba < b && a < end) {
            continue;
        }
        taken.push((lba, end));
        *next_id += 1;
        let d = data_of(*next_id, lba, len);
        let at = lba as usize * SECTOR;
        model[at..at + d.len()].copy_from_slice(&d);
        out.push((lba, len, d));
    }
    out
}

/// A simulator over a freshly formatted `cache_bytes` cache of `shards` shards in front of
/// `backing_sectors`, split into `parts`, writing back early (from 30% dirty, down to
/// nothing) so writeback and GC run under the test's writes.
pub fn eager_writeback_sim(
    cache_bytes: u64,
    backing_sectors: u64,
    shards: u32,
    seed: u64,
    parts: usize,
) -> Sim {
    let opts = CacheOptions {
        writeback: WritebackOptions {
            high_pct: 30,
            low_pct: 0,
            ..WritebackOptions::default()
        },
        ..CacheOptions::default()
    };
    let host = SyncHost::format(
        MemDevice::new(cache_bytes),
        MemDevice::new(backing_sectors * 512),
        identity(backing_sectors),
        &small_format(shards, false),
        opts,
    )
    .expect("format");
    let (cache, cache_dev, backing_dev) = host.into_parts();
    Sim::with_parts(cache, cache_dev, backing_dev, seed, parts)
}
