//! The `kvfs` command: format, mount, and the operator's tools (gc, audit, dump, status).
//! Errors end here as one line and an exit code. Run as `mount.kvfs` (a link to this binary),
//! it speaks mount(8)'s helper protocol so `mount -t kvfs` and /etc/fstab work.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::{Parser, Subcommand};

use kvfs::control::{self, ControlError};
use kvfs::mount::{self, MountOpts};
use kvfs::store::{self, FormatOptions};
use kvfs::{audit, dump, gc, status};

mod history_cmd;
mod replica_cmd;
mod tier_cmd;

#[derive(Parser)]
#[command(
    name = "kvfs",
    version,
    about = "A filesystem whose whole state lives in one transactional key-value store"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new store in STORE (a new or empty directory).
    Format {
        store: PathBuf,
        /// Block size in bytes (power of two, 4K..4M; suffixes K and M accepted).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u32,
        /// Compression tried on each new block, kept only when it saves space: none, lz4,
        /// zstd or zstd:LEVEL (1..19).
        #[arg(long, default_value = "lz4")]
        compression: String,
        /// Store 512 bytes of parity and per-sector checksums with each block, so one damaged
        /// 512-byte sector per block is rebuilt on read and by `audit --repair`.
        #[arg(long)]
        parity: bool,
        /// Keep every state of the filesystem for this long (7d, 12h; default 0: off), so
        /// that `kvfs mount --at` can show any moment of it. `kvfs config` changes it later.
        #[arg(long, value_name = "SPAN")]
        history: Option<String>,
    },
    /// When PATH (inside the filesystem: /dir/file) changed within the history window:
    /// moment, what happened, size and a content id (equal ids, equal content).
    Log(history_cmd::LogArgs),
    /// Name the current moment (kept until removed, even past the history window); --list,
    /// --remove NAME. `kvfs mount STORE DIR --at NAME` mounts it.
    Snapshot(history_cmd::SnapshotArgs),
    /// Sweep: reap dead mounts (process entry, open counts, locks), free unlinked inodes no
    /// one has open and unreferenced blocks. On a mounted store, the mount does it.
    Gc {
        store: PathBuf,
        /// Report what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds without a heartbeat after which a mount counts as dead.
        #[arg(long, default_value_t = gc::DEFAULT_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Check every invariant of the keyspace and every block's hash (fsck). Exit 0: clean;
    /// 1: problems found; 2: could not run.
    Audit {
        store: PathBuf,
        /// Fix what is safe to fix (refcounts, link counts, orphans to /lost+found, blocks
        /// from parity, stale keys); the store must not be mounted.
        #[arg(long)]
        repair: bool,
        /// Also fetch every evicted block from the replicas and check it by hash (slow: it
        /// reads what the replicas hold for this store).
        #[arg(long)]
        fetch: bool,
    },
    /// Print every key with its decoded value (works on a mounted store).
    Dump {
        store: PathBuf,
        /// Only this prefix: a letter (i, d, f, B, ...) or a name (inode, dirent, block-map...).
        #[arg(long)]
        prefix: Option<String>,
        /// Only keys of this inode (its record, sub-keys, entries if a directory, block map).
        #[arg(long)]
        inode: Option<u64>,
    },
    /// Mounted or not, live mounts and heartbeats, logical vs stored bytes, ratios, the
    /// store's size on disk, and replication: each replica's state and lag.
    Status {
        store: PathBuf,
        /// The same facts as JSON (field names in README).
        #[arg(long)]
        json: bool,
    },
    /// Serve a replica store to its primary: over stdio (for ssh:// and exec:) or TCP with
    /// mutual TLS. Prints this store's certificate fingerprint with --listen.
    Serve(replica_cmd::ServeArgs),
    /// Manage the replicas a primary ships to.
    #[command(subcommand)]
    Replica(replica_cmd::ReplicaCmd),
    /// Show or change the settings kept in the store (tiering: cache_size, min_copies,
    /// fetch_timeout); a mount's -o of the same name overrides them.
    Config(tier_cmd::ConfigArgs),
    /// Keep the content of the files under PATH resident (fetching what was evicted).
    Pin(tier_cmd::PinArgs),
    /// Undo `kvfs pin` of PATH: its blocks may be evicted again.
    Unpin(tier_cmd::PinArgs),
    /// Make STORE a satellite of the primary at URL (mounted there with -o listen=ADDR): a
    /// read-only follower that pulls its metadata and fetches blocks when they are read.
    Clone(replica_cmd::CloneArgs),
    /// Catch an unmounted satellite up with its upstream (a mounted one pulls by itself).
    Pull { store: PathBuf },
    /// Turn a replica into the primary of its filesystem (when the old primary is lost).
    Promote { store: PathBuf },
    /// Print STORE's certificate fingerprint (what `kvfs serve --allow` takes), creating its
    /// key pair at first use.
    Fingerprint { store: PathBuf },
    /// The metadata phases of tools/bench in DIR: create, stat (cold), unlink FILES empty
    /// files in one directory, mkdir and rmdir DIRS directories; prints the rates per second.
    BenchMeta {
        dir: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[arg(long, default_value_t = 2_000)]
        dirs: usize,
    },
    /// Measure each block encoding (speed, space) on the files under PATHS.
    BenchEncodings {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Block size to cut the sample into.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u32,
        /// Bytes of sample to read at most.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        limit: u32,
    },
    /// Mount STORE on MOUNTPOINT. Returns once the mount is ready and keeps serving in the
    /// background; end it with `kvfs unmount MOUNTPOINT`, `umount MOUNTPOINT` (or `fusermount3
    /// -u`), SIGTERM or SIGINT.
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Comma-separated options: ro, noatime, strictatime, nodiratime, noexec, dev, suid,
        /// allow_other, allow_root, threads=N, max_dirty=SIZE, cache_size=SIZE, min_copies=N,
        /// fetch_timeout=SECS, listen=ADDR (serve satellites).
        #[arg(short = 'o', default_value = "")]
        options: String,
        /// Stay attached to the terminal and log to stderr.
        #[arg(short, long)]
        foreground: bool,
        /// Where the background mount logs (default: STORE/kvfs.log).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Mount the filesystem as it was at this moment, read-only: '2026-11-28 14:00'
        /// (local time), RFC 3339, '@UNIX_SECONDS', '-2h', or a snapshot's name.
        #[arg(long, value_name = "MOMENT", allow_hyphen_values = true)]
        at: Option<String>,
        /// Internal: run as the background child of `kvfs mount`.
        #[arg(long, hide = true)]
        daemon_child: bool,
    },
    /// Unmount MOUNTPOINT and return once the mount's process has synced the store and let go
    /// of it (umount returns before that; a power cut or a copy of the store right after it
    /// could find the last commits unsynced).
    Unmount {
        mountpoint: PathBuf,
        /// Detach now, as `umount -l`, without waiting (the mount ends with its last user).
        #[arg(short, long)]
        lazy: bool,
    },
}

