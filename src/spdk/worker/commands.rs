//! The cache pump: the fast (period-0) poller takes the requests that arrived, then polls
//! the [`Cache`](crate::engine::Cache), hands it the device completions, completes the
//! requests it finished and executes the commands it issued, a few rounds per poll (what is
//! left waits for the next one).
//!
//! Calls intake, reply, device I/O and the team exchange; nothing above the worker.

use std::ffi::{c_int, c_void};
use std::ptr;

use super::devio::{iov_crc, sub_iovs, DevIo, Kind, Purpose};
use super::{dev_index, State, Worker};
use crate::engine::{Buf, Command, Dev, IoDone, Verify};
use crate::spdk::ffi;
use crate::spdk::log::{no_unwind, spdk_log};

/// Rounds of one pump. Over a mapped cache, commands complete inline and their results
/// make the next round, so a pump could go on as long as GC has moves to log (a reclaimed
/// segment's, a few at a time) while other pollers' completions wait: with 64 rounds, p99.9
/// latency of a zipf run was about a millisecond; with 2, a third of it, at the same IOPS
/// (what is left runs in the next reactor iteration, microseconds later).
const PUMP_ROUNDS: usize = 2;

impl Worker {
    // ---- the cache pump ----

    /// Runs the cache until it has nothing more to say, for at most [`PUMP_ROUNDS`]
    /// rounds: poll, execute commands, hand back immediate results, complete requests.
    /// What is left (immediate results still to hand back) waits for the next reactor
    /// iteration. Returns whether anything happened.
    pub(super) fn pump(&mut self) -> bool {
        let mut did = false;
        for _ in 0..PUMP_ROUNDS {
            let Some(cache) = self.cache.as_deref_mut() else {
                break;
            };
            if !self.dones.is_empty() {
                did = true;
                if self.dones.len() > 1 {
                    cache.warm_dones(&self.dones);
                }
                for d in self.dones.drain(..) {
                    cache.complete(d);
                }
            }
            cache.poll();
            cache.drain_commands_into(&mut self.cmds);
            cache.drain_completions_into(&mut self.comps);
            let log = cache.take_log();
            for l in log {
                spdk_log!(NOTICE, "{}: {l}", self.name);
            }
            if self.cmds.is_empty() && self.comps.is_empty() {
                break;
            }
            did = true;
            let mut comps = std::mem::take(&mut self.comps);
            for (id, res) in comps.drain(..) {
                self.request_done(id, res);
            }
            self.comps = comps;
            let mut cmds = std::mem::take(&mut self.cmds);
            self.execute_all(&mut cmds);
            self.cmds = cmds;
            if self.dones.is_empty() {
                break;
            }
        }
        self.exchange();
        did
    }

    /// Executes `cmds` in order, except for two kinds that are gathered and issued
    /// joined when nothing else comes between: writeback's copies from the cache bdev
    /// (`copyrun`: runs sharing a read) and data writes to it (`datarun`: runs of writes
    /// to adjacent blocks, one bdev write each). Commands of one pump are all in flight
    /// together, so their order on the devices was never fixed; a mapped cache, which
    /// executes its commands inline, joins neither.
    pub(super) fn execute_all(&mut self, cmds: &mut Vec<Command>) {
        let mut copies = std::mem::take(&mut self.copies);
        let mut writes = std::mem::take(&mut self.writes);
        for c in cmds.drain(..) {
            if let Some(h) = self.joinable_copy(&c) {
                copies.push(h);
            } else if let Some(w) = self.joinable_write(&c) {
                writes.push(w);
            } else {
                self.execute_copies(&mut copies);
                self.execute_writes(&mut writes);
                self.execute(c);
            }
        }
        self.execute_copies(&mut copies);
        self.execute_writes(&mut writes);
        self.copies = copies;
        self.writes = writes;
    }

