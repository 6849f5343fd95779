//! Masking operators: what replaces a value a rule or detector selected.
//!
//! Every operator is idempotent (masking masked output changes nothing) and never
//! returns the value it was given unless that value is already in masked form.

use crate::pseudonym::{Hex32, Pseudonymizer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Leave the value as is, and exempt it from detectors (codes, systems, URLs of
    /// code systems).
    Keep,
    /// `[REDACTED:ENTITY]`.
    Redact,
    /// Keep the last `keep_last` characters, `*` for the others; all `*` when the
    /// value is not longer than that.
    Partial { keep_last: usize },
    /// `p:` + 32 hex of HMAC-SHA256 (the records' patient pseudonym), stable across
    /// records so joins still work. With `split_last`, only what follows the last
    /// such character (`Patient/123` -> `Patient/p:…`).
    Pseudonymize { split_last: Option<char> },
    /// Keep the year. With `max_age`, a year more than `max_age` years ago becomes
    /// `[REDACTED:AGE_OVER_<max_age>]` (Safe Harbor: ages over 89 and the dates that
    /// reveal them).
    GeneralizeDate { max_age: Option<u32> },
    /// The first three digits of a ZIP code; restricted areas become `000`.
    Zip3,
    /// Ages over 89 become 90 (numbers) or `90+` (text).
    AgeCap,
    /// Remove the field (object member or array element).
    Drop,
}

pub const OP_NAMES: &[&str] = &[
    "keep",
    "redact",
    "partial",
    "pseudonymize",
    "generalize_date",
    "zip3",
    "age_cap",
    "drop",
];

/// The 3-digit ZIP areas of 20,000 or fewer people (HHS de-identification guidance,
/// 2000 census), which Safe Harbor requires to be reported as `000`.
pub const RESTRICTED_ZIP3: &[&str] = &[
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

/// What an operator needs besides the value.
pub struct OpEnv<'a> {
    pub pseudonyms: &'a Pseudonymizer,
    /// The current year, for `max_age`.
    pub year: i32,
    pub restricted_zip3: &'a [String],
    /// Pseudonyms already computed in this body (a patient id recurs in every
    /// reference to it).
    pub cache: Option<&'a PseudonymCache>,
}

impl OpEnv<'_> {
    /// Appends the pseudonym of `id` (`p:` and 32 hex digits) to `out`.
    fn push_pseudonym(&self, id: &str, out: &mut String) {
        let hex = match self.cache {
            Some(c) => c.digest_hex(self.pseudonyms, id),
            None => self.pseudonyms.digest_hex(id),
        };
        out.push_str("p:");
        out.push_str(hex.as_str());
    }
}

/// A bounded memo of pseudonyms, per body.
#[derive(Default)]
pub struct PseudonymCache(std::sync::Mutex<rustc_hash::FxHashMap<Box<str>, Hex32>>);

impl PseudonymCache {
    const MAX: usize = 16 * 1024;

    pub fn get(&self, p: &Pseudonymizer, id: &str) -> String {
        format!("p:{}", self.digest_hex(p, id).as_str())
    }

    /// The pseudonym's 32 hex digits (without `p:`), memoized.
    pub fn digest_hex(&self, p: &Pseudonymizer, id: &str) -> Hex32 {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(id) {
            return *v;
        }
        let v = p.digest_hex(id);
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(id.into(), v);
        v
    }
}

/// URN forms whose prefix a `split_last` pseudonym keeps.
const URN_PREFIXES: &[&str] = &["urn:uuid:", "urn:oid:"];

pub fn placeholder(entity: &str) -> String {
    format!("[REDACTED:{entity}]")
}

/// A replacement value: JSON text of a number, or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar {
    Number(String),
    Text(String),
}

