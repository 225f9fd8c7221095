//! Behaviour tests through the public API, the real binary and real FUSE mounts.

mod acl;
mod cli;
mod common;
mod crash;
mod data;
mod edges;
mod fsapi;
mod fuzz;
mod history;
mod locks;
mod model;
mod posix;
mod ranges;
mod replica;
mod replica_faults;
mod satellite;
mod setid;
mod tier;
mod tools;
