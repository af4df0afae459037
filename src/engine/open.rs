//! Formatting a new cache and opening an existing one.
//!
//! Opening is the crash path: there is no clean-shutdown state. [`Opener`] is a sans-I/O
//! stepper: it asks for reads one at a time and ends with a running [`Cache`] or an
//! [`OpenError`]. Replay follows each shard's kset chain from the tail recorded in its
//! control slot; the first kset that fails its CRC, sequence, previous-CRC or position
//! check ends the log.

use std::collections::{BTreeSet, VecDeque};

use thiserror::Error;

use super::cache::{Cache, CacheOptions};
use super::format::{
    BackingIdentity, ControlSlot, FormatError, Kset, LogPos, LogTail, SegmentHeader, Superblock,
    FORMAT_VERSION, KSET_MAGIC, MIN_FORMAT_VERSION, SECTOR,
};
use super::geometry::{Geometry, GeometryError, LayoutOptions, CONTROL_SECTOR, SB_B_SECTOR};
use super::index::{Extent, ExtentMap, State};
use super::io::IoError;
use super::mode::{CacheMode, SeqCutoff, WriteAdmission};
use super::pool::SegmentPool;
use super::shard::{DirtyKey, LogState, Logged, SegRec, Shard, ShardConfig, WritebackOptions};

pub const DEFAULT_GC_PERCENT: u32 = 70;

#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub layout: LayoutOptions,
    pub data_crc: bool,
    pub cache_uuid: [u8; 16],
    pub gc_percent: u32,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            layout: LayoutOptions::default(),
            data_crc: false,
            cache_uuid: [0x5a; 16],
            gc_percent: DEFAULT_GC_PERCENT,
        }
    }
}

/// Bytes to write at a sector of the cache device.
pub type SectorWrite = (u64, Vec<u8>);

/// The writes that make a new, empty cache: superblock replicas, both control slots of
/// every shard, and the header of each shard's first segment. Returns (sector, bytes).
pub fn format(
    cache_bytes: u64,
    backing: BackingIdentity,
    opts: &FormatOptions,
) -> Result<(Superblock, Vec<SectorWrite>), GeometryError> {
    if opts.gc_percent > 90 {
        return Err(GeometryError::GcPercent(opts.gc_percent));
    }
    let geometry = Geometry::new(cache_bytes, backing.sectors, opts.layout)?;
    let sb = Superblock {
        version: super::format::FORMAT_VERSION,
        geometry,
        cache_uuid: opts.cache_uuid,
        backing,
        data_crc: opts.data_crc,
    };
    let seed = sb.crc_seed();
    let sb_bytes = sb.encode();
    let mut writes = vec![(0, sb_bytes.clone()), (SB_B_SECTOR, sb_bytes)];
    for shard in 0..geometry.shard_count {
        let first = LogPos {
            seg: shard,
            gen: shard + 1,
            off: geometry.first_kset_off(),
        };
        let tail = LogTail {
            pos: first,
            seq: 1,
            prev_crc: 0,
        };
        for slot in 0..2u32 {
            let c = ControlSlot {
                shard,
                seq: u64::from(slot) + 1,
                tail,
                dirty_tail: tail,
                gc_percent: opts.gc_percent,
                mode: CacheMode::default(),
                seq_cutoff: SeqCutoff::default(),
                write_admission: WriteAdmission::default(),
                poison: Vec::new(),
            };
            writes.push((
                geometry.control_sector(shard, slot),
                geometry.whole_blocks(c.encode(seed)),
            ));
        }
        let hdr = SegmentHeader {
            seg: shard,
            gen: shard + 1,
            shard,
        };
        writes.push((
            geometry.segment_start(shard),
            geometry.whole_blocks(hdr.encode(seed)),
        ));
    }
    Ok((sb, writes))
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpenError {
    #[error("no valid superblock (replica A: {a}; replica B: {b})")]
    NoSuperblock { a: FormatError, b: FormatError },
    #[error(
        "cache was formatted with format version {found}; this build reads versions \
         {MIN_FORMAT_VERSION} to {FORMAT_VERSION} (a newer pcache wrote it: open it with that)"
    )]
    UnsupportedVersion { found: u32 },
    #[error("cache belongs to another backing device: superblock names {expected}, found {found}")]
    BackingMismatch { expected: String, found: String },
    /// The backing device found has the recorded size but not the recorded UUID (or the
    /// recorded name, when the cache recorded no UUID): the same device under a new
    /// identity, or another device. Refused unless [`UuidMismatch::Accept`]. The opener
    /// replays the log (reading only) to count the dirty data first.
    #[error(
        "cache belongs to another backing device, or to this one under a new identity: the \
         superblock records {}, found {}; {}",
        describe_backing(recorded),
        describe_backing(found),
        describe_dirty(*dirty_bytes)
    )]
    BackingIdentity {
        recorded: Box<BackingIdentity>,
        found: Box<BackingIdentity>,
        /// Dirty bytes the log holds (None: the replay could not count them).
        dirty_bytes: Option<u64>,
    },
    #[error(
        "the cache was formatted for a device of {recorded}-byte blocks, but this device has \
         {device}-byte blocks: its metadata updates would be partial blocks (refused; \
         nothing was written). Attach it from a device of {recorded}-byte blocks (the same \
         data, e.g. the file it was copied from)"
    )]
    BlockSize { recorded: u32, device: u32 },
    #[error("shard {shard}: no valid control slot (A: {a}; B: {b})")]
    ControlLost {
        shard: u32,
        a: FormatError,
        b: FormatError,
    },
    #[error("shard {shard}: log tail segment {seg} has no valid header of generation {gen}")]
    TailLost { shard: u32, seg: u32, gen: u32 },
    #[error("read of {what} failed: {err}")]
    Io { what: &'static str, err: IoError },
}

