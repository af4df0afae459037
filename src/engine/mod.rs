//! The sans-I/O cache engine: no threads, clocks, syscalls or SPDK calls. It takes
//! requests and device completions and emits device commands and request completions;
//! the same inputs always give the same outputs.

pub mod cache;
pub mod format;
pub mod geometry;
pub mod index;
pub mod io;
pub mod mode;
pub mod open;
pub mod pool;
pub mod shard;
pub mod slab;
pub mod stats;

pub use cache::{Cache, CacheOptions, CacheStats, Coordination, Direct};
pub use format::{BackingIdentity, FormatError, Superblock};
pub use geometry::{Geometry, GeometryError, LayoutOptions};
pub use io::{Buf, Command, Dev, IoDone, IoError, Op, ReqError, ReqId, ReqResult, Request, Verify};
pub use mode::{CacheMode, SeqCutoff, SeqPolicy, WriteAdmission};
pub use open::{
    compare_backing, format, BackingMatch, FormatOptions, OpenError, OpenReport, OpenStep, Opener,
    UuidMismatch,
};
