//! `pcache`: benchmark the engine on in-memory devices, and inspect or check cache images.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pcache::engine::index::{Extent, ExtentMap, State};
use pcache::engine::{BackingIdentity, CacheOptions, FormatOptions, LayoutOptions, Op};
use pcache::media::dax::{self, DaxDevice};
use pcache::media::file::FileDevice;
use pcache::media::host::SyncHost;
use pcache::media::mem::MemDevice;
use pcache::media::sim::Rng;
use pcache::media::slow::SlowDevice;
use pcache::media::BlockDevice;
use pcache::offline;

const USAGE: &str = "\
usage:
  pcache bench [--cache-mib N] [--backing-mib N] [--working-set-mib N] [--ops N] [--qd N]
               [--shards N] [--segment-mib N] [--data-crc] [--engine-only] [--seed N]
      Runs the engine on in-memory devices: 4 KiB random writes and read hits over a
      working set that fits, then fills the cache with distinct 4 KiB keys and times replay.
      --engine-only skips the data copies (measures the engine alone).
  pcache bench --sustained [--cache-mib N] [--working-set-mib N] [--ops N] [--qd N]
               [--backing-latency-us N]
      Working set larger than the cache over a slow backing device (a cost per command):
      sustained write IOPS and writeback throughput, each as a ratio to the backing device
      alone in the same run.
  pcache inspect <image>   Print superblock, shards, segments and dirty/clean usage.
  pcache check <image>     Verify every CRC and a full replay; exit 1 if anything is corrupt.
      <image> is a file, a block device, or a devdax device (/dev/daxX.Y, mapped).
  pcache index-mem [--extents N] [--random]
      Builds an index of N 4 KiB extents in a fresh process and prints its DRAM per extent.
  pcache format <image> --backing-mib N [--cache-mib N] [--shards N] [--data-crc]
      Format a file as a cache for a backing device of N MiB (for trying inspect/check).
  pcache core-latency [--rounds N]
      Round trip of a cache line between two spinning threads (on two CPUs when the
      machine has two idle), in ns: what every cross-core message pays (scripts/bench
      prints it beside the 2-core figures).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("inspect") => image_cmd(&args[1..], false),
        Some("check") => image_cmd(&args[1..], true),
        Some("format") => format_cmd(&args[1..]),
        Some("index-mem") => index_mem(&args[1..]),
        Some("engine-cost") => engine_cost(&args[1..]),
        Some("core-latency") => core_latency(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    res.unwrap_or_else(|e| {
        eprintln!("pcache: {e}");
        ExitCode::from(2)
    })
}

/// Flags of the form `--name value` or `--flag`.
struct Flags<'a>(&'a [String]);

impl Flags<'_> {
    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.0.iter().position(|a| a == name) {
            Some(i) => self
                .0
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number")),
            None => Ok(default),
        }
    }
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        for a in self.0.iter().filter(|a| a.starts_with("--")) {
            if !known.contains(&a.as_str()) {
                return Err(format!("unknown option {a}\n{USAGE}"));
            }
        }
        Ok(())
    }
}

