//! On-media format v3: superblock, control slots, segment headers, ksets and keys. v3
//! records the cache device's block size and writes every structure in whole blocks of
//! it; v1 and v2 caches (512-byte blocks) are read too, v1 differing in where a kset's
//! data lies.
//!
//! Every field is little-endian at a fixed offset (see `docs/FORMAT.md`). Decoding never
//! trusts the media: sizes, counts and positions are checked against the geometry before
//! use, and a bad magic, CRC or bound is a [`FormatError`], never a panic.

use super::geometry::Geometry;
use super::mode::{CacheMode, SeqCutoff, SeqPolicy, WriteAdmission};
use thiserror::Error;

/// The unit of every on-media position and length.
pub const SECTOR: usize = 512;
/// The version this build writes.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest version this build reads. v1 put each kset's data right after it; v2 grows
/// ksets up from the segment's start and data down from its end, so that 4 KiB blocks of
/// data stay 4 KiB-aligned without padding after every small kset; v3 adds the cache
/// block size (v1 and v2 caches have 512-byte blocks, which v3 writes the same way).
pub const MIN_FORMAT_VERSION: u32 = 1;

fn check_version(version: u32) -> Result<()> {
    if (MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        Ok(())
    } else {
        Err(FormatError::UnsupportedVersion { found: version })
    }
}

pub const SB_MAGIC: &[u8; 8] = b"PCACHESB";
pub const CONTROL_MAGIC: &[u8; 8] = b"PCACHECT";
pub const SEG_MAGIC: &[u8; 8] = b"PCACHESG";
pub const KSET_MAGIC: u32 = u32::from_le_bytes(*b"KSET");

/// Superblock replica size in bytes; replicas live at sectors 0 and 8.
pub const SB_BYTES: usize = 4096;
/// Byte of a superblock replica holding the cache block size (u32, bytes; zero before v3).
pub const SB_BLOCK_OFFSET: usize = 76;
pub const KSET_HEADER_BYTES: usize = 64;
pub const KEY_BYTES: usize = 40;
/// Upper bound on keys in one kset (a 12.5 KiB kset); bigger batches use several ksets.
pub const MAX_KSET_KEYS: usize = 256;
pub const SB_FLAG_DATA_CRC: u32 = 1;
pub const BACKING_NAME_BYTES: usize = 64;
/// Bytes `SB_NAME_OFFSET..+SB_NAME_BYTES` of a superblock replica: the name of the pcache
/// bdev the cache belongs to (SPDK module), NUL-padded, at most `SB_NAME_BYTES - 1` bytes.
/// All zero means "no name": images written before the field existed, the offline `format`,
/// and a fresh format until the SPDK module names it. Not part of [`Superblock`] (whose
/// equality and layout it does not affect): read with [`Superblock::decode_name`], written
/// with [`Superblock::encode_named`] / [`Superblock::rename`].
pub const SB_NAME_OFFSET: usize = 160;
pub const SB_NAME_BYTES: usize = 64;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: bad magic")]
    BadMagic { what: &'static str },
    #[error("{what}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("unsupported format version {found} (this build reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("{what}: value {value} out of bounds (limit {limit})")]
    OutOfBounds {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("{what}: buffer of {len} bytes is too short (need {need})")]
    Truncated {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{what}: field mismatch: {detail}")]
    Mismatch { what: &'static str, detail: String },
}

type Result<T> = std::result::Result<T, FormatError>;

/// Bounds-checked little-endian field access over a byte slice.
struct Le<'a>(&'a [u8]);

impl Le<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.0.get(off..off + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.bytes(off))
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes(off))
    }
    fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes(off))
    }
}

fn put(buf: &mut [u8], off: usize, src: &[u8]) {
    buf[off..off + src.len()].copy_from_slice(src);
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(FormatError::Truncated {
            what,
            len: buf.len(),
            need: n,
        });
    }
    Ok(())
}

