//! Writeback copies whose sources lie together in the cache (the log, written back in its
//! order, batch by batch): one read of the cache bdev for the run, then one write per copy
//! to the backing bdev, from that one buffer (or the memory the cache bdev lends). Each run
//! saves the bdev I/O, accel task and completion of the reads it replaces.
//!
//! Calls device I/O (`devio`) only.

use std::rc::Rc;

use super::devio::{DevIo, Kind, Purpose};
use super::dma::Held;
use super::Worker;
use crate::engine::{Command, Dev, IoDone, IoError};
use crate::spdk::ffi;

/// The most a run reads at once, and the most copies it joins.
const MAX_RUN_SECTORS: u64 = 256;
const MAX_RUN_COPIES: usize = 32;

/// One copy of a run after its first: its tag, where its data lies in the run's buffer,
/// and where it goes on the backing bdev.
#[derive(Debug, Clone, Copy)]
pub(super) struct RunCopy {
    tag: u64,
    skip: u64,
    dst_sector: u64,
    sectors: u64,
}

/// A copy from the cache to the backing bdev that may join a run.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostCopy {
    tag: u64,
    src: u64,
    dst: u64,
    sectors: u64,
}

impl HostCopy {
    /// The copy on its own.
    fn command(self) -> Command {
        Command::Copy {
            tag: self.tag,
            src: Dev::Cache,
            src_sector: self.src,
            dst: Dev::Backing,
            dst_sector: self.dst,
            sectors: self.sectors,
            verify: None,
        }
    }
}

impl Worker {
    /// Executes `copies` (taken from them), those whose sources lie close together in
    /// one run each. They are issued together, so their order on the devices was never
    /// fixed, and they are sorted by source: writeback takes them in log order, and a
    /// segment's data grows down from its end, batch below batch, so the log's order runs
    /// backwards through the cache but for the blocks of one batch. Over memory the cache
    /// bdev lends, a run may skip blocks (stale, or clean): reading them copies nothing.
    /// A run's read is started only once a second copy joins, and the copies after the
    /// first go straight into it (`DevIo::run`, whose room is kept when the `DevIo` is
    /// recycled): nothing is allocated per copy.
    pub(super) fn execute_copies(&mut self, copies: &mut Vec<HostCopy>) {
        if copies.len() > 1 {
            copies.sort_unstable_by_key(|h| h.src);
        }
        let gaps = self.zcopy;
        let mut it = copies.drain(..).peekable();
        while let Some(first) = it.next() {
            let mut end = first.src + first.sectors;
            let mut run: Option<Box<DevIo>> = None;
            while let Some(next) = it.peek().copied() {
                let copies = run.as_ref().map_or(1, |d| d.run.len() + 1);
                if next.src < end
                    || (next.src > end && !gaps)
                    || next.src + next.sectors - first.src > MAX_RUN_SECTORS
                    || copies == MAX_RUN_COPIES
                {
                    break;
                }
                let d = run.get_or_insert_with(|| self.run_read(first));
                d.run.push(RunCopy {
                    tag: next.tag,
                    skip: (next.src - first.src) * 512,
                    dst_sector: next.dst,
                    sectors: next.sectors,
                });
                end = next.src + next.sectors;
                it.next();
            }
            match run {
                Some(d) => {
                    let copies = d.run.len() as u64 + 1;
                    self.counters.dev_copies += copies;
                    self.counters.dev_copies_joined += copies;
                    self.counters.dev_copy_runs += 1;
                    self.copy_through_host(d, first.src, end - first.src, None);
                }
                None => self.execute(first.command()),
            }
        }
    }

    /// `c` as a copy a run can take: from a cache bdev (a mapped cache has its own ways)
    /// to the backing bdev, nothing to verify, in whole cache blocks.
    pub(super) fn joinable_copy(&self, c: &Command) -> Option<HostCopy> {
        match *c {
            Command::Copy {
                tag,
                src: Dev::Cache,
                src_sector,
                dst: Dev::Backing,
                dst_sector,
                sectors,
                verify: None,
            } if self.dax.is_none()
                && self.blocks_of(Dev::Cache, src_sector, sectors).is_some() =>
            {
                Some(HostCopy {
                    tag,
                    src: src_sector,
                    dst: dst_sector,
                    sectors,
                })
            }
            _ => None,
        }
    }

    /// The read of a run that starts with copy `first`: `copy_through_host` reads all of
    /// the run's sources; `complete_dio` then writes each copy (`write_run`).
    fn run_read(&mut self, first: HostCopy) -> Box<DevIo> {
        let mut d = self.new_dio(Purpose::Cmd, first.tag, Kind::CopyRead, Dev::Cache);
        d.copy_dst = (Dev::Backing, first.dst);
        // The run's read is written back only in part by this one: its own copy.
        d.copy_part = Some((0, first.sectors));
        d
    }

    /// The run's read into `d` succeeded: each other copy of it is written from its part of
    /// the buffer (or of the memory the cache bdev lent), which they and `d` share until the
    /// last is done.
    pub(super) fn write_run(&mut self, d: &mut DevIo) {
        let (Some(buf), Some(base)) = (d.held.take(), d.iovs.first().map(|v| v.iov_base)) else {
            // A run always reads into a buffer of its own; without one, its copies fail.
            return self.fail_run(d, IoError::Device);
        };
        let shared = Rc::new(buf);
        for c in d.run.drain(..) {
            let mut w = self.new_dio(Purpose::Cmd, c.tag, Kind::CopyWrite, Dev::Backing);
            // SAFETY: `skip + sectors * 512` lies inside the buffer the run read: a copy
            // joins a run only while its source ends inside the run's read.
            let at = unsafe { base.cast::<u8>().add(c.skip as usize) };
            w.iovs.push(ffi::iovec {
                iov_base: at.cast(),
                iov_len: (c.sectors * 512) as usize,
            });
            w.shared = Some(Rc::clone(&shared));
            if self.set_range(&mut w, c.dst_sector, c.sectors) {
                self.issue(w);
            } else {
                self.fail_now(w);
            }
        }
        d.shared = Some(shared);
    }

    /// The run's read failed (or could not start): so does every other copy of it.
    pub(super) fn fail_run(&mut self, d: &mut DevIo, err: IoError) {
        for c in d.run.drain(..) {
            self.dones.push(IoDone {
                tag: c.tag,
                result: Err(err),
                crc: None,
            });
            self.kick = true;
        }
    }

    /// Gives a run's shared buffer back once its last copy is done (to the pool, or lent
    /// memory to the cache bdev: `Worker::release`).
    pub(super) fn release_shared(&mut self, shared: Rc<Held>) {
        if let Ok(held) = Rc::try_unwrap(shared) {
            self.release(held);
        }
    }
}
