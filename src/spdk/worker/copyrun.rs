//! Writeback copies whose sources follow one another in the cache (the log, written back in
//! its order): one read of the cache bdev for the run, then one write per copy to the
//! backing bdev, from that one buffer. At zipfian 70/30 over a malloc cache, 88 % of
//! writeback copies went in runs (`device_copies_joined`); each run saves the bdev I/O,
//! accel task and completion of the reads it replaces.
//!
//! Calls device I/O (`devio`) only.

use std::rc::Rc;

use super::devio::{DevIo, Kind, Purpose};
use super::dma::DmaBuf;
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
struct HostCopy {
    tag: u64,
    src: u64,
    dst: u64,
    sectors: u64,
}

impl Worker {
    /// Executes `cmds` in order, copies that can share a read as runs.
    pub(super) fn execute_all(&mut self, cmds: &mut Vec<Command>) {
        let mut it = cmds.drain(..).peekable();
        while let Some(c) = it.next() {
            let Some(first) = self.joinable(&c) else {
                self.execute(c);
                continue;
            };
            let mut run = vec![first];
            let mut end = first.src + first.sectors;
            let mut sectors = first.sectors;
            while let Some(next) = it.peek().and_then(|n| self.joinable(n)) {
                if next.src != end
                    || sectors + next.sectors > MAX_RUN_SECTORS
                    || run.len() == MAX_RUN_COPIES
                {
                    break;
                }
                end += next.sectors;
                sectors += next.sectors;
                run.push(next);
                it.next();
            }
            if run.len() == 1 {
                self.execute(c);
            } else {
                self.copy_run(&run, sectors);
            }
        }
    }

    /// `c` as a copy a run can take: from a cache bdev (a mapped cache has its own ways)
    /// to the backing bdev, nothing to verify, in whole cache blocks.
    fn joinable(&self, c: &Command) -> Option<HostCopy> {
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

    /// Reads the run's sources (`sectors` in all) at once; `complete_dio` then writes
    /// each copy (`write_run`).
    fn copy_run(&mut self, run: &[HostCopy], sectors: u64) {
        let first = run[0];
        let mut d = self.new_dio(Purpose::Cmd, first.tag, Kind::CopyRead, Dev::Cache);
        d.copy_dst = (Dev::Backing, first.dst);
        // The run's read is written back only in part by this one: its own copy.
        d.copy_part = Some((0, first.sectors));
        d.run.extend(run[1..].iter().map(|c| RunCopy {
            tag: c.tag,
            skip: (c.src - first.src) * 512,
            dst_sector: c.dst,
            sectors: c.sectors,
        }));
        self.counters.dev_copies += run.len() as u64;
        self.counters.dev_copies_joined += run.len() as u64;
        self.copy_through_host(d, first.src, sectors, None);
    }

    /// The run's read into `d` succeeded: each other copy of it is written from its part of
    /// the buffer, which they and `d` share until the last is done.
    pub(super) fn write_run(&mut self, d: &mut DevIo) {
        let (Some(buf), Some(base)) = (d.dma.take(), d.iovs.first().map(|v| v.iov_base)) else {
            // A run always reads into a buffer of its own; without one, its copies fail.
            return self.fail_run(d, IoError::Device);
        };
        let shared = Rc::new(buf);
        for c in std::mem::take(&mut d.run) {
            let mut w = self.new_dio(Purpose::Cmd, c.tag, Kind::CopyWrite, Dev::Backing);
            // SAFETY: `skip + sectors * 512` lies inside the buffer the run read: its copies
            // were joined only while their sources followed one another.
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

    /// Gives a run's shared buffer back to the pool once its last copy is done.
    pub(super) fn release_shared(&mut self, shared: Rc<DmaBuf>) {
        if let Ok(buf) = Rc::try_unwrap(shared) {
            self.dma.put(buf);
        }
    }
}
