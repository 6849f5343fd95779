//! The agent's structure, checked: its top-level modules form layers, and a module
//! uses only modules of layers below its own (no import circles, no upward
//! arrows); no function grows past [`MAX_FN_LINES`] unless it is listed as known
//! debt with the length it may not exceed.
//!
//! It reads `crate::<module>` paths in the agent's sources (comments and unit tests
//! left out): what the code names is what it depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// The agent's modules, lowest layer first. A module may use the modules of the
/// layers before its own, never its own layer's or a later one's.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("foundations", &["config", "metrics", "sockets", "io"]),
    ("kernel and TLS", &["redirect", "tls"]),
    ("the agent's own client", &["outbound"]),
    // What phigate presents upstream in the apps' stead (tokens by the agent's client).
    ("upstream credentials", &["credential"]),
    ("who is calling", &["identity"]),
    ("records", &["record"]),
    ("HTTP parts", &["http"]),
    ("request stages", &["mask", "approval"]),
    ("policy", &["policy"]),
    ("the request pipeline", &["pipeline"]),
    // Composes every module's phigate.toml section, so it sits above their owners.
    ("the whole config", &["settings"]),
    (
        "connections and operators",
        &["proxy", "console", "admin", "preflight", "fuzzing"],
    ),
    ("what is in force", &["state"]),
    ("wiring", &["app"]),
    ("command line", &["cli"]),
];

/// Longest function allowed, in lines (declarative tables excepted below).
pub const MAX_FN_LINES: usize = 150;

/// Functions allowed over [`MAX_FN_LINES`] (`file:function`, length): only a
/// declarative table that reads best whole; an entry may never grow, and a shorter
/// one must lower its cap (a ratchet). Empty: issue 19 paid the debt.
const LONG_FUNCTIONS: &[(&str, usize)] = &[];

pub fn check(root: &Path) -> anyhow::Result<()> {
    let src = root.join("agent/src");
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, mods))| mods.iter().map(move |m| (*m, i)))
        .collect();
    let mut problems = Vec::new();
    let mut files = Vec::new();
    rust_files(&src, &mut files)?;
    let mut seen_modules = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = top_module(rel);
        let Some(module) = module else { continue };
        seen_modules.insert(module.clone());
        let Some(&own) = layer_of.get(module.as_str()) else {
            problems.push(format!(
                "agent/src/{}: module `{module}` is in no layer of xtask/src/layers.rs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = code_only(&text);
        for (line_no, used) in crate_paths(&code) {
            if used == module {
                continue;
            }
            match layer_of.get(used.as_str()) {
                Some(&l) if l < own => {}
                Some(&l) => problems.push(format!(
                    "agent/src/{}:{line_no}: `{module}` ({}) uses `{used}` ({}){}",
                    rel.display(),
                    LAYERS[own].0,
                    LAYERS[l].0,
                    if l == own {
                        ", a module of its own layer"
                    } else {
                        ", a layer above it"
                    }
                )),
                None => {}
            }
        }
    }
    for (_, mods) in LAYERS {
        for m in *mods {
            if !seen_modules.contains(*m) {
                problems.push(format!(
                    "xtask/src/layers.rs: `{m}` is not a module of agent/src"
                ));
            }
        }
    }
    problems.extend(long_functions(root)?);
    if problems.is_empty() {
        println!(
            "{} modules in {} layers, no upward or same-layer use; no function over {MAX_FN_LINES} lines beyond the listed debt",
            seen_modules.len(),
            LAYERS.len()
        );
        Ok(())
    } else {
        for p in &problems {
            println!("{p}");
        }
        bail!("{} structure problem(s)", problems.len())
    }
}

/// The top-level module a file belongs to (`None` for lib.rs and main.rs).
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let p = e?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    Ok(())
}

