//! The streaming masker with the shipped safe_harbor profile, on arbitrary bodies
//! (JSON when the first byte is even, NDJSON when odd), fed in two chunks cut at an
//! arbitrary point. Beyond not panicking: a body that masks cleanly is valid JSON
//! (or NDJSON) when the input was, and masking the output again changes nothing.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use phigate_mask::pseudonym::Pseudonymizer;
use phigate_mask::{BodyKind, BodyMasker, MaskContext, Profile, ProfileSet};

static PROFILE: LazyLock<(Arc<Profile>, Arc<MaskContext>)> = LazyLock::new(|| {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = ProfileSet::load(&dir).expect("the shipped profiles load");
    let profile = set.get("safe_harbor").expect("safe_harbor").clone();
    let ctx = Arc::new(MaskContext::new(Arc::new(Pseudonymizer::with_key([7; 32]))));
    (profile, ctx)
});

fn mask(kind: BodyKind, parts: &[&[u8]]) -> Option<Vec<u8>> {
    let (profile, ctx) = &*PROFILE;
    let mut m = BodyMasker::new(profile.clone(), ctx.clone(), kind, None).ok()?;
    let mut out = Vec::new();
    for p in parts {
        m.push(p, &mut out).ok()?;
    }
    m.finish(&mut out).ok()?;
    Some(out)
}

fn valid(kind: BodyKind, bytes: &[u8]) -> bool {
    match kind {
        BodyKind::Ndjson => bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .all(|l| serde_json::from_slice::<serde_json::Value>(l).is_ok()),
        _ => serde_json::from_slice::<serde_json::Value>(bytes).is_ok(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let kind = if first % 2 == 0 {
        BodyKind::Json
    } else {
        BodyKind::Ndjson
    };
    let cut = if body.is_empty() {
        0
    } else {
        first as usize % body.len()
    };
    let Some(once) = mask(kind, &[&body[..cut], &body[cut..]]) else {
        return;
    };
    if valid(kind, body) {
        assert!(valid(kind, &once), "valid input, invalid output");
    }
    let twice = mask(kind, &[&once]).expect("masked output masks again");
    assert_eq!(once, twice, "masking is not idempotent");
});