fn parse_size(s: &str) -> Result<u32, String> {
    let n = kvfs::util::parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("too large: {s:?}"))
}

fn init_logging(to: Option<&Path>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match to.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    }) {
        Some(f) => b
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        None => b.with_writer(std::io::stderr).init(),
    }
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = Path::new(&argv0).file_name();
    if name == Some("mount.kvfs".as_ref()) || name == Some("mount.fuse.kvfs".as_ref()) {
        return finish(mount_helper());
    }
    // mount(8) without /sbin/mount.fuse.kvfs runs mount.fuse, which runs `kvfs STORE DIR -o
    // OPTIONS` for type fuse.kvfs (a remount among them): a directory where a command goes.
    if let Some(first) = std::env::args_os().nth(1) {
        let cmds = <Cli as clap::CommandFactory>::command();
        let known = cmds.get_subcommands().any(|c| c.get_name() == first);
        if !known && Path::new(&first).is_dir() {
            return finish(mount_helper());
        }
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Format {
            store,
            block_size,
            compression,
            parity,
            history,
        } => format_cmd(&store, block_size, &compression, parity, history.as_deref()),
        Cmd::Log(a) => history_cmd::log_cmd(a),
        Cmd::Snapshot(a) => history_cmd::snapshot_cmd(a),
        Cmd::Gc {
            store,
            dry_run,
            timeout,
        } => gc_cmd(&store, dry_run, timeout),
        Cmd::Audit {
            store,
            repair,
            fetch,
        } => return audit_cmd(&store, repair, fetch),
        Cmd::Dump {
            store,
            prefix,
            inode,
        } => dump_cmd(&store, prefix.as_deref(), inode),
        Cmd::Status { store, json } => status_cmd(&store, json),
        Cmd::Serve(a) => replica_cmd::serve(a),
        Cmd::Replica(c) => replica_cmd::replica(c),
        Cmd::Config(a) => tier_cmd::config_cmd(a),
        Cmd::Pin(a) => tier_cmd::pin_cmd(a, true),
        Cmd::Unpin(a) => tier_cmd::pin_cmd(a, false),
        Cmd::Clone(a) => replica_cmd::clone(a),
        Cmd::Pull { store } => replica_cmd::pull(&store),
        Cmd::Promote { store } => replica_cmd::promote(&store),
        Cmd::Fingerprint { store } => replica_cmd::fingerprint(&store),
        Cmd::BenchMeta { dir, files, dirs } => kvfs::bench::meta(&dir, files, dirs)
            .map(|r| {
                println!(
                    "create {:.0} stat {:.0} unlink {:.0} mkdir {:.0} rmdir {:.0}",
                    r.create, r.stat, r.unlink, r.mkdir, r.rmdir
                )
            })
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display())),
        Cmd::BenchEncodings {
            paths,
            block_size,
            limit,
        } => {
            let p: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
            let data = kvfs::bench::sample(&p, limit as usize);
            println!("sample: {} bytes, block size {block_size}", data.len());
            print!(
                "{}",
                kvfs::bench::table(&kvfs::bench::run(&data, block_size as usize))
            );
            Ok(())
        }
        Cmd::Unmount { mountpoint, lazy } => {
            kvfs::mountinfo::unmount_and_wait(&mountpoint, lazy).map_err(anyhow::Error::msg)
        }
        Cmd::Mount {
            store,
            mountpoint,
            options,
            foreground,
            log,
            at,
            daemon_child,
        } => {
            // `--at` rides in the options, so the background child and fstab see one form.
            let options = match at {
                Some(at) if options.is_empty() => format!("at={at}"),
                Some(at) => format!("{options},at={at}"),
                None => options,
            };
            mount_cmd(&store, &mountpoint, &options, foreground, log, daemon_child)
        }
    };
    finish(r)
}

fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn format_cmd(
    dir: &Path,
    block_size: u32,
    compression: &str,
    parity: bool,
    history: Option<&str>,
) -> anyhow::Result<()> {
    let (compression, level) =
        FormatOptions::parse_compression(compression).map_err(anyhow::Error::msg)?;
    if let Some(h) = history {
        kvfs::history::when::parse_span(h).map_err(|e| anyhow::anyhow!("--history {e}"))?;
    }
    let o = FormatOptions {
        block_size,
        compression,
        level,
        parity,
        fs_id: None,
    };
    let rec = store::format_with(dir, &o)?;
    if let Some(h) = history {
        let (kv, _) = store::open(dir)?;
        kvfs::tier::config::write(&kv, &[("history".to_string(), h.to_string())])?;
        kvfs::history::install(&kv)?;
        kv.sync()?;
    }
    println!(
        "formatted {} (format {}, block size {}, encoding {})",
        dir.display(),
        rec.version(),
        rec.block_size,
        rec.encoding_name()
    );
    Ok(())
}

/// Log to stderr for the tools (warnings and up unless KVFS_LOG says otherwise).
fn tool_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn gc_cmd(dir: &Path, dry_run: bool, timeout: u64) -> anyhow::Result<()> {
    tool_logging();
    match store::open(dir) {
        Ok((kv, _)) if kvfs::replica::apply::is_follower_store(&kv)? => {
            anyhow::bail!(
                "{}: a replica; `kvfs serve` frees what its primary deletes (its garbage inodes are the primary's open files)",
                dir.display()
            )
        }
        Ok((kv, _)) => {
            // What the sweep deletes (inodes unlinked while open) is the replicas' to know,
            // and history's to keep (their blocks are what past states read).
            kvfs::replica::track_if_replicated(&kv)?;
            kvfs::history::install(&kv)?;
            let o = gc::SweepOptions {
                dry_run,
                timeout: Duration::from_secs(timeout),
                own: None,
                recover: true,
            };
            if !dry_run {
                // The past that left the history window goes first: the sweep frees its blocks.
                kvfs::history::index(&kv)?;
                kvfs::history::trim(&kv)?;
            }
            let r = gc::collect(&kv, &o)?;
            if !dry_run {
                kv.sync()?;
            }
            println!("{r}");
            Ok(())
        }
        Err(store::StoreError::InUse(_)) => {
            let mut req = format!("gc timeout={timeout}");
            if dry_run {
                req.push_str(" dry-run");
            }
            let reply = kvfs::control::request(dir, &req)?;
            println!(
                "(swept by the mount serving this store)\n{}",
                reply.trim_end()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn audit_cmd(dir: &Path, repair: bool, fetch: bool) -> ExitCode {
    tool_logging();
    let opened = if repair {
        store::open(dir).map_err(|e| match e {
            store::StoreError::InUse(p) => anyhow::anyhow!(
                "{}: the store is mounted; unmount it before `audit --repair` (a plain `audit` works while mounted)",
                p.display()
            ),
            e => e.into(),
        })
    } else {
        store::open_read_only(dir).map_err(anyhow::Error::from)
    };
    let (kv, format) = match opened {
        Ok(x) => x,
        Err(e) => {
            eprintln!("kvfs: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Repairs change names and inodes: replicas must receive them like any change, and
    // history keeps what they replaced.
    if repair {
        if let Err(e) =
            kvfs::replica::track_if_replicated(&kv).and_then(|_| kvfs::history::install(&kv))
        {
            eprintln!("kvfs: {e}");
            return ExitCode::from(2);
        }
    }
    let kv = std::sync::Arc::new(kv);
    let fetcher: Option<std::sync::Arc<dyn kvfs::blocks::reader::Tiering>> = if fetch {
        Some(std::sync::Arc::new(kvfs::tier::fetch::Fetcher::checking(
            kv.clone(),
            &format,
            dir.to_path_buf(),
            Duration::from_secs(60),
        )))
    } else {
        None
    };
    let o = audit::AuditOptions {
        repair,
        progress: std::io::stderr().is_terminal(),
        timeout: None,
        fetch: fetcher.map(audit::Fetch),
    };
    match audit::audit(&kv, &o) {
        Ok(mut r) => {
            // Beside the keyspace: what fsyncs left in the fsync log (after a crash).
            match kvfs::fs::fsync_log_records(dir) {
                Ok(0) => {}
                Ok(n) => r.notes.push(format!(
                    "{n} record(s) in the fsync log: bytes an fsync made durable; the next mount \
                     applies those their blocks do not hold yet"
                )),
                Err(e) => r.problems.push(audit::Problem {
                    key: "fsync log".into(),
                    what: e.to_string(),
                    repaired: None,
                }),
            }
            println!("{r}");
            if r.unrepaired() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("kvfs: audit could not run: {e}");
            ExitCode::from(2)
        }
    }
}

fn dump_cmd(dir: &Path, prefix: Option<&str>, inode: Option<u64>) -> anyhow::Result<()> {
    tool_logging();
    let prefix = match prefix {
        None => None,
        Some(p) => Some(dump::parse_prefix(p).ok_or_else(|| {
            anyhow::anyhow!("unknown prefix {p:?} (see the registry in keyspace.md)")
        })?),
    };
    let (kv, _) = store::open_read_only(dir)?;
    let f = dump::DumpFilter { prefix, inode };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (_, bad) = dump::dump(&kv, &f, &mut out)?;
    let _ = out.flush();
    if bad > 0 {
        anyhow::bail!("{bad} value(s) do not decode (marked !! above)");
    }
    Ok(())
}

fn status_cmd(dir: &Path, json: bool) -> anyhow::Result<()> {
    tool_logging();
    let mounted = store::in_use(dir);
    let (kv, rec) = store::open_read_only(dir)?;
    let s = status::status(dir, &kv, &rec, mounted, gc::DEFAULT_TIMEOUT)?;
    let r = kvfs::replica::status::replication(&kv)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status::json(&s, &r))?);
    } else {
        println!("{s}");
        print!("{r}");
    }
    Ok(())
}

/// `mount.kvfs STORE DIR [-sfnv] [-o OPTIONS]`, as mount(8) calls a helper. Options mount(8)
/// adds (`rw`, `defaults`, `noauto`...) are accepted by the option parser.
fn mount_helper() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut pos = Vec::new();
    let mut opts = String::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-o" => opts = args.next().unwrap_or_default(),
            "-s" | "-f" | "-n" | "-v" => {}
            "-t" | "-N" => {
                args.next();
            }
            _ if a.starts_with("-o") => opts = a[2..].to_string(),
            _ => pos.push(a),
        }
    }
    let [store_dir, mountpoint] = pos.as_slice() else {
        anyhow::bail!("usage: mount.kvfs STORE MOUNTPOINT [-o OPTIONS]");
    };
    if MountOpts::parse(&opts).map_err(anyhow::Error::msg)?.remount {
        return remount_cmd(Path::new(store_dir), Path::new(mountpoint), &opts);
    }
    mount_cmd(
        Path::new(store_dir),
        Path::new(mountpoint),
        &opts,
        false,
        None,
        false,
    )
}

/// `mount -o remount,OPTIONS MOUNTPOINT`: the mount's process changes the kernel's flags and
/// its own. A read-only mount has no control socket: it can only stay read-only.
fn remount_cmd(store_dir: &Path, mountpoint: &Path, options: &str) -> anyhow::Result<()> {
    let request = format!("remount {options} {}", mountpoint.display());
    match control::request(store_dir, &request) {
        // No writable mount of the store answers, or it is mounted writable elsewhere: this
        // mount is a read-only one, whose process has no socket and opened the store
        // read-only.
        Err(ControlError::NoAnswer { .. }) => remount_read_only(mountpoint, options),
        Err(ControlError::Refused(e)) if e == control::NOT_THIS_MOUNT => {
            remount_read_only(mountpoint, options)
        }
        r => Ok(r.map(drop)?),
    }
}

/// A remount of a read-only mount: it can change its flags but not become writable.
fn remount_read_only(mountpoint: &Path, options: &str) -> anyhow::Result<()> {
    let o = MountOpts::parse(options).map_err(anyhow::Error::msg)?;
    if !o.read_only {
        anyhow::bail!(
            "{}: mounted read-only (its process opened the store read-only): unmount it and mount it read-write",
            mountpoint.display()
        );
    }
    mount::remount_kernel(mountpoint, &o)
        .map_err(|e| anyhow::anyhow!("{}: remount: {e}", mountpoint.display()))
}

fn mount_cmd(
    store_dir: &Path,
    mountpoint: &Path,
    options: &str,
    foreground: bool,
    log: Option<PathBuf>,
    daemon_child: bool,
) -> anyhow::Result<()> {
    let opts = MountOpts::parse(options).map_err(anyhow::Error::msg)?;
    mount::tune_allocator();
    if foreground && !daemon_child {
        mount::block_signals();
        init_logging(log.as_deref());
        return Ok(mount::run(store_dir, mountpoint, &opts, || {})?);
    }
    if daemon_child {
        mount::block_signals();
        // Log into the store only once we know it is one: a refused mount touches nothing.
        let is_store = store::db_path(store_dir).join("CURRENT").exists();
        let log = log.or_else(|| is_store.then(|| store_dir.join("kvfs.log")));
        init_logging(log.as_deref());
        let mut out = std::io::stdout();
        let r = mount::run(store_dir, mountpoint, &opts, || {
            let _ = writeln!(out, "ready");
            let _ = out.flush();
            detach_stdio();
        });
        if let Err(e) = &r {
            tracing::error!("{e:#}");
            // Before readiness the parent is still listening on our stdout.
            let _ = writeln!(std::io::stdout(), "{e:#}");
        }
        return Ok(r?);
    }
    // The parent: start the background child and wait until it reports the mount ready.
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(store_dir)
        .arg(mountpoint)
        .arg("-o")
        .arg(options)
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(l) = &log {
        cmd.arg("--log").arg(l);
    }
    // SAFETY: setsid is async-signal-safe; the child leaves our session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no pipe to the mount process"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let status = child.wait()?;
    if line.trim().is_empty() {
        anyhow::bail!("mount process exited ({status}) before the mount was ready");
    }
    anyhow::bail!("{}", line.trim())
}

/// Point stdin/stdout/stderr at /dev/null once the parent has gone.
fn detach_stdio() {
    // SAFETY: open/dup2 on valid descriptors.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            for t in 0..3 {
                libc::dup2(fd, t);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}
