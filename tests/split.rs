//! A cache split into parts, one per thread in the SPDK host, driven here from one thread
//! with the same cross-part traffic the host carries: pool messages and grants, and the
//! epoch barrier / pressure decisions. Requests go to every part owning one of their
//! stripes (flushes to all) and complete when all of them did. Checked against a plain
//! reference device, through writeback, GC, a drain and a reopen as one unsplit cache.

mod common;

use std::collections::HashMap;

use common::*;
use pcache::engine::pool::{Grant, ToPool};
use pcache::engine::shard::WritebackOptions;
use pcache::engine::{Cache, CacheOptions, Command, Coordination, IoDone, Op, ReqId, Request};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::Rng;
use pcache::media::{execute, Buffers};

struct Split {
    parts: Vec<Cache>,
    cache_dev: MemDevice,
    backing_dev: MemDevice,
    bufs: Buffers,
    next_id: ReqId,
    /// Request -> parts still to complete it.
    waiting: HashMap<ReqId, usize>,
    done: Vec<(ReqId, bool)>,
}

impl Split {
    fn new(host: MemHost, parts: usize) -> Self {
        let (cache, cache_dev, backing_dev) = host.into_parts();
        Split {
            parts: cache.split(parts),
            cache_dev,
            backing_dev,
            bufs: Buffers::new(),
            next_id: 1,
            waiting: HashMap::new(),
            done: Vec::new(),
        }
    }

    fn owners(&self, op: Op, lba: u64, len: u32) -> Vec<usize> {
        if op == Op::Flush {
            return (0..self.parts.len()).collect();
        }
        let g = *self.parts[0].geometry();
        let stripe = u64::from(g.stripe_sectors);
        let mut out = Vec::new();
        let mut s = lba / stripe;
        while s * stripe < lba + u64::from(len) {
            let shard = g.shard_of(s * stripe);
            let p = (0..self.parts.len())
                .find(|&p| self.parts[p].owns_shard(shard))
                .expect("every shard has a part");
            if !out.contains(&p) {
                out.push(p);
            }
            s += 1;
        }
        out
    }

    fn submit(&mut self, op: Op, lba: u64, len: u32, data: Option<Vec<u8>>) -> ReqId {
        let id = self.next_id;
        self.next_id += 1;
        let buf =
            data.unwrap_or_else(|| vec![0u8; len as usize * 512 * usize::from(op == Op::Read)]);
        self.bufs.insert(id, buf);
        let owners = self.owners(op, lba, len);
        self.waiting.insert(id, owners.len());
        for p in owners {
            self.parts[p]
                .submit(Request { id, op, lba, len })
                .expect("submit");
        }
        id
    }

    /// The host's cross-part step: pool messages to part 0, grants to their parts, and
    /// every part told the barrier and pressure.
    fn coordinate(&mut self) -> bool {
        let mut moved = false;
        let mut msgs: Vec<ToPool> = Vec::new();
        for p in &mut self.parts {
            p.take_pool_messages(&mut msgs);
        }
        moved |= !msgs.is_empty();
        for m in msgs {
            self.parts[0].pool_message(m);
        }
        let mut grants: Vec<(u32, Grant)> = Vec::new();
        for p in &mut self.parts {
            p.take_grants(&mut grants);
        }
        moved |= !grants.is_empty();
        for (shard, g) in grants {
            for p in &mut self.parts {
                if p.owns_shard(shard) {
                    p.grant(shard, g);
                }
            }
        }
        let c = Coordination {
            allowed_epoch: self.parts.iter().map(Cache::frontier).min().unwrap_or(0),
            pressure: self.parts[0].pool_pressure().unwrap_or(false),
        };
        for p in &mut self.parts {
            p.coordinate_with(c);
        }
        moved
    }

