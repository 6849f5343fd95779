//! Reading ahead in one JSON object for the member that gives its FHIR type: a
//! resource's `resourceType`, an extension's `url`. Servers usually write it first,
//! but bulk exporters and generic serializers sort members by name (`birthDate`
//! before `resourceType`, an extension's nested `extension` before its `url`).
//!
//! The streaming masker holds an object's bytes (at most [`MAX_LOOKAHEAD`]) until
//! the member is read, then masks them knowing the type; past the bound, or when the
//! object has no such member, it masks them without (the allow-list's default:
//! fail closed). Memory stays bounded and the output does not depend on chunking.

/// Longest stretch of an object held before its type member.
pub const MAX_LOOKAHEAD: usize = 64 << 10;

#[derive(Debug)]
pub struct Lookahead {
    /// The object's bytes since its `{`.
    pub buf: Vec<u8>,
    /// Offset of `buf[0]` in the body (for error offsets).
    pub offset: u64,
    /// The member sought (`resourceType`, `url`).
    pub key: &'static [u8],
    depth: u32,
    in_str: bool,
    esc: bool,
    str_start: usize,
    /// The last `{`, `,` or `:` of the object itself: a string after `{` or `,` is a
    /// member name, after `:` a value.
    prev: u8,
    key_matches: bool,
    /// The member's raw value, once read.
    pub found: Option<Vec<u8>>,
}

/// Where a scan stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// All bytes taken; the member is not read yet.
    More,
    /// Done after `n` bytes of the slice (found, the object ended, or the bound).
    Done(usize),
}

impl Lookahead {
    pub fn new(key: &'static [u8], offset: u64) -> Lookahead {
        Lookahead {
            buf: Vec::new(),
            offset,
            key,
            depth: 1,
            in_str: false,
            esc: false,
            str_start: 0,
            prev: b'{',
            key_matches: false,
            found: None,
        }
    }

    /// Takes bytes of the object; they are held in `buf` up to where it stopped.
    pub fn scan(&mut self, b: &[u8]) -> Scan {
        for (j, &c) in b.iter().enumerate() {
            if self.buf.len() >= MAX_LOOKAHEAD {
                return Scan::Done(j);
            }
            self.buf.push(c);
            if self.step(c, self.buf.len() - 1) {
                return Scan::Done(j + 1);
            }
        }
        Scan::More
    }

    /// One byte, at `at` in `buf`; whether the scan is done.
    #[inline]
    fn step(&mut self, c: u8, at: usize) -> bool {
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if c == b'\\' {
                self.esc = true;
            } else if c == b'"' {
                self.in_str = false;
                return self.string_end(at);
            }
            return false;
        }
        match c {
            b'"' => {
                self.in_str = true;
                self.str_start = at + 1;
            }
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                return self.depth == 0;
            }
            b',' | b':' if self.depth == 1 => self.prev = c,
            _ => {}
        }
        false
    }

    /// A string of the object itself ended at `at` (its closing quote): a member
    /// name, or the value sought.
    fn string_end(&mut self, at: usize) -> bool {
        if self.depth != 1 {
            return false;
        }
        let raw = &self.buf[self.str_start..at];
        match self.prev {
            b'{' | b',' => {
                self.key_matches = raw == self.key;
                false
            }
            b':' if self.key_matches => {
                self.found = Some(raw.to_vec());
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &[u8], cut: usize) -> (Scan, Option<Vec<u8>>, usize) {
        let mut l = Lookahead::new(b"resourceType", 0);
        let first = l.scan(&text[..cut]);
        let r = match first {
            Scan::Done(n) => Scan::Done(n),
            Scan::More => match l.scan(&text[cut..]) {
                Scan::Done(n) => Scan::Done(cut + n),
                Scan::More => Scan::More,
            },
        };
        let held = l.buf.len();
        (r, l.found, held)
    }

    #[test]
    fn finds_the_member_of_the_object_itself_at_any_cut() {
        // After the `{`: nested members of the same name do not count.
        let text =
            br#""a":{"resourceType":"X"},"b":["resourceType"],"resourceType":"Patient","c":1}"#;
        let end = text.windows(8).position(|w| w == b"Patient\"").unwrap() + 8;
        for cut in 0..text.len() {
            let (r, found, held) = run(text, cut);
            assert_eq!(r, Scan::Done(end), "cut {cut}");
            assert_eq!(found.as_deref(), Some(&b"Patient"[..]), "cut {cut}");
            assert_eq!(held, end);
        }
        // The object ends first, escaped quotes do not end strings.
        let t = br#""n":"a\"resourceType\":","x":{}}, rest"#;
        let (r, found, _) = run(t, 3);
        let end = t.windows(2).position(|w| w == b"}}").unwrap() + 2;
        assert_eq!(r, Scan::Done(end));
        assert_eq!(found, None);
    }

    #[test]
    fn holds_at_most_the_bound() {
        let mut l = Lookahead::new(b"url", 0);
        let long = vec![b' '; MAX_LOOKAHEAD + 10];
        assert_eq!(l.scan(&long), Scan::Done(MAX_LOOKAHEAD));
        assert_eq!(l.buf.len(), MAX_LOOKAHEAD);
        assert!(l.found.is_none());
    }
}
