//! Build script.
//!
//! Without the `spdk` feature this does nothing: the engine and media crates need no native
//! code. With `--features spdk` it finds an SPDK built with shared libraries, generates
//! bindings for the headers in `src/spdk/wrapper.h`, and links the SPDK libraries the shell
//! calls *dynamically* (never statically: a second copy of SPDK inside `libpcache.so`
//! would register every RPC twice and the RPC server would refuse to start).
//!
//! SPDK is found, in order, through:
//! 1. `SPDK_DIR`: an install prefix (`include/spdk/`, `lib/libspdk_bdev.so`) or a built
//!    source tree (`include/spdk/`, `build/lib/libspdk_bdev.so`);
//! 2. pkg-config `spdk_bdev` (set `PKG_CONFIG_PATH=<prefix>/lib/pkgconfig`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    spdk_presence();
    // Without the `spdk` feature there is nothing to build: the engine is pure Rust.
    #[cfg(feature = "spdk")]
    spdk::build();
}

/// Sets `cfg(pcache_no_spdk)` when no SPDK build is found the way `scripts/spdk-env.sh`
/// looks (`SPDK_DIR`, else pkg-config `spdk_bdev`, else `/opt/spdk`; the directory must hold
/// `lib/libspdk_bdev.so` or `build/lib/libspdk_bdev.so`). tests/spdk_integration.rs then
/// marks its tests ignored, with the reason, instead of passing them as skipped.
fn spdk_presence() {
    use std::path::{Path, PathBuf};
    println!("cargo::rustc-check-cfg=cfg(pcache_no_spdk)");
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    // Watch the default prefix's library (or the nearest part of its path that exists, so
    // that a missing path does not make every build rerun this script).
    let watch = [
        "/opt/spdk/lib/libspdk_bdev.so",
        "/opt/spdk/lib",
        "/opt/spdk",
        "/opt",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    if let Some(p) = watch {
        println!("cargo:rerun-if-changed={p}");
    }
    let dir = std::env::var_os("SPDK_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let out = std::process::Command::new("pkg-config")
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
        });
    let found = dir.is_some_and(|d| {
        d.join("lib/libspdk_bdev.so").exists() || d.join("build/lib/libspdk_bdev.so").exists()
    });
    if !found {
        println!("cargo:rustc-cfg=pcache_no_spdk");
    }
}

// bindgen is an optional build dependency, present only with the `spdk` feature.
#[cfg(feature = "spdk")]
mod spdk {
    use std::env;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// SPDK libraries the shell calls directly. Each must exist as a shared library.
    const SPDK_LIBS: &[&str] = &[
        "spdk_bdev",
        "spdk_thread",
        "spdk_json",
        "spdk_jsonrpc",
        "spdk_rpc",
        "spdk_log",
        "spdk_util",
        "spdk_env_dpdk",
    ];

    struct Spdk {
        include: PathBuf,
        lib: PathBuf,
        how: String,
    }

    fn fail(msg: &str) -> ! {
        eprintln!("\nerror: pcache feature `spdk`: {msg}\n");
        std::process::exit(1);
    }

    fn from_dir(dir: &Path) -> Result<Spdk, String> {
        let include = dir.join("include");
        if !include.join("spdk/bdev_module.h").is_file() {
            return Err(format!(
                "SPDK_DIR={} has no include/spdk/bdev_module.h (expected an SPDK install prefix or built source tree)",
                dir.display()
            ));
        }
        for lib in [dir.join("lib"), dir.join("build/lib")] {
            if lib.join("libspdk_bdev.so").exists() {
                return Ok(Spdk {
                    include,
                    lib,
                    how: format!("SPDK_DIR={}", dir.display()),
                });
            }
        }
        let has_static = dir.join("lib/libspdk_bdev.a").exists()
            || dir.join("build/lib/libspdk_bdev.a").exists();
        Err(format!(
            "SPDK_DIR={} has no lib/libspdk_bdev.so{}: pcache needs SPDK built with `./configure --with-shared`",
            dir.display(),
            if has_static { " (only the static libspdk_bdev.a)" } else { "" }
        ))
    }