/// What to do when the backing device has the recorded size but another UUID (or none):
/// `bdev_pcache_create`'s `backing_uuid_mismatch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UuidMismatch {
    /// Refuse the open ([`OpenError::BackingIdentity`]); nothing is written.
    #[default]
    Refuse,
    /// The operator asserts it is the same device: open, and record its identity (the
    /// host rewrites both superblock replicas, see [`OpenReport::backing_rebound`]).
    Accept,
}

/// How the backing device found compares with the one a superblock records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingMatch {
    /// Same size, and same UUID (or, when the superblock records none, same name).
    Same,
    /// Same size, another identity: the same device renamed or re-created with a new
    /// UUID, or another device of that size. Nothing on the device tells which.
    Identity,
    /// Another size: certainly another device (or a resized one, which the cache's
    /// geometry no longer fits).
    Size,
}

/// The open's rule: the size must match; then the UUID when the superblock records one
/// (a device without a UUID does not match it), else the name.
pub fn compare_backing(recorded: &BackingIdentity, found: &BackingIdentity) -> BackingMatch {
    if recorded.sectors != found.sectors {
        BackingMatch::Size
    } else if recorded.uuid != [0; 16] {
        if recorded.uuid == found.uuid {
            BackingMatch::Same
        } else {
            BackingMatch::Identity
        }
    } else if recorded.name == found.name {
        BackingMatch::Same
    } else {
        BackingMatch::Identity
    }
}

/// `'name' (N sectors, uuid U)` for messages.
pub fn describe_backing(b: &BackingIdentity) -> String {
    format!(
        "'{}' ({} sectors, {}-byte blocks, uuid {})",
        b.name,
        b.sectors,
        b.block_size,
        if b.uuid == [0; 16] {
            "none".to_string()
        } else {
            super::format::uuid_string(&b.uuid)
        }
    )
}

/// What the cache holds that the backing device does not, for refusals.
pub fn describe_dirty(dirty_bytes: Option<u64>) -> String {
    match dirty_bytes {
        Some(0) => "the cache holds no dirty data (every write is on the backing device)".into(),
        Some(n) => format!(
            "the cache holds {n} bytes of acknowledged writes not yet written back to the \
             backing device"
        ),
        None => "the cache may hold acknowledged writes not yet written back to the backing \
                 device"
            .into(),
    }
}