fn bound(what: &'static str, value: u64, limit: u64) -> Result<()> {
    if value >= limit {
        return Err(FormatError::OutOfBounds { what, value, limit });
    }
    Ok(())
}

fn check_crc(what: &'static str, stored: u32, computed: u32) -> Result<()> {
    if stored != computed {
        return Err(FormatError::BadCrc {
            what,
            stored,
            computed,
        });
    }
    Ok(())
}

/// What the superblock knows about the backing device, checked on every open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackingIdentity {
    pub sectors: u64,
    pub block_size: u32,
    pub uuid: [u8; 16],
    /// Bdev name (or file path) at format time; informative, not compared when a UUID is set.
    pub name: String,
}

/// A UUID in its usual text form (`8-4-4-4-12` lower-case hex digits, bytes in order, as
/// SPDK prints and parses them).
pub fn uuid_string(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The format version it was written in (kept when it is rewritten, e.g. renamed).
    pub version: u32,
    pub geometry: Geometry,
    pub cache_uuid: [u8; 16],
    pub backing: BackingIdentity,
    pub data_crc: bool,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut b = vec![0u8; SB_BYTES];
        put(&mut b, 0, SB_MAGIC);
        put(&mut b, 8, &self.version.to_le_bytes());
        let flags = if self.data_crc { SB_FLAG_DATA_CRC } else { 0 };
        put(&mut b, 12, &flags.to_le_bytes());
        put(&mut b, 16, &self.cache_uuid);
        put(&mut b, 32, &g.cache_sectors.to_le_bytes());
        put(&mut b, 40, &g.segment_sectors.to_le_bytes());
        put(&mut b, 44, &g.segment_count.to_le_bytes());
        put(&mut b, 48, &g.segments_start.to_le_bytes());
        put(&mut b, 56, &g.stripe_sectors.to_le_bytes());
        put(&mut b, 60, &g.shard_count.to_le_bytes());
        put(&mut b, 64, &g.backing_sectors.to_le_bytes());
        put(&mut b, 72, &self.backing.block_size.to_le_bytes());
        // Zero in v1 and v2 (reserved then): their caches have 512-byte blocks.
        if self.version >= 3 {
            let block = g.block_sectors * 512;
            put(&mut b, SB_BLOCK_OFFSET, &block.to_le_bytes());
        }
        put(&mut b, 80, &self.backing.uuid);
        let name = self.backing.name.as_bytes();
        let n = name.len().min(BACKING_NAME_BYTES - 1);
        put(&mut b, 96, &name[..n]);
        seal_superblock(&mut b);
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        const W: &str = "superblock";
        need(W, buf, SB_BYTES)?;
        let f = Le(buf);
        if &f.bytes::<8>(0) != SB_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        check_crc(W, f.u32(SB_BYTES - 4), crc32c::crc32c(&buf[..SB_BYTES - 4]))?;
        let version = f.u32(8);
        check_version(version)?;
        // v1 and v2 left the field zero: their caches have 512-byte blocks.
        let block_bytes = match f.u32(SB_BLOCK_OFFSET) {
            0 if version < 3 => 512,
            b => b,
        };
        let geometry = Geometry {
            cache_sectors: f.u64(32),
            segment_sectors: f.u32(40),
            segment_count: f.u32(44),
            segments_start: f.u64(48),
            stripe_sectors: f.u32(56),
            shard_count: f.u32(60),
            backing_sectors: f.u64(64),
            block_sectors: if block_bytes % 512 == 0 {
                block_bytes / 512
            } else {
                0 // refused by validate() below
            },
        };
        geometry.validate().map_err(|e| FormatError::Mismatch {
            what: W,
            detail: e.to_string(),
        })?;
        let name_bytes = &buf[96..96 + BACKING_NAME_BYTES];
        let end = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_bytes.len());
        Ok(Superblock {
            version,
            geometry,
            cache_uuid: f.bytes(16),
            data_crc: f.u32(12) & SB_FLAG_DATA_CRC != 0,
            backing: BackingIdentity {
                sectors: geometry.backing_sectors,
                block_size: f.u32(72),
                uuid: f.bytes(80),
                name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
            },
        })
    }

    /// The pcache bdev name stored in a replica (`None`: the field is all zero). The replica
    /// must decode (magic, CRC, version, geometry); a name that is not NUL-terminated, not
    /// UTF-8 or followed by non-zero padding is an error.
    pub fn decode_name(buf: &[u8]) -> Result<Option<String>> {
        const W: &str = "superblock name";
        Self::decode(buf)?;
        let field = &buf[SB_NAME_OFFSET..SB_NAME_OFFSET + SB_NAME_BYTES];
        let Some(end) = field.iter().position(|&c| c == 0) else {
            return Err(FormatError::Mismatch {
                what: W,
                detail: format!("not NUL-terminated within {SB_NAME_BYTES} bytes"),
            });
        };
        if field[end..].iter().any(|&c| c != 0) {
            return Err(FormatError::Mismatch {
                what: W,
                detail: "non-zero bytes after the terminating NUL".into(),
            });
        }
        if end == 0 {
            return Ok(None);
        }
        match std::str::from_utf8(&field[..end]) {
            Ok(n) => Ok(Some(n.to_string())),
            Err(e) => Err(FormatError::Mismatch {
                what: W,
                detail: format!("not UTF-8: {e}"),
            }),
        }
    }

    /// [`encode`](Self::encode) with `name` in the name field.
    pub fn encode_named(&self, name: Option<&str>) -> Result<Vec<u8>> {
        let mut b = self.encode();
        put_name(&mut b, name)?;
        Ok(b)
    }

    /// A copy of the replica `buf` (which must decode) with its name field set to `name`
    /// and its CRC updated; every other byte is kept.
    pub fn rename(buf: &[u8], name: Option<&str>) -> Result<Vec<u8>> {
        Self::decode(buf)?;
        let mut b = buf[..SB_BYTES].to_vec();
        put_name(&mut b, name)?;
        Ok(b)
    }

    /// A copy of the replica `buf` (which must decode) marked as written in this build's
    /// format version, its CRC updated; every other byte is kept. Before a build writes
    /// anything in its own version to an older cache, so an older build refuses the cache
    /// instead of stopping its log at the first structure it cannot read.
    pub fn upgrade(buf: &[u8]) -> Result<Vec<u8>> {
        let sb = Self::decode(buf)?;
        let mut b = buf[..SB_BYTES].to_vec();
        put(&mut b, 8, &FORMAT_VERSION.to_le_bytes());
        let block = sb.geometry.block_sectors * 512;
        put(&mut b, SB_BLOCK_OFFSET, &block.to_le_bytes());
        seal_superblock(&mut b);
        Ok(b)
    }

    /// A copy of the replica `buf` (which must decode) whose backing identity (block size,
    /// UUID, name) is `backing`'s, its CRC updated; every other byte is kept, the size
    /// included: only a device of the recorded size may be recorded (the caller checks).
    /// For `backing_uuid_mismatch: accept`, after the operator asserted the device is the
    /// one this cache was formatted for.
    pub fn rebind(buf: &[u8], backing: &BackingIdentity) -> Result<Vec<u8>> {
        let sb = Self::decode(buf)?;
        if sb.backing.sectors != backing.sectors {
            return Err(FormatError::Mismatch {
                what: "backing identity",
                detail: format!(
                    "the superblock records {} sectors, the new identity {}",
                    sb.backing.sectors, backing.sectors
                ),
            });
        }
        let mut b = buf[..SB_BYTES].to_vec();
        put(&mut b, 72, &backing.block_size.to_le_bytes());
        put(&mut b, 80, &backing.uuid);
        let field = &mut b[96..96 + BACKING_NAME_BYTES];
        field.fill(0);
        let name = backing.name.as_bytes();
        let n = name.len().min(BACKING_NAME_BYTES - 1);
        field[..n].copy_from_slice(&name[..n]);
        seal_superblock(&mut b);
        Ok(b)
    }

    /// Seed for every CRC that binds a structure to this cache instance, so structures left
    /// on the device by an earlier format never validate.
    pub fn crc_seed(&self) -> u32 {
        crc32c::crc32c(&self.cache_uuid)
    }
}

