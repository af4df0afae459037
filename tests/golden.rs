//! The committed images of each format version (v1, v2, v3 with 512-byte and with 4 KiB
//! cache blocks) must keep opening and reading back their known contents, and a single
//! flipped bit anywhere in their superblocks, control slots or ksets must be reported by
//! `check`.
//!
//! `regenerate_golden_image` writes the images of the current format version (`IMAGES`):
//! `cargo test --test golden -- --ignored regenerate_golden_image`. This build writes v3;
//! the v1 and v2 images check it still reads them.

mod common;

use common::*;
use pcache::engine::format::{ControlSlot, Kset, LogPos, Superblock, FORMAT_VERSION, SECTOR};
use pcache::engine::OpenReport;
use pcache::engine::{CacheOptions, FormatOptions, LayoutOptions};
use pcache::media::host::{HostError, SyncHost};
use pcache::media::mem::MemDevice;
use pcache::media::BlockDevice;
use pcache::offline;

/// A committed image: the same kind of contents, formatted and written by the build of its
/// format version, on a cache device of its block size.
struct Golden {
    file: &'static str,
    version: u32,
    block_bytes: u32,
    /// (lba, sectors, writer id); later entries win.
    writes: &'static [(u64, u32, u64)],
    unmapped: (u64, u32),
    /// A read miss that fills a clean extent.
    filled: (u64, u32),
}

/// 512-byte cache blocks: writes of any sector count.
const WRITES_512: &[(u64, u32, u64)] = &[
    (0, 8, 1),
    (64, 16, 2),
    (4, 2, 3),
    (200, 40, 4),
    (1000, 8, 5),
];
/// 4 KiB cache blocks: whole blocks only (what a pcache bdev of 4 KiB blocks sends).
const WRITES_4K: &[(u64, u32, u64)] = &[
    (0, 16, 1),
    (64, 16, 2),
    (8, 8, 3),
    (200, 40, 4),
    (1000, 16, 5),
];

const IMAGES: [Golden; 4] = [
    Golden {
        file: "golden-v1.img",
        version: 1,
        block_bytes: 512,
        writes: WRITES_512,
        unmapped: (1004, 2),
        filled: (500, 8),
    },
    Golden {
        file: "golden-v2.img",
        version: 2,
        block_bytes: 512,
        writes: WRITES_512,
        unmapped: (1004, 2),
        filled: (500, 8),
    },
    Golden {
        file: "golden-v3.img",
        version: 3,
        block_bytes: 512,
        writes: WRITES_512,
        unmapped: (1004, 2),
        filled: (500, 8),
    },
    Golden {
        file: "golden-v3-4k.img",
        version: 3,
        block_bytes: 4096,
        writes: WRITES_4K,
        unmapped: (1008, 8),
        filled: (504, 8),
    },
];
const BACKING_SECTORS: u64 = 2048;

fn golden_format(block_bytes: u32) -> FormatOptions {
    FormatOptions {
        layout: LayoutOptions {
            segment_bytes: 64 << 10,
            stripe_bytes: 16 << 10,
            shards: 2,
            block_bytes,
        },
        data_crc: true,
        cache_uuid: *b"pcache-golden-v1",
        gc_percent: 70,
    }
}

impl Golden {
    fn expected(&self) -> Vec<u8> {
        let mut img = vec![0u8; BACKING_SECTORS as usize * SECTOR];
        for &(lba, len, id) in self.writes {
            let at = lba as usize * SECTOR;
            img[at..at + len as usize * SECTOR].copy_from_slice(&data_of(id, lba, len));
        }
        let at = self.unmapped.0 as usize * SECTOR;
        img[at..at + self.unmapped.1 as usize * SECTOR].fill(0);
        img
    }

    fn load(&self) -> MemDevice {
        let path = format!("{}/tests/data/{}", env!("CARGO_MANIFEST_DIR"), self.file);
        MemDevice::from_vec(
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path} is committed: {e}")),
        )
    }
}

fn v1() -> &'static Golden {
    &IMAGES[0]
}

fn expected() -> Vec<u8> {
    v1().expected()
}

fn load() -> MemDevice {
    v1().load()
}

/// Opens a golden image over a zeroed backing device of the identity it was written for.
fn open_image(cache: MemDevice) -> Result<(MemHost, OpenReport), HostError> {
    SyncHost::open(
        cache,
        MemDevice::new(BACKING_SECTORS * 512),
        identity(BACKING_SECTORS),
        CacheOptions::default(),
    )
}

