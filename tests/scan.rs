//! Eviction keeps the hot set: a set of blocks read again and again, then a sequential read
//! of four times the cache, then the hot set again must still hit (at least 90% of its
//! hits kept). GC gives clean extents read since they were logged a second chance (they
//! move to the log head instead of leaving), and once the cache evicts, a read miss fills
//! it only on a second miss, so a scan read once does not displace data read repeatedly.

mod common;

use common::*;
use pcache::engine::shard::WritebackOptions;
use pcache::engine::{CacheOptions, Op, WriteAdmission};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::{Rng, Sim};

const CACHE_BYTES: u64 = 4 << 20;
/// 4 KiB blocks in the hot set (256 KiB: a sixteenth of the cache).
const HOT_BLOCKS: u64 = 64;

fn host(shards: u32, backing_sectors: u64, data_crc: bool) -> MemHost {
    SyncHost::format(
        MemDevice::new(CACHE_BYTES),
        MemDevice::new(backing_sectors * 512),
        identity(backing_sectors),
        &small_format(shards, data_crc),
        CacheOptions::default(),
    )
    .expect("format")
}

/// Reads the hot set once, in the order given; returns the sectors that hit.
fn read_hot(h: &mut MemHost, hot: &[u64], model: &[u8]) -> u64 {
    let before = h.cache.stats().total.read_hit_sectors;
    for &lba in hot {
        let got = h.read(lba, 8).expect("hot read");
        let at = lba as usize * SECTOR;
        assert!(got == model[at..at + 8 * SECTOR], "hot read {lba} wrong");
    }
    h.cache.stats().total.read_hit_sectors - before
}

fn scan_keeps_hot_set(shards: u32, data_crc: bool, seed: u64) {
    let scan_sectors = 4 * CACHE_BYTES / 512;
    // The hot set lies past the scanned range.
    let hot_base = scan_sectors;
    let backing_sectors = scan_sectors + 4096;
    let mut h = host(shards, backing_sectors, data_crc);
    // Known data on the backing device, so every read is checked.
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    for lba in (0..backing_sectors).step_by(256) {
        let d = data_of(lba + 1, lba, 256);
        let at = lba as usize * SECTOR;
        model[at..at + d.len()].copy_from_slice(&d);
    }
    h.backing_dev.bytes_mut().copy_from_slice(&model);
    let mut rng = Rng::new(seed);
    let mut hot: Vec<u64> = (0..HOT_BLOCKS).map(|b| hot_base + b * 8 * 7).collect();
    // Warm: the hot set read a few times (misses fill, then hits).
    for _ in 0..4 {
        shuffle(&mut hot, &mut rng);
        read_hot(&mut h, &hot, &model);
    }
    shuffle(&mut hot, &mut rng);
    let warm_hits = read_hot(&mut h, &hot, &model);
    assert_eq!(warm_hits, HOT_BLOCKS * 8, "the warm hot set all hits");
    // The scan: 4x the cache, sequential, 64 KiB requests, several in flight.
    let req = 128u32;
    let mut lba = 0;
    while lba < scan_sectors {
        for _ in 0..8 {
            if lba >= scan_sectors {
                break;
            }
            h.submit(Op::Read, lba, req, None).expect("scan submit");
            lba += u64::from(req);
        }
        h.run();
        for (_, r, _) in h.take_done() {
            r.expect("scan read");
        }
    }
    let st = h.cache.stats().total;
    assert!(st.gc_segments > 0, "the scan made GC reclaim segments");
    shuffle(&mut hot, &mut rng);
    let after = read_hot(&mut h, &hot, &model);
    eprintln!(
        "{shards} shard(s), crc {data_crc}: hot hits {after}/{warm_hits} sectors after the scan; \
         gc segments {}, readmits {} ({} sectors, {} dropped), fills {}, declined {}",
        st.gc_segments,
        st.readmits,
        st.readmit_sectors,
        st.readmit_dropped,
        st.fills,
        st.fill_declined
    );
    assert!(
        after * 10 >= warm_hits * 9,
        "the hot set kept {after} of its {warm_hits} hit sectors (< 90%)"
    );
    // Everything still reads right.
    let all = h.read(0, 2048).expect("read");
    assert!(all == model[..2048 * SECTOR], "data after the scan");
}

