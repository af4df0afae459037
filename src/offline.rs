//! Offline inspection of a cache image: what `pcache inspect` and `pcache check` print.

use std::fmt::Write as _;

use crate::engine::format::{Superblock, SECTOR};
use crate::engine::geometry::SB_B_SECTOR;
use crate::engine::index::State;
use crate::engine::{Cache, CacheOptions, OpenReport};
use crate::media::host::open_cache;
use crate::media::BlockDevice;

/// What a full check of an image found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Everything found wrong; empty means the image is sound.
    pub problems: Vec<String>,
    pub open: Option<OpenReport>,
    pub superblock: Option<Superblock>,
    /// The pcache bdev name in the superblock replica used (None: not named).
    pub bdev_name: Option<String>,
    pub extents: u64,
    pub dirty_bytes: u64,
    pub clean_bytes: u64,
    pub crc_checked: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads the superblock replicas; the first valid one wins. Returns it with its bdev name.
fn read_superblock(
    dev: &mut dyn BlockDevice,
    problems: &mut Vec<String>,
) -> Option<(Superblock, Option<String>)> {
    let mut buf = vec![0u8; 2 * SB_B_SECTOR as usize * SECTOR];
    if dev.read(0, &mut buf).is_err() {
        problems.push("cannot read the superblock area".into());
        return None;
    }
    let half = SB_B_SECTOR as usize * SECTOR;
    let (ra, rb) = (&buf[..half], &buf[half..]);
    let named = |r: &[u8], sb: Superblock, problems: &mut Vec<String>| {
        let name = Superblock::decode_name(r).unwrap_or_else(|e| {
            problems.push(format!("superblock bdev name: {e}"));
            None
        });
        Some((sb, name))
    };
    match (Superblock::decode(ra), Superblock::decode(rb)) {
        (Ok(a), _) => named(ra, a, problems),
        (Err(_), Ok(b)) => named(rb, b, problems),
        (Err(a), Err(b)) => {
            problems.push(format!(
                "no valid superblock: replica A: {a}; replica B: {b}"
            ));
            None
        }
    }
}

/// Opens the image as its own superblock describes it, replaying every shard.
pub fn open_image(dev: &mut dyn BlockDevice) -> (Option<Cache>, CheckReport) {
    let mut report = CheckReport::default();
    let Some((sb, name)) = read_superblock(dev, &mut report.problems) else {
        return (None, report);
    };
    report.bdev_name = name;
    let opts = CacheOptions {
        no_read_fill: true,
        ..CacheOptions::default()
    };
    let (cache, open) = open_cache(dev, sb.backing.clone(), opts);
    report.problems.extend(open.problems.iter().cloned());
    report.superblock = Some(sb);
    report.open = Some(open);
    match cache {
        Ok(c) => (Some(c), report),
        Err(e) => {
            report.problems.push(format!("cannot open: {e}"));
            (None, report)
        }
    }
}

/// Verifies every CRC (superblock, control slots, segment headers, ksets through a full
/// replay, and the data of every key that carries one).
pub fn check(dev: &mut dyn BlockDevice) -> CheckReport {
    let (cache, mut report) = open_image(dev);
    let Some(cache) = cache else {
        return report;
    };
    for shard in cache.shards() {
        for (lba, e) in shard.index().iter() {
            report.extents += 1;
            match e.state() {
                State::Dirty | State::Zeroes | State::Unmapped => {
                    report.dirty_bytes += u64::from(e.len()) * 512
                }
                State::Clean => report.clean_bytes += u64::from(e.len()) * 512,
                State::Placeholder => {}
                State::Poisoned => report.problems.push(format!(
                    "lba {lba}+{}: dirty data lost to a CRC error in writeback (reads fail \
                     until rewritten)",
                    e.len()
                )),
            }
            if !e.has_crc() {
                continue;
            }
            let mut data = vec![0u8; e.len() as usize * SECTOR];
            if dev.read(e.pos, &mut data).is_err() {
                report
                    .problems
                    .push(format!("cannot read data of extent at lba {lba}"));
                continue;
            }
            report.crc_checked += 1;
            if Some(crc32c::crc32c(&data)) != e.crc() {
                report.problems.push(format!(
                    "shard {}: data of {} extent at lba {lba}+{} (cache sector {}) fails its CRC",
                    shard.id(),
                    if e.is_dirty() { "dirty" } else { "clean" },
                    e.len(),
                    e.pos
                ));
            }
        }
    }
    report
}

/// A human-readable description of an image (superblock, shards, segments, usage).
pub fn inspect(dev: &mut dyn BlockDevice) -> String {
    let report = check(dev);
    let mut out = String::new();
    if let Some(sb) = &report.superblock {
        let g = &sb.geometry;
        let _ = writeln!(out, "superblock:");
        let _ = writeln!(out, "  format version   {}", sb.version);
        let _ = writeln!(
            out,
            "  cache uuid       {}",
            sb.cache_uuid
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let _ = writeln!(
            out,
            "  pcache bdev      {}",
            report
                .bdev_name
                .as_deref()
                .map_or("(none)".to_string(), |n| format!("'{n}'"))
        );
        let _ = writeln!(out, "  cache size       {} bytes", g.cache_sectors * 512);
        let _ = writeln!(out, "  cache blocks     {} bytes", g.block_bytes());
        let _ = writeln!(
            out,
            "  backing          '{}' {} bytes, block size {}",
            sb.backing.name,
            sb.backing.sectors * 512,
            sb.backing.block_size
        );
        let _ = writeln!(
            out,
            "  segments         {} x {} KiB from sector {}",
            g.segment_count,
            g.segment_sectors / 2,
            g.segments_start
        );
        let _ = writeln!(out, "  stripe           {} KiB", g.stripe_sectors / 2);
        let _ = writeln!(out, "  shards           {}", g.shard_count);
        let _ = writeln!(out, "  data crc         {}", sb.data_crc);
    }
    if let Some(open) = &report.open {
        for (i, s) in open.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "shard {i}: control seq {}, tail seg {} sector {} kset seq {}; {} ksets, {} keys; \
                 head seg {} sector {}; segments {:?}",
                s.control_seq,
                s.tail.pos.seg,
                s.tail.pos.off,
                s.tail.seq,
                s.ksets,
                s.keys,
                s.head.seg,
                s.head.off,
                s.segments
            );
        }
        let used: usize = open.shards.iter().map(|s| s.segments.len()).sum();
        let _ = writeln!(
            out,
            "segments: {used} in logs, {} free",
            open.segment_gens.len().saturating_sub(used)
        );
    }
    let _ = writeln!(
        out,
        "extents: {} ({} dirty bytes, {} clean bytes); data CRCs checked: {}",
        report.extents, report.dirty_bytes, report.clean_bytes, report.crc_checked
    );
    if report.is_clean() {
        let _ = writeln!(out, "status: clean (every CRC verified)");
    } else {
        let _ = writeln!(out, "status: {} problem(s):", report.problems.len());
        for p in &report.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}
