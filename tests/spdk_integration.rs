//! End-to-end test of the SPDK shell against a real SPDK (no cargo feature needed to compile).
//!
//! How it gets the module: the test itself runs
//! `cargo build --release --features spdk --lib` (same target directory, `SPDK_DIR` set to the
//! SPDK it found) and uses `target/release/libpcache.so`. So a plain `cargo test` covers it;
//! nothing has to be built beforehand. The first run compiles bindgen (about a minute).
//!
//! Ignored, with the reason, when the build found no SPDK (`SPDK_DIR`, pkg-config
//! `spdk_bdev`, or `/opt/spdk`: build.rs sets `cfg(pcache_no_spdk)`). Skips (prints
//! `SKIPPED: <reason>` and passes) when its spdk_tgt / bdevperf / scripts/rpc.py are
//! missing, when bindgen finds no libclang (`apt-get install libclang-dev`), or when
//! `PCACHE_SKIP_SPDK_TESTS` is set. Any other build failure with SPDK present fails the test.
//!
//! What it checks, on a private RPC socket per test (hugepages if >= 1 GiB free, else, or
//! with `PCACHE_SPDK_NO_HUGE` set, `--no-huge -s 2048`; core 0 for the targets; the tests are serialized by a lock because
//! spdk_tgt and bdevperf busy-poll and the machine may have 2 cores):
//! - `target_rpc_lifecycle`: spdk_tgt with the module preloaded; malloc bdevs;
//!   `bdev_pcache_create` via rpc.py with the `pcache_rpc` plugin; `bdev_get_bdevs` shows it
//!   (geometry, driver_specific.pcache); `bdev_pcache_get_stats` (channel counters and the
//!   engine's usage/requests/errors); flush_start/flush_status; every bad input gets a
//!   JSON-RPC error with a message and the target keeps running; `save_config` holds
//!   `bdev_pcache_create` with every option; delete (draining, and `--no-drain`) frees the
//!   bases for reuse; hot-remove of a base unregisters the pcache bdev.
//! - `bdevperf_verify_over_pcache`: bdevperf `-w verify` QD32 for `PCACHE_SPDK_VERIFY_SECS`
//!   seconds (default 15; the issue asks for 60) over two pcache bdevs, each a 64 MiB cache
//!   in front of a 256 MiB backing bdev, so writeback and GC run all the time (PC0: 1 shard,
//!   4 KiB backing blocks; PC1: 2 shards, data CRC, 512-byte backing blocks); no I/O fails,
//!   and the engine's stats show written-back sectors and collected segments, no errors.
//! - `hot_remove_under_io`: bdevperf runs randwrite over pcache (with writeback busy) when
//!   its backing bdev is deleted: the job ends instead of hanging, the pcache bdev goes away
//!   and releases its cache bdev, and bdevperf shuts down cleanly.
//! - `restart_and_reattach`: aio bdevs over files; the backing bdev sits behind a delay bdev
//!   with 30 s write latency (writeback cannot land); spdk_tgt exports pcache over NVMe/TCP
//!   on 127.0.0.1; `spdk_dd` in a second process writes an 8 MiB pattern through it; the
//!   target is SIGKILLed; the backing file does not hold the pattern; spdk_tgt restarts from
//!   the saved config (write latency set to 0): the cache is reattached (not reformatted)
//!   with the dirty data found in its log, `spdk_dd` reads the pattern back identical over
//!   NVMe/TCP, a flush writes it back and the backing file then holds it; a cache bdev
//!   offered to another backing bdev is refused and left unclaimed. Needs spdk_dd.
//! - `restart_and_reattach_cache_path`: the same with the cache in a tmpfs file mapped by the
//!   engine (`cache_path`, `cache_size_mib`): the saved config carries the path and reattaches.
//! - `cache_path_rpc_and_verify`: `cache_path` bad inputs (both/neither, cannot open, cannot
//!   map, too small, bad size) get JSON-RPC errors; bdev_get_bdevs / get_stats / save_config
//!   show the path and "NOT persistent memory"; a second bdev on the same path is refused;
//!   clean delete and reattach; bdevperf `-w verify` (up to 10 s) over a `cache_path` bdev.
//! - `examine_autoload_after_restart`: pcache over aio bdevs with fixed UUIDs, a pattern
//!   written over NVMe/TCP; restarts whose config creates only the base bdevs (cache first,
//!   then backing first) bring the pcache bdev back by examine under its stored name, data
//!   intact; a matching create adopts it; a reattach under another name stores that name
//!   and the next restart uses it.
//! - `deferred_create_and_load_config`: `bdev_pcache_create --defer` before the bases exist
//!   answers true and is listed as waiting; bad input still errors; a pending request is
//!   deleted; the bases appear and it attaches; `save_config` writes `defer: true` (pending
//!   requests included) and `load_config` of it, creates first, works in a fresh target.
//! - `deferred_create_does_io`: bdevperf loads a config with only a deferred create, the
//!   bases come by RPC, and `-w verify` runs over the pcache bdev.
//! - `random_switches_and_faults_under_verify`: bdevperf `-w verify -f`, 12 KiB requests, on
//!   two cores (when there are two) over two pcache bdevs (one over `bdev_error`-wrapped malloc cache and backing
//!   with two shards and data CRC, one over a mapped cache file), while a seeded sequence
//!   (`PCACHE_CHAOS_SEED`, `PCACHE_CHAOS_SECS`) switches modes, cut-off, write admission, GC and writeback
//!   pacing and injects read/write/flush/unmap failures and corrupted cache reads: no buffer
//!   mismatch, every RPC answered, no hang; afterwards a flush ends clean, writeback ok, and
//!   a last verify fails nothing.
//! - `backing_uuid_changed_after_restart`: after a SIGKILL with dirty data, the backing
//!   bdev comes back without its UUID: examine explains once and attaches nothing; the
//!   create is refused with the dirty bytes, the recorded UUID and the call that re-creates
//!   the bdev with it (never "wipe"); another file of the same size is refused;
//!   `--backing-uuid-mismatch accept` attaches with the data intact, is not echoed by
//!   `save_config`, and records the identity (a plain create then matches).
//! - `nvme_backing_verify_kill_restart`: a second spdk_tgt exports an aio bdev (behind a
//!   delay bdev) over NVMe/TCP; pcache's backing bdev is `Nvme0n1` from
//!   `bdev_nvme_attach_controller`. With bdev_nvme's default `enable_flush: false` the create
//!   warns that FLUSH is not honoured (naming `bdev_nvme_set_options --enable-flush`) and the
//!   JSON shows it; bdevperf `-w verify` through PC0 (16 MiB cache, 64 MiB backing:
//!   writeback and GC over NVMe/TCP); a pcache spdk_tgt reattaches it by examine, a pattern
//!   written over NVMe/TCP while writeback cannot land, SIGKILL; restart from the saved
//!   config with `enable_flush: true`: honoured, reattached, the pattern reads back, and
//!   writeback puts it in the other target's file.
//!
//! Every process is killed on every exit path (a Drop guard).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common_spdk;
use common_spdk::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn mem_args() -> Vec<String> {
    // Another SPDK app on the machine may take hugepages between this check and the
    // start-up: `PCACHE_SPDK_NO_HUGE` keeps the tests off them.
    if std::env::var_os("PCACHE_SPDK_NO_HUGE").is_some() {
        return vec!["--no-huge".into(), "-s".into(), "2048".into()];
    }
    if !hugetlbfs_mounts().is_empty()
        && meminfo("Hugepagesize:") == Some(2048)
        && meminfo("HugePages_Free:").unwrap_or(0) >= 512
    {
        vec![]
    } else {
        vec!["--no-huge".into(), "-s".into(), "2048".into()]
    }
}

fn spawn(spdk: &Spdk, so: &Path, bin: &Path, args: &[String], log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log file");
    let f2 = f.try_clone().expect("log file");
    let child = Command::new(bin)
        .args(args)
        .env("LD_LIBRARY_PATH", &spdk.lib_dir)
        .env("LD_PRELOAD", so) // on the SPDK process only
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    Proc {
        child,
        log: log.to_path_buf(),
    }
}

struct Rpc<'a> {
    spdk: &'a Spdk,
    sock: String,
}

impl Rpc<'_> {
    /// rpc.py with the pcache plugin.
    fn py(&self, args: &[&str]) -> Output {
        Command::new("python3")
            .arg(&self.spdk.rpc_py)
            .args(["-s", &self.sock, "-t", "30", "--plugin", "pcache_rpc"])
            .args(args)
            .env("PYTHONPATH", root().join("rpc"))
            .output()
            .expect("run rpc.py")
    }

    fn ok(&self, args: &[&str]) -> Value {
        let o = self.py(args);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "rpc.py {args:?} failed: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_str(out.trim()).unwrap_or(Value::String(out.trim().to_string()))
    }

    /// rpc.py must fail with a JSON-RPC error whose message contains `want`.
    fn err(&self, args: &[&str], want: &str) {
        let o = self.py(args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.status.success(),
            "rpc.py {args:?} unexpectedly succeeded: {all}"
        );
        assert!(
            all.contains("\"message\"") && all.contains(want),
            "rpc.py {args:?}: want error with '{want}', got: {all}"
        );
    }

    /// Raw JSON-RPC (for params the plugin's argparse cannot produce).
    fn raw(&self, method: &str, params: Option<Value>) -> Value {
        let mut s = UnixStream::connect(&self.sock).expect("connect rpc socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        s.write_all(req.to_string().as_bytes()).expect("send");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let n = s.read(&mut chunk).expect("read rpc reply");
            assert!(n > 0, "rpc socket closed");
            buf.extend_from_slice(&chunk[..n]);
            if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                return v;
            }
        }
    }

    /// Whether bdev `name` is claimed by a module.
    fn claimed(&self, name: &str) -> bool {
        self.ok(&["bdev_get_bdevs", "-b", name])[0]["claimed"] == true
    }

    /// Waits up to 10 s for bdev `name` to be unregistered (by `cause`).
    fn wait_gone(&self, name: &str, cause: &str) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.py(&["bdev_get_bdevs", "-b", name]).status.success() {
            assert!(Instant::now() < end, "{name} survived {cause}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn raw_err(&self, method: &str, params: Option<Value>, want: &str) {
        let v = self.raw(method, params.clone());
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            v["error"]["code"].is_i64() && msg.contains(want),
            "{method} {params:?}: want error '{want}', got {v}"
        );
    }
}

/// A fresh scratch directory for one test (emptied if a previous run left it).
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcache-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Stops the target, prints its log under `what`, removes the test's scratch directory.
fn finish_target(tgt: Proc, rpc: &Rpc, what: &str, dir: &Path) {
    let log = stop_target(tgt, rpc);
    println!("spdk_tgt log ({what}):\n{log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// SPDK's bdevperf.py (drives `bdevperf -z`), or None after printing why the test skips.
fn bdevperf_py(spdk: &Spdk) -> Option<PathBuf> {
    if spdk.bdevperf_py.is_none() {
        println!("SKIPPED: no examples/bdev/bdevperf/bdevperf.py next to rpc.py");
    }
    spdk.bdevperf_py.clone()
}

fn start_target<'a>(spdk: &'a Spdk, so: &Path, tag: &str) -> (Proc, Rpc<'a>) {
    start_target_with(spdk, so, tag, &[])
}

fn start_target_with<'a>(
    spdk: &'a Spdk,
    so: &Path,
    tag: &str,
    extra: &[String],
) -> (Proc, Rpc<'a>) {
    let sock = format!("/var/tmp/pcache-it-{tag}-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&sock);
    // Every core of the machine (two at most): pcache bdevs then run a team of engine
    // threads, one per core (see `two_cores`).
    let mask = if two_cores().contains(&"0x3") {
        "0x3"
    } else {
        "0x1"
    };
    let mut args: Vec<String> = ["-u", "--disable-cpumask-locks", "-m", mask, "-r", &sock]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(mem_args());
    args.extend(extra.iter().cloned());
    let log = std::env::temp_dir().join(format!("pcache-it-{tag}-{}.log", std::process::id()));
    let mut tgt = spawn(spdk, so, &spdk.tgt, &args, &log);
    let rpc = Rpc { spdk, sock };
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            tgt.alive(),
            "spdk_tgt exited during start-up:\n{}",
            tgt.log()
        );
        if Path::new(&rpc.sock).exists() && rpc.py(&["spdk_get_version"]).status.success() {
            break;
        }
        assert!(
            Instant::now() < end,
            "spdk_tgt did not answer RPCs within 60 s:\n{}",
            tgt.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (tgt, rpc)
}

fn find_spdk_unless_skipped() -> Result<Spdk, String> {
    if std::env::var_os("PCACHE_SKIP_SPDK_TESTS").is_some() {
        return Err("PCACHE_SKIP_SPDK_TESTS is set".into());
    }
    find_spdk()
}

fn setup() -> Option<(Spdk, PathBuf)> {
    let spdk = match find_spdk_unless_skipped() {
        Ok(s) => s,
        Err(why) => {
            println!("SKIPPED: {why}");
            return None;
        }
    };
    match build_module(&spdk) {
        Ok(so) => Some((spdk, so)),
        Err(e) => match e.strip_prefix(SKIP_PREFIX) {
            Some(why) => {
                println!("SKIPPED: {why}");
                None
            }
            None => panic!("{e}"),
        },
    }
}

/// rpc.py calls that must fail, and a piece of the error message each must carry.
#[rustfmt::skip]
const BAD_RPC_PY_CALLS: &[(&[&str], &str)] = &[
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "NoSuchBdev"], "does not exist"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "NoSuchBdev", "-d", "Back1"], "does not exist"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Cache1"], "same bdev"),
    (&["bdev_pcache_create", "-b", "PC0", "-c", "Cache1", "-d", "Back1"], "already exists"),
    (&["bdev_pcache_create", "-b", "Cache1", "-c", "Cache1", "-d", "Back1"], "name of a base bdev"),
    (&["bdev_pcache_create", "-b", "Cache0", "-c", "Cache1", "-d", "Back1"], "already exists"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache0", "-d", "Back1"], "in use"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--gc-percent", "0"], "gc_percent"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--stripe-size-kib", "6"], "stripe_size_kib"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--shards", "300"], "shards"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--shards", "2", "--segment-size-mib", "32"], "too small"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache8k", "-d", "Back1"], "512 to 4096-byte blocks"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--core", "5"], "not one of the app's cores"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--wb-high-pct", "5", "--wb-low-pct", "9"], "wb_low_pct"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--gc-percent", "95"], "gc_percent"),
    (&["bdev_pcache_create", "-b", "PCx", "-c", "Cache1", "-d", "Back1", "--io-timeout-ms", "5"], "io_timeout_ms"),
    (&["bdev_pcache_delete", "NoSuchPcache"], "no pcache bdev"),
    (&["bdev_pcache_get_stats", "-b", "NoSuchPcache"], "no pcache bdev"),
    (&["bdev_pcache_flush_start", "NoSuchPcache"], "no pcache bdev"),
    (&["bdev_pcache_flush_status", "NoSuchPcache"], "no pcache bdev"),
];