/// Writes the images of the current format version (one per block size).
#[test]
#[ignore]
fn regenerate_golden_image() {
    for g in IMAGES.iter().filter(|g| g.version == FORMAT_VERSION) {
        let mut host = SyncHost::format(
            MemDevice::new(512 << 10),
            MemDevice::new(BACKING_SECTORS * 512),
            identity(BACKING_SECTORS),
            &golden_format(g.block_bytes),
            CacheOptions::default(),
        )
        .unwrap();
        for &(lba, len, id) in g.writes {
            host.write(lba, data_of(id, lba, len)).unwrap();
        }
        host.flush().unwrap();
        host.unmap(g.unmapped.0, g.unmapped.1).unwrap();
        host.read(g.filled.0, g.filled.1).unwrap();
        let (c, _) = host.into_devices();
        let path = format!("{}/tests/data/{}", env!("CARGO_MANIFEST_DIR"), g.file);
        std::fs::write(path, c.bytes()).unwrap();
    }
}

/// A v1 cache opened by this build takes new writes in the current layout (ksets up from
/// the segment start, after the v1 ksets; data down from its end, 4 KiB-aligned), and the
/// mixed log replays: everything reads back after a reopen and checks cleanly.
#[test]
fn the_golden_v1_image_takes_new_writes_and_replays() {
    let (mut host, _) = open_image(load()).expect("golden image opens");
    let mut want = expected();
    let mut put = |host: &mut SyncHost<MemDevice, MemDevice>, lba: u64, len: u32, id: u64| {
        let d = data_of(id, lba, len);
        host.write(lba, d.clone()).expect("write");
        let at = lba as usize * SECTOR;
        want[at..at + d.len()].copy_from_slice(&d);
    };
    put(&mut host, 1500, 3, 10);
    for i in 0..6u64 {
        put(&mut host, 1600 + i * 16, 8, 11 + i);
    }
    let mut pieces = Vec::new();
    for i in 0..6u64 {
        let lba = 1600 + i * 16;
        let shard = host.cache.superblock().geometry.shard_of(lba) as usize;
        host.cache.shards()[shard]
            .index()
            .lookup(lba, 8, &mut pieces);
        assert_eq!(pieces[0].extent.expect("cached").pos % 8, 0, "lba {lba}");
    }
    for _ in 0..2 {
        let got = host.read(0, BACKING_SECTORS as u32).unwrap();
        assert!(got == want, "contents after new writes");
        let (c, b) = host.into_devices();
        let mut copy = MemDevice::from_vec(c.bytes().to_vec());
        let r = offline::check(&mut copy);
        assert!(r.is_clean(), "{:?}", r.problems);
        host = SyncHost::open(c, b, identity(BACKING_SECTORS), CacheOptions::default())
            .expect("reopen")
            .0;
    }
}

#[test]
fn the_golden_images_open_and_read_back_their_contents() {
    for g in &IMAGES {
        let f = g.file;
        let (mut host, report) = open_image(g.load()).unwrap_or_else(|e| panic!("{f} opens: {e}"));
        assert!(report.problems.is_empty(), "{f}: {:?}", report.problems);
        let sb = host.cache.superblock();
        assert_eq!(sb.version, g.version, "{f}");
        assert_eq!(sb.geometry.block_bytes(), g.block_bytes as usize, "{f}");
        let got = host.read(0, BACKING_SECTORS as u32).unwrap();
        assert!(got == g.expected(), "{f}: contents changed");
        let mut dev = g.load();
        let r = offline::check(&mut dev);
        assert!(r.is_clean(), "{f}: {:?}", r.problems);
        // Dirty data only in v1: the engine that wrote v2 writes back while the segment pool
        // is over `gc_percent` used, which a 512 KiB cache of 64 KiB segments always is (the
        // v1 engine did not yet).
        assert!(
            r.crc_checked > 0 && r.clean_bytes > 0 && (g.version > 1 || r.dirty_bytes > 0),
            "{f}: {} CRCs, {} clean, {} dirty",
            r.crc_checked,
            r.clean_bytes,
            r.dirty_bytes
        );
        assert_eq!(r.bdev_name, None, "written without a bdev name");
    }
}

