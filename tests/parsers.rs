//! Parsing never trusts the media: arbitrary bytes, and valid structures with random
//! corruption, give a value or a typed error — never a panic, never an out-of-bounds value.

use pcache::engine::format::{
    BackingIdentity, ControlSlot, Key, KeyKind, Kset, LogPos, LogTail, SegmentHeader, Superblock,
    FORMAT_VERSION,
};
use pcache::engine::geometry::{Geometry, LayoutOptions};
use proptest::prelude::*;

fn geo() -> Geometry {
    Geometry::new(
        64 << 20,
        1 << 20,
        LayoutOptions {
            segment_bytes: 1 << 20,
            stripe_bytes: 64 << 10,
            shards: 4,
            ..LayoutOptions::default()
        },
    )
    .unwrap()
}

/// [`geo`] on a device of 4 KiB blocks.
fn geo_4k() -> Geometry {
    Geometry::new(
        64 << 20,
        1 << 20,
        LayoutOptions {
            segment_bytes: 1 << 20,
            stripe_bytes: 64 << 10,
            shards: 4,
            block_bytes: 4096,
        },
    )
    .unwrap()
}

/// A kset of whole 4 KiB blocks: after the segment header's block, data on blocks.
fn sample_kset_4k() -> Kset {
    let at = LogPos {
        seg: 3,
        gen: 9,
        off: 8,
    };
    let keys = (0..4)
        .map(|i| Key {
            lba: 64 * i,
            len: 16,
            kind: KeyKind::Data,
            data_off: 16 + 16 * i as u32,
            gen: 9,
            epoch: 7,
            clean: false,
            crc: None,
        })
        .collect();
    Kset {
        seq: 42,
        prev_crc: 0x1234,
        shard: 2,
        pos: at,
        next: LogPos { off: 16, ..at },
        region_sectors: 8,
        keys,
    }
}

fn sample_kset() -> Kset {
    let at = LogPos {
        seg: 3,
        gen: 9,
        off: 1,
    };
    let keys = (0..5)
        .map(|i| Key {
            lba: 100 * i,
            len: 8,
            kind: if i == 4 {
                KeyKind::Unmap
            } else {
                KeyKind::Data
            },
            data_off: if i == 4 { 0 } else { 2 + 8 * i as u32 },
            gen: 9,
            epoch: 7,
            clean: i == 2,
            crc: (i == 1).then_some(0xdead_beef),
        })
        .collect();
    Kset {
        seq: 42,
        prev_crc: 0x1234,
        shard: 2,
        pos: at,
        next: LogPos {
            off: 1 + 1 + 32,
            ..at
        },
        region_sectors: 1 + 32,
        keys,
    }
}

fn sample_superblock() -> Superblock {
    Superblock {
        version: FORMAT_VERSION,
        geometry: geo(),
        cache_uuid: [1; 16],
        backing: BackingIdentity {
            sectors: 1 << 20,
            block_size: 512,
            uuid: [2; 16],
            name: "nvme0n1".into(),
        },
        data_crc: true,
    }
}

#[test]
fn valid_structures_round_trip() {
    let g = geo();
    let sb = sample_superblock();
    assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    let k = sample_kset();
    let (bytes, crc) = k.encode(77);
    let (back, crc2) = Kset::decode(&bytes, 77, &g, k.pos, 2).unwrap();
    assert_eq!((back, crc2), (k, crc));
    let t = LogTail {
        pos: LogPos {
            seg: 1,
            gen: 2,
            off: 3,
        },
        seq: 4,
        prev_crc: 5,
    };
    let c = ControlSlot {
        shard: 3,
        seq: 9,
        tail: t,
        dirty_tail: t,
        gc_percent: 70,
        mode: pcache::engine::CacheMode::PassThrough,
        seq_cutoff: pcache::engine::SeqCutoff {
            policy: pcache::engine::SeqPolicy::Always,
            bytes: 64 << 10,
        },
        write_admission: pcache::engine::WriteAdmission::SecondTouch,
        poison: vec![(16, 8), (4096, 1)],
    };
    assert_eq!(ControlSlot::decode(&c.encode(5), 5, &g, 3).unwrap(), c);
    // Byte 84 holds the write admission: zero (a slot written before it existed) reads as
    // `always`; a code no build wrote makes the slot invalid, never a guess.
    let reseal = |b: &mut Vec<u8>| {
        let crc = crc32c::crc32c_append(5, &b[..508]);
        b[508..512].copy_from_slice(&crc.to_le_bytes());
    };
    let mut old = c.encode(5);
    assert_eq!(old[84], 1, "second_touch at byte 84");
    old[84] = 0;
    reseal(&mut old);
    let back = ControlSlot::decode(&old, 5, &g, 3).unwrap();
    assert_eq!(back.write_admission, pcache::engine::WriteAdmission::Always);
    old[84] = 2;
    reseal(&mut old);
    let e = ControlSlot::decode(&old, 5, &g, 3).unwrap_err().to_string();
    assert!(e.contains("write_admission"), "{e}");
    let h = SegmentHeader {
        seg: 7,
        gen: 8,
        shard: 1,
    };
    assert_eq!(SegmentHeader::decode(&h.encode(5), 5, &g, 7).unwrap(), h);
}

