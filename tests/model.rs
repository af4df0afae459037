//! Model-based tests: random mixes of writes, reads, flushes, unmaps and write-zeroes, with
//! close/reopen in between, must read back exactly like a plain in-memory block device.

mod common;

use common::*;
use pcache::engine::{CacheMode, Op, SeqCutoff, SeqPolicy, WriteAdmission};
use pcache::media::BlockDevice;
use proptest::prelude::*;

const BACKING_SECTORS: u64 = 4096; // 2 MiB
const CACHE_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone)]
enum Step {
    Write {
        lba: u64,
        len: u32,
    },
    Read {
        lba: u64,
        len: u32,
    },
    Flush,
    Unmap {
        lba: u64,
        len: u32,
    },
    Zeroes {
        lba: u64,
        len: u32,
    },
    /// Several non-overlapping writes submitted together (one group-committed batch).
    Batch(Vec<(u64, u32)>),
    Reopen,
    /// Switches the cache mode (index into `CacheMode::ALL`).
    Mode(usize),
    /// Sets the sequential cut-off: policy (index into `SeqPolicy::ALL`), threshold in
    /// 4 KiB units.
    Cutoff(usize, u64),
    /// `n` consecutive writes of `len` sectors from `lba` (a sequential stream).
    Stream {
        lba: u64,
        len: u32,
        n: u32,
    },
    WriteFua {
        lba: u64,
        len: u32,
    },
    /// Sets write admission (index into `WriteAdmission::ALL`; not persisted).
    Admission(usize),
}

fn range() -> impl Strategy<Value = (u64, u32)> {
    (1u32..=80).prop_flat_map(|len| (0..BACKING_SECTORS - u64::from(len), Just(len)))
}

/// One of four hot 4 KiB blocks, whole: rewrites of them go in place while they are dirty,
/// and their discards pile up within an epoch.
fn hot_range() -> impl Strategy<Value = (u64, u32)> {
    (0u64..4).prop_map(|b| (b * 8, 8))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => range().prop_map(|(lba, len)| Step::Write { lba, len }),
        4 => range().prop_map(|(lba, len)| Step::Read { lba, len }),
        1 => Just(Step::Flush),
        1 => range().prop_map(|(lba, len)| Step::Unmap { lba, len }),
        1 => range().prop_map(|(lba, len)| Step::Zeroes { lba, len }),
        3 => hot_range().prop_map(|(lba, len)| Step::Write { lba, len }),
        2 => hot_range().prop_map(|(lba, len)| Step::Read { lba, len }),
        1 => hot_range().prop_map(|(lba, len)| Step::Unmap { lba, len }),
        2 => proptest::collection::vec(range(), 1..12).prop_map(Step::Batch),
        1 => Just(Step::Reopen),
    ]
}

/// The steps above plus mode switches, sequential streams, FUA writes and cut-off changes.
fn mode_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => step(),
        2 => (0..CacheMode::ALL.len()).prop_map(Step::Mode),
        1 => (0..SeqPolicy::ALL.len(), 1u64..4).prop_map(|(p, u)| Step::Cutoff(p, u)),
        2 => (1u32..=16, 2u32..10).prop_flat_map(|(len, n)| {
            (0..BACKING_SECTORS - u64::from(len * n), Just(len), Just(n))
                .prop_map(|(lba, len, n)| Step::Stream { lba, len, n })
        }),
        1 => range().prop_map(|(lba, len)| Step::WriteFua { lba, len }),
        1 => (0..WriteAdmission::ALL.len()).prop_map(Step::Admission),
    ]
}

/// The reference: a plain block device.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, lba: u64, data: &[u8]) {
        let at = lba as usize * SECTOR;
        self.0[at..at + data.len()].copy_from_slice(data);
    }
    fn read(&self, lba: u64, len: u32) -> &[u8] {
        let at = lba as usize * SECTOR;
        &self.0[at..at + len as usize * SECTOR]
    }
}

/// `steps` with every range made whole cache blocks of `block` sectors.
fn aligned(steps: Vec<Step>, block: u32) -> Vec<Step> {
    let al = |lba, len| align_range(lba, len, block, BACKING_SECTORS);
    steps
        .into_iter()
        .map(|s| match s {
            Step::Write { lba, len } => {
                let (lba, len) = al(lba, len);
                Step::Write { lba, len }
            }
            Step::Read { lba, len } => {
                let (lba, len) = al(lba, len);
                Step::Read { lba, len }
            }
            Step::Unmap { lba, len } => {
                let (lba, len) = al(lba, len);
                Step::Unmap { lba, len }
            }
            Step::Zeroes { lba, len } => {
                let (lba, len) = al(lba, len);
                Step::Zeroes { lba, len }
            }
            Step::Batch(r) => Step::Batch(r.into_iter().map(|(l, n)| al(l, n)).collect()),
            Step::WriteFua { lba, len } => {
                let (lba, len) = al(lba, len);
                Step::WriteFua { lba, len }
            }
            Step::Stream { lba, len, n } => {
                // Still sequential: whole blocks, back to back, inside the device.
                let len = len.next_multiple_of(block);
                let end = BACKING_SECTORS.saturating_sub(u64::from(len) * u64::from(n));
                let lba = (lba.min(end) / u64::from(block)) * u64::from(block);
                Step::Stream { lba, len, n }
            }
            s => s,
        })
        .collect()
}

