//! A real Linux guest on a pcache bdev over vhost-user-blk (issue 14).
//!
//! Each test starts spdk_tgt with the module preloaded (built by the test, like
//! tests/spdk_integration.rs) and vhost sockets in a scratch directory (`-S`), over aio
//! files: a 64 MiB cache and a 256 MiB backing file, 2 MiB segments, so writeback and GC
//! run. `scripts/vm` boots a Debian cloud kernel with a busybox initramfs in QEMU on the
//! socket (TCG unless KVM works), runs a guest script and powers off; its console is
//! printed.
//! - `ext4_survives_kill_and_drain`: the guest makes ext4, writes 48 files of random sizes
//!   (about 140 MiB, over twice the cache) and a SHA-256 manifest, syncs, powers off; with
//!   writeback then held back (the backing bdev is behind a delay bdev whose writes now take
//!   30 s), a second boot adds 8 files and rewrites the manifest, so that spdk_tgt is
//!   SIGKILLed with acknowledged writes in the cache only; it restarts from its saved config
//!   (pcache reattaches and replays them); a third guest finds `e2fsck -fn` clean and every
//!   checksum right; after a draining
//!   `bdev_pcache_delete`, a third guest on the backing bdev alone finds the same.
//! - `fstrim_reaches_pcache`: `fstrim` in the guest raises `requests.discards`.
//! - `fio_verify_over_pcache`: fio `--verify=crc32c`, random 4k-128k writes with verifying
//!   reads over the raw disk for `PCACHE_VM_FIO_SECS` (default 60) seconds, while the cache
//!   mode switches live every 3 s (write-through, write-around, pass-through, write-back):
//!   fio finds no error and no request fails.
//!
//! Ignored when the build found no SPDK; skipped (`SKIPPED: <reason>`) when spdk_tgt,
//! rpc.py, libclang, qemu-system-x86_64 or a guest kernel (scripts/vm --prepare: apt) is
//! missing, when fewer than 512 2 MiB hugepages are free, or when `PCACHE_SKIP_VM_TESTS`
//! is set. Tests are serialized; every process is killed on every exit path.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common_spdk;
use common_spdk::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// Everything a VM test needs, or the reason it skips.
fn setup() -> Result<(Spdk, PathBuf), String> {
    if std::env::var_os("PCACHE_SKIP_VM_TESTS").is_some() {
        return Err("PCACHE_SKIP_VM_TESTS is set".into());
    }
    let spdk = find_spdk()?;
    let on_path = |b: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !on_path("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 not found (apt-get install qemu-system-x86)".into());
    }
    // SPDK and the guest (512 MiB of hugetlb memfd) both want 2 MiB hugepages.
    let free = meminfo("HugePages_Free:").unwrap_or(0);
    if meminfo("Hugepagesize:") != Some(2048) || free < 512 {
        return Err(format!(
            "{free} free 2 MiB hugepages, want 512 (spdk_tgt and a 512 MiB guest)"
        ));
    }
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    PREPARED
        .get_or_init(|| {
            let o = Command::new("bash")
                .arg(root().join("scripts/vm"))
                .arg("--prepare")
                .output()
                .map_err(|e| format!("cannot run scripts/vm: {e}"))?;
            if o.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "no guest kernel/initramfs (scripts/vm --prepare failed: {})",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
        })
        .clone()?;
    match build_module(&spdk) {
        Ok(so) => Ok((spdk, so)),
        Err(e) => match e.strip_prefix(SKIP_PREFIX) {
            Some(why) => Err(why.to_string()),
            None => panic!("{e}"),
        },
    }
}

/// One spdk_tgt with its RPC socket, vhost socket directory and scratch directory.
struct Target<'a> {
    spdk: &'a Spdk,
    proc: Proc,
    sock: String,
    dir: PathBuf,
}

