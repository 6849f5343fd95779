//! `[masking]` of phigate.toml: how masking runs on the data path, parsed with the
//! shared [`TomlSource`].
#![forbid(unsafe_code)]

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, TomlSource};

/// How masking runs on the data path (`[masking]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskingSection {
    /// Bodies up to this size are masked whole before the response starts (so a
    /// failure is a clean 502 and Content-Length is exact); larger or longer ones
    /// stream, and a failure mid-stream aborts the response.
    pub buffer_bytes: usize,
    /// Masked bodies are recorded up to this many bytes (0: not recorded).
    pub record_body_bytes: usize,
    /// Mask request bodies (JSON) before they go upstream, too.
    pub mask_requests: bool,
}

impl Default for MaskingSection {
    fn default() -> Self {
        MaskingSection {
            buffer_bytes: 8 << 20,
            record_body_bytes: 64 << 10,
            mask_requests: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMasking {
    buffer_bytes: Option<Spanned<u64>>,
    record_body_bytes: Option<u64>,
    mask_requests: Option<bool>,
}

/// `[masking]`, validated.
pub(crate) fn masking_section(
    src: &TomlSource<'_>,
    raw: Option<RawMasking>,
) -> Result<MaskingSection, ConfigError> {
    Ok(match raw {
        None => MaskingSection::default(),
        Some(m) => {
            let d = MaskingSection::default();
            MaskingSection {
                buffer_bytes: match m.buffer_bytes {
                    None => d.buffer_bytes,
                    Some(v) if !(1024..=1 << 30).contains(v.get_ref()) => {
                        return Err(src.err(
                            Some(v.span()),
                            Some("masking.buffer_bytes".into()),
                            "must be between 1024 and 1073741824".into(),
                        ))
                    }
                    Some(v) => v.into_inner() as usize,
                },
                record_body_bytes: m
                    .record_body_bytes
                    .map_or(d.record_body_bytes, |v| v as usize),
                mask_requests: m.mask_requests.unwrap_or(d.mask_requests),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::ConfigError;
    use crate::settings::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/phigate/test.toml"), text)
    }

    #[test]
    fn masking_settings_and_profiles() {
        let c = parse("[masking]\nbuffer_bytes = 4096\nmask_requests = true\n[[destinations]]\nname = \"a\"\nprotocol = \"https\"\naddresses = [\"127.0.0.2:1\"]\nmask_profile = \"safe_harbor\"\n").unwrap();
        assert_eq!(c.masking.buffer_bytes, 4096);
        assert!(c.masking.mask_requests);
        assert_eq!(c.masking.record_body_bytes, 64 << 10);
        assert_eq!(
            c.destinations[0].mask_profile.as_deref(),
            Some("safe_harbor")
        );
        let e = parse("[masking]\nbuffer_bytes = 1\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("masking.buffer_bytes"));
        assert_eq!(e.line, Some(2));
        let e = parse("[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"127.0.0.2:1\"]\nmask_profile = \"x\"\n").unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("cannot be masked"), "{e}");
    }
}
