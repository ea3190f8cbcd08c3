//! # lazylayer-index: random access into unmodified OCI layers
//!
//! A layer blob is a compressed tar. Its lazy index says where each file's bytes sit in the
//! uncompressed stream ([`entry`]), and where decompression can restart: the blob is cut into
//! spans ([`format`]), each with a sha256 of its compressed bytes and a checkpoint to resume
//! from (gzip: zran bit offset + 32 KiB window; zstd: frame boundaries; plain tar: anywhere).
//! [`build`] makes an index in one streaming pass; [`read`] fetches only the spans a read
//! needs, verifies them, and decompresses from their checkpoint. Layers written for lazy reading
//! (eStargz) are indexed from their own table of contents instead ([`toc`]).

pub mod build;
pub mod check;
pub mod codec;
pub mod distribution;
pub mod entry;
pub mod error;
pub mod format;
pub mod local;
pub mod read;
pub mod toc;

pub use build::{
    BuildOptions, DEFAULT_CONTINUATION, DEFAULT_SPACING, build, build_and_cache, build_from_reader,
};
pub use entry::{Entry, EntryKind, Piece};
pub use error::{Error, Result};
pub use format::{
    Compression, INDEX_MEDIA_TYPE, IndexHead, IndexMeta, LayerIndex, Span, SpanStart, WindowsSource,
};
pub use local::IndexStore;
pub use read::{InflatedFor, KeyedLocks, LayerReader, ReaderStats, Verification};
