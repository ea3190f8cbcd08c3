//! # lazylayer-container: running a workload on a mounted image
//!
//! The last step of the data flow: [`spec`] turns the image config and the command line into a
//! [`ContainerSpec`](spec::ContainerSpec), [`users`] resolves the image's `User` inside the
//! image, and [`runtime`] runs it in new mount, pid, uts and ipc namespaces with `pivot_root`,
//! as container runtimes do.

pub mod baseline;
pub mod runtime;
pub mod spec;
pub mod users;

pub use spec::{ContainerSpec, ImageRuntimeConfig};

/// The hidden first argument that makes `lazylayer` the container helper
/// (`lazylayer __container SPEC.json`).
pub const HELPER_ARGUMENT: &str = "__container";
