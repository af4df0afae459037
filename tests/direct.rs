//! Direct requests (`Cache::begin_direct`, `Cache::begin_backing_read`): read hits and
//! in-place writes the host serves with one cache-device I/O of its own, and read misses
//! the cache would not fill with one backing-device read, as the SPDK host does for every
//! request it can.
//! Driven by the simulator with 4 KiB blocks rewritten over and over (so writes land in
//! place) while writeback and GC run, completions in random order, and checked against a
//! plain reference device, then after a drain and a reopen.

mod common;

use common::*;
use pcache::engine::{CacheMode, CacheOptions, IoError, Op};
use pcache::media::host::SyncHost;
use pcache::media::sim::{Rng, Sim};

const BLOCK: u32 = 8;

/// Returns (direct requests, in-place writes, misses read directly from the backing).
fn run(parts: usize, seed: u64, direct_percent: u64) -> (u64, u64, u64) {
    let cache_bytes = 2 << 20;
    let backing_sectors = 2 * cache_bytes / 512;
    let blocks = backing_sectors / u64::from(BLOCK);
    let mut sim = eager_writeback_sim(cache_bytes, backing_sectors, 4, seed, parts);
    sim.direct_percent = direct_percent;
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    let mut rng = Rng::new(seed);
    let mut id = 0;
    for round in 0..400 {
        // Mixed reads and writes of distinct blocks, in flight together; a small hot set
        // half the time, so blocks are rewritten while still dirty (in place).
        let hot = if round % 2 == 0 { blocks / 16 } else { blocks };
        let mut taken = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..24 {
            let b = rng.below(hot);
            if taken.contains(&b) {
                continue;
            }
            taken.push(b);
            let lba = b * u64::from(BLOCK);
            if rng.chance(40) {
                let rid = sim.submit(Op::Read, lba, BLOCK, None).expect("submit read");
                reads.push((rid, lba));
            } else {
                id += 1;
                let d = data_of(id, lba, BLOCK);
                let at = lba as usize * SECTOR;
                model[at..at + d.len()].copy_from_slice(&d);
                sim.submit(Op::Write, lba, BLOCK, Some(d))
                    .expect("submit write");
            }
        }
        sim.run();
        for (rid, r, buf) in sim.take_done() {
            r.unwrap_or_else(|e| panic!("request {rid} failed: {e} ({parts} parts, seed {seed})"));
            if let Some(&(_, lba)) = reads.iter().find(|(i, _)| *i == rid) {
                let at = lba as usize * SECTOR;
                assert!(
                    buf == model[at..at + BLOCK as usize * SECTOR],
                    "read of block at {lba} wrong ({parts} parts, seed {seed})"
                );
            }
        }
        if rng.chance(3) {
            sim.submit(Op::Flush, 0, 0, None).expect("flush");
            sim.run();
            sim.take_done();
        }
    }
    let total = |sim: &Sim, f: fn(&pcache::engine::stats::ShardStats) -> u64| -> u64 {
        sim.parts().map(|p| f(&p.stats().total)).sum()
    };
    let direct = total(&sim, |s| s.direct);
    let gc = total(&sim, |s| s.gc_segments);
    let in_place = total(&sim, |s| s.in_place_writes);
    let from_backing = sim.backing_directs;
    assert!(
        gc > 0,
        "the cache was overwritten many times: GC must have run"
    );
    assert!(in_place > 0, "hot blocks were rewritten while dirty");
    for p in sim.parts_mut() {
        p.set_drain(true);
    }
    sim.run();
    let backing = sim.cache.superblock().backing.clone();
    let (cache_dev, backing_dev) = sim.crash();
    assert!(
        backing_dev.bytes() == model.as_slice(),
        "after a drain the backing device equals the reference ({parts} parts, seed {seed})"
    );
    let mut whole = SyncHost::open(cache_dev, backing_dev, backing, CacheOptions::default())
        .expect("reopen")
        .0;
    let got = whole.read(0, backing_sectors as u32).expect("read all");
    assert!(got == model, "the reopened cache reads back the reference");
    (direct, in_place, from_backing)
}

