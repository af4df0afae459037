//! Fault injection: a failed device I/O fails only the requests that needed it; every
//! other request completes and reads back right, before and after reopen.

mod common;

use common::*;
use pcache::engine::format::{FORMAT_VERSION, KSET_MAGIC};
use pcache::engine::{Buf, CacheOptions, Command, Dev, Op, ReqError, ReqId};
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::Sim;
use std::collections::HashMap;

const BACKING_SECTORS: u64 = 2048;

fn sim_with(fault: impl FnMut(u64, &Command) -> bool + 'static) -> Sim {
    let host = new_host(8 << 20, BACKING_SECTORS, &small_format(1, false));
    let (cache, c, b) = host.into_parts();
    let mut sim = Sim::new(cache, c, b, 42);
    sim.set_fault(Box::new(fault));
    sim
}

fn run_all(sim: &mut Sim) -> HashMap<ReqId, (Result<(), ReqError>, Vec<u8>)> {
    sim.run();
    sim.take_done()
        .into_iter()
        .map(|(id, r, b)| (id, (r, b)))
        .collect()
}

fn reopen_sim(sim: Sim) -> MemHost {
    let (cache, backing) = {
        let mut s = sim;
        s.crash()
    };
    SyncHost::open(
        cache,
        backing,
        identity(BACKING_SECTORS),
        CacheOptions::default(),
    )
    .expect("reopen")
    .0
}

fn is_kset(cmd: &Command) -> bool {
    matches!(cmd, Command::Write { dev: Dev::Cache, buf: Buf::Owned(v), .. }
        if v.len() >= 4 && u32::from_le_bytes([v[0], v[1], v[2], v[3]]) == KSET_MAGIC)
}

#[test]
fn a_failed_data_write_fails_only_its_own_request() {
    // Request ids are handed out in order from 1: fail the data write of request 2.
    let mut sim = sim_with(|_, cmd| {
        matches!(
            cmd,
            Command::Write {
                dev: Dev::Cache,
                buf: Buf::Req { req: 2, .. },
                ..
            }
        )
    });
    let a = sim.submit(Op::Write, 0, 8, Some(data_of(1, 0, 8))).unwrap();
    let b = sim
        .submit(Op::Write, 100, 8, Some(data_of(2, 100, 8)))
        .unwrap();
    let c = sim
        .submit(Op::Write, 200, 8, Some(data_of(3, 200, 8)))
        .unwrap();
    assert_eq!(b, 2);
    let done = run_all(&mut sim);
    assert!(done[&a].0.is_ok());
    // Retried with backoff for the I/O timeout (simulated time), then given up.
    assert!(
        matches!(done[&b].0, Err(ReqError::Io | ReqError::TimedOut)),
        "{:?}",
        done[&b].0
    );
    assert!(sim.cache.stats().total.cache_write_retries > 5);
    assert!(done[&c].0.is_ok());
    let mut host = reopen_sim(sim);
    assert_eq!(host.read(0, 8).unwrap(), data_of(1, 0, 8));
    assert_eq!(
        host.read(100, 8).unwrap(),
        vec![0; 8 * 512],
        "failed write left no key"
    );
    assert_eq!(host.read(200, 8).unwrap(), data_of(3, 200, 8));
}

#[test]
fn a_failed_kset_write_is_retried_and_nothing_is_lost() {
    let mut failed = false;
    let mut sim = sim_with(move |_, cmd| {
        if !failed && is_kset(cmd) {
            failed = true;
            return true;
        }
        false
    });
    let ids: Vec<_> = (0..4)
        .map(|i| {
            sim.submit(Op::Write, i * 16, 8, Some(data_of(i + 1, i * 16, 8)))
                .unwrap()
        })
        .collect();
    let done = run_all(&mut sim);
    for id in &ids {
        assert!(done[id].0.is_ok());
    }
    assert_eq!(sim.cache.stats().total.kset_retries, 1);
    let mut host = reopen_sim(sim);
    for i in 0..4u64 {
        assert_eq!(host.read(i * 16, 8).unwrap(), data_of(i + 1, i * 16, 8));
    }
}

