//! What the SPDK-driven tests (tests/spdk_integration.rs, tests/vm.rs) share: finding the
//! SPDK build, building libpcache.so with feature `spdk` once per test binary, and child
//! processes that are killed on every exit path.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The number environment variable `name` holds, if it is set to one (the tests' knobs:
/// durations, seeds).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A `/proc/meminfo` field's number (kB, or a count; `key` with its colon).
pub fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Where hugetlbfs is mounted (`/proc/mounts`).
pub fn hugetlbfs_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"hugetlbfs")).then(|| f[1].to_string())
        })
        .collect()
}

/// A build error starting with this is an environment gap, reported as a skip.
pub const SKIP_PREFIX: &str = "SKIP:";

pub struct Spdk {
    pub dir: PathBuf,
    pub lib_dir: PathBuf,
    pub tgt: PathBuf,
    pub bdevperf: PathBuf,
    pub rpc_py: PathBuf,
    /// spdk_dd, when built (the restart test needs it).
    pub dd: Option<PathBuf>,
    /// examples/bdev/bdevperf/bdevperf.py of the source tree, when present.
    pub bdevperf_py: Option<PathBuf>,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn first_existing(c: &[PathBuf]) -> Option<PathBuf> {
    c.iter().find(|p| p.exists()).cloned()
}

pub fn find_spdk() -> Result<Spdk, String> {
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
    let mut dd = vec![dir.join("bin/spdk_dd"), dir.join("build/bin/spdk_dd")];
    dd.extend(src.iter().map(|s| s.join("build/bin/spdk_dd")));
    let dd = first_existing(&dd);
    let bdevperf_py = rpc_py
        .parent()
        .and_then(Path::parent)
        .map(|s| s.join("examples/bdev/bdevperf/bdevperf.py"))
        .filter(|p| p.exists());
    Ok(Spdk {
        dir,
        lib_dir,
        tgt,
        bdevperf,
        rpc_py,
        dd,
        bdevperf_py,
    })
}

/// Build the module once per test binary; returns the path of libpcache.so.
pub fn build_module(spdk: &Spdk) -> Result<PathBuf, String> {
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

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Wait up to `t` for exit; None on timeout.
    pub fn wait_for(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
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