impl<'a> Target<'a> {
    /// spdk_tgt (module preloaded) with vhost sockets in `dir`, optionally `--json cfg`.
    fn start(spdk: &'a Spdk, so: &Path, dir: &Path, cfg: Option<&Path>) -> Self {
        let sock = format!("/var/tmp/pcache-vm-{}.sock", std::process::id());
        let _ = std::fs::remove_file(&sock);
        let mut args: Vec<String> = vec![
            "-u".into(),
            "--disable-cpumask-locks".into(),
            "-m".into(),
            "0x1".into(),
            "-r".into(),
            sock.clone(),
            "-S".into(),
            dir.display().to_string(),
        ];
        if let Some(c) = cfg {
            args.extend(["--json".into(), c.display().to_string()]);
        }
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!(
            "spdk_tgt-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&spdk.tgt)
            .args(&args)
            .env("LD_LIBRARY_PATH", &spdk.lib_dir)
            .env("LD_PRELOAD", so)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .expect("start spdk_tgt");
        let mut t = Target {
            spdk,
            proc: Proc { child, log },
            sock,
            dir: dir.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                t.proc.alive(),
                "spdk_tgt exited during start-up:\n{}",
                t.proc.log()
            );
            if Path::new(&t.sock).exists() && t.py(&["spdk_get_version"]).status.success() {
                return t;
            }
            assert!(
                Instant::now() < end,
                "spdk_tgt did not answer RPCs within 60 s:\n{}",
                t.proc.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// rpc.py with the pcache plugin.
    fn py(&self, args: &[&str]) -> Output {
        Command::new("python3")
            .arg(&self.spdk.rpc_py)
            .args(["-s", &self.sock, "-t", "120", "--plugin", "pcache_rpc"])
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
            "rpc.py {args:?} failed: {out}\n{}\nspdk_tgt log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.proc.log()
        );
        serde_json::from_str(out.trim()).unwrap_or(Value::String(out.trim().to_string()))
    }

    fn stats(&self) -> Value {
        self.ok(&["bdev_pcache_get_stats", "-b", "PC0"])[0].clone()
    }

    /// Boots a guest on vhost controller `ctrlr` running `script`; returns its console.
    /// The guest script must succeed.
    fn boot(&self, ctrlr: &str, script: &str, extra: &[&str], secs: u64) -> String {
        let path = self.dir.join("guest.sh");
        std::fs::write(&path, script).expect("guest script");
        let sock = self.dir.join(ctrlr);
        let t0 = Instant::now();
        let o = Command::new("bash")
            .arg(root().join("scripts/vm"))
            .args(["-t", &secs.to_string()])
            .args(extra)
            .arg(&sock)
            .arg(&path)
            .output()
            .expect("run scripts/vm");
        let console = String::from_utf8_lossy(&o.stdout).to_string();
        println!(
            "---- guest on {ctrlr} ({:.1} s) ----\n{console}{}",
            t0.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success(),
            "the guest script failed ({}); spdk_tgt log:\n{}",
            o.status,
            self.proc.log()
        );
        console
    }

    /// Stops the target with `spdk_kill_instance SIGTERM`: it must exit 0 without a panic.
    fn stop(mut self) {
        self.ok(&["spdk_kill_instance", "SIGTERM"]);
        let st = self.proc.wait_for(Duration::from_secs(60));
        let log = self.proc.log();
        assert!(
            st.is_some_and(|s| s.success()),
            "spdk_tgt did not exit cleanly ({st:?}):\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(mut self) {
        self.proc.child.kill().expect("SIGKILL spdk_tgt");
        let _ = self.proc.child.wait();
    }
}

/// A fresh scratch directory, with the cache (64 MiB) and backing (256 MiB) files.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcache-vm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for (name, mib) in [("cache.img", 64), ("backing.img", 256)] {
        std::fs::File::create(dir.join(name))
            .and_then(|f| f.set_len(mib << 20))
            .expect("image file");
    }
    dir
}

/// aio bdevs with fixed UUIDs (restarts reattach), PC0 over them, vhost.0 on PC0.
fn create_pc0(t: &Target) {
    create_pc0_over(t, false);
}

/// [`create_pc0`]; with `slow`, the backing bdev is behind `VmSlow0`, a delay bdev of no
/// latency whose writes a test can hold back (`hold_writeback`).
fn create_pc0_over(t: &Target, slow: bool) {
    let cache = t.dir.join("cache.img").display().to_string();
    let back = t.dir.join("backing.img").display().to_string();
    t.ok(&[
        "bdev_aio_create",
        &cache,
        "VmCache0",
        "512",
        "-u",
        "5c0e7a1d-3b7e-4f0a-9d55-7a6d0c1a0001",
    ]);
    t.ok(&[
        "bdev_aio_create",
        &back,
        "VmBacking0",
        "4096",
        "-u",
        "5c0e7a1d-3b7e-4f0a-9d55-7a6d0c1a0002",
    ]);
    if slow {
        t.ok(&[
            "bdev_delay_create",
            "-b",
            "VmBacking0",
            "-d",
            "VmSlow0",
            "-r",
            "0",
            "-t",
            "0",
            "-w",
            "0",
            "-n",
            "0",
            "-u",
            "5c0e7a1d-3b7e-4f0a-9d55-7a6d0c1a0003",
        ]);
    }
    t.ok(&[
        "bdev_pcache_create",
        "-b",
        "PC0",
        "-c",
        "VmCache0",
        "-d",
        if slow { "VmSlow0" } else { "VmBacking0" },
        "--segment-size-mib",
        "2",
        "--stripe-size-kib",
        "256",
    ]);
    t.ok(&["vhost_create_blk_controller", "vhost.0", "PC0"]);
}

/// Writes to `VmSlow0` take 30 s from now on: what pcache writes back stays in flight, and
/// what the guest writes next stays dirty in the cache only.
fn hold_writeback(t: &Target) {
    for kind in ["p99_write", "avg_write"] {
        t.ok(&["bdev_delay_update_latency", "VmSlow0", kind, "30000000"]);
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn shard_sum(stats: &Value, key: &str) -> u64 {
    stats["engine"]["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s[key].as_u64())
        .sum()
}

macro_rules! vm_setup {
    () => {{
        match setup() {
            Ok(s) => s,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        }
    }};
}

const WRITE_TREE: &str = r#"set -e
mkfs.ext4 -F -q /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/tree/a/b /mnt/tree/c
total=0
i=0
while [ $i -lt 48 ]; do
    case $((i % 3)) in 0) d=/mnt/tree ;; 1) d=/mnt/tree/a/b ;; *) d=/mnt/tree/c ;; esac
    kib=$(( (RANDOM * 32768 + RANDOM) % 6144 + 1 ))
    head -c $((kib * 1024 + RANDOM % 1000)) /dev/urandom > $d/f$i
    total=$((total + kib))
    i=$((i + 1))
done
echo "wrote $i files, $((total / 1024)) MiB"
cd /mnt
find tree -type f | sort | xargs sha256sum > MANIFEST
echo "manifest: $(wc -l < MANIFEST) files"
cd /
sync
umount /mnt
echo WRITE-OK
"#;

/// Eight more files, and the manifest of all 56, once writeback is held: the cache alone
/// holds them when spdk_tgt is killed.
const ADD_TO_TREE: &str = r#"set -e
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/tree/late
i=0
while [ $i -lt 8 ]; do
    head -c $(( (RANDOM % 256 + 1) * 1024 + RANDOM % 1000 )) /dev/urandom > /mnt/tree/late/g$i
    i=$((i + 1))
done
cd /mnt
find tree -type f | sort | xargs sha256sum > MANIFEST
echo "manifest: $(wc -l < MANIFEST) files"
cd /
sync
umount /mnt
echo ADD-OK
"#;

const VERIFY_TREE: &str = r#"set -e
e2fsck -fn /dev/vda
mount -t ext4 -o ro /dev/vda /mnt
cd /mnt
[ "$(wc -l < MANIFEST)" = 56 ]
sha256sum -c MANIFEST > /tmp/sums
grep -c ': OK$' /tmp/sums
cd /
umount /mnt
echo VERIFY-OK
"#;

#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn ext4_survives_kill_and_drain() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (spdk, so) = vm_setup!();
    let dir = scratch("ext4");

