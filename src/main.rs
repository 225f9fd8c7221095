//! The `kvfs` command: format a store, mount it. Errors end here as one line and an exit code.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::{Parser, Subcommand};

use kvfs::mount::{self, MountOpts};
use kvfs::store;

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
    },
    /// Mount STORE on MOUNTPOINT. Returns once the mount is ready and keeps serving in the
    /// background; end it with `umount MOUNTPOINT` (or `fusermount3 -u`), SIGTERM or SIGINT.
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Comma-separated options: ro, noatime, allow_other, allow_root, threads=N.
        #[arg(short = 'o', default_value = "")]
        options: String,
        /// Stay attached to the terminal and log to stderr.
        #[arg(short, long)]
        foreground: bool,
        /// Where the background mount logs (default: STORE/kvfs.log).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Internal: run as the background child of `kvfs mount`.
        #[arg(long, hide = true)]
        daemon_child: bool,
    },
}

fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    u32::try_from(n * mul).map_err(|_| format!("too large: {s:?}"))
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
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Format { store, block_size } => store::format(&store, block_size)
            .map(|rec| {
                println!(
                    "formatted {} (format {}, block size {})",
                    store.display(),
                    rec.version(),
                    rec.block_size
                );
            })
            .map_err(anyhow::Error::from),
        Cmd::Mount {
            store,
            mountpoint,
            options,
            foreground,
            log,
            daemon_child,
        } => mount_cmd(&store, &mountpoint, &options, foreground, log, daemon_child),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfs: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    if foreground && !daemon_child {
        mount::block_signals();
        init_logging(log.as_deref());
        return mount::run(store_dir, mountpoint, &opts, || {});
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
        return r;
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
