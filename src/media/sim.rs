//! The simulator: runs a [`Cache`] over RAM images with completions in a seeded random
//! order, chosen commands failing, and crashes at any instant. [`Sim::with_parts`] runs the
//! cache as parts, as the SPDK host's engine threads do, carrying the cross-part traffic
//! (pool messages, grants, the writeback barrier) between them.
//!
//! Time is simulated: the clock (ms, handed to the cache with `Cache::set_now`) moves
//! by [`Sim::step_ms`] per completed command, by [`Sim::advance`], and, in [`Sim::run`],
//! jumps to the cache's next deadline when requests wait for time and nothing is in
//! flight, so retries with backoff and request timeouts run without waiting.
//!
//! Durability model. Cache device: a write is durable once it completes (persistent
//! memory); a write still in flight at a crash is torn: each block of the cache device
//! (512 bytes or 4 KiB, its atomic write unit) is old or new at random. Backing device: completed writes are volatile until a flush completes; at a
//! crash each unflushed write survives or not at random.

use std::collections::{HashMap, VecDeque};

use super::mem::MemDevice;
use super::{execute, BlockDevice, Buffers};
use crate::engine::pool::{Grant, ToPool};
use crate::engine::{
    Buf, Cache, Command, Coordination, Dev, Direct, IoDone, IoError, Op, ReqError, ReqId,
    ReqResult, Request, Verify,
};

/// Tags of the device I/O the simulator issues itself for direct requests (the request id
/// below it); the engine's tags carry a shard id in bits 48.. and never set bit 63.
const DIRECT_TAG: u64 = 1 << 63;

/// SplitMix64: small, fast, and the same everywhere, so a seed reproduces a run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Decides which issued commands fail (or, for [`Sim::set_corrupt`], read corrupted
/// data): gets the command's issue number and the command. A failing copy fails at its
/// source read or its destination write, at random.
pub type FaultFn = Box<dyn FnMut(u64, &Command) -> bool>;

pub struct Sim {
    /// The cache, or part 0 of a split one.
    pub cache: Cache,
    /// Parts 1.. of a split cache (empty when whole).
    others: Vec<Cache>,
    /// Split: parts still to answer each request; the last coordination sent.
    waiting: HashMap<ReqId, (usize, ReqResult)>,
    coordination: Option<Coordination>,
    pub cache_img: MemDevice,
    backing_live: MemDevice,
    backing_durable: MemDevice,
    unflushed: Vec<(u64, Vec<u8>)>,
    bufs: Buffers,
    /// Issue number, issuing part, command.
    inflight: Vec<(u64, usize, Command)>,
    pub rng: Rng,
    issued: u64,
    fault: Option<FaultFn>,
    corrupt: Option<FaultFn>,
    /// Every command for the device fails while the clock is in [from, until).
    outages: Vec<(Dev, u64, u64)>,
    /// Simulated time in ms.
    pub now: u64,
    /// Milliseconds the clock moves per completed command.
    pub step_ms: u64,
    /// Commands whose cache reads were corrupted so far.
    pub corrupted: u64,
    done: Vec<(ReqId, ReqResult)>,
    next_id: ReqId,
    /// Number of device commands completed so far.
    pub completed: u64,
    /// Percentage of reads and writes first offered to [`Cache::begin_direct`], as the
    /// SPDK host offers every one (default 50, so both paths run).
    pub direct_percent: u64,
    /// Direct requests in flight, by request id, with their range.
    directs: HashMap<ReqId, (Direct, u64, u32)>,
    /// Read misses served directly from the backing device so far
    /// ([`Cache::begin_backing_read`]).
    pub backing_directs: u64,
    /// Split: segment grants and coordination for parts 1.. arrive only after this many
    /// more device commands complete (or once none is in flight), as the SPDK host's
    /// messages to other engine threads do; part 0 holds the pool and takes its own at
    /// once.
    pub msg_delay: u64,
    /// Messages on their way, in order, with when they are due (in completed commands).
    delayed: VecDeque<(u64, Delayed)>,
}