    pub(super) fn execute(&mut self, cmd: Command) {
        match cmd {
            Command::ZeroBuf { buf } => {
                if let Buf::Req { req, off, len } = buf {
                    let mut scratch = Vec::new();
                    if let Some(idx) = self.reqs.index(req) {
                        let iovs = self.reqs.slots[idx as usize].iovs();
                        if !iovs.is_empty() && sub_iovs(iovs, off, len, &mut scratch) {
                            for v in &scratch {
                                // SAFETY: a sub-range of the pending request's buffer.
                                unsafe { ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                            }
                        }
                    }
                }
            }
            Command::Write {
                tag,
                dev,
                sector,
                buf,
                want_crc,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Write, dev);
                let ok = match buf {
                    Buf::Req { req, off, len } => {
                        let ok = self.attach_req(&mut d, req, off, len);
                        if ok && want_crc {
                            d.crc = Some(iov_crc(&d.iovs));
                        }
                        ok
                    }
                    Buf::Owned(v) => self.attach_vec(&mut d, v),
                };
                let sectors = d.sectors;
                if !ok || !self.set_range(&mut d, sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_writes += 1;
                self.issue(d);
            }
            Command::Read {
                tag,
                dev,
                sector,
                buf,
                verify_crc,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Read, dev);
                let ok = match &buf {
                    Buf::Req { req, off, len } => self.attach_req(&mut d, *req, *off, *len),
                    Buf::Owned(_) => false,
                };
                d.verify = verify_crc;
                let sectors = d.sectors;
                if !ok || !self.set_range(&mut d, sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_reads += 1;
                self.issue(d);
            }
            Command::Flush { tag, dev } => {
                let i = dev_index(dev);
                if !self.flush_ok[i] && !self.removed[i] {
                    // No volatile cache to flush: completed writes are durable.
                    self.dones.push(IoDone::ok(tag));
                    return;
                }
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Flush, dev);
                d.offset = 0;
                d.blocks = self.blocks[i];
                self.counters.dev_flushes += 1;
                self.issue(d);
            }
            // Both read as zeros afterwards: write zeroes (the bdev layer emulates it with
            // writes where the device has no native support). An UNMAP of the backing bdev
            // need not read back as zeros, which the engine relies on.
            Command::WriteZeroes {
                tag,
                dev,
                sector,
                sectors,
            }
            | Command::Unmap {
                tag,
                dev,
                sector,
                sectors,
            } => {
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::Zeroes, dev);
                if !self.set_range(&mut d, sector, sectors) {
                    return self.fail_now(d);
                }
                self.counters.dev_zeroes += 1;
                self.issue(d);
            }
            Command::Copy {
                tag,
                src,
                src_sector,
                dst,
                dst_sector,
                sectors,
                verify,
            } => {
                if self.copy_offload && src == Dev::Cache && dst == Dev::Cache && verify.is_none() {
                    // Within the cache, with nothing to check on the way: the bdev copies
                    // (one memory copy on a RAM-backed bdev, none through the host on a
                    // device that copies itself), or a mapped cache copies from the
                    // mapping to itself (`dax_run`), with no bounce buffer.
                    let mut d = self.new_dio(Purpose::Cmd, tag, Kind::CopyBlocks, dst);
                    d.copy_dst = (dst, dst_sector);
                    match self.blocks_of(Dev::Cache, src_sector, sectors) {
                        Some([offset, _]) if self.set_range(&mut d, dst_sector, sectors) => {
                            d.copy_from = offset;
                        }
                        _ => return self.fail_now(d),
                    }
                    self.counters.dev_copies += 1;
                    self.counters.dev_copies_offloaded += 1;
                    return self.issue(d);
                }
                let mut d = self.new_dio(Purpose::Cmd, tag, Kind::CopyRead, src);
                d.copy_dst = (dst, dst_sector);
                self.counters.dev_copies += 1;
                if let (None, Dev::Cache, Dev::Backing, Some(iov)) =
                    (verify, src, dst, self.mapped_iov(src_sector, sectors))
                {
                    // Writeback from a registered mapped cache: the backing bdev takes the
                    // data from the mapping itself. It stays put until the write completes:
                    // the range is not rewritten in place while writeback copies it, and
                    // its segment is not reclaimed before the dirty tail passes it.
                    d.kind = Kind::CopyWrite;
                    d.dev = dst;
                    d.iovs.push(iov);
                    if !self.set_range(&mut d, dst_sector, sectors) {
                        return self.fail_now(d);
                    }
                    self.counters.dev_copies_from_mapping += 1;
                    return self.issue(d);
                }
                self.copy_through_host(d, src_sector, sectors, verify);
            }
        }
    }

    /// Starts copy `d` (its destination set) as a read of the source into a DMA buffer,
    /// written out when it completes (`complete_dio`). With `verify`, the whole extent is
    /// read, checked against its CRC, and only the part asked for written.
    pub(super) fn copy_through_host(
        &mut self,
        mut d: Box<DevIo>,
        src_sector: u64,
        sectors: u64,
        verify: Option<Verify>,
    ) {
        d.kind = Kind::CopyRead;
        let (read_at, read_sectors) = match verify {
            Some(v) => match v.offset_of(src_sector) {
                Some(skip) if src_sector + sectors <= v.sector + v.sectors => {
                    d.verify = Some(v.crc);
                    d.copy_part = Some((skip, sectors));
                    (v.sector, v.sectors)
                }
                _ => return self.fail_now(d),
            },
            None => (src_sector, sectors),
        };
        let len = usize::try_from(read_sectors.saturating_mul(512)).unwrap_or(usize::MAX);
        if self.zcopy && d.dev == Dev::Cache {
            // The cache bdev lends its own memory: the backing writes take the data from
            // there, with no copy into a buffer of ours (`Worker::lent`).
            d.lend = true;
            if !self.set_range(&mut d, read_at, read_sectors) {
                return self.fail_now(d);
            }
            return self.issue(d);
        }
        if self.hold_buffer(&mut d, len).is_none() {
            spdk_log!(
                ERROR,
                "{}: out of DMA memory for a {len}-byte copy",
                self.name
            );
            return self.fail_now(d);
        }
        if !self.set_range(&mut d, read_at, read_sectors) {
            return self.fail_now(d);
        }
        self.issue(d);
    }
}

pub(super) unsafe extern "C" fn fast_poll(arg: *mut c_void) -> c_int {
    no_unwind("pcache engine poller", 0, || {
        // SAFETY: the worker registered this poller with itself as argument and unregisters
        // it before being freed; pollers run at the top level of the worker thread.
        let e = unsafe { &mut *arg.cast::<Worker>() };
        let resubmitted = !e.nomem.is_empty() && e.resubmit_waiting();
        // Nothing arrived and nothing waits (the usual case while a submitter on this core
        // serves its read hits itself): this runs every reactor iteration, and the shorter
        // the iteration, the sooner the submitter's next step runs.
        if e.inbox.is_empty()
            && e.links.is_empty()
            && !e.kick
            && e.dones.is_empty()
            && e.resets.is_empty()
            && e.unfenced.is_empty()
        {
            return if resubmitted {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
            } else {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
            };
        }
        // Requests served directly leave nothing to pump but were work all the same.
        let took = e.submit_incoming();
        if matches!(e.state, State::Running | State::Draining) {
            e.finish_resets();
        }
        if !e.kick && e.dones.is_empty() {
            return if took {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
            } else {
                ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
            };
        }
        e.kick = false;
        if matches!(e.state, State::Running | State::Draining) && (e.pump() || took) {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_BUSY as c_int
        } else {
            ffi::spdk_thread_poller_rc::SPDK_POLLER_IDLE as c_int
        }
    })
}
