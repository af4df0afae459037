//! End-to-end test of the SPDK shell against a real SPDK (no cargo feature needed to compile).
//!
//! How it gets the module: the test itself runs
//! `cargo build --release --features spdk --lib` (same target directory, `SPDK_DIR` set to the
//! SPDK it found) and uses `target/release/libpcache.so`. So a plain `cargo test` covers it;
//! nothing has to be built beforehand. The first run compiles bindgen (about a minute).
//!
//! Skips (prints `SKIPPED: <reason>` and passes) when SPDK is not found (`SPDK_DIR`,
//! pkg-config `spdk_bdev`, or `/opt/spdk`), when its spdk_tgt / bdevperf / scripts/rpc.py are
//! missing, when bindgen finds no libclang (`apt-get install libclang-dev`), or when
//! `PCACHE_SKIP_SPDK_TESTS` is set. Any other build failure with SPDK present fails the test.
//!
//! What it checks, on a private RPC socket per test (hugepages if >= 1 GiB free, else
//! `--no-huge -s 1024`; core 0 only; the tests are serialized by a lock because spdk_tgt and
//! bdevperf busy-poll and the machine may have 2 cores):
//! - spdk_tgt with the module preloaded; malloc bdevs; `bdev_pcache_create` via rpc.py with
//!   the `pcache_rpc` plugin; `bdev_get_bdevs` shows it (geometry, driver_specific.pcache);
//!   `bdev_pcache_get_stats`; every bad input gets a JSON-RPC error with a message and the
//!   target keeps running; `save_config` holds `bdev_pcache_create` with every option;
//!   delete frees the bases for reuse; hot-remove of a base unregisters the pcache bdev.
//! - bdevperf `--json spdk-config/bdevperf-malloc.json -w verify -t 5` passes over pcache.
//!
//! Every process is killed on every exit path (a Drop guard).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

/// A build error starting with this is an environment gap, reported as a skip.
const SKIP_PREFIX: &str = "SKIP:";

struct Spdk {
    dir: PathBuf,
    lib_dir: PathBuf,
    tgt: PathBuf,
    bdevperf: PathBuf,
    rpc_py: PathBuf,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn first_existing(c: &[PathBuf]) -> Option<PathBuf> {
    c.iter().find(|p| p.exists()).cloned()
}

fn find_spdk() -> Result<Spdk, String> {
    if std::env::var_os("PCACHE_SKIP_SPDK_TESTS").is_some() {
        return Err("PCACHE_SKIP_SPDK_TESTS is set".into());
    }
    let dir = std::env::var_os("SPDK_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let out = Command::new("pkg-config")
                .args(["--variable=prefix", "spdk_bdev"])
                .output()
                .ok()?;
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !s.is_empty()).then(|| PathBuf::from(s))
        })
        .or_else(|| {
            Path::new("/opt/spdk/lib/libspdk_bdev.so")
                .exists()
                .then(|| PathBuf::from("/opt/spdk"))
        })
        .ok_or("SPDK not found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)")?;
    let lib_dir = first_existing(&[dir.join("lib"), dir.join("build/lib")])
        .filter(|l| l.join("libspdk_bdev.so").exists())
        .ok_or(format!("{} has no shared libspdk_bdev.so", dir.display()))?;
    let src: Vec<PathBuf> = std::env::var_os("SPDK_SRC")
        .map(PathBuf::from)
        .into_iter()
        .chain([dir.clone(), "/opt/spdk-src".into()])
        .collect();
    let tgt = first_existing(&[dir.join("bin/spdk_tgt"), dir.join("build/bin/spdk_tgt")])
        .ok_or(format!("no spdk_tgt under {}", dir.display()))?;
    let mut perf = vec![
        dir.join("bin/spdk_bdevperf"),
        dir.join("bin/bdevperf"),
        dir.join("build/examples/bdevperf"),
    ];
    perf.extend(src.iter().map(|s| s.join("build/examples/bdevperf")));
    let bdevperf = first_existing(&perf).ok_or("no bdevperf found")?;
    let rpc_py = first_existing(
        &src.iter()
            .map(|s| s.join("scripts/rpc.py"))
            .collect::<Vec<_>>(),
    )
    .ok_or("no SPDK scripts/rpc.py found (set SPDK_SRC to an SPDK source tree)")?;
    Ok(Spdk {
        dir,
        lib_dir,
        tgt,
        bdevperf,
        rpc_py,
    })
}

/// Build the module once per test binary; returns the path of libpcache.so.
fn build_module(spdk: &Spdk) -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .current_dir(root())
                .args(["build", "--release", "--features", "spdk", "--lib"])
                .env("SPDK_DIR", &spdk.dir)
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("Unable to find libclang") || err.contains("couldn't find any valid shared libraries matching: ['libclang") {
                    return Err(format!("{SKIP_PREFIX}libclang not found (bindgen needs it: apt-get install libclang-dev)"));
                }
                return Err(format!("cargo build --release --features spdk --lib failed:\n{}", String::from_utf8_lossy(&out.stderr)));
            }
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
            let so = target.join("release/libpcache.so");
            let bytes = std::fs::read(&so).map_err(|e| format!("{}: {e}", so.display()))?;
            if !bytes.windows(15).any(|w| w == b"libspdk_bdev.so") {
                return Err(format!("{} was not built with feature spdk (no libspdk_bdev.so dependency)", so.display()));
            }
            Ok(so)
        })
        .clone()
}

