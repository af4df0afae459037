//! Faults that heal and faults that last: transient errors are retried with backoff and
//! service resumes by itself; a request that cannot make progress fails after the I/O
//! timeout instead of waiting forever; corruption found by writeback is never written
//! back or served. Time is the simulator's (see `pcache::media::sim`).

mod common;

use common::*;
use pcache::engine::shard::WritebackOptions;
use pcache::engine::{CacheOptions, Command, Dev, Op, ReqError, ReqId, ReqResult};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::{Rng, Sim};
use std::collections::HashMap;

const BACKING_SECTORS: u64 = 8192;
const TIMEOUT_MS: u64 = 5_000;

/// A 1 MiB cache (a quarter of the backing device's 4 MiB) writing back from 30% dirty.
fn sim(data_crc: bool, seed: u64) -> Sim {
    sim_with_timeout(data_crc, seed, TIMEOUT_MS)
}

fn sim_with_timeout(data_crc: bool, seed: u64, io_timeout_ms: u64) -> Sim {
    let opts = CacheOptions {
        writeback: WritebackOptions {
            high_pct: 30,
            low_pct: 10,
            io_timeout_ms,
            ..WritebackOptions::default()
        },
        ..CacheOptions::default()
    };
    let host = SyncHost::format(
        MemDevice::new(1 << 20),
        MemDevice::new(BACKING_SECTORS * 512),
        identity(BACKING_SECTORS),
        &small_format(2, data_crc),
        opts,
    )
    .expect("format");
    let (cache, c, b) = host.into_parts();
    let mut s = Sim::new(cache, c, b, seed);
    s.step_ms = 1;
    s
}

/// Writes 4 KiB blocks at random over the whole backing device, QD 8, keeping a model of
/// what each acknowledged write left; returns every completion.
fn write_load(
    sim: &mut Sim,
    model: &mut [u8],
    rng: &mut Rng,
    ops: u64,
    first_id: u64,
) -> Vec<(ReqId, ReqResult)> {
    let mut out = Vec::new();
    let mut inflight: HashMap<ReqId, (u64, Vec<u8>)> = HashMap::new();
    let mut n = 0;
    while n < ops || !inflight.is_empty() {
        while inflight.len() < 8 && n < ops {
            let lba = rng.below(BACKING_SECTORS / 8) * 8;
            let d = data_of(first_id + n, lba, 8);
            n += 1;
            let id = sim.submit(Op::Write, lba, 8, Some(d.clone())).unwrap();
            inflight.insert(id, (lba, d));
        }
        if !sim.step() {
            // Only time moves things on: retries, timeouts.
            match sim.next_deadline() {
                Some(t) => sim.advance_to(t.max(sim.now + 1)),
                None => assert!(sim.take_done_peek() > 0, "requests wait with nothing due"),
            }
        }
        for (id, r, _) in sim.take_done() {
            if let Some((lba, d)) = inflight.remove(&id) {
                if r.is_ok() {
                    let at = lba as usize * SECTOR;
                    model[at..at + d.len()].copy_from_slice(&d);
                }
                out.push((id, r));
            }
        }
    }
    out
}

fn read_all(sim: &mut Sim) -> Vec<ReqResult> {
    (0..BACKING_SECTORS / 8)
        .map(|b| {
            let id = sim.submit(Op::Read, b * 8, 8, None).unwrap();
            sim.run();
            sim.take_done()
                .into_iter()
                .find(|d| d.0 == id)
                .map_or(Err(ReqError::Invalid("lost")), |d| d.1)
        })
        .collect()
}

fn read_image(sim: &mut Sim) -> Vec<Option<Vec<u8>>> {
    (0..BACKING_SECTORS / 8)
        .map(|b| {
            let id = sim.submit(Op::Read, b * 8, 8, None).unwrap();
            sim.run();
            sim.take_done()
                .into_iter()
                .find(|d| d.0 == id)
                .and_then(|d| d.1.ok().map(|()| d.2))
        })
        .collect()
}