pub fn is_pseudonym(s: &str) -> bool {
    s.len() == 34
        && s.starts_with("p:")
        && s.bytes()
            .skip(2)
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Op {
    /// The masked form of a text value; `None` for `Keep` and `Drop` (the caller
    /// handles those).
    pub fn apply_text(&self, s: &str, entity: &str, env: &OpEnv<'_>) -> Option<String> {
        Some(match self {
            Op::Keep | Op::Drop => return None,
            Op::Redact => placeholder(entity),
            Op::Partial { keep_last } => {
                let n = s.chars().count();
                let keep = if n > *keep_last { *keep_last } else { 0 };
                let mut out: String = std::iter::repeat_n('*', n - keep).collect();
                out.extend(s.chars().skip(n - keep));
                out
            }
            Op::Pseudonymize { split_last } => {
                // A versioned FHIR reference (`Patient/1/_history/2`): the id is
                // before the history part, which stays.
                let (s, history) = match split_last
                    .is_some()
                    .then(|| memchr::memmem::find(s.as_bytes(), b"/_history/"))
                    .flatten()
                {
                    Some(i) => s.split_at(i),
                    None => (s, ""),
                };
                let (head, id) = match split_last.and_then(|c| s.rfind(c)) {
                    Some(i) => s.split_at(i + 1),
                    // A Bundle's `urn:uuid:` full URL and the references to it: the
                    // prefix stays, so they still resolve to each other.
                    None if split_last.is_some() => match URN_PREFIXES
                        .iter()
                        .find(|p| s.len() > p.len() && s.starts_with(*p))
                    {
                        Some(p) => s.split_at(p.len()),
                        None => ("", s),
                    },
                    None => ("", s),
                };
                let mut out = String::with_capacity(head.len() + 34 + history.len());
                if is_pseudonym(id) {
                    out.push_str(s);
                } else {
                    out.push_str(head);
                    env.push_pseudonym(id, &mut out);
                }
                out.push_str(history);
                out
            }
            Op::GeneralizeDate { max_age } => match year_of(s) {
                Some(y) if max_age.is_some_and(|a| env.year - y > a as i32) => {
                    placeholder(&format!("AGE_OVER_{}", max_age.unwrap_or(89)))
                }
                Some(y) => format!("{y:04}"),
                None if s.starts_with("[REDACTED:") => s.to_owned(),
                None => placeholder(entity),
            },
            Op::Zip3 => {
                let d: Vec<u8> = s.bytes().take(3).collect();
                if d.len() == 3
                    && d.iter().all(u8::is_ascii_digit)
                    && s[3..].bytes().all(|b| b.is_ascii_digit() || b == b'-')
                {
                    let z = String::from_utf8(d).expect("ASCII digits");
                    if env.restricted_zip3.contains(&z) {
                        "000".to_owned()
                    } else {
                        z
                    }
                } else if s.starts_with("[REDACTED:") {
                    s.to_owned()
                } else {
                    placeholder(entity)
                }
            }
            Op::AgeCap => match s.trim().parse::<f64>() {
                Ok(a) if a > 89.0 => "90+".to_owned(),
                Ok(_) => s.to_owned(),
                Err(_) if s == "90+" || s.starts_with("[REDACTED:") => s.to_owned(),
                Err(_) => placeholder(entity),
            },
        })
    }

    /// The masked form of a number (its JSON text).
    pub fn apply_number(&self, text: &str, entity: &str, env: &OpEnv<'_>) -> Option<Scalar> {
        Some(match self {
            Op::Keep | Op::Drop => return None,
            Op::AgeCap => match text.parse::<f64>() {
                Ok(a) if a > 89.0 => Scalar::Number("90".into()),
                _ => Scalar::Number(text.to_owned()),
            },
            Op::GeneralizeDate { .. }
                if text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                match self.apply_text(text, entity, env)? {
                    y if y == text => Scalar::Number(y),
                    other => Scalar::Text(other),
                }
            }
            _ => Scalar::Text(self.apply_text(text, entity, env)?),
        })
    }
}

