//! # lazylayer-loopback: servers on 127.0.0.1, in the process
//!
//! What `lazylayer demo` needs to run on a machine alone, and what the tests use where a
//! real registry is not the point:
//! - [`layout_registry`]: a read-only registry serving one OCI image layout over the OCI
//!   distribution protocol (manifests by tag or digest, blobs with Range);
//! - [`proxy`]: a TCP proxy that shapes bandwidth and latency like a real link, and for tests
//!   injects faults (resets, stalls, truncated or corrupted bodies, HTTP 500/503/429);
//! - [`http_wire`]: the bit of HTTP/1.1 both speak; [`background`]: their server threads.
//!
//! It listens on loopback only and reaches nothing else. It is its own crate so that the
//! product links it without the test kit (fixtures, Debian's registry, hostile layers).
#![forbid(unsafe_code)]

pub mod background;
pub mod http_wire;
pub mod layout_registry;
pub mod proxy;