/// A cache of 4 KiB blocks refuses requests that are not whole blocks (its host exports
/// 4 KiB blocks), and its metadata lies in whole blocks: control slots one block apart,
/// ksets starting after the segment header's block.
#[test]
fn the_golden_4k_image_takes_whole_blocks_only() {
    let g = &IMAGES[3];
    let (mut host, _) = open_image(g.load()).expect("opens");
    let geo = host.cache.superblock().geometry;
    assert_eq!(geo.block_sectors, 8);
    assert_eq!(geo.control_sector(1, 1) - geo.control_sector(0, 0), 3 * 8);
    assert!(host.write(3, data_of(9, 3, 8)).is_err(), "unaligned start");
    assert!(host.write(8, data_of(9, 8, 4)).is_err(), "partial block");
    assert!(host.read(4, 8).is_err(), "unaligned read");
    host.write(1600, data_of(9, 1600, 24))
        .expect("whole blocks");
    // (The image's clean data was written back to a backing device that is not kept: GC
    // may drop it now, so only what this test writes is compared.)
    assert!(host.read(1600, 24).unwrap() == data_of(9, 1600, 24));
    let (c, b) = host.into_devices();
    let (mut host, report) =
        SyncHost::open(c, b, identity(BACKING_SECTORS), CacheOptions::default()).expect("reopen");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    for s in &report.shards {
        assert_eq!(s.head.off % 8, 0, "{:?}", s.head);
    }
    assert!(host.read(1600, 24).unwrap() == data_of(9, 1600, 24));
}

/// Marking the v1 image's superblock with the current version (what the SPDK module does
/// before it registers the bdev) changes only the version field and the CRC, and the
/// marked image still opens, reads back its contents and checks cleanly.
#[test]
fn the_golden_v1_superblock_upgrades_to_the_current_version() {
    let mut dev = load();
    let a = dev.bytes()[..4096].to_vec();
    let up = Superblock::upgrade(&a).expect("upgrade");
    let changed: Vec<usize> = (0..4096).filter(|&i| up[i] != a[i]).collect();
    // The version, the block size (512: v1 and v2 left it zero) and the CRC.
    assert!(
        changed
            .iter()
            .all(|&i| (8..12).contains(&i) || (76..80).contains(&i) || i >= 4092),
        "{changed:?}"
    );
    let sb = Superblock::decode(&up).expect("decodes");
    assert_eq!(sb.version, FORMAT_VERSION);
    assert_eq!(
        Superblock {
            version: 1,
            ..sb.clone()
        },
        Superblock::decode(&a).unwrap()
    );
    dev.bytes_mut()[..4096].copy_from_slice(&up);
    dev.bytes_mut()[4096..8192].copy_from_slice(&up);
    let mut copy = MemDevice::from_vec(dev.bytes().to_vec());
    let r = offline::check(&mut copy);
    assert!(r.is_clean(), "{:?}", r.problems);
    let (mut host, report) = open_image(dev).expect("upgraded image opens");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(host.read(0, BACKING_SECTORS as u32).unwrap() == expected());
}

/// In the v2 and v3 images every whole 4 KiB block of data starts on a 4 KiB boundary of
/// the cache.
#[test]
fn the_golden_v2_and_v3_images_hold_4k_blocks_aligned() {
    for g in IMAGES.iter().filter(|g| g.version >= 2) {
        let (host, _) = open_image(g.load()).expect("golden image opens");
        let mut pieces = Vec::new();
        let mut seen = 0;
        for &(lba, len, _) in g.writes.iter().filter(|w| w.1 % 8 == 0) {
            let shard = host.cache.superblock().geometry.shard_of(lba) as usize;
            host.cache.shards()[shard]
                .index()
                .lookup(lba, len, &mut pieces);
            for p in pieces.iter().filter(|p| p.whole && p.len % 8 == 0) {
                let e = p.extent.expect("cached");
                assert_eq!(e.pos % 8, 0, "{}: write at {lba}: {e:?}", g.file);
                seen += 1;
            }
        }
        assert!(seen > 0, "{}", g.file);
    }
}