/// A message of [`Sim::msg_delay`] on its way to parts 1...
#[derive(Clone, Copy)]
enum Delayed {
    Grant(u32, Grant),
    Coordinate(Coordination),
}

impl Sim {
    pub fn new(cache: Cache, cache_img: MemDevice, backing: MemDevice, seed: u64) -> Self {
        Sim {
            cache,
            others: Vec::new(),
            waiting: HashMap::new(),
            coordination: None,
            cache_img,
            backing_durable: backing.clone(),
            backing_live: backing,
            unflushed: Vec::new(),
            bufs: Buffers::new(),
            inflight: Vec::new(),
            rng: Rng::new(seed),
            issued: 0,
            fault: None,
            corrupt: None,
            outages: Vec::new(),
            now: 0,
            step_ms: 0,
            corrupted: 0,
            done: Vec::new(),
            next_id: 1,
            completed: 0,
            direct_percent: 50,
            directs: HashMap::new(),
            backing_directs: 0,
            msg_delay: 0,
            delayed: VecDeque::new(),
        }
    }

    pub fn set_fault(&mut self, f: FaultFn) {
        self.fault = Some(f);
    }

    pub fn clear_fault(&mut self) {
        self.fault = None;
    }

    /// Chosen reads of the cache device (request reads and writeback copies) return data
    /// with one byte flipped, as a bad transfer would; the media stays intact.
    pub fn set_corrupt(&mut self, f: FaultFn) {
        self.corrupt = Some(f);
    }

    /// Fails every command for `dev` (a copy: either side) that completes while the clock
    /// is in [from, until): an outage of the device.
    pub fn add_outage(&mut self, dev: Dev, from: u64, until: u64) {
        self.outages.push((dev, from, until));
    }

    fn in_outage(&self, cmd: &Command) -> bool {
        let devs: &[Dev] = match cmd {
            Command::Write { dev, .. }
            | Command::Read { dev, .. }
            | Command::Flush { dev, .. }
            | Command::WriteZeroes { dev, .. }
            | Command::Unmap { dev, .. } => std::slice::from_ref(dev),
            Command::Copy { .. } => &[Dev::Cache, Dev::Backing],
            Command::ZeroBuf { .. } => &[],
        };
        self.outages
            .iter()
            .any(|&(d, a, b)| devs.contains(&d) && (a..b).contains(&self.now))
    }

    /// The earliest time a part has something to do without a device completion.
    pub fn next_deadline(&self) -> Option<u64> {
        self.parts().filter_map(Cache::next_deadline).min()
    }

    /// Moves the simulated clock to `t` (if later).
    pub fn advance_to(&mut self, t: u64) {
        self.advance(t.saturating_sub(self.now));
    }