#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn target_rpc_lifecycle() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let (mut tgt, rpc) = start_target(&spdk, &so, "rpc");

    // Cache bdevs have 512-byte to 4 KiB blocks (not 8 KiB); backing bdevs 512 or 4096.
    for (name, mib, bs) in [
        ("Cache0", "128", "512"),
        ("Back0", "64", "4096"),
        ("Cache1", "64", "512"),
        ("Back1", "32", "4096"),
        ("Cache8k", "64", "8192"),
    ] {
        rpc.ok(&["bdev_malloc_create", "-b", name, mib, bs]);
    }
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PC0",
            "-c",
            "Cache0",
            "-d",
            "Back0",
            "--stripe-size-kib",
            "64"
        ]),
        json!("PC0")
    );

    let bdevs = rpc.ok(&["bdev_get_bdevs", "-b", "PC0"]);
    let b = &bdevs[0];
    assert_eq!(b["product_name"], "pcache");
    assert_eq!(b["block_size"], 4096);
    assert_eq!(b["num_blocks"], 64 * 256, "backing geometry");
    let info = &b["driver_specific"]["pcache"];
    assert_eq!(info["cache_bdev"], "Cache0");
    assert_eq!(info["backing_bdev"], "Back0");
    assert_eq!(info["options"]["stripe_size_kib"], 64);
    assert_eq!(
        info["stripe_blocks"], 16,
        "optimal_io_boundary = 64 KiB / 4 KiB"
    );
    for base in ["Cache0", "Back0"] {
        assert!(rpc.claimed(base), "{base} claimed");
    }

    let stats = rpc.ok(&["bdev_pcache_get_stats"]);
    assert_eq!(stats.as_array().map(Vec::len), Some(1), "{stats}");
    assert_eq!(stats[0]["name"], "PC0");
    for k in ["read_ops", "read_bytes", "write_ops", "write_bytes"] {
        assert!(stats[0][k].is_u64(), "stats lack {k}: {stats}");
    }
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["name"],
        "PC0"
    );
    for k in ["usage", "requests", "errors", "writeback", "engine", "host"] {
        assert!(stats[0][k].is_object(), "stats lack {k}: {stats}");
    }
    assert!(
        stats[0]["usage"]["capacity_bytes"].as_u64() > Some(0),
        "{stats}"
    );
    assert_eq!(
        info["cache"]["formatted"], true,
        "fresh cache bdev is formatted"
    );
    assert_eq!(info["mode"], "write_back", "{info}");

    // flush_start / flush_status.
    assert_eq!(rpc.ok(&["bdev_pcache_flush_start", "PC0"]), json!(true));
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let st = rpc.ok(&["bdev_pcache_flush_status", "PC0"]);
        assert_eq!(st["name"], "PC0");
        assert_eq!(st["writeback_failed"], false, "{st}");
        if st["clean"] == true && st["flushing"] == false {
            assert_eq!(st["dirty_bytes"], 0);
            break;
        }
        assert!(Instant::now() < end, "flush did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bad input: an error with a message each time, and the target lives on.
    for (args, want) in BAD_RPC_PY_CALLS {
        rpc.err(args, want);
    }
    let full = json!({"name": "PCx", "cache_bdev": "Cache1", "backing_bdev": "Back1"});
    let mut unknown = full.clone();
    unknown["bogus"] = json!(1);
    rpc.raw_err("bdev_pcache_create", Some(unknown), "unknown field `bogus`");
    rpc.raw_err(
        "bdev_pcache_create",
        Some(json!({"name": "PCx", "cache_bdev": "Cache1"})),
        "missing field `backing_bdev`",
    );
    rpc.raw_err("bdev_pcache_create", None, "missing parameters");
    rpc.raw_err(
        "bdev_pcache_create",
        Some(json!(["PCx", "Cache1", "Back1"])),
        "must be a JSON object",
    );
    let mut wrong = full.clone();
    wrong["shards"] = json!("two");
    rpc.raw_err("bdev_pcache_create", Some(wrong), "invalid type");
    let mut wrong = full.clone();
    wrong["data_crc"] = json!(1);
    rpc.raw_err("bdev_pcache_create", Some(wrong), "invalid type");
    rpc.raw_err(
        "bdev_pcache_delete",
        Some(json!({})),
        "missing field `name`",
    );
    rpc.raw_err(
        "bdev_pcache_delete",
        Some(json!({"name": "PC0", "force": true})),
        "unknown field `force`",
    );
    rpc.raw_err(
        "bdev_pcache_get_stats",
        Some(json!({"nam": "PC0"})),
        "unknown field `nam`",
    );
    rpc.raw_err(
        "bdev_pcache_delete",
        Some(json!({"name": "PC0", "no_drain": "yes"})),
        "invalid type",
    );
    rpc.raw_err("bdev_pcache_flush_start", None, "missing parameters");
    rpc.raw_err(
        "bdev_pcache_flush_status",
        Some(json!({"name": "PC0", "x": 1})),
        "unknown field `x`",
    );
    assert!(tgt.alive(), "spdk_tgt died on bad input:\n{}", tgt.log());
    assert_eq!(rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["name"], "PC0");
    assert!(
        !rpc.claimed("Cache1"),
        "failed creates released their claims"
    );

    // Second bdev with every option; save_config echoes every option of both, with
    // `defer: true` (the saved config loads whatever order its base bdevs come in).
    rpc.ok(&[
        "bdev_pcache_create",
        "-b",
        "PC1",
        "-c",
        "Cache1",
        "-d",
        "Back1",
        "--no-data-crc",
        "--gc-percent",
        "70",
        "--stripe-size-kib",
        "256",
        "--segment-size-mib",
        "8",
        "--shards",
        "2",
        "--no-zero-copy",
    ]);
    // Runtime writeback options: applied, answered, echoed by save_config.
    let set = rpc.ok(&[
        "bdev_pcache_set_options",
        "PC0",
        "--gc-percent",
        "60",
        "--wb-high-pct",
        "50",
        "--wb-max-inflight",
        "16",
        "--io-timeout-ms",
        "5000",
    ]);
    assert_eq!(set["io_timeout_ms"], 5000, "{set}");
    assert_eq!(
        (
            &set["gc_percent"],
            &set["wb_high_pct"],
            &set["wb_low_pct"],
            &set["wb_max_inflight"]
        ),
        (&json!(60), &json!(50), &json!(40), &json!(16)),
        "{set}"
    );
    rpc.err(
        &["bdev_pcache_set_options", "PC0", "--wb-low-pct", "70"],
        "wb_low_pct",
    );
    rpc.err(&["bdev_pcache_set_options", "PC0"], "no option");
    rpc.err(
        &[
            "bdev_pcache_set_options",
            "NoSuchPcache",
            "--gc-percent",
            "50",
        ],
        "no pcache bdev",
    );
    let cfg = rpc.ok(&["save_config"]);
    let creates: Vec<Value> = cfg["subsystems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["subsystem"] == "bdev")
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .filter(|m| m["method"] == "bdev_pcache_create")
        .map(|m| m["params"].clone())
        .collect();
    assert_eq!(creates.len(), 2, "save_config: {cfg}");
    assert!(creates.contains(&json!({
        "name": "PC1", "cache_bdev": "Cache1", "backing_bdev": "Back1", "data_crc": false, "gc_percent": 70,
        "stripe_size_kib": 256, "segment_size_mib": 8, "shards": 2, "wb_max_inflight": 64,
        "wb_group_ksets": 64, "wb_high_pct": 50, "wb_low_pct": 40, "io_timeout_ms": 30000,
        "mode": "write_back", "seq_cutoff_bytes": 1048576, "seq_cutoff_policy": "full",
        "write_admission": "always", "zero_copy": false, "defer": true
    })), "{creates:?}");
    assert!(
        creates.iter().any(|p| p["name"] == "PC0"
            && p["data_crc"] == false
            && p["stripe_size_kib"] == 64
            && p["gc_percent"] == 60
            && p["wb_high_pct"] == 50
            && p["wb_max_inflight"] == 16
            && p["io_timeout_ms"] == 5000
            && p["zero_copy"] == true),
        "{creates:?}"
    );

    // Delete (here without writing back) releases the bases: they can be used again, and
    // the cache bdev still holds PC1's cache, which a create reattaches.
    assert_eq!(
        rpc.ok(&["bdev_pcache_delete", "PC1", "--no-drain"]),
        json!(true)
    );
    rpc.err(&["bdev_get_bdevs", "-b", "PC1"], "");
    assert_eq!(
        rpc.ok(&["bdev_get_bdevs", "-b", "Cache1"])[0]["claimed"],
        false
    );
    rpc.ok(&[
        "bdev_pcache_create",
        "-b",
        "PC1",
        "-c",
        "Cache1",
        "-d",
        "Back1",
    ]);
    let pc1 = &rpc.ok(&["bdev_get_bdevs", "-b", "PC1"])[0]["driver_specific"]["pcache"];
    assert_eq!(
        pc1["cache"]["formatted"], false,
        "reattached, not reformatted: {pc1}"
    );
    assert_eq!(
        pc1["options"]["shards"], 2,
        "the superblock's layout wins over the (default) create options: {pc1}"
    );
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats"]).as_array().map(Vec::len),
        Some(2)
    );

    // Hot-remove of a base unregisters the pcache bdev on top of it.
    rpc.ok(&["bdev_malloc_delete", "Back1"]);
    rpc.wait_gone("PC1", "removal of its backing bdev");
    assert!(!rpc.claimed("Cache1"), "hot-remove released the cache bdev");
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats"]).as_array().map(Vec::len),
        Some(1)
    );

    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PC0"]), json!(true));
    assert!(tgt.alive(), "spdk_tgt died:\n{}", tgt.log());
    assert_eq!(rpc.ok(&["bdev_pcache_get_stats"]), json!([]));

    // Clean shutdown.
    let log = stop_app(tgt, &rpc, 20);
    println!("spdk_tgt log:\n{log}");
}

fn verify_secs() -> u64 {
    env_u64("PCACHE_SPDK_VERIFY_SECS")
        .filter(|&s| s > 0)
        .unwrap_or(15)
}

/// bdevperf `-w verify` over a cache much smaller than the working set, so writeback and GC
/// run all the time; then the engine's stats, read over bdevperf's own RPC socket.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn bdevperf_verify_over_pcache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let secs = verify_secs();
    let cfg = root().join("spdk-config/bdevperf-pcache-small-cache.json");
    // Two cores when the machine has them: PC1 (2 shards) then runs on a team of two engine
    // threads, PC0 (pinned to core 0) on one.
    let cores = two_cores();
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "perf", "PC0", cores);
    let per_bdev = if cores.contains(&"-C") { 2 } else { 1 };
    let (res, jobs) = verify_jobs(&spdk, &perf_py, &rpc.sock, &perf, secs);
    assert_eq!(jobs.len(), 2 * per_bdev, "{res}");
    for job in &jobs {
        println!("bdevperf verify {secs} s: {job}");
        assert_job_clean(job, &res);
    }
    // PC0: 1 shard; PC1: 2 shards, data CRC on, 512-byte backing blocks.
    let stats = rpc.ok(&["bdev_pcache_get_stats"]);
    assert_eq!(stats.as_array().map(Vec::len), Some(2), "{stats}");
    for s in stats.as_array().into_iter().flatten() {
        let t = &s["engine"]["total"];
        println!(
            "{}: usage {}\nrequests {}\nerrors {}\nwriteback {}\nengine totals {t}",
            s["name"], s["usage"], s["requests"], s["errors"], s["writeback"]
        );
        assert_eq!(s["failed_ops"], 0, "{s}");
        assert!(s["write_ops"].as_u64() > Some(0), "{s}");
        assert_wrote_back_cleanly(s);
    }
    // PC0 (no data CRC): verify's read hits are single cache-bdev reads (direct requests),
    // which the job on PC0's engine core serves itself, on its own cache-bdev channel.
    assert!(
        stats[0]["requests"]["direct"].as_u64() > Some(0),
        "{}",
        stats[0]["requests"]
    );
    let h0 = &stats[0]["host"];
    assert!(
        h0["requests_served_by_submitter"].as_u64() > Some(0),
        "{h0}"
    );
    // Both malloc caches lend their memory to writeback (zero-copy, the default), with and
    // without data CRCs, and verify found every block written back intact.
    for s in stats.as_array().into_iter().flatten() {
        let h = &s["host"];
        assert!(h["device_copies_lent"].as_u64() > Some(0), "{h}");
        assert_eq!(h["device_copies_lent_failed"], 0, "{h}");
    }
    // PC0 (no data CRC) joins writeback's copies into runs, each read once for two or more.
    let runs = h0["device_copy_runs"].as_u64().unwrap_or(0);
    let joined = h0["device_copies_joined"].as_u64().unwrap_or(0);
    assert!(runs > 0 && joined >= 2 * runs, "{h0}");
    // Both join data writes to adjacent cache blocks into one bdev write, PC1 with each
    // part's data CRC (verify checks every block read back).
    for s in stats.as_array().into_iter().flatten() {
        let h = &s["host"];
        assert!(h["device_writes_joined"].as_u64() > Some(0), "{h}");
    }
    assert_eq!(
        stats[1]["engine"]["shards"].as_array().map(Vec::len),
        Some(2),
        "{}",
        stats[1]
    );
    assert_eq!(stats[0]["host"]["engine_threads"], 1, "{}", stats[0]);
    assert_eq!(stats[1]["host"]["engine_threads"], per_bdev, "{}", stats[1]);
    if per_bdev == 2 {
        // A job on each core, an engine on each core: requests reach an engine from its own
        // core without a message, and from the other core through a queue pair.
        let h = &stats[1]["host"];
        println!("PC1 arrivals: {h}");
        assert!(h["requests_same_core"].as_u64() > Some(0), "{h}");
        assert!(h["requests_queue_pair"].as_u64() > Some(0), "{h}");
    }
    // Resets among reads (bdevperf's `reset` workload sends one per job after 10 s)
    // complete once the requests before them did, direct ones included. The bdev layer
    // aborts what is submitted while a reset runs (bdevperf counts those as failed: 100-300
    // per job here, 0.02-0.05% of its I/O, as over passthru). A reset that took long shows
    // as far more: ~1M in the drain-timeout livelock this guards against. The bound is 1%,
    // so that a slow or busy machine (fewer I/O per second, as many aborts) still passes.
    let (res, jobs) = run_jobs(&spdk, &perf_py, &rpc.sock, &perf, "reset", 11);
    assert_eq!(jobs.len(), 2 * per_bdev, "{res}");
    for job in &jobs {
        println!("bdevperf reset 11 s: {job}");
        assert_eq!(job["status"], "finished", "{res}");
        let ios = job["iops"].as_f64().unwrap_or(0.0) * job["runtime"].as_f64().unwrap_or(0.0);
        let failed = job["io_failed"].as_f64().unwrap_or(f64::MAX);
        assert!(
            ios > 0.0 && failed < ios / 100.0,
            "failed I/O with resets: {res}"
        );
    }
    let h = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["host"];
    assert!(h["resets"].as_u64() > Some(0), "no reset reached PC0: {h}");
    // Every engine writes back on a flush; delete drains (all engines) and unregisters.
    assert_eq!(rpc.ok(&["bdev_pcache_flush_start", "PC1"]), json!(true));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = rpc.ok(&["bdev_pcache_flush_status", "PC1"]);
        assert_eq!(st["writeback_failed"], false, "{st}");
        if st["clean"] == true {
            assert_eq!(st["dirty_bytes"], 0, "{st}");
            break;
        }
        assert!(Instant::now() < end, "flush did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    rpc.ok(&["bdev_pcache_delete", "PC1"]);
    rpc.err(&["bdev_get_bdevs", "-b", "PC1"], "");
    stop_app(perf, &rpc, 30);
}

/// Few `spdk_bdev_io`s for everyone (`bdev_set_options`): submissions to the cache and
/// backing bdevs, from the submitting threads and the engines, keep meeting -ENOMEM and wait
/// for a free one (`spdk_bdev_queue_io_wait`). verify over PC0 (a team of engines on two
/// cores, a cache smaller than the working set, so writeback and GC compete for them too)
/// must lose nothing and fail nothing, and the app must stop cleanly.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn verify_short_of_bdev_ios() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let dir = scratch_dir("nomem");
    let cfg = dir.join("nomem.json");
    let config = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_set_options",
         "params": {"bdev_io_pool_size": 96, "bdev_io_cache_size": 4}},
        {"method": "bdev_malloc_create",
         "params": {"name": "NmCache", "num_blocks": 131072, "block_size": 512}},
        {"method": "bdev_malloc_create",
         "params": {"name": "NmBacking", "num_blocks": 65536, "block_size": 4096}},
        {"method": "bdev_pcache_create",
         "params": {"name": "PC0", "cache_bdev": "NmCache", "backing_bdev": "NmBacking",
                    "segment_size_mib": 2, "stripe_size_kib": 256}},
        {"method": "bdev_wait_for_examine"}]}]});
    std::fs::write(&cfg, config.to_string()).expect("write config");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "nomem", "PC0", two_cores());
    let (res, jobs) = verify_jobs(&spdk, &perf_py, &rpc.sock, &perf, 10);
    assert!(!jobs.is_empty(), "{res}");
    for job in &jobs {
        println!("bdevperf verify, 96 bdev_ios: {job}");
        assert_job_clean(job, &res);
    }
    let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0];
    println!("host {}\nrequests {}", s["host"], s["requests"]);
    assert_wrote_back_cleanly(s);
    assert!(
        s["host"]["nomem_waits"].as_u64() > Some(0),
        "the engines never waited for a bdev_io: {}",
        s["host"]
    );
    // Writeback borrowed the malloc cache's memory, and the writes from it that had to wait
    // for a bdev_io let go of it first (else lent starts could hold the whole pool).
    for k in ["device_copies_lent", "device_copies_unlent"] {
        assert!(s["host"][k].as_u64() > Some(0), "{k}: {}", s["host"]);
    }
    stop_app(perf, &rpc, 30);
}