/// The source without comments and without its `#[cfg(test)]` module (unit tests
/// may use anything), line numbers kept.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_tests = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            in_tests = true;
        }
        if in_tests || t.starts_with("//") {
            out.push('\n');
            continue;
        }
        let code = match line.find("//") {
            // A `//` inside a string (a URL) is kept: only whole-line comments and
            // trailing ones after code that has no quote are cut.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every `crate::name` in `code`, with its line.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let preceded = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if !name.is_empty() && !preceded {
                out.push((i + 1, name));
            }
            rest = after;
        }
    }
    out
}

/// Functions of the agent's crates longer than allowed.
fn long_functions(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut found = BTreeMap::new();
    for dir in ["agent/src", "agent/mask/src", "agent/record/src"] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files)?;
        for f in files {
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&f)?;
            let rel = f.strip_prefix(root).unwrap().display().to_string();
            for (name, line, len) in functions(&code_only(&text)) {
                if len > MAX_FN_LINES {
                    found.insert(format!("{rel}:{name}"), (line, len));
                }
            }
        }
    }
    for (key, (line, len)) in &found {
        match LONG_FUNCTIONS.iter().find(|(k, _)| k == key) {
            Some((_, cap)) if len == cap => {}
            // A ratchet: debt paid down stays paid.
            Some((_, cap)) if len < cap => problems.push(format!(
                "xtask/src/layers.rs: `{key}` is down to {len} lines: lower its cap from {cap} to {len}"
            )),
            Some((_, cap)) => problems.push(format!(
                "{}:{line}: `{}` grew to {len} lines (listed debt: at most {cap}; split it)",
                key.rsplit_once(':').unwrap().0,
                key.rsplit_once(':').unwrap().1
            )),
            None => problems.push(format!(
                "{}:{line}: `{}` is {len} lines (at most {MAX_FN_LINES}: split it by stage)",
                key.rsplit_once(':').unwrap().0,
                key.rsplit_once(':').unwrap().1
            )),
        }
    }
    for (key, _) in LONG_FUNCTIONS {
        if !found.contains_key(*key) {
            problems.push(format!(
                "xtask/src/layers.rs: `{key}` is no longer over {MAX_FN_LINES} lines: take it off LONG_FUNCTIONS"
            ));
        }
    }
    Ok(problems)
}

/// `(name, first line, length in lines)` of every function with a body, found by
/// its signature's indentation and the closing brace at the same indentation
/// (rustfmt's layout).
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        let sig = [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
        ]
        .iter()
        .fold(t, |s, p| s.strip_prefix(p).unwrap_or(s));
        let sig = ["async ", "unsafe "]
            .iter()
            .fold(sig, |s, p| s.strip_prefix(p).unwrap_or(s));
        let Some(after) = sig.strip_prefix("fn ") else {
            continue;
        };
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // The signature ends at its `{`; a declaration without a body at a `;`.
        let Some(open) = lines[i..]
            .iter()
            .position(|l| l.contains('{') || l.trim_end().ends_with(';'))
        else {
            continue;
        };
        if !lines[i + open].contains('{') {
            continue;
        }
        if lines[i + open].trim_end().ends_with('}') {
            out.push((name, i + 1, open + 1));
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = lines[i + open..].iter().position(|l| *l == close) {
            out.push((name, i + 1, open + end + 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_paths_are_found_outside_comments_and_tests() {
        let text = "use crate::a::B;\n// crate::commented\nfn f() { x::crate::no; crate::c::d(); } // crate::trailing\n#[cfg(test)]\nmod tests { use crate::t; }\n";
        let got = crate_paths(&code_only(text));
        assert_eq!(got, [(1, "a".to_owned()), (3, "c".to_owned())]);
    }

    #[test]
    fn function_lengths_follow_rustfmt_layout() {
        let text = "fn a() {\n    1;\n}\n\nimpl X {\n    pub async fn b(\n        x: u8,\n    ) -> u8 {\n        x\n    }\n    fn decl();\n}\n";
        let got = functions(text);
        assert_eq!(got, [("a".to_owned(), 1, 3), ("b".to_owned(), 6, 5)]);
    }
}
