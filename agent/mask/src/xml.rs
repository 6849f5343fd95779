//! The streaming FHIR XML transform (`application/fhir+xml`): the same profile, type
//! contexts and rules as the JSON transform, one pass, no document tree.
//!
//! FHIR's XML form maps onto the JSON one: an element is a member (its name the key),
//! the `value` attribute is a primitive's value, `extension` carries its `url` as an
//! attribute (so it is known before the value: no reading ahead), a resource sits
//! inside its holder (`resource`, `contained`) as an element named by its type, and a
//! narrative's `div` is XHTML whose text and attributes are masked under the
//! narrative's rule. Repeated elements have no array in XML: a path rule is followed
//! both as the member and as its element (`name` and `name[k]`), so `$.name[*]` rules
//! hold too (more is masked, never less).
//!
//! Fails closed: a DOCTYPE, entity references other than the five predefined ones
//! and character references, a non-UTF-8 declaration, mismatched tags and anything
//! after the root element are errors. Comments and processing instructions are
//! dropped (they may carry PHI). Memory: an unfinished markup or text node is held
//! across chunks up to `max_value_bytes`, and nesting is bounded by [`MAX_DEPTH`].

use std::sync::Arc;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::fhir::{Role, UNKNOWN};
use crate::json::{child_ctx, root_ctx, Ctx, MAX_DEPTH};
use crate::ops::{placeholder, Op, Scalar};
use crate::path::PathDfa;
use crate::profile::Profile;
use crate::{Counts, MaskContext, MaskError, ScalarMasker};

const DEFAULT_MAX_VALUE: usize = 16 << 20;

/// What becomes of an attribute.
enum Attr {
    Keep,
    Replace(String),
    /// Dropped by its rule.
    Omit,
}

impl From<Option<Option<String>>> for Attr {
    fn from(v: Option<Option<String>>) -> Attr {
        match v {
            None => Attr::Keep,
            Some(None) => Attr::Omit,
            Some(Some(s)) => Attr::Replace(s),
        }
    }
}

/// What an open element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A FHIR element (or a resource).
    Fhir,
    /// Inside a narrative's XHTML: copied, its text masked under the `div`'s rule.
    Xhtml,
    /// A redacted narrative: its placeholder was written, the content is not.
    Replaced,
}

#[derive(Debug)]
struct Frame {
    /// The raw qualified name (for the end tag).
    name: Box<[u8]>,
    ctx: Ctx,
    mode: Mode,
    /// An extension whose `url` is on the allow-list.
    url_safe: bool,
    /// The previous child's name and how many of that name came in a row (its index
    /// in the JSON array).
    last_child: Box<[u8]>,
    run: usize,
}

pub struct XmlStream {
    profile: Arc<Profile>,
    ctx: Arc<MaskContext>,
    dfa: PathDfa,
    stack: Vec<Frame>,
    /// Bytes not parsed yet (an unfinished markup at the end of a chunk).
    pending: Vec<u8>,
    /// A text node being gathered (text, references and CDATA until the next markup).
    text: String,
    counts: Counts,
    scalar: ScalarMasker,
    /// Bytes consumed before `pending`.
    offset: u64,
    max_value_bytes: usize,
    root_done: bool,
    finished: bool,
}

/// FHIR XML does not mask text attachments (yet): its `data` and `contentType` are
/// plain elements, so the attachment rule drops or redacts `data` as written.
fn xml_role(mut ty: crate::fhir::TypeCtx) -> crate::fhir::TypeCtx {
    if matches!(ty.role, Role::AttachmentData | Role::ContentType) {
        ty.role = Role::Plain;
    }
    ty
}

