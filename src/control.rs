//! The control socket of a mount (`STORE/kvfs.sock`, 0600): how the tools reach the process
//! that holds the store. One request line, one reply, close. Requests: `gc [dry-run]
//! [timeout=S]` (the sweep, after flushing buffered writes, so it sees what the user sees),
//! `remount OPTIONS` (what `mount -o remount` asks through the mount helper), `replica-add`,
//! `replica-remove`, `replica-sync`, `config KEY=VALUE...`, `pin INODE`, `unpin INODE`,
//! `snapshot NAME`, `snapshot-remove NAME`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::fs::Fs;
use crate::gc::{self, SweepOptions};
use crate::kv::KvStore;
use crate::replica;
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{store}: the store is in use but its mount does not answer on {socket} ({source})")]
    NoAnswer {
        store: PathBuf,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The mount answered with an error.
    #[error("{0}")]
    Refused(String),
}

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // We hold the store's lock, so a socket file left there belongs to a dead mount.
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The answer to a remount of a mount point this process does not serve.
pub const NOT_THIS_MOUNT: &str = "not this mount";

/// Answer the tools for the mount of `fs` on `mountpoint`: one request line, a reply, close.
pub fn serve(fs: &Fs, mountpoint: &Path, listener: UnixListener, stop: &AtomicBool) {
    serve_with(listener, stop, |line| answer(fs, mountpoint, line))
}

/// Answer each request on `listener` with `answer` (the reply: `ok` or `error: ...` first),
/// one at a time, until `stop`.
pub fn serve_with(listener: UnixListener, stop: &AtomicBool, answer: impl Fn(&str) -> String) {
    let reply = |conn: UnixStream| -> std::io::Result<()> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line)?;
        (&conn).write_all(answer(&line).as_bytes())
    };
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                if let Err(e) = reply(conn) {
                    tracing::warn!(error = %e, "control request failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => {
                tracing::error!(error = %e, "control socket failed");
                return;
            }
        }
    }
}

fn answer(fs: &Fs, mountpoint: &Path, line: &str) -> String {
    if let Some(reply) = answer_replicas(fs.store(), line) {
        return reply;
    }
    let mut words = line.split_whitespace();
    match words.next() {
        Some("gc") => {
            let mut o = SweepOptions::by_mount(fs.mount_id(), false);
            for w in words {
                match w.split_once('=') {
                    None if w == "dry-run" => o.dry_run = true,
                    Some(("timeout", n)) => {
                        o.timeout = Duration::from_secs(n.parse().unwrap_or(o.timeout.as_secs()))
                    }
                    _ => {}
                }
            }
            // Buffered writes first, so the sweep sees what the user sees.
            match fs.flush_all().and_then(|_| gc::collect(fs.store(), &o)) {
                Ok(r) => format!("ok\n{r}\n"),
                Err(e) => format!("error: {e}\n"),
            }
        }
        Some("remount") => {
            // `remount OPTIONS MOUNTPOINT`: a read-only mount of the same store elsewhere has
            // no socket of its own, and must not have this one remounted in its place.
            let options = words.next().unwrap_or("");
            let target = line.trim_end().splitn(3, ' ').nth(2).unwrap_or("");
            let ours = std::fs::canonicalize(target).is_ok_and(|t| t == mountpoint);
            match ours.then(|| remount(fs, mountpoint, options)) {
                Some(Ok(())) => "ok\n".to_string(),
                Some(Err(e)) => format!("error: {e}\n"),
                None => format!("error: {NOT_THIS_MOUNT}\n"),
            }
        }
        Some("replica-sync") => {
            let secs = words.next().and_then(|w| w.parse().ok()).unwrap_or(600);
            match replica_sync(fs, Duration::from_secs(secs)) {
                Ok(r) => format!("ok\n{r}"),
                Err(e) => format!("error: {e}\n"),
            }
        }
        Some("config") => {
            let changes: Vec<(String, String)> = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            match fs.tier() {
                Some(t) => match crate::tier::configure(fs.store(), t, &changes).and_then(|s| {
                    // A new history window starts (or stops) recording now.
                    crate::history::install(fs.store())?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        let mut out = format!("ok\n{}", crate::tier::config::render(&s));
                        for (k, v) in &t.mount_settings {
                            if changes.iter().any(|(c, _)| c == k) {
                                out.push_str(&format!(
                                    "note: this mount's -o {k}={v} stays in force until it is mounted again\n"
                                ));
                            }
                        }
                        out
                    }
                    Err(e) => format!("error: {e}\n"),
                },
                None => "error: this mount is read-only\n".to_string(),
            }
        }
        Some("snapshot") => {
            // Buffered writes first: the moment named is what the user sees now.
            let name = words.next().unwrap_or("");
            match fs
                .flush_all()
                .map_err(|e| crate::kv::KvError::Other(e.to_string()))
                .and_then(|_| crate::history::snapshot(fs.store(), name))
            {
                Ok(at) => format!("ok\n{}\n", crate::history::when::show(at)),
                Err(e) => format!("error: {e}\n"),
            }
        }
        Some("snapshot-remove") => {
            match crate::history::remove_snapshot(fs.store(), words.next().unwrap_or("")) {
                Ok(at) => format!("ok\n{}\n", crate::history::when::show(at)),
                Err(e) => format!("error: {e}\n"),
            }
        }
        Some(w @ ("pin" | "unpin")) => match words.next().and_then(|i| i.parse().ok()) {
            Some(ino) => match fs.pin(ino, w == "pin") {
                Ok(r) => format!("ok\n{r}\n"),
                Err(e) => format!("error: {e}\n"),
            },
            None => "error: pin INODE\n".to_string(),
        },
        _ => format!("error: unknown request {:?}\n", line.trim()),
    }
}

