//! The world this host implements, and how a component that does not fit it
//! differs, said in a plugin author's words.
//!
//! wasmtime refuses such a component with its linker's vocabulary ("a
//! matching implementation was not found in the linker"). This module reads
//! the component's own imports and exports and names what is missing or
//! different: an export that is absent or has another signature, an import
//! the host does not grant, and the version of `cellhost:policy` the
//! component was built against when it is not this host's.
//!
//! It owns the description of the world (its package, version and the two
//! exports' shapes); the typecheck itself stays wasmtime's.

use std::collections::BTreeSet;

use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The WIT the host bindings are generated from; its `package` line is the
/// one place the version is written.
const WIT: &str = include_str!("../../../wit/policy.wit");

/// The package every policy interface belongs to.
pub const PACKAGE: &str = "cellhost:policy";

/// The interfaces of [`PACKAGE`] a policy may import.
const INTERFACES: [&str; 2] = ["host", "types"];

/// The version of [`PACKAGE`] this host implements, e.g. `0.1.0`.
pub fn version() -> &'static str {
    WIT.lines()
        .find_map(|line| line.trim().strip_prefix("package cellhost:policy@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .unwrap_or("unknown")
}

/// `cellhost:policy@<version>`, the world as an author names it.
pub fn package() -> String {
    format!("{PACKAGE}@{}", version())
}

/// One export the world asks for: its name, its signature as the WIT writes
/// it, and the shape a component's function must have.
struct ExpectedExport {
    name: &'static str,
    signature: &'static str,
    params: &'static [(&'static str, &'static str)],
    result: &'static str,
}

const EXPORTS: [ExpectedExport; 2] = [
    ExpectedExport {
        name: "init",
        signature: "(config: string) -> result<_, string>",
        params: &[("config", "string")],
        result: "result<_, string>",
    },
    ExpectedExport {
        name: "route",
        signature: "(message, cell) -> result<list<action>, string>",
        params: &[("message", "record"), ("cell", "record")],
        result: "result<list<variant>, string>",
    },
];

/// Everything that keeps `component` from being a policy of this host's
/// world, one line each, or an empty list when nothing is found (then the
/// difference is deeper than names and shapes, and wasmtime's own error is
/// the best account). `link_error` is wasmtime's refusal, used to tell which
/// import the linker could not satisfy.
pub fn differences(
    engine: &Engine,
    component: &Component,
    link_error: Option<&wasmtime::Error>,
) -> Vec<String> {
    let ty = component.component_type();
    let imports: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let exports: Vec<(String, ComponentItem)> = ty
        .exports(engine)
        .map(|(name, item)| (name.to_string(), item.ty))
        .collect();

    let mut lines = import_differences(&imports);
    if let Some(line) = link_error.and_then(|e| refused_import(&imports, e, &lines)) {
        lines.push(line);
    }
    let (export_lines, missing) = export_differences(&exports);
    let built_elsewhere =
        missing == EXPORTS.len() && !imports.iter().any(|n| policy_interface(n).is_some());
    if built_elsewhere {
        let names: Vec<&str> = exports.iter().map(|(name, _)| name.as_str()).collect();
        let exported = if names.is_empty() {
            "nothing".to_string()
        } else {
            names.join(", ")
        };
        lines.insert(
            0,
            format!(
                "was not built for {PACKAGE}: it imports no {PACKAGE} interface and exports \
                 {exported}; this host implements {}",
                package()
            ),
        );
    }
    lines.extend(export_lines);
    lines
}

/// The version the component's `cellhost:policy` imports target, when it is
/// not this host's, then each import the host does not have.
fn import_differences(imports: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut targets = BTreeSet::new();
    let mut from = Vec::new();
    for name in imports {
        let Some((interface, theirs)) = policy_interface(name) else {
            if !name.starts_with("wasi:") {
                lines.push(format!(
                    "import {name}: not granted (a policy may import {PACKAGE}/host and WASI 0.2)"
                ));
            }
            continue;
        };
        match theirs {
            Some(v) if !compatible(v, version()) => {
                targets.insert(format!("{PACKAGE}@{v}"));
                from.push(name.as_str());
            }
            None => lines.push(format!(
                "import {name}: carries no version; this host implements {}",
                package()
            )),
            _ if !INTERFACES.contains(&interface) => lines.push(format!(
                "import {name}: {} has no interface `{interface}` (it has {})",
                package(),
                INTERFACES.join(" and ")
            )),
            _ => {}
        }
    }
    if !targets.is_empty() {
        let targets: Vec<String> = targets.into_iter().collect();
        lines.insert(
            0,
            format!(
                "targets {} (imports {}); this host implements {}",
                targets.join(" and "),
                from.join(", "),
                package()
            ),
        );
    }
    lines
}

/// The import wasmtime's linker refused, when [`import_differences`] let it
/// through: a WASI interface the host does not serve, or serves with other
/// types.
fn refused_import(imports: &[String], error: &wasmtime::Error, known: &[String]) -> Option<String> {
    let text = format!("{error:#}");
    let name = imports.iter().find(|name| {
        text.contains(&format!("`{name}`")) && !known.iter().any(|line| line.contains(*name))
    })?;
    // The first link of wasmtime's chain only repeats the name.
    let why: Vec<String> = error.chain().skip(1).map(|e| e.to_string()).collect();
    Some(format!("import {name}: not granted ({})", why.join(": ")))
}

/// A line for each export of the world the component lacks or has with
/// another signature, and how many it lacks.
fn export_differences(exports: &[(String, ComponentItem)]) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut missing = 0;
    for expected in &EXPORTS {
        match exports.iter().find(|(name, _)| name == expected.name) {
            None => {
                missing += 1;
                lines.push(format!("export {}: missing", expected.name));
            }
            Some((_, ComponentItem::ComponentFunc(func))) => {
                if let Some(difference) = signature_difference(expected, func) {
                    lines.push(format!(
                        "export {}: expects {}, the component's {difference}",
                        expected.name, expected.signature
                    ));
                }
            }
            Some((_, other)) => lines.push(format!(
                "export {}: expects a function {}, the component exports {}",
                expected.name,
                expected.signature,
                kind(other)
            )),
        }
    }
    (lines, missing)
}

