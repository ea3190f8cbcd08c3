//! The containerd snapshots API, generated at build time from `proto/` (containerd v1.6.20).
//! The modules mirror the protobuf packages, as the generated code's paths expect.
#![allow(missing_docs, clippy::all)]

/// The `containerd` protobuf packages.
pub mod containerd {
    /// `containerd.types`: the Mount message.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// containerd's services.
    pub mod services {
        /// The snapshots service.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
