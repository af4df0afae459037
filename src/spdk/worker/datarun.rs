//! Data writes to the cache bdev whose blocks follow one another (a batch's data, and
//! batches issued together: a segment's data grows down from its end, batch below batch)
//! as one bdev write, each part from its own request's buffer (`DevIo::parts`). A run
//! saves the bdev I/O, accel task and completion of each write it replaces. A failed run
//! fails each of its writes, which the engine handles (retries) as it would one.
//!
//! Calls device I/O (`devio`) only.

use super::devio::{iov_crc, Kind, Purpose};
use super::Worker;
use crate::engine::{Buf, Command, Dev, ReqId};

/// The most one run writes, and the most writes it joins.
const MAX_RUN_SECTORS: u64 = 256;
const MAX_RUN_WRITES: usize = 32;

/// A data write to the cache bdev from a request's buffer that may join a run.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostWrite {
    pub(super) tag: u64,
    pub(super) sector: u64,
    pub(super) req: ReqId,
    pub(super) off: u64,
    pub(super) len: u64,
    pub(super) want_crc: bool,
}

impl HostWrite {
    fn sectors(&self) -> u64 {
        self.len / 512
    }
}

impl Worker {
    /// `c` as a write a run can take: to a cache bdev (a mapped cache writes inline), from
    /// a request's buffer, in whole cache blocks.
    pub(super) fn joinable_write(&self, c: &Command) -> Option<HostWrite> {
        match *c {
            Command::Write {
                tag,
                dev: Dev::Cache,
                sector,
                buf: Buf::Req { req, off, len },
                want_crc,
            } if self.dax.is_none()
                && len % 512 == 0
                && self.blocks_of(Dev::Cache, sector, len / 512).is_some() =>
            {
                Some(HostWrite {
                    tag,
                    sector,
                    req,
                    off,
                    len,
                    want_crc,
                })
            }
            _ => None,
        }
    }

    /// Executes `writes` (taken from them), sorted by sector, those that follow one
    /// another as one bdev write each.
    pub(super) fn execute_writes(&mut self, writes: &mut Vec<HostWrite>) {
        if writes.len() > 1 {
            writes.sort_unstable_by_key(|w| w.sector);
        }
        let mut it = writes.drain(..).peekable();
        while let Some(first) = it.next() {
            let mut d = self.new_dio(Purpose::Cmd, first.tag, Kind::Write, Dev::Cache);
            if !self.attach_req(&mut d, first.req, first.off, first.len) {
                self.fail_now(d);
                continue;
            }
            if first.want_crc {
                d.crc = Some(iov_crc(&d.iovs));
            }
            let mut end = first.sector + first.sectors();
            while let Some(next) = it.peek().copied() {
                if next.sector != end
                    || end + next.sectors() - first.sector > MAX_RUN_SECTORS
                    || d.parts.len() + 1 == MAX_RUN_WRITES
                    || !self.attach_part(
                        &mut d,
                        next.tag,
                        (next.req, next.off, next.len),
                        next.want_crc,
                    )
                {
                    // One that cannot be attached fails on its own, as the next first.
                    break;
                }
                end += next.sectors();
                it.next();
            }
            self.counters.dev_writes += 1;
            if !d.parts.is_empty() {
                self.counters.dev_writes_joined += 1 + d.parts.len() as u64;
            }
            if self.set_range(&mut d, first.sector, end - first.sector) {
                self.issue(d);
            } else {
                self.fail_now(d);
            }
        }
    }
}
