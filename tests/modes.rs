//! Cache modes, the sequential cut-off and writes around a full cache, one path at a time:
//! what goes where, what is counted, and what survives a reopen.

mod common;

use common::*;
use pcache::engine::{CacheMode, CacheOptions, Command, Op, SeqCutoff, SeqPolicy};
use pcache::media::host::SyncHost;
use pcache::media::BlockDevice;

const BACKING_SECTORS: u64 = 4096;
const CACHE_BYTES: u64 = 8 << 20;

fn host() -> MemHost {
    new_host(CACHE_BYTES, BACKING_SECTORS, &small_format(2, false))
}

fn set_mode(h: &mut MemHost, m: CacheMode) {
    h.cache.set_mode(m);
    h.run();
}

fn backing_holds(h: MemHost, lba: u64, want: &[u8]) -> MemHost {
    let backing = h.cache.superblock().backing.clone();
    let (mut c, mut b) = h.into_devices();
    let mut got = vec![0u8; want.len()];
    b.read(lba, &mut got).expect("backing read");
    assert!(got == want, "backing device at lba {lba}");
    c.flush().expect("flush");
    SyncHost::open(c, b, backing, CacheOptions::default())
        .expect("reopen")
        .0
}

fn drain(h: &mut MemHost) {
    h.cache.set_drain(true);
    h.run();
    h.cache.set_drain(false);
    assert!(h.cache.is_clean());
}

/// Write-around: the write goes to the backing device, the clean cached copy is dropped
/// (durably: an invalidation key, so a reopen cannot bring it back), and a read miss fills
/// the cache again.
#[test]
fn write_around_drops_the_cached_copy_durably() {
    let mut h = host();
    h.write(100, data_of(1, 100, 8)).unwrap();
    drain(&mut h); // now a clean cached copy
    set_mode(&mut h, CacheMode::WriteAround);
    h.write(100, data_of(2, 100, 8)).unwrap();
    let t = h.cache.stats().total;
    assert_eq!((t.around_writes, t.invalidations), (1, 1), "{t:?}");
    assert_eq!(h.read(100, 8).unwrap(), data_of(2, 100, 8));
    h = backing_holds(h, 100, &data_of(2, 100, 8));
    assert_eq!(h.cache.mode(), CacheMode::WriteAround, "persisted");
    assert_eq!(h.read(100, 8).unwrap(), data_of(2, 100, 8), "after reopen");
    // A write where nothing is cached needs no invalidation; a read miss fills again.
    h.write(600, data_of(3, 600, 8)).unwrap();
    assert_eq!(h.cache.stats().total.invalidations, 0);
    assert_eq!(h.read(600, 8).unwrap(), data_of(3, 600, 8));
    assert_eq!(h.cache.stats().total.fills, 1);
}

/// A write over dirty data is logged instead (nothing older may overtake it on the
/// backing device), and written back.
#[test]
fn write_around_over_dirty_data_is_logged() {
    let mut h = host();
    // Still queued (dirty to be) when the write-around write arrives.
    h.submit(Op::Write, 100, 16, Some(data_of(1, 100, 16)))
        .unwrap();
    h.cache.set_mode(CacheMode::WriteAround);
    h.submit(Op::Write, 104, 4, Some(data_of(2, 104, 4)))
        .unwrap();
    h.run();
    for (_, r, _) in h.take_done() {
        r.unwrap();
    }
    let t = h.cache.stats().total;
    assert_eq!((t.around_writes, t.around_logged), (0, 1), "{t:?}");
    let mut want = data_of(1, 100, 16);
    want[4 * 512..8 * 512].copy_from_slice(&data_of(2, 104, 4));
    assert_eq!(h.read(100, 16).unwrap(), want);
    // Outside write-back, dirty data is written back without being asked.
    h.run();
    assert!(h.cache.is_clean(), "written back");
    backing_holds(h, 100, &want);
}

