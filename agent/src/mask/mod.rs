//! PHI masking on the data path. The engine (profiles, detectors, the streaming
//! JSON transform, pseudonyms) is the `phigate-mask` crate; this module is what the
//! agent adds around it: the response body wrapper that masks frames as they pass
//! ([`body`]), the `masking` stage's timing, and the `phigate mask` command ([`tool`]).

pub mod body;
pub(crate) mod config;
pub mod tool;

pub use phigate_mask::*;

/// Ends a body; the time spent masking it is reported as the `masking` stage.
pub fn finish_body(
    masker: &mut BodyMasker,
    out: &mut Vec<u8>,
    metrics: &crate::metrics::Metrics,
) -> Result<(), MaskError> {
    let r = masker.finish(out);
    metrics.observe(crate::metrics::Stage::Masking, masker.busy());
    r
}

/// Masks a whole body ([`phigate_mask::mask_body`]), timed as the `masking` stage.
pub fn mask_body(
    profile: &std::sync::Arc<Profile>,
    ctx: &std::sync::Arc<MaskContext>,
    kind: BodyKind,
    encoding: Option<&str>,
    body: &[u8],
    metrics: &crate::metrics::Metrics,
) -> Result<(Vec<u8>, Counts), MaskError> {
    let t0 = std::time::Instant::now();
    let r = phigate_mask::mask_body(profile, ctx, kind, encoding, body);
    metrics.observe(crate::metrics::Stage::Masking, t0.elapsed());
    r
}
