//! `cellhost policy check`: loads a policy exactly as a cell would and prints
//! what it is, what it asks for and what it is granted.
//!
//! Loading is the check: [`crate::plugins::load`] compiles the component,
//! links it against what the host grants, checks it implements the
//! `cellhost:policy` world and runs `init` on a trial instance. Each failure
//! comes back as an error naming the file and the step, and the command
//! exits non-zero with it.

use std::fmt::Write as _;

use anyhow::Result;

use super::CheckArgs;
use crate::config::PolicySection;
use crate::policy::budget::{self, mib};
use crate::policy::{world, EngineOptions, LoadedPolicy};

pub fn run(args: &CheckArgs) -> Result<()> {
    let (section, policy) = args.policy.load(EngineOptions::default())?;
    print!("{}", report(&section, &policy));
    Ok(())
}

/// The text `check` prints for a policy that loaded.
fn report(section: &PolicySection, policy: &LoadedPolicy) -> String {
    let mut out = String::new();
    let engine = policy.engine();
    let cache = match engine.cache_dir() {
        Some(dir) => format!("cache {}", dir.display()),
        None => "no disk cache".to_string(),
    };
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(out, "policy    {}", policy.source());
    let _ = writeln!(out, "sha256    {}", policy.hash());
    let _ = writeln!(
        out,
        "compiled  {} in {:.1?} ({cache})",
        policy.compiled_from().describe(),
        policy.compile_time()
    );
    let _ = writeln!(out, "world     {} `policy`: ok", world::package());
    let _ = writeln!(out, "init      ok with config {:?}", section.config);

    let _ = writeln!(out, "imports");
    write_items(&mut out, &policy.imports());
    let _ = writeln!(out, "exports");
    write_items(&mut out, &policy.exports());

    let limits = policy.limits();
    let _ = writeln!(out, "sandbox");
    let _ = writeln!(out, "  route deadline    {:?} per call", limits.deadline);
    let _ = writeln!(out, "  init deadline     {:?}", limits.init_deadline());
    let used = policy.usage_after_init().unwrap_or_default();
    let _ = writeln!(
        out,
        "  memory            {} per instance, all its linear memories together ({} after init)",
        mib(limits.memory_bytes),
        mib(used.memory_bytes)
    );
    let _ = writeln!(
        out,
        "  table elements    {} per instance, all its tables together ({} after init)",
        budget::MAX_TABLE_ELEMENTS,
        used.table_elements
    );
    let _ = writeln!(
        out,
        "  counts            at most {} core instances, {} memories and {} tables per instance",
        budget::MAX_CORE_INSTANCES,
        budget::MAX_MEMORIES,
        budget::MAX_TABLES
    );
    let _ = writeln!(
        out,
        "  actions per call  at most {} (`policy.max_actions`, enforced by the router)",
        section.max_actions
    );
    let _ = writeln!(
        out,
        "  granted           logging, a clock and randomness; no files, sockets, environment or arguments"
    );
    out
}

fn write_items(out: &mut String, items: &[(String, String)]) {
    if items.is_empty() {
        out.push_str("  (none)\n");
    }
    let width = items.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, what) in items {
        let _ = writeln!(out, "  {name:width$}  {what}");
    }
}
