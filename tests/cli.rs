//! The `pcache` binary as a user meets it: help, version, usage errors, `bench --json`, and
//! format + inspect + check on a temporary file.

use std::path::PathBuf;
use std::process::{Command, Output};

const SUBCOMMANDS: &[&str] = &[
    "bench",
    "inspect",
    "check",
    "format",
    "index-mem",
    "engine-cost",
    "core-latency",
];

fn pcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(args)
        .output()
        .expect("run pcache")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `--json` command's output, parsed.
fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out.stdout)))
}

fn temp_image(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pcache-cli-{tag}-{}.img", std::process::id()))
}

#[test]
fn top_level_help_lists_every_subcommand() {
    let out = pcache(&["--help"]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(s.contains("Usage: pcache"), "{s}");
    for sub in SUBCOMMANDS {
        assert!(s.contains(sub), "{sub} missing from --help:\n{s}");
    }
}

#[test]
fn every_subcommand_has_help() {
    for sub in SUBCOMMANDS {
        for flag in ["--help", "-h"] {
            let out = pcache(&[sub, flag]);
            let s = text(&out.stdout);
            assert!(out.status.success(), "pcache {sub} {flag}: {out:?}");
            assert!(
                s.contains(&format!("Usage: pcache {sub}")),
                "pcache {sub} {flag}:\n{s}"
            );
        }
    }
    // The options the scripts and the README use are documented.
    let s = text(&pcache(&["bench", "--help"]).stdout);
    for flag in [
        "--ops",
        "--qd",
        "--engine-only",
        "--sustained",
        "--cache-mib",
        "--working-set-mib",
        "--json",
    ] {
        assert!(s.contains(flag), "bench --help lacks {flag}:\n{s}");
    }
    let s = text(&pcache(&["core-latency", "--help"]).stdout);
    assert!(s.contains("--rounds"), "{s}");
}

#[test]
fn version() {
    let out = pcache(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("pcache {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2_with_a_usage_line() {
    for args in [
        &["bench", "--opps", "5"][..],
        &["bench", "--ops", "many"],
        &["bench", "--qd", "0"],
        &["bench", "--sustained", "--engine-only"],
        &["bench", "--backing-latency-us", "5"],
        &["bench", "--working-set-mib", "900", "--cache-mib", "64"],
        &["inspect"],
        &["inspect", "a.img", "b.img"],
        &["format", "x.img"],
        &["core-latency", "--rounds"],
        &["nosuchcommand"],
        &[],
    ] {
        let out = pcache(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "pcache {args:?}: {err}");
        assert!(err.contains("Usage: pcache"), "pcache {args:?}: {err}");
    }
    let err = text(&pcache(&["bench", "--opps", "5"]).stderr);
    assert!(err.contains("--opps"), "{err}");
}

#[test]
fn bench_json_is_one_object_with_the_figures() {
    let out = pcache(&[
        "bench",
        "--json",
        "--ops",
        "2000",
        "--cache-mib",
        "64",
        "--backing-mib",
        "128",
        "--working-set-mib",
        "16",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["mode"], "io");
    assert_eq!(v["config"]["ops"], 2000);
    assert_eq!(v["config"]["qd"], 32);
    for phase in ["randwrite", "randread"] {
        for k in [
            "ops", "secs", "iops", "mib_s", "p50_us", "p99_us", "p999_us",
        ] {
            assert!(v[phase][k].is_number(), "{phase}.{k} in {v}");
        }
        assert!(v[phase]["iops"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    }
    assert!(v["replay"]["extents"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(
        v["index_dram"]["random_bytes_per_extent"].is_number(),
        "{v}"
    );
    assert!(v["engine"]["keys_written"].is_number(), "{v}");

    let out = pcache(&[
        "bench",
        "--json",
        "--sustained",
        "--ops",
        "1000",
        "--cache-mib",
        "16",
        "--backing-latency-us",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["mode"], "sustained");
    assert!(v["sustained"]["iops"].is_number(), "{v}");
    assert!(v["backing_alone"]["iops"].is_number(), "{v}");
    assert!(v["sustained_ratio"].is_number(), "{v}");
    assert!(v["writeback"]["mib_s"].is_number(), "{v}");
    assert_eq!(v["engine"]["clean"], true, "{v}");
}

#[test]
fn format_inspect_check_on_a_temp_file() {
    let img = temp_image("fic");
    let p = img.to_str().expect("utf-8 temp path");
    let _ = std::fs::remove_file(&img);
    let out = pcache(&["format", p, "--backing-mib", "256", "--cache-mib", "64"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("64 MiB cache"));

    let out = pcache(&["inspect", p]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("format version   3"), "{s}");
    assert!(s.contains("cache blocks     512 bytes"), "{s}");

    let out = pcache(&["check", p]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("clean"));

    // Zero the superblock replicas' first bytes: check reports it and exits 1.
    let mut bytes = std::fs::read(&img).expect("read image");
    for b in bytes.iter_mut().take(64) {
        *b ^= 0xff;
    }
    std::fs::write(&img, &bytes).expect("write image");
    let out = pcache(&["check", p]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("problem"));
    let _ = std::fs::remove_file(&img);

    let out = pcache(&["check", "/nonexistent/pcache.img"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot open"));
}

/// `format --block-size 4096`: a cache for a device of 4 KiB blocks (inspect shows it,
/// check finds it clean); a block size that is no power of two from 512 to 4096 is refused.
#[test]
fn format_for_4k_blocks() {
    let img = temp_image("f4k");
    let p = img.to_str().expect("utf-8 temp path");
    let _ = std::fs::remove_file(&img);
    let out = pcache(&["format", p, "--backing-mib", "64", "--block-size", "4096"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&pcache(&["inspect", p]).stdout);
    assert!(s.contains("cache blocks     4096 bytes"), "{s}");
    let out = pcache(&["check", p]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    for bad in ["3000", "8192", "256"] {
        let out = pcache(&["format", p, "--backing-mib", "64", "--block-size", bad]);
        assert!(!out.status.success(), "--block-size {bad} accepted");
        assert!(
            text(&out.stderr).contains("block size"),
            "{}",
            text(&out.stderr)
        );
    }
    let _ = std::fs::remove_file(&img);
}

/// What the issue budgets and a user sizing a cache checks: the index's DRAM stays within
/// 64 bytes per cached 4 KiB extent wherever the count falls between two powers of two
/// (the hints table doubles): just past a doubling, between, and just before the next.
#[test]
fn index_dram_stays_within_64_bytes_per_extent() {
    for n in ["131073", "196608", "262144"] {
        for order in [None, Some("--random")] {
            let mut args = vec!["index-mem", "--json", "--extents", n];
            args.extend(order);
            let out = pcache(&args);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let v = json(&out);
            let bytes = v["bytes_per_extent"].as_f64().unwrap_or(f64::MAX);
            assert!(
                bytes <= 64.0,
                "{n} extents {order:?}: {bytes:.1} bytes of DRAM per extent"
            );
        }
    }
}
