//! Eviction under a skewed workload: 4 KiB reads (and 70/30 read/write mixes) drawn from a
//! zipfian distribution over a working set four times the cache, as `scripts/bench --zipf`
//! runs against OCF. An LRU cache of the same data capacity, run on the same trace, is the
//! reference (OCF evicts by LRU): pcache's read hit ratio must beat it.

mod common;

use common::*;
use pcache::engine::{CacheOptions, FormatOptions, LayoutOptions, Op, WriteAdmission};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::{Rng, Sim};
use std::collections::{BTreeMap, HashMap};

/// Zipfian ranks 0..n (rank 0 the most popular), by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, theta: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for i in 0..n {
            sum += 1.0 / ((i + 1) as f64).powf(theta);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    /// The share of requests that go to rank `r`.
    fn share(&self, r: usize) -> f64 {
        self.cdf[r] - r.checked_sub(1).map_or(0.0, |p| self.cdf[p])
    }

    /// The share of requests that go to the `n` most popular ranks: the hit ratio of a
    /// cache that held just those (the static optimum for `n` blocks).
    fn top(&self, n: usize) -> f64 {
        n.checked_sub(1)
            .map_or(0.0, |i| self.cdf[i.min(self.cdf.len() - 1)])
    }

    fn draw(&self, rng: &mut Rng) -> u64 {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u) as u64
    }
}

/// Exact LRU over blocks: read hits of a trace with `capacity` blocks (writes allocate).
struct Lru {
    capacity: usize,
    tick: u64,
    at: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    hits: u64,
    reads: u64,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            tick: 0,
            at: HashMap::new(),
            order: BTreeMap::new(),
            hits: 0,
            reads: 0,
        }
    }

    fn access(&mut self, block: u64, read: bool) {
        self.tick += 1;
        if let Some(t) = self.at.insert(block, self.tick) {
            self.order.remove(&t);
            self.hits += u64::from(read);
        } else if self.at.len() > self.capacity {
            if let Some((_, old)) = self.order.pop_first() {
                self.at.remove(&old);
            }
        }
        self.reads += u64::from(read);
        self.order.insert(self.tick, block);
    }

    fn ratio(&self) -> f64 {
        self.hits as f64 / self.reads.max(1) as f64
    }
}

struct Run {
    hit: f64,
    lru: f64,
    /// The share of requests that go to the blocks the cache holds at the end, and to as
    /// many of the most popular blocks (what a cache that knew the ranks would hold).
    held: f64,
    best: f64,
    data_mib: f64,
    /// Sectors written back, and writes sent around the cache by write admission.
    wb_sectors: u64,
    write_declined: u64,
}

/// A cache of `cache_mib` laid out as `bdev_pcache_create` lays it out by default with
/// `shards` shards (segments of a 128th of the cache, at least 1 MiB; a stripe of a
/// quarter of one), over a working set four times its size: the host and that size in
/// 4 KiB blocks.
fn format(cache_mib: u64, shards: u32) -> (SyncHost<MemDevice, MemDevice>, u64) {
    let cache = cache_mib << 20;
    let segment = 1u64 << (cache / 128).clamp(1 << 20, 16 << 20).ilog2();
    let blocks = 4 * cache / 4096;
    let fopts = FormatOptions {
        layout: LayoutOptions {
            segment_bytes: segment,
            stripe_bytes: (segment / 4).min(1 << 20),
            shards,
            block_bytes: 512,
        },
        data_crc: false,
        cache_uuid: [0xc4; 16],
        gc_percent: 70,
    };
    let h = SyncHost::format(
        MemDevice::new(cache),
        MemDevice::new(blocks * 4096),
        identity(blocks * 8),
        &fopts,
        CacheOptions::default(),
    )
    .expect("format");
    (h, blocks)
}