fn mem_args() -> Vec<String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .contains(" hugetlbfs ");
    if mounted
        && field("Hugepagesize:") == Some(2048)
        && field("HugePages_Free:").unwrap_or(0) >= 512
    {
        vec![]
    } else {
        vec!["--no-huge".into(), "-s".into(), "1024".into()]
    }
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Wait up to `t` for exit; None on timeout.
    fn wait_for(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            if self.wait_for(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
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

    fn raw_err(&self, method: &str, params: Option<Value>, want: &str) {
        let v = self.raw(method, params.clone());
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            v["error"]["code"].is_i64() && msg.contains(want),
            "{method} {params:?}: want error '{want}', got {v}"
        );
    }
}

fn start_target<'a>(spdk: &'a Spdk, so: &Path, tag: &str) -> (Proc, Rpc<'a>) {
    let sock = format!("/var/tmp/pcache-it-{tag}-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&sock);
    let mut args: Vec<String> = ["-u", "-m", "0x1", "-r", &sock]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(mem_args());
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

fn setup() -> Option<(Spdk, PathBuf)> {
    let spdk = match find_spdk() {
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
    (&["bdev_pcache_delete", "NoSuchPcache"], "no pcache bdev"),
    (&["bdev_pcache_get_stats", "-b", "NoSuchPcache"], "no pcache bdev"),
];

#[test]
fn target_rpc_lifecycle() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let (mut tgt, rpc) = start_target(&spdk, &so, "rpc");

    for (name, mib) in [
        ("Cache0", "128"),
        ("Back0", "64"),
        ("Cache1", "64"),
        ("Back1", "32"),
    ] {
        rpc.ok(&["bdev_malloc_create", "-b", name, mib, "4096"]);
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
        assert_eq!(
            rpc.ok(&["bdev_get_bdevs", "-b", base])[0]["claimed"],
            true,
            "{base} claimed"
        );
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
    assert!(tgt.alive(), "spdk_tgt died on bad input:\n{}", tgt.log());
    assert_eq!(rpc.ok(&["bdev_get_bdevs", "-b", "PC0"])[0]["name"], "PC0");
    assert_eq!(
        rpc.ok(&["bdev_get_bdevs", "-b", "Cache1"])[0]["claimed"],
        false,
        "failed creates released their claims"
    );

    // Second bdev with every option; save_config echoes every option of both.
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
    ]);
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
        "stripe_size_kib": 256, "segment_size_mib": 8, "shards": 2
    })), "{creates:?}");
    assert!(creates
        .iter()
        .any(|p| p["name"] == "PC0" && p["data_crc"] == true && p["stripe_size_kib"] == 64));

    // Delete releases the bases: they can be used again.
    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PC1"]), json!(true));
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
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats"]).as_array().map(Vec::len),
        Some(2)
    );

    // Hot-remove of a base unregisters the pcache bdev on top of it.
    rpc.ok(&["bdev_malloc_delete", "Back1"]);
    let end = Instant::now() + Duration::from_secs(10);
    while rpc.py(&["bdev_get_bdevs", "-b", "PC1"]).status.success() {
        assert!(
            Instant::now() < end,
            "PC1 survived removal of its backing bdev"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        rpc.ok(&["bdev_get_bdevs", "-b", "Cache1"])[0]["claimed"],
        false,
        "hot-remove released the cache bdev"
    );
    assert_eq!(
        rpc.ok(&["bdev_pcache_get_stats"]).as_array().map(Vec::len),
        Some(1)
    );

    assert_eq!(rpc.ok(&["bdev_pcache_delete", "PC0"]), json!(true));
    assert!(tgt.alive(), "spdk_tgt died:\n{}", tgt.log());
    assert_eq!(rpc.ok(&["bdev_pcache_get_stats"]), json!([]));

    // Clean shutdown.
    rpc.ok(&["spdk_kill_instance", "SIGTERM"]);
    let st = tgt
        .wait_for(Duration::from_secs(20))
        .expect("spdk_tgt did not exit on SIGTERM");
    let log = tgt.log();
    assert!(st.success(), "spdk_tgt exit {st}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    println!("spdk_tgt log:\n{log}");
}

#[test]
fn bdevperf_verify_over_pcache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((spdk, so)) = setup() else { return };
    let cfg = root().join("spdk-config/bdevperf-malloc.json");
    let sock = format!("/var/tmp/pcache-it-perf-{}.sock", std::process::id());
    let mut args: Vec<String> = ["-u", "-m", "0x1", "-r", &sock, "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(cfg.display().to_string());
    args.extend(
        ["-q", "32", "-o", "4096", "-w", "verify", "-t", "5"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(mem_args());
    let log = std::env::temp_dir().join(format!("pcache-it-perf-{}.log", std::process::id()));
    let mut perf = spawn(&spdk, &so, &spdk.bdevperf, &args, &log);
    let st = perf
        .wait_for(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("bdevperf hung:\n{}", perf.log()));
    let out = perf.log();
    println!("{out}");
    assert!(st.success(), "bdevperf failed ({st}):\n{out}");
    // Result line: "PC0 : runtime IOPS MiB/s Fail/s TO/s avg min max".
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("PC0") && l.contains(':'))
        .unwrap_or_else(|| panic!("no PC0 result line:\n{out}"));
    let nums: Vec<f64> = line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(nums.len() >= 4, "{line}");
    assert!(nums[1] > 1000.0, "IOPS too low: {line}");
    assert_eq!(nums[3], 0.0, "failed I/O: {line}");
}
