//! The same masking over a parsed document (`serde_json::Value`): parse, walk, mask,
//! serialize. It shares rules, operators and detectors with the streaming transform
//! but not the traversal, so the tests use it as the reference the stream must
//! agree with, and `phigate mask --engine dom` is the benchmark's peer.

use std::sync::Arc;

use serde_json::Value;

use super::ops::{Op, Scalar};
use super::path::PathDfa;
use super::{BodyKind, Counts, MaskContext, Profile, ScalarMasker};

/// Masks a parsed value in place.
pub fn mask_value(profile: &Profile, ctx: &MaskContext, v: &mut Value, counts: &mut Counts) {
    let mut dfa = profile.dfa.clone();
    let mut scalar = ScalarMasker::new(profile);
    let root = dfa.root();
    let rule = dfa.root_match();
    walk(profile, ctx, &mut dfa, &mut scalar, v, root, rule, counts);
}

#[allow(clippy::too_many_arguments)]
fn walk(
    profile: &Profile,
    ctx: &MaskContext,
    dfa: &mut PathDfa,
    scalar: &mut ScalarMasker,
    v: &mut Value,
    state: u32,
    rule: Option<u32>,
    counts: &mut Counts,
) {
    // Returns whether the child is dropped.
    let child = |dfa: &mut PathDfa,
                 scalar: &mut ScalarMasker,
                 counts: &mut Counts,
                 t: super::path::Trans,
                 v: &mut Value|
     -> bool {
        if let Some(m) = t.matched {
            let r = &profile.rules[m as usize];
            if r.op == Op::Drop {
                counts.add(r.entity);
                return true;
            }
        }
        walk(
            profile,
            ctx,
            dfa,
            scalar,
            v,
            t.state,
            t.matched.or(rule),
            counts,
        );
        false
    };
    match v {
        Value::Object(map) => {
            let mut dropped = Vec::new();
            for (k, c) in map.iter_mut() {
                let t = dfa.key(state, k);
                if child(dfa, scalar, counts, t, c) {
                    dropped.push(k.clone());
                }
            }
            for k in dropped {
                map.remove(&k);
            }
        }
        Value::Array(items) => {
            let mut keep = Vec::with_capacity(items.len());
            for (i, c) in items.iter_mut().enumerate() {
                let t = dfa.index(state, i);
                keep.push(!child(dfa, scalar, counts, t, c));
            }
            let mut it = keep.into_iter();
            items.retain(|_| it.next().unwrap_or(true));
        }
        Value::String(s) => {
            if let Some(m) = scalar.text(profile, ctx, rule.map(|r| r as usize), s, counts) {
                *s = m;
            }
        }
        Value::Number(n) => {
            let text = n.to_string();
            match scalar.number(profile, ctx, rule.map(|r| r as usize), &text, counts) {
                None => {}
                Some(Scalar::Text(t)) => *v = Value::String(t),
                Some(Scalar::Number(t)) => {
                    if let Ok(n) = serde_json::from_str::<Value>(&t) {
                        *v = n;
                    }
                }
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

/// Parse, mask, serialize a whole body (decoded).
pub fn mask_document(
    profile: &Arc<Profile>,
    ctx: &MaskContext,
    kind: BodyKind,
    body: &[u8],
) -> Result<(Vec<u8>, Counts), serde_json::Error> {
    let mut counts = Counts::new(profile);
    let mut out = Vec::with_capacity(body.len());
    match kind {
        BodyKind::Json => {
            let mut v: Value = serde_json::from_slice(body)?;
            mask_value(profile, ctx, &mut v, &mut counts);
            serde_json::to_writer(&mut out, &v)?;
        }
        BodyKind::Ndjson => {
            for line in body.split(|b| *b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let mut v: Value = serde_json::from_slice(line)?;
                mask_value(profile, ctx, &mut v, &mut counts);
                serde_json::to_writer(&mut out, &v)?;
                out.push(b'\n');
            }
        }
    }
    Ok((out, counts))
}
