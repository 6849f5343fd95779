//! JSON paths of masking rules: the subset of RFC 9535 a single streaming pass can
//! evaluate. `$` root, `.name` / `['name']` member, `.*` / `[*]` wildcard, `[N]`
//! array index, and `..` descendant before any of them (`$..name`, `$..*`, `$..[0]`).
//!
//! Not supported (rejected with a reason): negative indices and slices (they need the
//! array's length before its elements), filters, and unions.
//!
//! [`JsonPath::matches`] is the plain recursive definition; [`PathDfa`] evaluates a
//! set of paths one step at a time (per key or index while descending), caching
//! state-set transitions so a key costs one hash lookup however many rules exist.

use std::fmt;

use rustc_hash::FxHashMap;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Name(String),
    Wildcard,
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Segment {
    /// `..`: the selector applies at any depth below the current node.
    pub descendant: bool,
    pub selector: Selector,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonPath {
    pub segments: Vec<Segment>,
    text: String,
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where a path is wrong: the character offset and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at character {pos}: {message}")]
pub struct PathError {
    pub pos: usize,
    pub message: String,
}

/// One step down a JSON document: an object member or an array element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl Selector {
    fn matches(&self, step: Step<'_>) -> bool {
        match (self, step) {
            (Selector::Wildcard, _) => true,
            (Selector::Name(n), Step::Key(k)) => n == k,
            (Selector::Index(i), Step::Index(j)) => *i == j,
            _ => false,
        }
    }
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, PathError> {
        let b = text.as_bytes();
        let err = |pos: usize, m: &str| PathError {
            pos,
            message: m.to_owned(),
        };
        if b.first() != Some(&b'$') {
            return Err(err(0, "a path starts with `$` (the document root)"));
        }
        let mut i = 1;
        let mut segments = Vec::new();
        while i < b.len() {
            let descendant;
            match b[i] {
                b'.' if b.get(i + 1) == Some(&b'.') => {
                    descendant = true;
                    i += 2;
                }
                b'.' => {
                    descendant = false;
                    i += 1;
                }
                b'[' => descendant = false,
                c => {
                    return Err(err(
                        i,
                        &format!("expected `.`, `..` or `[`, found `{}`", c as char),
                    ))
                }
            }
            let selector = match b.get(i) {
                None => return Err(err(i, "the path ends after a `.`")),
                Some(b'*') => {
                    i += 1;
                    Selector::Wildcard
                }
                Some(b'[') => {
                    let (sel, next) = parse_bracket(text, i)?;
                    i = next;
                    sel
                }
                Some(b'.') => return Err(err(i, "`...` is not a path segment")),
                Some(_) if b[i - 1] == b'.' => {
                    let start = i;
                    while i < b.len() && is_name_char(text, i, i == start) {
                        i += char_len(b[i]);
                    }
                    if i == start {
                        return Err(err(
                            i,
                            "expected a member name (letters, digits, `_`; write `['x-y']` for others), `*` or `[`",
                        ));
                    }
                    Selector::Name(text[start..i].to_owned())
                }
                Some(_) => unreachable!("`[` handled above"),
            };
            segments.push(Segment {
                descendant,
                selector,
            });
        }
        Ok(JsonPath {
            segments,
            text: text.to_owned(),
        })
    }

    /// Whether this path selects the node reached by `steps` from the root.
    pub fn matches(&self, steps: &[Step<'_>]) -> bool {
        fn go(segs: &[Segment], steps: &[Step<'_>]) -> bool {
            let Some((seg, rest)) = segs.split_first() else {
                return steps.is_empty();
            };
            if seg.descendant {
                (0..steps.len())
                    .any(|i| seg.selector.matches(steps[i]) && go(rest, &steps[i + 1..]))
            } else {
                !steps.is_empty() && seg.selector.matches(steps[0]) && go(rest, &steps[1..])
            }
        }
        go(&self.segments, steps)
    }
}

fn char_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// RFC 9535 member-name-shorthand: ALPHA / "_" / non-ASCII, then also DIGIT.
fn is_name_char(text: &str, i: usize, first: bool) -> bool {
    let c = text.as_bytes()[i];
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 || (!first && c.is_ascii_digit())
}

/// `[*]`, `[12]`, `['name']`, `["name"]`, starting at the `[`; returns the end.
fn parse_bracket(text: &str, open: usize) -> Result<(Selector, usize), PathError> {
    let b = text.as_bytes();
    let err = |pos: usize, m: &str| PathError {
        pos,
        message: m.to_owned(),
    };
    let skip_ws = |mut i: usize| {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(open + 1);
    let sel =
        match b.get(i) {
            None => return Err(err(i, "unclosed `[`")),
            Some(b'*') => {
                i += 1;
                Selector::Wildcard
            }
            Some(b'-') => return Err(err(
                i,
                "negative indices are not supported: a single pass cannot know an array's length",
            )),
            Some(c) if c.is_ascii_digit() => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if b[start] == b'0' && i - start > 1 {
                    return Err(err(start, "an index has no leading zeros"));
                }
                let n = text[start..i]
                    .parse()
                    .map_err(|_| err(start, "index out of range"))?;
                if b.get(skip_ws(i)) == Some(&b':') {
                    return Err(err(i, "slices are not supported"));
                }
                Selector::Index(n)
            }
            Some(&q) if q == b'\'' || q == b'"' => {
                let (name, next) = parse_quoted(text, i, q)?;
                i = next;
                Selector::Name(name)
            }
            Some(b'?') => return Err(err(i, "filter selectors are not supported")),
            Some(b':') => return Err(err(i, "slices are not supported")),
            Some(_) => return Err(err(i, "expected `*`, an index or a quoted name")),
        };
    i = skip_ws(i);
    match b.get(i) {
        Some(b']') => Ok((sel, i + 1)),
        Some(b',') => Err(err(
            i,
            "unions are not supported: write one rule per selector",
        )),
        _ => Err(err(i, "expected `]`")),
    }
}

fn parse_quoted(text: &str, open: usize, quote: u8) -> Result<(String, usize), PathError> {
    let b = text.as_bytes();
    let err = |pos: usize, m: &str| PathError {
        pos,
        message: m.to_owned(),
    };
    let mut out = String::new();
    let mut i = open + 1;
    loop {
        match b.get(i) {
            None => return Err(err(i, "unterminated quoted name")),
            Some(&c) if c == quote => return Ok((out, i + 1)),
            Some(b'\\') => {
                let e = *b.get(i + 1).ok_or_else(|| err(i, "unterminated escape"))?;
                i += 2;
                out.push(match e {
                    b'\\' => '\\',
                    b'/' => '/',
                    b'\'' => '\'',
                    b'"' => '"',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    b'u' => {
                        let hex = text
                            .get(i..i + 4)
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .ok_or_else(|| err(i, "`\\u` needs four hex digits"))?;
                        i += 4;
                        char::from_u32(hex).ok_or_else(|| err(i, "not a Unicode scalar value"))?
                    }
                    _ => return Err(err(i - 1, "unknown escape")),
                });
            }
            Some(c) if *c < 0x20 => return Err(err(i, "control character in a name")),
            Some(_) => {
                let ch = text[i..].chars().next().expect("in bounds");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
}

/// The result of one step: the state after it, and the first path (lowest index)
/// that selects the node reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trans {
    pub state: u32,
    pub matched: Option<u32>,
}

const UNKNOWN: u32 = u32::MAX;

/// Incremental matcher of a set of paths. States are sets of (path, position) pairs,
/// interned; transitions are computed on first use and cached per symbol. Keys that
/// no path names all share one symbol, so the cache is bounded by the paths, not by
/// the documents.
#[derive(Debug, Clone)]
pub struct PathDfa {
    paths: Vec<JsonPath>,
    /// First NFA state index of each path; a path of n segments has n states.
    base: Vec<usize>,
    words: usize,
    /// Literal names and indices in the paths -> symbol id (0: any other key,
    /// 1: any other index).
    names: FxHashMap<Box<str>, u32>,
    indices: FxHashMap<usize, u32>,
    nsym: usize,
    sets: Vec<Box<[u64]>>,
    ids: FxHashMap<Box<[u64]>, u32>,
    /// sets.len() * nsym transitions, (state, matched + 1), UNKNOWN until computed.
    table: Vec<(u32, u32)>,
    /// Cached [`Self::union`]s.
    unions: FxHashMap<(u32, u32), u32>,
}

impl PathDfa {
    pub fn new(paths: Vec<JsonPath>) -> PathDfa {
        let mut base = Vec::with_capacity(paths.len());
        let mut n = 0;
        let mut names = FxHashMap::default();
        let mut indices = FxHashMap::default();
        let mut nsym = 2u32;
        for p in &paths {
            base.push(n);
            n += p.segments.len();
            for s in &p.segments {
                match &s.selector {
                    Selector::Name(name) => {
                        names.entry(name.as_str().into()).or_insert_with(|| {
                            nsym += 1;
                            nsym - 1
                        });
                    }
                    Selector::Index(i) => {
                        indices.entry(*i).or_insert_with(|| {
                            nsym += 1;
                            nsym - 1
                        });
                    }
                    Selector::Wildcard => {}
                }
            }
        }
        let words = n.div_ceil(64).max(1);
        let mut dfa = PathDfa {
            paths,
            base,
            words,
            names,
            indices,
            nsym: nsym as usize,
            sets: Vec::new(),
            ids: FxHashMap::default(),
            table: Vec::new(),
            unions: FxHashMap::default(),
        };
        let mut init = vec![0u64; words];
        for (p, path) in dfa.paths.iter().enumerate() {
            if !path.segments.is_empty() {
                let s = dfa.base[p];
                init[s / 64] |= 1 << (s % 64);
            }
        }
        dfa.intern(init.into_boxed_slice());
        dfa
    }

    /// The state at the document root.
    pub fn root(&self) -> u32 {
        0
    }

    /// The first path selecting the root itself (`$`).
    pub fn root_match(&self) -> Option<u32> {
        self.paths
            .iter()
            .position(|p| p.segments.is_empty())
            .map(|p| p as u32)
    }

    pub fn paths(&self) -> &[JsonPath] {
        &self.paths
    }

    fn intern(&mut self, set: Box<[u64]>) -> u32 {
        if let Some(id) = self.ids.get(&set) {
            return *id;
        }
        let id = self.sets.len() as u32;
        self.sets.push(set.clone());
        self.ids.insert(set, id);
        self.table
            .extend(std::iter::repeat_n((UNKNOWN, 0), self.nsym));
        id
    }

    /// Steps into a member `key` of the node in `state`.
    #[inline]
    pub fn key(&mut self, state: u32, key: &str) -> Trans {
        let sym = self.names.get(key).copied().unwrap_or(0);
        self.step(state, sym, Step::Key(key))
    }

    /// Steps into element `index` of the array in `state`.
    #[inline]
    pub fn index(&mut self, state: u32, index: usize) -> Trans {
        let sym = if self.indices.is_empty() {
            1
        } else {
            self.indices.get(&index).copied().unwrap_or(1)
        };
        self.step(state, sym, Step::Index(index))
    }

    #[inline]
    fn step(&mut self, state: u32, sym: u32, step: Step<'_>) -> Trans {
        let slot = state as usize * self.nsym + sym as usize;
        let (next, m) = self.table[slot];
        if next != UNKNOWN {
            return Trans {
                state: next,
                matched: m.checked_sub(1),
            };
        }
        let t = self.compute(state, step);
        self.table[state as usize * self.nsym + sym as usize] =
            (t.state, t.matched.map_or(0, |m| m + 1));
        t
    }

    fn compute(&mut self, state: u32, step: Step<'_>) -> Trans {
        let cur = self.sets[state as usize].clone();
        let mut next = vec![0u64; self.words];
        let mut matched: Option<u32> = None;
        for (p, path) in self.paths.iter().enumerate() {
            for (pos, seg) in path.segments.iter().enumerate() {
                let s = self.base[p] + pos;
                if cur[s / 64] & (1 << (s % 64)) == 0 {
                    continue;
                }
                if seg.descendant {
                    next[s / 64] |= 1 << (s % 64);
                }
                if seg.selector.matches(step) {
                    if pos + 1 == path.segments.len() {
                        matched = Some(matched.map_or(p as u32, |m| m.min(p as u32)));
                    } else {
                        let t = s + 1;
                        next[t / 64] |= 1 << (t % 64);
                    }
                }
            }
        }
        let state = self.intern(next.into_boxed_slice());
        Trans { state, matched }
    }

    /// The state holding the positions of both `a` and `b` (XML, where an element
    /// may be a JSON member or an element of its array: both are followed).
    pub fn union(&mut self, a: u32, b: u32) -> u32 {
        if a == b {
            return a;
        }
        if let Some(u) = self.unions.get(&(a, b)) {
            return *u;
        }
        let set: Box<[u64]> = self.sets[a as usize]
            .iter()
            .zip(self.sets[b as usize].iter())
            .map(|(x, y)| x | y)
            .collect();
        let u = self.intern(set);
        self.unions.insert((a, b), u);
        u
    }

    /// Whether no path can match at or below nodes in `state`.
    pub fn is_dead(&self, state: u32) -> bool {
        self.sets[state as usize].iter().all(|w| *w == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> JsonPath {
        JsonPath::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_the_subset() {
        let x = p("$..name[0]['family name'].*[*]..[3]");
        let sel: Vec<(bool, Selector)> = x
            .segments
            .iter()
            .map(|s| (s.descendant, s.selector.clone()))
            .collect();
        assert_eq!(
            sel,
            vec![
                (true, Selector::Name("name".into())),
                (false, Selector::Index(0)),
                (false, Selector::Name("family name".into())),
                (false, Selector::Wildcard),
                (false, Selector::Wildcard),
                (true, Selector::Index(3)),
            ]
        );
        assert_eq!(p("$").segments.len(), 0);
        assert_eq!(
            p("$[\"a\\\"b\\u00e9\"]").segments[0].selector,
            Selector::Name("a\"bé".into())
        );
        assert_eq!(p("$.é1").segments[0].selector, Selector::Name("é1".into()));
    }

    #[test]
    fn rejects_with_position_and_reason() {
        for (s, pos, needle) in [
            ("name", 0, "starts with `$`"),
            ("$.", 2, "ends after"),
            ("$[-1]", 2, "negative"),
            ("$[1:2]", 3, "slices"),
            ("$[?@.a]", 2, "filter"),
            ("$['a','b']", 5, "unions"),
            ("$.1a", 2, "member name"),
            ("$['a]", 5, "unterminated"),
            ("$[01]", 2, "leading zeros"),
            ("$a", 1, "expected `.`"),
            ("$...a", 3, "`...`"),
        ] {
            let e = JsonPath::parse(s).unwrap_err();
            assert_eq!(e.pos, pos, "{s}: {e}");
            assert!(e.message.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn matching_follows_rfc9535() {
        use Step::*;
        let name = p("$..name");
        assert!(name.matches(&[Key("name")]));
        assert!(name.matches(&[Key("entry"), Index(3), Key("resource"), Key("name")]));
        assert!(!name.matches(&[Key("name"), Index(0)]));
        assert!(!name.matches(&[]));
        let fam = p("$..name[*].family");
        assert!(fam.matches(&[Key("a"), Key("name"), Index(2), Key("family")]));
        assert!(!fam.matches(&[Key("name"), Key("family")]));
        let child = p("$.entry[0].resource");
        assert!(child.matches(&[Key("entry"), Index(0), Key("resource")]));
        assert!(!child.matches(&[Key("entry"), Index(1), Key("resource")]));
        assert!(!child.matches(&[Key("x"), Key("entry"), Index(0), Key("resource")]));
        assert!(p("$").matches(&[]));
        assert!(p("$..*").matches(&[Index(4)]));
    }

    fn walk(dfa: &mut PathDfa, steps: &[Step<'_>]) -> Option<u32> {
        let mut s = dfa.root();
        let mut m = dfa.root_match();
        for st in steps {
            let t = match st {
                Step::Key(k) => dfa.key(s, k),
                Step::Index(i) => dfa.index(s, *i),
            };
            s = t.state;
            m = t.matched;
        }
        m
    }

    #[test]
    fn dfa_reports_the_first_matching_path() {
        use Step::*;
        let mut dfa = PathDfa::new(vec![p("$..a.b"), p("$..b"), p("$.x[1]")]);
        assert_eq!(walk(&mut dfa, &[Key("a"), Key("b")]), Some(0));
        assert_eq!(walk(&mut dfa, &[Key("c"), Key("b")]), Some(1));
        assert_eq!(walk(&mut dfa, &[Key("x"), Index(1)]), Some(2));
        assert_eq!(walk(&mut dfa, &[Key("x"), Index(2)]), None);
        assert_eq!(
            walk(&mut dfa, &[Key("q"), Key("a"), Key("a"), Key("b")]),
            Some(0)
        );
    }

    fn arb_selector() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("*".to_owned()),
            Just("[0]".to_owned()),
            Just("[1]".to_owned()),
            Just("[*]".to_owned()),
        ]
    }

    fn arb_path() -> impl Strategy<Value = String> {
        prop::collection::vec((any::<bool>(), arb_selector()), 1..4).prop_map(|segs| {
            let mut s = "$".to_owned();
            for (desc, sel) in segs {
                let bracket = sel.starts_with('[');
                s.push_str(match (desc, bracket) {
                    (true, _) => "..",
                    (false, true) => "",
                    (false, false) => ".",
                });
                s.push_str(&sel);
            }
            s
        })
    }

    #[derive(Debug, Clone)]
    enum OwnedStep {
        K(&'static str),
        I(usize),
    }

    fn arb_steps() -> impl Strategy<Value = Vec<OwnedStep>> {
        prop::collection::vec(
            prop_oneof![
                Just(OwnedStep::K("a")),
                Just(OwnedStep::K("b")),
                Just(OwnedStep::K("c")),
                (0usize..3).prop_map(OwnedStep::I)
            ],
            0..6,
        )
    }

    proptest! {
        /// The cached automaton agrees with the definition on every path.
        #[test]
        fn dfa_agrees_with_the_definition(paths in prop::collection::vec(arb_path(), 1..5), docs in prop::collection::vec(arb_steps(), 1..20)) {
            let parsed: Vec<JsonPath> = paths.iter().map(|s| p(s)).collect();
            let mut dfa = PathDfa::new(parsed.clone());
            for steps in docs {
                let steps: Vec<Step<'_>> = steps.iter().map(|s| match s {
                    OwnedStep::K(k) => Step::Key(k),
                    OwnedStep::I(i) => Step::Index(*i),
                }).collect();
                let want = parsed.iter().position(|p| p.matches(&steps)).map(|i| i as u32);
                prop_assert_eq!(walk(&mut dfa, &steps), want, "{:?} {:?}", paths, steps);
            }
        }

        #[test]
        fn the_parser_never_panics(s in "\\$[.\\[\\]'\"*a-z0-9\\\\-]{0,12}") {
            let _ = JsonPath::parse(&s);
        }
    }
}