fn run(steps: Vec<Step>, shards: u32, data_crc: bool) {
    run_in(
        steps,
        shards,
        data_crc,
        CacheMode::WriteBack,
        512,
        CACHE_BYTES,
    );
}

/// The model run on a cache device of `block_bytes`-byte blocks (requests whole blocks).
fn run_blocks(steps: Vec<Step>, shards: u32, data_crc: bool, block_bytes: u32) {
    run_in(
        steps,
        shards,
        data_crc,
        CacheMode::WriteBack,
        block_bytes,
        CACHE_BYTES,
    );
}

fn run_in(
    steps: Vec<Step>,
    shards: u32,
    data_crc: bool,
    first: CacheMode,
    block_bytes: u32,
    cache_bytes: u64,
) {
    let steps = aligned(steps, block_bytes / 512);
    let mut host = new_host(
        cache_bytes,
        BACKING_SECTORS,
        &small_format_blocks(shards, data_crc, block_bytes),
    );
    host.cache.set_mode(first);
    host.run();
    let mut mode = first;
    let mut cutoff = SeqCutoff::default();
    let mut admission = WriteAdmission::default();
    let mut model = Model(vec![0; BACKING_SECTORS as usize * SECTOR]);
    let mut id = 0u64;
    for s in steps {
        match s {
            Step::Write { lba, len } => {
                id += 1;
                let d = data_of(id, lba, len);
                host.write(lba, d.clone()).expect("write");
                model.write(lba, &d);
            }
            Step::Read { lba, len } => {
                let got = host.read(lba, len).expect("read");
                assert!(
                    got == model.read(lba, len),
                    "read {lba}+{len} differs from the model"
                );
            }
            Step::Flush => host.flush().expect("flush"),
            Step::Unmap { lba, len } => {
                host.unmap(lba, len).expect("unmap");
                model.write(lba, &vec![0; len as usize * SECTOR]);
            }
            Step::Zeroes { lba, len } => {
                host.write_zeroes(lba, len).expect("write_zeroes");
                model.write(lba, &vec![0; len as usize * SECTOR]);
            }
            Step::Batch(ranges) => {
                let mut taken: Vec<(u64, u64)> = Vec::new();
                for (lba, len) in ranges {
                    let end = lba + u64::from(len);
                    if taken.iter().any(|&(a, b)| lba < b && a < end) {
                        continue;
                    }
                    taken.push((lba, end));
                    id += 1;
                    let d = data_of(id, lba, len);
                    model.write(lba, &d);
                    host.submit(pcache::engine::Op::Write, lba, len, Some(d))
                        .expect("submit");
                }
                host.run();
                for (_, r, _) in host.take_done() {
                    r.expect("batched write");
                }
            }
            Step::Reopen => {
                host = reopen(host);
                assert_eq!(host.cache.mode(), mode, "the mode persists");
                assert_eq!(host.cache.seq_cutoff(), cutoff, "the cut-off persists");
                assert_eq!(
                    host.cache.write_admission(),
                    admission,
                    "the write admission persists"
                );
            }
            Step::Mode(i) => {
                mode = CacheMode::ALL[i];
                host.cache.set_mode(mode);
                host.run(); // persisted with the next control-slot write
            }
            Step::Admission(i) => {
                admission = WriteAdmission::ALL[i];
                host.cache.set_write_admission(admission);
                host.run();
            }
            Step::Cutoff(p, units) => {
                cutoff = SeqCutoff {
                    policy: SeqPolicy::ALL[p],
                    bytes: units * 4096,
                };
                host.cache.set_seq_cutoff(cutoff).expect("cut-off");
                host.run();
            }
            Step::Stream { lba, len, n } => {
                for i in 0..u64::from(n) {
                    let at = lba + i * u64::from(len);
                    id += 1;
                    let d = data_of(id, at, len);
                    host.write(at, d.clone()).expect("stream write");
                    model.write(at, &d);
                }
            }
            Step::WriteFua { lba, len } => {
                id += 1;
                let d = data_of(id, lba, len);
                host.submit(Op::WriteFua, lba, len, Some(d.clone()))
                    .expect("submit");
                host.run();
                for (_, r, _) in host.take_done() {
                    r.expect("FUA write");
                }
                model.write(lba, &d);
            }
        }
    }
    assert_eq!(host.cache.write_admission(), admission);
    // Everything reads back, before and after a final reopen.
    for _ in 0..2 {
        let got = host.read(0, BACKING_SECTORS as u32).expect("final read");
        if let Some(i) = (0..BACKING_SECTORS as usize)
            .find(|&i| got[i * SECTOR..(i + 1) * SECTOR] != model.0[i * SECTOR..(i + 1) * SECTOR])
        {
            let lba = i as u64;
            let mut pieces = Vec::new();
            for sh in host.cache.shards() {
                sh.index().lookup(lba, 1, &mut pieces);
                eprintln!("shard {} at {lba}: {:?}", sh.id(), pieces);
            }
            panic!(
                "final image differs from the model at lba {lba}: got {:?}, want {:?}; stats {:?}",
                decode_sector(&got[i * SECTOR..(i + 1) * SECTOR], lba),
                decode_sector(&model.0[i * SECTOR..(i + 1) * SECTOR], lba),
                host.cache.stats().total
            );
        }
        assert_eq!(
            host.partial_block_commands, 0,
            "cache I/O of partial blocks"
        );
        host = reopen(host);
    }
    // Written back, the backing device holds the model's image.
    host.cache.set_drain(true);
    host.run();
    assert!(host.cache.is_clean(), "drained");
    let (_, backing) = host.into_devices();
    let b = backing.bytes();
    if let Some(i) = (0..BACKING_SECTORS as usize)
        .find(|&i| b[i * SECTOR..(i + 1) * SECTOR] != model.0[i * SECTOR..(i + 1) * SECTOR])
    {
        let lba = i as u64;
        panic!(
            "backing device differs from the model at lba {lba} after writeback: got {:?}, want {:?}",
            decode_sector(&b[i * SECTOR..(i + 1) * SECTOR], lba),
            decode_sector(&model.0[i * SECTOR..(i + 1) * SECTOR], lba),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn reads_match_a_plain_block_device_one_shard(steps in proptest::collection::vec(step(), 1..120)) {
        run(steps, 1, false);
    }

    #[test]
    fn reads_match_a_plain_block_device_four_shards_with_data_crc(steps in proptest::collection::vec(step(), 1..120)) {
        run(steps, 4, true);
    }

    #[test]
    fn reads_match_a_plain_block_device_4k_cache_blocks(steps in proptest::collection::vec(step(), 1..120)) {
        run_blocks(steps, 1, false, 4096);
    }

    #[test]
    fn reads_match_a_plain_block_device_4k_cache_blocks_four_shards_with_data_crc(steps in proptest::collection::vec(step(), 1..120)) {
        run_blocks(steps, 4, true, 4096);
    }

    /// Every mode, switched at random under the same mix (plus sequential streams, FUA
    /// writes and cut-off changes): reads match, the mode persists across reopens, and the
    /// backing device holds the model's image once written back.
    #[test]
    fn reads_match_in_every_mode_with_live_switches(
        first in 0..CacheMode::ALL.len(),
        steps in proptest::collection::vec(mode_step(), 1..160),
    ) {
        run_in(steps, 1, false, CacheMode::ALL[first], 512, CACHE_BYTES);
    }

    #[test]
    fn reads_match_in_every_mode_with_live_switches_three_shards_with_data_crc(
        first in 0..CacheMode::ALL.len(),
        steps in proptest::collection::vec(mode_step(), 1..160),
    ) {
        run_in(steps, 3, true, CacheMode::ALL[first], 512, CACHE_BYTES);
    }

    /// The same on a cache of 4 KiB blocks (requests of whole blocks).
    #[test]
    fn reads_match_in_every_mode_with_live_switches_4k_cache_blocks(
        first in 0..CacheMode::ALL.len(),
        steps in proptest::collection::vec(mode_step(), 1..160),
    ) {
        run_in(steps, 2, false, CacheMode::ALL[first], 4096, CACHE_BYTES);
    }

    /// The same in a cache smaller than the device (512 KiB over 2 MiB), so GC drops clean
    /// data and the admission policies (read fills and, with `second_touch`, writes) decide
    /// what enters it.
    #[test]
    fn reads_match_in_every_mode_with_live_switches_small_cache(
        first in 0..CacheMode::ALL.len(),
        steps in proptest::collection::vec(mode_step(), 1..160),
    ) {
        run_in(steps, 1, false, CacheMode::ALL[first], 512, 512 << 10);
    }
}

#[test]
fn a_write_survives_reopen() {
    let mut host = new_host(CACHE_BYTES, BACKING_SECTORS, &small_format(2, false));
    host.write(10, data_of(1, 10, 8)).unwrap();
    host = reopen(host);
    assert_eq!(host.read(10, 8).unwrap(), data_of(1, 10, 8));
}

#[test]
fn a_request_past_the_device_end_is_refused() {
    let mut host = new_host(CACHE_BYTES, BACKING_SECTORS, &small_format(1, false));
    let err = host.submit(
        pcache::engine::Op::Write,
        BACKING_SECTORS - 1,
        2,
        Some(vec![0; 1024]),
    );
    assert!(err.is_err());
}

/// Reads served at once from the cache media (`Cache::read_inline`, what the SPDK shell does
/// over a mapped cache and `SyncHost::read` does) return what the same read returns as a
/// request through device commands, over hits, partial hits, misses, zeroed and unmapped
/// ranges; and whole hits are served inline.
#[test]
fn inline_reads_match_reads_through_commands() {
    let mut host = new_host(CACHE_BYTES, BACKING_SECTORS, &small_format(2, false));
    let mut rng = pcache::media::sim::Rng::new(11);
    for id in 0..300u64 {
        let lba = rng.below(BACKING_SECTORS - 64);
        let len = 1 + rng.below(32) as u32;
        match id % 10 {
            8 => host.unmap(lba, len).expect("unmap"),
            9 => host.write_zeroes(lba, len).expect("write_zeroes"),
            _ => host.write(lba, data_of(id, lba, len)).expect("write"),
        }
    }
    for _ in 0..400 {
        let lba = rng.below(BACKING_SECTORS - 64);
        let len = 1 + rng.below(64) as u32;
        // The prefetch hint names the sectors a one-extent inline read copies.
        if let Some(sector) = host.cache.cached_sector(lba, len) {
            let mut want = vec![0u8; len as usize * 512];
            host.cache_dev.read(sector, &mut want).expect("cache read");
            assert_eq!(
                host.read(lba, len).expect("read"),
                want,
                "hint for {lba}+{len}"
            );
        }
        let inline = host.read(lba, len).expect("inline read");
        let id = host
            .submit(pcache::engine::Op::Read, lba, len, None)
            .expect("read request");
        host.run();
        let done = host.take_done();
        let (_, res, buf) = done.into_iter().find(|d| d.0 == id).expect("completion");
        res.expect("read request result");
        assert_eq!(inline, buf, "read of {len} sectors at {lba}");
    }
    let inline_reads = host.cache.stats().total.inline_reads;
    assert!(inline_reads > 0, "no read was served inline");
}

/// 4 KiB writes land 4 KiB-aligned in the cache however their batches are cut, after an
/// odd-sized write and one at a time as well as batched (format v2: ksets grow up from a
/// segment's start, data down from its end), read back, and replay after a reopen.
#[test]
fn batched_4k_writes_land_aligned_and_replay() {
    let mut host = new_host(CACHE_BYTES, BACKING_SECTORS, &small_format(1, false));
    // One odd-sized write first, so the log head is not 4 KiB-aligned.
    host.write(4000, data_of(1, 4000, 3)).expect("write");
    let mut want = Vec::new();
    for i in 0..32u64 {
        let lba = i * 64;
        let id = 100 + i;
        host.submit(pcache::engine::Op::Write, lba, 8, Some(data_of(id, lba, 8)))
            .expect("submit");
        want.push((lba, id));
    }
    host.run();
    for (_, r, _) in host.take_done() {
        r.expect("write");
    }
    // One batch per write: each has its own kset.
    for i in 0..8u64 {
        let lba = 2048 + i * 64 + 16;
        let id = 200 + i;
        host.write(lba, data_of(id, lba, 8)).expect("write");
        want.push((lba, id));
    }
    let mut pieces = Vec::new();
    let mut aligned = 0;
    for &(lba, _) in &want {
        host.cache.shards()[0].index().lookup(lba, 8, &mut pieces);
        let e = pieces[0].extent.expect("cached");
        aligned += usize::from(e.pos % 8 == 0);
    }
    assert_eq!(aligned, want.len(), "4 KiB writes cached 4 KiB-aligned");
    for _ in 0..2 {
        for &(lba, id) in &want {
            assert_eq!(
                host.read(lba, 8).expect("read"),
                data_of(id, lba, 8),
                "lba {lba}"
            );
        }
        assert_eq!(host.read(4000, 3).expect("read"), data_of(1, 4000, 3));
        host = reopen(host);
    }
}