/// The year of an ISO date/dateTime (`1970`, `1970-05`, `1970-05-12T...`), a US date
/// (`5/12/1970`) or a written one (`May 12, 1970`).
pub fn year_of(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    let four = |x: &[u8]| {
        (x.len() == 4 && x.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(x).ok()?.parse().ok())
            .flatten()
    };
    if b.len() >= 4 && (b.len() == 4 || b[4] == b'-') {
        return four(&b[..4]);
    }
    // Otherwise the last run of four digits.
    let last = s
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|p| !p.is_empty())?;
    if last.len() == 4 {
        return four(last.as_bytes());
    }
    if last.len() == 2 && s.contains('/') {
        // 3/14/50: two-digit years are read as 19xx/20xx around the current century.
        let y: i32 = last.parse().ok()?;
        return Some(if y <= 30 { 2000 + y } else { 1900 + y });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(p: &Pseudonymizer) -> OpEnv<'_> {
        OpEnv {
            pseudonyms: p,
            year: 2026,
            restricted_zip3: Box::leak(Box::new(
                RESTRICTED_ZIP3
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )),
            cache: None,
        }
    }

    #[test]
    fn operators_and_their_idempotence() {
        let p = Pseudonymizer::with_key([7; 32]);
        let env = env_with(&p);
        let cases: Vec<(Op, &str, &str)> = vec![
            (Op::Redact, "John", "[REDACTED:NAME]"),
            (Op::Partial { keep_last: 4 }, "123-45-6789", "*******6789"),
            (Op::Partial { keep_last: 4 }, "6789", "****"),
            (Op::GeneralizeDate { max_age: None }, "1970-05-12", "1970"),
            (
                Op::GeneralizeDate { max_age: None },
                "2020-03-05T10:00:00Z",
                "2020",
            ),
            (Op::GeneralizeDate { max_age: None }, "5/12/1970", "1970"),
            (
                Op::GeneralizeDate { max_age: Some(89) },
                "1930-01-01",
                "[REDACTED:AGE_OVER_89]",
            ),
            (
                Op::GeneralizeDate { max_age: Some(89) },
                "1940-01-01",
                "1940",
            ),
            (
                Op::GeneralizeDate { max_age: None },
                "soon",
                "[REDACTED:NAME]",
            ),
            (Op::Zip3, "02139-4307", "021"),
            (Op::Zip3, "03601", "000"),
            (Op::Zip3, "Boston", "[REDACTED:NAME]"),
            (Op::AgeCap, "95", "90+"),
            (Op::AgeCap, "42", "42"),
            (Op::AgeCap, "old", "[REDACTED:NAME]"),
        ];
        for (op, input, want) in cases {
            let out = op.apply_text(input, "NAME", &env).unwrap();
            assert_eq!(out, want, "{op:?} {input}");
            assert_eq!(
                op.apply_text(&out, "NAME", &env).unwrap(),
                out,
                "{op:?} is idempotent on {input}"
            );
        }
    }

    #[test]
    fn pseudonyms_are_the_records_pseudonyms() {
        let p = Pseudonymizer::with_key([7; 32]);
        let env = env_with(&p);
        let op = Op::Pseudonymize { split_last: None };
        let out = op.apply_text("12345", "ID", &env).unwrap();
        assert_eq!(out, p.pseudonym("12345"));
        assert!(is_pseudonym(&out));
        assert_eq!(op.apply_text(&out, "ID", &env).unwrap(), out);
        let r = Op::Pseudonymize {
            split_last: Some('/'),
        };
        let out = r.apply_text("Patient/12345", "ID", &env).unwrap();
        assert_eq!(out, format!("Patient/{}", p.pseudonym("12345")));
        assert_eq!(r.apply_text(&out, "ID", &env).unwrap(), out);
        let v = r
            .apply_text("https://x/fhir/Patient/12345/_history/3", "ID", &env)
            .unwrap();
        assert_eq!(
            v,
            format!("https://x/fhir/Patient/{}/_history/3", p.pseudonym("12345"))
        );
        assert_eq!(r.apply_text(&v, "ID", &env).unwrap(), v);
        let u = r
            .apply_text("urn:uuid:6b1d0b4a-6e0e-4f5e-9d57-2b8f0c1e9a11", "ID", &env)
            .unwrap();
        assert_eq!(
            u,
            format!(
                "urn:uuid:{}",
                p.pseudonym("6b1d0b4a-6e0e-4f5e-9d57-2b8f0c1e9a11")
            )
        );
        assert_eq!(r.apply_text(&u, "ID", &env).unwrap(), u);
    }

    #[test]
    fn numbers() {
        let p = Pseudonymizer::with_key([7; 32]);
        let env = env_with(&p);
        assert_eq!(
            Op::AgeCap.apply_number("95.5", "AGE", &env),
            Some(Scalar::Number("90".into()))
        );
        assert_eq!(
            Op::AgeCap.apply_number("9", "AGE", &env),
            Some(Scalar::Number("9".into()))
        );
        assert_eq!(
            Op::Redact.apply_number("123456789", "SSN", &env),
            Some(Scalar::Text("[REDACTED:SSN]".into()))
        );
        assert_eq!(
            Op::GeneralizeDate { max_age: None }.apply_number("1970", "DATE", &env),
            Some(Scalar::Number("1970".into()))
        );
        assert_eq!(
            Op::Zip3.apply_number("2139", "ZIP", &env),
            Some(Scalar::Text("213".into()))
        );
    }
}
