//! What flows in and out of the engine: requests, device commands, completions.
//!
//! The engine never touches data. A command names a buffer: a byte range of a user
//! request's payload ([`Buf::Req`]) or engine-owned metadata ([`Buf::Owned`]). The host
//! does the copy or DMA and reports back with an [`IoDone`] carrying the command's tag.

use thiserror::Error;

pub type ReqId = u64;
pub type Tag = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dev {
    Cache,
    Backing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buf {
    /// `len` bytes at byte offset `off` of request `req`'s payload.
    Req { req: ReqId, off: u64, len: u64 },
    /// Metadata the engine built (ksets, headers, control slots).
    Owned(Vec<u8>),
}

impl Buf {
    pub fn len(&self) -> u64 {
        match self {
            Buf::Req { len, .. } => *len,
            Buf::Owned(v) => v.len() as u64,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Write `buf` at `sector`. With `want_crc`, the host reports the data's CRC32C.
    Write {
        tag: Tag,
        dev: Dev,
        sector: u64,
        buf: Buf,
        want_crc: bool,
    },
    /// Read into `buf` (always a request buffer) from `sector`. With `verify_crc`, the host
    /// checks the data and completes with [`IoError::CrcMismatch`] when it differs.
    Read {
        tag: Tag,
        dev: Dev,
        sector: u64,
        buf: Buf,
        verify_crc: Option<u32>,
    },
    /// Make completed writes durable.
    Flush { tag: Tag, dev: Dev },
    WriteZeroes {
        tag: Tag,
        dev: Dev,
        sector: u64,
        sectors: u64,
    },
    Unmap {
        tag: Tag,
        dev: Dev,
        sector: u64,
        sectors: u64,
    },
    /// Copy `sectors` sectors from one device to another (writeback: cache to backing).
    /// A DAX host copies straight from mapped memory; others bounce through a buffer.
    /// With `verify`, the host reads the whole range it names (which holds the source),
    /// checks its CRC32C, and completes with [`IoError::CrcMismatch`] without writing
    /// anything when it differs. A failed source read completes with [`IoError::Source`].
    Copy {
        tag: Tag,
        src: Dev,
        src_sector: u64,
        dst: Dev,
        dst_sector: u64,
        sectors: u64,
        verify: Option<Verify>,
    },
    /// Fill part of a request buffer with zeros, before the request completes. No tag: the
    /// host does it at once.
    ZeroBuf { buf: Buf },
}

impl Command {
    pub fn tag(&self) -> Option<Tag> {
        match self {
            Command::Write { tag, .. }
            | Command::Read { tag, .. }
            | Command::Flush { tag, .. }
            | Command::WriteZeroes { tag, .. }
            | Command::Unmap { tag, .. }
            | Command::Copy { tag, .. } => Some(*tag),
            Command::ZeroBuf { .. } => None,
        }
    }
}

/// A source range whose data CRC a [`Command::Copy`] checks before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verify {
    pub sector: u64,
    pub sectors: u64,
    pub crc: u32,
}

impl Verify {
    /// The sectors a copy of `sectors` from `src_sector` reads: the whole range its CRC
    /// covers when it has one to check (`verify`), else just what it copies.
    pub fn read_range(verify: Option<&Verify>, src_sector: u64, sectors: u64) -> (u64, u64) {
        verify.map_or((src_sector, sectors), |v| (v.sector, v.sectors))
    }

    /// Byte offset of `sector` (inside the range) from the range's start.
    pub fn offset_of(&self, sector: u64) -> Option<usize> {
        let rel = sector.checked_sub(self.sector)?;
        (rel < self.sectors).then(|| (rel * 512) as usize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IoError {
    /// The device the command names failed (for a copy: writing its destination).
    #[error("device I/O error")]
    Device,
    #[error("data CRC mismatch")]
    CrcMismatch,
    /// A copy could not read its source.
    #[error("copy source read error")]
    Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoDone {
    pub tag: Tag,
    pub result: Result<(), IoError>,
    /// CRC32C of written data, when the command asked for it.
    pub crc: Option<u32>,
}

impl IoDone {
    pub fn ok(tag: Tag) -> Self {
        IoDone {
            tag,
            result: Ok(()),
            crc: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Write with forced unit access: same path (the cache is durable at acknowledgement).
    WriteFua,
    Flush,
    Unmap,
    WriteZeroes,
}

/// A block request in backing-device sectors. The payload (reads and writes) is held by
/// the host and named by `id` in commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub id: ReqId,
    pub op: Op,
    pub lba: u64,
    pub len: u32,
}

/// A piece of a request that lies in one stripe, as a shard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRequest {
    pub id: ReqId,
    pub op: Op,
    pub lba: u64,
    pub len: u32,
    /// Byte offset of this piece inside the request's payload.
    pub buf_off: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReqError {
    #[error("device I/O error")]
    Io,
    #[error("cached data failed its CRC check")]
    Corrupt,
    #[error("request out of range: sectors {lba}+{len} past device end {limit}")]
    OutOfRange { lba: u64, len: u64, limit: u64 },
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("cache log is unwritable after repeated metadata write failures")]
    ShardFailed,
    #[error("request waited past the I/O timeout (cache full and writeback failing?)")]
    TimedOut,
}

pub type ReqResult = Result<(), ReqError>;
