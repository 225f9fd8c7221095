//! `kvfs mount STORE DIR --at MOMENT`: a read-only mount of the filesystem as it was at
//! MOMENT. It opens the store as a follower (a second reader beside the live mount, or
//! alone), checks that the moment is kept, and serves an ordinary read-only [`Fs`] over the
//! [`View`] of that moment. Any number of them run beside the live mount.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::view::View;
use super::{when, HistoryState};
use crate::fs::{Fs, FsOptions};
use crate::fuse::session::Mounted;
use crate::kv::KvStore;
use crate::mount::{MountError, MountOpts};
use crate::store;

/// The moment `at` names in `store`: a snapshot's name or a time ([`when::parse`]), checked
/// against what the store keeps.
pub fn resolve(kv: &KvStore, at: &str) -> Result<(u64, HistoryState), String> {
    let st = super::state(kv).map_err(|e| e.to_string())?;
    let now = crate::kv::now_ns();
    let moment = match st.snapshot(at) {
        Some(m) => m,
        None => when::parse(at, now)?,
    };
    st.check(moment, now)?;
    Ok((moment, st))
}

/// Serve the state of `store_dir` at `at` on `mnt` until unmounted.
pub fn run(
    store_dir: &Path,
    mnt: &Path,
    opts: &MountOpts,
    at: &str,
    ready: impl FnOnce(),
) -> Result<(), MountError> {
    if opts.listen.is_some()
        || !opts.tier.is_empty() && opts.tier.iter().any(|(k, _)| k != "fetch_timeout")
    {
        return Err(MountError::Settings(
            "--at: a past moment is mounted read-only; listen=, cache_size= and min_copies= do not apply".into(),
        ));
    }
    let (kv, format) = store::open_follower(store_dir)?;
    kv.catch_up()?;
    let (moment, _) = resolve(&kv, at).map_err(MountError::Settings)?;
    let view = KvStore::with_engine(Arc::new(View::new(kv.engine(), moment)?));
    let timeout = crate::mount::tier_settings(&kv, opts)?.fetch_timeout;
    drop(kv);
    let mut opts = opts.clone();
    opts.read_only = true;
    let fs = Arc::new(Fs::new(
        view,
        format.clone(),
        FsOptions {
            read_only: true,
            atime: opts.atime,
            ..Default::default()
        },
    ));
    // Blocks evicted since (tiering) are fetched from the replicas, not stored.
    let f = Arc::new(crate::tier::fetch::Fetcher::checking(
        fs.store_arc(),
        &format,
        store_dir.to_path_buf(),
        timeout,
    ));
    fs.set_tiering(f.clone(), None);
    let mut session =
        Mounted::new(fs.clone(), store_dir, mnt, &opts.session()).map_err(|source| {
            MountError::Mount {
                path: mnt.to_path_buf(),
                source,
            }
        })?;
    crate::mount::unmount_on_signal(&mut session)?;
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let (fs, stop) = (fs.clone(), stop.clone());
        crate::mount::spawn(
            "kvfs-follow",
            Box::new(move || crate::mount::follow(&fs, &stop)),
        )?
    };
    tracing::info!(
        store = %store_dir.display(),
        mountpoint = %mnt.display(),
        at = %when::show(moment),
        "mounted a past moment (read-only)"
    );
    ready();
    let served = session.run();
    stop.store(true, Ordering::Relaxed);
    let _ = follower.join();
    drop(f);
    tracing::info!("unmounted cleanly");
    served.map_err(MountError::Session)
}
