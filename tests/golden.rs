//! The committed images of each format version (v1, v2) must keep opening and reading back
//! their known contents, and a single flipped bit anywhere in their superblocks, control
//! slots or ksets must be reported by `check`.
//!
//! `regenerate_golden_image` writes an image in the current format version to
//! `tests/data/golden-v<version>.img`: `cargo test --test golden -- --ignored
//! regenerate_golden_image`. This build writes v2; the v1 image checks it still reads v1.

mod common;

use common::*;
use pcache::engine::format::{ControlSlot, Kset, LogPos, Superblock, FORMAT_VERSION, SECTOR};
use pcache::engine::OpenReport;
use pcache::engine::{CacheOptions, FormatOptions, LayoutOptions};
use pcache::media::host::{HostError, SyncHost};
use pcache::media::mem::MemDevice;
use pcache::media::BlockDevice;
use pcache::offline;

/// The committed images, by format version: the same writes, formatted and written by the
/// build of each version.
const VERSIONS: [u32; 2] = [1, 2];
const BACKING_SECTORS: u64 = 2048;

fn golden_format() -> FormatOptions {
    FormatOptions {
        layout: LayoutOptions {
            segment_bytes: 64 << 10,
            stripe_bytes: 16 << 10,
            shards: 2,
        },
        data_crc: true,
        cache_uuid: *b"pcache-golden-v1",
        gc_percent: 70,
    }
}

/// The known contents: (lba, sectors, writer id); later entries win.
const WRITES: &[(u64, u32, u64)] = &[
    (0, 8, 1),
    (64, 16, 2),
    (4, 2, 3),
    (200, 40, 4),
    (1000, 8, 5),
];
const UNMAPPED: (u64, u32) = (1004, 2);

fn expected() -> Vec<u8> {
    let mut img = vec![0u8; BACKING_SECTORS as usize * SECTOR];
    for &(lba, len, id) in WRITES {
        let at = lba as usize * SECTOR;
        img[at..at + len as usize * SECTOR].copy_from_slice(&data_of(id, lba, len));
    }
    let at = UNMAPPED.0 as usize * SECTOR;
    img[at..at + UNMAPPED.1 as usize * SECTOR].fill(0);
    img
}

fn load_version(version: u32) -> MemDevice {
    let path = format!(
        "{}/tests/data/golden-v{version}.img",
        env!("CARGO_MANIFEST_DIR")
    );
    MemDevice::from_vec(std::fs::read(&path).unwrap_or_else(|e| panic!("{path} is committed: {e}")))
}

fn load() -> MemDevice {
    load_version(1)
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

#[test]
#[ignore]
fn regenerate_golden_image() {
    let mut host = SyncHost::format(
        MemDevice::new(512 << 10),
        MemDevice::new(BACKING_SECTORS * 512),
        identity(BACKING_SECTORS),
        &golden_format(),
        CacheOptions::default(),
    )
    .unwrap();
    for &(lba, len, id) in WRITES {
        host.write(lba, data_of(id, lba, len)).unwrap();
    }
    host.flush().unwrap();
    host.unmap(UNMAPPED.0, UNMAPPED.1).unwrap();
    // A read miss fills a clean extent.
    host.read(500, 8).unwrap();
    let (c, _) = host.into_devices();
    let path = format!(
        "{}/tests/data/golden-v{FORMAT_VERSION}.img",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::write(path, c.bytes()).unwrap();
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
    for v in VERSIONS {
        let (mut host, report) =
            open_image(load_version(v)).unwrap_or_else(|e| panic!("golden v{v} image opens: {e}"));
        assert!(report.problems.is_empty(), "v{v}: {:?}", report.problems);
        assert_eq!(host.cache.superblock().version, v);
        let got = host.read(0, BACKING_SECTORS as u32).unwrap();
        assert!(got == expected(), "golden v{v} image contents changed");
        let mut dev = load_version(v);
        let r = offline::check(&mut dev);
        assert!(r.is_clean(), "v{v}: {:?}", r.problems);
        // Dirty data only in v1: the engine that wrote v2 writes back while the segment pool
        // is over `gc_percent` used, which a 512 KiB cache of 64 KiB segments always is (the
        // v1 engine did not yet).
        assert!(
            r.crc_checked > 0 && r.clean_bytes > 0 && (v > 1 || r.dirty_bytes > 0),
            "v{v}: {} CRCs, {} clean, {} dirty",
            r.crc_checked,
            r.clean_bytes,
            r.dirty_bytes
        );
        assert_eq!(r.bdev_name, None, "written without a bdev name");
    }
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
    assert!(
        changed.iter().all(|&i| (8..12).contains(&i) || i >= 4092),
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

/// In the v2 image every whole 4 KiB block of data starts on a 4 KiB boundary of the cache.
#[test]
fn the_golden_v2_image_holds_4k_blocks_aligned() {
    let (host, _) = open_image(load_version(2)).expect("golden v2 image opens");
    let mut pieces = Vec::new();
    let mut seen = 0;
    for &(lba, len, _) in WRITES.iter().filter(|w| w.1 % 8 == 0) {
        let shard = host.cache.superblock().geometry.shard_of(lba) as usize;
        host.cache.shards()[shard]
            .index()
            .lookup(lba, len, &mut pieces);
        for p in pieces.iter().filter(|p| p.whole && p.len % 8 == 0) {
            let e = p.extent.expect("cached");
            assert_eq!(e.pos % 8, 0, "write at {lba}: {e:?}");
            seen += 1;
        }
    }
    assert!(seen > 0);
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
    for v in VERSIONS {
        check_reports_every_bit_flip(load_version(v));
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
