//! Content-Encoding decoding, incremental: a masked body is sent decoded (identity),
//! so masking never needs to re-encode and the client's view matches the record.

use std::io::Write;

/// One body's decoder.
pub enum Decoder {
    Identity,
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    /// HTTP `deflate` is zlib-wrapped (RFC 9110); some servers send raw deflate,
    /// recognised by the first byte.
    Deflate(Option<DeflateKind>, Vec<u8>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

pub enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl Decoder {
    /// The decoder for a Content-Encoding value; an unknown or stacked coding is an
    /// error (the body cannot be inspected, so it must not pass).
    pub fn for_encoding(value: Option<&str>) -> Result<Decoder, String> {
        let codings: Vec<String> = value
            .unwrap_or("")
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity")
            .collect();
        match codings.as_slice() {
            [] => Ok(Decoder::Identity),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Decoder::Gzip(flate2::write::GzDecoder::new(Vec::new()))),
                "deflate" => Ok(Decoder::Deflate(None, Vec::new())),
                "br" => Ok(Decoder::Brotli(Box::new(
                    brotli_decompressor::DecompressorWriter::new(Vec::new(), 64 * 1024),
                ))),
                "zstd" => zstd::stream::write::Decoder::new(Vec::new())
                    .map(Decoder::Zstd)
                    .map_err(|e| format!("zstd: {e}")),
                other => Err(format!(
                    "content encoding `{other}` cannot be decoded for masking"
                )),
            },
            _ => Err(format!(
                "stacked content encodings ({}) are not decoded for masking",
                codings.join(", ")
            )),
        }
    }

    pub fn is_identity(&self) -> bool {
        matches!(self, Decoder::Identity)
    }

    /// Decodes a chunk; the decoded bytes are handed to `sink` (nothing for identity:
    /// the caller uses the input as is).
    pub fn push(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Result<(), String> {
        let e = |e: std::io::Error| format!("the body does not decode: {e}");
        match self {
            Decoder::Identity => sink(input),
            Decoder::Gzip(d) => {
                d.write_all(input).map_err(e)?;
                drain(d.get_mut(), sink);
            }
            Decoder::Deflate(kind, head) => {
                if kind.is_none() {
                    head.extend_from_slice(input);
                    if head.is_empty() {
                        return Ok(());
                    }
                    // A zlib header: CMF 0x?8 with (CMF*256 + FLG) % 31 == 0.
                    let zlib = head.len() >= 2
                        && head[0] & 0x0f == 8
                        && (u16::from(head[0]) * 256 + u16::from(head[1])) % 31 == 0;
                    if head.len() < 2 {
                        return Ok(());
                    }
                    *kind = Some(if zlib {
                        DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
                    } else {
                        DeflateKind::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
                    });
                    let buffered = std::mem::take(head);
                    return self.push(&buffered, sink);
                }
                match kind.as_mut().expect("set above") {
                    DeflateKind::Zlib(d) => {
                        d.write_all(input).map_err(e)?;
                        drain(d.get_mut(), sink);
                    }
                    DeflateKind::Raw(d) => {
                        d.write_all(input).map_err(e)?;
                        drain(d.get_mut(), sink);
                    }
                }
            }
            Decoder::Brotli(d) => {
                d.write_all(input).map_err(e)?;
                drain(d.get_mut(), sink);
            }
            Decoder::Zstd(d) => {
                d.write_all(input).map_err(e)?;
                drain(d.get_mut(), sink);
            }
        }
        Ok(())
    }

    /// The end of the body: flushes, and fails if the encoded stream was cut short.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&[u8])) -> Result<(), String> {
        let e = |e: std::io::Error| format!("the body does not decode: {e}");
        match self {
            Decoder::Identity => {}
            Decoder::Gzip(d) => {
                d.try_finish().map_err(e)?;
                drain(d.get_mut(), sink);
            }
            Decoder::Deflate(kind, head) => match kind {
                None if head.is_empty() => {}
                None => return Err("the body does not decode: truncated deflate stream".into()),
                Some(DeflateKind::Zlib(d)) => {
                    d.try_finish().map_err(e)?;
                    drain(d.get_mut(), sink);
                }
                Some(DeflateKind::Raw(d)) => {
                    d.try_finish().map_err(e)?;
                    drain(d.get_mut(), sink);
                }
            },
            Decoder::Brotli(d) => {
                d.close().map_err(e)?;
                drain(d.get_mut(), sink);
            }
            Decoder::Zstd(d) => {
                d.flush().map_err(e)?;
                drain(d.get_mut(), sink);
            }
        }
        Ok(())
    }
}

fn drain(buf: &mut Vec<u8>, sink: &mut dyn FnMut(&[u8])) {
    if !buf.is_empty() {
        sink(buf);
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(name: &str, encoded: &[u8], want: &[u8]) {
        for chunk in [1usize, 7, 4096] {
            let mut d = Decoder::for_encoding(Some(name)).unwrap();
            let mut out = Vec::new();
            for c in encoded.chunks(chunk) {
                d.push(c, &mut |b| out.extend_from_slice(b)).unwrap();
            }
            d.finish(&mut |b| out.extend_from_slice(b)).unwrap();
            assert_eq!(out, want, "{name} in chunks of {chunk}");
        }
    }

    #[test]
    fn every_coding_decodes_incrementally() {
        let text = br#"{"resourceType":"Patient","name":[{"family":"Doe"}]}"#.repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text).unwrap();
        roundtrip("gzip", &gz.finish().unwrap(), &text);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&text).unwrap();
        roundtrip("deflate", &z.finish().unwrap(), &text);
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&text).unwrap();
        roundtrip("deflate", &raw.finish().unwrap(), &text);
        roundtrip("zstd", &zstd::encode_all(&text[..], 3).unwrap(), &text);
        roundtrip("identity", &text, &text);
    }

    #[test]
    fn brotli_decodes() {
        // `printf '{"a":1}' | brotli` (quality 11), produced once.
        let encoded: &[u8] = &[
            0x0b, 0x03, 0x80, 0x7b, 0x22, 0x61, 0x22, 0x3a, 0x31, 0x7d, 0x03,
        ];
        roundtrip("br", encoded, br#"{"a":1}"#);
    }

    #[test]
    fn bad_input_fails() {
        assert!(Decoder::for_encoding(Some("compress")).is_err());
        assert!(Decoder::for_encoding(Some("gzip, br")).is_err());
        let mut d = Decoder::for_encoding(Some("gzip")).unwrap();
        let r = d
            .push(b"definitely not gzip", &mut |_| {})
            .and_then(|_| d.finish(&mut |_| {}));
        assert!(r.is_err());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"a\":1}").unwrap();
        let full = gz.finish().unwrap();
        let mut d = Decoder::for_encoding(Some("gzip")).unwrap();
        d.push(&full[..full.len() - 4], &mut |_| {}).unwrap();
        assert!(d.finish(&mut |_| {}).is_err(), "a truncated stream");
    }
}