/// Bytes the flood writes between two polls: eight 4 KiB writes in flight.
const FLOOD_CHUNK_BYTES: u64 = 8 * 4096;

/// A write flood: the hot set warm in a full cache, then 4 KiB writes to random blocks
/// spread over four times the cache, each written once (a restore, a log rolling over),
/// with the hot set read again every `hot_every` chunks of writes if given: returns the
/// hot set's hit sectors after it and before it, and the writes sent around the cache.
fn write_flood(admission: WriteAdmission, hot_every: Option<usize>) -> (u64, u64, u64) {
    let flood_blocks = 4 * CACHE_BYTES / 4096;
    let hot_base = flood_blocks * 8;
    let backing_sectors = hot_base + 4096;
    let mut h = host(1, backing_sectors, false);
    h.cache.set_write_admission(admission);
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    for lba in (hot_base..backing_sectors).step_by(256) {
        let d = data_of(lba + 1, lba, 256);
        let at = lba as usize * SECTOR;
        model[at..at + d.len()].copy_from_slice(&d);
    }
    h.backing_dev.bytes_mut().copy_from_slice(&model);
    let mut rng = Rng::new(9);
    let mut hot: Vec<u64> = (0..HOT_BLOCKS).map(|b| hot_base + b * 8 * 7).collect();
    // Warm, as a cache in service is: the hot set read before each half cache's worth of
    // random reads of other blocks (four times the cache in all), so the cache is full and
    // evicts.
    let mut others: Vec<u64> = (0..flood_blocks).collect();
    shuffle(&mut others, &mut rng);
    for part in others.chunks(others.len() / 8) {
        shuffle(&mut hot, &mut rng);
        read_hot(&mut h, &hot, &model);
        for &b in part {
            h.read(b * 8, 8).expect("warm read");
        }
    }
    shuffle(&mut hot, &mut rng);
    let warm = read_hot(&mut h, &hot, &model);
    assert!(
        warm * 10 >= HOT_BLOCKS * 8 * 9,
        "the hot set is warm: {warm}"
    );
    let mut blocks: Vec<u64> = (0..flood_blocks).collect();
    shuffle(&mut blocks, &mut rng);
    let per_chunk = (FLOOD_CHUNK_BYTES / 4096) as usize;
    for (i, chunk) in blocks.chunks(per_chunk).enumerate() {
        if hot_every.is_some_and(|n| i > 0 && i % n == 0) {
            shuffle(&mut hot, &mut rng);
            read_hot(&mut h, &hot, &model);
        }
        for &b in chunk {
            let d = data_of(b + 7, b * 8, 8);
            let at = (b * 8) as usize * SECTOR;
            model[at..at + d.len()].copy_from_slice(&d);
            h.submit(Op::Write, b * 8, 8, Some(d))
                .expect("flood submit");
        }
        h.run();
        for (_, r, _) in h.take_done() {
            r.expect("flood write");
        }
    }
    shuffle(&mut hot, &mut rng);
    let after = read_hot(&mut h, &hot, &model);
    // Every block reads what was written last, cached or sent around.
    let all = h.read(0, (hot_base + 4096) as u32).expect("read");
    assert!(all == model, "data after the flood ({admission})");
    let st = h.cache.stats().total;
    eprintln!(
        "write flood, {admission}, hot set read every {hot_every:?} chunks: hot hits {after}/{warm} sectors; gc segments {}, readmits {}, \
         writes sent around {}, full waits {}, readmit dropped {}",
        st.gc_segments, st.readmits, st.write_declined, st.cache_full_waits, st.readmit_dropped
    );
    (after, warm, st.write_declined)
}