/// One run over a cache of `cache_mib` in `shards` shards ([`format`]), the first half of
/// the requests warming it.
fn run(
    cache_mib: u64,
    shards: u32,
    theta: f64,
    write_percent: u64,
    requests: u64,
    admission: WriteAdmission,
) -> Run {
    let (mut h, blocks) = format(cache_mib, shards);
    h.cache.set_write_admission(admission);
    let zipf = Zipf::new(blocks as usize, theta);
    let mut rng = Rng::new(7);
    let mut trace = Vec::with_capacity(requests as usize);
    for _ in 0..requests {
        trace.push((zipf.draw(&mut rng), rng.chance(write_percent)));
    }
    let half = trace.len() / 2;
    let mut before = (0, 0);
    for (i, chunk) in trace.chunks(32).enumerate() {
        if i * 32 == half {
            let st = h.cache.stats().total;
            before = (st.read_hit_sectors, st.read_miss_sectors);
        }
        for &(b, write) in chunk {
            let (op, data) = if write {
                (Op::Write, Some(vec![b as u8; 4096]))
            } else {
                (Op::Read, None)
            };
            h.submit(op, b * 8, 8, data).expect("submit");
        }
        h.run();
        h.reap(|_, r| assert!(r.is_ok(), "request failed: {r:?}"));
    }
    let st = h.cache.stats();
    let (hit, miss) = (
        st.total.read_hit_sectors - before.0,
        st.total.read_miss_sectors - before.1,
    );
    let data_mib = (st.dirty_bytes + st.clean_bytes) as f64 / f64::from(1 << 20);
    let (mut held, mut held_blocks) = (0.0, 0);
    for b in 0..blocks {
        if h.cache.cached_sector(b * 8, 8).is_some() {
            held += zipf.share(b as usize);
            held_blocks += 1;
        }
    }
    let best = zipf.top(held_blocks);
    let mut lru = Lru::new((data_mib * 256.0) as usize);
    for (i, &(b, write)) in trace.iter().enumerate() {
        if i == half {
            lru.hits = 0;
            lru.reads = 0;
        }
        lru.access(b, !write);
    }
    eprintln!(
        "zipf {theta} writes {write_percent}%, {shards} shard(s), {admission}: hit {:.1}%, LRU of {data_mib:.0} MiB {:.1}%; \
         the {held_blocks} blocks held draw {:.1}% of requests, as many of the most popular {:.1}%; \
         gc segments {}, readmits {}, fills {}, declined {}, waits {}, in place {}, wb {} MiB, dirty {} MiB, \
         writes not admitted {}",
        hit as f64 * 100.0 / (hit + miss) as f64,
        lru.ratio() * 100.0,
        held * 100.0,
        best * 100.0,
        st.total.gc_segments,
        st.total.readmits,
        st.total.fills,
        st.total.fill_declined,
        st.total.cache_full_waits,
        st.total.in_place_writes,
        st.total.wb_sectors >> 11,
        st.dirty_bytes >> 20,
        st.total.write_declined,
    );
    Run {
        hit: hit as f64 / (hit + miss) as f64,
        lru: lru.ratio(),
        held,
        best,
        data_mib,
        wb_sectors: st.total.wb_sectors,
        write_declined: st.total.write_declined,
    }
}

/// What a user comparing with OCF checks: on the skewed workload where LRU does worst
/// (θ 0.8), reads and a 70/30 mix, pcache hits more often than LRU would with the data
/// pcache holds (by at least 2 points; 5 to 7 when this was written). And how near the
/// blocks it holds come to the most popular ones: within 5 points of requests when only
/// reads fill it (2.8 when this was written), within 10 when writes do too (7.9: every
/// block written, popular or not, stays cached until its segment's turn in the log).
#[test]
fn zipfian_reads_hit_more_often_than_lru() {
    for (writes, gap) in [(0, 0.05), (30, 0.10)] {
        let r = run(32, 1, 0.8, writes, 1_000_000, WriteAdmission::Always);
        assert!(
            r.held >= r.best - gap,
            "zipf 0.8, {writes}% writes: the blocks held draw {:.1}% of requests, as many of \
             the most popular {:.1}%",
            r.held * 100.0,
            r.best * 100.0
        );
        assert!(
            r.hit >= r.lru + 0.02,
            "zipf 0.8, {writes}% writes: pcache hit {:.1}%, not 2 points over LRU's {:.1}% with its {:.0} MiB",
            r.hit * 100.0,
            r.lru * 100.0,
            r.data_mib
        );
    }
}

/// `second_touch` write admission on the 70/30 mix: writes of blocks the cache does not
/// hold go to the backing device unless they were touched recently, so data written once
/// no longer displaces data read again: read hits do not drop (+2.1 points here, +1.7 at
/// the bench's size, when this was written), and under two thirds as much is written back
/// (0.36x here).
#[test]
fn second_touch_writes_keep_hits_and_write_back_less() {
    let always = run(32, 1, 0.8, 30, 1_000_000, WriteAdmission::Always);
    let second = run(32, 1, 0.8, 30, 1_000_000, WriteAdmission::SecondTouch);
    assert_eq!(always.write_declined, 0);
    assert!(second.write_declined > 0, "no write was sent around");
    assert!(
        second.hit >= always.hit,
        "second_touch hit {:.1}%, always {:.1}%",
        second.hit * 100.0,
        always.hit * 100.0
    );
    assert!(
        second.wb_sectors * 3 < always.wb_sectors * 2,
        "written back: second_touch {} sectors, always {}",
        second.wb_sectors,
        always.wb_sectors
    );
}

