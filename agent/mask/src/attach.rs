//! Text attachments masked in place of being dropped: a profile's attachment rule
//! with `text_attachments = "mask"` decodes an `Attachment.data` or `Binary.data`
//! whose `contentType` is plain text, masks the text with the profile's detectors
//! and writes it back as base64. Anything it cannot read as text for sure (another
//! media type or charset, no `contentType`, bad base64, not UTF-8, over the size
//! bound) is dropped as the rule says: fail closed.
//!
//! Both engines (the stream and the DOM reference) call [`mask_data`], so they
//! agree by construction.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::profile::Profile;
use super::{Counts, MaskContext, ScalarMasker};

/// Default bound on an attachment's decoded text.
pub const DEFAULT_MAX_BYTES: usize = 1 << 20;

/// Largest bound a profile may set: the stream holds the encoded value whole, and
/// never more than its longest value.
pub const LIMIT_MAX_BYTES: usize = 8 << 20;

/// Media types decoded as text. Not HTML, XML or JSON: their escapes (`&#64;`,
/// `\u0040`) would hide identifiers from the detectors.
pub const TEXT_TYPES: &[&str] = &[
    "text/plain",
    "text/markdown",
    "text/csv",
    "text/tab-separated-values",
];

/// The rule option, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextAttachments {
    /// Longest decoded text masked; longer ones are dropped.
    pub max_bytes: usize,
    /// The entity counting attachments decoded and masked.
    pub entity: usize,
}

impl TextAttachments {
    /// The longest base64 value (whitespace aside) that can decode within the bound.
    pub fn max_encoded(&self) -> usize {
        self.max_bytes.div_ceil(3) * 4
    }
}

/// What a `contentType` says: `Some(ascii_only)` for a text type in UTF-8 or
/// US-ASCII (no charset: UTF-8, of which ASCII is a part), `None` otherwise.
pub fn text_charset(content_type: &str) -> Option<bool> {
    let mut parts = content_type.split(';');
    let media = parts.next()?.trim();
    if !TEXT_TYPES.iter().any(|t| t.eq_ignore_ascii_case(media)) {
        return None;
    }
    let mut ascii = false;
    for p in parts {
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("charset") {
            continue;
        }
        match v.trim().trim_matches('"').to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => {}
            "us-ascii" | "ascii" => ascii = true,
            _ => return None,
        }
    }
    Some(ascii)
}

/// The masked base64 of an attachment's `data` (`b64`, the JSON string's text) under
/// a rule with `text`, or `None` when it is dropped. Counts one `text.entity` when
/// masked (and the detectors' finds), one `drop_entity` when dropped.
#[allow(clippy::too_many_arguments)]
pub fn mask_data(
    profile: &Profile,
    ctx: &MaskContext,
    scalar: &mut ScalarMasker,
    text: TextAttachments,
    drop_entity: usize,
    content_type: Option<&str>,
    b64: &str,
    counts: &mut Counts,
) -> Option<String> {
    let masked = decode(text, content_type, b64).map(|plain| {
        scalar
            .text_scanned(profile, ctx, None, &plain, true, counts)
            .unwrap_or(plain)
    });
    match masked {
        Some(m) => {
            counts.add(text.entity);
            Some(STANDARD.encode(m.as_bytes()))
        }
        None => {
            counts.add(drop_entity);
            None
        }
    }
}

/// The attachment's text, when it is text for sure and within the bound.
fn decode(text: TextAttachments, content_type: Option<&str>, b64: &str) -> Option<String> {
    let ascii = text_charset(content_type?)?;
    let compact: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.len() > text.max_encoded() {
        return None;
    }
    let bytes = STANDARD.decode(&compact).ok()?;
    if bytes.len() > text.max_bytes || (ascii && !bytes.is_ascii()) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_types_and_charsets() {
        for (ct, want) in [
            ("text/plain", Some(false)),
            ("Text/Plain; charset=UTF-8", Some(false)),
            ("text/markdown;charset=\"utf-8\"", Some(false)),
            ("text/csv; charset=us-ascii", Some(true)),
            ("text/plain; format=flowed", Some(false)),
            ("text/plain; charset=iso-8859-1", None),
            ("text/plain; charset=utf-16", None),
            ("text/html", None),
            ("application/json", None),
            ("application/pdf", None),
            ("", None),
        ] {
            assert_eq!(text_charset(ct), want, "{ct}");
        }
    }

    #[test]
    fn only_text_within_the_bound_decodes() {
        let t = TextAttachments {
            max_bytes: 8,
            entity: 0,
        };
        let ok = Some("text/plain");
        assert_eq!(decode(t, ok, "aGVsbG8=").as_deref(), Some("hello"));
        assert_eq!(decode(t, ok, " aGVs\r\nbG8= ").as_deref(), Some("hello"));
        assert_eq!(decode(t, None, "aGVsbG8="), None);
        assert_eq!(decode(t, Some("image/png"), "aGVsbG8="), None);
        assert_eq!(decode(t, ok, "aGVsbG8"), None, "no padding");
        assert_eq!(decode(t, ok, "a$VsbG8="), None);
        assert_eq!(decode(t, ok, &STANDARD.encode([0xff, 0xfe])), None);
        assert_eq!(
            decode(
                t,
                Some("text/plain; charset=us-ascii"),
                &STANDARD.encode("é")
            ),
            None
        );
        assert_eq!(
            decode(t, ok, &STANDARD.encode("123456789")),
            None,
            "over the bound"
        );
        assert_eq!(
            decode(t, ok, &STANDARD.encode("12345678")).as_deref(),
            Some("12345678")
        );
    }
}