    fn pkg_config(args: &[&str]) -> Option<String> {
        let out = Command::new("pkg-config").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn from_pkg_config() -> Result<Spdk, String> {
        let libdir = pkg_config(&["--variable=libdir", "spdk_bdev"]).filter(|s| !s.is_empty());
        let Some(libs) = pkg_config(&["--libs-only-L", "spdk_bdev"]) else {
            return Err(
                "pkg-config does not know spdk_bdev (is PKG_CONFIG_PATH=<spdk>/lib/pkgconfig set?)"
                    .into(),
            );
        };
        let cflags = pkg_config(&["--cflags-only-I", "spdk_bdev"]).unwrap_or_default();
        let lib = libdir
            .or_else(|| {
                libs.split_whitespace()
                    .find_map(|t| t.strip_prefix("-L").map(str::to_string))
            })
            .ok_or("pkg-config spdk_bdev names no library directory")?;
        let include = cflags
            .split_whitespace()
            .find_map(|t| t.strip_prefix("-I").map(PathBuf::from))
            .unwrap_or_else(|| Path::new(&lib).join("../include"));
        let lib = PathBuf::from(lib);
        if !lib.join("libspdk_bdev.so").exists() {
            return Err(format!(
                "pkg-config spdk_bdev points at {}, which has no libspdk_bdev.so: pcache needs SPDK built with `./configure --with-shared`",
                lib.display()
            ));
        }
        if !include.join("spdk/bdev_module.h").is_file() {
            return Err(format!(
                "pkg-config spdk_bdev include dir {} has no spdk/bdev_module.h",
                include.display()
            ));
        }
        Ok(Spdk {
            include,
            lib,
            how: "pkg-config spdk_bdev".into(),
        })
    }

    fn find() -> Spdk {
        println!("cargo:rerun-if-env-changed=SPDK_DIR");
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
        if let Some(dir) = env::var_os("SPDK_DIR").filter(|d| !d.is_empty()) {
            return from_dir(Path::new(&dir)).unwrap_or_else(|e| fail(&e));
        }
        from_pkg_config().unwrap_or_else(|e| {
            fail(&format!(
                "SPDK not found: SPDK_DIR is not set and {e}. Set SPDK_DIR to an SPDK install prefix \
                 (e.g. SPDK_DIR=/opt/spdk) or source scripts/spdk-env.sh"
            ))
        })
    }

    /// `-L`/`-l` flags of SPDK's `spdk_env_dpdk` and `spdk_syslibs` pkg-config files (looked up
    /// next to the libraries first). Empty when pkg-config cannot answer: the cdylib does not
    /// need them, only executables do.
    fn exe_libs(spdk: &Spdk) -> Vec<String> {
        let pc_dir = spdk.lib.join("pkgconfig");
        let mut path = pc_dir.display().to_string();
        if let Ok(old) = env::var("PKG_CONFIG_PATH") {
            path = format!("{path}:{old}");
        }
        let out = Command::new("pkg-config")
            .args(["--libs", "spdk_env_dpdk", "spdk_syslibs"])
            .env("PKG_CONFIG_PATH", path)
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter(|f| f.starts_with("-l") || f.starts_with("-L") || *f == "-pthread")
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn build() {
        let spdk = find();
        for lib in SPDK_LIBS {
            if !spdk.lib.join(format!("lib{lib}.so")).exists() {
                fail(&format!(
                    "{} (found via {}) has no lib{lib}.so",
                    spdk.lib.display(),
                    spdk.how
                ));
            }
        }
        let wrapper = "src/spdk/wrapper.h";
        println!("cargo:rerun-if-changed={wrapper}");
        println!("cargo:rerun-if-changed=build.rs");

        let bindings = bindgen::Builder::default()
            .header(wrapper)
            .clang_arg(format!("-I{}", spdk.include.display()))
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .allowlist_function("spdk_bdev_.*")
            .allowlist_function("spdk_io_device_(un)?register")
            .allowlist_function("spdk_(get|put)_io_channel")
            .allowlist_function("spdk_io_channel_(get_thread|iter_.*)")
            .allowlist_function("spdk_for_each_channel(_continue)?")
            .allowlist_function(
                "spdk_(get_thread|set_thread|thread_send_msg|thread_get_name|get_ticks|get_ticks_hz)",
            )
            .allowlist_function(
                "spdk_thread_(create|exit|is_running|get_cpumask|register_post_poller_handler)",
            )
            .allowlist_function("spdk_poller_(register_named|unregister)")
            .allowlist_function("spdk_dma_(zmalloc|free)")
            .allowlist_function("spdk_mem_(un)?register")
            .allowlist_function("spdk_env_get_(first_core|next_core|core_count|current_core)")
            .allowlist_function("spdk_cpuset_(zero|set_cpu|get_cpu|count)")
            .allowlist_function("spdk_rpc_register_method")
            .allowlist_function(
                "spdk_jsonrpc_(begin_result|end_result|send_error_response|send_bool_response)",
            )
            .allowlist_function("spdk_json_write_.*")
            .allowlist_function("spdk_log")
            .allowlist_function("spdk_strerror")
            .allowlist_function("spdk_uuid_(parse|generate|generate_sha1|fmt_lower|is_null|copy)")
            .allowlist_var("SPDK_RPC_(STARTUP|RUNTIME)")
            .allowlist_var("SPDK_JSONRPC_ERROR_.*")
            .allowlist_var("SPDK_IO_CHANNEL_STRUCT_SIZE")
            .allowlist_var("SPDK_UUID_STRING_LEN")
            .allowlist_type("spdk_bdev_module")
            .allowlist_type("spdk_bdev_fn_table")
            .allowlist_type("spdk_bdev_io_wait_entry")
            .allowlist_type("spdk_thread_poller_rc")
            // Only the options struct of the NVMe bdev module (`enable_flush`, read through
            // `dlsym` in vbdev.rs); none of its functions are linked.
            .allowlist_type("spdk_bdev_nvme_opts")
            .blocklist_function("spdk_bdev_nvme_.*")
            // The packed spdk_bdev_ext_io_opts holds these NVMe unions; bindgen aligns them to 4
            // and Rust rejects the packed struct (E0588). Redefined by hand in ffi.rs.
            .blocklist_type("spdk_bdev_nvme_cdw1[23]")
            // NVMe spec bitfield unions fail bindgen's size checks; we never look inside them.
            .opaque_type("spdk_nvme_.*")
            .default_enum_style(bindgen::EnumVariation::ModuleConsts)
            .generate_inline_functions(false)
            .layout_tests(true)
            .derive_default(false)
            .prepend_enum_name(false)
            .generate()
            .unwrap_or_else(|e| {
                fail(&format!(
                    "bindgen failed on {wrapper} with -I{}: {e}",
                    spdk.include.display()
                ))
            });

        let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR not set")));
        bindings
            .write_to_file(out.join("spdk_bindings.rs"))
            .unwrap_or_else(|e| fail(&format!("cannot write bindings: {e}")));

        // Dynamic linking only, with a run path so `libpcache.so` finds the same SPDK libraries
        // the host app uses. `-as-needed`: the constructors reference every library directly,
        // but keep the list explicit and stable.
        let lib = spdk.lib.display();
        println!("cargo:rustc-link-search=native={lib}");
        for l in SPDK_LIBS {
            println!("cargo:rustc-link-lib=dylib={l}");
        }
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Executables that link the rlib with the feature on (the `pcache` binary, unit and
        // integration test binaries) must resolve what SPDK's shared objects use without
        // recording it (libspdk_env_dpdk's DPDK libraries, libspdk_util's libcrypto, ...).
        // Cargo has no "executables only" link instruction that covers lib unit tests, so
        // these go to every target, libpcache.so included; there they are no-ops, as the SPDK
        // app it is preloaded into already has the same libraries loaded.
        let sys = exe_libs(&spdk);
        if !sys.is_empty() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            for a in sys {
                println!("cargo:rustc-link-arg={a}");
            }
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        println!("cargo:rustc-env=PCACHE_SPDK_LIB_DIR={lib}");
    }
}
