//! The engine over the DAX host (a mapped file here; tmpfs has no MAP_SYNC, so writes
//! persist with msync): persist order of a write, model-based runs with reopen, and crashes
//! cut between persist barriers.

mod common;

use common::*;
use pcache::engine::format::KSET_MAGIC;
use pcache::engine::{format, CacheOptions, IoDone, Op, Request};
use pcache::media::dax::{DaxDevice, PersistEvent};
use pcache::media::host::{open_cache, SyncHost};
use pcache::media::mem::MemDevice;
use pcache::media::sim::Rng;
use pcache::media::{execute, BlockDevice, Buffers};
use std::path::PathBuf;

const BACKING_SECTORS: u64 = 4096;
const CACHE_BYTES: u64 = 8 << 20;

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcache-dax-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    dir
}

fn formatted_dax(path: &std::path::Path) -> DaxDevice {
    let mut dev = DaxDevice::open(path, Some(CACHE_BYTES), true).expect("map");
    let (_, writes) = format(
        CACHE_BYTES,
        identity(BACKING_SECTORS),
        &small_format(2, false),
    )
    .unwrap();
    for (s, b) in writes {
        dev.write(s, &b).unwrap();
    }
    dev
}

/// A cache formatted on a DAX mapping of `path`, opened by the synchronous host.
fn dax_host(path: &std::path::Path) -> SyncHost<DaxDevice, MemDevice> {
    SyncHost::open(
        formatted_dax(path),
        MemDevice::new(BACKING_SECTORS * 512),
        identity(BACKING_SECTORS),
        CacheOptions::default(),
    )
    .unwrap()
    .0
}

/// A copy within the mapping lands whole and durable, and one that overlaps itself or
/// runs past the end is refused without writing anything.
#[test]
fn copy_within_the_mapping_moves_exactly_the_sectors_asked() {
    let path = temp_path("copy");
    let mut dev = DaxDevice::open(&path, Some(1 << 20), true).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    dev.write(8, &data).unwrap();
    dev.persist_log = Some(Vec::new());
    dev.copy(8, 100, 16).unwrap();
    let mut back = vec![0u8; 8192];
    dev.read(100, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        dev.persist_log.take().unwrap(),
        vec![PersistEvent {
            sector: 100,
            sectors: 16
        }]
    );
    assert!(dev.copy(8, 16, 16).is_err(), "overlapping");
    assert!(dev.copy(8, 2048 - 8, 16).is_err(), "past the end");
    dev.read(16, &mut back).unwrap();
    assert_eq!(&back[..4096], &data[4096..], "untouched");
    drop(dev);
    let _ = std::fs::remove_file(path);
}

