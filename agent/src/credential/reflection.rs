//! The credential phigate presented must not come back to the client. An upstream
//! that echoes its request (a `/headers` debug endpoint, `TRACE`, an error page that
//! quotes the request) would otherwise hand an app the very credential that
//! `upstream_auth` keeps from the apps. The response's headers are searched for the
//! presented value before anything is answered; its body is released with the last
//! `len - 1` bytes of everything seen held back, so no part of a match that straddles
//! two chunks goes out before the match is seen. A match ends the response there.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

/// The same type as `http::body::BoxError` (named here: `http` is a layer above).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Values shorter than this are not searched for: a short value would match
/// ordinary text, and is no secret worth the name.
const SHORTEST_SEARCHED: usize = 8;

/// What a presented credential looks like in a response (cheap to clone: a static
/// credential's is built once, when it is loaded).
#[derive(Clone)]
pub struct Reflection(Arc<Searched>);

struct Searched {
    /// The secret part of the header value (a bearer's token without its scheme).
    finder: Finder<'static>,
    /// The credential's id, for the refusal and the record (never its value).
    id: String,
}

impl std::fmt::Debug for Reflection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reflection({})", self.0.id)
    }
}

impl Reflection {
    /// The secret of a presented header value: a `Bearer`/`Basic`/... token without
    /// its scheme, any other value whole. `None` when too short to search for.
    pub fn of(value: &HeaderValue, id: &str) -> Option<Reflection> {
        let v = value.as_bytes();
        let secret = match v.iter().position(|b| *b == b' ') {
            Some(sp) if v[..sp].iter().all(u8::is_ascii_alphabetic) => &v[sp + 1..],
            _ => v,
        };
        let secret = secret.trim_ascii();
        (secret.len() >= SHORTEST_SEARCHED).then(|| {
            Reflection(Arc::new(Searched {
                finder: Finder::new(secret).into_owned(),
                id: id.to_owned(),
            }))
        })
    }

    pub fn id(&self) -> &str {
        &self.0.id
    }

    fn len(&self) -> usize {
        self.0.finder.needle().len()
    }

    /// The first response header whose value repeats the credential.
    pub fn in_headers(&self, headers: &HeaderMap) -> Option<HeaderName> {
        headers
            .iter()
            .find(|(_, v)| self.0.finder.find(v.as_bytes()).is_some())
            .map(|(n, _)| n.clone())
    }
}

/// The error that ends a body which repeated the credential.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's response repeats the credential `{0}` phigate presented; the response was cut off before it")]
pub struct Reflected(pub String);

/// A response body released only up to where it could still turn out to repeat the
/// credential. Without a [`Reflection`] it passes frames through untouched.
pub struct Unreflected<B> {
    inner: B,
    guard: Option<Guard>,
}

struct Guard {
    reflection: Reflection,
    /// The last `len - 1` bytes seen, not yet released.
    held: Bytes,
    /// Frames cleared for release, in order.
    ready: VecDeque<Frame<Bytes>>,
    /// How the upstream's body ended (`Some(None)`: cleanly), after `ready`.
    end: Option<Option<BoxError>>,
}

impl<B> Unreflected<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(inner: B, reflection: Option<Reflection>) -> Self {
        Unreflected {
            inner,
            guard: reflection.map(|reflection| Guard {
                reflection,
                held: Bytes::new(),
                ready: VecDeque::new(),
                end: None,
            }),
        }
    }

    /// Reads the body's first frame (waiting at most `wait`) before the response's
    /// head goes out, so that a short echo is refused whole rather than cut off.
    pub async fn first_frame(&mut self, wait: std::time::Duration) -> Result<(), Reflected> {
        let Some(g) = &mut self.guard else {
            return Ok(());
        };
        if self.inner.is_end_stream() {
            return Ok(());
        }
        let inner = &mut self.inner;
        let read = std::future::poll_fn(|cx| Pin::new(&mut *inner).poll_frame(cx));
        match tokio::time::timeout(wait, read).await {
            Ok(frame) => g.absorb(frame.map(|f| f.map_err(Into::into))),
            Err(_) => Ok(()),
        }
    }
}