/// With `second_touch`, a flood of writes to blocks written once (four times the cache)
/// goes around a full cache: a hot set not read during it keeps at least 90 % of its hits,
/// and every block reads back its last write. With `always` the flood passes through the
/// log four times, more than the heat of a set not read meanwhile lasts (as in an LRU,
/// which would drop it after one pass): printed, not asserted.
#[test]
fn second_touch_keeps_the_hot_set_through_a_write_flood() {
    let (always, _, _) = write_flood(WriteAdmission::Always, None);
    let (second, warm, declined) = write_flood(WriteAdmission::SecondTouch, None);
    assert!(declined > 0, "no write went around the cache");
    assert!(
        second * 10 >= warm * 9,
        "second_touch: the hot set kept {second} of its {warm} hit sectors (< 90 %; always: {always})"
    );
}

/// With `always`, a hot set still read during the flood (once per half a cache of
/// writes) keeps at least 90 % of its hits: each read renews its heat, so GC moves it to
/// the log head instead of dropping it.
#[test]
fn a_hot_set_read_during_a_write_flood_keeps_its_hits() {
    let half_cache_chunks = (CACHE_BYTES / 2 / FLOOD_CHUNK_BYTES) as usize;
    let (after, warm, _) = write_flood(WriteAdmission::Always, Some(half_cache_chunks));
    assert!(
        after * 10 >= warm * 9,
        "always: the hot set read during the flood kept {after} of its {warm} hit sectors (< 90 %)"
    );
}

fn shuffle(v: &mut [u64], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[test]
fn a_sequential_scan_of_four_times_the_cache_keeps_the_hot_set() {
    scan_keeps_hot_set(1, false, 1);
}

#[test]
fn the_hot_set_survives_a_scan_with_several_shards_and_data_crcs() {
    scan_keeps_hot_set(2, false, 2);
    scan_keeps_hot_set(3, true, 3);
}

/// Hot clean data read through the host's direct path (as the SPDK shell serves a read
/// hit) also survives: the hit sets the access bit in the index hint it was found in.
#[test]
fn direct_read_hits_mark_data_hot_too() {
    let scan_sectors = 4 * CACHE_BYTES / 512;
    let backing_sectors = scan_sectors + 4096;
    let opts = CacheOptions {
        writeback: WritebackOptions::default(),
        ..CacheOptions::default()
    };
    let host = SyncHost::format(
        MemDevice::new(CACHE_BYTES),
        MemDevice::new(backing_sectors * 512),
        identity(backing_sectors),
        &small_format(1, false),
        opts,
    )
    .expect("format");
    let (cache, cdev, bdev) = host.into_parts();
    let mut sim = Sim::with_parts(cache, cdev, bdev, 5, 1);
    sim.direct_percent = 100;
    let hot: Vec<u64> = (0..HOT_BLOCKS).map(|b| scan_sectors + b * 8).collect();
    let read = |sim: &mut Sim, lba: u64, len: u32| {
        sim.submit(Op::Read, lba, len, None).expect("submit");
        sim.run();
        for (_, r, _) in sim.take_done() {
            r.expect("read");
        }
    };
    for _ in 0..3 {
        for &l in &hot {
            read(&mut sim, l, 8);
        }
    }
    let direct = sim.parts().map(|c| c.stats().total.direct).sum::<u64>();
    assert!(direct > 0, "the simulator served hits directly");
    let mut lba = 0;
    while lba < scan_sectors {
        read(&mut sim, lba, 128);
        lba += 128;
    }
    let hits = |sim: &Sim| {
        sim.parts()
            .map(|c| c.stats().total.read_hit_sectors)
            .sum::<u64>()
    };
    let before = hits(&sim);
    for &l in &hot {
        read(&mut sim, l, 8);
    }
    let kept = hits(&sim) - before;
    for c in sim.parts() {
        let st = c.stats().total;
        eprintln!(
            "direct: kept {kept}; gc segments {}, readmits {} ({} dropped), fills {}, declined {}, direct {}",
            st.gc_segments, st.readmits, st.readmit_dropped, st.fills, st.fill_declined, st.direct
        );
    }
    assert!(
        kept * 10 >= HOT_BLOCKS * 8 * 9,
        "direct hits kept {kept} of {} sectors",
        HOT_BLOCKS * 8
    );
}