/// A RAID0 over six pcache bdevs, on one core: each 24 KiB request reaches all six from
/// one poller, and each of their channels has requests to serve once it returns. SPDK
/// keeps at most 4 post-poller handlers per thread; pcache registers one per thread for
/// all its channels (a handler per channel filled the log with "Too many handlers
/// registered" here). verify passes, the submitting thread serves hits itself, and SPDK
/// refused nothing.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn raid0_over_six_pcache_bdevs_on_one_thread() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let dir = scratch_dir("raid");
    let cfg = dir.join("raid.json");
    let mut methods = Vec::new();
    let members: Vec<String> = (0..6).map(|i| format!("PC{i}")).collect();
    for (i, pc) in members.iter().enumerate() {
        methods.push(json!({"method": "bdev_malloc_create",
            "params": {"name": format!("RdCache{i}"), "num_blocks": 65536, "block_size": 512}}));
        methods.push(json!({"method": "bdev_malloc_create",
            "params": {"name": format!("RdBack{i}"), "num_blocks": 8192, "block_size": 4096}}));
        methods.push(json!({"method": "bdev_pcache_create",
            "params": {"name": pc, "cache_bdev": format!("RdCache{i}"),
                       "backing_bdev": format!("RdBack{i}")}}));
    }
    methods.push(json!({"method": "bdev_raid_create",
        "params": {"name": "R0", "raid_level": "raid0", "strip_size_kb": 4,
                   "base_bdevs": members}}));
    std::fs::write(&cfg, bdev_config(&methods).to_string()).expect("write config");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "raid", "R0", &["-m", "0x1"]);
    let (res, jobs) = run_jobs_sized(&spdk, &perf_py, &rpc.sock, &perf, "verify", 24576, 8);
    assert!(!jobs.is_empty(), "{res}");
    for job in &jobs {
        println!("bdevperf verify over RAID0 of 6 pcache bdevs, 24 KiB: {job}");
        assert_job_clean(job, &res);
    }
    let mut served = 0;
    for pc in &members {
        let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", pc])[0];
        served += s["host"]["requests_served_by_submitter"]
            .as_u64()
            .unwrap_or(0);
    }
    assert!(served > 0, "no hit was served by the submitting thread");
    let log = perf.log();
    assert!(
        !log.contains("Too many handlers registered"),
        "SPDK refused post-poller handlers:\n{log}"
    );
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Cache bdevs of 4 KiB blocks, alone and mixed with 512-byte backing blocks both ways:
/// PC0 caches a 512-byte backing bdev on a 4 KiB cache, PC1 a 4 KiB backing bdev on a
/// 512-byte cache, PC2 4 KiB on 4 KiB (data CRC on). Each exports 4 KiB blocks (the larger
/// of its two) and passes bdevperf verify with a cache smaller than the working set, so
/// writeback and GC run under it; a 512-byte request to a pcache bdev of 4 KiB blocks
/// cannot be expressed (the bdev layer counts in blocks), and the cache's metadata lands in
/// whole blocks or the cache bdev would fail its I/O (counted as errors).
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn verify_over_4k_cache_bdevs_and_mixed_block_sizes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let dir = scratch_dir("4k");
    let cfg = dir.join("4k.json");
    // 16 MiB caches of 2 MiB segments under 64 MiB working sets.
    let malloc = |name: &str, mib: u64, bs: u64| {
        json!({"method": "bdev_malloc_create",
               "params": {"name": name, "num_blocks": (mib << 20) / bs, "block_size": bs}})
    };
    let pcache = |name: &str, cache: &str, backing: &str, crc: bool| {
        json!({"method": "bdev_pcache_create",
               "params": {"name": name, "cache_bdev": cache, "backing_bdev": backing,
                          "segment_size_mib": 2, "stripe_size_kib": 256, "data_crc": crc}})
    };
    let config = json!({"subsystems": [{"subsystem": "bdev", "config": [
        malloc("C4k0", 16, 4096), malloc("B512", 64, 512),
        malloc("C512", 16, 512), malloc("B4k1", 64, 4096),
        malloc("C4k2", 16, 4096), malloc("B4k2", 64, 4096),
        pcache("PC0", "C4k0", "B512", false),
        pcache("PC1", "C512", "B4k1", false),
        pcache("PC2", "C4k2", "B4k2", true),
        {"method": "bdev_wait_for_examine"}]}]});
    std::fs::write(&cfg, config.to_string()).expect("write config");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "4k", "PC2", two_cores());
    for (pc, cache_bs) in [("PC0", 4096), ("PC1", 512), ("PC2", 4096)] {
        let b = &rpc.ok(&["bdev_get_bdevs", "-b", pc])[0];
        assert_eq!(b["block_size"], 4096, "{pc}: {b}");
        let sb = &b["driver_specific"]["pcache"];
        println!("{pc}: cache blocks {cache_bs}: {sb}");
    }
    let secs = verify_secs();
    let (res, jobs) = verify_jobs(&spdk, &perf_py, &rpc.sock, &perf, secs);
    assert!(jobs.len() >= 3, "{res}");
    for job in &jobs {
        println!("bdevperf verify {secs} s: {job}");
        assert_job_clean(job, &res);
    }
    for pc in ["PC0", "PC1", "PC2"] {
        let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", pc])[0];
        println!(
            "{pc}: usage {}
engine totals {}",
            s["usage"], s["engine"]["total"]
        );
        assert_eq!(s["failed_ops"], 0, "{s}");
        assert_wrote_back_cleanly(s);
    }
    // Drained to the backing bdev: the cache of 4 KiB blocks empties cleanly.
    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PC0"]), json!(true));
    rpc.err(&["bdev_get_bdevs", "-b", "PC0"], "");
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts bdevperf `-z` on `cfg` and waits until PC0 exists. Returns the process and an RPC
/// client for its socket.
fn start_bdevperf<'a>(spdk: &'a Spdk, so: &Path, cfg: &Path, tag: &str) -> (Proc, Rpc<'a>) {
    start_bdevperf_until(spdk, so, cfg, tag, "PC0")
}

/// Cores for a multi-core bdevperf: `-m 0x3 -C` (every core sends I/O to every bdev) when
/// the machine has two, else one core.
fn two_cores() -> &'static [&'static str] {
    if std::thread::available_parallelism().map_or(1, usize::from) >= 2 {
        &["-m", "0x3", "-C"]
    } else {
        &["-m", "0x1"]
    }
}

/// Starts bdevperf `-z` on `cfg` and waits until bdev `ready` exists (when `ready` is empty:
/// until it answers RPCs).
fn start_bdevperf_until<'a>(
    spdk: &'a Spdk,
    so: &Path,
    cfg: &Path,
    tag: &str,
    ready: &str,
) -> (Proc, Rpc<'a>) {
    start_bdevperf_with(spdk, so, cfg, tag, ready, &["-m", "0x1"])
}

/// `start_bdevperf_until` with these core arguments.
fn start_bdevperf_with<'a>(
    spdk: &'a Spdk,
    so: &Path,
    cfg: &Path,
    tag: &str,
    ready: &str,
    cores: &[&str],
) -> (Proc, Rpc<'a>) {
    let sock = format!("/var/tmp/pcache-it-{tag}-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&sock);
    let mut args: Vec<String> = ["-u", "--disable-cpumask-locks"]
        .iter()
        .chain(cores)
        .chain(&["-r", &sock, "-z", "--json"])
        .map(|s| s.to_string())
        .collect();
    args.push(cfg.display().to_string());
    args.extend(
        ["-q", "32", "-o", "4096", "-w", "randwrite", "-t", "5"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(mem_args());
    let log = std::env::temp_dir().join(format!("pcache-it-{tag}-{}.log", std::process::id()));
    let mut perf = spawn(spdk, so, &spdk.bdevperf, &args, &log);
    let rpc = Rpc { spdk, sock };
    let end = Instant::now() + Duration::from_secs(60);
    let probe: Vec<&str> = if ready.is_empty() {
        vec!["spdk_get_version"]
    } else {
        vec!["bdev_get_bdevs", "-b", ready]
    };
    while !(Path::new(&rpc.sock).exists() && rpc.py(&probe).status.success()) {
        assert!(perf.alive(), "bdevperf exited:\n{}", perf.log());
        assert!(Instant::now() < end, "bdevperf not ready:\n{}", perf.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    (perf, rpc)
}

/// `bdevperf.py perform_tests ARGS` against bdevperf's socket (answer timeout `timeout_s`).
fn perform_tests(
    spdk: &Spdk,
    perf_py: &Path,
    sock: &str,
    timeout_s: u64,
    args: &[&str],
) -> Command {
    let py_path = spdk
        .rpc_py
        .parent()
        .and_then(Path::parent)
        .map(|s| s.join("python"));
    let mut c = Command::new("python3");
    c.arg(perf_py)
        .args(["-s", sock, "-t", &timeout_s.to_string(), "perform_tests"])
        .args(args)
        .env("PYTHONPATH", py_path.unwrap_or_default());
    c
}

/// A bdevperf job of result `res` failed no I/O and made progress (over 1000 IOPS).
fn assert_job_clean(job: &Value, res: &Value) {
    assert_eq!(job["io_failed"], 0, "failed I/O: {res}");
    assert!(job["iops"].as_f64() > Some(1000.0), "IOPS too low: {res}");
}

/// One pcache bdev's `bdev_pcache_get_stats` entry shows writeback and GC at work and no
/// error counter moved.
fn assert_wrote_back_cleanly(s: &Value) {
    let t = &s["engine"]["total"];
    assert!(
        t["wb_sectors"].as_u64() > Some(0),
        "nothing written back: {t}"
    );
    assert!(
        t["gc_segments"].as_u64() > Some(0),
        "no segment collected: {t}"
    );
    for k in [
        "io_errors",
        "crc_errors",
        "wb_errors",
        "device_errors",
        "requests_failed",
    ] {
        assert_eq!(s["errors"][k], 0, "{k}: {s}");
    }
}

/// Runs bdevperf `-w verify -q 32 -o 4096 -t secs` through bdevperf.py and returns the
/// parsed result and its jobs; fails the test (with bdevperf's log) if the run fails.
fn verify_jobs(
    spdk: &Spdk,
    perf_py: &Path,
    sock: &str,
    perf: &Proc,
    secs: u64,
) -> (Value, Vec<Value>) {
    run_jobs(spdk, perf_py, sock, perf, "verify", secs)
}

/// Runs bdevperf `workload` (QD32, 4 KiB) for `secs` on every bdev; returns the result and
/// its jobs.
fn run_jobs(
    spdk: &Spdk,
    perf_py: &Path,
    sock: &str,
    perf: &Proc,
    workload: &str,
    secs: u64,
) -> (Value, Vec<Value>) {
    run_jobs_sized(spdk, perf_py, sock, perf, workload, 4096, secs)
}

/// [`run_jobs`] with requests of `io_size` bytes.
fn run_jobs_sized(
    spdk: &Spdk,
    perf_py: &Path,
    sock: &str,
    perf: &Proc,
    workload: &str,
    io_size: u32,
    secs: u64,
) -> (Value, Vec<Value>) {
    let (t, o) = (secs.to_string(), io_size.to_string());
    let args = [
        "-w",
        workload,
        "-q",
        "32",
        "-o",
        o.as_str(),
        "-t",
        t.as_str(),
    ];
    let out = perform_tests(spdk, perf_py, sock, secs + 120, &args)
        .output()
        .expect("run bdevperf.py");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "perform_tests failed: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        perf.log()
    );
    let res: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let jobs = res["results"].as_array().cloned().unwrap_or_default();
    (res, jobs)
}

#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn hot_remove_under_io() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let cfg = root().join("spdk-config/bdevperf-pcache-small-cache.json");
    // PC0: one engine thread, loses its backing bdev; PC1: a team of engine threads (on two
    // cores), loses its cache bdev; PC2 (below) loses its cache bdev under direct I/O.
    // `-f`: jobs go on after failed I/O (PC1's requests fail once its cache is gone).
    let args: Vec<&str> = two_cores().iter().copied().chain(["-f"]).collect();
    let (mut perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "hotrm", "PC0", &args);
    // PC2: a 16 MiB backing under a 64 MiB cache (of 4 KiB blocks), so random writes soon
    // rewrite dirty blocks in place, served directly; it loses its cache bdev with those in
    // flight.
    rpc.ok(&["bdev_malloc_create", "-b", "PcCache2", "64", "4096"]);
    rpc.ok(&["bdev_malloc_create", "-b", "PcBacking2", "16", "4096"]);
    rpc.ok(&[
        "bdev_pcache_create",
        "-b",
        "PC2",
        "-c",
        "PcCache2",
        "-d",
        "PcBacking2",
        "--segment-size-mib",
        "2",
        "--stripe-size-kib",
        "256",
    ]);
    let mut job = perform_tests(&spdk, &perf_py, &rpc.sock, 120, &["-t", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bdevperf.py");
    std::thread::sleep(Duration::from_secs(3));
    let pc2 = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC2"])[0]["requests"];
    assert!(pc2["direct"].as_u64() > Some(0), "PC2: {pc2}");
    rpc.ok(&["bdev_malloc_delete", "PcBacking0"]);
    rpc.ok(&["bdev_malloc_delete", "PcCache1"]);
    rpc.ok(&["bdev_malloc_delete", "PcCache2"]);
    let end = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Ok(Some(st)) = job.try_wait() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "the bdevperf job hung after the backing bdev was removed:\n{}",
            perf.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::new();
    if let Some(mut o) = job.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    println!("perform_tests ({st}): {text}");
    assert!(perf.alive(), "bdevperf died:\n{}", perf.log());
    rpc.wait_gone("PC0", "removal of its backing bdev");
    assert!(
        !rpc.claimed("PcCache0"),
        "hot-remove released the cache bdev"
    );
    rpc.wait_gone("PC1", "removal of its cache bdev");
    assert!(
        !rpc.claimed("PcBacking1"),
        "hot-remove of the cache bdev released the backing bdev"
    );
    rpc.wait_gone("PC2", "removal of its cache bdev under direct I/O");
    assert!(
        !rpc.claimed("PcBacking2"),
        "hot-remove of the cache bdev released the backing bdev"
    );
    let out = stop_app(perf, &rpc, 30);
    for pc in ["PC0", "PC1", "PC2"] {
        assert!(
            out.contains(&format!("destructed pcache bdev '{pc}'")),
            "{out}"
        );
    }
}

/// A deterministic pseudo-random pattern.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free TCP port")
}

/// Runs spdk_dd (no pcache module: it is the NVMe/TCP initiator) to completion.
fn run_dd(spdk: &Spdk, dd: &Path, cfg: &Path, args: &[&str], log: &Path) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut all: Vec<String> = vec![
        "--disable-cpumask-locks".into(),
        "-m".into(),
        if cores > 1 { "0x2" } else { "0x1" }.into(),
        "--json".into(),
        cfg.display().to_string(),
    ];
    all.extend(mem_args());
    all.extend(args.iter().map(|s| s.to_string()));
    let f = std::fs::File::create(log).expect("log file");
    let f2 = f.try_clone().expect("log file");
    let mut child = Command::new(dd)
        .args(&all)
        .env("LD_LIBRARY_PATH", &spdk.lib_dir)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .expect("start spdk_dd");
    let end = Instant::now() + Duration::from_secs(120);
    let st = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "spdk_dd {args:?} hung:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(log).unwrap_or_default();
    assert!(st.success(), "spdk_dd {args:?} failed ({st}):\n{out}");
}

/// spdk_dd's block size for the tests' transfers over NVMe/TCP.
const DD_BS: usize = 65536;

/// Writes the file `src` to the exported namespace (spdk_dd with the `initiator` config).
fn dd_write(spdk: &Spdk, dd: &Path, initiator: &Path, src: &Path, log: &Path) {
    let src = src.display().to_string();
    let bs = DD_BS.to_string();
    let args = ["--if", &src, "--ob", "Nvme0n1", "--bs", &bs, "--qd", "8"];
    run_dd(spdk, dd, initiator, &args, log);
}

/// Reads the first `bytes` of the exported namespace into the file `out` (spdk_dd with the
/// `initiator` config) and returns them.
fn dd_read(
    spdk: &Spdk,
    dd: &Path,
    initiator: &Path,
    out: &Path,
    bytes: usize,
    log: &Path,
) -> Vec<u8> {
    let out_s = out.display().to_string();
    let (bs, count) = (DD_BS.to_string(), (bytes / DD_BS).to_string());
    let args = [
        "--ib", "Nvme0n1", "--of", &out_s, "--bs", &bs, "--count", &count,
    ];
    run_dd(spdk, dd, initiator, &args, log);
    std::fs::read(out).expect("read-back file")
}

/// The NVMe-oF subsystem a target exports a pcache bdev on (see [`nvmf_export`]).
const NQN: &str = "nqn.2016-06.io.spdk:pcache-it";

/// Exports `bdev` over NVMe/TCP on 127.0.0.1:`port` as [`NQN`], for `spdk_dd` in another
/// process to write and read it.
fn nvmf_export(rpc: &Rpc, bdev: &str, port: &str) {
    nvmf_export_as(rpc, NQN, bdev, port);
}

/// [`nvmf_export`] under subsystem `nqn`.
fn nvmf_export_as(rpc: &Rpc, nqn: &str, bdev: &str, port: &str) {
    rpc.ok(&["nvmf_create_transport", "-t", "TCP"]);
    rpc.ok(&[
        "nvmf_create_subsystem",
        nqn,
        "-a",
        "-s",
        "SPDK00000000000001",
    ]);
    rpc.ok(&["nvmf_subsystem_add_ns", nqn, bdev]);
    rpc.ok(&[
        "nvmf_subsystem_add_listener",
        nqn,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        port,
    ]);
}

/// `dir/initiator.json`: spdk_dd's config, attaching [`NQN`] at 127.0.0.1:`port` as
/// `Nvme0` (its namespace is the bdev `Nvme0n1`).
fn initiator_config(dir: &Path, port: &str) -> PathBuf {
    let initiator = dir.join("initiator.json");
    std::fs::write(
        &initiator,
        json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_nvme_attach_controller", "params": {
                "name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                "trsvcid": port, "subnqn": NQN}},
            {"method": "bdev_wait_for_examine"}
        ]}]})
        .to_string(),
    )
    .expect("initiator config");
    initiator
}

