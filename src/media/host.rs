//! A synchronous host: runs a [`Cache`] over two [`BlockDevice`]s on the calling thread.
//! Used by the `pcache` tool, benchmarks and tests.

use thiserror::Error;

use super::{execute, BlockDevice, Buffers};
use crate::engine::format::SB_BYTES;
use crate::engine::geometry::{SB_A_SECTOR, SB_B_SECTOR};
use crate::engine::{
    format, BackingIdentity, Cache, CacheOptions, Command, FormatOptions, GeometryError, IoDone,
    Op, OpenError, OpenReport, OpenStep, Opener, ReqError, ReqId, ReqResult, Superblock,
};

#[derive(Debug, Error)]
pub enum HostError {
    #[error("cannot format: {0}")]
    Geometry(#[from] GeometryError),
    #[error("cannot open cache: {0}")]
    Open(#[from] OpenError),
    #[error("device write failed while formatting")]
    FormatIo,
    #[error("cannot record the backing device's identity: {0}")]
    Record(#[from] RecordError),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("{what} of the superblock failed: {err}")]
    Io {
        what: &'static str,
        err: crate::engine::IoError,
    },
    #[error("no valid superblock replica to rewrite: {0}")]
    Format(#[from] crate::engine::FormatError),
}

/// Records `backing` as the cache's backing device in both superblock replicas (after an
/// open with `backing_uuid_mismatch: accept`): the valid replica (A, else B) rewritten with
/// the new identity ([`Superblock::rebind`]), written to A, flushed, then to B, flushed, so
/// a crash leaves at least one valid replica (the old identity or the new one).
pub fn record_backing(
    dev: &mut dyn BlockDevice,
    backing: &BackingIdentity,
) -> Result<(), RecordError> {
    let io = |what| move |err| RecordError::Io { what, err };
    let mut buf = vec![0u8; 2 * SB_BYTES];
    dev.read(SB_A_SECTOR, &mut buf).map_err(io("read"))?;
    let (a, b) = buf.split_at(SB_BYTES);
    let src = if Superblock::decode(a).is_ok() { a } else { b };
    let bytes = Superblock::rebind(src, backing)?;
    for sector in [SB_A_SECTOR, SB_B_SECTOR] {
        dev.write(sector, &bytes).map_err(io("write"))?;
        dev.flush().map_err(io("flush"))?;
    }
    Ok(())
}

/// Drives an [`Opener`] to completion against a synchronous cache device.
pub fn open_cache(
    dev: &mut dyn BlockDevice,
    backing: BackingIdentity,
    opts: CacheOptions,
) -> (Result<Cache, OpenError>, OpenReport) {
    let mut opener = Opener::new(backing, opts);
    let mut step = opener.start();
    loop {
        match step {
            OpenStep::Read { sector, sectors } => {
                let mut buf = vec![0u8; (sectors * 512) as usize];
                let res = dev.read(sector, &mut buf).map(|()| buf);
                step = opener.step(res);
            }
            OpenStep::Done(cache) => return (Ok(*cache), opener.report().clone()),
            OpenStep::Failed(e) => return (Err(e), opener.report().clone()),
        }
    }
}

pub struct SyncHost<C: BlockDevice, B: BlockDevice> {
    pub cache: Cache,
    pub cache_dev: C,
    pub backing_dev: B,
    bufs: Buffers,
    next_id: ReqId,
    done: Vec<(ReqId, ReqResult)>,
    cmds: Vec<Command>,
    completions: Vec<IoDone>,
    /// Host time in ms: moves only when requests wait for it (see [`SyncHost::run`]).
    now: u64,
    /// Cache commands that were not whole cache blocks, failed as a bdev of that block
    /// size fails them (an engine bug: tests assert there are none).
    pub partial_block_commands: u64,
}

impl<C: BlockDevice, B: BlockDevice> SyncHost<C, B> {
    /// Formats `cache_dev` for `backing_dev` and opens it.
    pub fn format(
        mut cache_dev: C,
        backing_dev: B,
        backing: BackingIdentity,
        fopts: &FormatOptions,
        opts: CacheOptions,
    ) -> Result<Self, HostError> {
        let (_, writes) = format(cache_dev.sectors() * 512, backing.clone(), fopts)?;
        for (sector, bytes) in writes {
            cache_dev
                .write(sector, &bytes)
                .map_err(|_| HostError::FormatIo)?;
        }
        cache_dev.flush().map_err(|_| HostError::FormatIo)?;
        Ok(Self::open(cache_dev, backing_dev, backing, opts)?.0)
    }

    pub fn open(
        mut cache_dev: C,
        backing_dev: B,
        backing: BackingIdentity,
        opts: CacheOptions,
    ) -> Result<(Self, OpenReport), HostError> {
        let (cache, report) = open_cache(&mut cache_dev, backing, opts);
        let cache = cache?;
        if report.backing_rebound.is_some() {
            record_backing(&mut cache_dev, &cache.superblock().backing)?;
        }
        Ok((
            SyncHost {
                cache,
                cache_dev,
                backing_dev,
                bufs: Buffers::new(),
                next_id: 1,
                done: Vec::new(),
                cmds: Vec::new(),
                completions: Vec::new(),
                now: 0,
                partial_block_commands: 0,
            },
            report,
        ))
    }

    pub fn into_devices(self) -> (C, B) {
        (self.cache_dev, self.backing_dev)
    }

    /// The running cache and its devices (requests in flight are dropped).
    pub fn into_parts(self) -> (Cache, C, B) {
        (self.cache, self.cache_dev, self.backing_dev)
    }

    /// Submits a request; `data` is the write payload (reads get a zeroed buffer).
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

    /// Runs commands until nothing is outstanding. Devices answer at once, so the clock
    /// only jumps to the cache's next deadline when requests wait for time (a retry after
    /// a failed device I/O, a request's timeout).
    pub fn run(&mut self) {
        loop {
            self.cache.poll();
            self.cache.drain_commands_into(&mut self.cmds);
            if self.cmds.is_empty() {
                match self.cache.next_deadline() {
                    Some(t) if self.cache.waits_for_time() => {
                        self.now = t.max(self.now + 1);
                        self.cache.set_now(self.now);
                        continue;
                    }
                    _ => break,
                }
            }
            let block = self.cache.geometry().block_sectors;
            for cmd in self.cmds.drain(..) {
                if !super::whole_cache_blocks(&cmd, block) {
                    self.partial_block_commands += 1;
                    if let Some(tag) = cmd.tag() {
                        self.completions.push(IoDone {
                            tag,
                            result: Err(crate::engine::IoError::Device),
                            crc: None,
                        });
                    }
                    continue;
                }
                if let Some(d) = execute(
                    &cmd,
                    &mut self.cache_dev,
                    &mut self.backing_dev,
                    &mut self.bufs,
                ) {
                    self.completions.push(d);
                }
            }
            // As the SPDK worker does: every model and zipf test runs the hint too.
            self.cache.warm_dones(&self.completions);
            for d in self.completions.drain(..) {
                self.cache.complete(d);
            }
        }
        self.done.append(&mut self.cache.take_completions());
    }

    /// Completed requests with their buffers.
    pub fn take_done(&mut self) -> Vec<(ReqId, ReqResult, Vec<u8>)> {
        self.done
            .drain(..)
            .map(|(id, r)| (id, r, self.bufs.remove(&id).unwrap_or_default()))
            .collect()
    }

    /// Completes requests without returning their buffers (benchmarks).
    pub fn reap(&mut self, mut f: impl FnMut(ReqId, &ReqResult)) {
        for (id, r) in self.done.drain(..) {
            self.bufs.remove(&id);
            f(id, &r);
        }
    }

    fn one(
        &mut self,
        op: Op,
        lba: u64,
        len: u32,
        data: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, ReqError> {
        let id = self.submit(op, lba, len, data)?;
        self.run();
        let mut out = Err(ReqError::Invalid("request did not complete"));
        for (i, r, b) in self.take_done() {
            if i == id {
                out = r.map(|()| b);
            }
        }
        out
    }

    pub fn write(&mut self, lba: u64, data: Vec<u8>) -> ReqResult {
        let len = (data.len() / 512) as u32;
        self.one(Op::Write, lba, len, Some(data)).map(|_| ())
    }

    /// Reads `len` sectors: served at once from the cache media when every sector is
    /// cached (`Cache::read_inline`, as the SPDK shell does over a mapped cache), else as a
    /// request.
    pub fn read(&mut self, lba: u64, len: u32) -> Result<Vec<u8>, ReqError> {
        let mut buf = vec![0u8; len as usize * 512];
        let dev = &mut self.cache_dev;
        let mut copy = |sector: u64, off: u64, bytes: u64| {
            let (off, bytes) = (off as usize, bytes as usize);
            buf.get_mut(off..off + bytes)
                .is_some_and(|b| dev.read(sector, b).is_ok())
        };
        match self.cache.read_inline(lba, len, &mut copy) {
            Some(true) => Ok(buf),
            Some(false) => Err(ReqError::Io),
            None => self.one(Op::Read, lba, len, None),
        }
    }

    pub fn flush(&mut self) -> ReqResult {
        self.one(Op::Flush, 0, 0, None).map(|_| ())
    }

    pub fn unmap(&mut self, lba: u64, len: u32) -> ReqResult {
        self.one(Op::Unmap, lba, len, None).map(|_| ())
    }

    pub fn write_zeroes(&mut self, lba: u64, len: u32) -> ReqResult {
        self.one(Op::WriteZeroes, lba, len, None).map(|_| ())
    }

    pub fn take_log(&mut self) -> Vec<String> {
        self.cache.take_log()
    }
}
