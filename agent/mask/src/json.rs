//! The streaming JSON transform: one pass over the bytes, no document tree.
//!
//! A tokenizer tracks the path to the current value (a stack of containers, each with
//! its state in the rules' path automaton) and rewrites the string and number values
//! that rules or detectors select; dropped members and elements are parsed but not
//! written. It is resumable at any byte: [`JsonStream::push`] takes chunks as they
//! arrive, and holds back at most one unfinished token (a string or number cut by a
//! chunk boundary, bounded by `max_value_bytes`). Output is compact JSON (insignificant
//! whitespace removed); values nothing selects are copied byte for byte.
//!
//! In `lines` mode (NDJSON) the input is a sequence of JSON values and each is
//! written on its own line.

use std::sync::Arc;

use memchr::memchr2;

use super::path::PathDfa;
use super::profile::Profile;
use super::{Counts, MaskContext, MaskError, ScalarMasker};
use crate::attach;
use crate::fhir::{Role, TypeCtx, UNKNOWN};
use crate::lookahead::{Lookahead, Scan};
use crate::ops::{Op, Scalar};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    pub(crate) state: u32,
    /// The rule in force at this node: its own match, else the nearest ancestor's.
    pub(crate) rule: Option<u32>,
    /// Inside a dropped member or element: parsed, not written.
    pub(crate) suppressed: bool,
    /// The FHIR datatype here (profiles with `[fhir]`).
    pub(crate) ty: TypeCtx,
}

#[derive(Debug)]
struct Frame {
    obj: bool,
    ctx: Ctx,
    /// A member or element was written (the next needs a comma).
    emitted: bool,
    next_index: usize,
    /// An extension whose `url` was read and is on the profile's allow-list.
    url_safe: bool,
    /// An attachment's `contentType` as read (profiles masking text attachments).
    content_type: Option<Box<str>>,
    /// An attachment's `data` read before its `contentType`: written when the
    /// object ends.
    deferred: Option<Box<Deferred>>,
}

/// A text attachment's `data` waiting for its object's `contentType`.
#[derive(Debug)]
struct Deferred {
    /// The member name, raw.
    key: Vec<u8>,
    /// The string's raw content (at most the rule's bound).
    raw: Vec<u8>,
    rule: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str {
    Key,
    /// Buffered, then masked or copied.
    Value,
    /// Not kept: replaced by the rule's placeholder (or nothing, when suppressed).
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Value,
    ObjFirst,
    ObjKey,
    Colon,
    ObjNext,
    ArrFirst,
    ArrNext,
    Str(Str, bool),
    Scalar,
    End,
}

pub struct JsonStream {
    profile: Arc<Profile>,
    ctx: Arc<MaskContext>,
    dfa: PathDfa,
    lines: bool,
    stack: Vec<Frame>,
    lex: Lex,
    /// The context of the value about to start (set when its key completes).
    vctx: Ctx,
    /// An unfinished token carried across chunks.
    pending: Vec<u8>,
    /// The raw (escaped) key of the member whose value comes next.
    key: Vec<u8>,
    decoded: String,
    counts: Counts,
    /// Bytes consumed before the current chunk (for error offsets).
    offset: u64,
    values: u64,
    max_value_bytes: usize,
    scalar: ScalarMasker,
    /// A resource or extension held until the member giving its type is read.
    lookahead: Option<Box<Lookahead>>,
}

const DEFAULT_MAX_VALUE: usize = 16 << 20;

/// Deepest nesting of arrays and objects accepted. FHIR resources nest a few dozen
/// levels at most; without a bound, a body of `[[[[...` would grow the container
/// stack with the body (memory no longer bounded by the buffer sizes).
pub const MAX_DEPTH: usize = 512;

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

#[inline]
fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

impl JsonStream {
    pub fn new(profile: Arc<Profile>, ctx: Arc<MaskContext>, lines: bool) -> JsonStream {
        let dfa = profile.dfa.clone();
        let root = root_ctx(&profile, &dfa);
        let counts = Counts::new(&profile);
        JsonStream {
            scalar: ScalarMasker::new(&profile),
            profile,
            ctx,
            dfa,
            lines,
            stack: Vec::with_capacity(32),
            lex: Lex::Value,
            vctx: root,
            pending: Vec::new(),
            key: Vec::new(),
            decoded: String::new(),
            counts,
            offset: 0,
            values: 0,
            max_value_bytes: DEFAULT_MAX_VALUE,
            lookahead: None,
        }
    }

