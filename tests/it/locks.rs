//! POSIX and OFD record locks through a real mount, between real processes, each scenario run
//! on a plain directory and on kvfs and compared; and a dead mount's locks reaped by `kvfs gc`.
//!
//! The second process is this test binary run again (as sled's crash tests do) with
//! `--ignored --exact locks::lock_holder_process`: an exec'd process inherits none of the test
//! process's descriptors (Rust opens them close-on-exec), so it cannot keep another test's
//! files open behind its back. It reads its orders from the environment, reports each errno
//! on stderr and holds its locks until its stdin closes.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn flock(typ: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

fn open_rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

/// One lock call on `fd`: its errno (0 for success).
fn try_lock(fd: i32, cmd: i32, typ: i32, start: i64, len: i64) -> i32 {
    let mut fl = flock(typ, start, len);
    fcntl_lock(fd, cmd, &mut fl)
}

fn fcntl_lock(fd: i32, cmd: i32, fl: &mut libc::flock) -> i32 {
    // SAFETY: valid fd and flock.
    sys(unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) })
}

/// F_GETLK / F_OFD_GETLK as a transcript line (the pid only as "mine"/"child"/"none").
fn getlk(fd: i32, cmd: i32, typ: i32, start: i64, len: i64, child: i32) -> String {
    let mut fl = flock(typ, start, len);
    let e = fcntl_lock(fd, cmd, &mut fl);
    if e != 0 {
        return format!("getlk err={e}");
    }
    if fl.l_type == libc::F_UNLCK as i16 {
        return "getlk free".into();
    }
    let who = if fl.l_pid == child {
        "child".to_string()
    } else if fl.l_pid == -1 {
        "ofd".to_string()
    } else {
        format!("pid{}", fl.l_pid == std::process::id() as i32)
    };
    format!(
        "getlk {} {}+{} by {who}",
        if fl.l_type == libc::F_WRLCK as i16 {
            "W"
        } else {
            "R"
        },
        fl.l_start,
        fl.l_len
    )
}

/// Another process holding locks on `path`: runs `ops` (cmd, type, start, len), reports
/// each errno, then waits for its stdin to close and exits.
struct Holder {
    pid: i32,
    child: Child,
    err: BufReader<ChildStderr>,
}

impl Holder {
    fn spawn(path: &Path, ops: &[(i32, i32, i64, i64)]) -> Holder {
        let spec: Vec<String> = ops
            .iter()
            .map(|(c, t, s, l)| format!("{c},{t},{s},{l}"))
            .collect();
        Holder::start(path, &spec.join(";"))
    }

    /// Run the helper with orders `ops` (`cmd,type,start,len;...`, or `eintr`).
    fn start(path: &Path, ops: &str) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "locks::lock_holder_process",
                "--nocapture",
                "-q",
            ])
            .env("KVFS_LOCK_HOLDER", path)
            .env("KVFS_LOCK_OPS", ops)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        Holder {
            pid: child.id() as i32,
            child,
            err,
        }
    }

    /// The errno of the child's next operation.
    fn result(&mut self) -> i32 {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.err.read_line(&mut line).unwrap() > 0,
                "lock holder died"
            );
            if let Some(r) = line.trim().strip_prefix("RESULT ") {
                return r.parse().unwrap();
            }
        }
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

/// The holder's side (see the module comment); ignored in ordinary runs.
#[test]
#[ignore = "helper process for the lock tests, run by them"]
fn lock_holder_process() {
    let path = std::env::var_os("KVFS_LOCK_HOLDER").expect("run by the lock tests");
    let f = open_rw(Path::new(&path));
    if std::env::var("KVFS_LOCK_OPS").as_deref() == Ok("eintr") {
        // Block in F_SETLKW until a SIGALRM sent to this very thread (a handler without
        // SA_RESTART) interrupts it: the libtest process has other threads, and a
        // process-wide alarm(2) could land on one of them.
        extern "C" fn on_alarm(_: i32) {}
        // SAFETY: installing a no-op handler; pthread_kill on a live thread of ours.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_alarm as *const () as usize;
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
            let me = libc::pthread_self() as usize;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                libc::pthread_kill(me as libc::pthread_t, libc::SIGALRM);
            });
        }
        let mut fl = flock(libc::F_WRLCK, 0, 0);
        eprintln!(
            "RESULT {}",
            fcntl_lock(f.as_raw_fd(), libc::F_SETLKW, &mut fl)
        );
        return;
    }
    for op in std::env::var("KVFS_LOCK_OPS").unwrap().split(';') {
        let v: Vec<i64> = op.split(',').map(|x| x.parse().unwrap()).collect();
        let mut fl = flock(v[1] as i32, v[2], v[3]);
        eprintln!("RESULT {}", fcntl_lock(f.as_raw_fd(), v[0] as i32, &mut fl));
    }
    let mut b = [0u8; 1];
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut b);
}