/// Write-through: the backing device has the data when the write completes, the cache
/// holds it clean, and writeback has nothing to copy.
#[test]
fn write_through_completes_on_the_backing_device_and_caches_clean() {
    let mut h = host();
    set_mode(&mut h, CacheMode::WriteThrough);
    h.write(200, data_of(1, 200, 8)).unwrap();
    let s = h.cache.stats();
    assert_eq!(s.total.through_writes, 1, "{:?}", s.total);
    assert_eq!((s.dirty_bytes, s.clean_bytes), (0, 8 * 512));
    h = backing_holds(h, 200, &data_of(1, 200, 8));
    assert_eq!(h.read(200, 8).unwrap(), data_of(1, 200, 8));
    h.run();
    assert_eq!(h.cache.stats().total.wb_sectors, 0, "nothing copied twice");
    // FUA: a backing flush before it completes; a FLUSH request after plain writes
    // flushes the backing device too.
    let id = h
        .submit(Op::WriteFua, 300, 8, Some(data_of(2, 300, 8)))
        .unwrap();
    h.run();
    assert!(h.take_done().iter().any(|d| d.0 == id && d.1.is_ok()));
    assert_eq!(h.cache.stats().total.request_flushes, 1);
    h.write(400, data_of(3, 400, 8)).unwrap();
    h.flush().unwrap();
    assert_eq!(h.cache.stats().total.request_flushes, 2);
    h.flush().unwrap();
    assert_eq!(
        h.cache.stats().total.request_flushes,
        2,
        "nothing new to flush"
    );
}

/// Pass-through: dirty data stays readable from the cache until written back; clean
/// data and misses are read from the backing device and nothing is filled.
#[test]
fn pass_through_caches_nothing_new() {
    let mut h = host();
    h.write(100, data_of(1, 100, 8)).unwrap();
    h.write(500, data_of(2, 500, 8)).unwrap();
    drain(&mut h);
    h.write(100, data_of(3, 100, 8)).unwrap(); // dirty again
    set_mode(&mut h, CacheMode::PassThrough);
    let hits = h.cache.stats().total.read_hit_sectors;
    assert_eq!(h.read(500, 8).unwrap(), data_of(2, 500, 8));
    assert_eq!(h.read(900, 8).unwrap(), vec![0; 8 * 512]);
    let t = h.cache.stats().total;
    assert_eq!((t.read_hit_sectors - hits, t.fills), (0, 0), "{t:?}");
    h.write(900, data_of(4, 900, 8)).unwrap();
    assert_eq!(h.cache.stats().total.around_writes, 1);
    assert_eq!(h.read(100, 8).unwrap(), data_of(3, 100, 8));
    assert_eq!(h.read(900, 8).unwrap(), data_of(4, 900, 8));
    h.run();
    assert!(h.cache.is_clean());
    backing_holds(h, 100, &data_of(3, 100, 8));
}

/// The sequential cut-off: past the threshold, a stream's writes go around the cache
/// (in write-back, durably: a backing flush before they complete) and its read misses are
/// not filled. Each shard counts the part of the stream it serves (2 shards, 16 KiB
/// stripes: 8 of the 16 writes of 4 KiB are past 16 KiB in their shard).
#[test]
fn sequential_cut_off_bypasses_streams() {
    let mut h = host();
    h.cache
        .set_seq_cutoff(SeqCutoff {
            policy: SeqPolicy::Always,
            bytes: 16 << 10,
        })
        .unwrap();
    for i in 0..16u64 {
        let lba = 1024 + i * 8;
        h.write(lba, data_of(10 + i, lba, 8)).unwrap();
    }
    let t = h.cache.stats().total;
    assert_eq!(t.seq_bypass_requests, 8, "{t:?}");
    assert_eq!(t.seq_bypass_sectors, 8 * 8);
    assert!(t.request_flushes >= 1, "durable in write-back mode");
    for i in 0..16u64 {
        let lba = 1024 + i * 8;
        assert_eq!(h.read(lba, 8).unwrap(), data_of(10 + i, lba, 8));
    }
    // Reading a stream of misses fills only its first 16 KiB in each shard.
    let fills = h.cache.stats().total.fills;
    for i in 0..16u64 {
        h.read(3008 + i * 8, 8).unwrap();
    }
    assert_eq!(h.cache.stats().total.fills - fills, 8);
    h = reopen(h);
    assert_eq!(h.cache.seq_cutoff().policy, SeqPolicy::Always, "persisted");
    for i in 0..16u64 {
        let lba = 1024 + i * 8;
        assert_eq!(h.read(lba, 8).unwrap(), data_of(10 + i, lba, 8));
    }
}