/// `replica-add NAME FINGERPRINT|- URL` and `replica-remove NAME` on `store` (a mount's, or
/// the replica of a `kvfs serve`); `None` for any other request.
pub fn answer_replicas(store: &KvStore, line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let r = match words.next()? {
        "replica-add" => {
            let (name, fp) = (words.next().unwrap_or(""), words.next().unwrap_or("-"));
            let url = words.collect::<Vec<_>>().join(" ");
            let fp = (fp != "-").then(|| fp.to_string());
            replica::add(store, name, &url, fp)
        }
        "replica-remove" => replica::remove(store, words.next().unwrap_or("")),
        _ => return None,
    };
    Some(match r {
        Ok(()) => "ok\n".to_string(),
        Err(e) => format!("error: {e}\n"),
    })
}

/// `mount -o remount,OPTIONS`: the kernel's flags of the mount change (read-only or writable,
/// atime, dev/suid/exec; the options replace the old ones, as mount(2) wants), then this
/// mount's own access-time rule, and a mount made read-only writes out what it buffered.
fn remount(fs: &Fs, mountpoint: &Path, options: &str) -> Result<(), String> {
    let o = crate::mount::MountOpts::parse(options)?;
    crate::mount::remount_kernel(mountpoint, &o).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "{}: only root can remount (the mount was made by fusermount3)",
            mountpoint.display()
        ),
        Some(libc::EBUSY) if o.read_only => format!(
            "{}: a file is open for writing; the kernel keeps the mount writable",
            mountpoint.display()
        ),
        _ => format!("{}: remount: {e}", mountpoint.display()),
    })?;
    fs.set_atime(o.atime, o.read_only);
    if o.read_only {
        fs.flush_all().map_err(|e| e.to_string())?;
        fs.store().sync().map_err(|e| e.to_string())?;
    }
    tracing::info!(options, "remounted");
    Ok(())
}

/// Buffered writes flushed, logged, and shipped by the mount's replication thread: wait until
/// every replica acknowledged them (or `timeout`). One line per replica.
fn replica_sync(fs: &Fs, timeout: Duration) -> Result<String, replica::ReplicaError> {
    fs.flush_all()
        .map_err(|e| crate::kv::KvError::Other(e.to_string()))?;
    replica::log::round(fs.store())?;
    let target = replica::log::head(fs.store())?.seq;
    let until = std::time::Instant::now() + timeout;
    while !replica::ship::all_acked(fs.store(), target)? && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    // Satellites pull when they can: `replica sync` waits for replicas only.
    for (name, r) in replica::replicas(fs.store())? {
        if r.is_satellite() {
            continue;
        }
        let state = if r.base.is_some() && r.acked >= target {
            "in sync".to_string()
        } else {
            match &r.error {
                Some((_, e)) => format!("behind ({e})"),
                None => "behind (timed out)".to_string(),
            }
        };
        out.push_str(&format!(
            "{name}\t{state}\tacked {}\tlog {target}\n",
            r.acked
        ));
    }
    Ok(out)
}

/// Ask the mount serving `store_dir` to run a request; its reply, without the status line.
pub fn request(store_dir: &Path, request: &str) -> Result<String, ControlError> {
    let sock = store::control_socket(store_dir);
    let mut conn = UnixStream::connect(&sock).map_err(|source| ControlError::NoAnswer {
        store: store_dir.to_path_buf(),
        socket: sock.clone(),
        source,
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(600)))?;
    conn.write_all(format!("{request}\n").as_bytes())?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply)?;
    match reply.split_once('\n') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        _ => Err(ControlError::Refused(
            reply.trim().trim_start_matches("error: ").to_string(),
        )),
    }
}