    /// Longest string or number held while it is cut by chunk boundaries.
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.max_value_bytes = n;
        self
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    fn err(&self, at: usize, message: impl Into<String>) -> MaskError {
        MaskError::Syntax {
            offset: self.offset + at as u64,
            message: message.into(),
        }
    }

    fn root_ctx(&self) -> Ctx {
        root_ctx(&self.profile, &self.dfa)
    }

    /// Masks a chunk, appending output to `out`.
    pub fn push(&mut self, b: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        let mut i = 0;
        let n = b.len();
        while i < n {
            if self.lookahead.is_some() {
                i += self.look_ahead(&b[i..], out)?;
                continue;
            }
            match self.lex {
                Lex::Str(kind, mut esc) => {
                    let start = i;
                    let mut j = i;
                    let end = loop {
                        if esc {
                            if j >= n {
                                break None;
                            }
                            esc = false;
                            j += 1;
                            continue;
                        }
                        match memchr2(b'"', b'\\', &b[j..]) {
                            None => break None,
                            Some(k) if b[j + k] == b'"' => break Some(j + k),
                            Some(k) => {
                                esc = true;
                                j += k + 1;
                            }
                        }
                    };
                    match end {
                        None => {
                            let kind = self.attachment_bound(kind, n - start);
                            if kind != Str::Skip {
                                self.hold(&b[start..], i)?;
                            }
                            self.lex = Lex::Str(kind, esc);
                            i = n;
                        }
                        Some(e) => {
                            if self.pending.is_empty() {
                                self.string_done(kind, &b[start..e], out, e)?;
                            } else {
                                let mut held = std::mem::take(&mut self.pending);
                                if kind != Str::Skip {
                                    held.extend_from_slice(&b[start..e]);
                                }
                                let r = self.string_done(kind, &held, out, e);
                                held.clear();
                                self.pending = held;
                                r?;
                            }
                            i = e + 1;
                            if self.lex == Lex::Colon {
                                i = self.after_key(b, i, out)?;
                            }
                        }
                    }
                }
                Lex::Scalar => {
                    let start = i;
                    while i < n && is_scalar_byte(b[i]) {
                        i += 1;
                    }
                    if i == n {
                        self.hold(&b[start..], start)?;
                    } else if self.pending.is_empty() {
                        self.scalar_done(&b[start..i], out, i)?;
                    } else {
                        let mut held = std::mem::take(&mut self.pending);
                        held.extend_from_slice(&b[start..i]);
                        let r = self.scalar_done(&held, out, i);
                        held.clear();
                        self.pending = held;
                        r?;
                    }
                }
                _ => {
                    let c = b[i];
                    if is_ws(c) {
                        i += 1;
                        continue;
                    }
                    self.structural(c, out, i)?;
                    i += 1;
                    // Compact JSON: `,"` in an object starts the next member name.
                    if self.lex == Lex::ObjKey && b.get(i) == Some(&b'"') {
                        self.key.clear();
                        self.lex = Lex::Str(Str::Key, false);
                        i += 1;
                    }
                }
            }
        }
        self.offset += n as u64;
        Ok(())
    }

    /// Compact JSON: a member name is followed by its colon, and the colon by the
    /// value; taken here without a turn of the main loop for each (the same steps
    /// `structural` takes). Returns where the main loop resumes.
    #[inline]
    fn after_key(&mut self, b: &[u8], mut i: usize, out: &mut Vec<u8>) -> Result<usize, MaskError> {
        if b.get(i) != Some(&b':') {
            return Ok(i);
        }
        self.lex = Lex::Value;
        i += 1;
        match b.get(i) {
            Some(&c) if !is_ws(c) => {
                self.begin_value(c, out, i)?;
                Ok(i + 1)
            }
            _ => Ok(i),
        }
    }

