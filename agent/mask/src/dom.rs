//! The same masking over a parsed document (`serde_json::Value`): parse, walk, mask,
//! serialize. It shares rules, operators and detectors with the streaming transform
//! but not the traversal, so the tests use it as the reference the stream must
//! agree with, and `phigate mask --engine dom` is the benchmark's peer.

use std::sync::Arc;

use serde_json::Value;

use super::attach;
use super::fhir::{FhirRules, Role, TypeCtx};
use super::ops::{Op, Scalar};
use super::path::{PathDfa, Trans};
use super::{BodyKind, Counts, MaskContext, Profile, ScalarMasker};

/// Masks a parsed value in place.
pub fn mask_value(profile: &Profile, ctx: &MaskContext, v: &mut Value, counts: &mut Counts) {
    let dfa = profile.dfa.clone();
    let root = Node {
        state: dfa.root(),
        rule: dfa
            .root_match()
            .or(profile.fhir.as_ref().map(|f| f.default_rule)),
        ty: profile.fhir.as_ref().map(FhirRules::root),
    };
    let mut w = Walker {
        profile,
        ctx,
        dfa,
        scalar: ScalarMasker::new(profile),
        counts,
    };
    w.walk(v, root);
}

/// Where the walk is: path automaton state, rule in force, FHIR type.
#[derive(Clone, Copy)]
struct Node {
    state: u32,
    rule: Option<u32>,
    ty: Option<TypeCtx>,
}

struct Walker<'a> {
    profile: &'a Profile,
    ctx: &'a MaskContext,
    dfa: PathDfa,
    scalar: ScalarMasker,
    counts: &'a mut Counts,
}

