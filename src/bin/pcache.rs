//! `pcache`: benchmark the engine on in-memory devices, and format, inspect or check cache
//! images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

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

/// Persistent-memory write-back cache: engine benchmark and offline cache-image tools.
///
/// The SPDK module itself is `libpcache.so` (cargo build --release --features spdk --lib),
/// preloaded into spdk_tgt or bdevperf; see the README.
#[derive(Parser)]
#[command(name = "pcache", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmark the engine on in-memory devices (no SPDK needed).
    ///
    /// Default: 4 KiB random writes and read hits over a working set that fits in the cache,
    /// then the rest of the cache is filled with distinct 4 KiB keys and a full replay is
    /// timed; last, the index's DRAM per cached extent is measured in a fresh process.
    ///
    /// --sustained: a working set larger than the cache over a slow backing device (a cost per
    /// command plus bandwidth); sustained write IOPS and writeback throughput, each as a ratio
    /// to the backing device alone in the same run.
    Bench(BenchArgs),
    /// Print the superblock, shards, segments and dirty/clean usage of a cache image.
    Inspect(ImageArgs),
    /// Verify every metadata and data CRC and a full replay; exit 1 if anything is corrupt.
    Check(ImageArgs),
    /// Format a file as a cache (to try inspect and check on).
    Format(FormatArgs),
    /// Build an index of N 4 KiB extents in a fresh process and print its DRAM per extent.
    IndexMem(IndexMemArgs),
    /// Drive the engine alone through N 4 KiB write (or read) hits, no data moved.
    ///
    /// Run under `valgrind --tool=callgrind` at two values of --ops: the difference in
    /// instructions divided by the difference in --ops is the engine's cost per operation.
    EngineCost(EngineCostArgs),
    /// Round trip of a cache line between two spinning threads, in ns.
    ///
    /// On two CPUs when the machine has two idle: what every cross-core message pays
    /// (scripts/bench prints it beside the 2-core figures). Prints the median of 5 runs.
    CoreLatency(CoreLatencyArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Cache device size in MiB [default: 1024, or 64 with --sustained]
    #[arg(long, value_name = "N")]
    cache_mib: Option<u64>,
    /// Backing device size in MiB
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2048,
        conflicts_with = "sustained"
    )]
    backing_mib: u64,
    /// Working set in MiB [default: 256 (at most the backing size), or 4x the cache with
    /// --sustained]
    #[arg(long, value_name = "N")]
    working_set_mib: Option<u64>,
    /// Requests per measured phase [default: 1000000, or 100000 with --sustained]
    #[arg(long, value_name = "N", value_parser = positive::<u64>)]
    ops: Option<u64>,
    /// Requests in flight
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = positive::<u64>)]
    qd: u64,
    /// Shards the cache is formatted with
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "sustained",
          value_parser = positive::<u32>)]
    shards: u32,
    /// Segment size in MiB
    #[arg(long, value_name = "N", default_value_t = 16, conflicts_with = "sustained",
          value_parser = positive::<u64>)]
    segment_mib: u64,
    /// Keep a CRC of every data block
    #[arg(long, conflicts_with = "sustained")]
    data_crc: bool,
    /// Skip the data copies (measures the engine alone; no replay or index phases)
    #[arg(long, conflicts_with = "sustained")]
    engine_only: bool,
    /// Seed of the random offsets
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Working set larger than the cache, over a slow backing device
    #[arg(long)]
    sustained: bool,
    /// With --sustained: the backing device's fixed cost per command, in microseconds
    /// [default: 10]
    #[arg(long, value_name = "N", requires = "sustained")]
    backing_latency_us: Option<u64>,
    /// Print the results as one JSON object on stdout (and nothing else there)
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImageArgs {
    /// A file, a block device, or a devdax device (/dev/daxX.Y, mapped)
    image: PathBuf,
}

#[derive(Args)]
struct FormatArgs {
    /// File to create or overwrite
    image: PathBuf,
    /// Size of the backing device the cache is for, in MiB
    #[arg(long, value_name = "N", value_parser = positive::<u64>)]
    backing_mib: u64,
    /// Cache size in MiB
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = positive::<u64>)]
    cache_mib: u64,
    /// Shards
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive::<u32>)]
    shards: u32,
    /// Keep a CRC of every data block
    #[arg(long)]
    data_crc: bool,
    /// Block size of the device the cache will be on (512 to 4096, a power of two):
    /// metadata is written in whole blocks, and requests must be whole blocks
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    block_size: u32,
}

