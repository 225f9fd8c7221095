//! kvfs: a FUSE filesystem whose whole state (inodes, directory entries, xattrs and
//! content-addressed, deduplicated blocks) lives as keys in one transactional RocksDB store.
//!
//! Layers, arrows pointing down only (see DESIGN.md):
//! `cli` (src/main.rs) → [`mount`] (and [`control`]) → [`fuse`] (the only fuser code) →
//! [`fs`] (one retried transaction per operation) → [`blocks`] → [`keyspace`] → [`kv`] (the
//! engine trait; `kv::rocks` is the only RocksDB code). Beside them, the operator's tools:
//! [`gc`] (process table and sweeper), [`audit`] (fsck), [`dump`] and [`status`].

pub mod audit;
pub mod bench;
pub mod blocks;
pub mod control;
pub mod dump;
pub mod fs;
pub mod fuse;
pub mod gc;
pub mod history;
pub mod keyspace;
pub mod kv;
mod maintenance;
pub mod mount;
pub mod mountinfo;
pub mod replica;
#[cfg(test)]
mod sim;
pub mod status;
pub mod store;
pub mod tier;
pub mod util;