/// `(interface, version)` of a `cellhost:policy/<interface>@<version>` name.
fn policy_interface(name: &str) -> Option<(&str, Option<&str>)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    Some(match rest.split_once('@') {
        Some((interface, version)) => (interface, Some(version)),
        None => (rest, None),
    })
}

/// Whether a component built against WIT version `theirs` links with `ours`,
/// by semver: same major, and for 0.x the same minor, for 0.0.x the same patch.
fn compatible(theirs: &str, ours: &str) -> bool {
    let parts = |v: &str| -> Option<(u64, u64, u64)> {
        let core = v.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|n| n.parse::<u64>().ok());
        Some((it.next()??, it.next()??, it.next()??))
    };
    match (parts(theirs), parts(ours)) {
        (Some(a), Some(b)) if a.0 > 0 => a.0 == b.0,
        (Some(a), Some(b)) if a.1 > 0 => a.0 == b.0 && a.1 == b.1,
        (Some(a), Some(b)) => a == b,
        _ => theirs == ours,
    }
}

/// How `func` differs from `expected` in parameter count, names, kinds or
/// result, as the end of a sentence; `None` when the shapes agree.
fn signature_difference(expected: &ExpectedExport, func: &ComponentFunc) -> Option<String> {
    let params: Vec<(String, String)> = func
        .params()
        .map(|(name, ty)| (name.to_string(), shape(&ty)))
        .collect();
    let listed = || {
        let each: Vec<String> = params
            .iter()
            .map(|(name, shape)| format!("{name}: {shape}"))
            .collect();
        format!("({})", each.join(", "))
    };
    if params.len() != expected.params.len() {
        let plural = if params.len() == 1 { "" } else { "s" };
        return Some(format!(
            "takes {} parameter{plural} {}",
            params.len(),
            listed()
        ));
    }
    let agree = params
        .iter()
        .zip(expected.params)
        .all(|((name, shape), (want_name, want_shape))| name == want_name && shape == want_shape);
    if !agree {
        return Some(format!("takes {}", listed()));
    }
    let results: Vec<String> = func.results().map(|ty| shape(&ty)).collect();
    match results.as_slice() {
        [only] if only == expected.result => None,
        [] => Some("returns nothing".to_string()),
        _ => Some(format!("returns {}", results.join(", "))),
    }
}

/// A type as WIT writes it, with records, variants, enums and flags named
/// by kind only (a component's function type does not carry their names).
fn shape(ty: &Type) -> String {
    let or_blank = |ty: Option<Type>| ty.map_or_else(|| "_".to_string(), |t| shape(&t));
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(list) => format!("list<{}>", shape(&list.ty())),
        Type::Option(option) => format!("option<{}>", shape(&option.ty())),
        Type::Result(result) => format!(
            "result<{}, {}>",
            or_blank(result.ok()),
            or_blank(result.err())
        ),
        Type::Tuple(tuple) => {
            let each: Vec<String> = tuple.types().map(|t| shape(&t)).collect();
            format!("tuple<{}>", each.join(", "))
        }
        Type::Record(_) => "record".into(),
        Type::Variant(_) => "variant".into(),
        Type::Enum(_) => "enum".into(),
        Type::Flags(_) => "flags".into(),
        Type::Own(_) => "own<resource>".into(),
        Type::Borrow(_) => "borrow<resource>".into(),
        Type::Map(_) => "map".into(),
        Type::Future(_) => "future".into(),
        Type::Stream(_) => "stream".into(),
        Type::ErrorContext => "error-context".into(),
        Type::FixedLengthList(_) => "fixed-length list".into(),
    }
}

/// What kind of item a component exports, in a few words.
fn kind(item: &ComponentItem) -> &'static str {
    match item {
        ComponentItem::ComponentFunc(_) => "a function",
        ComponentItem::CoreFunc(_) => "a core function",
        ComponentItem::Module(_) => "a core module",
        ComponentItem::Component(_) => "a component",
        ComponentItem::ComponentInstance(_) => "an instance",
        ComponentItem::Type(_) => "a type",
        ComponentItem::Resource(_) => "a resource",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_comes_from_the_wit() {
        assert!(version().starts_with("0."), "{}", version());
        assert_eq!(package(), format!("cellhost:policy@{}", version()));
    }

    #[test]
    fn versions_link_by_semver() {
        assert!(compatible("0.1.3", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(!compatible("0.0.9", "0.0.8"));
        assert!(compatible("1.4.0", "1.0.0"));
        assert!(!compatible("2.0.0", "1.0.0"));
    }

    #[test]
    fn names_split_into_interface_and_version() {
        assert_eq!(
            policy_interface("cellhost:policy/host@0.0.9"),
            Some(("host", Some("0.0.9")))
        );
        assert_eq!(policy_interface("wasi:io/poll@0.2.0"), None);
    }
}