    /// Holds bytes of the object being read ahead; once its type member is read (or
    /// the bound or its end is reached), sets what it gives and masks the held bytes.
    /// Returns the bytes of `b` taken.
    fn look_ahead(&mut self, b: &[u8], out: &mut Vec<u8>) -> Result<usize, MaskError> {
        let la = self.lookahead.as_mut().expect("reading ahead");
        let taken = match la.scan(b) {
            Scan::More => return Ok(b.len()),
            Scan::Done(n) => n,
        };
        self.replay(out)?;
        Ok(taken)
    }

    /// Ends reading ahead: the type found goes to the object's frame, then its held
    /// bytes are masked as if they had just arrived.
    fn replay(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let la = self.lookahead.take().expect("reading ahead");
        if let (Some(f), Some(raw)) = (&self.profile.fhir, &la.found) {
            let frame = self.stack.last_mut().expect("the object read ahead");
            let mut buf = String::new();
            if let Ok(text) = decode(raw, &mut buf) {
                if la.key == b"url" {
                    frame.url_safe = f.extension_allowed(text, frame.ctx.ty.trusted);
                } else {
                    frame.ctx.ty.ty = f.model().resource_type(text).unwrap_or(UNKNOWN);
                }
            }
        }
        let resume = self.offset;
        self.offset = la.offset;
        let r = self.push(&la.buf, out);
        self.offset = resume;
        r
    }

    /// Starts reading ahead in an object just opened (its `{` at `at`) whose type
    /// member decides how it is masked: a resource of any type, an extension.
    fn maybe_look_ahead(&mut self, ctx: Ctx, at: usize) {
        let Some(f) = &self.profile.fhir else { return };
        if ctx.suppressed || ctx.ty.sealed {
            return;
        }
        let key: &'static [u8] = if ctx.ty.ty == f.model().any_resource {
            b"resourceType"
        } else if ctx.ty.ty == f.model().extension {
            b"url"
        } else {
            return;
        };
        let offset = self.offset + at as u64 + 1;
        self.lookahead = Some(Box::new(Lookahead::new(key, offset)));
    }