#[test]
fn a_backing_outage_longer_than_the_timeout_fails_writes_in_bounded_time_then_heals() {
    let mut sim = sim(false, 1);
    let mut rng = Rng::new(7);
    let mut model = vec![0u8; BACKING_SECTORS as usize * SECTOR];
    // The backing device is out for long: the cache fills, then writes time out.
    sim.add_outage(Dev::Backing, 0, 1_000_000);
    let start = sim.now;
    let done = write_load(&mut sim, &mut model, &mut rng, 400, 1);
    let failed = done.iter().filter(|d| d.1.is_err()).count();
    let timed_out = done
        .iter()
        .filter(|d| d.1 == Err(ReqError::TimedOut))
        .count();
    let st = sim.cache.stats();
    println!(
        "backing outage: {} writes, {} failed ({} timed out) in {} ms simulated; \
         writeback {} ({} backing write errors)",
        done.len(),
        failed,
        timed_out,
        sim.now - start,
        st.writeback,
        st.total.wb_backing_write_errors
    );
    assert!(
        timed_out > 0 && failed == timed_out,
        "full cache: writes time out"
    );
    assert!(
        done.len() - failed > 100,
        "writes went on while space lasted"
    );
    assert_eq!(st.writeback, "failing");
    assert!(st.total.wb_backing_write_errors > 0);
    // Cached data keeps reading right during the outage (misses fail: the device is out).
    let got = read_image(&mut sim);
    for (b, g) in got.iter().enumerate() {
        if let Some(g) = g {
            let at = b * 8 * SECTOR;
            assert!(
                g[..] == model[at..at + 8 * SECTOR],
                "block {b} read back wrong"
            );
        }
    }
    // It heals by itself: writes flow again, writeback drains, state returns to ok.
    sim.advance_to(1_000_000);
    let done = write_load(&mut sim, &mut model, &mut rng, 500, 100_000);
    assert!(
        done.iter().all(|d| d.1.is_ok()),
        "writes flow after recovery"
    );
    sim.cache.set_drain(true);
    sim.settle(60_000);
    assert!(sim.cache.is_clean());
    assert_eq!(sim.cache.stats().writeback, "ok");
    let (_, backing) = sim.crash();
    assert!(
        backing.bytes() == &model[..],
        "backing holds every acknowledged write"
    );
}

#[test]
fn short_bursts_on_either_device_lose_nothing_and_need_no_operator() {
    for seed in 0..20u64 {
        // The default 30 s timeout: a write retried through several bursts succeeds.
        let mut sim = sim_with_timeout(seed % 2 == 0, seed, 30_000);
        let mut rng = Rng::new(seed);
        let mut model = vec![0u8; BACKING_SECTORS as usize * SECTOR];
        for i in 0..6 {
            let dev = if rng.chance(50) {
                Dev::Cache
            } else {
                Dev::Backing
            };
            let from = i * 400 + rng.below(300);
            sim.add_outage(dev, from, from + 20 + rng.below(200));
        }
        let done = write_load(&mut sim, &mut model, &mut rng, 1500, 1);
        // A write whose data or kset hit the burst is retried; none may time out.
        assert!(
            done.iter().all(|d| d.1.is_ok()),
            "seed {seed}: {:?}",
            done.iter().find(|d| d.1.is_err())
        );
        sim.cache.set_drain(true);
        sim.settle(60_000);
        assert!(
            sim.cache.is_clean(),
            "seed {seed}: drained without an operator"
        );
        let st = sim.cache.stats();
        assert!(
            st.total.wb_errors + st.total.cache_write_errors > 0,
            "seed {seed}: faults hit"
        );
        let got = read_all(&mut sim);
        assert!(got.iter().all(Result::is_ok), "seed {seed}");
        let (_, backing) = sim.crash();
        assert!(
            backing.bytes() == &model[..],
            "seed {seed}: backing differs"
        );
    }
}

#[test]
fn writeback_names_the_device_and_operation_that_failed() {
    let mut sim = sim(false, 3);
    for i in 0..20u64 {
        sim.submit(Op::Write, i * 8, 8, Some(data_of(i + 1, i * 8, 8)))
            .unwrap();
    }
    sim.run();
    // The cache device fails (its reads too) while writeback starts.
    sim.add_outage(Dev::Cache, sim.now, sim.now + 50);
    sim.cache.set_drain(true);
    sim.settle(10_000);
    let st = sim.cache.stats().total;
    assert!(st.wb_cache_read_errors > 0, "{st:?}");
    assert_eq!(st.wb_backing_write_errors, 0, "{st:?}");
    let log = sim.cache.take_log().join("\n");
    assert!(log.contains("writeback failed: cache read"), "{log}");
    assert!(!log.contains("backing write"), "{log}");
    assert!(sim.cache.is_clean());
    // Now the backing device.
    sim.cache.set_drain(false);
    for i in 0..20u64 {
        sim.submit(Op::Write, i * 8, 8, Some(data_of(i + 50, i * 8, 8)))
            .unwrap();
    }
    sim.run();
    sim.add_outage(Dev::Backing, sim.now, sim.now + 50);
    sim.cache.set_drain(true);
    sim.settle(10_000);
    let st = sim.cache.stats().total;
    assert!(
        st.wb_backing_write_errors + st.wb_backing_flush_errors > 0,
        "{st:?}"
    );
    let log = sim.cache.take_log().join("\n");
    assert!(log.contains("writeback failed: backing"), "{log}");
    assert!(sim.cache.is_clean());
}

