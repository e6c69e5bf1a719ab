//! Builds the policy plugins (`../plugins`) for wasm32-wasip2, so that a plain
//! `cargo build` or `cargo test` of a clean clone produces the components the
//! host embeds and the tests load, with no hand-run step.
//!
//! This script owns that nested build: the target it needs, the environment
//! it runs in, and what it tells cargo. It sets `CELLHOST_PLUGINS_DIR` to the
//! absolute directory holding `nova_cells.wasm`, `adversary.wasm` and
//! `keep_local.wasm`.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const WASM_TARGET: &str = "wasm32-wasip2";

/// The plugin packages and the component each produces.
///
/// Built one package per cargo invocation: `adversary` reuses `nova-cells`
/// without its `export` feature, and building both in one invocation would
/// unify features, linking nova-cells' `init` and `route` exports into the
/// adversary next to its own.
///
/// Building `adversary` also relinks `nova_cells.wasm`, without exports, over
/// the real one (cargo builds every crate type of a dependency and copies its
/// cdylib to the output directory), so each component is copied out right
/// after its own build.
const PLUGINS: &[(&str, &str)] = &[
    ("nova-cells", "nova_cells.wasm"),
    ("adversary", "adversary.wasm"),
    ("keep-local", "keep_local.wasm"),
];

/// Variables the outer build sets or honours that would change the nested
/// build: flags meant for the host, a target dir or target other than ours,
/// clippy as a wrapper. Prefixes cover the per-profile settings and the
/// host crate's own features and cfgs, which are set for this script.
const SCRUBBED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WORKSPACE_WRAPPER",
];
const SCRUBBED_PREFIXES: &[&str] = &["CARGO_PROFILE_", "CARGO_FEATURE_", "CARGO_CFG_", "__CARGO_"];

fn main() {
    let manifest_dir = PathBuf::from(required_env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", manifest_dir.display()))
        .to_path_buf();
    let plugins = root.join("plugins");
    let target_dir = root.join("target").join("plugins");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    watch_sources(&root.join("guest-sdk"));
    // Only what the components are built from: the plugins folder also holds
    // the corpus and the Python policy, which would otherwise rebuild the host.
    for file in ["Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", plugins.join(file).display());
    }
    for (package, _) in PLUGINS {
        println!("cargo:rerun-if-changed={}", plugins.join(package).display());
    }

    ensure_wasm_target(&rustc);

    // Copied into OUT_DIR rather than used where cargo writes them: building
    // adversary overwrites nova_cells.wasm there (see PLUGINS), and that
    // directory is shared by every build of the host, OUT_DIR by none.
    let plugins_dir = PathBuf::from(required_env("OUT_DIR")).join("plugins");
    if let Err(e) = fs::create_dir_all(&plugins_dir) {
        panic!("cannot create {}: {e}", plugins_dir.display());
    }
    let built_dir = target_dir.join(WASM_TARGET).join("release");
    for (package, artifact) in PLUGINS {
        let mut build = Command::new(&cargo);
        build
            .arg("build")
            .arg("--release")
            .arg("--locked")
            .args(["--target", WASM_TARGET])
            .args(["--package", package])
            .arg("--manifest-path")
            .arg(plugins.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir);
        scrub_env(&mut build);
        let output = run(&mut build);
        if !output.status.success() {
            panic!(
                "building plugin `{package}` for {WASM_TARGET} failed ({status}):\n{stderr}",
                status = output.status,
                stderr = String::from_utf8_lossy(&output.stderr),
            );
        }

        let built = built_dir.join(artifact);
        let kept = plugins_dir.join(artifact);
        if let Err(e) = fs::copy(&built, &kept) {
            panic!(
                "building plugin `{package}` succeeded, but copying {} to {} failed: {e}",
                built.display(),
                kept.display()
            );
        }
    }
    println!(
        "cargo:rustc-env=CELLHOST_PLUGINS_DIR={}",
        plugins_dir.display()
    );
}

/// Asks cargo to rerun this script when anything under `dir` changes, except
/// a `target` directory a developer's own build of that workspace left there:
/// cargo scans watched directories recursively, and watching build output
/// would rerun the nested build after every such build.
fn watch_sources(dir: &Path) {
    let entries = match dir.read_dir() {
        Ok(entries) => entries,
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    };
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        if entry.file_name() == OsStr::new("target") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}

/// Installs the wasm32-wasip2 standard library if the toolchain lacks it, so
/// that a fresh checkout builds without a manual `rustup` step.
fn ensure_wasm_target(rustc: &OsStr) {
    let sysroot = sysroot(rustc);
    if sysroot
        .join("lib")
        .join("rustlib")
        .join(WASM_TARGET)
        .is_dir()
    {
        return;
    }

    // Name the toolchain that owns this rustc, so rustup does not pick its
    // default toolchain when that differs from the one building us.
    let toolchain = sysroot
        .parent()
        .filter(|parent| parent.file_name() == Some(OsStr::new("toolchains")))
        .and_then(|_| sysroot.file_name())
        .map(OsString::from);
    let mut add = Command::new("rustup");
    add.args(["target", "add"]);
    let manual = match &toolchain {
        Some(name) => {
            add.arg("--toolchain").arg(name);
            format!(
                "rustup target add --toolchain {} {WASM_TARGET}",
                name.to_string_lossy()
            )
        }
        None => format!("rustup target add {WASM_TARGET}"),
    };
    add.arg(WASM_TARGET);
    println!(
        "cargo:warning=the {WASM_TARGET} target is not installed in {}; running `{manual}`",
        sysroot.display()
    );

    let failure = match add.output() {
        Ok(output) if output.status.success() => return,
        Ok(output) => format!(
            "it failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => format!("it could not be started: {e}"),
    };
    panic!(
        "the plugins need the {WASM_TARGET} target, which is not installed in {sysroot}, \
         and running `{manual}` to install it failed: {failure}\n\
         Install the target for the toolchain at {sysroot} (with rustup: `{manual}`), \
         then build again.",
        sysroot = sysroot.display(),
    );
}

/// The sysroot of the compiler cargo builds with.
fn sysroot(rustc: &OsStr) -> PathBuf {
    let output = run(Command::new(rustc).args(["--print", "sysroot"]));
    if !output.status.success() {
        panic!(
            "`{} --print sysroot` failed ({}):\n{}",
            rustc.to_string_lossy(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8(output.stdout).unwrap_or_else(|e| {
        panic!(
            "`{} --print sysroot` printed a non-UTF-8 path: {e}",
            rustc.to_string_lossy()
        )
    });
    PathBuf::from(stdout.trim_end())
}

/// Removes from `command`'s environment everything that belongs to the outer
/// build: the plugins have their own profile, target and target dir.
fn scrub_env(command: &mut Command) {
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if SCRUBBED_VARS.contains(&name)
            || SCRUBBED_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(name);
        }
    }
}

/// Runs `command` to completion, capturing its output.
fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{}`: {e}",
            command.get_program().to_string_lossy()
        )
    })
}

fn required_env(name: &str) -> OsString {
    env::var_os(name).unwrap_or_else(|| panic!("cargo did not set {name} for the build script"))
}