fn read_prefix(path: &Path, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("open");
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).expect("read");
    v
}

#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn restart_and_reattach() {
    restart_case(None, 512);
}

/// `restart_and_reattach` with a cache bdev of 4 KiB blocks (an aio file of 4096-byte
/// blocks, as 4Kn NVMe namespaces have): the pcache bdev has 4 KiB blocks, the dirty data
/// survives SIGKILL, replay and writeback.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn restart_and_reattach_4k_cache_blocks() {
    restart_case(None, 4096);
}

/// `restart_and_reattach` with the cache in a file mapped by the engine (`cache_path`, in
/// tmpfs): the saved config carries the path, the restart reattaches it.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn restart_and_reattach_cache_path() {
    let path = PathBuf::from(format!(
        "/dev/shm/pcache-it-persist-{}.img",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    restart_case(Some(&path), 512);
    let _ = std::fs::remove_file(&path);
}

/// `restart_and_reattach_cache_path` with the file on hugetlbfs, whose pages stay put: the
/// mapping is registered with SPDK and writeback writes the backing bdev straight from it
/// (`device_copies_from_mapping`), with the same data landing.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn restart_and_reattach_cache_path_hugetlbfs() {
    let dir = Path::new("/dev/hugepages");
    let free_mib = meminfo("HugePages_Free:")
        .zip(meminfo("Hugepagesize:"))
        .map_or(0, |(n, kib)| n * kib / 1024);
    // A directory there that is not hugetlbfs would map tmpfs or disk pages, which are
    // never registered: the test's expectation would not hold.
    let hugetlbfs = hugetlbfs_mounts().iter().any(|m| m == "/dev/hugepages");
    // The cache's 64 MiB, beside the two targets' own DPDK memory.
    if !hugetlbfs || free_mib < 512 {
        println!(
            "SKIPPED: needs hugetlbfs mounted at /dev/hugepages ({hugetlbfs}) with 512 MiB \
             free ({free_mib})"
        );
        return;
    }
    let path = dir.join(format!("pcache-it-persist-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    restart_case(Some(&path), 512);
    let _ = std::fs::remove_file(&path);
}

/// The cache: aio bdev `Cache0` of `cache_block`-byte blocks (None) or the mapped file
/// `cache_path`.
fn restart_case(cache_path: Option<&Path>, cache_block: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(dd) = spdk.dd.clone() else {
        println!("SKIPPED: spdk_dd not found (needed to write through NVMe/TCP)");
        return;
    };
    let hugetlbfs = cache_path.is_some_and(|p| p.starts_with("/dev/hugepages"));
    let tag = match (cache_path.is_some(), cache_block) {
        (true, _) if hugetlbfs => "persisth",
        (true, _) => "persistp",
        (false, 512) => "persist",
        (false, _) => "persist4k",
    };
    let cache_block_s = cache_block.to_string();
    let dir = scratch_dir(tag);
    let cache_img = dir.join("cache.img");
    let back_img = dir.join("backing.img");
    let other_img = dir.join("other.img");
    let path_s = cache_path.map(|p| p.display().to_string());
    // `-c Cache0` or `-p PATH --cache-size-mib 64`.
    let cache_args: Vec<&str> = match &path_s {
        None => vec!["-c", "Cache0"],
        Some(p) => vec!["-p", p, "--cache-size-mib", "64"],
    };
    for p in [&cache_img, &back_img, &other_img] {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image file");
    }
    let data = pattern(8 << 20, 0x5eed_cafe);
    let pattern_file = dir.join("pattern.bin");
    std::fs::write(&pattern_file, &data).expect("pattern file");
    // Written first over the same blocks: the pattern then rewrites dirty extents in place.
    let older_file = dir.join("older.bin");
    std::fs::write(&older_file, pattern(data.len(), 0x01d_da7a)).expect("older pattern file");
    let port = free_port().to_string();
    let initiator = initiator_config(&dir, &port);

    // ---- phase 1: write through NVMe/TCP, then SIGKILL the target ----
    let (mut tgt, rpc) = start_target(&spdk, &so, tag);
    let cache_s = cache_img.display().to_string();
    let back_s = back_img.display().to_string();
    if cache_path.is_none() {
        rpc.ok(&[
            "bdev_aio_create",
            &cache_s,
            "Cache0",
            &cache_block_s,
            "-u",
            "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0001",
        ]);
    }
    rpc.ok(&[
        "bdev_aio_create",
        &back_s,
        "Back0",
        "4096",
        "-u",
        "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0002",
    ]);
    // Writeback cannot land for 30 s: whatever was written stays dirty, in the cache only.
    rpc.ok(&[
        "bdev_delay_create",
        "-b",
        "Back0",
        "-d",
        "Slow0",
        "-r",
        "0",
        "-t",
        "0",
        "-w",
        "30000000",
        "-n",
        "30000000",
        "-u",
        "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0003",
    ]);
    let mut create = vec!["bdev_pcache_create", "-b", "PC0", "-d", "Slow0"];
    create.extend(&cache_args);
    create.extend(["--segment-size-mib", "2", "--stripe-size-kib", "256"]);
    rpc.ok(&create);
    // The larger of the two block sizes (the backing bdev's is 4096).
    assert_eq!(
        rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["block_size"],
        4096
    );
    nvmf_export(&rpc, "PC0", &port);
    dd_write(
        &spdk,
        &dd,
        &initiator,
        &older_file,
        &dir.join("dd-write-older.log"),
    );
    dd_write(
        &spdk,
        &dd,
        &initiator,
        &pattern_file,
        &dir.join("dd-write.log"),
    );
    let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0];
    assert!(
        s["requests"]["direct"].as_u64() > Some(0)
            && s["requests"]["in_place_writes"].as_u64() > Some(0),
        "the second pass should rewrite dirty blocks in place, served directly: {}",
        s["requests"]
    );
    let st = rpc.ok(&["bdev_pcache_flush_status", "PC0"]);
    assert!(
        st["dirty_bytes"].as_u64() >= Some(data.len() as u64),
        "the pattern should be dirty in the cache: {st}"
    );
    let saved = rpc.ok(&["save_config"]);
    // Crash: no shutdown path runs.
    tgt.child.kill().expect("SIGKILL spdk_tgt");
    let _ = tgt.child.wait();
    drop(tgt);
    assert_ne!(
        read_prefix(&back_img, data.len()),
        data,
        "the backing file already holds the pattern: the test would prove nothing"
    );

    // ---- phase 2: restart from the saved config; the cache is reattached ----
    let mut cfg = saved.clone();
    let mut creates = 0;
    for sub in cfg["subsystems"].as_array_mut().into_iter().flatten() {
        for m in sub["config"].as_array_mut().into_iter().flatten() {
            if m["method"] == "bdev_delay_create" {
                for k in ["avg_write_latency", "p99_write_latency"] {
                    m["params"][k] = json!(0);
                }
            }
            if m["method"] == "bdev_pcache_create" {
                creates += 1;
                assert_eq!(m["params"]["segment_size_mib"], 2, "{m}");
                if let Some(p) = &path_s {
                    assert_eq!(m["params"]["cache_path"], json!(p), "{m}");
                    assert_eq!(m["params"]["cache_size_mib"], 64, "{m}");
                    assert!(m["params"].get("cache_bdev").is_none(), "{m}");
                }
            }
        }
    }
    assert_eq!(creates, 1, "save_config: {saved}");
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("saved config");
    let (tgt, rpc) = start_target_with(
        &spdk,
        &so,
        &format!("{tag}2"),
        &["--json".into(), cfg_path.display().to_string()],
    );
    let b = rpc.ok(&["bdev_get_bdevs", "-b", "PC0"]);
    let info = &b[0]["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "reattached: {info}");
    assert!(
        info["cache"]["dirty_bytes_at_open"].as_u64() >= Some(data.len() as u64),
        "the log replay found the dirty pattern: {info}"
    );
    if let Some(p) = &path_s {
        assert_eq!(info["cache_path"], json!(p), "{info}");
        assert_eq!(info["persistent_memory"], false, "RAM: {info}");
    }
    let back = dd_read(
        &spdk,
        &dd,
        &initiator,
        &dir.join("readback.bin"),
        data.len(),
        &dir.join("dd-read.log"),
    );
    assert!(
        back == data,
        "data read back after the crash differs from what was written"
    );

    // Write everything back: the backing file then holds the pattern.
    rpc.ok(&["bdev_pcache_flush_start", "PC0"]);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = rpc.ok(&["bdev_pcache_flush_status", "PC0"]);
        if st["clean"] == true {
            break;
        }
        assert_eq!(st["writeback_failed"], false, "{st}");
        assert!(Instant::now() < end, "writeback did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        read_prefix(&back_img, data.len()) == data,
        "after writeback the backing file holds the pattern"
    );
    if cache_path.is_some() {
        // Only pages that stay put are handed to the backing bdev (tmpfs pages may move).
        let host = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["host"];
        let direct = host["device_copies_from_mapping"].as_u64().unwrap_or(0);
        assert_eq!(direct > 0, hugetlbfs, "writeback from the mapping: {host}");
    }

    // The cache belongs to Slow0: offered with another backing bdev it is refused, intact.
    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PC0"]), json!(true));
    let other_s = other_img.display().to_string();
    rpc.ok(&["bdev_aio_create", &other_s, "Other0", "4096"]);
    let mut other = vec!["bdev_pcache_create", "-b", "PC9", "-d", "Other0"];
    other.extend(&cache_args);
    rpc.err(&other, "another backing device");
    if cache_path.is_none() {
        assert_eq!(
            rpc.ok(&["bdev_get_bdevs", "-b", "Cache0"])[0]["claimed"],
            false
        );
    }
    let mut again = vec!["bdev_pcache_create", "-b", "PC0", "-d", "Slow0"];
    again.extend(&cache_args);
    rpc.ok(&again);
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "{info}");
    assert_eq!(info["cache"]["dirty_bytes_at_open"], 0, "{info}");

    stop_target(tgt, &rpc);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cache_path`: the cache is a file in tmpfs mapped by the engine thread (no cache bdev).
/// Bad inputs get JSON-RPC errors; bdev_get_bdevs, get_stats and save_config show the path
/// and the persistence mode; a second bdev on the same path is refused; then bdevperf
/// `-w verify` runs over a `cache_path` pcache bdev with writeback and GC busy.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn cache_path_rpc_and_verify() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let pid = std::process::id();
    let path = format!("/dev/shm/pcache-it-dax-{pid}.img");
    let small = format!("/dev/shm/pcache-it-dax-small-{pid}.img");
    let _ = std::fs::remove_file(&path);
    std::fs::File::create(&small)
        .and_then(|f| f.set_len(4 << 20))
        .expect("small cache file");

    let (tgt, rpc) = start_target(&spdk, &so, "daxrpc");
    rpc.ok(&["bdev_malloc_create", "-b", "Back1", "64", "4096"]);
    rpc.ok(&["bdev_malloc_create", "-b", "Cache1", "64", "512"]);
    let base = |extra: Value| {
        let mut p = json!({"name": "PCd", "backing_bdev": "Back1"});
        if let (Some(o), Some(e)) = (p.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        Some(p)
    };
    for (params, want) in [
        (
            json!({"cache_bdev": "Cache1", "cache_path": path}),
            "not both",
        ),
        (json!({}), "got neither"),
        (
            json!({"cache_bdev": "Cache1", "cache_size_mib": 64}),
            "goes with cache_path",
        ),
        (
            json!({"cache_path": "/nonexistent-dir/pc.img", "cache_size_mib": 64}),
            "cannot open",
        ),
        (
            json!({"cache_path": format!("/dev/shm/pcache-it-none-{pid}")}),
            "No such file",
        ),
        (json!({"cache_path": "/dev/shm"}), "cannot open"),
        (json!({"cache_path": "/dev/null"}), "size is unknown"),
        (json!({"cache_path": small}), "too small"),
        (
            json!({"cache_path": path, "cache_size_mib": 0}),
            "cache_size_mib",
        ),
    ] {
        rpc.raw_err("bdev_pcache_create", base(params), want);
    }
    rpc.err(
        &["bdev_pcache_create", "-b", "PCd", "-d", "Back1"],
        "got neither",
    );
    assert!(
        !Path::new(&format!("/dev/shm/pcache-it-none-{pid}")).exists(),
        "no file is created without cache_size_mib"
    );
    assert!(
        !rpc.claimed("Back1"),
        "failed creates release the backing bdev"
    );

    rpc.ok(&[
        "bdev_pcache_create",
        "-b",
        "PCd",
        "-p",
        &path,
        "--cache-size-mib",
        "64",
        "-d",
        "Back1",
        "--segment-size-mib",
        "2",
        "--stripe-size-kib",
        "256",
    ]);
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PCd"])[0]["driver_specific"]["pcache"];
    assert_eq!(info["cache_path"], json!(path), "{info}");
    assert_eq!(info["persistent_memory"], false, "{info}");
    assert!(
        info["persistence"]
            .as_str()
            .is_some_and(|p| p.contains("NOT persistent memory")),
        "{info}"
    );
    assert_eq!(info["cache"]["formatted"], true, "{info}");
    // The same file for a second bdev: refused (flock).
    rpc.ok(&["bdev_malloc_create", "-b", "Back2", "64", "4096"]);
    rpc.err(
        &[
            "bdev_pcache_create",
            "-b",
            "PCe",
            "-p",
            &path,
            "-d",
            "Back2",
        ],
        "in use",
    );
    let st = rpc.ok(&["bdev_pcache_get_stats", "-b", "PCd"]);
    assert_eq!(st[0]["cache_path"], json!(path), "{st}");
    assert_eq!(st[0]["persistent_memory"], false, "{st}");
    let saved = rpc.ok(&["save_config"]);
    let create = saved["subsystems"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .find(|m| m["method"] == "bdev_pcache_create")
        .unwrap_or_else(|| panic!("no bdev_pcache_create in {saved}"));
    assert_eq!(create["params"]["cache_path"], json!(path), "{create}");
    assert_eq!(create["params"]["cache_size_mib"], 64, "{create}");
    assert!(create["params"].get("cache_bdev").is_none(), "{create}");
    assert!(
        tgt.log().contains("NOT persistent memory"),
        "describe() is logged"
    );
    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PCd"]), json!(true));
    // Reattach after a clean delete: the superblock is in the file.
    rpc.ok(&[
        "bdev_pcache_create",
        "-b",
        "PCd",
        "-p",
        &path,
        "-d",
        "Back1",
    ]);
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PCd"])[0]["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "{info}");
    assert_eq!(info["options"]["segment_size_mib"], 2, "{info}");
    stop_target(tgt, &rpc);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&small);

    // ---- bdevperf verify over a cache_path pcache bdev ----
    let Some(perf_py) = spdk.bdevperf_py.clone() else {
        println!("SKIPPED (verify part): no examples/bdev/bdevperf/bdevperf.py next to rpc.py");
        return;
    };
    let cfg = std::env::temp_dir().join(format!("pcache-it-dax-{pid}.json"));
    std::fs::write(
        &cfg,
        json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "PcBacking0", "num_blocks": 65536, "block_size": 4096}},
            {"method": "bdev_pcache_create", "params": {"name": "PC0", "cache_path": path, "cache_size_mib": 64,
                "backing_bdev": "PcBacking0", "segment_size_mib": 2, "stripe_size_kib": 256}},
            {"method": "bdev_wait_for_examine"}
        ]}]})
        .to_string(),
    )
    .expect("bdevperf config");
    let secs = verify_secs().min(10);
    let (perf, rpc) = start_bdevperf(&spdk, &so, &cfg, "daxperf");
    let (res, jobs) = verify_jobs(&spdk, &perf_py, &rpc.sock, &perf, secs);
    assert_eq!(jobs.len(), 1, "{res}");
    println!("bdevperf verify {secs} s over cache_path: {}", jobs[0]);
    assert_job_clean(&jobs[0], &res);
    let s = &rpc.ok(&["bdev_pcache_get_stats"])[0];
    println!(
        "cache_path stats: usage {}\nerrors {}\nhost {}",
        s["usage"], s["errors"], s["host"]
    );
    assert_wrote_back_cleanly(s);
    // Verify reads back what it wrote: hits on the mapped cache are served inline, by the
    // job's own thread (on the engine's core), which copies them out of the mapping.
    assert!(
        s["requests"]["inline_reads"].as_u64() > Some(0),
        "no read served inline from the mapping: {}",
        s["requests"]
    );
    assert!(
        s["host"]["requests_served_by_submitter"].as_u64() > Some(0),
        "no read hit copied out of the mapping by its submitter: {}",
        s["host"]
    );
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&cfg);
}

/// Starts spdk_tgt on the JSON config `cfg` (written to `dir/<tag>.json`); it answers RPCs
/// only once the whole config has run (`bdev_wait_for_examine` included).
fn start_target_json<'a>(
    spdk: &'a Spdk,
    so: &Path,
    tag: &str,
    dir: &Path,
    cfg: &Value,
) -> (Proc, Rpc<'a>) {
    let path = dir.join(format!("{tag}.json"));
    std::fs::write(&path, cfg.to_string()).expect("config file");
    start_target_with(
        spdk,
        so,
        tag,
        &["--json".into(), path.display().to_string()],
    )
}

/// A JSON config whose bdev subsystem runs `methods` (`{"method", "params"}` each), then
/// `bdev_wait_for_examine`.
fn bdev_config(methods: &[Value]) -> Value {
    let mut config = methods.to_vec();
    config.push(json!({"method": "bdev_wait_for_examine"}));
    json!({"subsystems": [{"subsystem": "bdev", "config": config}]})
}

/// Shuts the target down through `spdk_kill_instance SIGTERM`: it must exit 0 without a
/// panic. Returns its log.
fn stop_target(tgt: Proc, rpc: &Rpc) -> String {
    stop_app(tgt, rpc, 30)
}

/// Stops an SPDK app (spdk_tgt or bdevperf) by RPC: it must exit cleanly within `secs`
/// without a panic. Returns its log.
fn stop_app(mut app: Proc, rpc: &Rpc, secs: u64) -> String {
    rpc.ok(&["spdk_kill_instance", "SIGTERM"]);
    let st = app
        .wait_for(Duration::from_secs(secs))
        .unwrap_or_else(|| panic!("the app did not exit on SIGTERM:\n{}", app.log()));
    let log = app.log();
    assert!(st.success(), "exit {st}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    log
}

/// Waits up to `secs` for bdev `name`; returns its `bdev_get_bdevs` entry.
fn wait_bdev(rpc: &Rpc, name: &str, secs: u64) -> Value {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let o = rpc.py(&["bdev_get_bdevs", "-b", name]);
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            return v[0].clone();
        }
        assert!(
            Instant::now() < end,
            "bdev '{name}' did not appear in {secs} s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `bdev_pcache_create` params in a saved config.
fn saved_creates(cfg: &Value) -> Vec<Value> {
    cfg["subsystems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["subsystem"] == "bdev")
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .filter(|m| m["method"] == "bdev_pcache_create")
        .map(|m| m["params"].clone())
        .collect()
}

/// Autoload by examine: a pcache bdev created on aio bdevs (fixed UUIDs), written through
/// NVMe/TCP, comes back by itself, under its name and with its data, when the target
/// restarts with a config that creates only the two base bdevs: cache bdev first (the
/// cache waits for its backing bdev), then backing bdev first (attached at once). A create
/// matching the examined bdev adopts it; a reattach under another name stores the new name,
/// which the next restart uses.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn examine_autoload_after_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(dd) = spdk.dd.clone() else {
        println!("SKIPPED: spdk_dd not found (needed to write through NVMe/TCP)");
        return;
    };
    let dir = scratch_dir("autoload");
    let (cache_img, back_img) = (dir.join("cache.img"), dir.join("backing.img"));
    for p in [&cache_img, &back_img] {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image file");
    }
    let (cache_s, back_s) = (
        cache_img.display().to_string(),
        back_img.display().to_string(),
    );
    const CACHE_UUID: &str = "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0101";
    const BACK_UUID: &str = "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0102";
    // A cache bdev of 4 KiB blocks: examine probes those too (the restart tests use 512).
    let cache_bdev = json!({"method": "bdev_aio_create", "params": {
        "filename": cache_s, "name": "Cache0", "block_size": 4096, "uuid": CACHE_UUID}});
    let back_bdev = json!({"method": "bdev_aio_create", "params": {
        "filename": back_s, "name": "Back0", "block_size": 4096, "uuid": BACK_UUID}});
    let data = pattern(4 << 20, 0xa070_10ad);
    let pattern_file = dir.join("pattern.bin");
    std::fs::write(&pattern_file, &data).expect("pattern file");
    let port = free_port().to_string();
    let initiator = initiator_config(&dir, &port);
    let out = dir.join("readback.bin");
    // Exports `name` and reads the pattern's length back through it.
    let read_back = |rpc: &Rpc, name: &str, phase: &str| {
        nvmf_export(rpc, name, &port);
        let back = dd_read(
            &spdk,
            &dd,
            &initiator,
            &out,
            data.len(),
            &dir.join(format!("dd-read-{phase}.log")),
        );
        assert!(
            back == data,
            "{phase}: data read back through {name} differs"
        );
    };
    // An examined pcache bdev: reattached (not formatted) by examine, bases claimed.
    let check_examined = |rpc: &Rpc, name: &str, phase: &str| {
        let b = wait_bdev(rpc, name, 10);
        let info = &b["driver_specific"]["pcache"];
        assert_eq!(info["attached_by"], "examine", "{phase}: {info}");
        assert_eq!(info["cache"]["formatted"], false, "{phase}: {info}");
        assert_eq!(info["cache_bdev"], "Cache0", "{phase}: {info}");
        assert_eq!(info["backing_bdev"], "Back0", "{phase}: {info}");
        assert_eq!(info["options"]["segment_size_mib"], 2, "{phase}: {info}");
        assert_eq!(info["options"]["stripe_size_kib"], 256, "{phase}: {info}");
        for base in ["Cache0", "Back0"] {
            assert!(rpc.claimed(base), "{phase}: {base} claimed");
        }
        let st = rpc.ok(&["bdev_pcache_get_stats"]);
        assert_eq!(st.as_array().map(Vec::len), Some(1), "{phase}: {st}");
        assert_eq!(st[0]["state"], "running", "{phase}: {st}");
    };

    // ---- phase 1: create by RPC, write the pattern through NVMe/TCP ----
    let (tgt, rpc) = start_target(&spdk, &so, "auto1");
    rpc.ok(&[
        "bdev_aio_create",
        &cache_s,
        "Cache0",
        "4096",
        "-u",
        CACHE_UUID,
    ]);
    rpc.ok(&["bdev_aio_create", &back_s, "Back0", "4096", "-u", BACK_UUID]);
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PCa",
            "-c",
            "Cache0",
            "-d",
            "Back0",
            "--segment-size-mib",
            "2",
            "--stripe-size-kib",
            "256",
        ]),
        json!("PCa")
    );
    assert_eq!(
        rpc.ok(&["bdev_get_bdevs", "-b", "PCa"])[0]["driver_specific"]["pcache"]["attached_by"],
        "rpc"
    );
    nvmf_export(&rpc, "PCa", &port);
    dd_write(
        &spdk,
        &dd,
        &initiator,
        &pattern_file,
        &dir.join("dd-write.log"),
    );
    let log = stop_target(tgt, &rpc);
    assert!(
        log.contains("PCa: storing the bdev name in the cache superblock (it held none)"),
        "{log}"
    );

    // ---- phase 2: only the base bdevs, cache bdev first: it waits for its backing ----
    let cfg = bdev_config(&[cache_bdev.clone(), back_bdev.clone()]);
    let (tgt, rpc) = start_target_json(&spdk, &so, "auto2", &dir, &cfg);
    check_examined(&rpc, "PCa", "cache first");
    read_back(&rpc, "PCa", "cache-first");
    let log = stop_target(tgt, &rpc);
    assert!(
        log.contains(
            "examine: bdev 'Cache0' holds pcache 'PCa'; waiting for its backing bdev 'Back0'"
        ),
        "{log}"
    );
    assert!(
        !log.contains("storing the bdev name"),
        "the name was already stored: {log}"
    );

    // ---- phase 3: backing bdev first: attached as soon as the cache bdev is examined ----
    let cfg = bdev_config(&[back_bdev.clone(), cache_bdev.clone()]);
    let (tgt, rpc) = start_target_json(&spdk, &so, "auto3", &dir, &cfg);
    check_examined(&rpc, "PCa", "backing first");
    // save_config writes it with defer: true.
    let creates = saved_creates(&rpc.ok(&["save_config"]));
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert_eq!(creates[0]["name"], "PCa");
    assert_eq!(creates[0]["defer"], true, "{creates:?}");
    // A create for the examined bdev (a saved config loading after examine) adopts it.
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PCa",
            "-c",
            "Cache0",
            "-d",
            "Back0",
            "--wb-high-pct",
            "30",
            "--wb-low-pct",
            "10",
            "--defer",
        ]),
        json!("PCa")
    );
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PCa"])[0]["driver_specific"]["pcache"];
    assert_eq!(info["attached_by"], "rpc", "{info}");
    assert_eq!(info["options"]["wb_high_pct"], 30, "{info}");
    // Adopted once: another create is an error again.
    rpc.err(
        &[
            "bdev_pcache_create",
            "-b",
            "PCa",
            "-c",
            "Cache0",
            "-d",
            "Back0",
        ],
        "already exists",
    );
    // Reattached under another name: the new name is stored.
    assert_eq!(
        rpc.ok(&["bdev_pcache_delete", "PCa", "--no-drain"]),
        json!(true)
    );
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PCb",
            "-c",
            "Cache0",
            "-d",
            "Back0"
        ]),
        json!("PCb")
    );
    let log = stop_target(tgt, &rpc);
    assert!(
        log.contains("PCb: storing the bdev name in the cache superblock (it held 'PCa')"),
        "{log}"
    );

    // ---- phase 4: the next start attaches it under the new name, data intact ----
    let cfg = bdev_config(&[cache_bdev, back_bdev]);
    let (tgt, rpc) = start_target_json(&spdk, &so, "auto4", &dir, &cfg);
    check_examined(&rpc, "PCb", "renamed");
    rpc.err(&["bdev_get_bdevs", "-b", "PCa"], "");
    read_back(&rpc, "PCb", "renamed");
    finish_target(tgt, &rpc, "phase 4", &dir);
}

/// `bdev_pcache_create` with `defer`: before its base bdevs exist it answers `true` and the
/// request is listed as waiting; bad parameters are still errors; a pending request can be
/// deleted; creating the bases attaches it. `save_config` writes every pcache bdev (and
/// every pending request) with `defer: true`, and `load_config` of that config into a fresh
/// target works even with the creates moved before the base bdevs.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn deferred_create_and_load_config() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let dir = scratch_dir("defer");
    let (tgt, rpc) = start_target(&spdk, &so, "defer");

    let create = [
        "bdev_pcache_create",
        "-b",
        "PCd",
        "-c",
        "CacheD",
        "-d",
        "BackD",
    ];
    // Without defer a missing base is still an error.
    rpc.err(&create, "does not exist");
    let mut deferred = create.to_vec();
    deferred.extend(["--shards", "2", "--segment-size-mib", "4", "--defer"]);
    assert_eq!(rpc.ok(&deferred), json!(true));
    let st = rpc.ok(&["bdev_pcache_get_stats"]);
    assert_eq!(st.as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st[0]["name"], "PCd", "{st}");
    assert_eq!(st[0]["state"], "waiting for CacheD, BackD", "{st}");
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats", "-b", "PCd"])[0]["state"],
        "waiting for CacheD, BackD"
    );
    // Every other bad parameter is still an error.
    let mut bad = deferred.clone();
    bad[2] = "PCx";
    bad.extend(["--gc-percent", "0"]);
    rpc.err(&bad, "gc_percent");
    rpc.err(&deferred, "already exists");
    rpc.err(
        &[
            "bdev_pcache_create",
            "-b",
            "PCy",
            "-c",
            "CacheD",
            "-d",
            "OtherD",
            "--defer",
        ],
        "in use",
    );
    rpc.err(
        &["bdev_pcache_set_options", "PCd", "--gc-percent", "50"],
        "not attached yet",
    );
    rpc.err(&["bdev_pcache_flush_start", "PCd"], "not attached yet");
    // A pending request is deleted like a bdev.
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PCz",
            "-c",
            "CacheZ",
            "-d",
            "BackZ",
            "--defer"
        ]),
        json!(true)
    );
    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PCz"]), json!(true));
    rpc.err(&["bdev_pcache_get_stats", "-b", "PCz"], "no pcache bdev");
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats"]).as_array().map(Vec::len),
        Some(1)
    );
    // Pending requests are saved.
    let creates = saved_creates(&rpc.ok(&["save_config"]));
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert_eq!(creates[0]["name"], "PCd");
    assert_eq!(creates[0]["defer"], true);
    assert_eq!(creates[0]["shards"], 2);

    // The bases appear: the backing first (still waiting), then the cache.
    rpc.ok(&["bdev_malloc_create", "-b", "BackD", "64", "4096"]);
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats", "-b", "PCd"])[0]["state"],
        "waiting for CacheD"
    );
    rpc.ok(&["bdev_malloc_create", "-b", "CacheD", "64", "512"]);
    let b = wait_bdev(&rpc, "PCd", 10);
    let info = &b["driver_specific"]["pcache"];
    assert_eq!(info["attached_by"], "rpc", "{info}");
    assert_eq!(info["cache"]["formatted"], true, "{info}");
    assert_eq!(info["options"]["shards"], 2, "{info}");
    let st = rpc.ok(&["bdev_pcache_get_stats", "-b", "PCd"]);
    assert_eq!(st[0]["state"], "running", "{st}");
    // A second pending request, left waiting: saved too.
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PCw",
            "-c",
            "CacheW",
            "-d",
            "BackD2",
            "--defer"
        ]),
        json!(true)
    );
    rpc.ok(&["bdev_malloc_create", "-b", "BackD2", "32", "512"]);
    let saved = rpc.ok(&["save_config"]);
    let creates = saved_creates(&saved);
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert!(creates.iter().all(|c| c["defer"] == true), "{creates:?}");
    stop_target(tgt, &rpc);

    // load_config into a fresh target, the pcache creates moved before every base bdev.
    let mut bdev = saved["subsystems"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["subsystem"] == "bdev")
        .cloned()
        .expect("bdev subsystem in save_config");
    if let Some(cfg) = bdev["config"].as_array_mut() {
        cfg.sort_by_key(|m| m["method"] != "bdev_pcache_create");
    }
    let path = dir.join("saved-bdev.json");
    std::fs::write(&path, json!({"subsystems": [bdev]}).to_string()).expect("config");
    let (tgt, rpc) = start_target(&spdk, &so, "defer2");
    let path_s = path.display().to_string();
    rpc.ok(&["load_config", "-j", &path_s]);
    let b = wait_bdev(&rpc, "PCd", 10);
    let info = &b["driver_specific"]["pcache"];
    assert_eq!(info["cache_bdev"], "CacheD", "{info}");
    assert_eq!(info["options"]["shards"], 2, "{info}");
    let st = rpc.ok(&["bdev_pcache_get_stats"]);
    let names: Vec<(&str, &str)> = st
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default(),
                s["state"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("PCd", "running"), ("PCw", "waiting for CacheW")],
        "{st}"
    );
    finish_target(tgt, &rpc, "load_config", &dir);
}

/// bdevperf loads a config holding only a deferred `bdev_pcache_create` (its bases do not
/// exist yet); the bases are then created by RPC, the pcache bdev appears, and
/// `-w verify` runs over it without a failed I/O.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn deferred_create_does_io() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let cfg = std::env::temp_dir().join(format!("pcache-it-deferio-{}.json", std::process::id()));
    std::fs::write(
        &cfg,
        bdev_config(&[json!({"method": "bdev_pcache_create", "params": {
            "name": "PC0", "cache_bdev": "PcCache0", "backing_bdev": "PcBacking0",
            "segment_size_mib": 2, "stripe_size_kib": 256, "defer": true}})])
        .to_string(),
    )
    .expect("bdevperf config");
    let (perf, rpc) = start_bdevperf_until(&spdk, &so, &cfg, "deferio", "");
    let st = rpc.ok(&["bdev_pcache_get_stats"]);
    assert_eq!(st[0]["state"], "waiting for PcCache0, PcBacking0", "{st}");
    rpc.ok(&["bdev_malloc_create", "-b", "PcCache0", "32", "512"]);
    rpc.ok(&["bdev_malloc_create", "-b", "PcBacking0", "128", "4096"]);
    wait_bdev(&rpc, "PC0", 10);
    let (res, jobs) = verify_jobs(&spdk, &perf_py, &rpc.sock, &perf, 3);
    assert_eq!(jobs.len(), 1, "only PC0 (its bases are claimed): {res}");
    println!(
        "bdevperf verify 3 s over a deferred pcache bdev: {}",
        jobs[0]
    );
    assert_job_clean(&jobs[0], &res);
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_file(&cfg);
}

/// Runs bdevperf `-w verify` (QD32, 4 KiB) for `secs` in the background; `during` runs
/// meanwhile (fault injection by RPC). Returns the jobs once `perform_tests` answered, and
/// fails the test if it did not within `secs` + 120 s or if any buffer mismatched.
fn verify_with_faults(
    spdk: &Spdk,
    perf_py: &Path,
    rpc: &Rpc,
    perf: &Proc,
    secs: u64,
    during: impl FnOnce(),
) -> Vec<Value> {
    verify_sized_with_faults(spdk, perf_py, rpc, perf, "4096", secs, during)
}

/// [`verify_with_faults`] with requests of `io_size` bytes.
fn verify_sized_with_faults(
    spdk: &Spdk,
    perf_py: &Path,
    rpc: &Rpc,
    perf: &Proc,
    io_size: &str,
    secs: u64,
    during: impl FnOnce(),
) -> Vec<Value> {
    let t = secs.to_string();
    let args = ["-w", "verify", "-q", "32", "-o", io_size, "-t", t.as_str()];
    let child = perform_tests(spdk, perf_py, &rpc.sock, secs + 120, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bdevperf.py");
    during();
    let out = child.wait_with_output().expect("bdevperf.py");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let log = perf.log();
    assert!(
        !log.contains("Buffer mismatch"),
        "data mismatch under faults:\n{log}"
    );
    assert!(
        out.status.success(),
        "perform_tests did not return a result: {text}{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    res["results"].as_array().cloned().unwrap_or_default()
}

/// Issue 18: pcache over `bdev_error` wrappers of its cache and backing bdevs, bdevperf
/// `-w verify -f` over a cache a quarter of the working set, data CRCs on: (a) 20 failed
/// backing writes, (b) 20 failed cache reads, (c) 5 failed cache writes, (d) every backing
/// write failing for 10 s, (e) 50 corrupted cache reads, then resets during writeback.
/// Each phase: `perform_tests` returns, no buffer mismatch, writes flow again afterwards
/// (the next phase's verify writes), and the stats name what failed. Finally a flush ends
/// clean without any operator action in between.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn device_faults_never_hang_pcache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let dir = scratch_dir("faults");
    let cfg = dir.join("faults.json");
    std::fs::write(&cfg, faulty_pcache_config("F", true).to_string()).expect("write config");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "faults", "PC0", &["-m", "0x1", "-f"]);
    let stats = |rpc: &Rpc| rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0].clone();
    let inject = |rpc: &Rpc, bdev: &str, io: &str, kind: &str, n: &str| {
        rpc.ok(&["bdev_error_inject_error", bdev, io, kind, "-n", n]);
    };
    let total = |s: &Value, k: &str| s["engine"]["total"][k].as_u64().unwrap_or(0);
    let mut phases = Vec::new();
    // (a) 20 failed backing writes (writeback's copies and flushes).
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 8, || {
        std::thread::sleep(Duration::from_secs(2));
        inject(&rpc, "EE_FBack", "write", "failure", "20");
    });
    let s = stats(&rpc);
    phases.push(("20 failed backing writes", jobs, s.clone()));
    assert!(
        total(&s, "wb_backing_write_errors") > 0,
        "{}",
        s["engine"]["total"]
    );
    assert_eq!(
        total(&s, "wb_cache_read_errors"),
        0,
        "{}",
        s["engine"]["total"]
    );
    // (b) 20 failed cache reads (request reads and writeback's source reads).
    let before = total(&s, "wb_sectors");
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 8, || {
        std::thread::sleep(Duration::from_secs(2));
        inject(&rpc, "EE_FCache", "read", "failure", "20");
    });
    let s = stats(&rpc);
    assert!(
        total(&s, "wb_sectors") > before,
        "writeback resumed by itself"
    );
    phases.push(("20 failed cache reads", jobs, s));
    // (c) 5 failed cache writes: retried, the log stays open.
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 8, || {
        std::thread::sleep(Duration::from_secs(2));
        inject(&rpc, "EE_FCache", "write", "failure", "5");
    });
    let s = stats(&rpc);
    assert!(
        total(&s, "cache_write_errors") > 0,
        "{}",
        s["engine"]["total"]
    );
    assert_eq!(s["writeback"]["log_failed"], false, "{s}");
    phases.push(("5 failed cache writes", jobs, s));
    // (d) every backing write fails for 10 s, then the device recovers.
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 20, || {
        std::thread::sleep(Duration::from_secs(2));
        inject(&rpc, "EE_FBack", "write", "failure", "100000000");
        std::thread::sleep(Duration::from_secs(5));
        let mid = stats(&rpc);
        assert_eq!(
            mid["writeback"]["state"], "retrying",
            "{}",
            mid["writeback"]
        );
        std::thread::sleep(Duration::from_secs(5));
        rpc.ok(&["bdev_error_inject_error", "EE_FBack", "clear", "failure"]);
    });
    let s = stats(&rpc);
    phases.push(("every backing write failing for 10 s", jobs, s));
    // (e) 50 corrupted cache reads: caught by the data CRC, never served or written back.
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 8, || {
        std::thread::sleep(Duration::from_secs(2));
        rpc.ok(&[
            "bdev_error_inject_error",
            "EE_FCache",
            "read",
            "corrupt_data",
            "-n",
            "50",
            "-o",
            "100",
            "-v",
            "255",
        ]);
    });
    let s = stats(&rpc);
    assert!(
        total(&s, "crc_errors") + total(&s, "wb_crc_errors") > 0,
        "{}",
        s["engine"]["total"]
    );
    phases.push(("50 corrupted cache reads", jobs, s));
    for (what, jobs, s) in &phases {
        for job in jobs {
            println!("{what}: {job}");
            assert!(
                job["iops"].as_f64() > Some(100.0),
                "{what}: writes flow: {job}"
            );
        }
        println!(
            "{what}: errors {} writeback {}",
            s["errors"], s["writeback"]
        );
    }
    // Resets while writeback runs.
    let (res, jobs) = run_jobs(&spdk, &perf_py, &rpc.sock, &perf, "reset", 11);
    for job in &jobs {
        println!("reset 11 s: {job}");
        assert_eq!(job["status"], "finished", "{res}");
    }
    // No operator step was needed; a flush now ends clean.
    wait_clean(&rpc, "PC0");
    let s = stats(&rpc);
    assert_eq!(s["writeback"]["state"], "ok", "{}", s["writeback"]);
    println!("final: {}", s["engine"]["total"]);
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_dir_all(&dir);
}

/// PC0 over `bdev_error` wrappers (`EE_{p}Cache`, `EE_{p}Back`) of a malloc cache and
/// backing: 32 MiB of cache (2 MiB segments) in front of 128 MiB, so verify covers all of
/// it. No sequential cut-off: verify writes sequentially into a full cache, and the
/// default cut-off would send those writes around, past the cache faults the tests inject.
fn faulty_pcache_config(p: &str, data_crc: bool) -> Value {
    bdev_config(&[
        json!({"method": "bdev_malloc_create",
               "params": {"name": format!("{p}Cache"), "num_blocks": 65536, "block_size": 512}}),
        json!({"method": "bdev_malloc_create",
               "params": {"name": format!("{p}Back"), "num_blocks": 32768, "block_size": 4096}}),
        json!({"method": "bdev_error_create", "params": {"base_name": format!("{p}Cache")}}),
        json!({"method": "bdev_error_create", "params": {"base_name": format!("{p}Back")}}),
        json!({"method": "bdev_pcache_create",
               "params": {"name": "PC0", "cache_bdev": format!("EE_{p}Cache"),
                          "backing_bdev": format!("EE_{p}Back"), "segment_size_mib": 2,
                          "stripe_size_kib": 256, "data_crc": data_crc,
                          "seq_cutoff_policy": "never"}}),
    ])
}

/// Writeback over a cache bdev without data CRCs reads runs of log-adjacent copies at once
/// (`host.device_copies_joined`) and writes each to the backing bdev from that one buffer.
/// Under bdevperf `-w verify -f`, failed cache reads (a run's read fails all its copies)
/// and failed backing writes (one copy of a run fails alone) lose no data, writeback
/// resumes by itself, and a flush then ends clean.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn writeback_runs_under_faults() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let dir = scratch_dir("runs");
    let cfg = dir.join("runs.json");
    std::fs::write(&cfg, faulty_pcache_config("R", false).to_string()).expect("write config");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "runs", "PC0", &["-m", "0x1", "-f"]);
    let stats = |rpc: &Rpc| rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0].clone();
    let total = |s: &Value, k: &str| s["engine"]["total"][k].as_u64().unwrap_or(0);
    let joined = |s: &Value| s["host"]["device_copies_joined"].as_u64().unwrap_or(0);
    let fail = |rpc: &Rpc, bdev: &str, io: &str, n: &str| {
        rpc.ok(&["bdev_error_inject_error", bdev, io, "failure", "-n", n]);
    };
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 6, || {});
    let s = stats(&rpc);
    for job in &jobs {
        println!("no faults: {job}");
    }
    assert!(
        joined(&s) > 0,
        "no writeback copies were joined: {}",
        s["host"]
    );
    let (wb0, joined0) = (total(&s, "wb_sectors"), joined(&s));
    // Failed cache reads: requests' and runs' alike (enough that some are runs').
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 8, || {
        std::thread::sleep(Duration::from_secs(2));
        fail(&rpc, "EE_RCache", "read", "3000");
    });
    let s = stats(&rpc);
    for job in &jobs {
        println!("3000 failed cache reads: {job}");
    }
    println!("after cache read faults: {}", s["engine"]["total"]);
    assert!(
        total(&s, "wb_cache_read_errors") > 0,
        "{}",
        s["engine"]["total"]
    );
    assert!(total(&s, "wb_sectors") > wb0, "writeback resumed by itself");
    assert!(joined(&s) > joined0, "runs resumed: {}", s["host"]);
    // Failed backing writes: single copies of a run.
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 8, || {
        std::thread::sleep(Duration::from_secs(2));
        fail(&rpc, "EE_RBack", "write", "20");
    });
    let s = stats(&rpc);
    for job in &jobs {
        println!("20 failed backing writes: {job}");
    }
    assert!(
        total(&s, "wb_backing_write_errors") > 0,
        "{}",
        s["engine"]["total"]
    );
    wait_clean(&rpc, "PC0");
    let s = stats(&rpc);
    assert_eq!(s["writeback"]["state"], "ok", "{}", s["writeback"]);
    println!("final: {} host {}", s["engine"]["total"], s["host"]);
    // The cache, clean again, serves a last verify without a failed I/O.
    let jobs = verify_with_faults(&spdk, &perf_py, &rpc, &perf, 4, || {});
    for job in &jobs {
        assert_job_clean(job, &json!(jobs));
    }
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Live option switches and device faults drawn at random, together, under bdevperf
/// `-w verify -f` on two cores (when the machine has two) with 12 KiB requests (some
/// straddle a stripe, so two shards serve them): PC0 over `bdev_error` wrappers of a malloc cache and backing (two shards,
/// data CRC), PC1 over a mapped cache file with a wrapped backing. Every 50-600 ms one of:
/// a mode switch, a cut-off and write-admission change, new gc/watermark/writeback pacing, injected failures
/// (reads, writes, flushes, unmaps; corrupted cache reads), a flush. Checks: every RPC is
/// answered without error, `perform_tests` returns, no buffer mismatches; then, with the
/// faults cleared and write-back back on, a flush ends clean without operator action,
/// writeback is ok, the log is open, and a last verify fails nothing.
/// `PCACHE_CHAOS_SEED` and `PCACHE_CHAOS_SECS` (default 1 and 15) vary the run.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn random_switches_and_faults_under_verify() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let seed = env_u64("PCACHE_CHAOS_SEED").unwrap_or(1);
    let secs = env_u64("PCACHE_CHAOS_SECS").unwrap_or(15).max(1);
    println!("seed {seed} (PCACHE_CHAOS_SEED), {secs} s (PCACHE_CHAOS_SECS)");
    let dir = scratch_dir("chaos");
    let cfg = dir.join("chaos.json");
    let img = format!("/dev/shm/pcache-it-chaos-{}.img", std::process::id());
    let _ = std::fs::remove_file(&img);
    let config = bdev_config(&[
        json!({"method": "bdev_malloc_create",
               "params": {"name": "XCache", "num_blocks": 65536, "block_size": 512}}),
        json!({"method": "bdev_malloc_create",
               "params": {"name": "XBack", "num_blocks": 32768, "block_size": 4096}}),
        json!({"method": "bdev_malloc_create",
               "params": {"name": "YBack", "num_blocks": 262144, "block_size": 512}}),
        json!({"method": "bdev_error_create", "params": {"base_name": "XCache"}}),
        json!({"method": "bdev_error_create", "params": {"base_name": "XBack"}}),
        json!({"method": "bdev_error_create", "params": {"base_name": "YBack"}}),
        json!({"method": "bdev_pcache_create",
               "params": {"name": "PC0", "cache_bdev": "EE_XCache", "backing_bdev": "EE_XBack",
                          "segment_size_mib": 2, "stripe_size_kib": 256, "data_crc": true,
                          "shards": 2}}),
        json!({"method": "bdev_pcache_create",
               "params": {"name": "PC1", "cache_path": img, "cache_size_mib": 32,
                          "backing_bdev": "EE_YBack", "segment_size_mib": 1}}),
    ]);
    std::fs::write(&cfg, config.to_string()).expect("write config");
    let mut cores = two_cores().to_vec();
    cores.push("-f");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "chaos", "PC1", &cores);
    let mut rng = pcache::media::sim::Rng::new(seed);
    let pick = |items: &[&'static str], rng: &mut pcache::media::sim::Rng| {
        items[rng.below(items.len() as u64) as usize]
    };
    let mut actions: Vec<Value> = Vec::new();
    let modes = [
        "write_back",
        "write_through",
        "write_around",
        "pass_through",
    ];
    let end = Instant::now() + Duration::from_secs(secs);
    let jobs = verify_sized_with_faults(&spdk, &perf_py, &rpc, &perf, "12288", secs, || {
        std::thread::sleep(Duration::from_millis(500));
        while Instant::now() < end {
            let bdev = pick(&["PC0", "PC1"], &mut rng);
            let (method, params) = match rng.below(10) {
                0..=2 => (
                    "bdev_pcache_set_options",
                    json!({"name": bdev, "mode": pick(&modes, &mut rng)}),
                ),
                3 => (
                    "bdev_pcache_set_options",
                    json!({"name": bdev,
                           "seq_cutoff_policy": pick(&["always", "full", "never"], &mut rng),
                           "seq_cutoff_bytes": 4096u64 << rng.below(9),
                           "write_admission": pick(&["always", "second_touch"], &mut rng)}),
                ),
                4 => {
                    let high = 1 + rng.below(100);
                    (
                        "bdev_pcache_set_options",
                        json!({"name": bdev, "gc_percent": 1 + rng.below(90),
                               "wb_high_pct": high, "wb_low_pct": rng.below(high + 1),
                               "wb_max_inflight": 1u64 << rng.below(9),
                               "wb_group_ksets": 1u64 << rng.below(8)}),
                    )
                }
                5..=7 => {
                    let dev = pick(&["EE_XCache", "EE_XBack", "EE_YBack"], &mut rng);
                    let io = if dev == "EE_XCache" {
                        pick(&["read", "write"], &mut rng)
                    } else {
                        pick(&["read", "write", "flush", "unmap"], &mut rng)
                    };
                    let num = [1u64, 3, 10, 50][rng.below(4) as usize];
                    let mut p = json!({"name": dev, "io_type": io, "error_type": "failure",
                                       "num": num});
                    if dev == "EE_XCache" && io == "read" && rng.chance(40) {
                        p["error_type"] = json!("corrupt_data");
                        p["corrupt_offset"] = json!(rng.below(4000));
                        p["corrupt_value"] = json!(1 + rng.below(255));
                    }
                    ("bdev_error_inject_error", p)
                }
                8 => ("bdev_pcache_flush_start", json!({"name": bdev})),
                _ => ("bdev_pcache_get_stats", json!({"name": bdev})),
            };
            let reply = rpc.raw(method, Some(params.clone()));
            assert!(
                reply.get("error").is_none(),
                "{method} {params} (seed {seed}, after {actions:?}): {reply}"
            );
            actions.push(json!([method, params]));
            std::thread::sleep(Duration::from_millis(50 + rng.below(550)));
        }
    });
    println!("{} actions:", actions.len());
    for a in &actions {
        println!("  {a}");
    }
    for bdev in ["PC0", "PC1"] {
        assert!(
            jobs.iter().any(|j| j["job"] == bdev),
            "{bdev} ran: {jobs:?}"
        );
    }
    for job in &jobs {
        println!("verify {secs} s under switches and faults: {job}");
        assert!(job["iops"].as_f64() > Some(100.0), "I/O flowed: {job}");
    }
    for dev in ["EE_XCache", "EE_XBack", "EE_YBack"] {
        rpc.ok(&["bdev_error_inject_error", dev, "clear", "failure"]);
    }
    for bdev in ["PC0", "PC1"] {
        rpc.ok(&["bdev_pcache_set_options", bdev, "--mode", "write_back"]);
        wait_clean(&rpc, bdev);
        let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", bdev])[0];
        println!(
            "{bdev}: errors {} writeback {}",
            s["errors"], s["writeback"]
        );
        assert_eq!(s["writeback"]["state"], "ok", "{bdev}: {}", s["writeback"]);
        assert_eq!(
            s["writeback"]["log_failed"], false,
            "{bdev}: {}",
            s["writeback"]
        );
    }
    let (res, jobs) = run_jobs_sized(&spdk, &perf_py, &rpc.sock, &perf, "verify", 12288, 3);
    for job in &jobs {
        println!("verify 3 s after the faults: {job}");
        assert_job_clean(job, &res);
    }
    stop_app(perf, &rpc, 30);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 15: a backing bdev re-created after a crash the usual way, without its UUID. A
/// pcache over aio files (the backing behind a delay bdev whose 30 s writes keep the data
/// dirty) takes a pattern over NVMe/TCP and is SIGKILLed. The restart's config re-creates
/// the bases without `uuid` for the backing: examine explains once and attaches nothing;
/// `bdev_pcache_create` is refused with what the cache holds, the recorded UUID and the
/// call that re-creates the bdev with it, and never advises wiping; another file of the
/// same size is refused too (accepting it would write this cache's data over it); with
/// `--backing-uuid-mismatch accept` the cache attaches with its dirty data, the pattern
/// reads back, `save_config` does not echo the option, and a plain create then matches.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn backing_uuid_changed_after_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(dd) = spdk.dd.clone() else {
        println!("SKIPPED: spdk_dd not found (needed to write through NVMe/TCP)");
        return;
    };
    let dir = scratch_dir("uuid");
    let (cache_img, back_img, other_img) = (
        dir.join("cache.img"),
        dir.join("backing.img"),
        dir.join("other.img"),
    );
    for p in [&cache_img, &back_img, &other_img] {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image file");
    }
    let (cache_s, back_s, other_s) = (
        cache_img.display().to_string(),
        back_img.display().to_string(),
        other_img.display().to_string(),
    );
    const CACHE_UUID: &str = "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0201";
    const BACK_UUID: &str = "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0202";
    const SLOW_UUID: &str = "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0203";
    let data = pattern(4 << 20, 0x5eed_0015);
    let pattern_file = dir.join("pattern.bin");
    std::fs::write(&pattern_file, &data).expect("pattern file");
    let port = free_port().to_string();
    let initiator = initiator_config(&dir, &port);

    // ---- phase 1: write through NVMe/TCP (writeback cannot land), then SIGKILL ----
    let (mut tgt, rpc) = start_target(&spdk, &so, "uuid1");
    rpc.ok(&[
        "bdev_aio_create",
        &cache_s,
        "Cache0",
        "512",
        "-u",
        CACHE_UUID,
    ]);
    rpc.ok(&["bdev_aio_create", &back_s, "Back0", "4096", "-u", BACK_UUID]);
    rpc.ok(&[
        "bdev_delay_create",
        "-b",
        "Back0",
        "-d",
        "Slow0",
        "-r",
        "0",
        "-t",
        "0",
        "-w",
        "30000000",
        "-n",
        "30000000",
        "-u",
        SLOW_UUID,
    ]);
    let create = [
        "bdev_pcache_create",
        "-b",
        "PC0",
        "-c",
        "Cache0",
        "-d",
        "Slow0",
        "--segment-size-mib",
        "2",
        "--stripe-size-kib",
        "256",
    ];
    assert_eq!(rpc.ok(&create), json!("PC0"));
    nvmf_export(&rpc, "PC0", &port);
    dd_write(
        &spdk,
        &dd,
        &initiator,
        &pattern_file,
        &dir.join("dd-write.log"),
    );
    let st = rpc.ok(&["bdev_pcache_flush_status", "PC0"]);
    assert!(
        st["dirty_bytes"].as_u64() >= Some(data.len() as u64),
        "the pattern should be dirty in the cache: {st}"
    );
    tgt.child.kill().expect("SIGKILL spdk_tgt");
    let _ = tgt.child.wait();
    drop(tgt);

    // ---- phase 2: the bases re-created without the backing's UUIDs ----
    let cfg = bdev_config(&[
        json!({"method": "bdev_aio_create", "params": {
            "filename": cache_s, "name": "Cache0", "block_size": 512, "uuid": CACHE_UUID}}),
        json!({"method": "bdev_aio_create", "params": {
            "filename": back_s, "name": "Back0", "block_size": 4096}}),
        json!({"method": "bdev_delay_create", "params": {
            "base_bdev_name": "Back0", "name": "Slow0", "avg_read_latency": 0,
            "p99_read_latency": 0, "avg_write_latency": 0, "p99_write_latency": 0}}),
    ]);
    let (tgt, rpc) = start_target_json(&spdk, &so, "uuid2", &dir, &cfg);
    // Examine explained it once and attached nothing.
    let log = tgt.log();
    assert_eq!(
        log.matches(
            "examine: pcache 'PC0': Cache bdev 'Cache0' holds a pcache of backing bdev 'Slow0'"
        )
        .count(),
        1,
        "{log}"
    );
    assert!(log.contains("Examine does not attach it"), "{log}");
    assert!(!rpc.py(&["bdev_get_bdevs", "-b", "PC0"]).status.success());
    let unclaimed = |rpc: &Rpc, what: &str| {
        for b in ["Cache0", "Slow0"] {
            assert!(!rpc.claimed(b), "{what}: {b} must stay unclaimed");
        }
    };
    unclaimed(&rpc, "after examine");

    // A plain create is refused, and says what the cache holds and the safe ways forward.
    let o = rpc.py(&[
        "bdev_pcache_create",
        "-b",
        "PC0",
        "-c",
        "Cache0",
        "-d",
        "Slow0",
    ]);
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{msg}");
    println!("refusal: {msg}");
    for want in [
        "holds a pcache of backing bdev 'Slow0'",
        &format!("uuid {SLOW_UUID}"),
        "has another UUID",
        "bytes of acknowledged writes not yet written back",
        &format!(
            "`bdev_delay_create -b <its base bdev> -d Slow0 -r 0 -t 0 -w 0 -n 0 -u {SLOW_UUID}`"
        ),
        "`bdev_pcache_create -b PC0 -c Cache0 -d Slow0 --backing-uuid-mismatch accept`",
        "Never accept another device",
    ] {
        assert!(msg.contains(want), "missing {want:?} in: {msg}");
    }
    assert!(!msg.to_lowercase().contains("wipe"), "{msg}");
    unclaimed(&rpc, "after the refusal");

    // Another file of the same size: refused the same way (accepting it would write the
    // cache's data over it; the message says so).
    rpc.ok(&["bdev_aio_create", &other_s, "Other0", "4096"]);
    let other = [
        "bdev_pcache_create",
        "-b",
        "PC9",
        "-c",
        "Cache0",
        "-d",
        "Other0",
    ];
    rpc.err(&other, "has another UUID and another name");
    rpc.err(&other, "write these writes back over its data");
    assert!(!rpc.claimed("Other0"));

    // Accepted after checking it is the same device: attached with the dirty data.
    let accept = [
        "bdev_pcache_create",
        "-b",
        "PC0",
        "-c",
        "Cache0",
        "-d",
        "Slow0",
        "--backing-uuid-mismatch",
        "accept",
    ];
    assert_eq!(rpc.ok(&accept), json!("PC0"));
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "{info}");
    assert!(
        info["cache"]["dirty_bytes_at_open"].as_u64() >= Some(data.len() as u64),
        "{info}"
    );
    nvmf_export(&rpc, "PC0", &port);
    let back = dd_read(
        &spdk,
        &dd,
        &initiator,
        &dir.join("readback.bin"),
        data.len(),
        &dir.join("dd-read.log"),
    );
    assert!(back == data, "data read back after accepting differs");
    // save_config does not accept again at the next start.
    let creates = saved_creates(&rpc.ok(&["save_config"]));
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert!(
        creates[0].get("backing_uuid_mismatch").is_none(),
        "{creates:?}"
    );
    // The new identity is recorded: a plain create now matches.
    rpc.ok(&["nvmf_delete_subsystem", NQN]);
    assert_eq!(
        rpc.ok(&["bdev_pcache_delete", "PC0", "--no-drain"]),
        json!(true)
    );
    assert_eq!(
        rpc.ok(&[
            "bdev_pcache_create",
            "-b",
            "PC0",
            "-c",
            "Cache0",
            "-d",
            "Slow0"
        ]),
        json!("PC0")
    );
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "{info}");
    let log = tgt.log();
    assert!(log.contains("PC0: recording backing bdev 'Slow0'"), "{log}");
    finish_target(tgt, &rpc, "uuid", &dir);
}

/// The NVMe-oF subsystem the backing target exports its bdev on (see
/// [`nvme_backing_verify_kill_restart`]).
const BACKING_NQN: &str = "nqn.2016-06.io.spdk:pcache-it-backing";

/// `bdev_pcache_get_stats` / `bdev_get_bdevs` fields for a backing bdev whose FLUSH does or
/// does not reach its volatile write cache.
fn assert_backing_flush(v: &Value, honoured: bool) {
    assert_eq!(v["backing_write_cache"], true, "{v}");
    assert_eq!(v["backing_flush_honoured"], honoured, "{v}");
    if honoured {
        assert_eq!(v["backing_flush"], "honoured", "{v}");
        assert!(v.get("backing_flush_warning").is_none(), "{v}");
    } else {
        assert_eq!(
            v["backing_flush"], "ignored (bdev_nvme enable_flush is false)",
            "{v}"
        );
        assert!(
            v["backing_flush_warning"]
                .as_str()
                .is_some_and(|w| w.contains("bdev_nvme_set_options --enable-flush")),
            "{v}"
        );
    }
}

/// NVMe as the backing device: a second spdk_tgt (the "storage" target, core 1) exports an
/// aio bdev behind a delay bdev over NVMe/TCP on 127.0.0.1; pcache's backing bdev is its
/// namespace, `Nvme0n1` from `bdev_nvme_attach_controller`, with a 16 MiB aio cache.
///
/// 1. bdevperf (core 0) hosts PC0 first. With bdev_nvme's default `enable_flush: false`,
///    the namespace (NVMe-oF always advertises a volatile write cache) completes FLUSH
///    without sending it: the create logs a warning naming the fix, and bdev_get_bdevs /
///    get_stats show it.
/// 2. `-w verify` over the whole 64 MiB through PC0: writeback and GC run over NVMe/TCP,
///    nothing fails.
/// 3. A pcache spdk_tgt (core 0) whose config only attaches the two bases gets PC0 back by
///    examine and exports it over NVMe/TCP. The storage target's write latency goes to 30 s
///    (writeback cannot land), spdk_dd writes a 4 MiB pattern through PC0, and the pcache
///    target is SIGKILLed.
/// 4. It restarts from its saved config with `bdev_nvme_set_options enable_flush: true`
///    (the fix): FLUSH is honoured, the cache is reattached with the dirty pattern,
///    spdk_dd reads it back identical; a flush writes it back, the draining delete leaves it
///    in the storage target's file.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn nvme_backing_verify_kill_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let Some(dd) = spdk.dd.clone() else {
        println!("SKIPPED: spdk_dd not found (needed to write through NVMe/TCP)");
        return;
    };
    let dir = scratch_dir("nvmeback");
    let back_img = dir.join("backing.img");
    let cache_img = dir.join("cache.img");
    for (p, mib) in [(&back_img, 64u64), (&cache_img, 16)] {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(mib << 20))
            .expect("image file");
    }
    let (back_s, cache_s) = (
        back_img.display().to_string(),
        cache_img.display().to_string(),
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let (core_p, core_s) = if cores > 1 {
        ("0x1", "0x2")
    } else {
        ("0x1", "0x1")
    };
    let mask = |m: &str| vec!["-m".to_string(), m.to_string()];

    // ---- the storage target: aio file -> delay bdev (0 latency for now) -> NVMe/TCP ----
    let (storage, srpc) = start_target_with(&spdk, &so, "nvmestore", &mask(core_s));
    srpc.ok(&[
        "bdev_aio_create",
        &back_s,
        "Back0",
        "4096",
        "-u",
        "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0a02",
    ]);
    srpc.ok(&[
        "bdev_delay_create",
        "-b",
        "Back0",
        "-d",
        "Slow0",
        "-r",
        "0",
        "-t",
        "0",
        "-w",
        "0",
        "-n",
        "0",
        "-u",
        "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0a03",
    ]);
    let sport = free_port().to_string();
    nvmf_export_as(&srpc, BACKING_NQN, "Slow0", &sport);

    // ---- 1 and 2: bdevperf hosts pcache: Nvme0n1 (over TCP) as backing, an aio file as
    // cache. (Not bdevperf over NVMe/TCP to a pcache target: three busy-polling apps on two
    // cores slowed verify tenfold.)
    let attach = json!({"method": "bdev_nvme_attach_controller", "params": {
        "name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
        "trsvcid": sport, "subnqn": BACKING_NQN}});
    let aio_cache = json!({"method": "bdev_aio_create", "params": {
        "name": "Cache0", "filename": cache_s, "block_size": 512,
        "uuid": "6b1f4c1e-0d2a-4c55-9a57-3e2f1c0a0a01"}});
    let create = json!({"method": "bdev_pcache_create", "params": {
        "name": "PC0", "cache_bdev": "Cache0", "backing_bdev": "Nvme0n1",
        "segment_size_mib": 2, "stripe_size_kib": 256}});
    let perf_cfg = dir.join("bdevperf.json");
    std::fs::write(
        &perf_cfg,
        bdev_config(&[attach.clone(), aio_cache.clone(), create]).to_string(),
    )
    .expect("bdevperf config");
    let (perf, prpc) =
        start_bdevperf_with(&spdk, &so, &perf_cfg, "nvmeperf", "PC0", &["-m", core_p]);
    let nvme = &prpc.ok(&["bdev_get_bdevs", "-b", "Nvme0n1"])[0];
    assert_eq!(
        nvme["product_name"], "NVMe disk",
        "the backing bdev is SPDK's NVMe bdev: {nvme}"
    );
    // 1. enable_flush is false (bdev_nvme's default): FLUSH never reaches the namespace.
    let info = &prpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["driver_specific"]["pcache"];
    assert_backing_flush(info, false);
    assert_backing_flush(&prpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0], false);
    assert!(
        perf.log().contains("bdev_nvme_set_options --enable-flush"),
        "no warning at create:\n{}",
        perf.log()
    );
    // 2. verify through PC0, writeback and GC over NVMe/TCP.
    let secs = verify_secs();
    let (res, jobs) = verify_jobs(&spdk, &perf_py, &prpc.sock, &perf, secs);
    assert_eq!(jobs.len(), 1, "{res}");
    for job in &jobs {
        println!("bdevperf verify {secs} s through PC0 over NVMe/TCP: {job}");
        assert_job_clean(job, &res);
    }
    let s = &prpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0];
    println!(
        "PC0 after verify: usage {}\nwriteback {}\nengine totals {}",
        s["usage"], s["writeback"], s["engine"]["total"]
    );
    assert_eq!(s["failed_ops"], 0, "{s}");
    assert_wrote_back_cleanly(s);
    stop_app(perf, &prpc, 60);

    // ---- the pcache target, on the same two bases: examine reattaches PC0 ----
    let bases = dir.join("bases.json");
    std::fs::write(&bases, bdev_config(&[attach, aio_cache]).to_string()).expect("config");
    let mut args = mask(core_p);
    args.extend(["--json".into(), bases.display().to_string()]);
    let (mut tgt, rpc) = start_target_with(&spdk, &so, "nvmepc", &args);
    let info = &wait_bdev(&rpc, "PC0", 30)["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "reattached: {info}");
    assert_backing_flush(info, false);
    let pport = free_port().to_string();
    nvmf_export(&rpc, "PC0", &pport);
    let initiator = initiator_config(&dir, &pport);
    wait_clean(&rpc, "PC0");

    // 3. Writeback cannot land for 30 s (an idle cache writes back at once, and spdk_dd
    // may pause for longer than that on a loaded machine); a pattern goes into the (clean)
    // cache; SIGKILL. The writes still waiting in the storage target carry the pattern too.
    for k in ["avg_write", "p99_write"] {
        srpc.ok(&["bdev_delay_update_latency", "Slow0", k, "30000000"]);
    }
    let data = pattern(4 << 20, 0x0a1e_5eed);
    let pattern_file = dir.join("pattern.bin");
    std::fs::write(&pattern_file, &data).expect("pattern file");
    // spdk_dd writes sequentially into a cache full of (clean) data: the default cut-off
    // (policy `full`) would send the stream around the cache, to the held-back backing
    // device. This test wants it all in the cache.
    rpc.ok(&[
        "bdev_pcache_set_options",
        "PC0",
        "--seq-cutoff-policy",
        "never",
    ]);
    dd_write(
        &spdk,
        &dd,
        &initiator,
        &pattern_file,
        &dir.join("dd-write.log"),
    );
    let st = rpc.ok(&["bdev_pcache_flush_status", "PC0"]);
    println!("before the kill: {st}");
    assert!(
        st["dirty_bytes"].as_u64() >= Some(data.len() as u64),
        "the pattern should be dirty in the cache: {st}"
    );
    let saved = rpc.ok(&["save_config"]);
    tgt.child.kill().expect("SIGKILL spdk_tgt");
    let _ = tgt.child.wait();
    drop(tgt);
    for k in ["avg_write", "p99_write"] {
        srpc.ok(&["bdev_delay_update_latency", "Slow0", k, "0"]);
    }

    // 4. Restart with the fix: enable_flush true before the attach.
    let mut cfg = saved.clone();
    let mut set_options = 0;
    for sub in cfg["subsystems"].as_array_mut().into_iter().flatten() {
        for m in sub["config"].as_array_mut().into_iter().flatten() {
            if m["method"] == "bdev_nvme_set_options" {
                set_options += 1;
                assert_eq!(m["params"]["enable_flush"], false, "{m}");
                m["params"]["enable_flush"] = json!(true);
            }
        }
    }
    assert_eq!(set_options, 1, "save_config: {saved}");
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("saved config");
    let mut args = mask(core_p);
    args.extend(["--json".into(), cfg_path.display().to_string()]);
    let (tgt, rpc) = start_target_with(&spdk, &so, "nvmepc2", &args);
    let b = wait_bdev(&rpc, "PC0", 30);
    let info = &b["driver_specific"]["pcache"];
    assert_eq!(info["cache"]["formatted"], false, "reattached: {info}");
    assert!(
        info["cache"]["dirty_bytes_at_open"].as_u64() >= Some(data.len() as u64),
        "the log replay found the dirty pattern: {info}"
    );
    assert_backing_flush(info, true);
    assert!(
        !tgt.log().contains("--enable-flush"),
        "a warning although enable_flush is set:\n{}",
        tgt.log()
    );
    let back = dd_read(
        &spdk,
        &dd,
        &initiator,
        &dir.join("readback.bin"),
        data.len(),
        &dir.join("dd-read.log"),
    );
    assert!(
        back == data,
        "data read back after the crash differs from what was written"
    );
    wait_clean(&rpc, "PC0");
    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PC0"]), json!(true));
    assert!(
        read_prefix(&back_img, data.len()) == data,
        "after writeback the storage target's file holds the pattern"
    );
    println!("pcache target log (restart):\n{}", stop_target(tgt, &rpc));
    println!("storage target log:\n{}", stop_target(storage, &srpc));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bdev_pcache_flush_start`, then waits up to 60 s for `name` to be clean.
fn wait_clean(rpc: &Rpc, name: &str) {
    assert_eq!(rpc.ok(&["bdev_pcache_flush_start", name]), json!(true));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = rpc.ok(&["bdev_pcache_flush_status", name]);
        if st["clean"] == true {
            break;
        }
        assert_eq!(st["writeback_failed"], false, "{st}");
        assert!(Instant::now() < end, "writeback did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cache modes switched live under bdevperf `-w verify` (two cores, a cache smaller than
/// the working set; for a few seconds a sequential cut-off at 64 KiB that applies always):
/// every switch keeps every acknowledged write, verify fails nothing, each path is taken;
/// then sequential writes past the cut-off bypass the cache, FLUSH requests reach the
/// backing bdev, and `save_config` echoes the mode, cut-off and write admission in
/// effect, which a create naming none of them finds again on the cache bdev.
#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn mode_switches_under_verify() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let Some(perf_py) = bdevperf_py(&spdk) else {
        return;
    };
    let dir = scratch_dir("modes");
    let cfg = dir.join("modes.json");
    let config = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create",
         "params": {"name": "MdCache", "num_blocks": 131072, "block_size": 512}},
        {"method": "bdev_malloc_create",
         "params": {"name": "MdBacking", "num_blocks": 65536, "block_size": 4096}},
        {"method": "bdev_pcache_create",
         "params": {"name": "PC0", "cache_bdev": "MdCache", "backing_bdev": "MdBacking",
                    "segment_size_mib": 2, "stripe_size_kib": 256, "mode": "write_through",
                    "seq_cutoff_policy": "never", "seq_cutoff_bytes": 65536}},
        {"method": "bdev_wait_for_examine"}]}]});
    std::fs::write(&cfg, config.to_string()).expect("write config");
    let (perf, rpc) = start_bdevperf_with(&spdk, &so, &cfg, "modes", "PC0", two_cores());
    let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0];
    assert_eq!(s["mode"]["mode"], "write_through", "{}", s["mode"]);
    let secs = 12u64;
    let t = secs.to_string();
    let job = perform_tests(
        &spdk,
        &perf_py,
        &rpc.sock,
        secs + 120,
        &["-w", "verify", "-q", "32", "-o", "4096", "-t", t.as_str()],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("run bdevperf.py");
    // Through every mode and back, a switch a second, under I/O.
    let modes = [
        "write_around",
        "pass_through",
        "write_back",
        "write_through",
        "pass_through",
        "write_around",
        "write_back",
        "write_through",
        "write_around",
    ];
    std::thread::sleep(Duration::from_millis(1500));
    for (i, m) in modes.into_iter().enumerate() {
        let r = rpc.ok(&["bdev_pcache_set_options", "PC0", "--mode", m]);
        assert_eq!(r["mode"], m, "{r}");
        let policy = match i {
            3 => Some("always"),
            6 => Some("never"),
            _ => None,
        };
        if let Some(p) = policy {
            let r = rpc.ok(&["bdev_pcache_set_options", "PC0", "--seq-cutoff-policy", p]);
            assert_eq!(r["seq_cutoff_policy"], p, "{r}");
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    let out = job.wait_with_output().expect("bdevperf.py");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "perform_tests failed: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        perf.log()
    );
    let res: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let jobs = res["results"].as_array().cloned().unwrap_or_default();
    assert!(!jobs.is_empty(), "{res}");
    for job in &jobs {
        println!("bdevperf verify {secs} s with mode switches: {job}");
        assert_job_clean(job, &res);
    }
    let s = &rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0];
    println!(
        "mode {}\nrequests {}\nerrors {}",
        s["mode"], s["requests"], s["errors"]
    );
    let m = &s["mode"];
    assert_eq!(m["mode"], "write_around", "{m}");
    for k in ["write_around_requests", "write_through_requests"] {
        assert!(m[k].as_u64() > Some(0), "{k}: {m}");
    }
    for k in [
        "io_errors",
        "crc_errors",
        "wb_errors",
        "device_errors",
        "requests_failed",
        "backing_write_errors",
    ] {
        assert_eq!(s["errors"][k], 0, "{k}: {s}");
    }
    // FLUSH requests after writes that went around the cache flush the backing bdev
    // (completing asynchronously through the engine) and fail nothing.
    // Sequential writes past the cut-off (policy always) bypass the cache.
    let flushes = m["backing_flushes_for_requests"].as_u64().unwrap_or(0);
    rpc.ok(&[
        "bdev_pcache_set_options",
        "PC0",
        "--seq-cutoff-policy",
        "always",
    ]);
    let (res, jobs) = run_jobs(&spdk, &perf_py, &rpc.sock, &perf, "write", 2);
    for job in &jobs {
        assert_job_clean(job, &res);
    }
    let m = rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["mode"].clone();
    assert!(
        m["seq_cutoff_bypassed_requests"].as_u64() > Some(0),
        "no sequential write bypassed the cache: {m}"
    );
    rpc.ok(&[
        "bdev_pcache_set_options",
        "PC0",
        "--seq-cutoff-policy",
        "never",
    ]);
    let (res, jobs) = run_jobs(&spdk, &perf_py, &rpc.sock, &perf, "flush", 2);
    for job in &jobs {
        println!("bdevperf flush 2 s after write-around writes: {job}");
        assert_eq!(job["io_failed"], 0, "{res}");
    }
    let m = rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["mode"].clone();
    assert!(
        m["backing_flushes_for_requests"].as_u64() > Some(flushes),
        "no FLUSH reached the backing bdev: {m}"
    );
    // Write admission: with second_touch a write-back cache that evicts (random writes
    // over 4x its size make it) sends writes of ranges it does not hold to the backing
    // bdev; verify reads back what went either way.
    let r = rpc.ok(&[
        "bdev_pcache_set_options",
        "PC0",
        "--mode",
        "write_back",
        "--write-admission",
        "second_touch",
    ]);
    assert_eq!(r["write_admission"], "second_touch", "{r}");
    for (workload, secs) in [("randwrite", 4), ("verify", 3)] {
        let (res, jobs) = run_jobs(&spdk, &perf_py, &rpc.sock, &perf, workload, secs);
        for job in &jobs {
            println!("bdevperf {workload} {secs} s with second_touch: {job}");
            assert_job_clean(job, &res);
        }
    }
    let m = rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["mode"].clone();
    assert_eq!(m["write_admission"], "second_touch", "{m}");
    assert!(
        m["write_declined_requests"].as_u64() > Some(0),
        "no cold write went around the cache: {m}"
    );
    // save_config echoes the mode, cut-off and write admission in effect.
    rpc.ok(&[
        "bdev_pcache_set_options",
        "PC0",
        "--mode",
        "pass_through",
        "--seq-cutoff-bytes",
        "131072",
    ]);
    let saved = saved_creates(&rpc.ok(&["save_config"]));
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0]["mode"], "pass_through", "{}", saved[0]);
    let info = &rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["driver_specific"]["pcache"];
    assert_eq!(
        info["mode"], "pass_through",
        "bdev_get_bdevs shows the mode: {info}"
    );
    assert_eq!(saved[0]["seq_cutoff_bytes"], 131072, "{}", saved[0]);
    assert_eq!(saved[0]["seq_cutoff_policy"], "never", "{}", saved[0]);
    assert_eq!(saved[0]["write_admission"], "second_touch", "{}", saved[0]);
    rpc.err(
        &[
            "bdev_pcache_set_options",
            "PC0",
            "--seq-cutoff-bytes",
            "1000",
        ],
        "multiple of 4096",
    );
    // Leaving write-back for pass-through writes everything back by itself.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = rpc.ok(&["bdev_pcache_flush_status", "PC0"]);
        if st["dirty_bytes"] == 0 {
            break;
        }
        assert!(Instant::now() < end, "not written back: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The mode, cut-off and write admission are stored on the cache bdev: a create that
    // names none of them reopens the cache with them.
    rpc.ok(&["bdev_pcache_delete", "PC0"]);
    rpc.ok(&[
        "bdev_pcache_create",
        "-b",
        "PC0",
        "-c",
        "MdCache",
        "-d",
        "MdBacking",
    ]);
    let m = rpc.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0]["mode"].clone();
    assert_eq!(
        (&m["mode"], &m["seq_cutoff_bytes"], &m["write_admission"]),
        (
            &json!("pass_through"),
            &json!(131072),
            &json!("second_touch")
        ),
        "reopened: {m}"
    );
    let saved = saved_creates(&rpc.ok(&["save_config"]));
    assert_eq!(saved[0]["write_admission"], "second_touch", "{}", saved[0]);
    assert_eq!(saved[0]["seq_cutoff_policy"], "never", "{}", saved[0]);
    stop_app(perf, &rpc, 30);
}