/// A full cache whose writeback cannot free space (its copies fail) sends writes to the
/// backing device instead of making them wait; everything reads back, before and after a
/// reopen.
#[test]
fn a_full_cache_sends_writes_around() {
    let mut sim = eager_writeback_sim(1 << 20, BACKING_SECTORS, 1, 9, 1);
    sim.set_fault(Box::new(|_, c| matches!(c, Command::Copy { .. })));
    let mut model = vec![0u8; BACKING_SECTORS as usize * 512];
    // Each 8 KiB chunk written once, in a shuffled order: none overlaps dirty data.
    let mut rng = pcache::media::sim::Rng::new(5);
    let mut chunks: Vec<u64> = (0..BACKING_SECTORS / 16).collect();
    for i in (1..chunks.len()).rev() {
        chunks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (n, batch) in chunks.chunks(8).enumerate() {
        for (k, &c) in batch.iter().enumerate() {
            let lba = c * 16;
            let d = data_of((n * 8 + k) as u64 + 1, lba, 16);
            model[lba as usize * 512..][..d.len()].copy_from_slice(&d);
            sim.submit(Op::Write, lba, 16, Some(d)).unwrap();
        }
        sim.run();
        for (_, r, _) in sim.take_done() {
            r.unwrap();
        }
    }
    let t = sim.cache.stats().total;
    assert!(t.cache_full_waits > 0, "{t:?}");
    assert!(t.full_around_requests > 0, "{t:?}");
    assert_eq!(t.timed_out, 0);
    let id = sim
        .submit(Op::Read, 0, BACKING_SECTORS as u32, None)
        .unwrap();
    sim.run();
    let done = sim.take_done();
    let got = &done.iter().find(|d| d.0 == id).unwrap().2;
    assert!(*got == model);
    sim.clear_fault();
    let (c, b) = sim.crash();
    let (mut h, _) =
        SyncHost::open(c, b, identity(BACKING_SECTORS), CacheOptions::default()).unwrap();
    assert!(h.read(0, BACKING_SECTORS as u32).unwrap() == model);
}

/// A write-through write whose backing flush failed is durable in the cache only: its key
/// may be passed by the dirty tail only after a backing flush that succeeded, even in a
/// writeback group that has nothing to copy. Whatever a crash then drops of the backing
/// device's unflushed writes, a reopen and a drain leave the write there.
#[test]
fn a_written_through_write_whose_flush_failed_reaches_the_backing_device_after_a_crash() {
    use pcache::engine::Dev;
    use pcache::media::sim::Sim;

    for seed in 0..24 {
        let mut h = new_host(CACHE_BYTES, BACKING_SECTORS, &small_format(1, false));
        set_mode(&mut h, CacheMode::WriteThrough);
        let (cache, c, b) = h.into_parts();
        let mut sim = Sim::new(cache, c, b, seed);
        // The first flush of the backing device fails: the FUA write's own.
        let mut failed = false;
        sim.set_fault(Box::new(move |_, cmd| {
            let flush = matches!(
                cmd,
                Command::Flush {
                    dev: Dev::Backing,
                    ..
                }
            );
            let fail = flush && !failed;
            failed |= flush;
            fail
        }));
        let d = data_of(1, 64, 8);
        sim.submit(Op::WriteFua, 64, 8, Some(d.clone()))
            .expect("submit");
        sim.settle(10_000);
        for (_, r, _) in sim.take_done() {
            r.expect("durable in the cache");
        }
        assert!(
            sim.cache.is_clean(),
            "seed {seed}: writeback did not pass the key"
        );
        let (ci, bi) = sim.crash();
        let mut h = SyncHost::open(ci, bi, identity(BACKING_SECTORS), CacheOptions::default())
            .expect("reopen")
            .0;
        drain(&mut h);
        let mut got = vec![0u8; d.len()];
        h.backing_dev.read(64, &mut got).expect("backing read");
        assert!(got == d, "seed {seed}: the backing device lost the write");
    }
}

/// A write sent around the cache whose invalidation is given up (it waited for the I/O
/// timeout behind a kset the cache device kept failing) fails, and the log may still hold
/// the clean copy it was to drop. A later write sent around the same range must then log an
/// invalidation of its own: without one, a crash after it lands replays the stale copy over
/// it (found by `tests/crash.rs`, seed 6308835).
#[test]
fn a_write_around_after_a_given_up_invalidation_survives_a_crash() {
    use pcache::engine::{Dev, ReqError};
    use pcache::media::sim::Sim;

    let mut h = host();
    h.write(100, data_of(1, 100, 8)).unwrap();
    drain(&mut h); // a clean cached copy, its key in the log
    h.write(3000, data_of(1, 3000, 8)).unwrap(); // dirty
    let mut o = h.cache.writeback_options();
    o.io_timeout_ms = 500;
    (o.high_pct, o.low_pct) = (100, 100); // no writeback: 3000 stays dirty
    h.cache.set_writeback_options(o).unwrap();
    set_mode(&mut h, CacheMode::WriteAround);
    let (cache, c, b) = h.into_parts();
    let mut sim = Sim::new(cache, c, b, 7);
    // The cache device fails everything for 600 ms. A write over dirty data is logged: its
    // data write is given up after half the I/O timeout, then its batch's kset is retried
    // until the device is back, within the timeout of the kset's first failure (the log
    // stays open).
    sim.add_outage(Dev::Cache, 0, 600);
    sim.step_ms = 1;
    sim.submit(Op::Write, 3000, 8, Some(data_of(2, 3000, 8)))
        .expect("submit");
    for _ in 0..3 {
        sim.step();
    }
    // Meanwhile a write over the clean copy goes around the cache; its invalidation waits
    // behind that batch past the I/O timeout and is given up.
    sim.submit(Op::Write, 100, 8, Some(data_of(2, 100, 8)))
        .expect("submit");
    sim.settle(1_500);
    let done = sim.take_done();
    assert_eq!(done.len(), 2);
    for (_, r, _) in done {
        assert_eq!(r, Err(ReqError::TimedOut), "the first two writes");
    }
    // The device is back: the next write sent around lands and is acknowledged.
    let d = data_of(3, 100, 8);
    sim.submit(Op::Write, 100, 8, Some(d.clone()))
        .expect("submit");
    sim.settle(1_000);
    let done = sim.take_done();
    assert_eq!(done.len(), 1);
    done[0].1.clone().expect("the third write");
    sim.submit(Op::Flush, 0, 0, None).expect("flush");
    sim.settle(1_000);
    for (_, r, _) in sim.take_done() {
        r.expect("flush");
    }
    let (ci, bi) = sim.crash();
    let mut h = SyncHost::open(ci, bi, identity(BACKING_SECTORS), CacheOptions::default())
        .expect("reopen")
        .0;
    let got = h.read(100, 8).unwrap();
    assert!(got == d, "after the crash: the stale cached copy came back");
}