#[derive(Args)]
struct IndexMemArgs {
    /// Extents to insert
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    extents: u64,
    /// Insert in random LBA order
    #[arg(long, conflicts_with = "sequential")]
    random: bool,
    /// Insert in LBA order (the default)
    #[arg(long)]
    sequential: bool,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EngineCostArgs {
    /// Operations
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    ops: u64,
    /// Read hits instead of write hits
    #[arg(long)]
    reads: bool,
    /// Distinct 4 KiB blocks written first and then hit
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = positive::<u64>)]
    blocks: u64,
}

#[derive(Args)]
struct CoreLatencyArgs {
    /// Round trips per run
    #[arg(long, value_name = "N", default_value_t = 200_000, value_parser = positive::<u64>)]
    rounds: u64,
}

fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_usage(e));
    let res = match cli.cmd {
        Cmd::Bench(a) => bench(&a),
        Cmd::Inspect(a) => image_cmd(&a.image, false),
        Cmd::Check(a) => image_cmd(&a.image, true),
        Cmd::Format(a) => format_cmd(&a),
        Cmd::IndexMem(a) => index_mem(&a),
        Cmd::EngineCost(a) => engine_cost(&a),
        Cmd::CoreLatency(a) => core_latency(&a),
    };
    res.unwrap_or_else(|e| {
        eprintln!("pcache: {e}");
        ExitCode::from(2)
    })
}

/// Prints a parse error and exits (0 for --help and --version, else 2). clap leaves the
/// usage line out of some errors (a bad value): it is added, for the subcommand in use.
fn exit_usage(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit()
    }
    let msg = e.render().to_string();
    if msg.contains("Usage:") {
        e.exit()
    }
    let mut root = Cli::command();
    let sub = std::env::args_os()
        .skip(1)
        .filter_map(|a| a.into_string().ok())
        .find(|a| !a.starts_with('-'))
        .and_then(|name| root.find_subcommand(&name).map(|c| (name, c.clone())));
    let usage = match sub {
        Some((name, c)) => c.bin_name(format!("pcache {name}")).render_usage(),
        None => root.render_usage(),
    };
    let (head, tail) = msg
        .split_once("\nFor more information")
        .map_or((msg.as_str(), ""), |(h, _)| {
            (h, "\nFor more information, try '--help'.\n")
        });
    eprint!("{}\n\n{usage}\n{tail}", head.trim_end());
    std::process::exit(2)
}

