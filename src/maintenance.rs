//! A mount's maintenance thread: the timer of the write-back buffer, the heartbeat, the
//! background sweeper, history's indexing and trimming, the idle checkpoint and the reclaim
//! of freed blocks' space.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::fs::Fs;
use crate::gc::{self, SweepOptions};
use crate::util::Timestamp;

/// Reclaim the disk space of freed and evicted blocks once this much, or a tenth of the blob files, has
/// been freed. Reclaiming compacts the blocks family with blob collection on, which also
/// moves the live blocks of the oldest quarter of blob files: on a large store that costs
/// more than a fixed amount of freed space is worth, so the bar grows with the store.
const RECLAIM_AFTER: u64 = 256 << 20;

/// Once the mount has had no change for [`RECLAIM_IDLE`], the fixed part of that bar drops to
/// this: an emptied small store held 225 MiB of freed blocks 10 s after its last write (the
/// tenth of the blob files still bounds a large store's).
const RECLAIM_AFTER_IDLE: u64 = 16 << 20;
const RECLAIM_IDLE: Duration = Duration::from_secs(3);

/// After this long without a change by the mount's operations, the store is checkpointed.
/// Five seconds, so that 10 s after its last write (issue #13's measure) a store has dropped
/// its WAL: at ten, `du` of an emptied store still counted 60 MiB of WAL and its reserve then.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(5);

/// History's pending moments are indexed at least this often, idle or not.
const INDEX_AT_LEAST: Duration = Duration::from_secs(30);

/// How often the mount sweeps garbage in the background.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The timer of the write-back buffer, the heartbeat and the background sweeper.
/// A satellite's mount (read-only to its users, its store written by its pull and fetches)
/// has no process entry to beat and nothing of its own to sweep, but checkpoints and reclaims
/// the space of evicted blocks.
pub(crate) fn run(fs: &Fs, stop: &AtomicBool, started: Timestamp, satellite: bool) {
    let (mut beat, mut swept) = (Instant::now(), Instant::now());
    let mut tick = 0u64;
    // Bytes of blocks freed or evicted since their space was last reclaimed.
    let mut freed = 0u64;
    let mut last_flush_err: Option<String> = None;
    // Whether the store was checkpointed since the mount last changed it.
    let mut checkpointed = true;
    let mut indexed = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        tick += 1;
        if tick % 5 == 0 {
            // The data stays buffered and is retried each second; say so once per new error
            // (a full disk must not also fill up with log lines).
            match fs.flush_older(Duration::from_secs(2)) {
                Err(e) if last_flush_err.as_deref() != Some(&e.to_string()) => {
                    tracing::error!(error = %e, "timed flush failed; the data stays buffered and is retried");
                    last_flush_err = Some(e.to_string());
                }
                Err(_) => {}
                Ok(()) => {
                    if last_flush_err.take().is_some() {
                        tracing::info!("timed flush succeeded again");
                    }
                }
            }
            // History's pending moments into its per-key index: once the mount has had no
            // operation for a second, so that a burst of changes or of reads does not also
            // pay for it (on two cores it took a tenth of a stat phase's rate), or every 30 s.
            if fs.quiet_for() >= Duration::from_secs(1) || indexed.elapsed() >= INDEX_AT_LEAST {
                indexed = Instant::now();
                match crate::history::index(fs.store()) {
                    Err(e) => tracing::error!(error = %e, "indexing history failed"),
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(
                        moments = n,
                        ms = indexed.elapsed().as_millis() as u64,
                        "history indexed"
                    ),
                }
            }
        }
        if fs.read_only() && !satellite {
            continue;
        }
        // An idle store needs no WAL: once nothing changed for a while, memtables go to table
        // files and the log files with them (an emptied store held 1.5 GB of WAL before).
        if fs.idle_for() < IDLE_CHECKPOINT {
            checkpointed = false;
        } else if !checkpointed {
            match fs.store().checkpoint() {
                Ok(()) => checkpointed = true,
                Err(e) => tracing::error!(error = %e, "idle checkpoint failed"),
            }
        }
        if !satellite && beat.elapsed() >= gc::HEARTBEAT {
            beat = Instant::now();
            match gc::heartbeat(fs.store(), fs.mount_id(), started) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("this mount's process entry had been reaped; registered again");
                    if let Err(e) = fs.restore_open_counts() {
                        tracing::error!(error = %e, "restoring open counts failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "heartbeat failed"),
            }
        }
        if swept.elapsed() >= SWEEP_EVERY {
            swept = Instant::now();
            if !satellite {
                let o = SweepOptions::by_mount(fs.mount_id(), false);
                match gc::sweep(fs.store(), &o) {
                    Ok(r) => freed += r.blocks_freed * fs.block_size(),
                    Err(e) => tracing::error!(error = %e, "background sweep failed"),
                }
                // The past that left the history window; its blocks go at the next sweep.
                if let Err(e) = crate::history::trim(fs.store()) {
                    tracing::error!(error = %e, "trimming history failed");
                }
            }
            freed += fs.tier().map_or(0, |t| t.take_evicted_bytes());
            // Freed and evicted blocks give their space back only through compaction: at
            // once when the disk is short of space, otherwise once a good amount was freed.
            if freed > 0 {
                let low = fs.space_low();
                let floor = if fs.idle_for() >= RECLAIM_IDLE {
                    RECLAIM_AFTER_IDLE
                } else {
                    RECLAIM_AFTER
                };
                let bar = floor.max(fs.store().block_storage_bytes() / 10);
                if low || freed >= bar {
                    tracing::info!(
                        bytes = freed,
                        low,
                        "reclaiming the space of freed and evicted blocks"
                    );
                    match fs.store().reclaim_freed_space() {
                        Ok(()) => freed = 0,
                        Err(e) => tracing::error!(error = %e, "compaction failed"),
                    }
                }
            }
        }
    }
}
