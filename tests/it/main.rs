//! Behaviour tests through the public API, the real binary and real FUSE mounts.

mod cli;
mod common;
mod data;
mod fsapi;
mod model;
mod posix;
