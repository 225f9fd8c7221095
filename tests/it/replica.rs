//! Replication through real processes: a mounted primary ships to `kvfs serve` children over
//! `exec:` pipes and over loopback TCP with TLS; the replica is mounted read-only while it
//! receives; faults (a killed replica, a flipped bit, a foreign filesystem, a promoted
//! replica) end with nothing acknowledged lost, both audits clean and equal trees.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common::{self, pattern, Mounted, KVFS};

pub(crate) fn kvfs<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(KVFS).args(args).output().unwrap()
}

/// Run kvfs and insist it succeeds; its stdout.
pub(crate) fn ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = kvfs(args);
    assert!(
        out.status.success(),
        "kvfs {:?} failed: {}{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kvfs config STORE KEY=VALUE`, which must succeed.
pub(crate) fn config(store: &Path, kv: &str) {
    ok(&[OsStr::new("config"), store.as_os_str(), OsStr::new(kv)]);
}

pub(crate) fn exec_url(replica: &Path) -> String {
    format!("exec:{KVFS} serve --stdio {}", replica.display())
}

fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let c = common::cstr(p);
    let mut names = vec![0u8; 4096];
    // SAFETY: buffers are valid for their lengths.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(len.max(0) as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), v));
    }
    out.sort();
    out
}

