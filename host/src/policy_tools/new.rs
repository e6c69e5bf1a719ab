//! `cellhost policy new`: writes a policy crate that builds, tests and
//! deploys from this binary alone, with no checkout of cellhost.
//!
//! This file owns what a new policy starts from: the templates under
//! `host/templates/` and the guest SDK with its WIT, all compiled into the
//! binary, and the few names filled into them. The SDK is written beside the
//! policy (`cellhost-guest/`, a path dependency) with the lock file the SDK is
//! tested with, so a new crate resolves the same dependency versions.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `cellhost policy new DIR`.
#[derive(clap::Args)]
pub struct NewArgs {
    /// The folder to create; it must not exist, or be empty.
    pub dir: PathBuf,
    /// The policy's name [default: the folder's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Write a policy in Python, built into a component with componentize-py,
    /// instead of a Rust crate.
    #[arg(long)]
    pub python: bool,
}

/// One file written into the new crate: its path there, its text with
/// `{{name}}`, `{{lib_name}}` and `{{type_name}}` still to fill in.
type Template = (&'static str, &'static str);

/// The policy crate itself.
const RUST_POLICY: &[Template] = &[
    (
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    (".gitignore", include_str!("../../templates/rust/gitignore")),
    ("README.md", include_str!("../../templates/rust/README.md")),
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    (
        "tests/harness.rs",
        include_str!("../../templates/rust/tests/harness.rs"),
    ),
    (
        "tests/corpus/topology.toml",
        include_str!("../../templates/rust/tests/corpus/topology.toml"),
    ),
    (
        "tests/corpus/messages.jsonl",
        include_str!("../../templates/rust/tests/corpus/messages.jsonl"),
    ),
    (
        "tests/corpus/expect.jsonl",
        include_str!("../../templates/rust/tests/corpus/expect.jsonl"),
    ),
];

/// A policy in Python: the same WIT, built with componentize-py. Its
/// README names the componentize-py version the host was tested with.
const PYTHON_POLICY: &[Template] = &[
    (
        "README.md",
        include_str!("../../templates/python/README.md"),
    ),
    ("app.py", include_str!("../../templates/python/app.py")),
    (
        "test_app.py",
        include_str!("../../templates/python/test_app.py"),
    ),
    (
        "topology.toml",
        include_str!("../../templates/python/topology.toml"),
    ),
    (
        "messages.jsonl",
        include_str!("../../templates/python/messages.jsonl"),
    ),
    (
        "expect.jsonl",
        include_str!("../../templates/python/expect.jsonl"),
    ),
    (
        ".gitignore",
        include_str!("../../templates/python/gitignore"),
    ),
    ("wit/policy.wit", include_str!("../../../wit/policy.wit")),
];

/// Where the SDK goes in the new crate.
const SDK_DIR: &str = "cellhost-guest";

/// The guest SDK as this binary was built with it, its WIT included; written
/// verbatim (no placeholders).
const SDK: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../guest-sdk/Cargo.toml")),
    ("README.md", include_str!("../../../guest-sdk/README.md")),
    ("src/lib.rs", include_str!("../../../guest-sdk/src/lib.rs")),
    (
        "src/alloc.rs",
        include_str!("../../../guest-sdk/src/alloc.rs"),
    ),
    (
        "src/builders.rs",
        include_str!("../../../guest-sdk/src/builders.rs"),
    ),
    (
        "src/harness.rs",
        include_str!("../../../guest-sdk/src/harness.rs"),
    ),
    ("src/log.rs", include_str!("../../../guest-sdk/src/log.rs")),
    (
        "src/path.rs",
        include_str!("../../../guest-sdk/src/path.rs"),
    ),
    ("src/rt.rs", include_str!("../../../guest-sdk/src/rt.rs")),
    ("wit/policy.wit", include_str!("../../../wit/policy.wit")),
];

/// The SDK's lock file, the new workspace's starting point.
const SDK_LOCK: &str = include_str!("../../../guest-sdk/Cargo.lock");

/// Writes the crate and prints what was written and what to run next.
pub fn run(args: &NewArgs) -> Result<()> {
    let written = if args.python {
        write_python_policy(args)?
    } else {
        write_rust_policy(args)?
    };
    print!("{written}");
    Ok(())
}

/// The names filled into the templates.
struct Names {
    name: String,
    lib_name: String,
    type_name: String,
}

impl Names {
    fn new(args: &NewArgs) -> Result<Names> {
        let name = match &args.name {
            Some(name) => name.clone(),
            None => args
                .dir
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "{} has no folder name to call the policy by: give --name",
                        args.dir.display()
                    )
                })?,
        };
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !valid {
            bail!(
                "{name:?} cannot name a policy crate: use lower-case letters, digits, `-` and `_`, \
                 starting with a letter (give --name to choose one other than the folder's)"
            );
        }
        if name == SDK_DIR {
            bail!("{name:?} is the SDK's own name: choose another with --name");
        }
        let lib_name = name.replace('-', "_");
        let type_name = lib_name
            .split('_')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect();
        Ok(Names {
            name,
            lib_name,
            type_name,
        })
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{{name}}", &self.name)
            .replace("{{lib_name}}", &self.lib_name)
            .replace("{{type_name}}", &self.type_name)
    }
}

