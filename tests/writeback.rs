//! Writeback, GC and drain: a cache smaller than the working set keeps serving every
//! request, reads stay right, and a drain leaves the backing device equal to the reference.

mod common;

use common::*;
use pcache::engine::shard::WritebackOptions;
use pcache::engine::{CacheOptions, Op};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::Rng;

fn opts(always: bool) -> CacheOptions {
    CacheOptions {
        writeback: WritebackOptions {
            high_pct: if always { 0 } else { 30 },
            low_pct: 0,
            ..WritebackOptions::default()
        },
        ..CacheOptions::default()
    }
}

fn host(cache_bytes: u64, backing_sectors: u64, shards: u32, always: bool) -> MemHost {
    SyncHost::format(
        MemDevice::new(cache_bytes),
        MemDevice::new(backing_sectors * 512),
        identity(backing_sectors),
        &small_format(shards, false),
        opts(always),
    )
    .expect("format")
}

/// Random writes over a working set four times the cache, in batches of `qd`, checked
/// against a reference, with flushes and reads in between.
fn sustained(ops: u64, shards: u32, seed: u64) -> MemHost {
    let cache_bytes = 2 << 20;
    let backing_sectors = 4 * cache_bytes / 512;
    let mut h = host(cache_bytes, backing_sectors, shards, false);
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    let mut rng = Rng::new(seed);
    let mut id = 0;
    let mut done = 0;
    while done < ops {
        let qd = 1 + rng.below(16);
        let mut taken: Vec<(u64, u64)> = Vec::new();
        for _ in 0..qd {
            let len = 1 + rng.below(16) as u32;
            let lba = rng.below(backing_sectors - u64::from(len));
            let end = lba + u64::from(len);
            if taken.iter().any(|&(a, b)| lba < b && a < end) {
                continue;
            }
            taken.push((lba, end));
            id += 1;
            let d = data_of(id, lba, len);
            let at = lba as usize * SECTOR;
            model[at..at + d.len()].copy_from_slice(&d);
            h.submit(Op::Write, lba, len, Some(d)).expect("submit");
        }
        h.run();
        for (_, r, _) in h.take_done() {
            r.expect("write completes");
        }
        done += taken.len() as u64;
        if rng.chance(5) {
            h.flush().unwrap();
        }
        if rng.chance(10) {
            let len = 1 + rng.below(64) as u32;
            let lba = rng.below(backing_sectors - u64::from(len));
            let got = h.read(lba, len).unwrap();
            let at = lba as usize * SECTOR;
            assert!(
                got == model[at..at + len as usize * SECTOR],
                "read {lba}+{len} wrong"
            );
        }
    }
    let all = h.read(0, backing_sectors as u32).unwrap();
    assert!(all == model, "image differs from the reference");
    h.cache.set_drain(true);
    h.run();
    assert!(h.cache.is_clean(), "drain left dirty data");
    assert!(
        h.backing_dev.bytes() == &model[..],
        "backing differs after drain"
    );
    h
}

#[test]
fn a_working_set_four_times_the_cache_keeps_every_request_completing() {
    let ops = std::env::var("PCACHE_SOAK_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    for shards in [1, 2] {
        let h = sustained(ops, shards, 7 + u64::from(shards));
        let st = h.cache.stats().total;
        println!(
            "sustained {ops} writes, {shards} shard(s): {} sectors written back, {} segments reclaimed, {} stalls, {} backing flushes",
            st.wb_sectors, st.gc_segments, st.cache_full_waits, st.backing_flushes
        );
        assert!(st.gc_segments > 0 && st.wb_sectors > 0);
    }
}