fn scenario(dir: &Path, log: &mut Log) {
    let p = dir.join("locked");
    std::fs::write(&p, vec![0u8; 1000]).unwrap();
    let f = open_rw(&p);
    let fd = f.as_raw_fd();
    // A child holds a write lock on 0..100 and a read lock on 200..300.
    let mut h = Holder::spawn(
        &p,
        &[
            (libc::F_SETLK, libc::F_WRLCK, 0, 100),
            (libc::F_SETLK, libc::F_RDLCK, 200, 100),
        ],
    );
    log.push(format!("child lock {} {}", h.result(), h.result()));
    let steps = [
        ("overlap W", libc::F_WRLCK, 50, 10),
        ("overlap R", libc::F_RDLCK, 0, 10),
        ("shared R", libc::F_RDLCK, 250, 10),
        ("W over child's R", libc::F_WRLCK, 250, 10),
        ("adjacent W", libc::F_WRLCK, 100, 100),
    ];
    for (what, typ, start, len) in steps {
        let r = try_lock(fd, libc::F_SETLK, typ, start, len);
        log.push(format!("{what} {r}"));
    }
    log.push(getlk(fd, libc::F_GETLK, libc::F_WRLCK, 90, 20, h.pid));
    log.push(getlk(fd, libc::F_GETLK, libc::F_RDLCK, 300, 0, h.pid));
    // Our own ranges never conflict with us; unlocking the middle splits them.
    let mut fl = flock(libc::F_WRLCK, 400, 100);
    log.push(format!("own W {}", fcntl_lock(fd, libc::F_SETLK, &mut fl)));
    log.push(format!(
        "own split {}",
        try_lock(fd, libc::F_SETLK, libc::F_UNLCK, 440, 20)
    ));
    // A second child sees the split: 440..460 is free, 400..440 and 460..500 are not.
    let probe = |start, len| -> i32 {
        let mut h2 = Holder::spawn(&p, &[(libc::F_SETLK, libc::F_RDLCK, start, len)]);
        let r = h2.result();
        h2.finish();
        r
    };
    log.push(format!(
        "after split {} {} {}",
        probe(445, 10),
        probe(430, 5),
        probe(470, 5)
    ));
    // POSIX: closing any descriptor of the file drops all our locks on it.
    let other = std::fs::File::open(&p).unwrap();
    drop(other);
    log.push(format!("after close {}", probe(400, 100)));
    // A blocking wait is granted when the holder goes away.
    let t0 = Instant::now();
    let waiter = {
        let p = p.clone();
        std::thread::spawn(move || {
            let f = open_rw(&p);
            let mut fl = flock(libc::F_WRLCK, 0, 50);
            fcntl_lock(f.as_raw_fd(), libc::F_SETLKW, &mut fl)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    log.push(format!("waiter still blocked {}", !waiter.is_finished()));
    h.finish();
    let r = waiter.join().unwrap();
    log.push(format!(
        "waiter granted {r} fast {}",
        t0.elapsed() < Duration::from_secs(10)
    ));
    // OFD locks: owned by the open file description, so two opens in one process conflict.
    let a = open_rw(&p);
    let b = open_rw(&p);
    log.push(format!(
        "ofd a {}",
        try_lock(a.as_raw_fd(), libc::F_OFD_SETLK, libc::F_WRLCK, 600, 10)
    ));
    log.push(format!(
        "ofd b {}",
        try_lock(b.as_raw_fd(), libc::F_OFD_SETLK, libc::F_WRLCK, 605, 10)
    ));
    log.push(getlk(
        b.as_raw_fd(),
        libc::F_OFD_GETLK,
        libc::F_WRLCK,
        600,
        1,
        0,
    ));
    drop(a);
    // FUSE reports the last close of a file description with an asynchronous RELEASE, so on
    // kvfs the OFD lock goes a moment after close(2) returns (on ext4, at once): retry briefly.
    let t0 = Instant::now();
    let r = loop {
        let mut fl = flock(libc::F_WRLCK, 605, 10);
        let r = fcntl_lock(b.as_raw_fd(), libc::F_OFD_SETLK, &mut fl);
        if r == 0 || t0.elapsed() > Duration::from_secs(2) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    log.push(format!("ofd b after a closed {r}"));
    drop(b);
    drop(f);
}

#[test]
fn record_locks_behave_like_a_local_filesystem_between_processes() {
    let Some(m) = mount() else { return };
    let (a, b) = transcripts(&m, scenario);
    if a != b {
        let dump = run_kvfs(&["dump", "--prefix", "i"], &m.store);
        panic!(
            "plain vs kvfs differ:\nplain: {a:?}\nkvfs:  {b:?}\nlock table: {}\nlog: {}",
            dump.1,
            m.log()
        );
    }
    // And nothing is left behind in the keyspace once every holder is gone.
    let dump = run_kvfs(&["dump", "--prefix", "i"], &m.store);
    assert!(!dump.1.contains(" lock "), "locks left: {}", dump.1);
}

/// `kvfs SUBCOMMAND ... STORE`: (success, stdout + stderr).
pub fn run_kvfs(args: &[&str], store: &Path) -> (bool, String) {
    let out = Command::new(KVFS).args(args).arg(store).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

#[test]
fn a_blocked_wait_gives_eintr_when_the_waiter_is_signalled() {
    let Some(m) = mount() else { return };
    let p = m.path("f");
    std::fs::write(&p, b"x").unwrap();
    let f = open_rw(&p);
    let mut fl = flock(libc::F_WRLCK, 0, 0);
    assert_eq!(fcntl_lock(f.as_raw_fd(), libc::F_SETLK, &mut fl), 0);
    let t0 = Instant::now();
    let mut h = Holder::start(&p, "eintr");
    let got = h.result();
    h.finish();
    assert_eq!(got, libc::EINTR, "F_SETLKW did not end with EINTR");
    assert!(t0.elapsed() < Duration::from_secs(10));
    drop(f);
}

#[test]
fn a_dead_mounts_locks_die_with_it() {
    let Some(mut m) = mount() else { return };
    let p = m.path("f");
    std::fs::write(&p, b"data").unwrap();
    let mut h = Holder::spawn(&p, &[(libc::F_SETLK, libc::F_WRLCK, 0, 0)]);
    assert_eq!(h.result(), 0);
    m.crash();
    h.finish();
    // A mount that alone holds its store leaves record locks to the kernel's own table: they
    // die with it. (Mounts sharing a store keep them in the keyspace, where the sweep drops a
    // dead one's; the unit test `a_dead_sharing_mounts_locks_go_with_the_sweep` has that case.)
    let (_, before) = run_kvfs(&["dump", "--prefix", "i"], &m.store);
    assert!(
        !before.contains(" lock "),
        "the lock reached the keyspace: {before}"
    );
    let (ok, out) = run_kvfs(&["gc"], &m.store);
    assert!(ok, "{out}");
    assert!(out.contains("1 dead mount(s)"), "{out}");
    let (ok, out) = run_kvfs(&["audit"], &m.store);
    assert!(ok, "{out}");
    // And a new mount can take the lock at once.
    m.start();
    let f = open_rw(&p);
    let mut fl = flock(libc::F_WRLCK, 0, 0);
    assert_eq!(fcntl_lock(f.as_raw_fd(), libc::F_SETLK, &mut fl), 0);
}