    /// Moves the simulated clock on.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        for i in 0..self.part_count() {
            let now = self.now;
            self.part(i).set_now(now);
        }
        self.pump();
    }

    /// A simulator running `cache` as `parts` parts ([`Cache::split`]: shard i in part
    /// i mod parts).
    pub fn with_parts(
        cache: Cache,
        cache_img: MemDevice,
        backing: MemDevice,
        seed: u64,
        parts: usize,
    ) -> Self {
        let mut all = cache.split(parts);
        // `split` returns at least one part.
        let others = all.split_off(1);
        let mut sim = match all.pop() {
            Some(first) => Sim::new(first, cache_img, backing, seed),
            None => unreachable!("Cache::split returned no part"),
        };
        sim.others = others;
        sim
    }

    fn part_count(&self) -> usize {
        1 + self.others.len()
    }

    /// Every part of the cache (just the cache when it is whole).
    pub fn parts(&self) -> impl Iterator<Item = &Cache> {
        std::iter::once(&self.cache).chain(&self.others)
    }

    pub fn parts_mut(&mut self) -> impl Iterator<Item = &mut Cache> {
        std::iter::once(&mut self.cache).chain(&mut self.others)
    }

    fn part(&mut self, i: usize) -> &mut Cache {
        if i == 0 {
            &mut self.cache
        } else {
            &mut self.others[i - 1]
        }
    }

    /// The parts a request concerns (all for a flush).
    fn owners(&mut self, op: Op, lba: u64, len: u32) -> Vec<usize> {
        if op == Op::Flush {
            return (0..self.part_count()).collect();
        }
        let g = *self.cache.geometry();
        let stripe = u64::from(g.stripe_sectors);
        let mut out = Vec::new();
        let mut s = lba / stripe;
        while s * stripe < lba + u64::from(len.max(1)) {
            let shard = g.shard_of(s * stripe);
            if let Some(p) = (0..self.part_count()).find(|&p| self.part(p).owns_shard(shard)) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            s += 1;
        }
        out
    }

    pub fn submit(
        &mut self,
        op: Op,
        lba: u64,
        len: u32,
        data: Option<Vec<u8>>,
    ) -> Result<ReqId, ReqError> {
        let data = match self.submit_direct(op, lba, len, data) {
            Ok(id) => return Ok(id),
            Err(data) => data,
        };
        if self.others.is_empty() {
            return super::submit_request(
                &mut self.cache,
                &mut self.bufs,
                &mut self.next_id,
                op,
                lba,
                len,
                data,
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        self.bufs.insert(id, super::request_buf(op, len, data));
        let owners = self.owners(op, lba, len);
        // Every part checks a request the same way: the first answers for all.
        let r = Request { id, op, lba, len };
        let first = owners.first().copied().unwrap_or(0);
        if let Err(e) = self.part(first).submit(r) {
            self.bufs.remove(&id);
            return Err(e);
        }
        self.waiting.insert(id, (owners.len().max(1), Ok(())));
        for p in owners.into_iter().skip(1) {
            self.part(p).submit(r)?;
        }
        Ok(id)
    }

    /// Serves a read or write with one device I/O of the host's own when the cache allows
    /// ([`Cache::begin_direct`], [`Cache::begin_backing_read`]); else gives `data` back.
    fn submit_direct(
        &mut self,
        op: Op,
        lba: u64,
        len: u32,
        data: Option<Vec<u8>>,
    ) -> Result<ReqId, Option<Vec<u8>>> {
        if !matches!(op, Op::Read | Op::Write) || !self.rng.chance(self.direct_percent) {
            return Err(data);
        }
        let &[part] = self.owners(op, lba, len).as_slice() else {
            return Err(data);
        };
        // A read the cache holds none of and will not fill: read from the backing device
        // (as the SPDK host does after a miss on the submitting thread).
        let d = match self.part(part).begin_direct(op, lba, len) {
            Some(d) => d,
            None if op == Op::Read => match self.part(part).begin_backing_read(lba, len) {
                Some(d) => d,
                None => return Err(data),
            },
            None => return Err(data),
        };
        if self.rng.chance(10) {
            // The host found no I/O to issue it with (SPDK's -ENOMEM): forgotten, and
            // submitted normally.
            self.part(part).cancel_direct(d, len);
            return Err(data);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.bufs.insert(id, super::request_buf(op, len, data));
        let (tag, buf) = (
            DIRECT_TAG | id,
            Buf::Req {
                req: id,
                off: 0,
                len: u64::from(len) * 512,
            },
        );
        let cmd = if d.write {
            Command::Write {
                tag,
                dev: Dev::Cache,
                sector: d.sector,
                buf,
                want_crc: false,
            }
        } else {
            Command::Read {
                tag,
                dev: if d.backing { Dev::Backing } else { Dev::Cache },
                sector: d.sector,
                buf,
                verify_crc: None,
            }
        };
        self.check_blocks(&cmd);
        self.issued += 1;
        self.inflight.push((self.issued, part, cmd));
        self.backing_directs += u64::from(d.backing);
        self.directs.insert(id, (d, lba, len));
        Ok(id)
    }

    /// Collects newly issued commands (after submits or completions), and for a split
    /// cache carries the cross-part traffic until nothing moves.
    pub fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.part_count() {
                self.part(i).poll();
                let cmds = self.part(i).take_commands();
                moved |= !cmds.is_empty();
                for cmd in cmds {
                    if let Command::ZeroBuf { .. } = cmd {
                        let _ = execute(
                            &cmd,
                            &mut self.cache_img,
                            &mut self.backing_live,
                            &mut self.bufs,
                        );
                        continue;
                    }
                    self.check_blocks(&cmd);
                    self.issued += 1;
                    self.inflight.push((self.issued, i, cmd));
                }
                let comps = self.part(i).take_completions();
                if self.others.is_empty() {
                    self.done.extend(comps);
                    continue;
                }
                for (id, r) in comps {
                    // Done when every part answered (they all use its buffer); failed if
                    // any part failed.
                    let Some((left, res)) = self.waiting.get_mut(&id) else {
                        continue;
                    };
                    *left -= 1;
                    if res.is_ok() {
                        *res = r;
                    }
                    if *left == 0 {
                        if let Some((_, res)) = self.waiting.remove(&id) {
                            self.done.push((id, res));
                        }
                    }
                }
            }
            if !self.others.is_empty() {
                moved |= self.exchange();
            }
            if !moved {
                break;
            }
        }
    }

    /// The split cache's cross-part traffic; true if anything moved.
    fn exchange(&mut self) -> bool {
        let mut msgs: Vec<ToPool> = Vec::new();
        let mut grants: Vec<(u32, Grant)> = Vec::new();
        for i in 0..self.part_count() {
            self.part(i).take_pool_messages(&mut msgs);
        }
        let mut moved = !msgs.is_empty();
        for m in msgs {
            self.cache.pool_message(m);
        }
        for i in 0..self.part_count() {
            self.part(i).take_grants(&mut grants);
        }
        moved |= !grants.is_empty();
        let due = self.completed + self.msg_delay;
        for (shard, g) in grants {
            if self.msg_delay > 0 && !self.cache.owns_shard(shard) {
                self.delayed.push_back((due, Delayed::Grant(shard, g)));
            } else {
                self.deliver(Delayed::Grant(shard, g));
            }
        }
        let allowed = (0..self.part_count())
            .map(|i| self.part(i).frontier())
            .min()
            .unwrap_or(0);
        let c = Coordination {
            allowed_epoch: allowed,
            pressure: self.cache.pool_pressure().unwrap_or(false),
        };
        if self.coordination != Some(c) {
            self.coordination = Some(c);
            self.cache.coordinate_with(c);
            if self.msg_delay > 0 {
                self.delayed.push_back((due, Delayed::Coordinate(c)));
            } else {
                self.deliver(Delayed::Coordinate(c));
            }
            moved = true;
        }
        while let Some(&(due, m)) = self.delayed.front() {
            if due > self.completed && !self.inflight.is_empty() {
                break;
            }
            self.delayed.pop_front();
            self.deliver(m);
            moved = true;
        }
        moved
    }

    fn deliver(&mut self, m: Delayed) {
        match m {
            Delayed::Grant(shard, g) => {
                for i in 0..self.part_count() {
                    if self.part(i).owns_shard(shard) {
                        self.part(i).grant(shard, g);
                    }
                }
            }
            Delayed::Coordinate(c) => {
                for o in &mut self.others {
                    o.coordinate_with(c);
                }
            }
        }
    }

    /// Writeback stopped on a backing-device error in some part.
    pub fn writeback_failed(&self) -> bool {
        self.parts().any(|c| c.stats().wb_failed)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// A cache device with blocks larger than a sector takes only whole blocks (an SPDK
    /// bdev refuses anything else): a command that is not is an engine bug, and the
    /// simulator stops on it rather than let it pass as it would on a 512-byte device.
    fn check_blocks(&self, cmd: &Command) {
        let block = self.cache.geometry().block_sectors;
        assert!(
            super::whole_cache_blocks(cmd, block),
            "the engine issued {cmd:?}: not whole {}-byte cache blocks",
            block * 512
        );
    }

    /// Completes one in-flight command chosen at random. Returns false when none is left.
    pub fn step(&mut self) -> bool {
        self.pump();
        if self.inflight.is_empty() {
            return false;
        }
        let i = self.rng.below(self.inflight.len() as u64) as usize;
        let (n, part, cmd) = self.inflight.swap_remove(i);
        let out = self.in_outage(&cmd);
        let fail = out || self.fault.as_mut().is_some_and(|f| f(n, &cmd));
        let done = if fail {
            // A copy fails at its source when the cache device is out (or at random).
            let source = if out {
                self.outages
                    .iter()
                    .any(|&(d, a, b)| d == Dev::Cache && (a..b).contains(&self.now))
            } else {
                self.rng.chance(50)
            };
            let err = match cmd {
                Command::Copy { .. } if source => IoError::Source,
                _ => IoError::Device,
            };
            cmd.tag().map(|tag| IoDone {
                tag,
                result: Err(err),
                crc: None,
            })
        } else if self.corrupt.as_mut().is_some_and(|f| f(n, &cmd)) {
            self.run_corrupted(&cmd)
        } else {
            self.run_one(&cmd)
        };
        self.completed += 1;
        if self.step_ms > 0 {
            self.now += self.step_ms;
            for i in 0..self.part_count() {
                let now = self.now;
                self.part(i).set_now(now);
            }
        }
        match done {
            Some(d) if d.tag & DIRECT_TAG != 0 => {
                let id = d.tag & !DIRECT_TAG;
                if let Some((direct, lba, len)) = self.directs.remove(&id) {
                    let res = self.part(part).end_direct(direct, d.result);
                    let op = if direct.write { Op::Write } else { Op::Read };
                    let again = res.is_err();
                    // A failed direct request goes the normal way, whose cache writes are
                    // retried and whose reads of clean data fall back to the backing
                    // device (as the SPDK host does).
                    if again && self.part(part).submit(Request { id, op, lba, len }).is_ok() {
                        if !self.others.is_empty() {
                            self.waiting.insert(id, (1, Ok(())));
                        }
                    } else {
                        self.done.push((id, res));
                    }
                }
            }
            Some(d) => self.part(part).complete(d),
            None => {}
        }
        self.pump();
        true
    }

    fn run_one(&mut self, cmd: &Command) -> Option<IoDone> {
        let done = execute(
            cmd,
            &mut self.cache_img,
            &mut self.backing_live,
            &mut self.bufs,
        );
        match cmd {
            Command::Write {
                dev: Dev::Backing,
                sector,
                buf,
                ..
            } => {
                let mut data = vec![0u8; buf.len() as usize];
                if self.backing_live.read(*sector, &mut data).is_ok() {
                    self.unflushed.push((*sector, data));
                }
            }
            Command::Copy {
                dst: Dev::Backing,
                dst_sector,
                sectors,
                ..
            } => {
                let mut data = vec![0u8; (*sectors * 512) as usize];
                if self.backing_live.read(*dst_sector, &mut data).is_ok() {
                    self.unflushed.push((*dst_sector, data));
                }
            }
            Command::WriteZeroes {
                dev: Dev::Backing,
                sector,
                sectors,
                ..
            }
            | Command::Unmap {
                dev: Dev::Backing,
                sector,
                sectors,
                ..
            } => self
                .unflushed
                .push((*sector, vec![0u8; (*sectors * 512) as usize])),
            Command::Flush {
                dev: Dev::Backing, ..
            } => {
                for (s, d) in self.unflushed.drain(..) {
                    let _ = self.backing_durable.write(s, &d);
                }
            }
            _ => {}
        }
        done
    }

    /// Runs a cache read with one byte of what it reads flipped (the media itself stays
    /// intact, as after a bad transfer).
    fn run_corrupted(&mut self, cmd: &Command) -> Option<IoDone> {
        let range = match cmd {
            Command::Read {
                dev: Dev::Cache,
                sector,
                buf,
                ..
            } => Some((*sector, buf.len() / 512)),
            Command::Copy {
                src: Dev::Cache,
                src_sector,
                sectors,
                verify,
                ..
            } => Some(Verify::read_range(verify.as_ref(), *src_sector, *sectors)),
            _ => None,
        };
        let Some((sector, sectors)) = range.filter(|r| r.1 > 0) else {
            return self.run_one(cmd);
        };
        let at = sector + self.rng.below(sectors);
        let byte = self.rng.below(512) as usize;
        let mut old = vec![0u8; 512];
        if self.cache_img.read(at, &mut old).is_err() {
            return self.run_one(cmd);
        }
        let mut bad = old.clone();
        bad[byte] ^= 1 << self.rng.below(8);
        let _ = self.cache_img.write(at, &bad);
        let done = self.run_one(cmd);
        let _ = self.cache_img.write(at, &old);
        self.corrupted += 1;
        done
    }

    /// Runs until no command is in flight and no request waits for time: the clock jumps
    /// to the next deadline (a retry, a timeout) whenever nothing else can happen.
    pub fn run(&mut self) {
        loop {
            while self.step() {}
            let waiting = self.parts().any(Cache::waits_for_time);
            let next = self.parts().filter_map(Cache::next_deadline).min();
            match next {
                Some(t) if waiting && t > self.now => self.advance(t - self.now),
                Some(_) if waiting => self.advance(1),
                _ => return,
            }
        }
    }

    /// Runs until nothing is in flight and no retry or timeout is pending at all (writeback
    /// included), moving the clock as [`Sim::run`] does, for at most `limit_ms` of
    /// simulated time.
    pub fn settle(&mut self, limit_ms: u64) {
        let end = self.now + limit_ms;
        loop {
            while self.step() {}
            let next = self.parts().filter_map(Cache::next_deadline).min();
            match next {
                Some(t) if t <= end => self.advance(t.saturating_sub(self.now).max(1)),
                _ => return,
            }
        }
    }

    /// Completed requests not yet taken.
    pub fn take_done_peek(&mut self) -> usize {
        self.pump();
        self.done.len()
    }

    pub fn take_done(&mut self) -> Vec<(ReqId, ReqResult, Vec<u8>)> {
        self.pump();
        self.done
            .drain(..)
            .map(|(id, r)| (id, r, self.bufs.remove(&id).unwrap_or_default()))
            .collect()
    }

    /// The device images a crash right now would leave: (cache, backing).
    pub fn crash(&mut self) -> (MemDevice, MemDevice) {
        let mut cache = self.cache_img.clone();
        let mut backing = self.backing_durable.clone();
        for (s, d) in &self.unflushed {
            if self.rng.chance(50) {
                let _ = backing.write(*s, d);
            }
        }
        for (_, _, cmd) in &self.inflight {
            if let Command::Copy {
                src,
                src_sector,
                dst: Dev::Cache,
                dst_sector,
                sectors,
                ..
            } = cmd
            {
                // A copy into the cache (GC's second chance) tears like a write of the
                // data it read.
                let mut data = vec![0u8; (*sectors * 512) as usize];
                let read = match src {
                    Dev::Cache => self.cache_img.read(*src_sector, &mut data),
                    Dev::Backing => self.backing_live.read(*src_sector, &mut data),
                };
                if read.is_err() {
                    continue;
                }
                let unit = self.cache.geometry().block_bytes();
                for (i, chunk) in data.chunks(unit).enumerate() {
                    if self.rng.chance(50) {
                        let _ = cache.write(dst_sector + (i * unit / 512) as u64, chunk);
                    }
                }
                continue;
            }
            let Command::Write {
                dev, sector, buf, ..
            } = cmd
            else {
                continue;
            };
            let data = match buf {
                crate::engine::Buf::Owned(v) => v.clone(),
                b @ crate::engine::Buf::Req { req, off, len } => {
                    let _ = b;
                    match self.bufs.get(req) {
                        Some(v) => v[*off as usize..(*off + *len) as usize].to_vec(),
                        None => continue,
                    }
                }
            };
            let (target, unit) = match dev {
                Dev::Cache => (&mut cache, self.cache.geometry().block_bytes()),
                Dev::Backing => (&mut backing, 512),
            };
            for (i, chunk) in data.chunks(unit).enumerate() {
                if self.rng.chance(50) {
                    let _ = target.write(sector + (i * unit / 512) as u64, chunk);
                }
            }
        }
        (cache, backing)
    }
}
