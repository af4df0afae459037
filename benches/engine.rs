//! Engine microbenchmarks (criterion): index insert and lookup, kset encode and decode,
//! replay, CRC32C. `cargo bench --bench engine`; compare runs to catch regressions.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pcache::engine::format::{Key, KeyKind, Kset, LogPos};
use pcache::engine::geometry::{Geometry, LayoutOptions};
use pcache::engine::index::{Extent, ExtentMap, Rescue, State};
use pcache::engine::{BackingIdentity, CacheOptions, FormatOptions};
use pcache::media::host::{open_cache, SyncHost};
use pcache::media::mem::MemDevice;
use pcache::media::sim::Rng;

fn index(c: &mut Criterion) {
    let n = 100_000u64;
    let mut map = ExtentMap::new();
    for i in 0..n {
        map.insert(i * 8, Extent::new(i * 8, 8, State::Dirty, None, 1));
    }
    let mut g = c.benchmark_group("index");
    g.throughput(Throughput::Elements(1));
    let mut rng = Rng::new(1);
    let mut pieces = Vec::new();
    g.bench_function("lookup_4k_hit_100k_extents", |b| {
        b.iter(|| {
            map.lookup(black_box(rng.below(n) * 8), 8, &mut pieces);
            black_box(pieces.len())
        })
    });
    // What a direct request asks: one extent covering the block (the hints' one line).
    g.bench_function("covering_4k_hit_100k_extents", |b| {
        b.iter(|| black_box(map.covering(black_box(rng.below(n) * 8), 8)))
    });
    g.bench_function("insert_overwrite_4k_100k_extents", |b| {
        b.iter(|| {
            let lba = rng.below(n) * 8;
            map.insert(black_box(lba), Extent::new(lba, 8, State::Dirty, None, 2));
        })
    });
    g.bench_function("insert_split_2k_inside_4k", |b| {
        b.iter(|| {
            let lba = rng.below(n) * 8 + 2;
            map.insert(black_box(lba), Extent::new(lba, 4, State::Dirty, None, 3));
        })
    });
    g.finish();
}

/// GC's reclaim of one 1 MiB segment of 4 KiB clean extents, as in the zipf bench (128 MiB
/// cache of 1 MiB segments and 256 KiB stripes, 512 MiB working set): the log filled with
/// misses at random blocks, a third of them read since, so some extents of the oldest
/// segment are gone (filled again later) and some are kept.
fn reclaim(c: &mut Criterion) {
    const SEG: u64 = 2048;
    const SEGS: u32 = 128;
    const BLOCKS: u64 = 131_072;
    let build = || {
        let mut m = ExtentMap::with_segments(512, 0, SEG, SEGS);
        let mut rng = Rng::new(7);
        for i in 0..SEG / 8 * u64::from(SEGS - 1) {
            let lba = rng.below(BLOCKS) * 8;
            m.insert(lba, Extent::new(i * 8, 8, State::Clean, None, 1));
            if rng.chance(33) {
                m.touch(lba, 8);
            }
        }
        m
    };
    let mut g = c.benchmark_group("gc");
    g.sample_size(30);
    g.throughput(Throughput::Elements(SEG / 8));
    // Inside SPDK the map's lines are mostly evicted by the data copies of the requests
    // between two reclaims: the cold variant writes through 64 MiB first (outside the timing).
    let mut evict = vec![0u8; 64 << 20];
    for (name, cold) in [
        ("reclaim_1mib_segment_4k_extents", false),
        ("reclaim_1mib_segment_4k_extents_cold", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let m = build();
                    if cold {
                        for (i, x) in evict.iter_mut().enumerate().step_by(64) {
                            *x = x.wrapping_add(i as u8);
                        }
                        black_box(&evict);
                    }
                    m
                },
                |mut m| {
                    let mut rescue = Rescue {
                        budget: SEG * 3 / 4,
                        need_crc: false,
                    };
                    let mut moves = Vec::new();
                    black_box(m.reclaim_segment(0, SEG, &mut rescue, &mut moves));
                    // Returned, so they are dropped outside the timing.
                    (m, moves)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn kset(c: &mut Criterion) {
    let geo = Geometry::new(
        1 << 30,
        1 << 24,
        LayoutOptions {
            segment_bytes: 16 << 20,
            stripe_bytes: 1 << 20,
            shards: 1,
            ..LayoutOptions::default()
        },
    )
    .unwrap();
    let at = LogPos {
        seg: 2,
        gen: 3,
        off: 1,
    };
    let keys: Vec<Key> = (0..32)
        .map(|i| Key {
            lba: i * 8,
            len: 8,
            kind: KeyKind::Data,
            data_off: 1 + 2 + 8 * i as u32,
            gen: 3,
            epoch: 1,
            clean: false,
            crc: None,
        })
        .collect();
    let k = Kset {
        seq: 9,
        prev_crc: 1,
        shard: 0,
        pos: at,
        next: LogPos {
            off: 1 + 3 + 256,
            ..at
        },
        region_sectors: 3 + 256,
        keys,
    };
    let (bytes, _) = k.encode(7);
    let mut g = c.benchmark_group("kset");
    g.throughput(Throughput::Elements(32));
    g.bench_function("encode_32_keys", |b| b.iter(|| black_box(k.encode(7))));
    g.bench_function("decode_32_keys", |b| {
        b.iter(|| black_box(Kset::decode(&bytes, 7, &geo, at, 0).is_ok()))
    });
    g.finish();
}

fn replay(c: &mut Criterion) {
    // A 64 MiB cache filled with 4 KiB keys in batches of 32.
    let backing = BackingIdentity {
        sectors: 1 << 20,
        block_size: 512,
        uuid: [1; 16],
        name: "b".into(),
    };
    let fopts = FormatOptions {
        layout: LayoutOptions {
            segment_bytes: 4 << 20,
            stripe_bytes: 1 << 20,
            shards: 1,
            ..LayoutOptions::default()
        },
        ..FormatOptions::default()
    };
    let mut host = SyncHost::format(
        MemDevice::new(64 << 20),
        MemDevice::new(512 << 20),
        backing.clone(),
        &fopts,
        CacheOptions::default(),
    )
    .unwrap();
    let blocks = 12_000u64;
    for chunk in 0..blocks / 32 {
        for i in 0..32 {
            let lba = (chunk * 32 + i) * 8;
            host.submit(pcache::engine::Op::Write, lba, 8, Some(vec![1; 4096]))
                .unwrap();
        }
        host.run();
        host.take_done();
    }
    let (cache_dev, _) = host.into_devices();
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(blocks));
    g.sample_size(10);
    g.bench_function("open_64mib_cache_12k_keys", |b| {
        b.iter_batched(
            || cache_dev.clone(),
            |mut dev| {
                black_box(
                    open_cache(&mut dev, backing.clone(), CacheOptions::default())
                        .0
                        .is_ok(),
                )
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn crc(c: &mut Criterion) {
    let data = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4k", |b| {
        b.iter(|| black_box(crc32c::crc32c(black_box(&data))))
    });
    g.finish();
}

criterion_group!(benches, index, reclaim, kset, replay, crc);
criterion_main!(benches);