#[test]
fn a_kset_that_cannot_be_written_closes_the_log_but_keeps_acknowledged_data() {
    let mut sim = sim_with(|_, _| false);
    let first = sim.submit(Op::Write, 0, 8, Some(data_of(1, 0, 8))).unwrap();
    assert!(run_all(&mut sim)[&first].0.is_ok());
    sim.set_fault(Box::new(|_, cmd| is_kset(cmd)));
    let second = sim
        .submit(Op::Write, 50, 8, Some(data_of(2, 50, 8)))
        .unwrap();
    let done = run_all(&mut sim);
    // Retried for the I/O timeout: the request fails at its deadline, the log closes.
    assert!(
        matches!(
            done[&second].0,
            Err(ReqError::ShardFailed | ReqError::TimedOut)
        ),
        "{:?}",
        done[&second].0
    );
    assert!(sim.cache.stats().log_failed);
    // Reads still work, and later writes fail cleanly instead of hanging.
    let r = sim.submit(Op::Read, 0, 8, None).unwrap();
    let w = sim
        .submit(Op::Write, 60, 8, Some(data_of(3, 60, 8)))
        .unwrap();
    let done = run_all(&mut sim);
    assert_eq!(done[&r].1, data_of(1, 0, 8));
    assert_eq!(done[&w].0, Err(ReqError::ShardFailed));
    // After a reopen (the device healed), the log works again and nothing acked is lost.
    let mut host = reopen_sim(sim);
    assert_eq!(host.read(0, 8).unwrap(), data_of(1, 0, 8));
    host.write(70, data_of(4, 70, 8)).unwrap();
    assert_eq!(host.read(70, 8).unwrap(), data_of(4, 70, 8));
}

#[test]
fn a_data_write_that_fails_a_few_times_is_retried_and_lands() {
    let mut left = 3;
    let mut sim = sim_with(move |_, cmd| {
        let hit = left > 0
            && matches!(
                cmd,
                Command::Write {
                    dev: Dev::Cache,
                    buf: Buf::Req { req: 1, .. },
                    ..
                }
            );
        left -= u32::from(hit);
        hit
    });
    let a = sim.submit(Op::Write, 0, 8, Some(data_of(1, 0, 8))).unwrap();
    let done = run_all(&mut sim);
    assert_eq!(done[&a].0, Ok(()));
    let st = sim.cache.stats().total;
    assert_eq!((st.cache_write_errors, st.cache_write_retries), (3, 3));
    assert!(sim.now >= 10 + 20, "retried after backoff: {} ms", sim.now);
    let mut host = reopen_sim(sim);
    assert_eq!(host.read(0, 8).unwrap(), data_of(1, 0, 8));
}

#[test]
fn a_failed_backing_read_fails_only_the_read_that_needed_it() {
    let mut sim = sim_with(|_, cmd| {
        matches!(
            cmd,
            Command::Read {
                dev: Dev::Backing,
                buf: Buf::Req { req: 2, .. },
                ..
            }
        )
    });
    let w = sim.submit(Op::Write, 0, 8, Some(data_of(1, 0, 8))).unwrap();
    assert!(run_all(&mut sim)[&w].0.is_ok());
    let miss = sim.submit(Op::Read, 500, 8, None).unwrap();
    let hit = sim.submit(Op::Read, 0, 8, None).unwrap();
    let done = run_all(&mut sim);
    assert_eq!(done[&miss].0, Err(ReqError::Io));
    assert_eq!(done[&hit].1, data_of(1, 0, 8));
    // The failed fill left no placeholder behind: the range reads (and fills) normally.
    let again = sim.submit(Op::Read, 500, 8, None).unwrap();
    assert_eq!(run_all(&mut sim)[&again].0, Ok(()));
}

#[test]
fn a_failed_cache_read_fails_the_read_and_nothing_else() {
    let mut sim = sim_with(|_, cmd| {
        matches!(
            cmd,
            Command::Read {
                dev: Dev::Cache,
                buf: Buf::Req { req: 3, .. },
                ..
            }
        )
    });
    let w1 = sim.submit(Op::Write, 0, 8, Some(data_of(1, 0, 8))).unwrap();
    let w2 = sim
        .submit(Op::Write, 40, 8, Some(data_of(2, 40, 8)))
        .unwrap();
    let done = run_all(&mut sim);
    assert!(done[&w1].0.is_ok() && done[&w2].0.is_ok());
    let bad = sim.submit(Op::Read, 0, 8, None).unwrap();
    let good = sim.submit(Op::Read, 40, 8, None).unwrap();
    let done = run_all(&mut sim);
    assert_eq!(done[&bad].0, Err(ReqError::Io));
    assert_eq!(done[&good].1, data_of(2, 40, 8));
}

#[test]
fn a_failed_cache_read_of_clean_data_is_served_from_the_backing_device() {
    // Request 1 writes 100, writeback makes it clean; request 2 reads it, and its cache
    // read fails.
    let mut sim = sim_with(|_, cmd| {
        matches!(
            cmd,
            Command::Read {
                dev: Dev::Cache,
                buf: Buf::Req { req: 2, .. },
                ..
            }
        )
    });
    sim.direct_percent = 0;
    let w = sim
        .submit(Op::Write, 100, 8, Some(data_of(1, 100, 8)))
        .unwrap();
    assert!(run_all(&mut sim)[&w].0.is_ok());
    sim.cache.set_drain(true);
    sim.run();
    sim.settle(1_000);
    assert!(sim.cache.is_clean());
    let r = sim.submit(Op::Read, 100, 8, None).unwrap();
    assert_eq!(r, 2);
    let done = run_all(&mut sim);
    assert_eq!(done[&r].0, Ok(()));
    assert_eq!(done[&r].1, data_of(1, 100, 8));
    assert_eq!(sim.cache.stats().total.cache_read_fallbacks, 1);
}