/// The `scripts/bench --zipf` cells at the bench's size (128 MiB cache, 512 MiB working
/// set), in seconds instead of minutes: for tuning eviction.
#[test]
#[ignore = "a measurement: cargo test --release --test zipf -- --ignored --nocapture"]
fn zipf_hit_ratios_at_bench_size() {
    // ZIPF_CELL=θ,writes% runs one cell (for profiling), e.g. ZIPF_CELL=0.8,30;
    // ZIPF_SHARDS=n lays the cache out in n shards (as `bdev_pcache_create` on n cores).
    let only = std::env::var("ZIPF_CELL").ok().filter(|c| !c.is_empty());
    let shards = std::env::var("ZIPF_SHARDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for theta in [0.8, 0.99] {
        for writes in [0, 30] {
            if only
                .as_deref()
                .is_some_and(|c| c != format!("{theta},{writes}"))
            {
                continue;
            }
            for a in WriteAdmission::ALL {
                if writes > 0 || a == WriteAdmission::Always {
                    run(128, shards, theta, writes, 4_000_000, a);
                }
            }
        }
    }
}

/// One θ 0.8 70/30 run (`requests` of 4 KiB, 32 in flight) over a 32 MiB cache of two
/// shards ([`format`]) run as `parts` parts by the simulator, grants and coordination to part 1
/// arriving `msg_delay` completed commands late (the SPDK host's messages to another
/// engine thread): the read hit ratio of the second half, and the last part's stats.
fn split_run(parts: usize, msg_delay: u64, requests: u64) -> (f64, pcache::engine::CacheStats) {
    let (h, blocks) = format(32, 2);
    let (c, img, backing) = h.into_parts();
    let mut sim = Sim::with_parts(c, img, backing, 11, parts);
    sim.msg_delay = msg_delay;
    let zipf = Zipf::new(blocks as usize, 0.8);
    let mut rng = Rng::new(5);
    let mut before = (0, 0);
    let hits = |sim: &Sim| {
        sim.parts().fold((0, 0), |(h, m), c| {
            let t = c.stats().total;
            (h + t.read_hit_sectors, m + t.read_miss_sectors)
        })
    };
    // 32 requests in flight all along, as bdevperf keeps them: a stall is not hidden by a
    // pause between batches (when nothing is in flight every grant has arrived).
    let (mut submitted, mut inflight) = (0u64, 0u32);
    while submitted < requests || inflight > 0 {
        while inflight < 32 && submitted < requests {
            if submitted == requests / 2 {
                before = hits(&sim);
            }
            let b = zipf.draw(&mut rng);
            let (op, data) = if rng.chance(30) {
                (Op::Write, Some(vec![b as u8; 4096]))
            } else {
                (Op::Read, None)
            };
            sim.submit(op, b * 8, 8, data).expect("submit");
            submitted += 1;
            inflight += 1;
        }
        if !sim.step() {
            sim.run();
        }
        for (_, r, _) in sim.take_done() {
            assert!(r.is_ok(), "request failed: {r:?}");
            inflight -= 1;
        }
    }
    let (h, m) = hits(&sim);
    let ratio = (h - before.0) as f64 / ((h - before.0) + (m - before.1)) as f64;
    let last = sim.parts().last().map(|c| c.stats()).expect("a part");
    (ratio, last)
}

/// What a user running pcache on several cores checks against one: a shard whose
/// segments and coordination come by message from another engine thread never sends
/// writes around a cache with room, and the cache hits as often as when every shard hears
/// at once. (The SPDK module's two-core zipf run lost 2.7 points and sent writes around
/// until GC counted the segments a shard holds ready, session 23; this simulation did not
/// reproduce that loss, so it guards the split path under message latency rather than
/// replaying it.)
#[test]
fn shards_on_other_threads_hit_as_often_as_shards_on_one() {
    let (whole, _) = split_run(1, 0, 400_000);
    let (split, st) = split_run(2, 64, 400_000);
    let follower = &st.shards[0];
    eprintln!(
        "hit {:.1}% whole, {:.1}% split; follower: waits {}, around {}, dropped {}",
        whole * 100.0,
        split * 100.0,
        follower.cache_full_waits,
        follower.full_around_requests,
        follower.readmit_dropped,
    );
    assert_eq!(
        follower.full_around_requests, 0,
        "writes sent around a cache with room"
    );
    assert!(
        split >= whole - 0.01,
        "split {:.1}% against {:.1}% whole",
        split * 100.0,
        whole * 100.0
    );
}