    // ---- 1: ext4 and a tree of files over twice the cache, then SIGKILL ----
    let t = Target::start(&spdk, &so, &dir, None);
    create_pc0_over(&t, true);
    let console = t.boot("vhost.0", WRITE_TREE, &[], 300);
    assert!(console.contains("WRITE-OK"), "{console}");
    let s = t.stats();
    println!(
        "after the write: writeback sectors {}, GC segments {}, dirty bytes {}",
        shard_sum(&s, "wb_sectors"),
        shard_sum(&s, "gc_segments"),
        s["engine"]["dirty_bytes"]
    );
    assert!(
        shard_sum(&s, "wb_sectors") > 0 && shard_sum(&s, "gc_segments") > 0,
        "writeback and GC should have run: {s}"
    );
    assert_eq!(shard_sum(&s, "io_errors"), 0, "{s}");
    // Then writeback is held back, and the guest adds files: at the kill, the cache holds
    // acknowledged writes the backing file does not.
    hold_writeback(&t);
    let console = t.boot("vhost.0", ADD_TO_TREE, &[], 300);
    assert!(console.contains("ADD-OK"), "{console}");
    let s = t.stats();
    let dirty = s["engine"]["dirty_bytes"].as_u64().unwrap_or(0);
    println!("at the kill: dirty bytes {dirty}");
    assert!(
        dirty > 0,
        "nothing dirty at the kill: the test would prove little: {s}"
    );
    let saved = t.ok(&["save_config"]);
    t.kill();

