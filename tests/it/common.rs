//! Test harness: format a store in a temp dir and mount it with the real `kvfs` binary, then
//! drive it with ordinary syscalls. Tests needing /dev/fuse fail when CI=true and it is
//! missing; elsewhere they are skipped with a message.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KVFS: &str = env!("CARGO_BIN_EXE_kvfs");

/// Whether FUSE mounts can run here; panics in CI when they cannot.
pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("/dev/fuse is missing but CI=true: mount tests must run in CI");
        }
        eprintln!("skipping: /dev/fuse is missing");
    }
    ok
}

/// A temp dir for one test, under `KVFS_TEST_TMP` if set.
fn test_tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvfs-test")
        .tempdir_in(
            std::env::var_os("KVFS_TEST_TMP")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        )
        .unwrap()
}

pub struct Mounted {
    pub tmp: tempfile::TempDir,
    pub store: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
    pub opts: String,
    /// The test provokes errors the daemon must log (a replica killed under a read): its log
    /// is then not required to be free of them.
    pub errors_expected: bool,
}

/// Start a mount; `None` only when FUSE is unavailable outside CI.
pub fn mount() -> Option<Mounted> {
    mount_with("64K", "")
}

pub fn mount_with(block_size: &str, opts: &str) -> Option<Mounted> {
    mount_with_format(&["--block-size", block_size], opts)
}

/// Format with these `kvfs format` arguments, then mount with `-o opts`.
pub fn mount_with_format(format_args: &[&str], opts: &str) -> Option<Mounted> {
    mount_prepared(format_args, opts, |_| {})
}

/// As [`mount_with_format`], calling `prepare` with the temp dir before the store is made
/// (to put a small filesystem under `tmp/store`, say).
pub fn mount_prepared(
    format_args: &[&str],
    opts: &str,
    prepare: impl FnOnce(&Path),
) -> Option<Mounted> {
    if !fuse_available() {
        return None;
    }
    let tmp = test_tmp();
    // Other users (permission tests) must be able to reach the mount point.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    prepare(tmp.path());
    let out = Command::new(KVFS)
        .arg("format")
        .args(format_args)
        .arg(&store)
        .output()
        .unwrap();
    assert!(out.status.success(), "format failed: {:?}", out);
    let mut m = Mounted {
        tmp,
        store,
        mnt,
        child: None,
        opts: opts.to_string(),
        errors_expected: false,
    };
    m.start();
    Some(m)
}

pub fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_string_lossy().to_string();
    info.lines().any(|l| {
        let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
        l.split(' ').nth(4) == Some(want.as_str()) && fstype.is_some_and(|t| t.starts_with("fuse"))
    })
}

impl Mounted {
    /// Mount an existing store (a replica, say) on a fresh directory of a new temp dir.
    pub fn existing(store: &Path, opts: &str) -> Option<Mounted> {
        if !fuse_available() {
            return None;
        }
        let tmp = test_tmp();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mounted {
            tmp,
            store: store.to_path_buf(),
            mnt,
            child: None,
            opts: opts.to_string(),
            errors_expected: false,
        };
        m.start();
        Some(m)
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(KVFS);
        cmd.arg("mount")
            .arg(&self.store)
            .arg(&self.mnt)
            .arg("--foreground")
            .arg("--log")
            .arg(self.log_path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !self.opts.is_empty() {
            cmd.arg("-o").arg(&self.opts);
        }
        let mut child = cmd.spawn().unwrap();
        let t0 = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("kvfs mount exited early ({st}): {err}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "mount not ready in 30s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Where the mount daemon logs (appended to across remounts).
    pub fn log_path(&self) -> PathBuf {
        self.tmp.path().join("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Unmount and wait for the daemon; asserts it ended cleanly.
    pub fn unmount(&mut self) {
        if self.child.is_none() {
            return;
        }
        // Another test forking a child at this moment lends it copies of our descriptors until
        // it execs (the fork-exec window): the mount is briefly busy then. Retry on EBUSY only.
        let t0 = Instant::now();
        loop {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("busy") && t0.elapsed() < Duration::from_secs(10),
                "fusermount3 -u failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_exit();
    }

    /// Wait for the daemon to end; asserts it ended cleanly.
    fn wait_exit(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                let log = self.log();
                assert!(st.success(), "kvfs exited with {st}: {err}\n{log}");
                assert!(
                    self.errors_expected || !log.contains("ERROR"),
                    "errors logged: {log}"
                );
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "kvfs did not exit after unmount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmount while `held` is still open (lazy detach, as `umount -l`), then close it: the
    /// daemon exits once the kernel lets go.
    pub fn unmount_lazily_then_close(&mut self, held: std::fs::File) {
        let st = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "umount -l failed");
        drop(held);
        self.wait_exit();
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.start();
    }

    /// Kill the daemon with SIGKILL (a crash) and clear the dead mount.
    pub fn crash(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }

    /// Size in bytes of everything under the store directory.
    pub fn store_bytes(&self) -> u64 {
        du(&self.store)
    }
}

pub fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                total += du(&e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Errno of an io::Error (0 for success).
pub fn errno<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

pub fn cstr(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Run a libc call returning -1 on error; gives errno or 0.
pub fn sys(r: libc::c_int) -> i32 {
    if r == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    } else {
        0
    }
}

/// Deterministic pseudo-random bytes (not compressible).
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A plain directory on the same disk as the mount's store, for differential tests.
pub fn plain_dir(m: &Mounted) -> PathBuf {
    let p = m.tmp.path().join(format!(
        "plain{}",
        std::process::id() as u64 ^ rand_suffix()
    ));
    std::fs::create_dir(&p).unwrap();
    p
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

/// xorshift64: deterministic choices for randomized tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Whether the test runs as root, as it must to `what`; otherwise it says it skips, and fails
/// under CI, where the tests run as root.
pub fn root_for(what: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs root under CI to {what}"
    );
    eprintln!("skipped: needs root to {what}");
    false
}

/// Mount a tmpfs of `size` (such as "16m") on `dir`.
pub fn mount_tmpfs(dir: &Path, size: &str) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount a tmpfs on {}", dir.display());
}

/// What a differential scenario observes, in order.
pub type Log = Vec<String>;

/// A file's type and mode, link count, size and owner (or the errno of lstat).
pub fn st(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) => format!(
            "mode={:o} nlink={} size={} uid={} gid={}",
            m.mode(),
            m.nlink(),
            if m.is_dir() { 0 } else { m.size() },
            m.uid(),
            m.gid()
        ),
        Err(e) => format!("err={}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// Run `f` on a fresh plain directory and on a fresh directory inside mount `m`: the two
/// transcripts, plain first.
pub fn transcripts(m: &Mounted, f: impl Fn(&Path, &mut Log)) -> (Log, Log) {
    let plain = plain_dir(m);
    let kv = m.path("t");
    std::fs::create_dir(&kv).unwrap();
    let (mut a, mut b) = (Log::new(), Log::new());
    f(&plain, &mut a);
    f(&kv, &mut b);
    (a, b)
}

/// [`transcripts`] on a fresh mount; they must match line for line.
pub fn differential(name: &str, f: impl Fn(&Path, &mut Log)) {
    let Some(m) = mount() else { return };
    let (a, b) = transcripts(&m, f);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x, y,
            "{name}: step {i} differs (plain vs kvfs)\nplain: {a:#?}\nkvfs: {b:#?}"
        );
    }
    assert_eq!(a.len(), b.len(), "{name}: transcript lengths differ");
}