/// Writes `name` (or zeros) into the name field of an encoded superblock and re-seals its CRC.
fn put_name(b: &mut [u8], name: Option<&str>) -> Result<()> {
    need("superblock", b, SB_BYTES)?;
    let name = name.unwrap_or_default().as_bytes();
    if name.len() >= SB_NAME_BYTES {
        return Err(FormatError::OutOfBounds {
            what: "superblock name length",
            value: name.len() as u64,
            limit: SB_NAME_BYTES as u64,
        });
    }
    if name.contains(&0) {
        return Err(FormatError::Mismatch {
            what: "superblock name",
            detail: "contains a NUL byte".into(),
        });
    }
    let field = &mut b[SB_NAME_OFFSET..SB_NAME_OFFSET + SB_NAME_BYTES];
    field.fill(0);
    field[..name.len()].copy_from_slice(name);
    seal_superblock(b);
    Ok(())
}

/// Writes an encoded superblock's CRC (over everything before it).
fn seal_superblock(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..SB_BYTES - 4]);
    put(b, SB_BYTES - 4, &crc.to_le_bytes());
}

/// A position in a shard's log: segment, its generation, and a sector inside the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPos {
    pub seg: u32,
    pub gen: u32,
    pub off: u32,
}

/// Where replay of one shard starts: the first kset to read and how it must chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogTail {
    pub pos: LogPos,
    pub seq: u64,
    pub prev_crc: u32,
}

