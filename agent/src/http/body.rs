//! Body plumbing: one boxed body type for both directions, a body that reports how
//! it ended (so the record is written when the last byte has passed), a size limit,
//! and phigate's own JSON answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

use crate::record::Durable;

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
    json_answer(
        status,
        serde_json::json!({
            "error": code,
            "reason": reason,
            "request_id": request_id,
        }),
    )
}

/// A request held for approval, or refused by its approval's outcome: 403 with the
/// approval id (also in the `x-phigate-approval-id` header).
pub fn json_approval(
    code: &str,
    reason: &str,
    approval_id: &str,
    request_id: &str,
) -> Response<PhiBody> {
    json_answer(
        StatusCode::FORBIDDEN,
        serde_json::json!({
            "error": code,
            "reason": reason,
            "approval_id": approval_id,
            "request_id": request_id,
        }),
    )
}

/// phigate's refusal by policy: like [`json_error`], plus the ids of the policies
/// that decided (nothing else about them).
pub fn json_denial(
    status: StatusCode,
    code: &str,
    reason: &str,
    policy_ids: &[String],
    request_id: &str,
) -> Response<PhiBody> {
    json_answer(
        status,
        serde_json::json!({
            "error": code,
            "reason": reason,
            "policy_ids": policy_ids,
            "request_id": request_id,
        }),
    )
}

/// A JSON answer of phigate's own, never cached.
fn json_answer(status: StatusCode, body: serde_json::Value) -> Response<PhiBody> {
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

/// Called once when a body ends; may return a ticket to wait on before the end of
/// the body is released to the consumer (the record must be durable first).
pub type OnEnd = Box<dyn FnOnce(BodyEnd) -> Option<Durable> + Send + Sync>;

/// Wraps a body: counts data bytes into a shared counter and calls `on_end` exactly
/// once, when the stream ends, fails, or is dropped unfinished.
///
/// When the stream completes and `on_end` returns a ticket, the final frame (the last
/// data frame, or the end of stream) is held until the ticket resolves: the client
/// cannot see a complete response before its record is durable. If the ticket fails,
/// the body fails instead of completing.
pub struct Observed<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    /// The exact length announced (content-length), when there is one: once that
    /// many bytes have passed the body is complete, even if the consumer, knowing
    /// the length, never polls for the end.
    expected: Option<u64>,
    on_end: Option<OnEnd>,
    /// The final frame (None: end of stream) waiting for its record.
    holding: Option<(Option<Frame<Bytes>>, Durable)>,
    /// The end was released: nothing more comes.
    done: bool,
}

impl<B> Observed<B> {
    pub fn new(
        inner: B,
        bytes: Arc<AtomicU64>,
        on_end: impl FnOnce(BodyEnd) -> Option<Durable> + Send + Sync + 'static,
    ) -> Self {
        Observed {
            inner,
            bytes,
            expected: None,
            on_end: Some(Box::new(on_end)),
            holding: None,
            done: false,
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
            holding: None,
            done: false,
        }
    }

    fn end(&mut self, how: BodyEnd) -> Option<Durable> {
        self.on_end.take().and_then(|f| f(how))
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if !self.done && self.holding.is_none() {
            // Dropped before the end: recorded, nobody waits.
            drop(self.end(BodyEnd::Dropped));
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((frame, durable)) = &mut this.holding {
            return match Pin::new(durable).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => {
                    let frame = frame.take();
                    this.holding = None;
                    this.done = true;
                    Poll::Ready(frame.map(Ok))
                }
                Poll::Ready(Err(e)) => {
                    this.holding = None;
                    this.done = true;
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            };
        }
        if this.done {
            return Poll::Ready(None);
        }
        let (frame, complete) = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                // With a known length the consumer stops polling at the last byte and
                // never sees `None`: that frame is the end.
                let all = this
                    .expected
                    .is_some_and(|n| this.bytes.load(Ordering::Relaxed) >= n);
                let complete = all || this.inner.is_end_stream();
                (Some(frame), complete)
            }
            Poll::Ready(Some(Err(e))) => {
                drop(this.end(BodyEnd::Error(e.to_string())));
                this.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => (None, true),
        };
        if !complete || this.on_end.is_none() {
            if frame.is_none() {
                this.done = true;
            }
            return Poll::Ready(frame.map(Ok));
        }
        match this.end(BodyEnd::Complete) {
            None => {
                this.done = frame.is_none();
                Poll::Ready(frame.map(Ok))
            }
            Some(durable) => {
                this.holding = Some((frame, durable));
                // Poll the ticket now: registers the waker, or releases at once.
                Pin::new(this).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.on_end.is_none() && self.holding.is_none() {
            self.done || self.inner.is_end_stream()
        } else {
            false
        }
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
            move |e| {
                e2.lock().unwrap().push(e);
                None
            },
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
            move |e| {
                e2.lock().unwrap().push(e);
                None
            },
        );
        drop(body);
        assert_eq!(*ends.lock().unwrap(), vec![BodyEnd::Dropped]);
    }

    /// The last frame waits for the record: a client cannot see the whole response
    /// before its record is durable, and sees a failure if it never becomes durable.
    #[tokio::test]
    async fn the_final_frame_waits_for_the_record() {
        use crate::record::{RecordError, Table};
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body = Observed::new(
            Full::new(Bytes::from_static(b"hello")),
            Arc::default(),
            move |_| Some(Durable::waiting(rx, Table::Requests)),
        )
        .expecting(Some(5));
        let mut body = std::pin::pin!(body);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(body.as_mut().poll_frame(&mut cx).is_pending(), "held");
        assert!(!body.is_end_stream());
        tx.send(Ok(())).unwrap();
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.into_data().unwrap(), "hello"),
            _ => panic!("the frame is released once durable"),
        }
        assert!(body.is_end_stream());

        let (tx, rx) = tokio::sync::oneshot::channel();
        let failing = Observed::new(
            Full::new(Bytes::from_static(b"hello")),
            Arc::default(),
            move |_| Some(Durable::waiting(rx, Table::Requests)),
        );
        tx.send(Err(RecordError {
            table: Table::Requests,
            reason: "disk full".into(),
        }))
        .unwrap();
        assert!(
            failing.collect().await.is_err(),
            "no complete response without its record"
        );
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