    fn run(&mut self) {
        loop {
            let mut busy = self.coordinate();
            for i in 0..self.parts.len() {
                self.parts[i].poll();
                let cmds: Vec<Command> = self.parts[i].take_commands();
                busy |= !cmds.is_empty();
                let mut dones: Vec<IoDone> = Vec::new();
                for c in &cmds {
                    if let Some(d) = execute(
                        c,
                        &mut self.cache_dev,
                        &mut self.backing_dev,
                        &mut self.bufs,
                    ) {
                        dones.push(d);
                    }
                }
                for d in dones {
                    self.parts[i].complete(d);
                }
                for (id, r) in self.parts[i].take_completions() {
                    let left = self.waiting.get_mut(&id).expect("known request");
                    *left -= 1;
                    if *left == 0 {
                        self.waiting.remove(&id);
                        self.done.push((id, r.is_ok()));
                    }
                }
            }
            if !busy {
                break;
            }
        }
    }

    fn one(&mut self, op: Op, lba: u64, len: u32, data: Option<Vec<u8>>) -> Vec<u8> {
        let id = self.submit(op, lba, len, data);
        self.run();
        let at = self.done.iter().position(|&(i, _)| i == id).expect("done");
        let (_, ok) = self.done.remove(at);
        assert!(ok, "{op:?} {lba}+{len} failed");
        self.bufs.remove(&id).unwrap_or_default()
    }

    fn dirty_bytes(&self) -> u64 {
        self.parts.iter().map(Cache::dirty_bytes).sum()
    }
}

fn run_split(parts: usize, shards: u32, seed: u64) {
    let cache_bytes = 2 << 20;
    let backing_sectors = 4 * cache_bytes / 512;
    let opts = CacheOptions {
        writeback: WritebackOptions {
            high_pct: 30,
            low_pct: 0,
            ..WritebackOptions::default()
        },
        ..CacheOptions::default()
    };
    let host = SyncHost::format(
        MemDevice::new(cache_bytes),
        MemDevice::new(backing_sectors * 512),
        identity(backing_sectors),
        &small_format(shards, false),
        opts,
    )
    .expect("format");
    let mut h = Split::new(host, parts);
    assert_eq!(h.parts.len(), parts);
    let mut model = vec![0u8; backing_sectors as usize * SECTOR];
    let mut rng = Rng::new(seed);
    let mut id = 0;
    for _ in 0..600 {
        // A batch of non-overlapping writes, some crossing stripes (so parts share them).
        for (lba, len, d) in
            random_write_batch(&mut rng, 16, 48, backing_sectors, &mut id, &mut model)
        {
            h.submit(Op::Write, lba, len, Some(d));
        }
        h.run();
        let done: Vec<_> = h.done.drain(..).collect();
        for (rid, ok) in done {
            assert!(ok, "write {rid} failed");
            h.bufs.remove(&rid);
        }
        if rng.chance(5) {
            h.one(Op::Flush, 0, 0, None);
        }
        if rng.chance(4) {
            let len = 1 + rng.below(96) as u32;
            let lba = rng.below(backing_sectors - u64::from(len));
            let got = h.one(Op::Read, lba, len, None);
            let at = lba as usize * SECTOR;
            assert!(
                got == model[at..at + len as usize * SECTOR],
                "read {lba}+{len} wrong ({parts} parts, seed {seed})"
            );
        }
    }
    let gc: u64 = h.parts.iter().map(|p| p.stats().total.gc_segments).sum();
    assert!(gc > 0, "the cache was overwritten 4x: GC must have run");
    for p in &mut h.parts {
        p.set_drain(true);
    }
    h.run();
    assert_eq!(h.dirty_bytes(), 0, "drain leaves nothing dirty");
    assert!(
        h.backing_dev.bytes() == model.as_slice(),
        "after a drain the backing device equals the reference"
    );
    // The parts' shards together are one cache on the media: it reopens whole.
    let backing = h.parts[0].superblock().backing.clone();
    let mut whole = SyncHost::open(h.cache_dev, h.backing_dev, backing, CacheOptions::default())
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