/// What replay found, for `pcache inspect` and `pcache check`.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Problems that did not stop the open (a bad replica, a torn kset at a log end).
    pub problems: Vec<String>,
    pub shards: Vec<ShardReport>,
    pub segment_gens: Vec<Option<u32>>,
    /// Set when the open accepted a backing device of another identity
    /// ([`UuidMismatch::Accept`]): the identity the superblock recorded. The open cache's
    /// superblock holds the new one; the host must write it to both replicas (e.g.
    /// `media::host::record_backing`) before the cache takes writes.
    pub backing_rebound: Option<BackingIdentity>,
}

#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    pub control_seq: u64,
    pub tail: LogTail,
    pub ksets: u64,
    pub keys: u64,
    pub segments: Vec<u32>,
    pub head: LogPos,
    pub next_seq: u64,
}

/// A step of [`Opener`].
#[derive(Debug)]
pub enum OpenStep {
    /// Read `sectors` sectors at `sector` of the cache device and pass them to `step`.
    Read {
        sector: u64,
        sectors: u64,
    },
    Done(Box<Cache>),
    Failed(OpenError),
}

enum Phase {
    Superblock,
    Control,
    Headers { seg: u32 },
    Replay,
    Finished,
}

struct ShardReplay {
    control: ControlSlot,
    control_slot: u32,
    index: ExtentMap,
    segments: VecDeque<SegRec>,
    log: VecDeque<Logged>,
    at: LogPos,
    /// The lowest sector of `at`'s segment holding data above the ksets (format v2).
    data_low: u32,
    seq: u64,
    prev_crc: u32,
    max_epoch: u64,
    ksets: u64,
    keys: u64,
    needs_header: bool,
}

pub struct Opener {
    backing: BackingIdentity,
    opts: CacheOptions,
    phase: Phase,
    sb: Option<Superblock>,
    controls: Vec<(ControlSlot, u32)>,
    headers: Vec<Option<SegmentHeader>>,
    shards: Vec<ShardReplay>,
    cur: usize,
    report: OpenReport,
    /// A refused identity ([`UuidMismatch::Refuse`]): the replay goes on, reading only,
    /// to count the dirty data the refusal reports.
    refused: Option<(BackingIdentity, BackingIdentity)>,
}

impl Opener {
    /// `backing` is what the host sees now; the superblock must name the same device.
    pub fn new(backing: BackingIdentity, opts: CacheOptions) -> Self {
        Opener {
            backing,
            opts,
            phase: Phase::Superblock,
            sb: None,
            controls: Vec::new(),
            headers: Vec::new(),
            shards: Vec::new(),
            cur: 0,
            report: OpenReport::default(),
            refused: None,
        }
    }

    /// The first read to issue.
    pub fn start(&self) -> OpenStep {
        OpenStep::Read {
            sector: 0,
            sectors: 2 * SB_B_SECTOR,
        }
    }

    pub fn report(&self) -> &OpenReport {
        &self.report
    }

    /// Feeds the data of the last requested read.
    pub fn step(&mut self, data: Result<Vec<u8>, IoError>) -> OpenStep {
        let step = match self.advance(data) {
            Ok(s) => s,
            Err(e) => {
                self.phase = Phase::Finished;
                OpenStep::Failed(e)
            }
        };
        let Some((recorded, found)) = self.refused.take() else {
            return step;
        };
        // The backing identity was refused: the replay only counted the dirty data.
        let dirty_bytes = match step {
            OpenStep::Read { .. } => {
                self.refused = Some((recorded, found));
                return step;
            }
            OpenStep::Done(cache) => Some(cache.dirty_bytes()),
            OpenStep::Failed(e) => {
                self.report
                    .problems
                    .push(format!("replay to count the dirty data failed: {e}"));
                None
            }
        };
        OpenStep::Failed(OpenError::BackingIdentity {
            recorded: Box::new(recorded),
            found: Box::new(found),
            dirty_bytes,
        })
    }

