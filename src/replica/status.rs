//! What `kvfs status` and `kvfs replica list` say about replication, as text and as JSON
//! (field names are stable; README lists them).

use std::fmt;

use serde::Serialize;

use super::{apply, cf_from_u8, log, Change, ReplicaError};
use crate::keyspace::records::FmapEntry;
use crate::kv::{Cf, KvStore};
use crate::util::Timestamp;

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaFacts {
    pub name: String,
    pub url: String,
    pub fingerprint: Option<String>,
    /// `in sync`, `behind`, `waiting` (its first shipment is not logged yet) or `error`
    /// (behind, and the last attempt failed).
    pub state: String,
    /// Last group acknowledged (applied and synced there).
    pub acked: u64,
    /// Unix seconds of that acknowledgement.
    pub acked_at: Option<i64>,
    /// Groups logged and not yet acknowledged.
    pub unshipped_groups: u64,
    /// Metadata bytes of those groups, and the content bytes their block maps name (an upper
    /// bound of what is to be sent: the replica may hold some already).
    pub unshipped_metadata_bytes: u64,
    pub unshipped_block_bytes: u64,
    /// Seconds since the oldest unacknowledged group was logged (0 when in sync).
    pub lag_seconds: i64,
    pub error: Option<String>,
    pub error_at: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaOf {
    /// The last group applied from the primary, and when (Unix seconds).
    pub applied: u64,
    pub applied_at: Option<i64>,
    pub promoted_at: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Replication {
    /// `primary`, `replica` or `satellite`.
    pub role: String,
    /// A satellite's upstream URL.
    pub upstream: Option<String>,
    /// Last group logged, groups and bytes in the log, changes not yet logged.
    pub log_head: u64,
    pub log_groups: u64,
    pub log_bytes: u64,
    pub pending_changes: u64,
    pub replicas: Vec<ReplicaFacts>,
    pub replica_of: Option<ReplicaOf>,
}

pub fn replication(store: &KvStore) -> Result<Replication, ReplicaError> {
    let head = log::head(store)?;
    let groups = log::groups(store)?;
    let now = Timestamp::now().secs;
    let mut replicas = Vec::new();
    for (name, r) in super::replicas(store)? {
        let pending: Vec<_> = groups.iter().filter(|g| g.0 > r.acked).collect();
        let mut block_bytes = 0u64;
        for (seq, _, _) in &pending {
            for p in log::read_group(store, *seq)?.unwrap_or_default() {
                for ch in p.changes {
                    if let Change::Put { cf, value, .. } = ch {
                        if cf_from_u8(cf) == Some(Cf::Fmap) && !r.is_satellite() {
                            block_bytes += FmapEntry::decode(&value).map_or(0, |e| e.len as u64);
                        }
                    }
                }
            }
        }
        let behind = r.base.is_none() || r.acked < head.seq;
        let state = match (r.base, behind, &r.error) {
            (None, _, _) => "waiting",
            (_, false, _) => "in sync",
            (_, true, Some(_)) => "error",
            (_, true, None) => "behind",
        };
        replicas.push(ReplicaFacts {
            name,
            url: r.url,
            fingerprint: r.fingerprint,
            state: state.into(),
            acked: r.acked,
            acked_at: r.acked_at.map(|t| t.secs),
            unshipped_groups: pending.len() as u64,
            unshipped_metadata_bytes: pending.iter().map(|g| g.1).sum(),
            unshipped_block_bytes: block_bytes,
            lag_seconds: pending.first().map_or(0, |g| (now - g.2.secs).max(0)),
            error: r.error.as_ref().map(|e| e.1.clone()),
            error_at: r.error.as_ref().map(|e| e.0.secs),
        });
    }
    let replica_of = apply::state(store)?.map(|s| ReplicaOf {
        applied: s.applied,
        applied_at: s.applied_at.map(|t| t.secs),
        promoted_at: s.promoted.map(|t| t.secs),
    });
    let upstream = super::upstream(store)?.map(|u| u.url);
    let role = match &replica_of {
        Some(r) if r.promoted_at.is_none() && upstream.is_some() => "satellite",
        Some(r) if r.promoted_at.is_none() => "replica",
        _ => "primary",
    };
    Ok(Replication {
        role: role.into(),
        upstream,
        log_head: head.seq,
        log_groups: groups.len() as u64,
        log_bytes: groups.iter().map(|g| g.1).sum(),
        pending_changes: log::marker_count(store)?,
        replicas,
        replica_of,
    })
}

impl fmt::Display for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "role: {}", self.role)?;
        if let Some(r) = &self.replica_of {
            writeln!(
                f,
                "{} of {}: applied group {}{}",
                self.role,
                self.upstream.as_deref().unwrap_or("its primary"),
                r.applied,
                r.applied_at
                    .map(|t| format!(" ({}s ago)", Timestamp::now().secs - t))
                    .unwrap_or_default()
            )?;
        }
        if self.replicas.is_empty() && self.log_groups == 0 {
            return writeln!(f, "replicas: none");
        }
        writeln!(
            f,
            "replication log: head {}, {} groups ({} bytes) kept, {} changes not yet logged",
            self.log_head, self.log_groups, self.log_bytes, self.pending_changes
        )?;
        writeln!(f, "replicas: {}", self.replicas.len())?;
        for r in &self.replicas {
            writeln!(
                f,
                "  {} {} [{}] acked {} of {}, unshipped {} groups ({} B metadata, <= {} B blocks), lag {}s",
                r.name,
                r.url,
                r.state,
                r.acked,
                self.log_head,
                r.unshipped_groups,
                r.unshipped_metadata_bytes,
                r.unshipped_block_bytes,
                r.lag_seconds
            )?;
            if let Some(e) = &r.error {
                writeln!(f, "    last error: {e}")?;
            }
        }
        Ok(())
    }
}