impl Walker<'_> {
    /// The child's node, or `None` when it is dropped (as the stream decides it).
    fn child(
        &mut self,
        parent: Node,
        t: Trans,
        ty: Option<TypeCtx>,
        typed: Option<u32>,
    ) -> Option<Node> {
        let own = if ty.is_some_and(|t| t.sealed) {
            typed
        } else {
            t.matched.or(typed)
        };
        if let Some(m) = own {
            let r = &self.profile.rules[m as usize];
            // A text-attachment rule decides at the value (its `contentType`).
            let text = ty.is_some_and(|t| t.role == Role::AttachmentData) && r.text.is_some();
            if r.op == Op::Drop && !text {
                self.counts.add(r.entity);
                return None;
            }
        }
        Some(Node {
            state: t.state,
            rule: own.or(parent.rule),
            ty,
        })
    }

    /// A container where the model expects a scalar (see
    /// [`FhirRules::misplaced`]): its node sealed under the default rule, `None`
    /// when that drops it (as the stream decides it).
    fn misplaced(&mut self, v: &Value, n: Node, in_array: bool) -> Option<Node> {
        let (Some(f), Some(ty)) = (&self.profile.fhir, n.ty) else {
            return Some(n);
        };
        let object = match v {
            Value::Object(_) => true,
            Value::Array(_) => false,
            _ => return Some(n),
        };
        if !f.misplaced(ty, object, in_array) {
            return Some(n);
        }
        let (ty, rule) = f.misplaced_ctx();
        let t = Trans {
            state: n.state,
            matched: None,
        };
        self.child(n, t, Some(ty), Some(rule))
    }

    /// An object's type once its `resourceType` is read (the DOM can look ahead;
    /// the stream needs it first).
    fn object_type(&self, map: &serde_json::Map<String, Value>, node: Node) -> Node {
        let (Some(f), Some(mut ty)) = (&self.profile.fhir, node.ty) else {
            return node;
        };
        if f.model().is_resource(ty.ty) {
            if let Some(Value::String(rt)) = map.get("resourceType") {
                ty.ty = f.model().resource_type(rt).unwrap_or(crate::fhir::UNKNOWN);
            }
        }
        Node {
            ty: Some(ty),
            ..node
        }
    }

    fn walk(&mut self, v: &mut Value, node: Node) {
        match v {
            Value::Object(map) => {
                let node = self.object_type(map, node);
                let url_safe = match (&self.profile.fhir, node.ty, map.get("url")) {
                    (Some(f), Some(t), Some(Value::String(u))) => f.extension_allowed(u, t.trusted),
                    _ => false,
                };
                // As the stream reads it: a string, or none.
                let content_type = map
                    .get("contentType")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let mut dropped = Vec::new();
                for (k, c) in map.iter_mut() {
                    let t = self.dfa.key(node.state, k);
                    let (ty, typed) = match (&self.profile.fhir, node.ty) {
                        (Some(f), Some(pt)) => {
                            let (ty, r) = f.key(pt, k, url_safe);
                            (Some(ty), r)
                        }
                        _ => (None, None),
                    };
                    match self
                        .child(node, t, ty, typed)
                        .and_then(|n| self.misplaced(c, n, false))
                    {
                        None => dropped.push(k.clone()),
                        Some(n) => {
                            if !self.attachment(c, n, content_type.as_deref()) {
                                dropped.push(k.clone());
                            }
                        }
                    }
                }
                for k in dropped {
                    map.remove(&k);
                }
            }
            Value::Array(items) => {
                let mut keep = Vec::with_capacity(items.len());
                for (i, c) in items.iter_mut().enumerate() {
                    let t = self.dfa.index(node.state, i);
                    let ty = node.ty.map(|t| TypeCtx {
                        role: Role::Plain,
                        ..t
                    });
                    match self
                        .child(node, t, ty, None)
                        .and_then(|n| self.misplaced(c, n, true))
                    {
                        None => keep.push(false),
                        Some(n) => {
                            self.walk(c, n);
                            keep.push(true);
                        }
                    }
                }
                let mut it = keep.into_iter();
                items.retain(|_| it.next().unwrap_or(true));
            }
            Value::String(s) => {
                let rule = node.rule.map(|r| r as usize);
                if let Some(m) = self
                    .scalar
                    .text(self.profile, self.ctx, rule, s, self.counts)
                {
                    *s = m;
                }
            }
            Value::Number(n) => {
                let text = n.to_string();
                let rule = node.rule.map(|r| r as usize);
                match self
                    .scalar
                    .number(self.profile, self.ctx, rule, &text, self.counts)
                {
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

    /// A member's value, or an attachment's `data` under a text-attachment rule
    /// (masked as text, else what the rule makes of it). Whether it stays.
    fn attachment(&mut self, c: &mut Value, n: Node, content_type: Option<&str>) -> bool {
        let text_rule =
            n.ty.filter(|t| t.role == Role::AttachmentData)
                .and(n.rule)
                .and_then(|r| Some((r, self.profile.rules[r as usize].text?)));
        let Some((r, text)) = text_rule else {
            self.member(c, n);
            return true;
        };
        let rule = &self.profile.rules[r as usize];
        let masked = match &*c {
            Value::String(s) => attach::mask_data(
                self.profile,
                self.ctx,
                &mut self.scalar,
                text,
                rule.entity,
                content_type,
                s,
                self.counts,
            ),
            // Not base64 text: not masked as text, not kept.
            _ => {
                self.counts.add(rule.entity);
                None
            }
        };
        match masked {
            Some(m) => *c = Value::String(m),
            None if rule.op == Op::Redact => {
                *c = Value::String(super::ops::placeholder(&self.profile.entities[rule.entity]))
            }
            None => return false,
        }
        true
    }

    /// A member's value: `resourceType` naming a resource stays as is.
    fn member(&mut self, c: &mut Value, n: Node) {
        if let (Some(f), Some(ty), Value::String(s)) = (&self.profile.fhir, n.ty, &*c) {
            if ty.role == Role::ResourceType {
                // As the stream: a known type is structure, not scanned.
                if f.model().resource_type(s).is_some() {
                    return;
                }
                let node = Node {
                    rule: Some(f.default_rule),
                    ..n
                };
                return self.walk(c, node);
            }
        }
        self.walk(c, n)
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
        BodyKind::Xml => {
            return Err(<serde_json::Error as serde::de::Error>::custom(
                "XML has no document-tree peer",
            ))
        }
    }
    Ok((out, counts))
}