#[test]
fn a_cache_device_that_fails_every_write_closes_the_log_and_keeps_serving_reads() {
    let mut sim = sim(false, 4);
    let mut rng = Rng::new(4);
    let mut model = vec![0u8; BACKING_SECTORS as usize * SECTOR];
    write_load(&mut sim, &mut model, &mut rng, 100, 1);
    // From now on the cache device fails every I/O (reads too) for a minute.
    sim.add_outage(Dev::Cache, sim.now, sim.now + 60_000);
    let done = write_load(&mut sim, &mut model, &mut rng, 50, 1000);
    assert!(
        done.iter().all(|d| d.1.is_err()),
        "no write is acknowledged"
    );
    let st = sim.cache.stats();
    assert!(st.log_failed, "{st:?}");
    let log = sim.cache.take_log().join("\n");
    assert!(log.contains("log is closed"), "{log}");
    // Later writes fail at once with a clear error, not after a wait.
    let t0 = sim.now;
    let id = sim.submit(Op::Write, 0, 8, Some(data_of(9, 0, 8))).unwrap();
    sim.run();
    let r = sim.take_done().into_iter().find(|d| d.0 == id).unwrap();
    assert_eq!(r.1, Err(ReqError::ShardFailed));
    assert!(sim.now - t0 < 100);
    // The device answers again: cached data reads back and is written back.
    sim.advance_to(sim.now + 60_000);
    for (b, g) in read_image(&mut sim).iter().enumerate() {
        let at = b * 8 * SECTOR;
        assert!(
            g.as_deref() == Some(&model[at..at + 8 * SECTOR]),
            "block {b}"
        );
    }
    sim.cache.set_drain(true);
    sim.settle(60_000);
    let (_, backing) = sim.crash();
    assert!(
        backing.bytes() == &model[..],
        "acknowledged writes reach the backing device"
    );
}

/// Transfers of cache reads corrupted at random: with data CRCs, no corrupted byte ever
/// reaches a request or the backing device.
#[test]
fn corrupted_cache_reads_never_reach_a_request_or_the_backing_device_with_data_crc() {
    let mut corrupted = 0;
    let mut caught = 0;
    for seed in 0..10u64 {
        let mut sim = sim(true, seed);
        let mut crng = Rng::new(seed ^ 0xBAD);
        sim.set_corrupt(Box::new(move |_, cmd| {
            let from_cache = matches!(
                cmd,
                Command::Read {
                    dev: Dev::Cache,
                    ..
                } | Command::Copy {
                    src: Dev::Cache,
                    ..
                }
            );
            from_cache && crng.chance(10)
        }));
        let mut rng = Rng::new(seed);
        let mut model = vec![0u8; BACKING_SECTORS as usize * SECTOR];
        let done = write_load(&mut sim, &mut model, &mut rng, 1500, 1);
        assert!(done.iter().all(|d| d.1.is_ok()));
        for (b, g) in read_image(&mut sim).iter().enumerate() {
            let at = b * 8 * SECTOR;
            if let Some(g) = g {
                assert!(
                    g[..] == model[at..at + 8 * SECTOR],
                    "seed {seed}: block {b} wrong"
                );
            }
        }
        sim.cache.set_drain(true);
        sim.settle(60_000);
        corrupted += sim.corrupted;
        let st = sim.cache.stats();
        caught += st.total.crc_errors + st.total.wb_crc_errors;
        let poisoned = st.poisoned.clone();
        let (_, backing) = sim.crash();
        for b in 0..(BACKING_SECTORS / 8) as usize {
            let at = b * 8 * SECTOR;
            let lba = (b * 8) as u64;
            let is_poisoned = poisoned
                .iter()
                .any(|&(l, n)| l <= lba && lba < l + u64::from(n));
            let got = &backing.bytes()[at..at + 8 * SECTOR];
            // Poisoned blocks keep the backing device's older contents (zeros or an older
            // acknowledged write): never the corrupted bytes.
            assert!(
                got == &model[at..at + 8 * SECTOR]
                    || (is_poisoned
                        && (got.iter().all(|&x| x == 0)
                            || decode_sector(&got[..SECTOR], lba).is_some())),
                "seed {seed}: backing block {b} holds data never acknowledged"
            );
        }
    }
    println!("corrupted cache reads: {corrupted}, caught by CRC: {caught}");
    assert!(corrupted > 100 && caught > 0);
}