/// One replica of a shard's control record (one sector; slots A and B per shard).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlSlot {
    pub shard: u32,
    pub seq: u64,
    /// Replay starts here.
    pub tail: LogTail,
    /// Everything before this point is written back (clean).
    pub dirty_tail: LogTail,
    pub gc_percent: u32,
    /// The cache mode (byte 76; 0, write-back, in slots written before modes existed).
    pub mode: CacheMode,
    /// The sequential cut-off: policy at byte 77, threshold at 78 (u16, 4 KiB units, 0 for
    /// the default 1 MiB).
    pub seq_cutoff: SeqCutoff,
    /// Write admission (byte 84; 0, `always`, in slots written before it existed).
    pub write_admission: WriteAdmission,
    /// Ranges (lba, sectors) whose dirty data failed its CRC when writeback read it: the
    /// dirty tail moved past them without writing them back, so they read as errors until
    /// rewritten. At most [`MAX_POISON`]. Zero in slots written before this field existed.
    pub poison: Vec<(u64, u32)>,
}

/// Poisoned ranges a control slot holds (16 bytes each from byte 88).
pub const MAX_POISON: usize = (SECTOR - 4 - 88) / 16;

impl ControlSlot {
    pub fn encode(&self, seed: u32) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR];
        put(&mut b, 0, CONTROL_MAGIC);
        put(&mut b, 8, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, 12, &self.shard.to_le_bytes());
        put(&mut b, 16, &self.seq.to_le_bytes());
        encode_tail(&mut b, 24, &self.tail);
        encode_tail(&mut b, 48, &self.dirty_tail);
        put(&mut b, 72, &self.gc_percent.to_le_bytes());
        b[76] = self.mode.code();
        b[77] = self.seq_cutoff.policy.code();
        put(&mut b, 78, &self.seq_cutoff.units().to_le_bytes());
        let n = self.poison.len().min(MAX_POISON);
        put(&mut b, 80, &(n as u32).to_le_bytes());
        b[84] = self.write_admission.code();
        for (i, &(lba, len)) in self.poison.iter().take(n).enumerate() {
            put(&mut b, 88 + i * 16, &lba.to_le_bytes());
            put(&mut b, 96 + i * 16, &len.to_le_bytes());
        }
        let crc = crc32c::crc32c_append(seed, &b[..SECTOR - 4]);
        put(&mut b, SECTOR - 4, &crc.to_le_bytes());
        b
    }

    pub fn decode(buf: &[u8], seed: u32, geo: &Geometry, shard: u32) -> Result<Self> {
        const W: &str = "control slot";
        need(W, buf, SECTOR)?;
        let f = Le(buf);
        if &f.bytes::<8>(0) != CONTROL_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        check_crc(
            W,
            f.u32(SECTOR - 4),
            crc32c::crc32c_append(seed, &buf[..SECTOR - 4]),
        )?;
        let version = f.u32(8);
        check_version(version)?;
        let slot = ControlSlot {
            shard: f.u32(12),
            seq: f.u64(16),
            tail: decode_tail(&f, 24),
            dirty_tail: decode_tail(&f, 48),
            gc_percent: f.u32(72),
            mode: CacheMode::from_code(buf[76]).ok_or(FormatError::OutOfBounds {
                what: "control mode",
                value: u64::from(buf[76]),
                limit: CacheMode::ALL.len() as u64,
            })?,
            seq_cutoff: SeqCutoff::from_units(
                SeqPolicy::from_code(buf[77]).ok_or(FormatError::OutOfBounds {
                    what: "control seq_cutoff policy",
                    value: u64::from(buf[77]),
                    limit: SeqPolicy::ALL.len() as u64,
                })?,
                u16::from_le_bytes([buf[78], buf[79]]),
            ),
            write_admission: WriteAdmission::from_code(buf[84]).ok_or(
                FormatError::OutOfBounds {
                    what: "control write_admission",
                    value: u64::from(buf[84]),
                    limit: WriteAdmission::ALL.len() as u64,
                },
            )?,
            poison: Vec::new(),
        };
        let n = f.u32(80) as usize;
        bound("control poison count", n as u64, MAX_POISON as u64 + 1)?;
        let mut slot = slot;
        for i in 0..n {
            let (lba, len) = (f.u64(88 + i * 16), f.u32(96 + i * 16));
            if len == 0
                || lba
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e > geo.backing_sectors)
            {
                return Err(FormatError::Mismatch {
                    what: W,
                    detail: format!("poisoned range {lba}+{len} outside the backing device"),
                });
            }
            slot.poison.push((lba, len));
        }
        if slot.shard != shard {
            return Err(FormatError::Mismatch {
                what: W,
                detail: format!("slot of shard {shard} names shard {}", slot.shard),
            });
        }
        check_pos(W, &slot.tail.pos, geo)?;
        check_pos(W, &slot.dirty_tail.pos, geo)?;
        bound("control gc_percent", slot.gc_percent.into(), 101)?;
        Ok(slot)
    }
}

