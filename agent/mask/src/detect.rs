//! Detectors: identifiers found inside text values (free text, and fields no path rule
//! covers). Each is a regular expression for candidates plus, where the identifier
//! has one, a structural or checksum validation, to keep false positives low.
//!
//! A string is only scanned when it holds a byte some enabled detector needs (a digit
//! for most, `@` for e-mail, `:` for URLs and IPv6, `www.`), so the codes, names and
//! words that make up most of a FHIR document cost one table lookup per byte.

use regex::{Regex, RegexSet};

/// The built-in detectors, by the name profiles use.
pub const BUILTIN: &[&str] = &[
    "ssn",
    "phone",
    "email",
    "date",
    "zip",
    "ip",
    "url",
    "npi",
    "mbi",
    "credit_card",
    "vin",
];

/// `(?-u:\b)`: an ASCII word boundary, which the fast regex engines support on any text.
const B: &str = r"(?-u:\b)";
const MONTHS: &str = r"(?i:jan|feb|mar|apr|may|jun|jul|aug|sept?|oct|nov|dec)[a-z]*\.?";
/// MBI letters: A-Z without S, L, O, I, B, Z.
const MBI_L: &str = "[AC-HJKMNP-RT-Y]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Ssn,
    Phone,
    Date,
    Ip,
    Npi,
    Luhn,
    CreditCard,
    Vin,
    TrimUrl,
}

/// What a detector needs to see in a string before it is worth running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Digit,
    At,
    ColonOrWww,
    DigitOrColon,
    Always,
}

/// One compiled detector.
#[derive(Debug, Clone)]
pub struct Detector {
    pub name: String,
    regex: Regex,
    check: Check,
    trigger: Trigger,
}