    /// The input ended: anything unfinished is an error.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        if self.lookahead.is_some() {
            self.replay(out)?;
        }
        if self.lex == Lex::Scalar {
            let held = std::mem::take(&mut self.pending);
            self.scalar_done(&held, out, 0)?;
        }
        match self.lex {
            Lex::End => Ok(()),
            Lex::Value if self.stack.is_empty() && self.lines => Ok(()),
            Lex::Value if self.stack.is_empty() && self.values == 0 => {
                Err(self.err(0, "the body holds no JSON value"))
            }
            _ => Err(self.err(0, "the body ends inside a JSON value")),
        }
    }

    fn hold(&mut self, bytes: &[u8], at: usize) -> Result<(), MaskError> {
        if self.pending.len() + bytes.len() > self.max_value_bytes {
            return Err(self.err(
                at,
                format!(
                    "a single value is longer than {} bytes, more than masking holds",
                    self.max_value_bytes
                ),
            ));
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    fn structural(&mut self, c: u8, out: &mut Vec<u8>, at: usize) -> Result<(), MaskError> {
        match self.lex {
            Lex::Value => self.begin_value(c, out, at),
            Lex::End if self.lines => {
                self.vctx = self.root_ctx();
                self.begin_value(c, out, at)
            }
            Lex::End => Err(self.err(at, "data after the JSON value")),
            Lex::ArrFirst if c == b']' => self.close(out),
            Lex::ArrFirst => {
                self.vctx = self.element_ctx();
                self.begin_value(c, out, at)
            }
            Lex::ArrNext => match c {
                b',' => {
                    self.vctx = self.element_ctx();
                    self.lex = Lex::Value;
                    Ok(())
                }
                b']' => self.close(out),
                _ => Err(self.err(at, "expected `,` or `]` in an array")),
            },
            Lex::ObjFirst | Lex::ObjKey => match c {
                b'"' => {
                    self.key.clear();
                    self.lex = Lex::Str(Str::Key, false);
                    Ok(())
                }
                b'}' if self.lex == Lex::ObjFirst => self.close(out),
                _ => Err(self.err(at, "expected a member name")),
            },
            Lex::Colon => {
                if c != b':' {
                    return Err(self.err(at, "expected `:` after a member name"));
                }
                self.lex = Lex::Value;
                Ok(())
            }
            Lex::ObjNext => match c {
                b',' => {
                    self.lex = Lex::ObjKey;
                    Ok(())
                }
                b'}' => self.close(out),
                _ => Err(self.err(at, "expected `,` or `}` in an object")),
            },
            Lex::Str(..) | Lex::Scalar => unreachable!("handled by push"),
        }
    }

    /// The context of the next array element.
    fn element_ctx(&mut self) -> Ctx {
        let f = self.stack.last_mut().expect("inside an array");
        let index = f.next_index;
        f.next_index += 1;
        let parent = f.ctx;
        if parent.suppressed {
            return parent;
        }
        let t = self.dfa.index(parent.state, index);
        let ty = TypeCtx {
            role: Role::Plain,
            ..parent.ty
        };
        self.child(parent, t.state, t.matched, ty, None)
    }

    /// A child's context. `matched`: the path rule selecting it; `typed`: the rule
    /// its FHIR type gives. Path rules win, except inside a sealed (not allowed)
    /// extension value, where only the extension's rule counts.
    fn child(
        &mut self,
        parent: Ctx,
        state: u32,
        matched: Option<u32>,
        ty: TypeCtx,
        typed: Option<u32>,
    ) -> Ctx {
        child_ctx(
            &self.profile,
            &mut self.counts,
            parent,
            state,
            matched,
            ty,
            typed,
        )
    }

    /// Writes what precedes a value: the comma, and for a member its name.
    fn prefix(&mut self, out: &mut Vec<u8>) {
        if let Some(f) = self.stack.last_mut() {
            if f.emitted {
                out.push(b',');
            }
            f.emitted = true;
            if f.obj {
                out.push(b'"');
                out.extend_from_slice(&self.key);
                out.extend_from_slice(b"\":");
            }
        }
    }

    fn begin_value(&mut self, c: u8, out: &mut Vec<u8>, at: usize) -> Result<(), MaskError> {
        let mut ctx = self.vctx;
        match c {
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(self.err(at, format!("nested deeper than {MAX_DEPTH} levels")));
                }
                if let Some(f) = &self.profile.fhir {
                    let in_array = self.stack.last().is_some_and(|f| !f.obj);
                    if !ctx.suppressed && f.misplaced(ctx.ty, c == b'{', in_array) {
                        // Fail closed: the whole subtree under the default rule.
                        let (ty, rule) = f.misplaced_ctx();
                        ctx = child_ctx(
                            &self.profile,
                            &mut self.counts,
                            ctx,
                            ctx.state,
                            None,
                            ty,
                            Some(rule),
                        );
                    }
                }
                if !ctx.suppressed {
                    self.prefix(out);
                    out.push(c);
                }
                self.stack.push(Frame {
                    obj: c == b'{',
                    ctx,
                    emitted: false,
                    next_index: 0,
                    url_safe: false,
                    content_type: None,
                    deferred: None,
                });
                self.lex = if c == b'{' {
                    self.maybe_look_ahead(ctx, at);
                    Lex::ObjFirst
                } else {
                    Lex::ArrFirst
                };
            }
            b'"' => {
                // A dropped `contentType` is still read: `data` is decided by it.
                let skip = (ctx.suppressed && ctx.ty.role != Role::ContentType)
                    || (ctx.ty.role == Role::Plain
                        && ctx
                            .rule
                            .is_some_and(|r| self.profile.rules[r as usize].op == Op::Redact));
                self.lex = Lex::Str(if skip { Str::Skip } else { Str::Value }, false);
            }
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                self.pending.clear();
                self.pending.push(c);
                self.lex = Lex::Scalar;
            }
            _ => return Err(self.err(at, "expected a JSON value")),
        }
        Ok(())
    }

    fn close(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        if let Some(d) = self.stack.last_mut().and_then(|f| f.deferred.take()) {
            self.key.clone_from(&d.key);
            let mut buf = String::new();
            // Validated when it was read.
            let b64 = decode(&d.raw, &mut buf).ok();
            self.attachment_out(d.rule, b64, out);
        }
        let f = self.stack.pop().expect("a container is open");
        if !f.ctx.suppressed {
            out.push(if f.obj { b'}' } else { b']' });
        }
        self.after_value(out, f.ctx.suppressed);
        Ok(())
    }

    fn after_value(&mut self, out: &mut Vec<u8>, suppressed: bool) {
        match self.stack.last() {
            None => {
                self.values += 1;
                if self.lines && !suppressed {
                    out.push(b'\n');
                }
                self.lex = Lex::End;
            }
            Some(f) => self.lex = if f.obj { Lex::ObjNext } else { Lex::ArrNext },
        }
    }

    fn string_done(
        &mut self,
        kind: Str,
        raw: &[u8],
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), MaskError> {
        match kind {
            Str::Key => {
                self.key.clear();
                self.key.extend_from_slice(raw);
                let frame = self.stack.last().expect("inside an object");
                let (parent, url_safe) = (frame.ctx, frame.url_safe);
                let off = self.offset + at as u64;
                self.vctx = if parent.suppressed {
                    parent
                } else {
                    let key = decode(raw, &mut self.decoded).map_err(|m| syntax(off, m))?;
                    let t = self.dfa.key(parent.state, key);
                    let (ty, typed) = match &self.profile.fhir {
                        Some(f) => f.key(parent.ty, key, url_safe),
                        None => (parent.ty, None),
                    };
                    self.child(parent, t.state, t.matched, ty, typed)
                };
                self.lex = Lex::Colon;
                return Ok(());
            }
            Str::Skip => {
                let ctx = self.vctx;
                if !ctx.suppressed {
                    let entity = self.profile.rules[ctx.rule.expect("redact rule") as usize].entity;
                    self.counts.add(entity);
                    self.prefix(out);
                    out.extend_from_slice(&self.profile.placeholders[entity]);
                }
            }
            Str::Value
                if self.vctx.ty.role != Role::Plain
                    && (!self.vctx.suppressed || self.vctx.ty.role == Role::ContentType) =>
            {
                match self.vctx.ty.role {
                    Role::ResourceType | Role::ExtensionUrl => {
                        self.structure_value(raw, out, at)?
                    }
                    Role::AttachmentData => self.attachment(raw, out, at)?,
                    Role::ContentType => {
                        let off = self.offset + at as u64;
                        let text = decode(raw, &mut self.decoded).map_err(|m| syntax(off, m))?;
                        let f = self.stack.last_mut().expect("inside an object");
                        f.content_type = Some(text.into());
                        if !self.vctx.suppressed {
                            self.plain_value(raw, out, at)?;
                        }
                    }
                    Role::Plain => unreachable!("guarded"),
                }
            }
            Str::Value => self.plain_value(raw, out, at)?,
        }
        self.after_value(out, self.vctx.suppressed);
        Ok(())
    }

    /// A string value masked by the rule in force, or the detectors.
    #[inline]
    fn plain_value(&mut self, raw: &[u8], out: &mut Vec<u8>, at: usize) -> Result<(), MaskError> {
        let ctx = self.vctx;
        let off = self.offset + at as u64;
        let rule = ctx.rule.map(|r| r as usize);
        let (plain, scan) = self.profile.detectors.classify(raw);
        let keep = rule.is_some_and(|r| self.profile.rules[r].op == Op::Keep);
        let masked = if keep || (rule.is_none() && !scan) {
            // Copied as is: only validated.
            if !plain {
                decode(raw, &mut self.decoded).map_err(|m| syntax(off, m))?;
            }
            None
        } else {
            let text = if plain {
                // SAFETY: `classify` found only printable ASCII bytes.
                unsafe { std::str::from_utf8_unchecked(raw) }
            } else {
                decode(raw, &mut self.decoded).map_err(|m| syntax(off, m))?
            };
            self.scalar
                .text_scanned(&self.profile, &self.ctx, rule, text, scan, &mut self.counts)
        };
        self.prefix(out);
        match masked {
            None => {
                out.push(b'"');
                out.extend_from_slice(raw);
                out.push(b'"');
            }
            Some(m) => write_str(out, &m),
        }
        Ok(())
    }

    /// The text-attachment rule in force at an attachment's `data`, if any.
    fn text_rule(&self) -> Option<(u32, attach::TextAttachments)> {
        let r = self.vctx.rule?;
        Some((r, self.profile.rules[r as usize].text?))
    }

    /// An attachment's `data` string cut by a chunk boundary: past what its rule
    /// masks it is not held but dropped (counted here, or by `Skip` when the rule
    /// redacts). `more`: the bytes about to be held.
    #[inline]
    fn attachment_bound(&mut self, kind: Str, more: usize) -> Str {
        if kind != Str::Value || self.vctx.ty.role != Role::AttachmentData {
            return kind;
        }
        let Some((r, t)) = self.text_rule() else {
            return kind;
        };
        if self.pending.len() + more <= self.raw_bound(t) {
            return kind;
        }
        self.pending.clear();
        let rule = &self.profile.rules[r as usize];
        if rule.op == Op::Drop {
            self.counts.add(rule.entity);
            self.vctx.suppressed = true;
        }
        Str::Skip
    }

    /// The longest raw `data` string held: room for JSON escapes and line breaks
    /// (`attach` checks the exact bound on the decoded text). Longer is dropped
    /// whether a chunk boundary cuts it or not.
    fn raw_bound(&self, t: attach::TextAttachments) -> usize {
        (t.max_encoded() + t.max_encoded() / 8 + 64).min(self.max_value_bytes)
    }

    /// An attachment's `data` under a rule that may mask it as text: masked now when
    /// the object's `contentType` was read, else once the object ends.
    fn attachment(&mut self, raw: &[u8], out: &mut Vec<u8>, at: usize) -> Result<(), MaskError> {
        let Some((r, t)) = self.text_rule() else {
            return self.plain_value(raw, out, at);
        };
        if raw.len() > self.raw_bound(t) {
            self.attachment_out(r, None, out);
            return Ok(());
        }
        let off = self.offset + at as u64;
        let b64 = decode(raw, &mut self.decoded)
            .map_err(|m| syntax(off, m))?
            .to_owned();
        let f = self.stack.last_mut().expect("inside an object");
        if f.content_type.is_none() {
            f.deferred = Some(Box::new(Deferred {
                key: self.key.clone(),
                raw: raw.to_vec(),
                rule: r,
            }));
            return Ok(());
        }
        self.attachment_out(r, Some(&b64), out);
        Ok(())
    }

    /// Writes an attachment's `data` (`b64`; `None`: too long) under text rule `r`:
    /// its masked text, else what the rule makes of other attachments.
    fn attachment_out(&mut self, r: u32, b64: Option<&str>, out: &mut Vec<u8>) {
        let rule = &self.profile.rules[r as usize];
        let text = rule.text.expect("a text rule");
        let f = self.stack.last().expect("inside an object");
        let masked = match b64 {
            Some(b64) => attach::mask_data(
                &self.profile,
                &self.ctx,
                &mut self.scalar,
                text,
                rule.entity,
                f.content_type.as_deref(),
                b64,
                &mut self.counts,
            ),
            None => {
                self.counts.add(rule.entity);
                None
            }
        };
        match masked {
            Some(m) => {
                self.prefix(out);
                write_str(out, &m);
            }
            None if rule.op == Op::Redact => {
                let e = rule.entity;
                self.prefix(out);
                out.extend_from_slice(&self.profile.placeholders[e]);
            }
            None => {}
        }
    }

    /// A `resourceType` or an extension's `url`: read for structure (the object's
    /// type; whether the extension is allowed), then masked like any value unless
    /// it names a resource type.
    fn structure_value(
        &mut self,
        raw: &[u8],
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), MaskError> {
        let off = self.offset + at as u64;
        let text = decode(raw, &mut self.decoded).map_err(|m| syntax(off, m))?;
        let fhir = self.profile.fhir.as_ref().expect("roles come from [fhir]");
        let ctx = self.vctx;
        let mut rule = ctx.rule.map(|r| r as usize);
        let frame = self.stack.last_mut().expect("inside an object");
        match ctx.ty.role {
            Role::ResourceType => {
                if let Some(t) = fhir.model().resource_type(text) {
                    frame.ctx.ty.ty = t;
                    rule = None;
                } else {
                    frame.ctx.ty.ty = UNKNOWN;
                    rule = Some(fhir.default_rule as usize);
                }
            }
            Role::ExtensionUrl => {
                frame.url_safe = fhir.extension_allowed(text, frame.ctx.ty.trusted)
            }
            Role::Plain | Role::ContentType | Role::AttachmentData => {
                unreachable!("masked by string_done")
            }
        }
        let masked = match rule {
            Some(r) if self.profile.rules[r].op == Op::Keep => None,
            None => None,
            Some(_) => {
                let text = text.to_owned();
                self.scalar
                    .text(&self.profile, &self.ctx, rule, &text, &mut self.counts)
            }
        };
        self.prefix(out);
        match masked {
            None => {
                out.push(b'"');
                out.extend_from_slice(raw);
                out.push(b'"');
            }
            Some(m) => write_str(out, &m),
        }
        Ok(())
    }

    fn scalar_done(&mut self, tok: &[u8], out: &mut Vec<u8>, at: usize) -> Result<(), MaskError> {
        let ctx = self.vctx;
        if ctx.ty.role == Role::AttachmentData && !ctx.suppressed {
            // Not base64 text: not masked as text, not kept.
            if let Some((r, _)) = self.text_rule() {
                if !matches!(tok, b"true" | b"false" | b"null") && !valid_number(tok) {
                    return Err(self.err(at, "not a JSON number or literal"));
                }
                self.attachment_out(r, None, out);
                self.after_value(out, false);
                return Ok(());
            }
        }
        match tok {
            b"true" | b"false" | b"null" => {
                if !ctx.suppressed {
                    self.prefix(out);
                    out.extend_from_slice(tok);
                }
            }
            _ => {
                if !valid_number(tok) {
                    return Err(self.err(at, "not a JSON number or literal"));
                }
                if !ctx.suppressed {
                    let text = std::str::from_utf8(tok).expect("ASCII");
                    let masked = self.scalar.number(
                        &self.profile,
                        &self.ctx,
                        ctx.rule.map(|r| r as usize),
                        text,
                        &mut self.counts,
                    );
                    self.prefix(out);
                    match masked {
                        None => out.extend_from_slice(tok),
                        Some(Scalar::Number(n)) => out.extend_from_slice(n.as_bytes()),
                        Some(Scalar::Text(t)) => write_str(out, &t),
                    }
                }
            }
        }
        self.after_value(out, ctx.suppressed);
        Ok(())
    }
}

