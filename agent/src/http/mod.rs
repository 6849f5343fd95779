//! HTTP parts the request path is built from: admitting a request ([`admit`]), the
//! bodies phigate answers and relays ([`body`]), and the pooled forwarder to the real
//! upstream ([`forward`]). Serving a client connection with them is the proxy's
//! ([`crate::proxy::serve`]).
#![forbid(unsafe_code)]

pub mod admit;
pub mod body;
pub mod forward;

/// An error with its sources, `outer: inner: innermost`, for logs and 502 reasons.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