impl Detector {
    /// A built-in detector by name.
    pub fn builtin(name: &str) -> Option<Detector> {
        let d = |pattern: String, check: Check, trigger: Trigger| {
            Some(Detector {
                name: name.to_owned(),
                regex: Regex::new(&pattern).expect("built-in detector pattern"),
                check,
                trigger,
            })
        };
        match name {
            "ssn" => d(
                format!(r"{B}[0-9]{{3}}[- ][0-9]{{2}}[- ][0-9]{{4}}{B}"),
                Check::Ssn,
                Trigger::Digit,
            ),
            "phone" => d(
                format!(
                    r"(?:\+?1[-. ]?)?(?:\([0-9]{{3}}\) ?|{B}[0-9]{{3}}[-. ])[0-9]{{3}}[-. ][0-9]{{4}}{B}|{B}[0-9]{{3}}-[0-9]{{4}}{B}"
                ),
                Check::Phone,
                Trigger::Digit,
            ),
            "email" => d(
                r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}".to_owned(),
                Check::None,
                Trigger::At,
            ),
            "date" => d(
                format!(
                    r"{B}(?:[0-9]{{4}}-[0-9]{{2}}(?:-[0-9]{{2}}(?:T[0-9]{{2}}:[0-9]{{2}}(?::[0-9]{{2}}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{{2}}:[0-9]{{2}})?)?)?|[0-9]{{1,2}}/[0-9]{{1,2}}/(?:[0-9]{{4}}|[0-9]{{2}})|{MONTHS} [0-9]{{1,2}}(?:st|nd|rd|th)?,? [0-9]{{4}}|[0-9]{{1,2}} {MONTHS},? [0-9]{{4}}){B}"
                ),
                Check::Date,
                Trigger::Digit,
            ),
            "zip" => d(
                format!(r"{B}[0-9]{{5}}(?:-[0-9]{{4}})?{B}"),
                Check::None,
                Trigger::Digit,
            ),
            "ip" => d(
                format!(
                    r"{B}(?:[0-9]{{1,3}}\.){{3}}[0-9]{{1,3}}{B}|(?i:[0-9a-f]{{0,4}}:){{2,7}}[0-9a-f]{{0,4}}"
                ),
                Check::Ip,
                Trigger::DigitOrColon,
            ),
            "url" => d(
                r#"(?i:(?:https?|ftp)://|www\.)[^\s"'<>()\[\]{}]+"#.to_owned(),
                Check::TrimUrl,
                Trigger::ColonOrWww,
            ),
            "npi" => d(format!(r"{B}[12][0-9]{{9}}{B}"), Check::Npi, Trigger::Digit),
            "mbi" => d(
                format!(
                    r"{B}[1-9]{MBI_L}[0-9AC-HJKMNP-RT-Y][0-9]-?{MBI_L}[0-9AC-HJKMNP-RT-Y][0-9]-?{MBI_L}{{2}}[0-9]{{2}}{B}"
                ),
                Check::None,
                Trigger::Digit,
            ),
            "credit_card" => d(
                format!(r"{B}[0-9](?:[ -]?[0-9]){{12,18}}{B}"),
                Check::CreditCard,
                Trigger::Digit,
            ),
            "vin" => d(
                format!(r"{B}[A-HJ-NPR-Z0-9]{{17}}{B}"),
                Check::Vin,
                Trigger::Digit,
            ),
            _ => None,
        }
    }

    /// A configured pattern (medical record, health plan, account numbers, ...).
    pub fn pattern(
        name: &str,
        regex: &str,
        luhn: bool,
        requires_digit: bool,
    ) -> Result<Detector, String> {
        let regex = Regex::new(regex).map_err(|e| {
            // The regex crate's message is multi-line; its last line says why.
            e.to_string()
                .lines()
                .last()
                .unwrap_or("invalid regular expression")
                .trim()
                .to_owned()
        })?;
        if regex.is_match("") {
            return Err("the pattern matches the empty string".into());
        }
        Ok(Detector {
            name: name.to_owned(),
            regex,
            check: if luhn { Check::Luhn } else { Check::None },
            trigger: if requires_digit {
                Trigger::Digit
            } else {
                Trigger::Always
            },
        })
    }

    /// The validated match within a candidate, if any (URLs lose trailing punctuation).
    fn validate(&self, s: &str, start: usize, end: usize) -> Option<(usize, usize)> {
        let m = &s[start..end];
        let ok = match self.check {
            Check::None => true,
            Check::Ssn => valid_ssn(m),
            Check::Phone => valid_phone(m),
            Check::Date => valid_date(m),
            Check::Ip => {
                if m.contains(':') {
                    m.parse::<std::net::Ipv6Addr>().is_ok()
                } else {
                    m.parse::<std::net::Ipv4Addr>().is_ok()
                }
            }
            Check::Npi => luhn(b"80840".iter().copied().chain(m.bytes())),
            Check::Luhn => {
                let digits: Vec<u8> = m.bytes().filter(u8::is_ascii_digit).collect();
                digits.len() >= 2 && luhn(digits.into_iter())
            }
            Check::CreditCard => valid_card(m),
            Check::Vin => valid_vin(m),
            Check::TrimUrl => {
                let trimmed = m.trim_end_matches(['.', ',', ';', ':', '!', '?']);
                return (trimmed.len() > 4).then_some((start, start + trimmed.len()));
            }
        };
        ok.then_some((start, end))
    }
}

/// A found identifier: byte range and the index of its detector in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub start: usize,
    pub end: usize,
    pub detector: usize,
}

const NOT_PLAIN: u8 = 1;
const TRIGGER: u8 = 2;

/// The detectors of one profile, in priority order (earlier wins an overlap that
/// starts at the same place with the same length).
#[derive(Debug, Clone)]
pub struct Detectors {
    list: Vec<Detector>,
    set: Option<RegexSet>,
    /// Bytes that make a string worth scanning.
    trigger: [bool; 256],
    /// Per byte: NOT_PLAIN | TRIGGER bits.
    class: [u8; 256],
    www: bool,
    always: bool,
}