/// A kset encoded into a reused buffer (longer, and dirty from an older kset) is the same
/// bytes as one encoded afresh and padded to the block, and decodes the same.
#[test]
fn a_kset_encoded_into_a_reused_buffer_is_the_fresh_encoding() {
    let g = geo_4k();
    let k = sample_kset_4k();
    let (fresh, crc) = k.encode(77);
    let fresh = g.whole_blocks(fresh);
    let mut reused = vec![0xa5u8; 3 * 4096];
    let crc2 = k.encode_into(77, &mut reused, g.block_bytes());
    assert_eq!((reused.len(), crc2), (4096, crc));
    assert!(
        reused == fresh,
        "the reused buffer's old bytes leaked into the kset"
    );
    let (back, _) = Kset::decode(&reused, 77, &g, k.pos, 2).unwrap();
    assert_eq!(back, k);
}

#[test]
fn a_kset_from_another_cache_instance_does_not_validate() {
    let k = sample_kset();
    let (bytes, _) = k.encode(77);
    assert!(Kset::decode(&bytes, 78, &geo(), k.pos, 2).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16384)) {
        let g = geo();
        let _ = Superblock::decode(&bytes);
        let _ = ControlSlot::decode(&bytes, 0, &g, 0);
        let _ = SegmentHeader::decode(&bytes, 0, &g, 0);
        let _ = Kset::decode(&bytes, 0, &g, LogPos { seg: 0, gen: 0, off: 1 }, 0);
        let _ = Kset::peek_sectors(&bytes);
    }

    /// Corrupted valid ksets (CRC recomputed, so only the bounds checks stand between the
    /// corruption and the engine) either fail or decode to in-bounds keys.
    #[test]
    fn corrupted_ksets_with_fixed_crc_stay_in_bounds(
        flips in proptest::collection::vec((0usize..464, any::<u8>()), 1..8)
    ) {
        let g = geo();
        let k = sample_kset();
        let (mut bytes, _) = k.encode(0);
        let used = 64 + 40 * k.keys.len();
        for (at, x) in flips {
            if at >= 8 && at < used {
                bytes[at] ^= x;
            }
        }
        let crc = crc32c::crc32c_append(0, &bytes[8..used]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        if let Ok((d, _)) = Kset::decode(&bytes, 0, &g, k.pos, 2) {
            for key in &d.keys {
                prop_assert!(key.lba + u64::from(key.len) <= g.backing_sectors);
                prop_assert!(key.len > 0);
                if key.kind == KeyKind::Data {
                    prop_assert!(key.data_off + key.len <= g.segment_sectors);
                }
            }
            prop_assert!(d.next.seg < g.segment_count && d.next.off < g.segment_sectors);
        }
    }

    /// The same on a cache of 4 KiB blocks: what decodes puts data and the next kset on
    /// whole blocks (a partial block could not be read or written on such a device).
    #[test]
    fn corrupted_4k_ksets_with_fixed_crc_stay_on_whole_blocks(
        flips in proptest::collection::vec((0usize..224, any::<u8>()), 1..8)
    ) {
        let g = geo_4k();
        let k = sample_kset_4k();
        let (mut bytes, _) = k.encode(0);
        prop_assert!(Kset::decode(&bytes, 0, &g, k.pos, 2).is_ok());
        let used = 64 + 40 * k.keys.len();
        for (at, x) in flips {
            if at >= 8 && at < used {
                bytes[at] ^= x;
            }
        }
        let crc = crc32c::crc32c_append(0, &bytes[8..used]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        if let Ok((d, _)) = Kset::decode(&bytes, 0, &g, k.pos, 2) {
            for key in d.keys.iter().filter(|k| k.kind == KeyKind::Data) {
                prop_assert!(key.data_off % 8 == 0 && key.len % 8 == 0, "{key:?}");
                prop_assert!(key.data_off + key.len <= g.segment_sectors);
            }
            prop_assert!(d.next.off % 8 == 0 && d.next.off >= 8, "{:?}", d.next);
        }
    }

    #[test]
    fn corrupted_superblocks_with_fixed_crc_give_valid_geometry(
        flips in proptest::collection::vec((0usize..4092, any::<u8>()), 1..8)
    ) {
        let mut bytes = sample_superblock().encode();
        for (at, x) in flips {
            bytes[at] ^= x;
        }
        let crc = crc32c::crc32c(&bytes[..4092]);
        bytes[4092..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(sb) = Superblock::decode(&bytes) {
            prop_assert!(sb.geometry.validate().is_ok());
        }
    }
}