#[test]
fn direct_reads_and_in_place_writes_read_back_like_the_reference() {
    for (parts, seed) in [(1, 1), (1, 2), (2, 3), (3, 4)] {
        let (direct, in_place, from_backing) = run(parts, seed, 50);
        assert!(
            direct > 0 && in_place > 0 && from_backing > 0,
            "{parts} parts, seed {seed}: {direct} direct requests, {in_place} in place, \
             {from_backing} misses from the backing device"
        );
    }
}

#[test]
fn requests_through_commands_only_read_back_the_same() {
    let (direct, in_place, from_backing) = run(2, 5, 0);
    assert_eq!(
        direct + from_backing,
        0,
        "no request was offered to the direct path"
    );
    assert!(in_place > 0);
}

/// A read miss the cache would not fill is served with one backing-device read
/// (`Cache::begin_backing_read`), counted as a miss; one it would fill, or a range it holds
/// anything of, is not. A failed read fails the request, and a cancelled one is uncounted.
#[test]
fn a_miss_the_cache_would_not_fill_is_read_from_the_backing_device() {
    let mut host = new_host(2 << 20, 16384, &small_format(1, false));
    host.write(40, data_of(1, 40, 8)).expect("write");
    assert!(
        host.cache.begin_backing_read(80, 8).is_none(),
        "a cache with room fills its misses: the normal path"
    );
    host.cache.set_mode(CacheMode::PassThrough);
    assert!(
        host.cache.begin_backing_read(40, 8).is_none(),
        "dirty data is cached there"
    );
    assert!(
        host.cache.begin_backing_read(36, 8).is_none(),
        "part of it is cached"
    );
    let counted = |s: pcache::engine::stats::ShardStats| {
        (s.direct, s.reads, s.read_miss_sectors, s.io_errors)
    };
    let (direct, reads, missed, errors) = counted(host.cache.stats().total);
    let d = host
        .cache
        .begin_backing_read(80, 8)
        .expect("pass-through fills nothing: read from the backing device");
    assert!(d.backing && !d.write);
    assert_eq!(
        d.sector, 80,
        "the backing device holds it at its own sectors"
    );
    assert_eq!(
        counted(host.cache.stats().total),
        (direct + 1, reads + 1, missed + 8, errors)
    );
    host.cache.end_direct(d, Ok(())).expect("read");
    let d = host.cache.begin_backing_read(80, 8).expect("again");
    assert!(host.cache.end_direct(d, Err(IoError::Device)).is_err());
    assert_eq!(
        counted(host.cache.stats().total),
        (direct + 2, reads + 2, missed + 16, errors + 1)
    );
    let d = host.cache.begin_backing_read(80, 8).expect("again");
    host.cache.cancel_direct(d, 8);
    assert_eq!(
        counted(host.cache.stats().total),
        (direct + 2, reads + 2, missed + 16, errors + 1),
        "a cancelled read is not counted"
    );
    host.cache.set_mode(CacheMode::WriteBack);
    assert_eq!(host.read(40, 8).expect("read"), data_of(1, 40, 8));
}

/// A direct request whose device I/O the host could not issue (SPDK had no free
/// `spdk_bdev_io`) is cancelled: nothing is counted or pinned, and the request then goes
/// the normal way and reads back what it should.
#[test]
fn a_cancelled_direct_request_leaves_no_trace() {
    let mut host = new_host(2 << 20, 16384, &small_format(1, false));
    host.write(40, data_of(1, 40, 8)).expect("write");
    let counted = |s: pcache::engine::stats::ShardStats| {
        (
            s.direct,
            s.reads,
            s.read_hit_sectors,
            s.writes,
            s.in_place_writes,
        )
    };
    let before = counted(host.cache.stats().total);
    for op in [Op::Read, Op::Write] {
        let d = host
            .cache
            .begin_direct(op, 40, 8)
            .expect("a dirty extent of this epoch: served directly");
        host.cache.cancel_direct(d, 8);
        assert_eq!(
            counted(host.cache.stats().total),
            before,
            "{op:?}: a cancelled direct request is not counted"
        );
    }
    host.write(40, data_of(2, 40, 8)).expect("rewrite");
    assert_eq!(host.read(40, 8).expect("read"), data_of(2, 40, 8));
    let mut host = reopen(host);
    assert_eq!(host.read(40, 8).expect("read"), data_of(2, 40, 8));
}
