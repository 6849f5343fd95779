//! `[tls]` of phigate.toml: the local CA, parsed with the shared [`TomlSource`].

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, TomlSource};

/// The local CA. By default phigate creates one in `state_dir`; an operator may
/// supply their own instead.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSection {
    /// Operator-supplied CA certificate and key (PEM); both or neither.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Bound of the minted-leaf cache.
    pub leaf_cache_size: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    leaf_cache_size: Option<usize>,
}

/// `[tls]`, validated.
pub(crate) fn tls_section(
    src: &TomlSource<'_>,
    raw: Option<Spanned<RawTls>>,
) -> Result<TlsSection, ConfigError> {
    Ok(match raw {
        None => TlsSection {
            ca: None,
            leaf_cache_size: 4096,
        },
        Some(t) => {
            let span = t.span();
            let t = t.into_inner();
            let ca = match (t.ca_cert, t.ca_key) {
                (Some(c), Some(k)) => Some((src.resolve(c), src.resolve(k))),
                (None, None) => None,
                _ => {
                    return Err(src.err(
                        Some(span),
                        Some("tls.ca_cert/tls.ca_key".into()),
                        "give both the CA certificate and its key, or neither (phigate then creates its own CA in state_dir)".into(),
                    ))
                }
            };
            TlsSection {
                ca,
                leaf_cache_size: t.leaf_cache_size.unwrap_or(4096).max(16),
            }
        }
    })
}
