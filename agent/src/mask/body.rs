//! Masking on the data path: a body wrapper that masks frames as they pass, and what
//! the record learns from it (counts, the masked body up to a size, a failure).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use std::collections::BTreeMap;

use super::BodyMasker;
use crate::http::body::BoxError;

/// What a masked body tells its record.
#[derive(Debug, Default)]
pub struct MaskReport {
    /// Masked values per entity (the body's; header counts are added by the caller).
    pub counts: BTreeMap<String, i64>,
    /// The masked body's first bytes, up to the record limit.
    pub recorded: Vec<u8>,
    pub truncated: bool,
    /// Masking failed: the body was cut off at this point (never passed raw).
    pub error: Option<String>,
    /// A streamed body's original, kept (up to the record limit) to be sealed to the
    /// destination's review key when the record is written; never recorded in clear.
    pub original: Option<OriginalCapture>,
}

/// The unmasked bytes of a body, up to a limit, for sealing.
pub struct OriginalCapture {
    pub key: Arc<phigate_record::original::ReviewKey>,
    pub body: Vec<u8>,
    pub truncated: bool,
}

impl std::fmt::Debug for OriginalCapture {
    // The raw body is PHI: never in a Debug string.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OriginalCapture({} bytes)", self.body.len())
    }
}

impl OriginalCapture {
    pub fn keep(&mut self, bytes: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.body.len());
        self.truncated |= bytes.len() > room;
        self.body.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl MaskReport {
    pub fn keep(&mut self, bytes: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.recorded.len());
        if bytes.len() > room {
            self.truncated = true;
        }
        self.recorded
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

pub type SharedReport = Arc<Mutex<MaskReport>>;

/// Masks a body's data frames as they pass (trailers pass as they are). A body that
/// does not parse ends in an error: the consumer sees a broken transfer, never the
/// raw bytes.
pub struct MaskedBody<B> {
    inner: B,
    masker: BodyMasker,
    /// Output already masked but not yet sent (the buffered prefix, or the end).
    queued: Option<Bytes>,
    report: SharedReport,
    record_limit: usize,
    finished: bool,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl<B> MaskedBody<B> {
    pub fn new(
        inner: B,
        masker: BodyMasker,
        queued: Option<Bytes>,
        report: SharedReport,
        record_limit: usize,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        MaskedBody {
            metrics,
            inner,
            masker,
            queued,
            report,
            record_limit,
            finished: false,
        }
    }

    fn fail(&mut self, e: String) -> BoxError {
        let mut r = self.report.lock().expect("report lock");
        r.error = Some(e.clone());
        r.counts = self.masker.counts().by_entity(self.masker.profile());
        self.finished = true;
        e.into()
    }
}

impl<B> Body for MaskedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(q) = this.queued.take() {
            if !q.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(q))));
            }
        }
        if this.finished {
            return Poll::Ready(None);
        }
        let mut out = Vec::new();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    let msg = format!("the upstream body failed: {e}");
                    let _ = this.fail(msg);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(o) = &mut this.report.lock().expect("report lock").original {
                            o.keep(&data, this.record_limit);
                        }
                        if let Err(e) = this.masker.push(&data, &mut out) {
                            return Poll::Ready(Some(Err(this.fail(e.to_string()))));
                        }
                        if out.is_empty() {
                            continue;
                        }
                        this.report
                            .lock()
                            .expect("report lock")
                            .keep(&out, this.record_limit);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(None) => {
                    if let Err(e) = super::finish_body(&mut this.masker, &mut out, &this.metrics) {
                        return Poll::Ready(Some(Err(this.fail(e.to_string()))));
                    }
                    this.finished = true;
                    let mut r = this.report.lock().expect("report lock");
                    r.counts = this.masker.counts().by_entity(this.masker.profile());
                    r.keep(&out, this.record_limit);
                    drop(r);
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.queued.as_ref().is_none_or(Bytes::is_empty)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