#[test]
fn an_ordinary_file_is_mapped_and_called_not_persistent_memory() {
    let path = temp_path("describe");
    let dev = DaxDevice::open(&path, Some(1 << 20), true).unwrap();
    if !dev.is_persistent_memory() {
        assert!(dev.describe().contains("NOT persistent memory"));
    }
    drop(dev);
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_write_persists_its_data_then_its_kset_then_is_acknowledged() {
    let path = temp_path("order");
    let mut dax = formatted_dax(&path);
    let (cache, _) = open_cache(&mut dax, identity(BACKING_SECTORS), CacheOptions::default());
    let mut cache = cache.unwrap();
    let mut backing = MemDevice::new(BACKING_SECTORS * 512);
    dax.persist_log = Some(Vec::new());
    let mut bufs = Buffers::new();
    bufs.insert(1, data_of(1, 40, 8));
    cache
        .submit(Request {
            id: 1,
            op: Op::Write,
            lba: 40,
            len: 8,
        })
        .unwrap();
    // Events: (what, persist index or ack)
    let mut acked_after = None;
    let mut kinds: Vec<(PersistEvent, bool)> = Vec::new();
    for _ in 0..10 {
        cache.poll();
        let mut done = Vec::new();
        for cmd in cache.take_commands() {
            let is_kset = matches!(&cmd, pcache::engine::Command::Write { buf: pcache::engine::Buf::Owned(v), .. }
                if v.len() >= 4 && u32::from_le_bytes([v[0], v[1], v[2], v[3]]) == KSET_MAGIC);
            let before = dax.persist_log.as_ref().map_or(0, Vec::len);
            if let Some(d) = execute(&cmd, &mut dax, &mut backing, &mut bufs) {
                done.push(d);
            }
            let log = dax.persist_log.as_ref().unwrap();
            for e in &log[before..] {
                kinds.push((*e, is_kset));
            }
        }
        for d in done {
            cache.complete(IoDone { ..d });
        }
        cache.poll();
        if !cache.take_completions().is_empty() && acked_after.is_none() {
            acked_after = Some(kinds.len());
        }
    }
    let data = kinds.iter().position(|(_, k)| !k).expect("data persisted");
    let kset = kinds.iter().position(|(_, k)| *k).expect("kset persisted");
    let ack = acked_after.expect("write acknowledged");
    assert!(data < kset, "data is persisted before the kset: {kinds:?}");
    assert!(
        kset < ack,
        "the kset is persisted before the acknowledgement: {kinds:?}"
    );
    assert_eq!(kinds[data].0.sectors, 8);
    drop(dax);
    let _ = std::fs::remove_file(path);
}

/// An in-place rewrite served directly (`Cache::begin_direct`), as the SPDK host does over
/// a mapped cache: its data goes out unfenced, is persisted by the batch's fence, and only
/// then is the request ended and acknowledged; it reads back.
#[test]
fn a_direct_in_place_write_is_persisted_by_the_fence_before_it_is_acknowledged() {
    let path = temp_path("direct");
    let mut host = dax_host(&path);
    host.write(40, data_of(1, 40, 8)).unwrap();
    let d = host
        .cache
        .begin_direct(Op::Write, 40, 8)
        .expect("a dirty extent of this epoch is rewritten in place");
    assert!(d.write);
    host.cache_dev.persist_log = Some(Vec::new());
    host.cache_dev
        .write_unfenced(d.sector, &data_of(2, 40, 8))
        .unwrap();
    host.cache_dev.fence();
    let log = host.cache_dev.persist_log.take().unwrap();
    assert_eq!(
        log,
        vec![PersistEvent {
            sector: d.sector,
            sectors: 8
        }],
        "the rewrite is persisted once, by the time the fence returns"
    );
    host.cache.end_direct(d, Ok(())).expect("acknowledged");
    assert_eq!(host.read(40, 8).unwrap(), data_of(2, 40, 8));
    assert_eq!(host.cache.stats().total.direct, 1);
    drop(host);
    let _ = std::fs::remove_file(path);
}

/// Random writes, reads, flushes, discards and reopens over the DAX host match a plain
/// block device.
#[test]
fn reads_match_a_plain_block_device_over_the_dax_host() {
    for seed in 0..8u64 {
        let path = temp_path(&format!("model{seed}"));
        let mut host = dax_host(&path);
        let mut model = vec![0u8; BACKING_SECTORS as usize * SECTOR];
        let mut rng = Rng::new(seed);
        for id in 1..300u64 {
            let len = 1 + rng.below(64) as u32;
            let lba = rng.below(BACKING_SECTORS - u64::from(len));
            let at = lba as usize * SECTOR;
            match rng.below(10) {
                0..=5 => {
                    let d = data_of(id, lba, len);
                    model[at..at + d.len()].copy_from_slice(&d);
                    host.write(lba, d).unwrap();
                }
                6 | 7 => {
                    let got = host.read(lba, len).unwrap();
                    assert!(
                        got == model[at..at + len as usize * SECTOR],
                        "seed {seed} read {lba}+{len}"
                    );
                }
                8 => {
                    host.unmap(lba, len).unwrap();
                    model[at..at + len as usize * SECTOR].fill(0);
                }
                _ => {
                    host.flush().unwrap();
                    // Unmap the file and map it again: a restart.
                    let (dax, backing) = host.into_devices();
                    drop(dax);
                    let dax = DaxDevice::open(&path, None, true).unwrap();
                    host = SyncHost::open(
                        dax,
                        backing,
                        identity(BACKING_SECTORS),
                        CacheOptions::default(),
                    )
                    .unwrap()
                    .0;
                }
            }
        }
        let all = host.read(0, BACKING_SECTORS as u32).unwrap();
        assert!(all == model, "seed {seed}: final image differs");
        drop(host);
        let _ = std::fs::remove_file(&path);
    }
}

/// Crash points between persist barriers: after every k-th write of a round of commands
/// the mapped file is copied as it stands; the copy must reopen with every write
/// acknowledged before it.
#[test]
fn acknowledged_writes_survive_crashes_between_persist_barriers() {
    let mut points = 0;
    for seed in 0..40u64 {
        let path = temp_path(&format!("crash{seed}"));
        let mut dax = formatted_dax(&path);
        let (cache, _) = open_cache(&mut dax, identity(BACKING_SECTORS), CacheOptions::default());
        let mut cache = cache.unwrap();
        let mut backing = MemDevice::new(BACKING_SECTORS * 512);
        let mut rng = Rng::new(seed);
        let mut bufs = Buffers::new();
        let mut acked: Vec<(u64, u32, u64)> = Vec::new();
        let mut pending: Vec<(u64, u32, u64)> = Vec::new();
        let crash_at = 1 + rng.below(60);
        let mut writes_done = 0;
        let mut image = None;
        let mut id = 0;
        while image.is_none() {
            for _ in 0..1 + rng.below(6) {
                id += 1;
                let len = 1 + rng.below(16) as u32;
                let lba = rng.below(BACKING_SECTORS - u64::from(len));
                bufs.insert(id, data_of(id, lba, len));
                cache
                    .submit(Request {
                        id,
                        op: Op::Write,
                        lba,
                        len,
                    })
                    .unwrap();
                pending.push((lba, len, id));
            }
            cache.poll();
            let mut done = Vec::new();
            for cmd in cache.take_commands() {
                if let Some(d) = execute(&cmd, &mut dax, &mut backing, &mut bufs) {
                    done.push(d);
                }
                writes_done += 1;
                if writes_done == crash_at {
                    let mut img = vec![0u8; CACHE_BYTES as usize];
                    dax.read(0, &mut img).unwrap();
                    image = Some((img, acked.clone()));
                    break;
                }
            }
            for d in done {
                cache.complete(d);
            }
            cache.poll();
            for (rid, r) in cache.take_completions() {
                r.unwrap();
                if let Some(i) = pending.iter().position(|p| p.2 == rid) {
                    acked.push(pending.remove(i));
                }
            }
        }
        let (img, acked) = image.unwrap();
        let mut host = SyncHost::open(
            MemDevice::from_vec(img),
            backing,
            identity(BACKING_SECTORS),
            CacheOptions::default(),
        )
        .unwrap_or_else(|e| panic!("seed {seed}: reopen: {e}"))
        .0;
        // Each acknowledged write's sectors hold that write or a later one.
        for &(lba, len, wid) in &acked {
            let got = host.read(lba, len).unwrap();
            for i in 0..u64::from(len) {
                let s = &got[i as usize * SECTOR..(i as usize + 1) * SECTOR];
                let v = decode_sector(s, lba + i)
                    .unwrap_or_else(|| panic!("seed {seed}: garbage at {}", lba + i));
                assert!(
                    v >= wid,
                    "seed {seed}: lba {} lost acknowledged write {wid} (holds {v})",
                    lba + i
                );
            }
        }
        points += 1;
        drop(dax);
        let _ = std::fs::remove_file(&path);
    }
    println!("DAX crash points checked: {points}");
}