/// Without data CRCs a corrupted transfer is not detected (what `data_crc` is for); the
/// cache still never hangs or fails a request over it.
#[test]
fn corrupted_cache_reads_without_data_crc_are_not_detected_but_nothing_hangs() {
    let mut sim = sim(false, 11);
    let mut crng = Rng::new(11);
    sim.set_corrupt(Box::new(move |_, cmd| {
        matches!(
            cmd,
            Command::Read {
                dev: Dev::Cache,
                ..
            } | Command::Copy {
                src: Dev::Cache,
                ..
            }
        ) && crng.chance(10)
    }));
    let mut rng = Rng::new(11);
    let mut model = vec![0u8; BACKING_SECTORS as usize * SECTOR];
    let done = write_load(&mut sim, &mut model, &mut rng, 1500, 1);
    assert!(done.iter().all(|d| d.1.is_ok()));
    sim.cache.set_drain(true);
    sim.settle(60_000);
    assert!(sim.cache.is_clean());
    let st = sim.cache.stats().total;
    println!(
        "without data_crc: {} corrupted reads, {} caught",
        sim.corrupted, st.crc_errors
    );
    assert!(sim.corrupted > 0 && st.crc_errors == 0 && st.wb_crc_errors == 0);
}

/// Bit rot in dirty data: writeback finds it, never writes it back, and the range reads
/// as an error (across a restart) until it is rewritten.
#[test]
fn rotten_dirty_data_is_poisoned_not_written_back_and_cleared_by_a_rewrite() {
    let mut sim = sim(true, 5);
    for i in 0..4u64 {
        sim.submit(Op::Write, i * 8, 8, Some(data_of(i + 1, i * 8, 8)))
            .unwrap();
    }
    sim.run();
    assert!(sim.take_done().iter().all(|d| d.1.is_ok()));
    let pos = sim.cache.shards()[0].index().get(8).unwrap().pos;
    sim.cache_img.bytes_mut()[pos as usize * SECTOR + 100] ^= 0x10;
    sim.cache.set_drain(true);
    sim.settle(60_000);
    let st = sim.cache.stats();
    assert_eq!(st.poisoned, vec![(8, 8)]);
    assert_eq!(st.total.poisoned_extents, 1);
    assert!(sim.cache.is_clean());
    let log = sim.cache.take_log().join("\n");
    assert!(
        log.contains("failed its CRC 3 times; not written back"),
        "{log}"
    );
    let (cache_img, backing) = sim.crash();
    assert!(
        backing.bytes()[8 * SECTOR..16 * SECTOR]
            .iter()
            .all(|&b| b == 0),
        "the backing device keeps its older contents"
    );
    assert_eq!(
        &backing.bytes()[16 * SECTOR..24 * SECTOR],
        &data_of(3, 16, 8)[..]
    );
    // Across a restart the range still reads as an error; a rewrite clears it.
    let (mut host, _) = SyncHost::open(
        cache_img,
        backing,
        identity(BACKING_SECTORS),
        CacheOptions::default(),
    )
    .unwrap();
    assert_eq!(host.read(8, 8), Err(ReqError::Corrupt));
    assert_eq!(host.read(0, 8).unwrap(), data_of(1, 0, 8));
    host.write(8, data_of(7, 8, 8)).unwrap();
    assert_eq!(host.read(8, 8).unwrap(), data_of(7, 8, 8));
    let host = reopen(host);
    let mut host = host;
    assert_eq!(host.read(8, 8).unwrap(), data_of(7, 8, 8));
    assert!(host.cache.stats().poisoned.is_empty());
}