#[test]
fn corrupt_cached_data_is_an_error_when_dirty_and_refetched_when_clean() {
    let mut host = new_host(8 << 20, BACKING_SECTORS, &small_format(1, true));
    host.write(0, data_of(1, 0, 8)).unwrap();
    // Fill a clean extent from the backing device (zeros) at 100.
    assert_eq!(host.read(100, 8).unwrap(), vec![0; 4096]);
    let pos_of = |host: &MemHost, lba: u64| host.cache.shards()[0].index().get(lba).unwrap().pos;
    let dirty_pos = pos_of(&host, 0);
    let clean_pos = pos_of(&host, 100);
    host.cache_dev.bytes_mut()[dirty_pos as usize * 512 + 7] ^= 1;
    host.cache_dev.bytes_mut()[clean_pos as usize * 512 + 9] ^= 1;
    assert_eq!(
        host.read(0, 8),
        Err(ReqError::Corrupt),
        "dirty data never reads back wrong"
    );
    let clean = host.read(100, 8).unwrap();
    assert!(
        clean.iter().all(|&b| b == 0),
        "clean data comes from the backing"
    );
    assert!(host.cache.shards()[0]
        .index()
        .get(100)
        .is_none_or(|e| e.pos != clean_pos));
    assert_eq!(host.cache.stats().total.crc_errors, 2);
    assert!(host.take_log().iter().any(|l| l.contains("CRC mismatch")));
}

#[test]
fn a_cache_of_another_backing_device_is_refused() {
    let host = new_host(8 << 20, BACKING_SECTORS, &small_format(1, false));
    let (c, b) = host.into_devices();
    let mut other = identity(BACKING_SECTORS);
    other.uuid = [9; 16];
    let err = SyncHost::open(c, b, other, CacheOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("another backing device"), "{err}");
}

#[test]
fn an_unknown_format_version_is_refused() {
    let host = new_host(8 << 20, BACKING_SECTORS, &small_format(1, false));
    let (mut c, b) = host.into_devices();
    for base in [0usize, 4096] {
        let sb = &mut c.bytes_mut()[base..base + 4096];
        sb[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&sb[..4092]);
        sb[4092..].copy_from_slice(&crc.to_le_bytes());
    }
    let err = SyncHost::open(c, b, identity(BACKING_SECTORS), CacheOptions::default())
        .err()
        .unwrap();
    let want = format!("format version {}", FORMAT_VERSION + 1);
    assert!(err.to_string().contains(&want), "{err}");
    assert!(err.to_string().contains("reads versions 1 to"), "{err}");
}

#[test]
fn the_cache_survives_losing_one_superblock_replica() {
    let mut host = new_host(8 << 20, BACKING_SECTORS, &small_format(1, false));
    host.write(0, data_of(1, 0, 8)).unwrap();
    let (mut c, b) = host.into_devices();
    c.bytes_mut()[100] ^= 0x40;
    let (mut host, report) =
        SyncHost::open(c, b, identity(BACKING_SECTORS), CacheOptions::default()).unwrap();
    assert!(report.problems.iter().any(|p| p.contains("replica A")));
    assert_eq!(host.read(0, 8).unwrap(), data_of(1, 0, 8));
    let _ = MemDevice::new(0);
}

