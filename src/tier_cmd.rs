//! `kvfs config`, `kvfs pin`, `kvfs unpin`: tiering settings and pinned subtrees, on a store
//! that is mounted (through its mount's control socket) or not (opened here).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvfs::store;
use kvfs::tier::{self, config, fetch::Fetcher, pin};

#[derive(clap::Args)]
pub struct ConfigArgs {
    pub store: PathBuf,
    /// `key=value` to set, `key=` to remove; none: print the settings. Keys: cache_size
    /// (10G), min_copies (1), fetch_timeout (seconds, 10), history (7d; 0: off).
    pub changes: Vec<String>,
}

#[derive(clap::Args)]
pub struct PinArgs {
    pub store: PathBuf,
    /// A path on the store's mount (when mounted), or inside the filesystem (`/projects/x`)
    /// when it is not.
    pub path: PathBuf,
}

pub fn config_cmd(a: ConfigArgs) -> anyhow::Result<()> {
    let mut changes = Vec::new();
    for c in &a.changes {
        let (k, v) = c
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{c:?}: use key=value (key= removes it)"))?;
        changes.push((k.trim().to_string(), v.trim().to_string()));
    }
    let out = match store::open(&a.store) {
        Ok((kv, _)) => {
            let s = if changes.is_empty() {
                config::read(&kv)?
            } else {
                let s = config::write(&kv, &changes)?;
                // A history window starts recording (or stops) from here.
                kvfs::history::install(&kv)?;
                kv.sync()?;
                s
            };
            config::render(&s)
        }
        Err(store::StoreError::InUse(_)) => {
            let req: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
            kvfs::control::request(&a.store, &format!("config {}", req.join(" ")))?
        }
        Err(e) => return Err(e.into()),
    };
    print!("{out}");
    Ok(())
}

/// The inode of `path` on a mount of `dir`: the mount's inode numbers are the store's.
fn mounted_ino(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(m.ino())
}

pub fn pin_cmd(a: PinArgs, up: bool) -> anyhow::Result<()> {
    let verb = if up { "pin" } else { "unpin" };
    let report = match store::open(&a.store) {
        Ok((kv, format)) => {
            let kv = Arc::new(kv);
            let root = pin::resolve(&kv, &a.path.to_string_lossy())?;
            let settings = config::TierSettings::resolve(&config::read(&kv)?, &Default::default())
                .map_err(|e| anyhow::anyhow!(e))?;
            let t = Arc::new(tier::Tier::new(settings, Vec::new()));
            let f = Fetcher::new(
                kv.clone(),
                &format,
                a.store.clone(),
                settings.fetch_timeout,
                t,
            );
            pin::pin(&kv, &f, root, up)?.to_string()
        }
        Err(store::StoreError::InUse(_)) => {
            let ino = mounted_ino(&a.path)?;
            kvfs::control::request(&a.store, &format!("{verb} {ino}"))?
                .trim_end()
                .to_string()
        }
        Err(e) => return Err(e.into()),
    };
    println!("{verb}ned {}: {report}", a.path.display());
    Ok(())
}