    // ---- 2: restart from the saved config; pcache reattaches; the tree is intact ----
    let mut saved = saved;
    for sub in saved["subsystems"].as_array_mut().into_iter().flatten() {
        for m in sub["config"].as_array_mut().into_iter().flatten() {
            if m["method"] == "bdev_delay_create" {
                for k in ["avg_write_latency", "p99_write_latency"] {
                    m["params"][k] = serde_json::json!(0);
                }
            }
        }
    }
    let cfg = dir.join("saved.json");
    std::fs::write(&cfg, saved.to_string()).expect("saved config");
    let t = Target::start(&spdk, &so, &dir, Some(&cfg));
    let b = t.ok(&["bdev_get_bdevs", "-b", "PC0"]);
    assert_eq!(
        b[0]["driver_specific"]["pcache"]["cache"]["formatted"], false,
        "reattached, not reformatted: {b}"
    );
    let info = &b[0]["driver_specific"]["pcache"]["cache"];
    assert!(
        info["dirty_bytes_at_open"].as_u64() >= Some(dirty),
        "the replay found the dirty data: {info}"
    );
    let console = t.boot("vhost.0", VERIFY_TREE, &[], 300);
    assert!(console.contains("VERIFY-OK"), "{console}");

    // ---- 3: drain into the backing bdev, export it alone, check again ----
    t.ok(&["vhost_delete_controller", "vhost.0"]);
    t.ok(&["bdev_pcache_delete", "PC0"]);
    t.ok(&["bdev_delay_delete", "VmSlow0"]);
    t.ok(&["vhost_create_blk_controller", "vhost.1", "VmBacking0"]);
    let console = t.boot("vhost.1", VERIFY_TREE, &[], 300);
    assert!(console.contains("VERIFY-OK"), "{console}");
    t.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn fstrim_reaches_pcache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (spdk, so) = vm_setup!();
    let dir = scratch("trim");
    let t = Target::start(&spdk, &so, &dir, None);
    create_pc0(&t);
    t.boot(
        "vhost.0",
        "set -e\nmkfs.ext4 -F -q -E nodiscard /dev/vda\nmount /dev/vda /mnt\n\
         head -c 16777216 /dev/urandom > /mnt/x\nsync\nrm /mnt/x\nsync\numount /mnt\n",
        &[],
        240,
    );
    let before = t.stats()["requests"]["discards"]
        .as_u64()
        .expect("discards");
    let console = t.boot(
        "vhost.0",
        "set -e\nmount /dev/vda /mnt\nfstrim -v /mnt\numount /mnt\necho TRIM-OK\n",
        &[],
        240,
    );
    assert!(console.contains("TRIM-OK"), "{console}");
    let s = t.stats();
    let after = s["requests"]["discards"].as_u64().expect("discards");
    println!("requests.discards: {before} before fstrim, {after} after");
    assert!(after > before, "fstrim did not reach pcache as UNMAP: {s}");
    t.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    pcache_no_spdk,
    ignore = "no SPDK build found (SPDK_DIR, pkg-config spdk_bdev, /opt/spdk)"
)]
fn fio_verify_over_pcache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (spdk, so) = vm_setup!();
    if Command::new("sh")
        .args(["-c", "command -v fio"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        println!("SKIPPED: fio not found on the host (apt-get install fio)");
        return;
    }
    let secs = env_u64("PCACHE_VM_FIO_SECS").unwrap_or(60);
    let dir = scratch("fio");
    let t = Target::start(&spdk, &so, &dir, None);
    create_pc0(&t);
    let script = format!(
        "set -e\nfio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio \
         --iodepth=8 --rw=randwrite --bsrange=4k-128k --size=160M --time_based \
         --runtime={secs} --verify=crc32c --verify_backlog=32 --verify_fatal=1 \
         --verify_dump=1 > /tmp/fio.out || {{ cat /tmp/fio.out; exit 1; }}\n\
         grep -E 'err=|IOPS=|READ:|WRITE:' /tmp/fio.out\necho FIO-OK\n"
    );
    // The mode switches live every 3 s while fio runs (from 10 s in, after the boot); the
    // guest's verify must not notice.
    let stop = AtomicBool::new(false);
    let (console, switches) = std::thread::scope(|sc| {
        let switcher = sc.spawn(|| {
            let modes = [
                "write_through",
                "write_around",
                "pass_through",
                "write_back",
            ];
            let mut n = 0;
            let mut next = Instant::now() + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    t.ok(&["bdev_pcache_set_options", "PC0", "--mode", modes[n % 4]]);
                    n += 1;
                    next += Duration::from_secs(3);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            n
        });
        // Stops the switcher however the boot ends (a panic too: the scope joins it).
        let _stop = StopOnDrop(&stop);
        let console = t.boot("vhost.0", &script, &["--fio"], secs + 200);
        stop.store(true, Ordering::Relaxed);
        (console, switcher.join().expect("mode switcher"))
    });
    assert!(console.contains("FIO-OK"), "{console}");
    let s = t.stats();
    println!(
        "after fio: {switches} mode switches, writeback sectors {}, GC segments {}, mode {}",
        shard_sum(&s, "wb_sectors"),
        shard_sum(&s, "gc_segments"),
        s["mode"]
    );
    if secs >= 30 {
        // Long enough for a round of all four modes (a shorter PCACHE_VM_FIO_SECS may end
        // before the first switch).
        assert!(
            switches >= 4,
            "fio ran through every mode: {switches} switches"
        );
        for k in ["write_through_requests", "write_around_requests"] {
            assert!(s["mode"][k].as_u64() > Some(0), "{k}: {}", s["mode"]);
        }
    }
    assert_eq!(shard_sum(&s, "io_errors"), 0, "{s}");
    assert_eq!(s["errors"]["requests_failed"], 0, "{s}");
    t.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