/// A child's context. `matched`: the path rule selecting it; `typed`: the rule
/// its FHIR type gives. Path rules win, except inside a sealed (not allowed)
/// extension value, where only the extension's rule counts.
pub(crate) fn child_ctx(
    profile: &Profile,
    counts: &mut Counts,
    parent: Ctx,
    state: u32,
    matched: Option<u32>,
    ty: TypeCtx,
    typed: Option<u32>,
) -> Ctx {
    let own = if ty.sealed { typed } else { matched.or(typed) };
    let mut suppressed = false;
    if let Some(m) = own {
        let r = &profile.rules[m as usize];
        // A text-attachment rule decides at the value (its `contentType`).
        if r.op == Op::Drop && !(ty.role == Role::AttachmentData && r.text.is_some()) {
            counts.add(r.entity);
            suppressed = true;
        }
    }
    Ctx {
        state,
        rule: own.or(parent.rule),
        suppressed,
        ty,
    }
}

/// The context at a document's root: the `$` rule, else the profile's default; an
/// unknown resource until `resourceType` says which.
pub(crate) fn root_ctx(profile: &Profile, dfa: &PathDfa) -> Ctx {
    let (ty, default) = match &profile.fhir {
        Some(f) => (f.root(), Some(f.default_rule)),
        None => (
            TypeCtx {
                ty: UNKNOWN,
                role: Role::Plain,
                trusted: false,
                sealed: false,
            },
            None,
        ),
    };
    Ctx {
        state: dfa.root(),
        rule: dfa.root_match().or(default),
        suppressed: false,
        ty,
    }
}