    fn advance(&mut self, data: Result<Vec<u8>, IoError>) -> Result<OpenStep, OpenError> {
        let what = match self.phase {
            Phase::Superblock => "superblock",
            Phase::Control => "control area",
            Phase::Headers { .. } => "segment header",
            Phase::Replay => "log segment",
            Phase::Finished => "nothing (open already finished)",
        };
        let buf = data.map_err(|err| OpenError::Io { what, err })?;
        match self.phase {
            Phase::Superblock => self.on_superblock(&buf),
            Phase::Control => self.on_control(&buf),
            Phase::Headers { seg } => self.on_header(seg, &buf),
            Phase::Replay => self.on_segment(&buf),
            Phase::Finished => Err(OpenError::Io {
                what,
                err: IoError::Device,
            }),
        }
    }

    fn geo(&self) -> Geometry {
        self.sb.as_ref().map(|s| s.geometry).unwrap_or(Geometry {
            cache_sectors: 0,
            segment_sectors: 0,
            segment_count: 0,
            segments_start: 0,
            stripe_sectors: 0,
            shard_count: 0,
            backing_sectors: 0,
            block_sectors: 1,
        })
    }

    fn seed(&self) -> u32 {
        self.sb.as_ref().map_or(0, |s| s.crc_seed())
    }

    fn on_superblock(&mut self, buf: &[u8]) -> Result<OpenStep, OpenError> {
        let half = SB_B_SECTOR as usize * SECTOR;
        let a = Superblock::decode(buf.get(..half).unwrap_or(&[]));
        let b = Superblock::decode(buf.get(half..).unwrap_or(&[]));
        let sb = match (a, b) {
            (Ok(a), Ok(b)) => {
                if a != b {
                    self.report
                        .problems
                        .push("superblock replicas differ; using replica A".into());
                }
                a
            }
            (Ok(a), Err(e)) => {
                self.report
                    .problems
                    .push(format!("superblock replica B is corrupt: {e}"));
                a
            }
            (Err(e), Ok(b)) => {
                self.report
                    .problems
                    .push(format!("superblock replica A is corrupt: {e}"));
                b
            }
            (Err(a), Err(b)) => {
                for e in [&a, &b] {
                    if let FormatError::UnsupportedVersion { found } = e {
                        return Err(OpenError::UnsupportedVersion { found: *found });
                    }
                }
                return Err(OpenError::NoSuperblock { a, b });
            }
        };
        let recorded = sb.geometry.block_sectors * 512;
        let device = self.opts.device_block_bytes.max(512);
        if recorded < device {
            return Err(OpenError::BlockSize { recorded, device });
        }
        let mut sb = sb;
        match compare_backing(&sb.backing, &self.backing) {
            BackingMatch::Same => {}
            BackingMatch::Size => {
                return Err(OpenError::BackingMismatch {
                    expected: describe_backing(&sb.backing),
                    found: describe_backing(&self.backing),
                })
            }
            BackingMatch::Identity => match self.opts.backing_uuid_mismatch {
                UuidMismatch::Refuse => {
                    self.refused = Some((sb.backing.clone(), self.backing.clone()));
                }
                UuidMismatch::Accept => {
                    self.report.problems.push(format!(
                        "backing device {} accepted in place of the recorded {} \
                         (backing_uuid_mismatch: accept); its identity is recorded",
                        describe_backing(&self.backing),
                        describe_backing(&sb.backing)
                    ));
                    let now = BackingIdentity {
                        sectors: sb.backing.sectors,
                        ..self.backing.clone()
                    };
                    let old = std::mem::replace(&mut sb.backing, now);
                    self.report.backing_rebound = Some(old);
                }
            },
        }
        let geo_control_sectors = sb.geometry.control_sectors();
        self.sb = Some(sb);
        self.phase = Phase::Control;
        Ok(OpenStep::Read {
            sector: CONTROL_SECTOR,
            sectors: geo_control_sectors,
        })
    }