/// A whole number of at least 1 (clap's own range check prints u64::MAX as the bound).
fn positive<T: std::str::FromStr + Default + PartialEq>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let v: T = s.trim().parse().map_err(|e| format!("{e}"))?;
    if v == T::default() {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// A usage error found after parsing (a relation between options): clap's format, exit 2.
fn usage_error(sub: &str, msg: &str) -> ! {
    let mut cmd = Cli::command();
    let cmd = cmd
        .find_subcommand_mut(sub)
        .map(|c| c.clone().bin_name(format!("pcache {sub}")));
    match cmd {
        Some(mut c) => c
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit(),
        None => Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit(),
    }
}

fn image_cmd(p: &Path, check: bool) -> Result<ExitCode, String> {
    let path = p.display();
    // A devdax device can only be mapped; files and block devices are read.
    let mut dev: Box<dyn BlockDevice> = if dax::is_char_device(p) {
        Box::new(DaxDevice::open(p, None, false).map_err(|e| format!("cannot map {path}: {e}"))?)
    } else {
        Box::new(FileDevice::open_read_only(p).map_err(|e| format!("cannot open {path}: {e}"))?)
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

fn format_cmd(a: &FormatArgs) -> Result<ExitCode, String> {
    let path = a.image.display();
    let cache_bytes = a.cache_mib << 20;
    let mut dev = FileDevice::open(&a.image, Some(cache_bytes), false)
        .map_err(|e| format!("cannot create {path}: {e}"))?;
    let backing = BackingIdentity {
        sectors: (a.backing_mib << 20) / 512,
        block_size: 512,
        uuid: [0; 16],
        name: "backing".into(),
    };
    let fopts = FormatOptions {
        layout: LayoutOptions {
            shards: a.shards,
            block_bytes: a.block_size,
            ..LayoutOptions::default()
        },
        data_crc: a.data_crc,
        cache_uuid: new_uuid(),
        ..FormatOptions::default()
    };
    let (_, writes) =
        pcache::engine::format(cache_bytes, backing, &fopts).map_err(|e| e.to_string())?;
    for (sector, bytes) in writes {
        dev.write(sector, &bytes).map_err(|e| e.to_string())?;
    }
    dev.flush().map_err(|e| e.to_string())?;
    println!("formatted {path}: {} MiB cache", a.cache_mib);
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

/// A progress bar on stderr for a phase of `total` steps (drawn only when stderr is a
/// terminal). Callers update it every `PROGRESS_STEP` steps to keep it off the hot path.
fn progress(label: &'static str, total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{prefix:<10} [{bar:40}] {percent:>3}% {human_pos}/{human_len} ({eta} left)",
    )
    .map(|s| s.progress_chars("#>."))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(label);
    pb
}

const PROGRESS_STEP: u64 = 4096;

/// What `bench --json` prints: one object; the parts a mode does not run are left out.
#[derive(Serialize, Default)]
struct BenchReport {
    /// "io", "engine-only" or "sustained".
    mode: &'static str,
    config: BenchConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    randwrite: Option<PhaseStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    randread: Option<PhaseStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sustained: Option<PhaseStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_alone: Option<Throughput>,
    /// Sustained write IOPS over the backing device's alone (goal >= 0.8).
    #[serde(skip_serializing_if = "Option::is_none")]
    sustained_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    writeback: Option<WritebackStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay: Option<ReplayStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index_dram: Option<IndexDram>,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<EngineStats>,
}

#[derive(Serialize, Default)]
struct BenchConfig {
    cache_mib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_mib: Option<u64>,
    working_set_mib: u64,
    ops: u64,
    qd: u64,
    io_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segment_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_crc: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_latency_us: Option<u64>,
    seed: u64,
}

#[derive(Serialize)]
struct PhaseStats {
    ops: u64,
    secs: f64,
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

#[derive(Serialize)]
struct Throughput {
    iops: f64,
    mib_s: f64,
}

#[derive(Serialize)]
struct WritebackStats {
    drained_mib: u64,
    secs: f64,
    mib_s: f64,
    /// Writeback bandwidth over the backing device's 4 KiB random-write bandwidth.
    ratio: f64,
    backing_busy_pct: f64,
}

#[derive(Serialize)]
struct ReplayStats {
    secs: f64,
    log_mib: u64,
    extents: u64,
    extents_per_sec: f64,
}

#[derive(Serialize)]
struct IndexDram {
    sequential_bytes_per_extent: Option<f64>,
    random_bytes_per_extent: Option<f64>,
}

#[derive(Serialize, Default)]
struct EngineStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    ksets_written: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys_written: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_place_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_hit_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gc_segments: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wb_groups: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_flushes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stalls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clean: Option<bool>,
}

/// The results of a bench run, printed as they come (text) or at the end (`--json`).
struct Out {
    json: bool,
    report: BenchReport,
}

impl Out {
    /// A line of the human-readable output (nothing with `--json`).
    fn line(&self, s: std::fmt::Arguments) {
        if !self.json {
            println!("{s}");
        }
    }
    fn finish(self) -> Result<ExitCode, String> {
        if self.json {
            let s = serde_json::to_string_pretty(&self.report).map_err(|e| e.to_string())?;
            println!("{s}");
        }
        Ok(ExitCode::SUCCESS)
    }
}

struct PhaseResult {
    ops: u64,
    elapsed: Duration,
    lat_ns: Vec<u64>,
}

impl PhaseResult {
    /// Prints the phase's line and returns its figures.
    fn report(mut self, out: &Out, name: &str, bytes_per_op: u64) -> PhaseStats {
        self.lat_ns.sort_unstable();
        let pick = |q: f64| {
            let i = ((self.lat_ns.len() as f64 - 1.0) * q).round() as usize;
            self.lat_ns.get(i).copied().unwrap_or_default() as f64 / 1000.0
        };
        let secs = self.elapsed.as_secs_f64();
        let iops = self.ops as f64 / secs;
        let s = PhaseStats {
            ops: self.ops,
            secs,
            iops,
            mib_s: iops * bytes_per_op as f64 / (1 << 20) as f64,
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            p999_us: pick(0.999),
        };
        out.line(format_args!(
            "{name:<14} {:>12.0} IOPS {:>9.1} MiB/s   latency us: p50 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}",
            s.iops, s.mib_s, s.p50_us, s.p99_us, s.p999_us
        ));
        s
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
    let pb = progress(label, ops);
    let mut lat_ns = Vec::with_capacity(ops as usize);
    let mut submitted_at = std::collections::HashMap::new();
    let start = Instant::now();
    let mut issued = 0;
    let mut shown = 0;
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
            pb.abandon();
            return Err(format!(
                "{label}: requests stopped completing (cache full?)"
            ));
        }
        if issued - shown >= PROGRESS_STEP {
            pb.set_position(issued);
            shown = issued;
        }
    }
    pb.finish_and_clear();
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

fn bench(a: &BenchArgs) -> Result<ExitCode, String> {
    if a.sustained {
        return bench_sustained(a);
    }
    let cache_mib = a.cache_mib.unwrap_or(1024);
    let backing_mib = a.backing_mib;
    let ws_mib = a.working_set_mib.unwrap_or(256).min(backing_mib);
    let ops = a.ops.unwrap_or(1_000_000);
    let (qd, shards, seg_mib) = (a.qd, a.shards, a.segment_mib);
    let (engine_only, data_crc) = (a.engine_only, a.data_crc);
    let mut rng = Rng::new(a.seed);
    if ws_mib * 10 > cache_mib * 8 {
        usage_error(
            "bench",
            "--working-set-mib must fit in 80% of --cache-mib (use --sustained for a larger working set)",
        );
    }
    let mut out = Out {
        json: a.json,
        report: BenchReport {
            mode: if engine_only { "engine-only" } else { "io" },
            config: BenchConfig {
                cache_mib,
                backing_mib: Some(backing_mib),
                working_set_mib: ws_mib,
                ops,
                qd,
                io_bytes: 4096,
                shards: Some(shards),
                segment_mib: Some(seg_mib),
                data_crc: Some(data_crc),
                backing_latency_us: None,
                seed: a.seed,
            },
            ..BenchReport::default()
        },
    };
    out.line(format_args!(
        "pcache bench: engine on in-memory devices{}; cache {cache_mib} MiB, backing {backing_mib} MiB, \
         working set {ws_mib} MiB, 4 KiB I/O, QD {qd}, {shards} shard(s), {seg_mib} MiB segments, data_crc {data_crc}",
        if engine_only { " (engine only: no data copies)" } else { "" }
    ));
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
            ..LayoutOptions::default()
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
        bench_io(host, ops, qd, ws_mib, &mut rng, &mut out)?;
        return out.finish();
    }
    let host = SyncHost::format(
        MemDevice::new(cache_bytes),
        MemDevice::new(backing_mib << 20),
        backing.clone(),
        &fopts,
        CacheOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut host = bench_io(host, ops, qd, ws_mib, &mut rng, &mut out)?;

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
    let r = ReplayStats {
        secs: replay.as_secs_f64(),
        log_mib: u64::from(st.segments_total - st.segments_free) * seg_mib,
        extents: st2.extents,
        extents_per_sec: st2.extents as f64 / replay.as_secs_f64(),
    };
    out.line(format_args!(
        "replay         {:.3} s for {} MiB of log: {} extents ({:.0} extents/s)",
        r.secs, r.log_mib, r.extents, r.extents_per_sec
    ));
    out.report.replay = Some(r);
    drop(host);
    // Index DRAM, measured in a fresh process so nothing else moves its RSS.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dram = IndexDram {
        sequential_bytes_per_extent: None,
        random_bytes_per_extent: None,
    };
    for order in ["--sequential", "--random"] {
        let res = std::process::Command::new(&exe)
            .args([
                "index-mem",
                "--json",
                "--extents",
                &st2.extents.to_string(),
                order,
            ])
            .output()
            .map_err(|e| format!("cannot run {} index-mem: {e}", exe.display()))?;
        let v: Option<IndexMemResult> = serde_json::from_slice(&res.stdout).ok();
        let Some(v) = v.filter(|_| res.status.success()) else {
            eprintln!(
                "pcache: index-mem {order} failed: {}",
                String::from_utf8_lossy(&res.stderr).trim()
            );
            continue;
        };
        out.line(format_args!("{}", v.line()));
        if order == "--random" {
            dram.random_bytes_per_extent = Some(v.bytes_per_extent);
        } else {
            dram.sequential_bytes_per_extent = Some(v.bytes_per_extent);
        }
    }
    out.report.index_dram = Some(dram);
    out.finish()
}

/// Drives the engine alone through N 4 KiB write hits (in-place overwrites of cached
/// blocks) or read hits, completing every command at once with no data moved. Run under
/// `valgrind --tool=callgrind` at two values of N: the difference divided by the
/// difference in N is the engine's instructions per operation.
fn engine_cost(a: &EngineCostArgs) -> Result<ExitCode, String> {
    use pcache::engine::{Cache, IoDone, Request};
    let (ops, blocks, reads) = (a.ops, a.blocks, a.reads);
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
            ..LayoutOptions::default()
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
fn core_latency(a: &CoreLatencyArgs) -> Result<ExitCode, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let rounds = a.rounds;
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

/// What `index-mem --json` prints.
#[derive(Serialize, serde::Deserialize)]
struct IndexMemResult {
    bytes_per_extent: f64,
    extents: u64,
    order: String,
}

impl IndexMemResult {
    fn line(&self) -> String {
        format!(
            "index DRAM     {:.1} bytes per cached extent ({} extents inserted in {} order)",
            self.bytes_per_extent, self.extents, self.order
        )
    }
}

/// Builds an index of N one-page extents and reports the RSS it took.
fn index_mem(a: &IndexMemArgs) -> Result<ExitCode, String> {
    let n = a.extents;
    let mut lbas: Vec<u64> = (0..n).map(|i| i * 8).collect();
    if a.random {
        let mut rng = Rng::new(7);
        for i in (1..lbas.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            lbas.swap(i, j);
        }
    }
    let before = rss_bytes();
    // A shard's map: with the per-segment lists GC reclaims from (4 MiB segments).
    let seg = 8192;
    let segments = u32::try_from((n * 8).div_ceil(seg)).unwrap_or(u32::MAX);
    let mut map = ExtentMap::with_segments(2048, 0, seg, segments);
    for (i, &lba) in lbas.iter().enumerate() {
        map.insert(lba, Extent::new(i as u64 * 8, 8, State::Dirty, None, 1));
    }
    let after = rss_bytes();
    let r = IndexMemResult {
        bytes_per_extent: after.saturating_sub(before) as f64 / n.max(1) as f64,
        extents: map.len() as u64,
        order: if a.random { "random" } else { "LBA" }.into(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        println!("{}", r.line());
    }
    Ok(ExitCode::SUCCESS)
}

/// Sustained writes over a working set larger than the cache, against the backing device
/// alone, on the same slow-device model.
fn bench_sustained(a: &BenchArgs) -> Result<ExitCode, String> {
    let cache_mib = a.cache_mib.unwrap_or(64);
    let ws_mib = a.working_set_mib.unwrap_or(4 * cache_mib);
    let ops = a.ops.unwrap_or(100_000);
    let qd = a.qd;
    let lat_us = a.backing_latency_us.unwrap_or(10);
    let lat = Duration::from_micros(lat_us);
    let bw = 2u64 << 30;
    let mut rng = Rng::new(a.seed);
    let blocks = (ws_mib << 20) / 4096;
    if blocks == 0 {
        usage_error("bench", "--working-set-mib must be at least 1");
    }
    let backing_sectors = (ws_mib << 20) / 512;
    let mut out = Out {
        json: a.json,
        report: BenchReport {
            mode: "sustained",
            config: BenchConfig {
                cache_mib,
                backing_mib: None,
                working_set_mib: ws_mib,
                ops,
                qd,
                io_bytes: 4096,
                backing_latency_us: Some(lat_us),
                seed: a.seed,
                ..BenchConfig::default()
            },
            ..BenchReport::default()
        },
    };
    out.line(format_args!(
        "pcache bench --sustained: cache {cache_mib} MiB, working set {ws_mib} MiB, 4 KiB random writes, \
         QD {qd}; backing device: {lat_us} us + 2 GiB/s per command (in-memory, synchronous)"
    ));
    let payload = vec![0x3cu8; 4096];
    // The backing device alone.
    let mut alone = SlowDevice::new(MemDevice::new(ws_mib << 20), lat, bw);
    let pb = progress("backing", ops);
    let t = Instant::now();
    for i in 0..ops {
        alone
            .write(rng.below(blocks) * 8, &payload)
            .map_err(|e| e.to_string())?;
        if i % PROGRESS_STEP == 0 {
            pb.set_position(i);
        }
    }
    pb.finish_and_clear();
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
            ..LayoutOptions::default()
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
    let r = run_phase(&mut host, "sustained", ops, qd, |_| {
        (Op::Write, rng.below(blocks) * 8, Some(payload.clone()))
    })?;
    let s = r.report(&out, "sustained 4k", 4096);
    let cached_iops = s.iops;
    out.report.sustained = Some(s);
    let dirty = host.cache.dirty_bytes();
    let busy0 = host.backing_dev.busy;
    let t = Instant::now();
    host.cache.set_drain(true);
    host.run();
    let drain = t.elapsed().as_secs_f64();
    let st = host.cache.stats();
    out.line(format_args!(
        "backing alone  {alone_iops:>12.0} IOPS {:>9.1} MiB/s",
        alone_bw / (1 << 20) as f64
    ));
    out.report.backing_alone = Some(Throughput {
        iops: alone_iops,
        mib_s: alone_bw / (1 << 20) as f64,
    });
    let ratio = cached_iops / alone_iops;
    out.line(format_args!(
        "ratio          sustained writes {ratio:.2}x the backing device alone (goal >= 0.8)"
    ));
    out.report.sustained_ratio = Some(ratio);
    let wb_bw = dirty as f64 / drain;
    let wb = WritebackStats {
        drained_mib: dirty >> 20,
        secs: drain,
        mib_s: wb_bw / (1 << 20) as f64,
        ratio: wb_bw / alone_bw,
        backing_busy_pct: 100.0 * (host.backing_dev.busy - busy0).as_secs_f64() / drain,
    };
    out.line(format_args!(
        "writeback      drained {} MiB in {:.3} s = {:.1} MiB/s: {:.2}x the backing device's \
         4 KiB random-write bandwidth (goal >= 0.8); backing busy {:.0}% of the drain",
        wb.drained_mib, wb.secs, wb.mib_s, wb.ratio, wb.backing_busy_pct
    ));
    out.report.writeback = Some(wb);
    let clean = host.cache.is_clean();
    out.line(format_args!(
        "engine         {} segments reclaimed, {} writeback groups, {} backing flushes, {} stalls, clean {clean}",
        st.total.gc_segments,
        st.total.wb_groups,
        st.total.backing_flushes,
        st.total.cache_full_waits,
    ));
    out.report.engine = Some(EngineStats {
        gc_segments: Some(st.total.gc_segments),
        wb_groups: Some(st.total.wb_groups),
        backing_flushes: Some(st.total.backing_flushes),
        stalls: Some(st.total.cache_full_waits),
        clean: Some(clean),
        ..EngineStats::default()
    });
    out.finish()
}

/// Random 4 KiB writes then read hits over the working set. Returns the host for more.
fn bench_io<C: BlockDevice, B: BlockDevice>(
    mut host: SyncHost<C, B>,
    ops: u64,
    qd: u64,
    ws_mib: u64,
    rng: &mut Rng,
    out: &mut Out,
) -> Result<SyncHost<C, B>, String> {
    let blocks = (ws_mib << 20) / 4096;
    if blocks == 0 {
        usage_error("bench", "--working-set-mib must be at least 1");
    }
    let payload = vec![0x5au8; 4096];
    // Warm: write every block of the working set once so writes below are overwrites.
    run_phase(&mut host, "warm", blocks, qd, |i| {
        (Op::Write, i * 8, Some(payload.clone()))
    })?;
    let r = run_phase(&mut host, "randwrite", ops, qd, |_| {
        (Op::Write, rng.below(blocks) * 8, Some(payload.clone()))
    })?;
    out.report.randwrite = Some(r.report(out, "randwrite 4k", 4096));
    let r = run_phase(&mut host, "randread", ops, qd, |_| {
        (Op::Read, rng.below(blocks) * 8, None)
    })?;
    out.report.randread = Some(r.report(out, "randread 4k", 4096));
    let st = host.cache.stats();
    let hit = 100.0 * st.total.read_hit_sectors as f64
        / (st.total.read_hit_sectors + st.total.read_miss_sectors).max(1) as f64;
    out.line(format_args!(
        "engine         {} ksets for {} keys, {} in-place overwrites, read hit {hit:.1}%",
        st.total.ksets_written, st.total.keys_written, st.total.in_place_writes,
    ));
    out.report.engine = Some(EngineStats {
        ksets_written: Some(st.total.ksets_written),
        keys_written: Some(st.total.keys_written),
        in_place_writes: Some(st.total.in_place_writes),
        read_hit_pct: Some(hit),
        ..EngineStats::default()
    });
    Ok(host)
}