/// The superblock's bdev name (bytes 160..224, zero in images from before the field):
/// absent in the golden image; naming a replica changes only the field and the CRC, the
/// named image opens and checks cleanly, and clearing the name restores the original bytes.
#[test]
fn golden_superblock_name_field() {
    let img = load().bytes().to_vec();
    let (a, b) = (&img[..4096], &img[4096..8192]);
    for r in [a, b] {
        assert_eq!(Superblock::decode_name(r).unwrap(), None);
    }
    let named = Superblock::rename(a, Some("PC0")).unwrap();
    assert_eq!(
        Superblock::decode_name(&named).unwrap().as_deref(),
        Some("PC0")
    );
    let sb = Superblock::decode(a).unwrap();
    assert_eq!(Superblock::decode(&named).unwrap(), sb);
    assert_eq!(sb.encode_named(Some("PC0")).unwrap(), named);
    let changed: Vec<usize> = (0..4096).filter(|&i| named[i] != a[i]).collect();
    assert!(
        changed
            .iter()
            .all(|&i| (160..224).contains(&i) || i >= 4092),
        "{changed:?}"
    );
    let mut dev = load();
    dev.bytes_mut()[..4096].copy_from_slice(&named);
    dev.bytes_mut()[4096..8192].copy_from_slice(&named);
    let r = offline::check(&mut dev);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(r.bdev_name.as_deref(), Some("PC0"));
    assert!(offline::inspect(&mut dev).contains("pcache bdev      'PC0'"));
    let longest = "n".repeat(63);
    let r63 = Superblock::rename(a, Some(&longest)).unwrap();
    assert_eq!(
        Superblock::decode_name(&r63).unwrap().as_deref(),
        Some(longest.as_str())
    );
    assert!(Superblock::rename(a, Some(&"n".repeat(64))).is_err());
    assert!(Superblock::rename(a, Some("a\0b")).is_err());
    assert_eq!(Superblock::rename(&named, None).unwrap(), a);
    // A name without its NUL, or with bytes after it, is refused (CRC re-sealed by hand).
    let mut bad = named.clone();
    bad[160..224].fill(b'x');
    let crc = crc32c::crc32c(&bad[..4092]);
    bad[4092..].copy_from_slice(&crc.to_le_bytes());
    assert!(Superblock::decode(&bad).is_ok());
    assert!(Superblock::decode_name(&bad).is_err());
    bad[160..224].fill(0);
    bad[200] = 1;
    let crc = crc32c::crc32c(&bad[..4092]);
    bad[4092..].copy_from_slice(&crc.to_le_bytes());
    assert!(Superblock::decode_name(&bad).is_err());
}

/// Byte ranges of every superblock replica, control slot and kset (header and keys).
fn metadata_ranges(dev: &mut MemDevice) -> Vec<(usize, usize, String)> {
    let sb = Superblock::decode(&dev.bytes()[..4096]).unwrap();
    let g = sb.geometry;
    let seed = sb.crc_seed();
    let mut out = vec![
        (0, 4096, "superblock A".into()),
        (4096, 8192, "superblock B".into()),
    ];
    for shard in 0..g.shard_count {
        let mut best = None;
        for slot in 0..2 {
            let at = g.control_sector(shard, slot) as usize * SECTOR;
            out.push((
                at,
                at + SECTOR,
                format!("control shard {shard} slot {slot}"),
            ));
            let c = ControlSlot::decode(&dev.bytes()[at..at + SECTOR], seed, &g, shard).unwrap();
            if best.as_ref().is_none_or(|b: &ControlSlot| c.seq > b.seq) {
                best = Some(c);
            }
        }
        let mut pos: LogPos = best.unwrap().tail.pos;
        loop {
            let at = (g.segment_start(pos.seg) + u64::from(pos.off)) as usize * SECTOR;
            let Ok((k, _)) = Kset::decode(&dev.bytes()[at..], seed, &g, pos, shard) else {
                break;
            };
            out.push((
                at,
                at + 64 + 40 * k.keys.len(),
                format!("kset shard {shard} seq {}", k.seq),
            ));
            pos = k.next;
        }
    }
    out
}

#[test]
fn check_reports_every_single_bit_flip_in_metadata() {
    for g in &IMAGES {
        println!("{}:", g.file);
        check_reports_every_bit_flip(g.load());
    }
}

fn check_reports_every_bit_flip(mut dev: MemDevice) {
    let ranges = metadata_ranges(&mut dev);
    assert!(ranges.iter().filter(|r| r.2.starts_with("kset")).count() >= 4);
    let mut flips = 0u64;
    for (start, end, what) in &ranges {
        for byte in *start..*end {
            for bit in 0..8 {
                dev.bytes_mut()[byte] ^= 1 << bit;
                let r = offline::check(&mut dev);
                assert!(
                    !r.is_clean(),
                    "flip of bit {bit} of byte {} in {what} went unreported",
                    byte - start
                );
                dev.bytes_mut()[byte] ^= 1 << bit;
                flips += 1;
            }
        }
    }
    assert!(offline::check(&mut dev).is_clean());
    println!("bit flips reported by check: {flips} of {flips}");
    let _ = dev.sectors();
}