    fn on_control(&mut self, buf: &[u8]) -> Result<OpenStep, OpenError> {
        let geo = self.geo();
        let seed = self.seed();
        for shard in 0..geo.shard_count {
            let slot = |i: u32| {
                let at = (2 * shard + i) as usize * geo.block_bytes();
                ControlSlot::decode(buf.get(at..at + SECTOR).unwrap_or(&[]), seed, &geo, shard)
            };
            let c = match (slot(0), slot(1)) {
                (Ok(a), Ok(b)) => {
                    if a.seq > b.seq {
                        (a, 0)
                    } else {
                        (b, 1)
                    }
                }
                (Ok(a), Err(e)) => {
                    self.report.problems.push(format!(
                        "shard {shard}: control slot B is invalid ({e}); using slot A, seq {}",
                        a.seq
                    ));
                    (a, 0)
                }
                (Err(e), Ok(b)) => {
                    self.report.problems.push(format!(
                        "shard {shard}: control slot A is invalid ({e}); using slot B, seq {}",
                        b.seq
                    ));
                    (b, 1)
                }
                (Err(a), Err(b)) => return Err(OpenError::ControlLost { shard, a, b }),
            };
            self.controls.push(c);
        }
        self.phase = Phase::Headers { seg: 0 };
        Ok(self.read_header(0))
    }

    fn read_header(&self, seg: u32) -> OpenStep {
        OpenStep::Read {
            sector: self.geo().segment_start(seg),
            sectors: self.geo().block_sectors.into(),
        }
    }

    fn on_header(&mut self, seg: u32, buf: &[u8]) -> Result<OpenStep, OpenError> {
        let geo = self.geo();
        self.headers
            .push(SegmentHeader::decode(buf, self.seed(), &geo, seg).ok());
        if seg + 1 < geo.segment_count {
            self.phase = Phase::Headers { seg: seg + 1 };
            return Ok(self.read_header(seg + 1));
        }
        self.report.segment_gens = self.headers.iter().map(|h| h.map(|h| h.gen)).collect();
        for (shard, (c, control_slot)) in self.controls.iter().enumerate() {
            let (c, control_slot) = (c.clone(), *control_slot);
            let t = c.tail;
            let ok = self
                .headers
                .get(t.pos.seg as usize)
                .copied()
                .flatten()
                .is_some_and(|h| h.gen == t.pos.gen && h.shard == shard as u32);
            if !ok {
                return Err(OpenError::TailLost {
                    shard: shard as u32,
                    seg: t.pos.seg,
                    gen: t.pos.gen,
                });
            }
            self.shards.push(ShardReplay {
                control: c,
                control_slot,
                index: ExtentMap::with_segments(
                    u64::from(geo.stripe_sectors),
                    geo.segment_start(0),
                    u64::from(geo.segment_sectors),
                    geo.segment_count,
                )
                .shared_by(geo.shard_count),
                segments: VecDeque::from([SegRec {
                    seg: t.pos.seg,
                    gen: t.pos.gen,
                    first: t,
                }]),
                log: VecDeque::new(),
                at: t.pos,
                data_low: geo.segment_sectors,
                seq: t.seq,
                prev_crc: t.prev_crc,
                max_epoch: 0,
                ksets: 0,
                keys: 0,
                needs_header: false,
            });
        }
        self.phase = Phase::Replay;
        self.cur = 0;
        Ok(self.read_segment())
    }

    fn read_segment(&self) -> OpenStep {
        let geo = self.geo();
        OpenStep::Read {
            sector: geo.segment_start(self.shards[self.cur].at.seg),
            sectors: u64::from(geo.segment_sectors),
        }
    }