fn write_rust_policy(args: &NewArgs) -> Result<String> {
    let names = Names::new(args)?;
    let dir = &args.dir;
    prepare_dir(dir)?;

    let mut files: Vec<(PathBuf, String)> = RUST_POLICY
        .iter()
        .map(|(path, text)| (PathBuf::from(path), names.fill(text)))
        .collect();
    files.extend(
        SDK.iter()
            .map(|(path, text)| (Path::new(SDK_DIR).join(path), text.to_string())),
    );
    files.push(("Cargo.lock".into(), SDK_LOCK.to_string()));
    files.push((".cargo/config.toml".into(), cargo_config()?));
    for (path, text) in &files {
        write_file(&dir.join(path), text)?;
    }

    let mut out = String::new();
    let _ = writeln!(out, "wrote the policy {} in {}", names.name, dir.display());
    for (path, _) in files.iter().filter(|(p, _)| !p.starts_with(SDK_DIR)) {
        let _ = writeln!(out, "  {}", path.display());
    }
    let _ = writeln!(out, "  {SDK_DIR}/  (the guest SDK, with the WIT)");
    let wasm = format!("target/wasm32-wasip2/release/{}.wasm", names.lib_name);
    let _ = writeln!(out, "\nnext, in {}:", dir.display());
    let _ = writeln!(
        out,
        "  rustup target add wasm32-wasip2                 # once"
    );
    let _ = writeln!(
        out,
        "  cargo test                                      # unit tests, then the .wasm through cellhost"
    );
    let _ = writeln!(out, "  cargo build --release --target wasm32-wasip2");
    let _ = writeln!(out, "  cellhost policy check {wasm}");
    let _ = writeln!(out, "README.md says how to deploy it.");
    Ok(out)
}

fn write_python_policy(args: &NewArgs) -> Result<String> {
    let names = Names::new(args)?;
    let dir = &args.dir;
    prepare_dir(dir)?;
    for (path, text) in PYTHON_POLICY {
        write_file(&dir.join(path), &names.fill(text))?;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "wrote the Python policy {} in {}",
        names.name,
        dir.display()
    );
    for (path, _) in PYTHON_POLICY {
        let _ = writeln!(out, "  {path}");
    }
    let _ = writeln!(
        out,
        "\nnext, in {}: README.md has the commands to set up componentize-py, \
         test, build, check and deploy it",
        dir.display()
    );
    Ok(out)
}

/// `.cargo/config.toml`: the harness runs the component with the binary
/// that wrote the crate, unless `CELLHOST` says otherwise.
fn cargo_config() -> Result<String> {
    let exe = std::env::current_exe().context("cannot tell where this cellhost binary is")?;
    let exe = exe
        .to_str()
        .with_context(|| format!("the cellhost binary's path {} is not UTF-8", exe.display()))?;
    Ok(format!(
        "# The cellhost binary the harness (tests/harness.rs) runs the policy with:\n\
         # the one that wrote this crate. Set CELLHOST to use another.\n\
         [env]\n\
         CELLHOST = {{ value = {}, force = false }}\n",
        toml::Value::String(exe.to_string())
    ))
}

/// Creates `dir`, or accepts it when it exists and is empty.
fn prepare_dir(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} exists and is not empty: give a new folder",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(name: &str) -> Result<Names> {
        Names::new(&NewArgs {
            dir: PathBuf::from("/tmp/x"),
            name: Some(name.to_string()),
            python: false,
        })
    }

    #[test]
    fn names_fill_the_templates() {
        let names = names("edge-router_2").expect("a valid name");
        assert_eq!(names.lib_name, "edge_router_2");
        assert_eq!(names.type_name, "EdgeRouter2");
        assert_eq!(
            names.fill("{{name}} {{lib_name}} {{type_name}}"),
            "edge-router_2 edge_router_2 EdgeRouter2"
        );
    }

    #[test]
    fn names_a_crate_cannot_have_are_refused() {
        for bad in ["", "My", "1policy", "a b", "cellhost-guest", "pol.icy"] {
            assert!(names(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Every file of the SDK's sources travels with the binary: a module
    /// added to the SDK and not to [`SDK`] would leave new crates broken.
    #[test]
    fn the_embedded_sdk_is_the_whole_sdk() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/src");
        let mut on_disk: Vec<String> = std::fs::read_dir(&src)
            .expect("the SDK sources")
            .filter_map(|e| e.ok())
            .map(|e| format!("src/{}", e.file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = SDK
            .iter()
            .map(|(p, _)| p.to_string())
            .filter(|p| p.starts_with("src/"))
            .collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }

    #[test]
    fn a_folder_with_files_is_not_written_over() {
        let dir = std::env::temp_dir().join(format!("cellhost-new-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp folder");
        std::fs::write(dir.join("keep.txt"), "mine").expect("a file");
        let err = write_rust_policy(&NewArgs {
            dir: dir.clone(),
            name: Some("p".into()),
            python: false,
        })
        .err()
        .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("not empty")));
        assert_eq!(
            std::fs::read_to_string(dir.join("keep.txt"))
                .ok()
                .as_deref(),
            Some("mine")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
