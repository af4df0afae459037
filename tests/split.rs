//! A cache split into parts, one per thread in the SPDK host, driven by the simulator
//! (`Sim::with_parts`) with the same cross-part traffic the host carries: pool messages and
//! grants, and the epoch barrier / pressure decisions; device completions come in a seeded
//! random order. Requests go to every part owning one of their stripes (flushes to all)
//! and complete when all of them did. Checked against a plain reference device, through
//! writeback, GC, a drain and a reopen as one unsplit cache.

mod common;

use common::*;
use pcache::engine::{Cache, CacheOptions, Op};
use pcache::media::host::SyncHost;
use pcache::media::sim::{Rng, Sim};

/// Runs one request to completion; returns its buffer.
fn one(sim: &mut Sim, op: Op, lba: u64, len: u32, data: Option<Vec<u8>>) -> Vec<u8> {
    let id = sim.submit(op, lba, len, data).expect("submit");
    sim.run();
    let (_, r, buf) = sim
        .take_done()
        .into_iter()
        .find(|(i, _, _)| *i == id)
        .expect("done");
    r.unwrap_or_else(|e| panic!("{op:?} {lba}+{len} failed: {e}"));
    buf
}

fn run_split(parts: usize, shards: u32, seed: u64) {
    let cache_bytes = 2 << 20;
    let backing_sectors = 4 * cache_bytes / 512;
    let mut sim = eager_writeback_sim(cache_bytes, backing_sectors, shards, seed, parts);
    assert_eq!(sim.parts().count(), parts);
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    let mut rng = Rng::new(seed);
    let mut id = 0;
    for _ in 0..600 {
        // A batch of non-overlapping writes, some crossing stripes (so parts share them).
        for (lba, len, d) in
            random_write_batch(&mut rng, 16, 48, backing_sectors, &mut id, &mut model)
        {
            sim.submit(Op::Write, lba, len, Some(d)).expect("submit");
        }
        sim.run();
        for (rid, r, _) in sim.take_done() {
            r.unwrap_or_else(|e| panic!("write {rid} failed: {e}"));
        }
        if rng.chance(5) {
            one(&mut sim, Op::Flush, 0, 0, None);
        }
        if rng.chance(4) {
            let len = 1 + rng.below(96) as u32;
            let lba = rng.below(backing_sectors - u64::from(len));
            let got = one(&mut sim, Op::Read, lba, len, None);
            let at = lba as usize * SECTOR;
            assert!(
                got == model[at..at + len as usize * SECTOR],
                "read {lba}+{len} wrong ({parts} parts, seed {seed})"
            );
        }
    }
    let gc: u64 = sim.parts().map(|p| p.stats().total.gc_segments).sum();
    assert!(gc > 0, "the cache was overwritten 4x: GC must have run");
    for p in sim.parts_mut() {
        p.set_drain(true);
    }
    sim.run();
    let dirty: u64 = sim.parts().map(Cache::dirty_bytes).sum();
    assert_eq!(dirty, 0, "drain leaves nothing dirty");
    assert_eq!(sim.inflight(), 0);
    let backing = sim.cache.superblock().backing.clone();
    // Nothing in flight and the drain ended with a backing flush: these are the images.
    let (cache_dev, backing_dev) = sim.crash();
    assert!(
        backing_dev.bytes() == model.as_slice(),
        "after a drain the backing device equals the reference"
    );
    // The parts' shards together are one cache on the media: it reopens whole.
    let mut whole = SyncHost::open(cache_dev, backing_dev, backing, CacheOptions::default())
        .expect("reopen")
        .0;
    for _ in 0..50 {
        let len = 1 + rng.below(96) as u32;
        let lba = rng.below(backing_sectors - u64::from(len));
        let at = lba as usize * SECTOR;
        assert!(whole.read(lba, len).expect("read") == model[at..at + len as usize * SECTOR]);
    }
}

#[test]
fn a_split_cache_reads_and_writes_back_like_one() {
    for (parts, shards) in [(2, 2), (2, 4), (3, 4)] {
        for seed in 1..=3 {
            run_split(parts, shards, seed);
        }
    }
}