    /// Replays the ksets of the current shard found in one segment.
    fn on_segment(&mut self, buf: &[u8]) -> Result<OpenStep, OpenError> {
        let geo = self.geo();
        let seed = self.seed();
        let shard = self.cur as u32;
        let seg_base = geo.segment_start(self.shards[self.cur].at.seg);
        loop {
            let r = &mut self.shards[self.cur];
            let at = r.at;
            let start = at.off as usize * SECTOR;
            let tail = buf.get(start..).unwrap_or(&[]);
            let decoded = Kset::decode(tail, seed, &geo, at, shard)
                .ok()
                .filter(|(k, _)| k.seq == r.seq && k.prev_crc == r.prev_crc);
            let Some((kset, crc)) = decoded else {
                if let Some(p) = end_of_log_problem(tail, at, r.seq, shard, seed, &geo) {
                    self.report.problems.push(p);
                }
                break;
            };
            let dirty_from = r.control.dirty_tail.seq;
            let written_back = kset.seq < dirty_from;
            for k in &kset.keys {
                apply_key(&mut r.index, k, kset.seq, seg_base, written_back);
                r.max_epoch = r.max_epoch.max(k.epoch);
                // v2 data lies above every later kset; v1 data below the next one.
                if k.kind == super::format::KeyKind::Data && k.data_off >= kset.next.off {
                    r.data_low = r.data_low.min(k.data_off);
                }
            }
            if !written_back {
                let keys = kset
                    .keys
                    .iter()
                    .filter(|k| !k.clean)
                    .map(|k| DirtyKey {
                        lba: k.lba,
                        len: k.len,
                        kind: k.kind,
                        crc: k.crc,
                        pos: seg_base + u64::from(k.data_off),
                        epoch: k.epoch,
                        through: false,
                    })
                    .collect();
                r.log.push_back(Logged {
                    seq: kset.seq,
                    next: kset.next,
                    crc,
                    keys,
                });
            }
            r.ksets += 1;
            r.keys += kset.keys.len() as u64;
            r.seq += 1;
            r.prev_crc = crc;
            r.at = kset.next;
            if kset.next.seg != at.seg {
                r.data_low = geo.segment_sectors;
                let n = kset.next;
                r.segments.push_back(SegRec {
                    seg: n.seg,
                    gen: n.gen,
                    first: LogTail {
                        pos: n,
                        seq: kset.seq + 1,
                        prev_crc: crc,
                    },
                });
                let hdr_ok = self
                    .headers
                    .get(n.seg as usize)
                    .copied()
                    .flatten()
                    .is_some_and(|h| h.gen == n.gen && h.shard == shard);
                if hdr_ok {
                    return Ok(self.read_segment());
                }
                // The log moved to a segment whose header never became durable: nothing
                // was acknowledged there. Claim it and rewrite the header before use.
                self.shards[self.cur].needs_header = true;
                break;
            }
        }
        self.cur += 1;
        if self.cur < self.shards.len() {
            return Ok(self.read_segment());
        }
        self.finish()
    }

    fn finish(&mut self) -> Result<OpenStep, OpenError> {
        self.phase = Phase::Finished;
        let Some(sb) = self.sb.clone() else {
            return Err(OpenError::Io {
                what: "superblock",
                err: IoError::Device,
            });
        };
        let geo = sb.geometry;
        let mut used = BTreeSet::new();
        let mut max_gen = 0u32;
        let mut epoch = 0u64;
        for r in &self.shards {
            for sr in &r.segments {
                used.insert(sr.seg);
                max_gen = max_gen.max(sr.gen);
            }
            epoch = epoch.max(r.max_epoch);
        }
        for g in self.headers.iter().flatten() {
            max_gen = max_gen.max(g.gen);
        }
        let free = (0..geo.segment_count).filter(|s| !used.contains(s));
        let pool = SegmentPool::new(free, max_gen.wrapping_add(1).max(1), geo.segment_count);
        // New writes start a new epoch: nothing after a restart joins an old one.
        let epoch = epoch + 1;
        let mut shards = Vec::with_capacity(self.shards.len());
        let first = self.shards.first().map(|r| &r.control);
        let mode = self.opts.mode.or(first.map(|c| c.mode)).unwrap_or_default();
        let seq_cutoff = self
            .opts
            .seq_cutoff
            .or(first.map(|c| c.seq_cutoff))
            .unwrap_or_default();
        let write_admission = self
            .opts
            .write_admission
            .or(first.map(|c| c.write_admission))
            .unwrap_or_default();
        for (i, r) in self.shards.drain(..).enumerate() {
            self.report.shards.push(ShardReport {
                control_seq: r.control.seq,
                tail: r.control.tail,
                ksets: r.ksets,
                keys: r.keys,
                segments: r.segments.iter().map(|s| s.seg).collect(),
                head: r.at,
                next_seq: r.seq,
            });
            let cfg = ShardConfig {
                id: i as u32,
                geo,
                crc_seed: sb.crc_seed(),
                data_crc: sb.data_crc,
                read_fill: !self.opts.no_read_fill,
                wb: WritebackOptions {
                    gc_percent: r.control.gc_percent,
                    ..self.opts.writeback
                },
                mode: r.control.mode,
                seq_cutoff: r.control.seq_cutoff,
                write_admission: r.control.write_admission,
            };
            let mut index = r.index;
            // A range rewritten after it was poisoned holds a newer dirty key: no longer.
            let poison = r
                .control
                .poison
                .iter()
                .flat_map(|&(lba, len)| index.poison_unless_dirty(lba, len))
                .collect();
            let log = LogState {
                poison,
                head: r.at,
                data_low: r.data_low,
                next_seq: r.seq,
                prev_crc: r.prev_crc,
                segments: r.segments,
                head_needs_header: r.needs_header,
                log: r.log,
                tail: r.control.tail,
                dirty_tail: r.control.dirty_tail,
                control_seq: r.control.seq,
                control_slot: r.control_slot,
            };
            let mut shard = Shard::new(cfg, log, index, epoch);
            // Every shard takes shard 0's mode, cut-off and admission (they differ only
            // after a crash during a switch), or the ones the host asks for; a change is
            // persisted.
            shard.set_mode(mode);
            shard.set_seq_cutoff(seq_cutoff);
            shard.set_write_admission(write_admission);
            shards.push(shard);
        }
        let gc_percent = self
            .controls
            .first()
            .map_or(DEFAULT_GC_PERCENT, |c| c.0.gc_percent);
        Ok(OpenStep::Done(Box::new(Cache::from_parts(
            sb,
            shards,
            pool,
            epoch,
            gc_percent,
            self.opts.clone(),
        ))))
    }
}

