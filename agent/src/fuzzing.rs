//! Entry points for the fuzz targets (`fuzz/`) into what is otherwise private.
//! Not an API: nothing outside the fuzz crate calls these.
#![forbid(unsafe_code)]

use std::path::Path;

use crate::policy::{PolicyErrors, PolicySet};

/// Loads a policy set from a schema text and one policy file's text, as
/// [`PolicySet::load`] does after reading the directory.
pub fn policy_set_from_texts(schema: &str, policies: &str) -> Result<PolicySet, PolicyErrors> {
    let dir = Path::new("/fuzz/policies");
    PolicySet::from_texts(
        dir,
        &dir.join("schema.cedarschema"),
        schema,
        &[(dir.join("fuzz.cedar"), policies.to_owned())],
        String::new(),
    )
}