fn encode_tail(b: &mut [u8], off: usize, t: &LogTail) {
    put(b, off, &t.pos.seg.to_le_bytes());
    put(b, off + 4, &t.pos.gen.to_le_bytes());
    put(b, off + 8, &t.pos.off.to_le_bytes());
    put(b, off + 12, &t.prev_crc.to_le_bytes());
    put(b, off + 16, &t.seq.to_le_bytes());
}

fn decode_tail(f: &Le, off: usize) -> LogTail {
    LogTail {
        pos: LogPos {
            seg: f.u32(off),
            gen: f.u32(off + 4),
            off: f.u32(off + 8),
        },
        prev_crc: f.u32(off + 12),
        seq: f.u64(off + 16),
    }
}

/// A kset position: inside a segment, after its header, on a cache block.
fn check_pos(what: &'static str, p: &LogPos, geo: &Geometry) -> Result<()> {
    bound(what, p.seg.into(), geo.segment_count.into())?;
    let first = geo.first_kset_off();
    if p.off < first {
        return Err(FormatError::OutOfBounds {
            what,
            value: p.off.into(),
            limit: first.into(),
        });
    }
    if !geo.block_aligned(p.off.into()) {
        return Err(FormatError::Mismatch {
            what,
            detail: format!(
                "sector {} is not on a {}-byte cache block",
                p.off,
                geo.block_bytes()
            ),
        });
    }
    bound(what, p.off.into(), geo.segment_sectors.into())
}