fn apply_key(
    index: &mut ExtentMap,
    k: &super::format::Key,
    seq: u64,
    seg_base: u64,
    before_dirty_tail: bool,
) {
    use super::format::KeyKind;
    let clean = k.clean || before_dirty_tail;
    let state = match k.kind {
        KeyKind::Data if clean => State::Clean,
        KeyKind::Data => State::Dirty,
        KeyKind::Zeroes | KeyKind::Unmap if clean => {
            // Already on the backing device: nothing to remember.
            index.punch(k.lba, k.len);
            return;
        }
        KeyKind::Zeroes => State::Zeroes,
        KeyKind::Unmap => State::Unmapped,
    };
    let pos = if k.kind == KeyKind::Data {
        seg_base + u64::from(k.data_off)
    } else {
        // Names the key for writeback (`ExtentMap::punch_state`).
        seq
    };
    index.insert(k.lba, Extent::new(pos, k.len, state, k.crc, k.epoch as u32));
}

/// At the end of a log, a kset header that claims to be the next kset but fails its
/// checks is torn (a crash mid-write) or corrupt. Stale data from an older use of the
/// segment names another sequence or position and is not reported.
fn end_of_log_problem(
    tail: &[u8],
    at: LogPos,
    seq: u64,
    shard: u32,
    seed: u32,
    geo: &Geometry,
) -> Option<String> {
    if tail.len() < 64 {
        return None;
    }
    let le32 = |o: usize| u32::from_le_bytes([tail[o], tail[o + 1], tail[o + 2], tail[o + 3]]);
    let le64 = |o: usize| u64::from(le32(o)) | (u64::from(le32(o + 4)) << 32);
    let magic_ok = le32(0) == KSET_MAGIC;
    let owner = u32::from(u16::from_le_bytes([tail[20], tail[21]]));
    let named = LogPos {
        seg: le32(28),
        gen: le32(32),
        off: le32(52),
    };
    let claims_here = le64(8) == seq && owner == shard && named == at;
    // An intact kset (its CRC right) of an earlier use of the segment is stale: the log
    // reached a reused segment and ends where an older kset lies.
    let stale = named != at && Kset::decode(tail, seed, geo, named, owner).is_ok();
    (claims_here || (magic_ok && !stale)).then(|| {
        format!(
            "shard {shard}: kset seq {seq} at segment {} sector {} is torn or corrupt; \
             the log ends before it",
            at.seg, at.off
        )
    })
}