fn syntax(offset: u64, message: &str) -> MaskError {
    MaskError::Syntax {
        offset,
        message: message.to_owned(),
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
pub fn valid_number(t: &[u8]) -> bool {
    let mut i = 0;
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < t.len() && t[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > s
    };
    if t.first() == Some(&b'-') {
        i += 1;
    }
    match t.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if t.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == t.len()
}

/// The text of a JSON string's raw content (between the quotes), validated.
pub fn decode<'a>(raw: &'a [u8], buf: &'a mut String) -> Result<&'a str, &'static str> {
    // Most strings are printable ASCII without escapes: one pass settles them (a
    // fold without early exit, which the compiler vectorizes).
    if is_plain(raw) {
        // SAFETY: every byte is printable ASCII.
        return Ok(unsafe { std::str::from_utf8_unchecked(raw) });
    }
    if raw.iter().any(|b| *b < 0x20) {
        return Err("control character in a string");
    }
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw).map_err(|_| "a string is not valid UTF-8");
    }
    let s = std::str::from_utf8(raw).map_err(|_| "a string is not valid UTF-8")?;
    buf.clear();
    let mut chars = s.char_indices();
    let hex4 = |at: usize| -> Result<u32, &'static str> {
        s.get(at..at + 4)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or("a `\\u` escape needs four hex digits")
    };
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            buf.push(c);
            continue;
        }
        let (_, e) = chars.next().ok_or("a string ends inside an escape")?;
        match e {
            '"' => buf.push('"'),
            '\\' => buf.push('\\'),
            '/' => buf.push('/'),
            'b' => buf.push('\u{8}'),
            'f' => buf.push('\u{c}'),
            'n' => buf.push('\n'),
            'r' => buf.push('\r'),
            't' => buf.push('\t'),
            'u' => {
                let hi = hex4(i + 2)?;
                for _ in 0..4 {
                    chars.next();
                }
                let c = if (0xd800..0xdc00).contains(&hi) {
                    if s.get(i + 6..i + 8) != Some("\\u") {
                        return Err("a lone surrogate in a `\\u` escape");
                    }
                    let lo = hex4(i + 8)?;
                    if !(0xdc00..0xe000).contains(&lo) {
                        return Err("a lone surrogate in a `\\u` escape");
                    }
                    for _ in 0..6 {
                        chars.next();
                    }
                    0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                } else {
                    hi
                };
                buf.push(char::from_u32(c).ok_or("a lone surrogate in a `\\u` escape")?);
            }
            _ => return Err("unknown escape in a string"),
        }
    }
    Ok(buf.as_str())
}

/// Printable ASCII without a backslash: a JSON string's raw content that is its text.
#[inline]
pub fn is_plain(raw: &[u8]) -> bool {
    raw.iter().fold(true, |ok, &b| {
        ok & ((0x20..0x80).contains(&b) & (b != b'\\'))
    })
}

/// Writes `s` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    // Masked values rarely need an escape: copied whole when none does.
    if b.iter()
        .fold(true, |ok, &c| ok & (c >= 0x20) & (c != b'"') & (c != b'\\'))
    {
        out.reserve(b.len() + 2);
        out.push(b'"');
        out.extend_from_slice(b);
        out.push(b'"');
        return;
    }
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(format!("\\u{c:04x}").as_bytes());
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}
