//! `kvfs log` and `kvfs snapshot`: a path's past and named moments, on a store that is
//! mounted (snapshots through its mount's control socket; the log reads beside it) or not.

use std::path::PathBuf;

use kvfs::history::{self, when};
use kvfs::store;

#[derive(clap::Args)]
pub struct LogArgs {
    pub store: PathBuf,
    /// A path inside the filesystem (`/projects/thesis.tex`).
    pub path: String,
    /// One JSON object per change.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    pub store: PathBuf,
    /// The name to give this moment (kept until removed, past the history window).
    pub name: Option<String>,
    /// List the snapshots: name and moment.
    #[arg(long, conflicts_with_all = ["name", "remove"])]
    pub list: bool,
    /// Remove the snapshot NAME: what only it kept is freed by the next trims.
    #[arg(long, value_name = "NAME", conflicts_with = "name")]
    pub remove: Option<String>,
}

pub fn log_cmd(a: LogArgs) -> anyhow::Result<()> {
    let (kv, _) = store::open_read_only(&a.store)?;
    let events = history::log::log(&kv, &a.path)?;
    for e in &events {
        if a.json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            println!(
                "{}\t{}\t{}\t{}",
                e.at,
                e.what,
                e.size.map_or("-".into(), |s| s.to_string()),
                e.content.as_deref().unwrap_or("-")
            );
        }
    }
    if events.is_empty() && !a.json {
        println!("{}: no state of it within the window", a.path);
    }
    Ok(())
}

pub fn snapshot_cmd(a: SnapshotArgs) -> anyhow::Result<()> {
    if a.list {
        let (kv, _) = store::open_read_only(&a.store)?;
        let st = history::state(&kv)?;
        for (name, at) in &st.snapshots {
            println!("{name}\t{}", when::show(*at));
        }
        return Ok(());
    }
    let (req, name) = match (&a.name, &a.remove) {
        (Some(n), None) => ("snapshot", n),
        (None, Some(n)) => ("snapshot-remove", n),
        _ => anyhow::bail!("give a NAME, --remove NAME or --list"),
    };
    let at = match store::open(&a.store) {
        Ok((kv, _)) if req == "snapshot" => history::snapshot(&kv, name)?,
        Ok((kv, _)) => {
            // Trimming ends past holds and the sweep deletes files: the replicas' to know.
            kvfs::replica::track_if_replicated(&kv)?;
            let at = history::remove_snapshot(&kv, name)?;
            history::index(&kv)?;
            history::trim(&kv)?;
            kvfs::gc::collect(&kv, &kvfs::gc::SweepOptions::default())?;
            kv.sync()?;
            at
        }
        Err(store::StoreError::InUse(_)) => {
            let reply = kvfs::control::request(&a.store, &format!("{req} {name}"))?;
            when::parse(reply.trim(), 0).map_err(anyhow::Error::msg)?
        }
        Err(e) => return Err(e.into()),
    };
    let verb = if req == "snapshot" {
        "named"
    } else {
        "removed"
    };
    println!("{verb} {name}: {}", when::show(at));
    Ok(())
}
