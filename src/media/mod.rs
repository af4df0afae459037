//! Hosts that run the engine's device commands: RAM, files, and a fault-injecting,
//! crash-simulating simulator for tests.

pub mod dax;
pub mod file;
pub mod host;
pub mod mem;
pub mod sim;
pub mod slow;

use std::collections::HashMap;

use crate::engine::{
    Buf, Cache, Command, Dev, IoDone, IoError, Op, ReqError, ReqId, Request, Verify,
};

/// A synchronous block device addressed in 512-byte sectors.
pub trait BlockDevice {
    fn sectors(&self) -> u64;
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError>;
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> Result<(), IoError>;
    fn write_zeroes(&mut self, sector: u64, sectors: u64) -> Result<(), IoError> {
        let zeros = vec![0u8; 64 << 10];
        let mut at = sector;
        let end = sector + sectors;
        while at < end {
            let n = (end - at).min(128);
            self.write(at, &zeros[..n as usize * 512])?;
            at += n;
        }
        Ok(())
    }
}

/// Request payloads held by a host, by request id.
pub type Buffers = HashMap<ReqId, Vec<u8>>;

/// Gives a request the next id, keeps its payload (`data` for writes, a zeroed buffer for
/// reads) and submits it; the payload is dropped again if the cache refuses the request.
pub fn submit_request(
    cache: &mut Cache,
    bufs: &mut Buffers,
    next_id: &mut ReqId,
    op: Op,
    lba: u64,
    len: u32,
    data: Option<Vec<u8>>,
) -> Result<ReqId, ReqError> {
    let id = *next_id;
    *next_id += 1;
    bufs.insert(id, request_buf(op, len, data));
    if let Err(e) = cache.submit(Request { id, op, lba, len }) {
        bufs.remove(&id);
        return Err(e);
    }
    Ok(id)
}

/// A request's payload: the data of a write, a zeroed buffer for a read, else nothing.
pub(crate) fn request_buf(op: Op, len: u32, data: Option<Vec<u8>>) -> Vec<u8> {
    match (op, data) {
        (_, Some(d)) => d,
        (Op::Read, None) => vec![0u8; len as usize * 512],
        _ => Vec::new(),
    }
}

fn req_slice<'a>(bufs: &'a mut Buffers, buf: &Buf) -> Option<&'a mut [u8]> {
    match buf {
        Buf::Req { req, off, len } => {
            let v = bufs.get_mut(req)?;
            v.get_mut(*off as usize..(*off + *len) as usize)
        }
        Buf::Owned(_) => None,
    }
}

fn pick<'a>(
    d: Dev,
    cache: &'a mut dyn BlockDevice,
    backing: &'a mut dyn BlockDevice,
) -> &'a mut dyn BlockDevice {
    match d {
        Dev::Cache => cache,
        Dev::Backing => backing,
    }
}

/// Whether every cache-device range `cmd` touches is whole blocks of `block_sectors`
/// sectors (a bdev of that block size takes nothing else).
pub fn whole_cache_blocks(cmd: &Command, block_sectors: u32) -> bool {
    let block = u64::from(block_sectors.max(1));
    let whole = |sector: u64, sectors: u64| sector % block == 0 && sectors % block == 0;
    match cmd {
        Command::Write {
            dev: Dev::Cache,
            sector,
            buf,
            ..
        }
        | Command::Read {
            dev: Dev::Cache,
            sector,
            buf,
            ..
        } => buf.len() % 512 == 0 && whole(*sector, buf.len() / 512),
        Command::WriteZeroes {
            dev: Dev::Cache,
            sector,
            sectors,
            ..
        }
        | Command::Unmap {
            dev: Dev::Cache,
            sector,
            sectors,
            ..
        } => whole(*sector, *sectors),
        Command::Copy {
            src,
            src_sector,
            dst,
            dst_sector,
            sectors,
            verify,
            ..
        } => {
            let (from, n) = Verify::read_range(verify.as_ref(), *src_sector, *sectors);
            (*src != Dev::Cache || whole(from, n))
                && (*dst != Dev::Cache || whole(*dst_sector, *sectors))
        }
        _ => true,
    }
}

/// Runs one command against a pair of synchronous devices. Commands without a tag
/// (`ZeroBuf`) return `None`.
pub fn execute(
    cmd: &Command,
    cache: &mut dyn BlockDevice,
    backing: &mut dyn BlockDevice,
    bufs: &mut Buffers,
) -> Option<IoDone> {
    let (tag, result, crc) = match cmd {
        Command::Write {
            tag,
            dev,
            sector,
            buf,
            want_crc,
        } => {
            let (res, crc) = match buf {
                Buf::Owned(v) => (pick(*dev, cache, backing).write(*sector, v), None),
                b => match req_slice(bufs, b) {
                    Some(data) => {
                        let crc = want_crc.then(|| crc32c::crc32c(data));
                        (pick(*dev, cache, backing).write(*sector, data), crc)
                    }
                    None => (Err(IoError::Device), None),
                },
            };
            (*tag, res, crc)
        }
        Command::Read {
            tag,
            dev,
            sector,
            buf,
            verify_crc,
        } => {
            let d = pick(*dev, cache, backing);
            let res = match req_slice(bufs, buf) {
                Some(data) => d.read(*sector, data).and_then(|()| match verify_crc {
                    Some(c) if crc32c::crc32c(data) != *c => Err(IoError::CrcMismatch),
                    _ => Ok(()),
                }),
                None => Err(IoError::Device),
            };
            (*tag, res, None)
        }
        Command::Flush { tag, dev } => (*tag, pick(*dev, cache, backing).flush(), None),
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
        } => (
            *tag,
            pick(*dev, cache, backing).write_zeroes(*sector, *sectors),
            None,
        ),
        Command::Copy {
            tag,
            src,
            src_sector,
            dst,
            dst_sector,
            sectors,
            verify,
        } => {
            let (from, n) = Verify::read_range(verify.as_ref(), *src_sector, *sectors);
            let mut data = vec![0u8; (n * 512) as usize];
            let off = verify.map_or(Some(0), |v| v.offset_of(*src_sector));
            let res = match pick(*src, cache, backing).read(from, &mut data) {
                Err(_) => Err(IoError::Source),
                Ok(()) if verify.is_some_and(|v| crc32c::crc32c(&data) != v.crc) => {
                    Err(IoError::CrcMismatch)
                }
                Ok(()) => match off.and_then(|o| data.get(o..o + (*sectors * 512) as usize)) {
                    Some(part) => pick(*dst, cache, backing).write(*dst_sector, part),
                    None => Err(IoError::Source),
                },
            };
            (*tag, res, None)
        }
        Command::ZeroBuf { buf } => {
            if let Some(data) = req_slice(bufs, buf) {
                data.fill(0);
            }
            return None;
        }
    };
    Some(IoDone { tag, result, crc })
}