/// Everything a replica must reproduce of a tree: per path its type, mode, owner, size, link
/// count, mtime, symlink target, user xattrs and a hash of its content.
fn tree(root: &Path) -> BTreeMap<String, String> {
    // A tree that changes while it is walked (a followed replica catching up) may lose an
    // entry between its listing and its reading: such an entry reads as its error, which a
    // caller waiting for equality sees go away (and a lasting error shows in its diff).
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.flatten().collect(),
            Err(e) => {
                out.insert(
                    dir.to_string_lossy().into_owned(),
                    format!("unreadable: {e}"),
                );
                return;
            }
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = match std::fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) => {
                    out.insert(rel, format!("unreadable: {e}"));
                    continue;
                }
            };
            let ft = md.file_type();
            let what = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link {:?}", std::fs::read_link(&p))
            } else if ft.is_file() {
                match std::fs::read(&p) {
                    Ok(data) => format!("file {:x}", Sha256::digest(&data)),
                    Err(e) => format!("unreadable: {e}"),
                }
            } else {
                "special".to_string()
            };
            let line = format!(
                "{what} mode {:o} uid {} gid {} size {} nlink {} mtime {}.{} xattrs {:?}",
                md.mode(),
                md.uid(),
                md.gid(),
                if ft.is_dir() { 0 } else { md.size() },
                md.nlink(),
                md.mtime(),
                md.mtime_nsec(),
                xattrs(&p)
            );
            out.insert(rel, line);
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn populate(root: &Path) {
    std::fs::create_dir_all(root.join("src/deep/er")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("small"), b"hello replica\n").unwrap();
    std::fs::write(root.join("src/deep/er/big"), pattern(1, 3 << 20)).unwrap();
    std::fs::write(root.join("src/dup"), pattern(1, 3 << 20)).unwrap();
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    f.set_len(10 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"middle", 5 << 20).unwrap();
    drop(f);
    std::fs::hard_link(root.join("small"), root.join("src/hard")).unwrap();
    std::os::unix::fs::symlink("../small", root.join("src/link")).unwrap();
    std::fs::set_permissions(root.join("small"), PermissionsExt::from_mode(0o640)).unwrap();
    let c = common::cstr(&root.join("small"));
    let v = b"some value";
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.note".as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    assert_eq!(r, 0);
    let fifo = common::cstr(&root.join("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
}

/// `kvfs replica sync STORE --timeout SECS`, whatever its outcome.
pub(crate) fn try_sync(store: &Path, secs: u64) -> Output {
    kvfs(&[
        OsStr::new("replica"),
        OsStr::new("sync"),
        store.as_os_str(),
        OsStr::new("--timeout"),
        OsStr::new(&secs.to_string()),
    ])
}

/// `kvfs status STORE --json`, parsed.
pub(crate) fn status_json(store: &Path) -> serde_json::Value {
    let out = ok(&[
        OsStr::new("status"),
        store.as_os_str(),
        OsStr::new("--json"),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

pub(crate) fn sync(store: &Path) -> String {
    ok(&[
        OsStr::new("replica"),
        OsStr::new("sync"),
        store.as_os_str(),
        OsStr::new("--timeout"),
        OsStr::new("60"),
    ])
}

pub(crate) fn audit_clean(store: &Path) {
    let out = kvfs(&[OsStr::new("audit"), store.as_os_str()]);
    assert!(
        out.status.success(),
        "audit of {} found problems: {}",
        store.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Wait until the two trees are equal (a followed replica shows new states within seconds).
///
/// The primary's kernel in writeback mode shows file times of its own until it drops the
/// inode (a known divergence of a few milliseconds from what the store keeps, filed with the
/// POSIX edges), so its inode cache is dropped first: the trees compared are what the stores
/// hold.
pub(crate) fn wait_equal(a: &Path, b: &Path, secs: u64) {
    let t0 = Instant::now();
    loop {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
        let (ta, tb) = (tree(a), tree(b));
        if ta == tb {
            return;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            for (k, v) in &ta {
                if tb.get(k) != Some(v) {
                    eprintln!("primary {k}: {v}\nreplica {k}: {:?}", tb.get(k));
                }
            }
            for k in tb.keys().filter(|k| !ta.contains_key(*k)) {
                eprintln!("only on the replica: {k}");
            }
            panic!("trees differ after {secs}s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn replica_dir(m: &Mounted) -> PathBuf {
    m.tmp.path().join("replica")
}

pub(crate) fn add(m: &Mounted, name: &str, url: &str, extra: &[&str]) {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("replica"),
        OsStr::new("add"),
        m.store.as_os_str(),
        OsStr::new(name),
        OsStr::new(url),
    ];
    args.extend(extra.iter().map(OsStr::new));
    ok(&args);
}

#[test]
fn a_replica_over_exec_follows_the_primary_read_only() {
    let Some(mut m) = common::mount() else {
        return;
    };
    populate(&m.mnt);
    let replica = replica_dir(&m);
    add(&m, "home", &exec_url(&replica), &[]);
    let out = sync(&m.store);
    assert!(out.contains("home\tin sync"), "{out}");
    let mut r = Mounted::existing(&replica, "").unwrap();
    wait_equal(&m.mnt, &r.mnt, 10);

    // Writes on the replica are refused.
    assert_eq!(
        common::errno(std::fs::write(r.path("new"), b"x")),
        libc::EROFS
    );
    // Changes of every kind reach the mounted replica while it is mounted.
    std::fs::rename(m.path("src/dup"), m.path("moved")).unwrap();
    std::fs::remove_file(m.path("src/hard")).unwrap();
    std::fs::write(m.path("small"), b"rewritten, shorter").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("src/deep/er/big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"patched", 1 << 20).unwrap();
    f.set_len(2 << 20).unwrap();
    drop(f);
    std::fs::remove_dir_all(m.path("src/deep")).ok();
    std::fs::create_dir(m.path("later")).unwrap();
    std::fs::write(m.path("later/file"), pattern(7, 200_000)).unwrap();
    sync(&m.store);
    wait_equal(&m.mnt, &r.mnt, 10);
    // Without an explicit sync the mount's replication thread ships within seconds.
    std::fs::write(m.path("later/unsynced"), b"shipped by the mount itself").unwrap();
    wait_equal(&m.mnt, &r.mnt, 15);

    // Reading the primary's tree moves access times (relatime), which are shipped too: the
    // status says "in sync" once that last group is acknowledged, within seconds.
    let t0 = Instant::now();
    loop {
        let v = status_json(&m.store);
        let rep = &v["replication"]["replicas"][0];
        assert_eq!(rep["name"], "home");
        if rep["state"] == "in sync" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    r.unmount();
    m.unmount();
    audit_clean(&m.store);
    audit_clean(&replica);
    assert_eq!(status_json(&replica)["replication"]["role"], "replica");
}

/// The pid of the `kvfs serve` process serving `replica`, if one runs.
pub(crate) fn server_pid(replica: &Path) -> Option<i32> {
    let want = replica.as_os_str().as_bytes();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.contains(&&b"serve"[..]) && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}

/// A `kvfs serve --listen` child serving `replica` to the primary `store`; killed when
/// dropped.
pub(crate) struct TcpServer {
    child: std::process::Child,
    pub fp: String,
    pub addr: String,
}

impl TcpServer {
    pub(crate) fn start(replica: &Path, store: &Path, listen: &str) -> TcpServer {
        let primary_fp = ok(&[OsStr::new("fingerprint"), store.as_os_str()]);
        let mut child = Command::new(KVFS)
            .args([
                OsStr::new("serve"),
                replica.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new(listen),
                OsStr::new("--allow"),
                OsStr::new(primary_fp.trim()),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let fp = lines.next().unwrap().unwrap();
        let addr = lines.next().unwrap().unwrap();
        TcpServer {
            child,
            fp: fp.strip_prefix("fingerprint ").unwrap().to_string(),
            addr: addr.strip_prefix("listening on ").unwrap().to_string(),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Kill it now (SIGKILL) and wait for it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn over_tcp_tls_with_pinned_fingerprints_and_refusals() {
    let Some(mut m) = common::mount() else {
        return;
    };
    populate(&m.mnt);
    let replica = replica_dir(&m);
    let server = TcpServer::start(&replica, &m.store, "127.0.0.1:0");
    let (fp, url) = (server.fp.clone(), server.url());

    // A wrong pin is refused before anything is sent.
    add(
        &m,
        "wrong",
        &url,
        &["--fingerprint", &format!("SHA256:{}", "00".repeat(32))],
    );
    let out = try_sync(&m.store, 5);
    assert!(!out.status.success());
    ok(&[
        OsStr::new("replica"),
        OsStr::new("remove"),
        m.store.as_os_str(),
        OsStr::new("wrong"),
    ]);

    add(&m, "home", &url, &["--fingerprint", &fp]);
    let out = sync(&m.store);
    assert!(out.contains("home\tin sync"), "{out}");
    let r = Mounted::existing(&replica, "").unwrap();
    wait_equal(&m.mnt, &r.mnt, 10);

    // Another filesystem's primary is refused by this replica (its certificate is not
    // allowed, and its filesystem is another).
    let other = common::mount().unwrap();
    add(&other, "home", &url, &["--fingerprint", &fp]);
    let out = try_sync(&other.store, 5);
    assert!(!out.status.success());
    let v = status_json(&other.store);
    let st = v.to_string();
    assert_eq!(v["replication"]["replicas"][0]["state"], "error", "{st}");
    drop(server);
    drop(r);
    m.unmount();
    audit_clean(&replica);
}

#[test]
fn a_promoted_replica_refuses_its_old_primary() {
    let Some(mut m) = common::mount() else {
        return;
    };
    populate(&m.mnt);
    let replica = replica_dir(&m);
    add(&m, "home", &exec_url(&replica), &[]);
    sync(&m.store);
    m.unmount();
    // Another filesystem may not ship to this replica.
    let other = common::mount().unwrap();
    add(&other, "home", &exec_url(&replica), &[]);
    let out = try_sync(&other.store, 10);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("follows filesystem"),
        "{out:?}"
    );
    drop(other);

    ok(&[OsStr::new("promote"), replica.as_os_str()]);
    // The promoted store mounts read-write and holds the primary's tree.
    let mut p = Mounted::existing(&replica, "").unwrap();
    std::fs::write(p.path("after-promotion"), b"new primary").unwrap();
    m.start();
    std::fs::remove_file(p.path("after-promotion")).unwrap();
    wait_equal(&m.path("src"), &p.path("src"), 5);
    p.unmount();
    // The old primary is refused, with the reason.
    std::fs::write(m.path("late"), b"x").unwrap();
    let out = try_sync(&m.store, 10);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("promoted"),
        "{out:?}"
    );
    m.unmount();
    audit_clean(&replica);
    audit_clean(&m.store);
}

/// A real sshd on a loopback port, with a generated host key and a client key whose
/// `authorized_keys` line forces `kvfs serve --stdio REPLICA` (the line README documents).
struct Sshd {
    child: std::process::Child,
    port: u16,
    key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd(dir: &Path, forced: &str) -> Option<Sshd> {
    let bin = Path::new("/usr/sbin/sshd");
    if !bin.exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("/usr/sbin/sshd is missing but CI=true (tools/setup installs openssh-server)");
        }
        eprintln!("skipping: no sshd");
        return None;
    }
    let keygen = |f: &Path| {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(f)
            .status()
            .unwrap();
        assert!(st.success());
    };
    let (host, key) = (dir.join("host_key"), dir.join("id"));
    keygen(&host);
    keygen(&key);
    let public = std::fs::read_to_string(dir.join("id.pub")).unwrap();
    let auth = dir.join("authorized_keys");
    std::fs::write(&auth, format!("command=\"{forced}\",restrict {public}")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin yes\nLogLevel ERROR\n",
            host.display(),
            dir.join("sshd.pid").display(),
            auth.display()
        ),
    )
    .unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = Command::new(bin)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "sshd did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Sshd { child, port, key })
}

#[test]
fn over_a_real_ssh_with_a_forced_command() {
    let Some(mut m) = common::mount() else {
        return;
    };
    populate(&m.mnt);
    let replica = replica_dir(&m);
    let forced = format!("{KVFS} serve --stdio {}", replica.display());
    let Some(sshd) = sshd(m.tmp.path(), &forced) else {
        return;
    };
    let url = format!("ssh://127.0.0.1:{}/{}", sshd.port, replica.display());
    m.unmount();
    add(&m, "nas", &url, &[]);
    let ssh = format!(
        "ssh -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        sshd.key.display()
    );
    let out = Command::new(KVFS)
        .args([
            OsStr::new("replica"),
            OsStr::new("sync"),
            m.store.as_os_str(),
        ])
        .env("KVFS_SSH", &ssh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nas\tin sync"));
    audit_clean(&replica);
    m.start();
    let r = Mounted::existing(&replica, "").unwrap();
    wait_equal(&m.mnt, &r.mnt, 10);
}

/// Shipping costs what changed: a 4 KiB write into a big file ships one block, as a delta of
/// the block the replica holds there, and a few hundred bytes of metadata.
#[test]
fn a_small_change_in_a_big_file_ships_a_few_kilobytes() {
    let Some(mut m) = common::mount() else {
        return;
    };
    std::fs::write(m.path("big"), pattern(11, 32 << 20)).unwrap();
    std::fs::write(m.path("copy"), pattern(11, 32 << 20)).unwrap();
    let replica = replica_dir(&m);
    m.unmount();
    add(&m, "home", &exec_url(&replica), &[]);
    let first = sync(&m.store);
    // The copy's blocks are the same blocks: sent once.
    assert!(first.contains("512 blocks"), "{first}");
    m.start();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &pattern(12, 4096), 7 << 20).unwrap();
    drop(f);
    m.unmount();
    let out = sync(&m.store);
    let wire: u64 = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(4)
        .find(|w| w[1..] == ["bytes", "on", "the"])
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("no wire bytes in {out}"));
    assert!(
        out.contains("1 blocks") && out.contains("1 as deltas"),
        "{out}"
    );
    assert!(
        wire < 12 << 10,
        "a 4 KiB change put {wire} bytes on the wire"
    );
    audit_clean(&replica);
    m.start();
    let r = Mounted::existing(&replica, "").unwrap();
    wait_equal(&m.mnt, &r.mnt, 10);
}
