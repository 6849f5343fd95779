//! phigate: a transparent gateway that makes every access to protected health
//! information attributable, authorized, minimal and recorded.
//!
//! The request's path through the modules, in order:
//!
//! * [`redirect`]: eBPF cgroup hooks send protected connects to the agent and tell it the
//!   original destination and the kernel-attested caller ([`redirect::OrigDstLookup`]).
//! * [`proxy`]: the accept loop; per destination protocol, TCP pass-through or TLS/HTTP.
//! * [`tls`]: the local CA, minted leaf certificates, ClientHello sniffing, verified
//!   upstream TLS.
//! * [`http`]: hyper serving the client (HTTP/1.1, HTTP/2) and forwarding upstream.
//! * [`pipeline`]: one request top to bottom: identify, authorize, approve, forward,
//!   mask, record.
//! * [`identity`]: who is calling (workload identity from the kernel, enriched from /proc).
//! * [`policy`]: the Cedar policy set that decides every request (authorize stage).
//! * [`mask`]: PHI masking of bodies and headers by profile (JSON, NDJSON, streaming).
//! * [`record`]: one record per connection and per request, to the configured sink.
//!
//! [`sockets`] makes the agent's own outbound sockets (exempt from the redirect by
//! their kernel cookies), for every layer that connects out; [`outbound`] is the
//! agent's own small HTTP client on them (OIDC discovery and keys, webhooks), apart
//! from the data plane's pooled forwarder; [`io`] meters a connection's bytes.
//!
//! [`app`] wires them together; [`cli`] is the `phigate` command line.
//!
//! Modules are private to the crate unless a tool outside it needs them (the
//! command line, the benchmarks and fuzz targets, the auditors' record reader);
//! they form one-way layers (`cargo xtask layers`), and those without unsafe code
//! forbid it: the syscalls live in redirect, sockets, identity, record and app.

pub(crate) mod admin;
pub(crate) mod app;
pub mod approval;
pub mod cli;
pub mod config;
pub(crate) mod console;
pub(crate) mod credential;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod http;
pub mod identity;
pub(crate) mod io;
pub mod mask;
pub(crate) mod metrics;
pub(crate) mod outbound;
pub(crate) mod pipeline;
pub mod policy;
pub(crate) mod preflight;
pub(crate) mod proxy;
pub mod record;
pub(crate) mod redirect;
pub mod settings;
pub(crate) mod sockets;
pub(crate) mod state;
pub(crate) mod tls;