/// Sector 0 of a segment: who owns it and in which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seg: u32,
    pub gen: u32,
    pub shard: u32,
}

impl SegmentHeader {
    pub fn encode(&self, seed: u32) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR];
        put(&mut b, 0, SEG_MAGIC);
        put(&mut b, 8, &self.seg.to_le_bytes());
        put(&mut b, 12, &self.gen.to_le_bytes());
        put(&mut b, 16, &self.shard.to_le_bytes());
        let crc = crc32c::crc32c_append(seed, &b[..SECTOR - 4]);
        put(&mut b, SECTOR - 4, &crc.to_le_bytes());
        b
    }

    pub fn decode(buf: &[u8], seed: u32, geo: &Geometry, seg: u32) -> Result<Self> {
        const W: &str = "segment header";
        need(W, buf, SECTOR)?;
        let f = Le(buf);
        if &f.bytes::<8>(0) != SEG_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        check_crc(
            W,
            f.u32(SECTOR - 4),
            crc32c::crc32c_append(seed, &buf[..SECTOR - 4]),
        )?;
        let h = SegmentHeader {
            seg: f.u32(8),
            gen: f.u32(12),
            shard: f.u32(16),
        };
        if h.seg != seg {
            return Err(FormatError::Mismatch {
                what: W,
                detail: format!("header of segment {seg} names segment {}", h.seg),
            });
        }
        bound(W, h.shard.into(), geo.shard_count.into())?;
        Ok(h)
    }
}

/// What a key says about its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Data stored in the cache at `data_off`.
    Data,
    /// The range reads as zeros; written back as WRITE_ZEROES.
    Zeroes,
    /// The range was unmapped: reads as zeros; written back as UNMAP.
    Unmap,
}

pub const KEY_FLAG_CLEAN: u16 = 1 << 2;
pub const KEY_FLAG_CRC: u16 = 1 << 3;
const KEY_KIND_MASK: u16 = 0b11;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Backing-device sector.
    pub lba: u64,
    pub len: u32,
    pub kind: KeyKind,
    /// Sector inside the kset's segment where the data starts (Data keys only).
    pub data_off: u32,
    /// Generation of the segment holding the data.
    pub gen: u32,
    pub epoch: u64,
    pub clean: bool,
    pub crc: Option<u32>,
}

impl Key {
    fn encode_into(&self, b: &mut [u8]) {
        let kind = match self.kind {
            KeyKind::Data => 0u16,
            KeyKind::Zeroes => 1,
            KeyKind::Unmap => 2,
        };
        let mut flags = kind;
        if self.clean {
            flags |= KEY_FLAG_CLEAN;
        }
        if self.crc.is_some() {
            flags |= KEY_FLAG_CRC;
        }
        put(b, 0, &self.lba.to_le_bytes());
        put(b, 8, &self.len.to_le_bytes());
        put(b, 12, &self.data_off.to_le_bytes());
        put(b, 16, &self.epoch.to_le_bytes());
        put(b, 24, &self.crc.unwrap_or(0).to_le_bytes());
        put(b, 28, &flags.to_le_bytes());
        put(b, 32, &self.gen.to_le_bytes());
    }

