//! The replication commands of the `kvfs` binary: `serve`, `replica add|list|remove|sync`,
//! `promote`, `fingerprint`. A command on a mounted store goes through the mount's control
//! socket, so the store keeps one writer.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Subcommand;

use kvfs::replica::{self, serve::Server, tls};
use kvfs::store::{self, FormatOptions};

#[derive(Subcommand)]
pub enum ReplicaCmd {
    /// Register a replica: URL is tcp://HOST:PORT (with --fingerprint), ssh://[USER@]HOST[:PORT]/PATH
    /// or exec:COMMAND ARGS... Its first shipment is the whole filesystem.
    Add {
        store: PathBuf,
        name: String,
        url: String,
        /// The replica's certificate fingerprint (`SHA256:...`, printed by `kvfs serve`).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// The replicas of STORE and what each acknowledged.
    List { store: PathBuf },
    /// Forget a replica (its store is left as it is).
    Remove { store: PathBuf, name: String },
    /// Ship everything written so far to every replica and wait until each acknowledged it.
    Sync {
        store: PathBuf,
        /// Give up waiting after this many seconds (mounted store).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// TCP connections a server handles at once (a primary has one or two; each satellite one
/// pulling and a few fetching).
const MAX_CONNECTIONS: usize = 32;

/// `kvfs serve` options.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The replica store (created at the first primary's contact); a satellite store is not
    /// served but kept following its upstream until stopped.
    pub store: PathBuf,
    /// Speak the protocol on stdin/stdout (what ssh:// and exec: run).
    #[arg(long, conflicts_with = "listen")]
    pub stdio: bool,
    /// Accept primaries over TCP with mutual TLS on ADDR (e.g. 0.0.0.0:7420), and the
    /// satellites registered on this replica (`kvfs replica add STORE NAME satellite: ...`).
    #[arg(long)]
    pub listen: Option<String>,
    /// A primary's certificate fingerprint to accept (`kvfs fingerprint PRIMARY-STORE`); repeat
    /// for several.
    #[arg(long)]
    pub allow: Vec<String>,
    /// Accept the first primary that connects and remember it (in STORE/tls/allowed).
    #[arg(long)]
    pub allow_first: bool,
    /// Compression of the blocks stored here, when the store is created: none, lz4, zstd or
    /// zstd:LEVEL.
    #[arg(long, default_value = "lz4")]
    pub compression: String,
    /// Store parity with each block here (when the store is created).
    #[arg(long)]
    pub parity: bool,
    /// Keep every state this replica applies for SPAN (90d, 12h; 0: off), for `kvfs mount
    /// --at` on it: its own window, independent of the primary's. Kept in the store.
    #[arg(long, value_name = "SPAN")]
    pub history: Option<String>,
}

fn tool_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    tool_logging("info");

    let (compression, level) =
        FormatOptions::parse_compression(&a.compression).map_err(anyhow::Error::msg)?;
    let create = FormatOptions {
        compression,
        level,
        parity: a.parity,
        ..Default::default()
    };
    std::fs::create_dir_all(&a.store)?;
    let satellite = store::db_path(&a.store).join("CURRENT").exists() && {
        let (peek, _) = store::open_read_only(&a.store)?;
        replica::is_satellite(&peek)?
    };
    if satellite {
        // A satellite is not served: `kvfs serve` keeps it following its upstream, as its
        // mount would, until stopped.
        let (kv, format) = store::open(&a.store)?;
        tracing::info!(store = %a.store.display(), "a satellite: pulling from its upstream until stopped");
        let never = std::sync::atomic::AtomicBool::new(false);
        replica::satellite::run(Arc::new(kv), &format, &a.store, &never);
        return Ok(());
    }
    if let Some(h) = &a.history {
        kvfs::history::when::parse_span(h).map_err(|e| anyhow::anyhow!("--history {e}"))?;
    }
    let server = Arc::new(Server::new(&a.store, create).keeping_history(a.history.clone()));
    if a.stdio {
        // Errors opening the store go to the primary too, as the session's refusal.
        // The raw descriptors: the protocol is binary, and nothing else writes to stdout
        // (logs go to stderr).
        use std::os::fd::FromRawFd;
        // SAFETY: dup(2) of our own stdin and stdout.
        let (fd0, fd1) = unsafe { (libc::dup(0), libc::dup(1)) };
        if fd0 < 0 || fd1 < 0 {
            anyhow::bail!(
                "cannot use stdin/stdout: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fresh descriptors from dup(2), owned by nothing else.
        let (inp, out) = unsafe {
            (
                std::fs::File::from_raw_fd(fd0),
                std::fs::File::from_raw_fd(fd1),
            )
        };
        let mut io = replica::transport::Pipes {
            out: std::io::BufReader::with_capacity(256 << 10, inp),
            inp: std::io::BufWriter::with_capacity(256 << 10, out),
        };
        server.session(&mut io, "stdio")?;
        return Ok(());
    }
    let Some(addr) = a.listen else {
        anyhow::bail!("say --stdio or --listen ADDR");
    };
    // A store that exists must be a replica: say so now, not at the first connection.
    server.opened()?;
    if a.allow.is_empty() && !a.allow_first && !tls::tls_dir(&a.store).join("allowed").exists() {
        anyhow::bail!("no primary is allowed: give --allow SHA256:... (kvfs fingerprint PRIMARY-STORE) or --allow-first");
    }
    // Satellites registered on the replica are accepted too (the list is refreshed at each
    // connection), and its log for them is kept while it serves.
    let also = tls::PeerList::default();
    let cfg = tls::server_config(&a.store, &a.allow, a.allow_first, Some(also.clone()))?;
    {
        static NEVER_STOPS: AtomicBool = AtomicBool::new(false);
        let server = server.clone();
        std::thread::spawn(move || replica::relay::tend(&server, &NEVER_STOPS));
    }
    let listener = TcpListener::bind(&addr)?;
    let id = tls::identity(&a.store)?;
    println!("fingerprint {}", id.fingerprint());
    println!("listening on {}", listener.local_addr()?);
    let _ = std::io::stdout().flush();
    let active = Arc::new(AtomicUsize::new(0));
    for sock in listener.incoming() {
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        // Connections are handshaken on threads of their own; past a few at once the rest are
        // dropped before any work.
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(peer = ?sock.peer_addr().ok(), "too many connections; dropped");
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (server, cfg, active, also, allow) = (
            server.clone(),
            cfg.clone(),
            active.clone(),
            also.clone(),
            a.allow.clone(),
        );
        std::thread::spawn(move || {
            struct Leave(Arc<AtomicUsize>);
            impl Drop for Leave {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let _leave = Leave(active);
            let peer = sock
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            let _ = sock.set_nodelay(true);
            let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(300)));
            match replica::relay::connection(&server, cfg, (&allow, &also), sock, &peer) {
                Ok(()) | Err(replica::ReplicaError::Wire(replica::wire::WireError::Closed)) => {}
                Err(e) => tracing::warn!(peer, error = %e, "connection ended"),
            }
        });
    }
    Ok(())
}

pub fn replica(cmd: ReplicaCmd) -> anyhow::Result<()> {
    tool_logging("warn");
    match cmd {
        ReplicaCmd::Add {
            store: dir,
            name,
            url,
            fingerprint,
        } => {
            match store::open(&dir) {
                Ok((kv, _)) => replica::add(&kv, &name, &url, fingerprint)?,
                Err(store::StoreError::InUse(_)) => {
                    let fp = fingerprint.as_deref().unwrap_or("-");
                    kvfs::control::request(&dir, &format!("replica-add {name} {fp} {url}"))?;
                }
                Err(e) => return Err(e.into()),
            }
            println!("added replica {name} ({url}); its first shipment is the whole filesystem");
            Ok(())
        }
        ReplicaCmd::Remove { store: dir, name } => {
            match store::open(&dir) {
                Ok((kv, _)) => {
                    replica::remove(&kv, &name)?;
                    replica::log::trim(&kv)?;
                    kvfs::blocks::collect_all_garbage(&kv)?;
                }
                Err(store::StoreError::InUse(_)) => {
                    kvfs::control::request(&dir, &format!("replica-remove {name}"))?;
                }
                Err(e) => return Err(e.into()),
            }
            println!("removed replica {name}");
            Ok(())
        }
        ReplicaCmd::List { store: dir } => {
            let (kv, _) = store::open_read_only(&dir)?;
            let r = replica::status::replication(&kv)?;
            print!("{r}");
            Ok(())
        }
        ReplicaCmd::Sync {
            store: dir,
            timeout,
        } => match store::open(&dir) {
            Ok((kv, format)) => {
                let mut failed = 0;
                // Blocks evicted here that a replica lacks come from the other replicas.
                let kv = std::sync::Arc::new(kv);
                let settings = kvfs::tier::config::TierSettings::resolve(
                    &kvfs::tier::config::read(&kv)?,
                    &Default::default(),
                )
                .map_err(anyhow::Error::msg)?;
                let fetch = std::sync::Arc::new(kvfs::tier::fetch::Fetcher::checking(
                    kv.clone(),
                    &format,
                    dir.clone(),
                    settings.fetch_timeout,
                ));
                for (name, r) in replica::ship::sync(&kv, &format, &dir, Some(fetch.clone()))? {
                    match r {
                        Ok(s) => println!(
                            "{name}\tin sync\t{} groups, {} blocks ({} bytes, {} as deltas), {} bytes on the wire",
                            s.groups, s.blocks, s.block_bytes, s.deltas, s.wire_bytes
                        ),
                        Err(e) => {
                            failed += 1;
                            println!("{name}\tbehind ({e})");
                        }
                    }
                }
                kvfs::blocks::collect_all_garbage(&kv)?;
                kv.sync()?;
                if failed > 0 {
                    anyhow::bail!("{failed} replica(s) not in sync");
                }
                Ok(())
            }
            Err(store::StoreError::InUse(_)) => {
                syncfs_mounts(&dir);
                let reply = kvfs::control::request(&dir, &format!("replica-sync {timeout}"))?;
                print!("{reply}");
                if reply.lines().any(|l| !l.contains("\tin sync\t")) {
                    anyhow::bail!("not every replica is in sync");
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// syncfs(2) every mount of `store` this process can see: in writeback mode the kernel keeps
/// file times (and data) of its own until it writes the inodes back, and `replica sync`
/// promises what the user sees now.
fn syncfs_mounts(store: &Path) {
    let Ok(want) = std::fs::canonicalize(store) else {
        return;
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in table.lines() {
        let Some((head, tail)) = line.split_once(" - ") else {
            continue;
        };
        let mut t = tail.split(' ');
        let (Some(fstype), Some(source)) = (t.next(), t.next()) else {
            continue;
        };
        let Some(point) = head.split(' ').nth(4) else {
            continue;
        };
        if fstype.starts_with("fuse") && Path::new(&source.replace("\\040", " ")) == want {
            if let Ok(f) = std::fs::File::open(point.replace("\\040", " ")) {
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs on a descriptor we own.
                unsafe { libc::syncfs(f.as_raw_fd()) };
            }
        }
    }
}

pub fn promote(dir: &Path) -> anyhow::Result<()> {
    tool_logging("warn");
    let (kv, _) = store::open(dir).map_err(|e| match e {
        store::StoreError::InUse(p) => anyhow::anyhow!(
            "{}: in use (stop `kvfs serve` and unmount it first)",
            p.display()
        ),
        e => e.into(),
    })?;
    let st = replica::apply::promote(&kv)?;
    println!(
        "{} is now a primary (it had applied group {}); mount it read-write. The old primary is refused if it connects.",
        dir.display(),
        st.applied
    );
    Ok(())
}

pub fn fingerprint(dir: &Path) -> anyhow::Result<()> {
    // A directory that is to become a satellite (`kvfs clone`) gets its key pair first, so
    // that its upstream can register it before the clone.
    let fresh = match std::fs::read_dir(dir) {
        Ok(mut rd) => rd.all(|e| e.is_ok_and(|e| e.file_name() == "tls")),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    if !store::db_path(dir).join("CURRENT").exists() && !fresh {
        anyhow::bail!(
            "{}: not a kvfs store (nor an empty directory)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    println!("{}", tls::identity(dir)?.fingerprint());
    Ok(())
}

/// `kvfs clone` options.
#[derive(clap::Args)]
pub struct CloneArgs {
    /// The upstream: tcp://HOST:PORT of a primary mounted with -o listen=ADDR, or of a
    /// replica served with `kvfs serve --listen ADDR`.
    pub url: String,
    /// The satellite store to create.
    pub store: PathBuf,
    /// The upstream's certificate fingerprint (`SHA256:...`, in its mount's log and from
    /// `kvfs fingerprint UPSTREAM-STORE`).
    #[arg(long)]
    pub fingerprint: String,
    /// Resident block bytes this satellite keeps (kept in the store as cache_size).
    #[arg(long)]
    pub cache_size: Option<String>,
    /// Compression of the blocks fetched into it: none, lz4, zstd or zstd:LEVEL. Fetched
    /// blocks keep the upstream's encoding; this is for what the store writes itself.
    #[arg(long, default_value = "lz4")]
    pub compression: String,
}

pub fn clone(a: CloneArgs) -> anyhow::Result<()> {
    tool_logging("warn");
    if let Some(v) = &a.cache_size {
        kvfs::tier::config::check("cache_size", v).map_err(anyhow::Error::msg)?;
    }
    let (compression, level) =
        FormatOptions::parse_compression(&a.compression).map_err(anyhow::Error::msg)?;
    let create = FormatOptions {
        compression,
        level,
        ..Default::default()
    };
    std::fs::create_dir_all(&a.store)?;
    let me = tls::identity(&a.store)?.fingerprint();
    match replica::satellite::clone(&a.url, Some(a.fingerprint.clone()), &a.store, create) {
        Ok(()) => {}
        // The upstream answered with its reason: that is the whole story.
        Err(e @ replica::ReplicaError::Wire(replica::wire::WireError::Refused(_))) => {
            anyhow::bail!("{e}")
        }
        Err(e) => anyhow::bail!(
            "{e}\n(this satellite's certificate is {me}; the upstream accepts it once told: \
             kvfs replica add UPSTREAM-STORE NAME satellite: --fingerprint {me})"
        ),
    }
    let (kv, _) = store::open(&a.store)?;
    if let Some(v) = a.cache_size {
        kvfs::tier::config::write(&kv, &[("cache_size".into(), v)])?;
    }
    let st = replica::apply::state(&kv)?.map_or(0, |s| s.applied);
    println!(
        "cloned {} into {} (group {st}); `kvfs mount {}` it to follow (read-only, blocks fetched when read)",
        a.url,
        a.store.display(),
        a.store.display()
    );
    Ok(())
}

/// `kvfs pull STORE`: catch an unmounted satellite up with its upstream once.
pub fn pull(dir: &Path) -> anyhow::Result<()> {
    tool_logging("warn");
    let (kv, format) = store::open(dir).map_err(|e| match e {
        store::StoreError::InUse(p) => {
            anyhow::anyhow!("{}: mounted (its mount pulls continuously)", p.display())
        }
        e => e.into(),
    })?;
    let kv = Arc::new(kv);
    replica::satellite::pull_once(kv.clone(), format, dir)?;
    let st = replica::apply::state(&kv)?.map_or(0, |s| s.applied);
    println!("{} is at its upstream's group {st}", dir.display());
    Ok(())
}