fn image_cmd(args: &[String], check: bool) -> Result<ExitCode, String> {
    let path = args.first().ok_or("missing image path")?;
    let p = PathBuf::from(path);
    // A devdax device can only be mapped; files and block devices are read.
    let mut dev: Box<dyn BlockDevice> = if dax::is_char_device(&p) {
        Box::new(DaxDevice::open(&p, None, false).map_err(|e| e.to_string())?)
    } else {
        Box::new(FileDevice::open_read_only(&p).map_err(|e| format!("cannot open {path}: {e}"))?)
    };
    let dev = dev.as_mut();
    if check {
        let r = offline::check(dev);
        if r.is_clean() {
            println!(
                "{path}: clean: {} extents, {} data CRCs verified, every metadata CRC verified",
                r.extents, r.crc_checked
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!("{path}: {} problem(s):", r.problems.len());
        for p in &r.problems {
            println!("  - {p}");
        }
        return Ok(ExitCode::from(1));
    }
    print!("{}", offline::inspect(dev));
    Ok(ExitCode::SUCCESS)
}

fn format_cmd(args: &[String]) -> Result<ExitCode, String> {
    let f = Flags(args);
    f.check_known(&["--backing-mib", "--cache-mib", "--shards", "--data-crc"])?;
    let path = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .ok_or("missing image path")?;
    let backing_mib = f.num("--backing-mib", 0)?;
    if backing_mib == 0 {
        return Err("--backing-mib is required".into());
    }
    let cache_bytes = f.num("--cache-mib", 64)? << 20;
    let mut dev = FileDevice::open(&PathBuf::from(path), Some(cache_bytes), false)
        .map_err(|e| format!("cannot create {path}: {e}"))?;
    let backing = BackingIdentity {
        sectors: (backing_mib << 20) / 512,
        block_size: 512,
        uuid: [0; 16],
        name: "backing".into(),
    };
    let fopts = FormatOptions {
        layout: LayoutOptions {
            shards: f.num("--shards", 1)? as u32,
            ..LayoutOptions::default()
        },
        data_crc: f.has("--data-crc"),
        cache_uuid: new_uuid(),
        ..FormatOptions::default()
    };
    let (_, writes) =
        pcache::engine::format(cache_bytes, backing, &fopts).map_err(|e| e.to_string())?;
    for (sector, bytes) in writes {
        dev.write(sector, &bytes).map_err(|e| e.to_string())?;
    }
    dev.flush().map_err(|e| e.to_string())?;
    println!("formatted {path}: {} MiB cache", cache_bytes >> 20);
    Ok(ExitCode::SUCCESS)
}

/// A fresh cache UUID from the clock and process id (no randomness source needed).
fn new_uuid() -> [u8; 16] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut rng = Rng::new(t as u64 ^ (u64::from(std::process::id()) << 32));
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    u[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    u
}

/// A device that does no I/O: measures the engine without data copies.
struct NullDevice(u64, MemDevice);

impl BlockDevice for NullDevice {
    fn sectors(&self) -> u64 {
        self.0
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), pcache::engine::IoError> {
        // Metadata (replay) still needs real bytes: keep a small real head.
        if sector * 512 + (buf.len() as u64) <= self.1.sectors() * 512 {
            return self.1.read(sector, buf);
        }
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), pcache::engine::IoError> {
        if sector * 512 + (buf.len() as u64) <= self.1.sectors() * 512 {
            return self.1.write(sector, buf);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), pcache::engine::IoError> {
        Ok(())
    }
}

struct Progress {
    tty: bool,
    label: &'static str,
    total: u64,
    last: u64,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            label,
            total: total.max(1),
            last: u64::MAX,
        }
    }
    fn update(&mut self, done: u64) {
        let pct = done * 100 / self.total;
        if pct == self.last {
            return;
        }
        self.last = pct;
        let bar: String = (0..40)
            .map(|i| if i * 100 / 40 < pct { '#' } else { '.' })
            .collect();
        if self.tty {
            eprint!("\r{:<10} [{bar}] {pct:3}%", self.label);
        } else if pct % 25 == 0 {
            eprintln!("{:<10} [{bar}] {pct:3}%", self.label);
        }
        let _ = std::io::stderr().flush();
    }
    fn finish(&mut self) {
        self.update(self.total);
        if self.tty {
            eprintln!();
        }
    }
}

struct PhaseResult {
    ops: u64,
    elapsed: Duration,
    lat_ns: Vec<u64>,
}

impl PhaseResult {
    fn print(&mut self, name: &str, bytes_per_op: u64) {
        self.lat_ns.sort_unstable();
        let pick = |q: f64| {
            let i = ((self.lat_ns.len() as f64 - 1.0) * q).round() as usize;
            self.lat_ns.get(i).copied().unwrap_or_default() as f64 / 1000.0
        };
        let secs = self.elapsed.as_secs_f64();
        let iops = self.ops as f64 / secs;
        println!(
            "{name:<14} {:>12.0} IOPS {:>9.1} MiB/s   latency us: p50 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}",
            iops,
            iops * bytes_per_op as f64 / (1 << 20) as f64,
            pick(0.5),
            pick(0.99),
            pick(0.999)
        );
    }
}

/// Runs `ops` operations with `qd` in flight; `next` makes each request.
fn run_phase<C: BlockDevice, B: BlockDevice>(
    host: &mut SyncHost<C, B>,
    label: &'static str,
    ops: u64,
    qd: u64,
    mut next: impl FnMut(u64) -> (Op, u64, Option<Vec<u8>>),
) -> Result<PhaseResult, String> {
    let mut progress = Progress::new(label, ops);
    let mut lat_ns = Vec::with_capacity(ops as usize);
    let mut submitted_at = std::collections::HashMap::new();
    let start = Instant::now();
    let mut issued = 0;
    let mut failures = 0u64;
    while issued < ops || !submitted_at.is_empty() {
        while issued < ops && (submitted_at.len() as u64) < qd {
            let (op, lba, data) = next(issued);
            let id = host.submit(op, lba, 8, data).map_err(|e| e.to_string())?;
            submitted_at.insert(id, Instant::now());
            issued += 1;
        }
        host.run();
        let now = Instant::now();
        let before = submitted_at.len();
        host.reap(|id, res| {
            if let Some(t) = submitted_at.remove(&id) {
                lat_ns.push(now.duration_since(t).as_nanos() as u64);
            }
            if res.is_err() {
                failures += 1;
            }
        });
        if submitted_at.len() == before && issued >= ops {
            return Err(format!(
                "{label}: requests stopped completing (cache full?)"
            ));
        }
        progress.update(issued);
    }
    progress.finish();
    if failures > 0 {
        return Err(format!("{label}: {failures} requests failed"));
    }
    Ok(PhaseResult {
        ops,
        elapsed: start.elapsed(),
        lat_ns,
    })
}

/// Resident set size, from /proc.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn bench(args: &[String]) -> Result<ExitCode, String> {
    let f = Flags(args);
    f.check_known(&[
        "--cache-mib",
        "--backing-mib",
        "--working-set-mib",
        "--ops",
        "--qd",
        "--shards",
        "--segment-mib",
        "--data-crc",
        "--engine-only",
        "--seed",
        "--sustained",
        "--backing-latency-us",
    ])?;
    if f.has("--sustained") {
        return bench_sustained(&f);
    }
    let cache_mib = f.num("--cache-mib", 1024)?;
    let backing_mib = f.num("--backing-mib", 2048)?;
    let ws_mib = f.num("--working-set-mib", 256)?.min(backing_mib);
    let ops = f.num("--ops", 1_000_000)?;
    let qd = f.num("--qd", 32)?.max(1);
    let shards = f.num("--shards", 1)? as u32;
    let seg_mib = f.num("--segment-mib", 16)?;
    let engine_only = f.has("--engine-only");
    let data_crc = f.has("--data-crc");
    let mut rng = Rng::new(f.num("--seed", 1)?);
    if ws_mib * 10 > cache_mib * 8 {
        return Err("--working-set-mib must fit in 80% of the cache (no writeback yet)".into());
    }
    println!(
        "pcache bench: engine on in-memory devices{}; cache {cache_mib} MiB, backing {backing_mib} MiB, \
         working set {ws_mib} MiB, 4 KiB I/O, QD {qd}, {shards} shard(s), {seg_mib} MiB segments, data_crc {data_crc}",
        if engine_only { " (engine only: no data copies)" } else { "" }
    );
    let backing = BackingIdentity {
        sectors: (backing_mib << 20) / 512,
        block_size: 512,
        uuid: [1; 16],
        name: "mem-backing".into(),
    };
    let fopts = FormatOptions {
        layout: LayoutOptions {
            segment_bytes: seg_mib << 20,
            stripe_bytes: 1 << 20,
            shards,
        },
        data_crc,
        cache_uuid: new_uuid(),
        ..FormatOptions::default()
    };
    let cache_bytes = cache_mib << 20;
    if engine_only {
        let head = 64 << 20;
        let c = NullDevice(cache_bytes / 512, MemDevice::new(head.min(cache_bytes)));
        let b = NullDevice(backing.sectors, MemDevice::new(0));
        let host = SyncHost::format(c, b, backing.clone(), &fopts, CacheOptions::default())
            .map_err(|e| e.to_string())?;
        // Replay needs the real log: engine-only mode measures the I/O paths only.
        return bench_io(host, ops, qd, ws_mib, &mut rng, None).map(|_| ExitCode::SUCCESS);
    }
    let host = SyncHost::format(
        MemDevice::new(cache_bytes),
        MemDevice::new(backing_mib << 20),
        backing.clone(),
        &fopts,
        CacheOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let host = bench_io(host, ops, qd, ws_mib, &mut rng, Some(ws_mib))?;
    let Some(mut host) = host else {
        return Ok(ExitCode::SUCCESS);
    };

    // Fill the rest of the cache with distinct 4 KiB keys, then time a full replay.
    let free_segs = u64::from(host.cache.stats().segments_free);
    let seg_bytes = seg_mib << 20;
    let room = free_segs.saturating_sub(2 + 2 * u64::from(shards)) * seg_bytes;
    let fill_ops = (room / 4096).min(((backing_mib - ws_mib) << 20) / 4096);
    let base = (ws_mib << 20) / 512;
    let payload = vec![0xabu8; 4096];
    run_phase(&mut host, "fill", fill_ops, qd, |i| {
        (Op::Write, base + i * 8, Some(payload.clone()))
    })?;
    let st = host.cache.stats();
    let (c, b) = host.into_devices();
    let t = Instant::now();
    let (host, _) =
        SyncHost::open(c, b, backing, CacheOptions::default()).map_err(|e| e.to_string())?;
    let replay = t.elapsed();
    let st2 = host.cache.stats();
    println!(
        "replay         {:.3} s for {} MiB of log: {} extents ({:.0} extents/s)",
        replay.as_secs_f64(),
        u64::from(st.segments_total - st.segments_free) * seg_mib,
        st2.extents,
        st2.extents as f64 / replay.as_secs_f64()
    );
    drop(host);
    // Index DRAM, measured in a fresh process so nothing else moves its RSS.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for order in ["--sequential", "--random"] {
        let out = std::process::Command::new(&exe)
            .args(["index-mem", "--extents", &st2.extents.to_string(), order])
            .output()
            .map_err(|e| e.to_string())?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(ExitCode::SUCCESS)
}

/// Drives the engine alone through N 4 KiB write hits (in-place overwrites of cached
/// blocks) or read hits, completing every command at once with no data moved. Run under
/// `valgrind --tool=callgrind` at two values of N: the difference divided by the
/// difference in N is the engine's instructions per operation.
fn engine_cost(args: &[String]) -> Result<ExitCode, String> {
    use pcache::engine::{Cache, IoDone, Request};
    let f = Flags(args);
    f.check_known(&["--ops", "--reads", "--blocks"])?;
    let ops = f.num("--ops", 100_000)?;
    let blocks = f.num("--blocks", 4096)?;
    let reads = f.has("--reads");
    let backing = BackingIdentity {
        sectors: 1 << 21,
        block_size: 512,
        uuid: [3; 16],
        name: "cost".into(),
    };
    let fopts = FormatOptions {
        layout: LayoutOptions {
            segment_bytes: 4 << 20,
            stripe_bytes: 1 << 20,
            shards: 1,
        },
        ..FormatOptions::default()
    };
    let mut host = SyncHost::format(
        MemDevice::new(64 << 20),
        NullDevice(1 << 21, MemDevice::new(0)),
        backing,
        &fopts,
        CacheOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    for b in 0..blocks {
        host.write(b * 8, vec![0; 4096])
            .map_err(|e| e.to_string())?;
    }
    let (mut cache, _, _): (Cache, _, _) = host.into_parts();
    let mut cmds = Vec::new();
    let mut done = Vec::new();
    let mut rng = Rng::new(9);
    let op = if reads { Op::Read } else { Op::Write };
    for id in 0..ops {
        let lba = rng.below(blocks) * 8;
        cache
            .submit(Request {
                id: id + 1_000_000,
                op,
                lba,
                len: 8,
            })
            .map_err(|e| e.to_string())?;
        cache.poll();
        cache.drain_commands_into(&mut cmds);
        for c in cmds.drain(..) {
            if let Some(tag) = c.tag() {
                cache.complete(IoDone::ok(tag));
            }
        }
        cache.poll();
        cache.drain_completions_into(&mut done);
        if done.len() != 1 {
            return Err("a request did not complete".into());
        }
        done.clear();
    }
    println!("{ops} {} hits done", if reads { "read" } else { "write" });
    Ok(ExitCode::SUCCESS)
}

/// Ping-pongs a counter between this thread and a second one, both spinning, and prints
/// the median round trip of 5 runs in ns.
fn core_latency(args: &[String]) -> Result<ExitCode, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let f = Flags(args);
    f.check_known(&["--rounds"])?;
    let rounds = f.num("--rounds", 200_000)?.max(1);
    let mut runs = Vec::new();
    for _ in 0..5 {
        let flag = Arc::new(AtomicU64::new(0));
        let other = flag.clone();
        let peer = std::thread::spawn(move || {
            for i in 0..rounds {
                while other.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                other.store(2 * i + 2, Ordering::Release);
            }
        });
        let t = Instant::now();
        for i in 0..rounds {
            flag.store(2 * i + 1, Ordering::Release);
            while flag.load(Ordering::Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
        }
        runs.push(t.elapsed().as_nanos() as f64 / rounds as f64);
        peer.join().map_err(|_| "the peer thread panicked")?;
    }
    runs.sort_by(f64::total_cmp);
    println!("{:.0}", runs[runs.len() / 2]);
    Ok(ExitCode::SUCCESS)
}

/// Builds an index of N one-page extents and reports the RSS it took.
fn index_mem(args: &[String]) -> Result<ExitCode, String> {
    let f = Flags(args);
    f.check_known(&["--extents", "--random", "--sequential"])?;
    let n = f.num("--extents", 1_000_000)?;
    let random = f.has("--random");
    let mut lbas: Vec<u64> = (0..n).map(|i| i * 8).collect();
    if random {
        let mut rng = Rng::new(7);
        for i in (1..lbas.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            lbas.swap(i, j);
        }
    }
    let before = rss_bytes();
    let mut map = ExtentMap::new();
    for (i, &lba) in lbas.iter().enumerate() {
        map.insert(lba, Extent::new(i as u64 * 8, 8, State::Dirty, None, 1));
    }
    let after = rss_bytes();
    println!(
        "index DRAM     {:.1} bytes per cached extent ({} extents inserted in {} order)",
        after.saturating_sub(before) as f64 / n.max(1) as f64,
        map.len(),
        if random { "random" } else { "LBA" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Sustained writes over a working set larger than the cache, against the backing device
/// alone, on the same slow-device model.
fn bench_sustained(f: &Flags) -> Result<ExitCode, String> {
    let cache_mib = f.num("--cache-mib", 64)?;
    let ws_mib = f.num("--working-set-mib", 4 * cache_mib)?;
    let ops = f.num("--ops", 100_000)?;
    let qd = f.num("--qd", 32)?.max(1);
    let lat = Duration::from_micros(f.num("--backing-latency-us", 10)?);
    let bw = 2u64 << 30;
    let mut rng = Rng::new(f.num("--seed", 1)?);
    let blocks = (ws_mib << 20) / 4096;
    let backing_sectors = (ws_mib << 20) / 512;
    println!(
        "pcache bench --sustained: cache {cache_mib} MiB, working set {ws_mib} MiB, 4 KiB random writes, \
         QD {qd}; backing device: {} us + 2 GiB/s per command (in-memory, synchronous)",
        lat.as_micros()
    );
    let payload = vec![0x3cu8; 4096];
    // The backing device alone.
    let mut alone = SlowDevice::new(MemDevice::new(ws_mib << 20), lat, bw);
    let mut progress = Progress::new("backing", ops);
    let t = Instant::now();
    for i in 0..ops {
        alone
            .write(rng.below(blocks) * 8, &payload)
            .map_err(|e| e.to_string())?;
        progress.update(i);
    }
    progress.finish();
    let alone_secs = t.elapsed().as_secs_f64();
    let alone_iops = ops as f64 / alone_secs;
    let alone_bw = alone_iops * 4096.0;
    drop(alone);

    let backing = BackingIdentity {
        sectors: backing_sectors,
        block_size: 512,
        uuid: [2; 16],
        name: "slow-backing".into(),
    };
    let fopts = FormatOptions {
        layout: LayoutOptions {
            segment_bytes: 4 << 20,
            stripe_bytes: 1 << 20,
            shards: 1,
        },
        cache_uuid: new_uuid(),
        ..FormatOptions::default()
    };
    let mut host = SyncHost::format(
        MemDevice::new(cache_mib << 20),
        SlowDevice::new(MemDevice::new(ws_mib << 20), lat, bw),
        backing,
        &fopts,
        CacheOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    // Fill the cache first so the measured part is the steady state.
    let warm = (cache_mib << 20) / 4096;
    run_phase(&mut host, "warm", warm, qd, |_| {
        (Op::Write, rng.below(blocks) * 8, Some(payload.clone()))
    })?;
    let mut r = run_phase(&mut host, "sustained", ops, qd, |_| {
        (Op::Write, rng.below(blocks) * 8, Some(payload.clone()))
    })?;
    let cached_iops = r.ops as f64 / r.elapsed.as_secs_f64();
    r.print("sustained 4k", 4096);
    let dirty = host.cache.dirty_bytes();
    let busy0 = host.backing_dev.busy;
    let t = Instant::now();
    host.cache.set_drain(true);
    host.run();
    let drain = t.elapsed().as_secs_f64();
    let st = host.cache.stats();
    println!(
        "backing alone  {alone_iops:>12.0} IOPS {:>9.1} MiB/s",
        alone_bw / (1 << 20) as f64
    );
    println!(
        "ratio          sustained writes {:.2}x the backing device alone (goal >= 0.8)",
        cached_iops / alone_iops
    );
    let wb_bw = dirty as f64 / drain;
    println!(
        "writeback      drained {} MiB in {:.3} s = {:.1} MiB/s: {:.2}x the backing device's \
         4 KiB random-write bandwidth (goal >= 0.8); backing busy {:.0}% of the drain",
        dirty >> 20,
        drain,
        wb_bw / (1 << 20) as f64,
        wb_bw / alone_bw,
        100.0 * (host.backing_dev.busy - busy0).as_secs_f64() / drain
    );
    println!(
        "engine         {} segments reclaimed, {} writeback groups, {} backing flushes, {} stalls, clean {}",
        st.total.gc_segments,
        st.total.wb_groups,
        st.total.backing_flushes,
        st.total.cache_full_waits,
        host.cache.is_clean()
    );
    Ok(ExitCode::SUCCESS)
}

/// Random 4 KiB writes then read hits over the working set. Returns the host for more.
fn bench_io<C: BlockDevice, B: BlockDevice>(
    mut host: SyncHost<C, B>,
    ops: u64,
    qd: u64,
    ws_mib: u64,
    rng: &mut Rng,
    keep: Option<u64>,
) -> Result<Option<SyncHost<C, B>>, String> {
    let blocks = (ws_mib << 20) / 4096;
    let payload = vec![0x5au8; 4096];
    // Warm: write every block of the working set once so writes below are overwrites.
    run_phase(&mut host, "warm", blocks, qd, |i| {
        (Op::Write, i * 8, Some(payload.clone()))
    })?;
    let mut r = run_phase(&mut host, "randwrite", ops, qd, |_| {
        (Op::Write, rng.below(blocks) * 8, Some(payload.clone()))
    })?;
    r.print("randwrite 4k", 4096);
    let mut r = run_phase(&mut host, "randread", ops, qd, |_| {
        (Op::Read, rng.below(blocks) * 8, None)
    })?;
    r.print("randread 4k", 4096);
    let st = host.cache.stats();
    println!(
        "engine         {} ksets for {} keys, {} in-place overwrites, read hit {:.1}%",
        st.total.ksets_written,
        st.total.keys_written,
        st.total.in_place_writes,
        100.0 * st.total.read_hit_sectors as f64
            / (st.total.read_hit_sectors + st.total.read_miss_sectors).max(1) as f64
    );
    Ok(keep.map(|_| host))
}