    fn decode(f: &Le, off: usize) -> Result<Self> {
        let flags = f.u16(off + 28);
        let kind = match flags & KEY_KIND_MASK {
            0 => KeyKind::Data,
            1 => KeyKind::Zeroes,
            2 => KeyKind::Unmap,
            k => {
                return Err(FormatError::OutOfBounds {
                    what: "key kind",
                    value: k.into(),
                    limit: 3,
                })
            }
        };
        Ok(Key {
            lba: f.u64(off),
            len: f.u32(off + 8),
            data_off: f.u32(off + 12),
            epoch: f.u64(off + 16),
            crc: (flags & KEY_FLAG_CRC != 0).then(|| f.u32(off + 24)),
            clean: flags & KEY_FLAG_CLEAN != 0,
            kind,
            gen: f.u32(off + 32),
        })
    }
}

/// Sectors a kset of `keys` keys occupies.
pub fn kset_sectors(keys: usize) -> u32 {
    (KSET_HEADER_BYTES + keys * KEY_BYTES).div_ceil(SECTOR) as u32
}

/// A batch of keys plus the link to the next kset. A kset with no keys and `LINK` set only
/// moves the log to another segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kset {
    pub seq: u64,
    pub prev_crc: u32,
    pub shard: u32,
    /// Where this kset lives.
    pub pos: LogPos,
    /// Where the next kset of this shard will be written.
    pub next: LogPos,
    /// Sectors from this kset to the next one in its segment: the kset itself (v2), or
    /// the kset plus the data that follows it (v1).
    pub region_sectors: u32,
    pub keys: Vec<Key>,
}

impl Kset {
    /// Encodes the kset, padded to whole sectors; returns the bytes and the kset's CRC.
    pub fn encode(&self, seed: u32) -> (Vec<u8>, u32) {
        let mut b = Vec::new();
        let crc = self.encode_into(seed, &mut b, SECTOR);
        (b, crc)
    }

    /// [`Kset::encode`] into `b` (its old contents replaced, its allocation reused),
    /// padded with zeroes to a multiple of `block` bytes (the device's block, a multiple of
    /// the sector).
    pub fn encode_into(&self, seed: u32, b: &mut Vec<u8>, block: usize) -> u32 {
        let sectors = kset_sectors(self.keys.len()) as usize;
        b.clear();
        b.resize((sectors * SECTOR).next_multiple_of(block.max(SECTOR)), 0);
        put(b, 0, &KSET_MAGIC.to_le_bytes());
        put(b, 8, &self.seq.to_le_bytes());
        put(b, 16, &self.prev_crc.to_le_bytes());
        put(b, 20, &(self.shard as u16).to_le_bytes());
        put(b, 22, &(FORMAT_VERSION as u16).to_le_bytes());
        put(b, 24, &(self.keys.len() as u32).to_le_bytes());
        put(b, 28, &self.pos.seg.to_le_bytes());
        put(b, 32, &self.pos.gen.to_le_bytes());
        put(b, 36, &self.next.seg.to_le_bytes());
        put(b, 40, &self.next.gen.to_le_bytes());
        put(b, 44, &self.next.off.to_le_bytes());
        put(b, 48, &self.region_sectors.to_le_bytes());
        put(b, 52, &self.pos.off.to_le_bytes());
        for (i, k) in self.keys.iter().enumerate() {
            let off = KSET_HEADER_BYTES + i * KEY_BYTES;
            k.encode_into(&mut b[off..off + KEY_BYTES]);
        }
        let end = KSET_HEADER_BYTES + self.keys.len() * KEY_BYTES;
        let crc = crc32c::crc32c_append(seed, &b[8..end]);
        put(b, 4, &crc.to_le_bytes());
        crc
    }

    /// Reads the key count from a kset header without validating it, to know how many
    /// bytes to read. Returns `None` when the magic does not match.
    pub fn peek_sectors(buf: &[u8]) -> Option<u32> {
        let f = Le(buf);
        if buf.len() < KSET_HEADER_BYTES || f.u32(0) != KSET_MAGIC {
            return None;
        }
        let n = f.u32(24) as usize;
        (n <= MAX_KSET_KEYS).then(|| kset_sectors(n))
    }