impl Detectors {
    pub fn new(list: Vec<Detector>) -> Detectors {
        let mut trigger = [false; 256];
        let (mut www, mut always) = (false, false);
        for d in &list {
            let mut mark = |bytes: &[u8]| bytes.iter().for_each(|b| trigger[*b as usize] = true);
            match d.trigger {
                Trigger::Digit => mark(b"0123456789"),
                Trigger::At => mark(b"@"),
                Trigger::ColonOrWww => {
                    mark(b":");
                    www = true;
                }
                Trigger::DigitOrColon => mark(b"0123456789:"),
                Trigger::Always => always = true,
            }
        }
        let mut class = [0u8; 256];
        for (b, c) in class.iter_mut().enumerate() {
            if !(0x20..0x80).contains(&b) || b == usize::from(b'\\') {
                *c |= NOT_PLAIN;
            }
            if trigger[b] {
                *c |= TRIGGER;
            }
        }
        let set = (!list.is_empty()).then(|| {
            RegexSet::new(list.iter().map(|d| d.regex.as_str())).expect("patterns compiled alone")
        });
        Detectors {
            list,
            set,
            trigger,
            class,
            www,
            always,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.list[i].name
    }

    /// Cheap test: can any detector match in `s`?
    #[inline]
    pub fn worth_scanning(&self, s: &[u8]) -> bool {
        if self.list.is_empty() {
            return false;
        }
        self.always
            || s.iter().any(|b| self.trigger[*b as usize])
            || (self.www && memchr::memmem::find(s, b"www.").is_some())
    }

    /// One pass over a JSON string's raw bytes: whether it is plain (printable
    /// ASCII, no escapes: its text is its bytes) and whether detectors must see it.
    #[inline]
    pub fn classify(&self, raw: &[u8]) -> (bool, bool) {
        let mut acc = 0u8;
        for b in raw {
            acc |= self.class[*b as usize];
        }
        let plain = acc & NOT_PLAIN == 0;
        let worth = !self.list.is_empty()
            && (self.always
                || acc & TRIGGER != 0
                || (self.www && memchr::memmem::find(raw, b"www.").is_some()));
        (plain, worth)
    }

    /// Every identifier in `s`, validated, non-overlapping, in order.
    pub fn find(&self, s: &str, hits: &mut Vec<Hit>) {
        hits.clear();
        if self.worth_scanning(s.as_bytes()) {
            self.find_all(s, hits);
        }
    }

    /// [`Self::find`] without the prefilter (the caller ran it).
    pub fn find_all(&self, s: &str, hits: &mut Vec<Hit>) {
        hits.clear();
        let Some(set) = &self.set else { return };
        let matched = set.matches(s);
        if !matched.matched_any() {
            return;
        }
        for i in matched.iter() {
            let d = &self.list[i];
            for m in d.regex.find_iter(s) {
                if let Some((start, end)) = d.validate(s, m.start(), m.end()) {
                    hits.push(Hit {
                        start,
                        end,
                        detector: i,
                    });
                }
            }
        }
        // Earliest first; at the same start the longer; then the profile's order.
        hits.sort_by(|a, b| {
            a.start
                .cmp(&b.start)
                .then(b.end.cmp(&a.end))
                .then(a.detector.cmp(&b.detector))
        });
        let mut last_end = 0;
        hits.retain(|h| {
            if h.start < last_end {
                return false;
            }
            last_end = h.end;
            true
        });
    }
}

fn digits(s: &str) -> Vec<u8> {
    s.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// Luhn over ASCII digits (other bytes must be filtered by the caller).
pub fn luhn(ds: impl DoubleEndedIterator<Item = u8>) -> bool {
    let mut sum = 0u32;
    for (i, c) in ds.rev().enumerate() {
        let mut d = u32::from(c.wrapping_sub(b'0'));
        if d > 9 {
            return false;
        }
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

/// SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000.
fn valid_ssn(m: &str) -> bool {
    let d = digits(m);
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    area != 0 && area != 666 && area < 900 && (d[3], d[4]) != (0, 0) && d[5..] != [0, 0, 0, 0]
}

/// NANP: area code and exchange start with 2-9.
fn valid_phone(m: &str) -> bool {
    let mut d = digits(m);
    if d.len() == 11 && d[0] == 1 {
        d.remove(0);
    }
    match d.len() {
        10 => d[0] >= 2 && d[3] >= 2,
        7 => d[0] >= 2,
        _ => false,
    }
}

fn valid_date(m: &str) -> bool {
    let b = m.as_bytes();
    let num = |s: &[u8]| s.iter().fold(0u32, |a, c| a * 10 + u32::from(c - b'0'));
    if b.len() >= 7 && b[4] == b'-' {
        let month = num(&b[5..7]);
        let day_ok = b.len() < 10 || (1..=31).contains(&num(&b[8..10]));
        return (1..=12).contains(&month) && day_ok;
    }
    if m.contains('/') {
        let mut parts = m.split('/');
        let month = parts.next().map_or(0, |p| num(p.as_bytes()));
        let day = parts.next().map_or(0, |p| num(p.as_bytes()));
        return (1..=12).contains(&month) && (1..=31).contains(&day);
    }
    // "March 5, 2020" / "5 March 2020": the month name matched; check the day.
    m.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty() && p.len() <= 2)
        .all(|p| (1..=31).contains(&num(p.as_bytes())))
}

/// Luhn plus an issuer prefix of the major networks, 13-19 digits.
fn valid_card(m: &str) -> bool {
    let d = digits(m);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let prefix = |n: usize| d[..n].iter().fold(0u32, |a, c| a * 10 + u32::from(*c));
    let issuer = d[0] == 4
        || (51..=55).contains(&prefix(2))
        || (2221..=2720).contains(&prefix(4))
        || matches!(prefix(2), 34 | 37 | 35 | 36 | 38 | 65)
        || prefix(4) == 6011
        || (644..=649).contains(&prefix(3))
        || (300..=305).contains(&prefix(3));
    issuer && luhn(d.iter().map(|c| c + b'0'))
}

/// North American VIN check digit (position 9), with letters and digits both present.
fn valid_vin(m: &str) -> bool {
    let b = m.as_bytes();
    if !b.iter().any(u8::is_ascii_digit) || !b.iter().any(u8::is_ascii_alphabetic) {
        return false;
    }
    const WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];
    let value = |c: u8| -> u32 {
        match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'H' => u32::from(c - b'A') + 1,
            b'J'..=b'N' => u32::from(c - b'J') + 1,
            b'P' => 7,
            b'R'..=b'Z' => u32::from(c - b'R') + 9,
            _ => 0,
        }
    };
    let sum: u32 = b.iter().zip(WEIGHTS).map(|(c, w)| value(*c) * w).sum();
    let check = match sum % 11 {
        10 => b'X',
        r => b'0' + r as u8,
    };
    b[8] == check
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(name: &str, s: &str) -> Vec<String> {
        let ds = Detectors::new(vec![Detector::builtin(name).unwrap()]);
        let mut hits = vec![];
        ds.find(s, &mut hits);
        hits.iter().map(|h| s[h.start..h.end].to_owned()).collect()
    }

    #[test]
    fn every_builtin_compiles() {
        for n in BUILTIN {
            assert!(Detector::builtin(n).is_some(), "{n}");
        }
    }

    #[test]
    fn detectors_find_valid_identifiers_and_skip_invalid_ones() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("ssn", "SSN 123-45-6789 or 123 45 6789.", &["123-45-6789", "123 45 6789"]),
            ("ssn", "000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000", &[]),
            ("ssn", "x123-45-67890", &[]),
            ("phone", "call (617) 555-0123 or +1 617.555.0199, fax 555-0100", &["(617) 555-0123", "+1 617.555.0199", "555-0100"]),
            ("phone", "code 8480-6, id 123-0456, 017-555-0123", &[]),
            ("email", "write to jane.doe+x@mail.example.org.", &["jane.doe+x@mail.example.org"]),
            ("date", "seen 2020-03-05, born 3/14/1950, on March 5, 2021 and 5 Jan 2020; at 2020-03-05T10:20:30Z", &["2020-03-05", "3/14/1950", "March 5, 2021", "5 Jan 2020", "2020-03-05T10:20:30Z"]),
            ("date", "2020-13-05 13/45/2020 2021-02", &["2021-02"]),
            ("zip", "Boston MA 02139-4307, or 02139; not 123456", &["02139-4307", "02139"]),
            ("ip", "from 10.1.2.3 and fe80::1ff:fe23:4567:890a; not 999.1.1.1 nor 10:30:00", &["10.1.2.3", "fe80::1ff:fe23:4567:890a"]),
            ("url", "see https://portal.example.org/me?id=1. or www.example.com!", &["https://portal.example.org/me?id=1", "www.example.com"]),
            ("npi", "NPI 1234567893, not 1234567890", &["1234567893"]),
            ("mbi", "MBI 1EG4-TE5-MK73 and 1EG4TE5MK73; not 1SG4TE5MK73", &["1EG4-TE5-MK73", "1EG4TE5MK73"]),
            ("credit_card", "card 4111 1111 1111 1111 / 5500-0000-0000-0004; not 4111 1111 1111 1112", &["4111 1111 1111 1111", "5500-0000-0000-0004"]),
            ("vin", "VIN 1M8GDM9AXKP042788, not 1M8GDM9A1KP042788", &["1M8GDM9AXKP042788"]),
        ];
        for (name, text, want) in cases {
            assert_eq!(found(name, text), want.to_vec(), "{name}: {text}");
        }
    }

    #[test]
    fn overlaps_keep_the_earliest_longest() {
        let ds = Detectors::new(
            ["zip", "phone", "ssn"]
                .iter()
                .map(|n| Detector::builtin(n).unwrap())
                .collect(),
        );
        let s = "617-555-0123 and 123-45-6789";
        let mut hits = vec![];
        ds.find(s, &mut hits);
        let got: Vec<(&str, &str)> = hits
            .iter()
            .map(|h| (ds.name(h.detector), &s[h.start..h.end]))
            .collect();
        assert_eq!(got, vec![("phone", "617-555-0123"), ("ssn", "123-45-6789")]);
    }

    #[test]
    fn the_prefilter_skips_plain_words() {
        let ds = Detectors::new(vec![
            Detector::builtin("ssn").unwrap(),
            Detector::builtin("url").unwrap(),
        ]);
        assert!(!ds.worth_scanning(b"final"));
        assert!(ds.worth_scanning(b"a1"));
        assert!(ds.worth_scanning(b"see www.x.org"));
        assert!(ds.worth_scanning(b"a:b"));
    }

    #[test]
    fn patterns_are_checked() {
        let d = Detector::pattern("mrn", r"MRN[: ]*[0-9]{6,10}", false, true).unwrap();
        let ds = Detectors::new(vec![d]);
        let mut hits = vec![];
        ds.find("pt MRN: 00123456 seen", &mut hits);
        assert_eq!(hits.len(), 1);
        assert!(Detector::pattern("x", "a*", false, true)
            .unwrap_err()
            .contains("empty"));
        assert!(Detector::pattern("x", "(", false, true).is_err());
        let luhn = Detector::pattern("acct", r"ACCT[0-9]{8}", true, true).unwrap();
        let ds = Detectors::new(vec![luhn]);
        ds.find("ACCT79927398 ACCT79927390", &mut hits);
        assert_eq!(hits.len(), 1, "only the Luhn-valid one");
    }
}
