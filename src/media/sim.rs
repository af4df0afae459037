//! The simulator: runs a [`Cache`] over RAM images with completions in a seeded random
//! order, chosen commands failing, and crashes at any instant.
//!
//! Durability model. Cache device: a write is durable once it completes (persistent
//! memory); a write still in flight at a crash is torn: each 512-byte sector is old or new
//! at random. Backing device: completed writes are volatile until a flush completes; at a
//! crash each unflushed write survives or not at random.

use super::mem::MemDevice;
use super::{execute, BlockDevice, Buffers};
use crate::engine::{Cache, Command, Dev, IoDone, IoError, Op, ReqError, ReqId, ReqResult};

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

/// Decides which issued commands fail: gets the command's issue number and the command.
pub type FaultFn = Box<dyn FnMut(u64, &Command) -> bool>;

pub struct Sim {
    pub cache: Cache,
    pub cache_img: MemDevice,
    backing_live: MemDevice,
    backing_durable: MemDevice,
    unflushed: Vec<(u64, Vec<u8>)>,
    bufs: Buffers,
    inflight: Vec<(u64, Command)>,
    pub rng: Rng,
    issued: u64,
    fault: Option<FaultFn>,
    done: Vec<(ReqId, ReqResult)>,
    next_id: ReqId,
    /// Number of device commands completed so far.
    pub completed: u64,
}

impl Sim {
    pub fn new(cache: Cache, cache_img: MemDevice, backing: MemDevice, seed: u64) -> Self {
        Sim {
            cache,
            cache_img,
            backing_durable: backing.clone(),
            backing_live: backing,
            unflushed: Vec::new(),
            bufs: Buffers::new(),
            inflight: Vec::new(),
            rng: Rng::new(seed),
            issued: 0,
            fault: None,
            done: Vec::new(),
            next_id: 1,
            completed: 0,
        }
    }

    pub fn set_fault(&mut self, f: FaultFn) {
        self.fault = Some(f);
    }

    pub fn submit(
        &mut self,
        op: Op,
        lba: u64,
        len: u32,
        data: Option<Vec<u8>>,
    ) -> Result<ReqId, ReqError> {
        super::submit_request(
            &mut self.cache,
            &mut self.bufs,
            &mut self.next_id,
            op,
            lba,
            len,
            data,
        )
    }

    /// Collects newly issued commands (after submits or completions).
    pub fn pump(&mut self) {
        self.cache.poll();
        for cmd in self.cache.take_commands() {
            if let Command::ZeroBuf { .. } = cmd {
                let _ = execute(
                    &cmd,
                    &mut self.cache_img,
                    &mut self.backing_live,
                    &mut self.bufs,
                );
                continue;
            }
            self.issued += 1;
            self.inflight.push((self.issued, cmd));
        }
        self.done.append(&mut self.cache.take_completions());
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Completes one in-flight command chosen at random. Returns false when none is left.
    pub fn step(&mut self) -> bool {
        self.pump();
        if self.inflight.is_empty() {
            return false;
        }
        let i = self.rng.below(self.inflight.len() as u64) as usize;
        let (n, cmd) = self.inflight.swap_remove(i);
        let fail = self.fault.as_mut().is_some_and(|f| f(n, &cmd));
        let done = if fail {
            cmd.tag().map(|tag| IoDone {
                tag,
                result: Err(IoError::Device),
                crc: None,
            })
        } else {
            self.run_one(&cmd)
        };
        self.completed += 1;
        if let Some(d) = done {
            self.cache.complete(d);
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

    /// Runs until no command is in flight.
    pub fn run(&mut self) {
        while self.step() {}
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
        for (_, cmd) in &self.inflight {
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
            let target = match dev {
                Dev::Cache => &mut cache,
                Dev::Backing => &mut backing,
            };
            for (i, sec) in data.chunks(512).enumerate() {
                if self.rng.chance(50) {
                    let _ = target.write(sector + i as u64, sec);
                }
            }
        }
        (cache, backing)
    }
}