    /// Decodes and fully validates a kset read at `at`; returns it with its CRC.
    pub fn decode(
        buf: &[u8],
        seed: u32,
        geo: &Geometry,
        at: LogPos,
        shard: u32,
    ) -> Result<(Self, u32)> {
        const W: &str = "kset";
        need(W, buf, KSET_HEADER_BYTES)?;
        let f = Le(buf);
        if f.u32(0) != KSET_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        let n = f.u32(24) as usize;
        if n > MAX_KSET_KEYS {
            return Err(FormatError::OutOfBounds {
                what: "kset key count",
                value: n as u64,
                limit: MAX_KSET_KEYS as u64 + 1,
            });
        }
        let end = KSET_HEADER_BYTES + n * KEY_BYTES;
        need(W, buf, end)?;
        let stored = f.u32(4);
        check_crc(W, stored, crc32c::crc32c_append(seed, &buf[8..end]))?;
        let version = u32::from(f.u16(22));
        check_version(version)?;
        let pos = LogPos {
            seg: f.u32(28),
            gen: f.u32(32),
            off: f.u32(52),
        };
        let owner = u32::from(f.u16(20));
        if pos != at || owner != shard {
            return Err(FormatError::Mismatch {
                what: W,
                detail: format!(
                    "kset read at {at:?} of shard {shard} says {pos:?} of shard {owner}"
                ),
            });
        }
        let next = LogPos {
            seg: f.u32(36),
            gen: f.u32(40),
            off: f.u32(44),
        };
        check_pos("kset next pointer", &next, geo)?;
        let region_sectors = f.u32(48);
        let kset_len = kset_sectors(n);
        let seg_end = u64::from(geo.segment_sectors);
        let region_end = u64::from(at.off) + u64::from(region_sectors);
        if region_sectors < kset_len || region_end > seg_end {
            return Err(FormatError::OutOfBounds {
                what: "kset region",
                value: region_end,
                limit: seg_end,
            });
        }
        if next.seg == at.seg && u64::from(next.off) != region_end {
            return Err(FormatError::Mismatch {
                what: W,
                detail: format!("next kset at {} but region ends at {region_end}", next.off),
            });
        }
        let mut keys = Vec::with_capacity(n);
        for i in 0..n {
            let k = Key::decode(&f, KSET_HEADER_BYTES + i * KEY_BYTES)?;
            let lba_end = k.lba.checked_add(u64::from(k.len));
            if k.len == 0 || lba_end.is_none_or(|e| e > geo.backing_sectors) {
                return Err(FormatError::OutOfBounds {
                    what: "key range",
                    value: k.lba.saturating_add(u64::from(k.len)),
                    limit: geo.backing_sectors,
                });
            }
            if k.kind == KeyKind::Data {
                // v1: inside the region, after the kset. v2: anywhere after the kset in its
                // segment (data grows down from the segment's end, above every kset).
                let start = u64::from(at.off) + u64::from(kset_len);
                let limit = if version == 1 { region_end } else { seg_end };
                let data_end = u64::from(k.data_off) + u64::from(k.len);
                if u64::from(k.data_off) < start || data_end > limit || k.gen != at.gen {
                    return Err(FormatError::OutOfBounds {
                        what: "key data position",
                        value: data_end,
                        limit,
                    });
                }
                // v3 on a block larger than a sector: data is whole blocks (never written
                // or read in part, see `Geometry::block_sectors`).
                if !geo.block_aligned(k.data_off.into()) || !geo.block_aligned(k.len.into()) {
                    return Err(FormatError::Mismatch {
                        what: "key data position",
                        detail: format!(
                            "data at sector {} for {} sectors is not whole {}-byte cache blocks",
                            k.data_off,
                            k.len,
                            geo.block_bytes()
                        ),
                    });
                }
            }
            keys.push(k);
        }
        Ok((
            Kset {
                seq: f.u64(8),
                prev_crc: f.u32(16),
                shard: owner,
                pos,
                next,
                region_sectors,
                keys,
            },
            stored,
        ))
    }
}