/// A backing device of the recorded size under another UUID (an aio bdev re-created
/// without its UUID after a restart) is refused by default, with what the cache holds; the
/// opener reads only. Accepted, it opens with the data and the new identity is recorded in
/// both superblock replicas: a plain open with it then works, and the old identity is the
/// refused one.
#[test]
fn a_backing_device_under_a_new_uuid_is_refused_then_accepted_and_recorded() {
    use pcache::engine::format::{uuid_string, Superblock, SB_BYTES};
    use pcache::engine::{OpenError, UuidMismatch};
    use pcache::media::host::HostError;
    let mut host = new_host(8 << 20, BACKING_SECTORS, &small_format(2, false));
    for i in 0..4u64 {
        host.write(i * 64, data_of(i + 1, i * 64, 16)).unwrap();
    }
    let dirty = host.cache.dirty_bytes();
    assert_eq!(dirty, 4 * 16 * 512);
    let (c, b) = host.into_devices();
    let old = identity(BACKING_SECTORS);
    let mut new = old.clone();
    new.uuid = [9; 16];
    new.block_size = 4096;

    // Refused: the error names both identities and the dirty bytes; nothing is written.
    let mut probe = c.clone();
    let (res, _) =
        pcache::media::host::open_cache(&mut probe, new.clone(), CacheOptions::default());
    assert!(res.is_err());
    assert!(probe.bytes() == c.bytes(), "a refused open writes nothing");
    let err = SyncHost::open(c.clone(), b.clone(), new.clone(), CacheOptions::default())
        .err()
        .unwrap();
    match &err {
        HostError::Open(OpenError::BackingIdentity {
            recorded,
            found,
            dirty_bytes,
        }) => {
            assert_eq!(**recorded, old);
            assert_eq!(**found, new);
            assert_eq!(*dirty_bytes, Some(dirty));
        }
        e => panic!("want BackingIdentity, got {e}"),
    }
    let msg = err.to_string();
    for want in [
        "another backing device, or to this one under a new identity",
        &uuid_string(&old.uuid),
        &uuid_string(&new.uuid),
        &format!("holds {dirty} bytes of acknowledged writes not yet written back"),
    ] {
        assert!(msg.contains(want), "missing {want:?}: {msg}");
    }
    assert!(!msg.to_lowercase().contains("wipe"), "{msg}");

    // Accepted: opens with the data and records the new identity in both replicas.
    let accept = CacheOptions {
        backing_uuid_mismatch: UuidMismatch::Accept,
        ..CacheOptions::default()
    };
    let (mut host, report) = SyncHost::open(c, b, new.clone(), accept).unwrap();
    assert_eq!(report.backing_rebound.as_ref(), Some(&old));
    assert_eq!(host.cache.superblock().backing, new);
    assert_eq!(host.cache.dirty_bytes(), dirty);
    for i in 0..4u64 {
        assert_eq!(host.read(i * 64, 16).unwrap(), data_of(i + 1, i * 64, 16));
    }
    host.write(1000, data_of(9, 1000, 8)).unwrap();
    let (mut c, b) = host.into_devices();
    for base in [0usize, 8 * 512] {
        let sb = Superblock::decode(&c.bytes_mut()[base..base + SB_BYTES]).unwrap();
        assert_eq!(sb.backing, new, "replica at byte {base}");
    }

    // Reopened plainly with the new identity: everything is there.
    let (mut host, report) =
        SyncHost::open(c, b, new.clone(), CacheOptions::default()).expect("recorded");
    assert!(report.backing_rebound.is_none());
    for i in 0..4u64 {
        assert_eq!(host.read(i * 64, 16).unwrap(), data_of(i + 1, i * 64, 16));
    }
    assert_eq!(host.read(1000, 8).unwrap(), data_of(9, 1000, 8));
    // The old identity is now the other one.
    let (c, b) = host.into_devices();
    let err = SyncHost::open(c.clone(), b.clone(), old.clone(), CacheOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, HostError::Open(OpenError::BackingIdentity { .. })),
        "{err}"
    );
    // A different size is refused even when accepting.
    let mut bigger = new.clone();
    bigger.sectors *= 2;
    let accept = CacheOptions {
        backing_uuid_mismatch: UuidMismatch::Accept,
        ..CacheOptions::default()
    };
    let err = SyncHost::open(c, b, bigger, accept).err().unwrap();
    assert!(
        matches!(err, HostError::Open(OpenError::BackingMismatch { .. })),
        "{err}"
    );
}

/// The rule: size first, then the UUID the superblock records (a device without one does
/// not match it), else the name.
#[test]
fn backing_identity_rule() {
    use pcache::engine::{compare_backing, BackingMatch};
    let rec = identity(BACKING_SECTORS);
    let mut f = rec.clone();
    assert_eq!(compare_backing(&rec, &f), BackingMatch::Same);
    f.name = "renamed".into();
    assert_eq!(compare_backing(&rec, &f), BackingMatch::Same, "same UUID");
    f.uuid = [0; 16];
    assert_eq!(compare_backing(&rec, &f), BackingMatch::Identity, "no UUID");
    f.uuid = [1; 16];
    assert_eq!(compare_backing(&rec, &f), BackingMatch::Identity);
    f.sectors += 8;
    assert_eq!(compare_backing(&rec, &f), BackingMatch::Size);
    let mut no_uuid = rec.clone();
    no_uuid.uuid = [0; 16];
    let mut f = rec.clone();
    assert_eq!(compare_backing(&no_uuid, &f), BackingMatch::Same, "by name");
    f.name = "other".into();
    assert_eq!(compare_backing(&no_uuid, &f), BackingMatch::Identity);
}
