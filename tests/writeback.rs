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
        let batch = random_write_batch(&mut rng, 16, 16, backing_sectors, &mut id, &mut model);
        done += batch.len() as u64;
        for (lba, len, d) in batch {
            h.submit(Op::Write, lba, len, Some(d)).expect("submit");
        }
        h.run();
        for (_, r, _) in h.take_done() {
            r.expect("write completes");
        }
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

#[test]
fn a_failing_backing_device_keeps_data_in_the_cache_and_writeback_resumes_by_itself() {
    use pcache::engine::Dev;
    use pcache::media::sim::Sim;

    let backing_sectors = 2048;
    let h = host(1 << 20, backing_sectors, 1, true);
    let (cache, c, b) = h.into_parts();
    let mut sim = Sim::new(cache, c, b, 5);
    // The backing device fails every I/O for the first 40 s.
    sim.add_outage(Dev::Backing, 0, 40_000);
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    for i in 0..40u64 {
        let lba = (i * 37) % (backing_sectors - 8);
        let d = data_of(i + 1, lba, 8);
        model[lba as usize * SECTOR..(lba as usize + 8) * SECTOR].copy_from_slice(&d);
        sim.submit(Op::Write, lba, 8, Some(d)).unwrap();
        sim.run();
    }
    sim.cache.set_drain(true);
    // Past the 30 s I/O timeout in simulated time: writeback is then "failing".
    sim.settle(40_000);
    for (_, r, _) in sim.take_done() {
        r.expect("writes succeed while the backing device fails");
    }
    let st = sim.cache.stats();
    assert_eq!(
        st.writeback, "failing",
        "failing for longer than the I/O timeout? {st:?}"
    );
    assert!(st.total.wb_errors > 1, "retried with backoff");
    assert_eq!(
        st.total.wb_cache_read_errors + st.total.wb_backing_flush_errors,
        0
    );
    assert!(
        st.total.wb_backing_write_errors > 0,
        "the failure is named for what failed"
    );
    let log = sim.cache.take_log();
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("writeback failed"))
            .count(),
        1,
        "logged once per burst: {log:?}"
    );
    assert!(!sim.cache.is_clean(), "dirty data stays in the cache");
    let r = sim
        .submit(Op::Read, 0, backing_sectors as u32, None)
        .unwrap();
    sim.run();
    let got = sim.take_done().into_iter().find(|d| d.0 == r).unwrap();
    assert!(
        got.2 == model,
        "every acknowledged write reads back while writeback fails"
    );
    // The device heals: writeback resumes at its next retry, with no call, and drains.
    sim.advance_to(40_000);
    sim.settle(5_000);
    assert!(sim.cache.is_clean());
    assert_eq!(sim.cache.stats().writeback, "ok");
    assert!(sim
        .cache
        .take_log()
        .iter()
        .any(|l| l.contains("writeback resumed")));
    let (_, backing) = sim.crash();
    assert!(
        backing.bytes() == &model[..],
        "backing holds every write after it healed"
    );
}

#[test]
fn overwrites_within_an_epoch_are_absorbed() {
    let mut h = host(4 << 20, 4096, 1, false);
    for i in 0..50u64 {
        // The same 8 sectors, rewritten with different lengths so each gets a new key.
        let len = 8 + (i % 2) as u32;
        h.write(100, data_of(i + 1, 100, len)).unwrap();
    }
    h.cache.set_drain(true);
    h.run();
    let st = h.cache.stats().total;
    assert!(h.cache.is_clean());
    assert!(
        st.wb_sectors * 10 < st.wb_group_sectors,
        "written back {} of {} logged sectors",
        st.wb_sectors,
        st.wb_group_sectors
    );
    assert_eq!(
        h.backing_dev.bytes()[100 * SECTOR..109 * SECTOR],
        data_of(50, 100, 9)[..]
    );
}

#[test]
fn a_new_gc_percent_is_persisted_and_survives_reopen() {
    let mut h = host(2 << 20, 4096, 2, false);
    let mut o = h.cache.writeback_options();
    assert_eq!(o.gc_percent, 70);
    o.gc_percent = 40;
    h.cache.set_writeback_options(o).unwrap();
    h.run();
    let h = reopen(h);
    assert_eq!(h.cache.writeback_options().gc_percent, 40);
    assert_eq!(h.cache.stats().gc_percent, 40);
    let mut bad = o;
    bad.gc_percent = 95;
    let mut h = h;
    assert!(h.cache.set_writeback_options(bad).is_err());
}

/// Two discards of one block in one flush epoch with a write between them: while
/// writeback passes the three keys one group at a time, every read of the block returns
/// zeros. Writing back the first discard must not forget the second, or the write, copied
/// to the backing device by the next group, is read back in its place.
#[test]
fn a_discard_written_back_leaves_a_newer_one_of_its_epoch_in_place() {
    use pcache::media::sim::Sim;

    let mut h = SyncHost::format(
        MemDevice::new(4 << 20),
        MemDevice::new(4096 * 512),
        identity(4096),
        &small_format(1, false),
        CacheOptions {
            writeback: WritebackOptions {
                group_ksets: 1,
                high_pct: 100,
                low_pct: 100,
                ..WritebackOptions::default()
            },
            ..CacheOptions::default()
        },
    )
    .expect("format");
    h.unmap(8, 8).expect("unmap");
    h.write(8, data_of(1, 8, 8)).expect("write");
    h.unmap(8, 8).expect("unmap");
    assert!(
        !h.cache.is_clean(),
        "nothing may be written back before the drain"
    );
    let (cache, c, b) = h.into_parts();
    let mut sim = Sim::new(cache, c, b, 3);
    // Pass-through: a read that misses fills nothing, so each read asks the index.
    sim.cache.set_mode(pcache::engine::CacheMode::PassThrough);
    sim.cache.set_drain(true);
    let mut reads = 0;
    while !sim.cache.is_clean() && reads < 10_000 {
        sim.submit(Op::Read, 8, 8, None).expect("read");
        reads += 1;
        sim.step();
    }
    sim.run();
    for (_, r, buf) in sim.take_done() {
        r.expect("read");
        assert!(
            buf.iter().all(|&x| x == 0),
            "a read returned the overwritten write"
        );
    }
    assert!(sim.cache.is_clean() && reads > 3);
}
