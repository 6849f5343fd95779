//! Body plumbing: one boxed body type for both directions, a body that reports how
//! it ended (so the record is written when the last byte has passed), a size limit,
//! and phigate's own JSON answers.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every stage sees.
pub type PhiBody = BoxBody<Bytes, BoxError>;

pub fn boxed<B>(b: B) -> PhiBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

pub fn empty() -> PhiBody {
    boxed(http_body_util::Empty::<Bytes>::new())
}

/// Header carrying the request id on every response, for correlation with records.
pub const REQUEST_ID_HEADER: &str = "x-phigate-request-id";

/// phigate's own answer: a JSON body with a stable `error` code, a human `reason`
/// (never secrets, never PHI) and the request id.
pub fn json_error(
    status: StatusCode,
    code: &str,
    reason: &str,
    request_id: &str,
) -> Response<PhiBody> {
    let body = serde_json::json!({
        "error": code,
        "reason": reason,
        "request_id": request_id,
    });
    let mut r = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// How a body stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// All frames passed (trailers included).
    Complete,
    /// The producing side failed mid-stream.
    Error(String),
    /// The consumer went away before the end (client closed, request cancelled).
    Dropped,
}

/// Wraps a body: counts data bytes into a shared counter and calls `on_end` exactly
/// once, when the stream ends, fails, or is dropped unfinished.
pub struct Observed<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    /// The exact length announced (content-length), when there is one: once that
    /// many bytes have passed the body is complete, even if the consumer, knowing
    /// the length, never polls for the end.
    expected: Option<u64>,
    on_end: Option<Box<dyn FnOnce(BodyEnd) + Send + Sync>>,
}

impl<B> Observed<B> {
    pub fn new(
        inner: B,
        bytes: Arc<AtomicU64>,
        on_end: impl FnOnce(BodyEnd) + Send + Sync + 'static,
    ) -> Self {
        Observed {
            inner,
            bytes,
            expected: None,
            on_end: Some(Box::new(on_end)),
        }
    }

    /// The announced length (content-length) when the body cannot tell it itself.
    pub fn expecting(mut self, len: Option<u64>) -> Self {
        if self.expected.is_none() {
            self.expected = len;
        }
        self
    }

    /// Counts bytes only.
    pub fn counting(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Observed {
            inner,
            bytes,
            expected: None,
            on_end: None,
        }
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(f) = self.on_end.take() {
            f(how);
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.end(BodyEnd::Dropped);
    }
}

impl<B: Body> Observed<B> {
    /// An empty body (HEAD, 204, 304) is complete before its first poll.
    pub fn finish_if_empty(&mut self) {
        if self.inner.is_end_stream() {
            self.end(BodyEnd::Complete);
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                // With a known length the consumer stops polling at the last byte and
                // never sees `None`: that is the end too.
                let all = this
                    .expected
                    .is_some_and(|n| this.bytes.load(Ordering::Relaxed) >= n);
                if all || this.inner.is_end_stream() {
                    this.end(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(BodyEnd::Error(e.to_string()));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.end(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body grew past the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// Fails the stream once more than `limit` data bytes have passed.
pub struct Limited<B> {
    inner: B,
    seen: u64,
    limit: u64,
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Limited {
            inner,
            seen: 0,
            limit,
        }
    }
}

impl<B> Body for Limited<B>
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds an error of type `E` anywhere in a source chain.
pub fn find_in_chain<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn observed_counts_and_reports_complete_once() {
        let bytes = Arc::new(AtomicU64::new(0));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let e2 = ends.clone();
        let body = Observed::new(
            Full::new(Bytes::from_static(b"hello")),
            bytes.clone(),
            move |e| e2.lock().unwrap().push(e),
        );
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(bytes.load(Ordering::Relaxed), 5);
        assert_eq!(*ends.lock().unwrap(), vec![BodyEnd::Complete]);
    }

    #[tokio::test]
    async fn observed_reports_dropped() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let e2 = ends.clone();
        let body = Observed::new(
            Full::new(Bytes::from_static(b"x")),
            Arc::default(),
            move |e| e2.lock().unwrap().push(e),
        );
        drop(body);
        assert_eq!(*ends.lock().unwrap(), vec![BodyEnd::Dropped]);
    }

    #[tokio::test]
    async fn limited_fails_past_the_limit() {
        let ok = Limited::new(Full::new(Bytes::from_static(b"12345")), 5);
        assert!(ok.collect().await.is_ok());
        let too_big = Limited::new(Full::new(Bytes::from_static(b"123456")), 5);
        let err = too_big.collect().await.unwrap_err();
        assert!(find_in_chain::<BodyTooLarge>(err.as_ref()).is_some());
    }

    #[test]
    fn json_error_shape() {
        let r = json_error(
            StatusCode::BAD_GATEWAY,
            "upstream_tls",
            "upstream certificate not trusted",
            "r1",
        );
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