impl Guard {
    /// Takes what the upstream's body gave: an error if the stream now holds the
    /// credential, else what may be released is queued and the new tail held.
    fn absorb(&mut self, frame: Option<Result<Frame<Bytes>, BoxError>>) -> Result<(), Reflected> {
        let frame = match frame {
            None => {
                self.release_held();
                self.end = Some(None);
                return Ok(());
            }
            Some(Err(e)) => {
                self.end = Some(Some(e));
                return Ok(());
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(chunk) => self.take(chunk),
            // Trailers end the body: searched like headers, released after what is
            // held.
            Err(trailers) => {
                if let Some(t) = trailers.trailers_ref() {
                    if self.reflection.in_headers(t).is_some() {
                        return Err(self.reflected());
                    }
                }
                self.release_held();
                self.ready.push_back(trailers);
                Ok(())
            }
        }
    }

    fn reflected(&mut self) -> Reflected {
        self.held = Bytes::new();
        self.ready.clear();
        Reflected(self.reflection.id().to_owned())
    }

    fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            self.ready.push_back(Frame::data(held));
        }
    }

    fn take(&mut self, chunk: Bytes) -> Result<(), Reflected> {
        let keep = self.reflection.len() - 1;
        let finder = &self.reflection.0.finder;
        // A match that starts in what is held ends within the chunk's first `keep`.
        let straddles = !self.held.is_empty() && {
            let mut window = Vec::with_capacity(self.held.len() + keep);
            window.extend_from_slice(&self.held);
            window.extend_from_slice(&chunk[..chunk.len().min(keep)]);
            finder.find(&window).is_some()
        };
        if straddles || finder.find(&chunk).is_some() {
            return Err(self.reflected());
        }
        if chunk.len() >= keep {
            let mut rest = chunk;
            let tail = rest.split_off(rest.len() - keep);
            self.release_held();
            if !rest.is_empty() {
                self.ready.push_back(Frame::data(rest));
            }
            self.held = tail;
        } else {
            // A chunk shorter than the tail: the tail is the end of held + chunk.
            let mut all = BytesMut::with_capacity(self.held.len() + chunk.len());
            all.extend_from_slice(&self.held);
            all.extend_from_slice(&chunk);
            let mut all = all.freeze();
            self.held = all.split_off(all.len().saturating_sub(keep));
            if !all.is_empty() {
                self.ready.push_back(Frame::data(all));
            }
        }
        Ok(())
    }
}

impl<B> Body for Unreflected<B>
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
        let Some(g) = &mut this.guard else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        loop {
            if let Some(f) = g.ready.pop_front() {
                return Poll::Ready(Some(Ok(f)));
            }
            match g.end.take() {
                Some(None) => {
                    g.end = Some(None);
                    return Poll::Ready(None);
                }
                Some(Some(e)) => return Poll::Ready(Some(Err(e))),
                None => {}
            }
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            g.absorb(frame.map(|f| f.map_err(Into::into)))?;
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.guard {
            None => self.inner.is_end_stream(),
            Some(g) => g.ready.is_empty() && matches!(g.end, Some(None)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let Some(g) = &self.guard else {
            return inner;
        };
        // Re-chunked, never resized: what remains is what the upstream has left
        // plus what is held and queued.
        let queued: usize = g.held.len()
            + g.ready
                .iter()
                .filter_map(Frame::data_ref)
                .map(Bytes::len)
                .sum::<usize>();
        if matches!(g.end, Some(None)) {
            return SizeHint::with_exact(queued as u64);
        }
        let mut h = SizeHint::new();
        h.set_lower(inner.lower() + queued as u64);
        if let Some(u) = inner.upper() {
            h.set_upper(u + queued as u64);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    const SECRET: &str = "s3cret-static-backend-token";

    fn reflection() -> Reflection {
        Reflection::of(
            &HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
            "fhir",
        )
        .unwrap()
    }

    /// The body of `chunks` through the guard: the bytes released before the end or
    /// the error, and whether it ended in the error.
    async fn through(chunks: Vec<&'static [u8]>) -> (Vec<u8>, bool) {
        let frames = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let mut body = Unreflected::new(StreamBody::new(frames), Some(reflection()));
        let mut out = Vec::new();
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => out.extend_from_slice(f.data_ref().unwrap()),
                Err(e) => {
                    assert!(e.downcast_ref::<Reflected>().is_some(), "{e}");
                    return (out, true);
                }
            }
        }
        (out, false)
    }

    #[tokio::test]
    async fn a_clean_body_passes_whole_however_chunked() {
        let text: &'static [u8] =
            b"{\"resourceType\":\"Patient\",\"id\":\"p1\",\"note\":\"s3cret-static-backend-toke\"}";
        for size in [1, 2, 7, 26, 27, 28, 64, 1000] {
            let chunks: Vec<&'static [u8]> = text.chunks(size).collect();
            let (out, cut) = through(chunks).await;
            assert!(!cut, "size {size}");
            assert_eq!(out, text, "size {size}");
        }
    }

    #[tokio::test]
    async fn a_repeated_credential_never_reaches_the_client_whole_however_chunked() {
        let text: &'static [u8] =
            b"{\"headers\":{\"authorization\":\"Bearer s3cret-static-backend-token\"}}";
        for size in [1, 2, 5, 26, 27, 28, 40, 1000] {
            let chunks: Vec<&'static [u8]> = text.chunks(size).collect();
            let (out, cut) = through(chunks).await;
            assert!(cut, "size {size}: not cut");
            // Not even a prefix of the secret longer than what cannot be told from
            // ordinary text went out: nothing of it at all, here.
            let released = String::from_utf8_lossy(&out);
            assert!(!released.contains("s3cret"), "size {size}: {released}");
        }
    }

    #[test]
    fn headers_are_searched_and_short_values_are_not() {
        let r = reflection();
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("ok"));
        assert!(r.in_headers(&h).is_none());
        h.insert(
            "x-debug-auth",
            HeaderValue::from_str(&format!("seen Bearer {SECRET}")).unwrap(),
        );
        assert_eq!(r.in_headers(&h).unwrap(), "x-debug-auth");
        assert!(Reflection::of(&HeaderValue::from_static("Bearer abc"), "x").is_none());
        let key = Reflection::of(&HeaderValue::from_static("api-key-from-phigate"), "k").unwrap();
        assert_eq!(key.len(), "api-key-from-phigate".len());
    }
}
