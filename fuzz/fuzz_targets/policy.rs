//! The policy directory's parsers on arbitrary text. The first byte picks which:
//! 0: a Cedar policy file (with the shipped schema), 1: the Cedar schema (with the
//! shipped policies), 2: approvals.toml, 3: a masking profile.
//!
//! Invariants: no panic; errors name the file they are about and a line that exists.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use phigate::approval::rules::RuleSet;
use phigate::fuzzing::policy_set_from_texts;
use phigate::mask::Profile;

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
const POLICIES: &str = include_str!("../../policies/fhir.cedar");

fn line_ok(text: &str, line: Option<usize>) -> bool {
    line.is_none_or(|l| (1..=text.split('\n').count()).contains(&l))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            if let Err(errs) = policy_set_from_texts(SCHEMA, text) {
                assert!(!errs.0.is_empty());
                for e in &errs.0 {
                    assert!(e.file.ends_with("fuzz.cedar"), "{}", e.file.display());
                    assert!(line_ok(text, e.line), "{e}");
                }
            }
        }
        1 => {
            if let Err(errs) = policy_set_from_texts(text, POLICIES) {
                assert!(!errs.0.is_empty());
                for e in &errs.0 {
                    let own = if e.file.ends_with("schema.cedarschema") {
                        text
                    } else {
                        POLICIES
                    };
                    assert!(line_ok(own, e.line), "{e}");
                }
            }
        }
        2 => {
            let path = Path::new("/etc/phigate/policies/approvals.toml");
            if let Err(e) = RuleSet::parse(path, text) {
                assert_eq!(e.file, path);
                assert!(line_ok(text, e.line), "{e}");
            }
        }
        _ => {
            let path = Path::new("/etc/phigate/policies/profiles/fuzz.toml");
            if let Err(e) = Profile::parse(path, text) {
                assert_eq!(e.file, path);
                assert!(line_ok(text, e.line), "{e}");
            }
        }
    }
});