fn is_xml_ws(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// `s` escaped for XML text or a double-quoted attribute value.
pub fn escape_into(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'&' => b"&amp;",
            b'"' => b"&quot;",
            b'\r' => b"&#13;",
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
}

/// The FHIR primitives written as JSON numbers (masked as numbers, like JSON).
fn numeric(name: &str) -> bool {
    matches!(name, "integer" | "decimal" | "positiveInt" | "unsignedInt")
}

impl XmlStream {
    pub fn new(profile: Arc<Profile>, ctx: Arc<MaskContext>) -> XmlStream {
        XmlStream {
            dfa: profile.dfa.clone(),
            counts: Counts::new(&profile),
            scalar: ScalarMasker::new(&profile),
            profile,
            ctx,
            stack: Vec::with_capacity(32),
            pending: Vec::new(),
            text: String::new(),
            offset: 0,
            max_value_bytes: DEFAULT_MAX_VALUE,
            root_done: false,
            finished: false,
        }
    }

    /// Longest markup or text node held while chunk boundaries cut it.
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.max_value_bytes = n;
        self
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    fn err(&self, at: u64, message: impl Into<String>) -> MaskError {
        MaskError::Syntax {
            offset: self.offset + at,
            message: format!("XML: {}", message.into()),
        }
    }

    /// Masks a chunk, appending output to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        self.pending.extend_from_slice(chunk);
        self.run(out)
    }

    /// The input ended: anything unfinished is an error.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        self.finished = true;
        self.run(out)?;
        self.flush_text(out)?;
        if !self.pending.is_empty() || !self.stack.is_empty() {
            return Err(self.err(0, "the body ends inside an element"));
        }
        if !self.root_done {
            return Err(self.err(0, "the body holds no XML element"));
        }
        Ok(())
    }

    /// Parses what `pending` holds; keeps an unfinished tail for the next chunk.
    fn run(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let buf = std::mem::take(&mut self.pending);
        let mut reader = Reader::from_reader(&buf[..]);
        let cfg = reader.config_mut();
        cfg.check_end_names = false;
        cfg.expand_empty_elements = false;
        // A reader per chunk: the open elements are this stream's stack, not its.
        cfg.allow_unmatched_ends = true;
        let mut good = 0usize;
        let result = loop {
            match reader.read_event() {
                Ok(Event::Eof) => break Ok(()),
                Ok(ev) => {
                    if let Err(e) = self.event(ev, out, good as u64) {
                        break Err(e);
                    }
                    good = reader.buffer_position() as usize;
                }
                // Cut by the chunk's end (or malformed: then it stays cut until the
                // bound or the end of the body says so).
                Err(e) if !self.finished && buf.len() - good <= self.max_value_bytes => {
                    let _ = e;
                    break Ok(());
                }
                Err(e) => break Err(self.err(reader.error_position(), e.to_string())),
            }
        };
        self.offset += good as u64;
        let mut buf = buf;
        buf.drain(..good);
        self.pending = buf;
        result?;
        if self.pending.len() > self.max_value_bytes {
            return Err(self.err(
                0,
                format!(
                    "a single markup is longer than {} bytes, more than masking holds",
                    self.max_value_bytes
                ),
            ));
        }
        Ok(())
    }

    fn event(&mut self, ev: Event<'_>, out: &mut Vec<u8>, at: u64) -> Result<(), MaskError> {
        match ev {
            Event::Text(t) => {
                let s = t.decode().map_err(|e| self.err(at, e.to_string()))?;
                self.gather(&s, at)
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| self.err(at, e.to_string()))?;
                self.gather(&s, at)
            }
            Event::GeneralRef(r) => {
                let c = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(|e| self.err(at, e.to_string()))?
                } else {
                    let name = r.decode().map_err(|e| self.err(at, e.to_string()))?;
                    quick_xml::escape::resolve_predefined_entity(&name)
                        .and_then(|s| s.chars().next())
                };
                let c = c.ok_or_else(|| {
                    self.err(at, "an entity reference other than the predefined ones")
                })?;
                let mut b = [0u8; 4];
                self.gather(c.encode_utf8(&mut b), at)
            }
            Event::DocType(_) => Err(self.err(at, "a DOCTYPE (entity declarations are refused)")),
            Event::Decl(d) => {
                if let Some(enc) = d.encoding() {
                    let enc = enc.map_err(|e| self.err(at, e.to_string()))?;
                    if !enc.eq_ignore_ascii_case(b"utf-8") {
                        return Err(self.err(at, "an encoding other than UTF-8"));
                    }
                }
                if self.offset + at == 0 {
                    out.extend_from_slice(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
                }
                Ok(())
            }
            // Dropped: free text nobody masks.
            Event::Comment(_) | Event::PI(_) | Event::Eof => self.flush_text(out),
            Event::Start(e) => {
                self.flush_text(out)?;
                self.start(&e, out, at, false)
            }
            Event::Empty(e) => {
                self.flush_text(out)?;
                self.start(&e, out, at, true)
            }
            Event::End(e) => {
                self.flush_text(out)?;
                let f = self
                    .stack
                    .pop()
                    .ok_or_else(|| self.err(at, "an end tag without a start tag"))?;
                if *f.name != *e.name().as_ref() {
                    return Err(self.err(at, "an end tag does not match its start tag"));
                }
                self.end(&f, out);
                Ok(())
            }
        }
    }

    fn gather(&mut self, s: &str, at: u64) -> Result<(), MaskError> {
        if self.text.len() + s.len() > self.max_value_bytes {
            return Err(self.err(
                at,
                format!(
                    "a text node is longer than {} bytes, more than masking holds",
                    self.max_value_bytes
                ),
            ));
        }
        self.text.push_str(s);
        Ok(())
    }

    /// Writes the gathered text node: whitespace between elements as is, XHTML text
    /// masked under the narrative's rule, other text (not FHIR) under the element's.
    fn flush_text(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        if self.text.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.text);
        let r = self.write_text(&text, out);
        self.text = text;
        self.text.clear();
        r
    }

    fn write_text(&mut self, text: &str, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let Some(f) = self.stack.last() else {
            if is_xml_ws(text) {
                return Ok(());
            }
            return Err(self.err(0, "text outside the root element"));
        };
        let ctx = f.ctx;
        if ctx.suppressed || f.mode == Mode::Replaced {
            return Ok(());
        }
        if is_xml_ws(text) {
            escape_into(out, text);
            return Ok(());
        }
        let masked = self.mask_text(ctx, ctx.rule, text);
        escape_into(out, masked.as_deref().unwrap_or(text));
        Ok(())
    }

    /// `text` masked under `rule` (detectors without one); `None`: unchanged.
    fn mask_text(&mut self, ctx: Ctx, rule: Option<u32>, text: &str) -> Option<String> {
        let _ = ctx;
        let rule = rule.map(|r| r as usize);
        if rule.is_some_and(|r| self.profile.rules[r].op == Op::Keep) {
            return None;
        }
        self.scalar
            .text(&self.profile, &self.ctx, rule, text, &mut self.counts)
    }

    /// The context of a child element named `local` of the element on top.
    fn child(&mut self, local: &str) -> (Ctx, Mode) {
        let Some(parent) = self.stack.last_mut() else {
            // The root element names the resource: no path step.
            let mut ctx = root_ctx(&self.profile, &self.dfa);
            if let Some(f) = &self.profile.fhir {
                ctx.ty.ty = f.model().resource_type(local).unwrap_or(UNKNOWN);
            }
            return (ctx, Mode::Fhir);
        };
        let p = parent.ctx;
        if parent.mode != Mode::Fhir || p.suppressed {
            return (p, parent.mode);
        }
        let run = if *parent.last_child == *local.as_bytes() {
            parent.run += 1;
            parent.run - 1
        } else {
            parent.last_child = local.as_bytes().into();
            parent.run = 1;
            0
        };
        let url_safe = parent.url_safe;
        if let Some(f) = &self.profile.fhir {
            if p.ty.ty == f.model().any_resource && !p.ty.sealed {
                // A resource inside its holder (`resource`, `contained`): named by its
                // type, no JSON member of its own.
                let mut ctx = p;
                ctx.ty.ty = f.model().resource_type(local).unwrap_or(UNKNOWN);
                if ctx.ty.ty == UNKNOWN {
                    ctx.rule = Some(f.default_rule);
                }
                return (ctx, Mode::Fhir);
            }
        }
        let k = self.dfa.key(p.state, local);
        let i = self.dfa.index(k.state, run);
        let state = self.dfa.union(k.state, i.state);
        let matched = match (k.matched, i.matched) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (ty, typed) = match &self.profile.fhir {
            Some(f) => f.key(p.ty, local, url_safe),
            None => (p.ty, None),
        };
        let ty = xml_role(ty);
        let ctx = child_ctx(
            &self.profile,
            &mut self.counts,
            p,
            state,
            matched,
            ty,
            typed,
        );
        let xhtml = local == "div"
            && self
                .profile
                .fhir
                .as_ref()
                .is_none_or(|f| ty.ty == UNKNOWN || f.model().name(ty.ty) == "xhtml");
        (ctx, if xhtml { Mode::Xhtml } else { Mode::Fhir })
    }

    fn start(
        &mut self,
        e: &BytesStart<'_>,
        out: &mut Vec<u8>,
        at: u64,
        empty: bool,
    ) -> Result<(), MaskError> {
        if self.root_done && self.stack.is_empty() {
            return Err(self.err(at, "a second root element"));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.err(at, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let local = std::str::from_utf8(e.local_name().into_inner())
            .map_err(|_| self.err(at, "an element name is not UTF-8"))?
            .to_owned();
        let (ctx, mut mode) = self.child(&local);
        let write = !ctx.suppressed && mode != Mode::Replaced;
        let redact_div = mode == Mode::Xhtml
            && self.stack.last().is_some_and(|f| f.mode == Mode::Fhir)
            && ctx
                .rule
                .is_some_and(|r| self.profile.rules[r as usize].op == Op::Redact);
        let mut url_safe = false;
        if write {
            out.push(b'<');
            out.extend_from_slice(e.name().as_ref());
        }
        for a in e.attributes() {
            let a = a.map_err(|x| self.err(at, x.to_string()))?;
            let value = a
                .unescape_value()
                .map_err(|x| self.err(at, x.to_string()))?;
            let key = a.key.as_ref();
            let masked = self.attribute(ctx, mode, &local, key, &value, &mut url_safe);
            if !write || (redact_div && !key.starts_with(b"xmlns")) {
                continue;
            }
            let masked = match masked {
                Attr::Omit => continue,
                Attr::Keep => None,
                Attr::Replace(m) => Some(m),
            };
            out.push(b' ');
            out.extend_from_slice(key);
            out.extend_from_slice(b"=\"");
            escape_into(out, masked.as_deref().unwrap_or(&value));
            out.push(b'"');
        }
        if redact_div && write {
            let entity = self.profile.rules[ctx.rule.expect("redact") as usize].entity;
            self.counts.add(entity);
            out.push(b'>');
            escape_into(out, &placeholder(&self.profile.entities[entity]));
            mode = Mode::Replaced;
            if empty {
                out.extend_from_slice(b"</");
                out.extend_from_slice(e.name().as_ref());
                out.push(b'>');
                return Ok(());
            }
        } else if write {
            out.extend_from_slice(if empty { b"/>" } else { b">" });
        }
        if !empty {
            self.stack.push(Frame {
                name: e.name().as_ref().into(),
                ctx,
                mode,
                url_safe,
                last_child: Box::default(),
                run: 0,
            });
        }
        if empty && self.stack.is_empty() {
            self.root_done = true;
        }
        Ok(())
    }

    /// An attribute's masked value. `value` is the primitive's
    /// value, `url` an extension's, `xmlns*` namespaces; others are members.
    fn attribute(
        &mut self,
        ctx: Ctx,
        mode: Mode,
        local: &str,
        key: &[u8],
        value: &str,
        url_safe: &mut bool,
    ) -> Attr {
        if key == b"xmlns" || key.starts_with(b"xmlns:") || ctx.suppressed {
            return Attr::Keep;
        }
        Attr::from(self.attribute_value(ctx, mode, local, key, value, url_safe))
    }

    /// [`Self::attribute`] for a value that is masked (`Some(None)`: dropped).
    fn attribute_value(
        &mut self,
        ctx: Ctx,
        mode: Mode,
        local: &str,
        key: &[u8],
        value: &str,
        url_safe: &mut bool,
    ) -> Option<Option<String>> {
        if mode != Mode::Fhir {
            return self.mask_text(ctx, ctx.rule, value).map(Some);
        }
        let fhir = self.profile.fhir.clone();
        if key == b"value" {
            let type_name = fhir
                .as_ref()
                .filter(|_| ctx.ty.ty != UNKNOWN)
                .map(|f| f.model().name(ctx.ty.ty));
            // A boolean is one bit, as JSON's `true`/`false` literals, which pass.
            if type_name == Some("boolean") && matches!(value, "true" | "false") {
                return None;
            }
            let numeric = type_name.is_some_and(numeric);
            if numeric {
                return match self.scalar.number(
                    &self.profile,
                    &self.ctx,
                    ctx.rule.map(|r| r as usize),
                    value,
                    &mut self.counts,
                )? {
                    Scalar::Number(n) | Scalar::Text(n) => Some(Some(n)),
                };
            }
            return self.mask_text(ctx, ctx.rule, value).map(Some);
        }
        let name = String::from_utf8_lossy(key);
        let k = self.dfa.key(ctx.state, &name);
        let (ty, typed) = match &fhir {
            Some(f) => f.key(ctx.ty, &name, false),
            None => (ctx.ty, None),
        };
        let ty = xml_role(ty);
        let c = child_ctx(
            &self.profile,
            &mut self.counts,
            ctx,
            k.state,
            k.matched,
            ty,
            typed,
        );
        if c.suppressed {
            return Some(None);
        }
        if ty.role == Role::ExtensionUrl {
            if let Some(f) = &fhir {
                *url_safe = local == "extension" || local == "modifierExtension";
                *url_safe &= f.extension_allowed(value, ctx.ty.trusted);
            }
            // As JSON: an extension's url is masked only under a rule that is not keep.
            c.rule?;
        }
        self.mask_text(c, c.rule, value).map(Some)
    }

    fn end(&mut self, f: &Frame, out: &mut Vec<u8>) {
        let parent_replaced = self.stack.last().is_some_and(|p| p.mode == Mode::Replaced);
        if !f.ctx.suppressed && !parent_replaced {
            out.extend_from_slice(b"</");
            out.extend_from_slice(&f.name);
            out.push(b'>');
        }
        if self.stack.is_empty() {
            self.root_done = true;
        }
    }
}
