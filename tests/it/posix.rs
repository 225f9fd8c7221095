//! POSIX behaviour through a real mount, each scenario run on a plain directory (ext4 here)
//! and on kvfs, comparing transcripts of errnos, stat fields and bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

fn read_all(p: &Path) -> String {
    match fs::read(p) {
        Ok(b) => format!("{} bytes {:x}", b.len(), crc(&b)),
        Err(e) => format!("err={}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn crc(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

fn ls(p: &Path) -> String {
    let mut v: Vec<String> = match fs::read_dir(p) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => return format!("err={}", e.raw_os_error().unwrap_or(-1)),
    };
    v.sort();
    v.join(",")
}

fn rename2(a: &Path, b: &Path, flags: u32) -> i32 {
    let (a, b) = (cstr(a), cstr(b));
    // SAFETY: valid C strings.
    sys(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

#[test]
fn files_create_exclusive_and_errors_match_ext4() {
    differential("files", |d, log| {
        let f = d.join("f");
        log.push(format!("{}", errno(File::open(&f))));
        fs::write(&f, b"hello world").unwrap();
        log.push(st(&f));
        log.push(read_all(&f));
        let r = OpenOptions::new().write(true).create_new(true).open(&f);
        log.push(format!("excl {}", errno(r)));
        log.push(format!("mkdir over file {}", errno(fs::create_dir(&f))));
        log.push(format!(
            "open dir for write {}",
            errno(OpenOptions::new().write(true).open(d))
        ));
        log.push(format!("file as dir {}", errno(File::open(f.join("x")))));
        log.push(format!("rmdir file {}", errno(fs::remove_dir(&f))));
        log.push(format!("unlink dir {}", errno(fs::remove_file(d))));
        let long = d.join("x".repeat(256));
        log.push(format!("long name {}", errno(File::create(&long))));
        log.push(format!("long lookup {}", errno(fs::metadata(&long))));
        let ok255 = d.join("y".repeat(255));
        log.push(format!("255 name {}", errno(File::create(&ok255))));
        log.push(ls(d));
    });
}

#[test]
fn directories_nlink_and_rmdir_errors_match_ext4() {
    differential("dirs", |d, log| {
        fs::create_dir(d.join("a")).unwrap();
        fs::create_dir(d.join("a/b")).unwrap();
        fs::create_dir(d.join("a/c")).unwrap();
        log.push(st(&d.join("a")));
        log.push(format!(
            "mkdir exists {}",
            errno(fs::create_dir(d.join("a")))
        ));
        log.push(format!(
            "rmdir nonempty {}",
            errno(fs::remove_dir(d.join("a")))
        ));
        fs::write(d.join("a/b/f"), b"x").unwrap();
        log.push(format!(
            "rmdir nonempty2 {}",
            errno(fs::remove_dir(d.join("a/b")))
        ));
        fs::remove_file(d.join("a/b/f")).unwrap();
        log.push(format!("rmdir {}", errno(fs::remove_dir(d.join("a/b")))));
        log.push(st(&d.join("a")));
        log.push(format!(
            "rmdir missing {}",
            errno(fs::remove_dir(d.join("a/zz")))
        ));
        log.push(ls(&d.join("a")));
        log.push(format!(
            "readdir file {}",
            errno(fs::read_dir(d.join("nope")))
        ));
    });
}

#[test]
fn rename_cases_match_ext4() {
    differential("rename", |d, log| {
        fs::write(d.join("f1"), b"one").unwrap();
        fs::write(d.join("f2"), b"two").unwrap();
        fs::create_dir(d.join("d1")).unwrap();
        fs::create_dir(d.join("d2")).unwrap();
        fs::create_dir(d.join("full")).unwrap();
        fs::write(d.join("full/x"), b"x").unwrap();
        let p = |s: &str| d.join(s);
        log.push(format!(
            "file over file {}",
            errno(fs::rename(p("f1"), p("f2")))
        ));
        log.push(read_all(&p("f2")));
        log.push(st(&p("f1")));
        log.push(format!(
            "dir over empty dir {}",
            errno(fs::rename(p("d1"), p("d2")))
        ));
        log.push(format!(
            "dir over full dir {}",
            errno(fs::rename(p("d2"), p("full")))
        ));
        log.push(format!(
            "dir over file {}",
            errno(fs::rename(p("d2"), p("f2")))
        ));
        log.push(format!(
            "file over dir {}",
            errno(fs::rename(p("f2"), p("d2")))
        ));
        log.push(format!(
            "into own subtree {}",
            errno(fs::rename(p("full"), p("full/x/y")))
        ));
        fs::create_dir(p("full/sub")).unwrap();
        log.push(format!(
            "into own child {}",
            errno(fs::rename(p("full"), p("full/sub/n")))
        ));
        log.push(format!(
            "missing src {}",
            errno(fs::rename(p("nope"), p("n2")))
        ));
        log.push(format!(
            "noreplace {}",
            rename2(&p("f2"), &p("full/x"), libc::RENAME_NOREPLACE)
        ));
        log.push(format!(
            "noreplace ok {}",
            rename2(&p("f2"), &p("f3"), libc::RENAME_NOREPLACE)
        ));
        log.push(format!(
            "exchange {}",
            rename2(&p("f3"), &p("full/x"), libc::RENAME_EXCHANGE)
        ));
        log.push(read_all(&p("f3")));
        log.push(read_all(&p("full/x")));
        log.push(format!(
            "exchange dir/file {}",
            rename2(&p("d2"), &p("f3"), libc::RENAME_EXCHANGE)
        ));
        log.push(st(&p("d2")));
        log.push(st(&p("f3")));
        log.push(format!(
            "exchange missing {}",
            rename2(&p("d2"), &p("zz"), libc::RENAME_EXCHANGE)
        ));
        log.push(format!(
            "across dirs {}",
            errno(fs::rename(p("f3"), p("full/sub/moved")))
        ));
        log.push(st(&p("full")));
        log.push(st(&p("full/sub")));
        fs::create_dir(p("mv")).unwrap();
        log.push(format!(
            "dir across {}",
            errno(fs::rename(p("mv"), p("full/sub/mv")))
        ));
        log.push(st(&p("full/sub")));
        log.push(st(d));
        log.push(ls(d));
        log.push(ls(&p("full/sub")));
    });
}

#[test]
fn hard_links_share_attributes_through_every_name() {
    differential("links", |d, log| {
        let a = d.join("a");
        fs::write(&a, b"data").unwrap();
        fs::hard_link(&a, d.join("b")).unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        fs::hard_link(&a, d.join("sub/c")).unwrap();
        for n in ["a", "b", "sub/c"] {
            log.push(st(&d.join(n)));
        }
        let ia = fs::metadata(&a).unwrap().ino();
        log.push(format!(
            "same ino {}",
            fs::metadata(d.join("sub/c")).unwrap().ino() == ia
        ));
        log.push(format!(
            "link exists {}",
            errno(fs::hard_link(&a, d.join("b")))
        ));
        log.push(format!(
            "link dir {}",
            errno(fs::hard_link(d.join("sub"), d.join("sd")))
        ));
        fs::remove_file(d.join("b")).unwrap();
        log.push(st(&a));
        fs::write(d.join("other"), b"zz").unwrap();
        // rename over one of the links
        log.push(format!(
            "rename over link {}",
            errno(fs::rename(d.join("other"), d.join("sub/c")))
        ));
        log.push(st(&a));
        log.push(read_all(&d.join("sub/c")));
        // rename a link onto another link of the same inode: nothing happens
        fs::hard_link(&a, d.join("a2")).unwrap();
        log.push(format!(
            "rename same inode {}",
            errno(fs::rename(&a, d.join("a2")))
        ));
        log.push(st(&a));
        log.push(ls(d));
    });
}

#[test]
fn symlinks_and_special_files() {
    differential("special", |d, log| {
        std::os::unix::fs::symlink("target/of/link", d.join("l")).unwrap();
        log.push(st(&d.join("l")));
        log.push(format!("{:?}", fs::read_link(d.join("l")).unwrap()));
        log.push(format!("readlink file {}", errno(fs::read_link(d))));
        log.push(format!("dangling {}", errno(fs::metadata(d.join("l")))));
        let fifo = cstr(&d.join("fifo"));
        // SAFETY: valid C string.
        log.push(format!(
            "mkfifo {}",
            sys(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) })
        ));
        log.push(st(&d.join("fifo")));
        let sock = std::os::unix::net::UnixListener::bind(d.join("sock"));
        log.push(format!("socket {}", errno(sock)));
        log.push(st(&d.join("sock")));
        let dev = cstr(&d.join("chr"));
        // SAFETY: valid C string.
        let r = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        log.push(format!("mknod chr {}", sys(r)));
        log.push(format!(
            "rdev {}",
            fs::symlink_metadata(d.join("chr")).unwrap().rdev()
        ));
        log.push(ls(d));
    });
}

#[test]
fn chmod_chown_and_times() {
    differential("attrs", |d, log| {
        let f = d.join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4751)).unwrap();
        log.push(st(&f));
        std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
        log.push(st(&f));
        let c = cstr(&f);
        let ts = [
            libc::timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 123_456_789,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        // SAFETY: valid pointers.
        log.push(format!(
            "utimensat {}",
            sys(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) })
        ));
        let m = fs::metadata(&f).unwrap();
        log.push(format!("atime {}.{}", m.atime(), m.atime_nsec()));
        let mtime_before = (m.mtime(), m.mtime_nsec());
        let ts = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 1_500_000_000,
                tv_nsec: 1,
            },
        ];
        // SAFETY: valid pointers.
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
        let m = fs::metadata(&f).unwrap();
        log.push(format!(
            "mtime {}.{} atime kept {}",
            m.mtime(),
            m.mtime_nsec(),
            m.atime()
        ));
        log.push(format!(
            "mtime changed {}",
            mtime_before != (m.mtime(), m.mtime_nsec())
        ));
        let before = std::time::SystemTime::now();
        let ts = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
        ];
        // SAFETY: valid pointers.
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
        let m = fs::metadata(&f).unwrap();
        log.push(format!(
            "now is recent {}",
            m.modified().unwrap() >= before - std::time::Duration::from_millis(10)
        ));
        log.push(format!(
            "ctime >= mtime {}",
            (m.ctime(), m.ctime_nsec()) >= (m.mtime(), m.mtime_nsec())
        ));
        // a write moves mtime and ctime
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (m0, c0) = (
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
            m.ctime_nsec() + m.ctime() * 1_000_000_000,
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        let m = fs::metadata(&f).unwrap();
        log.push(format!(
            "write moves mtime {} ctime {}",
            m.mtime_nsec() + m.mtime() * 1_000_000_000 > m0,
            m.ctime_nsec() + m.ctime() * 1_000_000_000 > c0
        ));
        // chmod moves ctime, not mtime
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (m1, c1) = (
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
            m.ctime_nsec() + m.ctime() * 1_000_000_000,
        );
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        let m = fs::metadata(&f).unwrap();
        log.push(format!(
            "chmod keeps mtime {} moves ctime {}",
            m.mtime_nsec() + m.mtime() * 1_000_000_000 == m1,
            m.ctime_nsec() + m.ctime() * 1_000_000_000 > c1
        ));
        // creating in a directory moves its mtime
        let dm = fs::metadata(d).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(d.join("g"), b"").unwrap();
        let dm2 = fs::metadata(d).unwrap();
        log.push(format!(
            "dir mtime moves {}",
            (dm2.mtime(), dm2.mtime_nsec()) > (dm.mtime(), dm.mtime_nsec())
        ));
    });
}

#[test]
fn truncate_append_and_sparse_files() {
    differential("data", |d, log| {
        let f = d.join("f");
        let data = pattern(1, 200_000);
        fs::write(&f, &data).unwrap();
        log.push(read_all(&f));
        let h = OpenOptions::new().write(true).open(&f).unwrap();
        h.set_len(70_000).unwrap();
        log.push(st(&f));
        h.set_len(300_000).unwrap();
        log.push(st(&f));
        let back = fs::read(&f).unwrap();
        log.push(format!("prefix kept {}", back[..70_000] == data[..70_000]));
        log.push(format!(
            "tail zero {}",
            back[70_000..].iter().all(|&b| b == 0)
        ));
        drop(h);
        let mut a = OpenOptions::new().append(true).open(&f).unwrap();
        a.write_all(b"APPENDED").unwrap();
        log.push(st(&f));
        let mut t = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&f)
            .unwrap();
        log.push(st(&f));
        t.write_all(b"abc").unwrap();
        t.seek(SeekFrom::Start(10)).unwrap();
        t.write_all(b"z").unwrap();
        drop(t);
        log.push(read_all(&f));
        // sparse: a byte at 100 MiB
        let s = d.join("sparse");
        let mut h = File::create(&s).unwrap();
        h.seek(SeekFrom::Start(100 << 20)).unwrap();
        h.write_all(b"!").unwrap();
        drop(h);
        let m = fs::metadata(&s).unwrap();
        log.push(format!(
            "sparse size {} small {}",
            m.size(),
            m.blocks() <= 64
        ));
        let mut h = File::open(&s).unwrap();
        let mut buf = vec![1u8; 8192];
        h.seek(SeekFrom::Start(50 << 20)).unwrap();
        h.read_exact(&mut buf).unwrap();
        log.push(format!("hole zero {}", buf.iter().all(|&b| b == 0)));
        // read past EOF
        h.seek(SeekFrom::Start((100 << 20) + 1)).unwrap();
        log.push(format!("eof read {}", h.read(&mut buf).unwrap()));
        log.push(format!(
            "truncate dir {}",
            errno(OpenOptions::new().write(true).open(d))
        ));
    });
}

#[test]
fn xattrs_match_ext4() {
    differential("xattr", |d, log| {
        let f = d.join("f");
        fs::write(&f, b"x").unwrap();
        let c = cstr(&f);
        let set = |n: &str, v: &[u8], fl: i32| {
            let n = std::ffi::CString::new(n).unwrap();
            // SAFETY: valid pointers and lengths.
            sys(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), fl) })
        };
        let get = |n: &str, size: usize| -> String {
            let n = std::ffi::CString::new(n).unwrap();
            let mut buf = vec![0u8; size];
            // SAFETY: valid pointers and lengths.
            let r =
                unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
            if r < 0 {
                format!(
                    "err={}",
                    std::io::Error::last_os_error().raw_os_error().unwrap()
                )
            } else {
                format!(
                    "{r} {:?}",
                    String::from_utf8_lossy(&buf[..(r as usize).min(size)])
                )
            }
        };
        log.push(format!("set {}", set("user.a", b"alpha", 0)));
        log.push(format!(
            "create dup {}",
            set("user.a", b"x", libc::XATTR_CREATE)
        ));
        log.push(format!(
            "replace missing {}",
            set("user.b", b"x", libc::XATTR_REPLACE)
        ));
        log.push(format!(
            "replace {}",
            set("user.a", b"beta", libc::XATTR_REPLACE)
        ));
        log.push(format!("set b {}", set("user.b", b"", 0)));
        log.push(get("user.a", 100));
        log.push(get("user.a", 0));
        log.push(get("user.a", 2));
        log.push(get("user.b", 10));
        log.push(get("user.zz", 10));
        let mut buf = vec![0u8; 100];
        // SAFETY: valid pointers.
        let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), 100) };
        let mut names: Vec<_> = buf[..n.max(0) as usize]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty() && s.starts_with(b"user."))
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        names.sort();
        log.push(format!("list {names:?}"));
        let n = std::ffi::CString::new("user.a").unwrap();
        // SAFETY: valid pointers.
        log.push(format!(
            "remove {}",
            sys(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
        ));
        // SAFETY: valid pointers.
        log.push(format!(
            "remove again {}",
            sys(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
        ));
        log.push(get("user.a", 10));
        log.push(format!(
            "big value {}",
            set("user.big", &vec![7u8; 4000], 0)
        ));
        log.push(get("user.big", 0));
    });
}

#[test]
fn permissions_are_checked_for_other_users() {
    if !root_for("switch users") {
        return;
    }
    differential("perms", |d, log| {
        use std::os::unix::process::CommandExt;
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        let f = d.join("secret");
        fs::write(&f, b"s").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        let pubf = d.join("public");
        fs::write(&pubf, b"p").unwrap();
        fs::set_permissions(&pubf, fs::Permissions::from_mode(0o644)).unwrap();
        let run = |args: &[&str]| {
            let st = std::process::Command::new(args[0])
                .args(&args[1..])
                .uid(65534)
                .gid(65534)
                .stderr(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            st.code().unwrap_or(-1)
        };
        let s = |p: &Path| p.to_str().unwrap().to_string();
        log.push(format!("cat secret {}", run(&["cat", &s(&f)])));
        log.push(format!("cat public {}", run(&["cat", &s(&pubf)])));
        log.push(format!(
            "write public {}",
            run(&["sh", "-c", &format!("echo x >> {}", s(&pubf))])
        ));
        log.push(format!(
            "create in dir {}",
            run(&["touch", &s(&d.join("new"))])
        ));
        log.push(format!(
            "chmod not owner {}",
            run(&["chmod", "777", &s(&pubf)])
        ));
        log.push(format!("rm not owner {}", run(&["rm", "-f", &s(&pubf)])));
        fs::set_permissions(d, fs::Permissions::from_mode(0o1777)).unwrap();
        log.push(format!("sticky rm {}", run(&["rm", "-f", &s(&pubf)])));
        log.push(format!(
            "own file in sticky {}",
            run(&["sh", "-c", &format!("touch {0}/mine && rm {0}/mine", s(d))])
        ));
        log.push(ls(d));
    });
}

#[test]
fn open_file_survives_unlink_until_last_close() {
    let Some(m) = mount() else { return };
    let p = m.path("f");
    fs::write(&p, pattern(3, 300_000)).unwrap();
    let mut h = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert_eq!(errno(fs::metadata(&p)), libc::ENOENT);
    let mut buf = Vec::new();
    h.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, pattern(3, 300_000));
    h.write_all(b"tail").unwrap();
    h.seek(SeekFrom::Start(299_998)).unwrap();
    let mut t = [0u8; 6];
    h.read_exact(&mut t).unwrap();
    assert_eq!(&t[2..], b"tail");
    assert_eq!(h.metadata().unwrap().nlink(), 0);
    drop(h);
    // RELEASE reaches the daemon asynchronously after close(2).
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Last close frees the inode and, after the sweep at unmount, its blocks.
    let mut m = m;
    m.unmount();
    let (kv, _) = kvfs::store::open(&m.store).unwrap();
    let mut blocks = 0;
    let (s, e) = kvfs::keyspace::Prefix::Block.range();
    kv.for_each(kvfs::kv::Cf::Blocks, &s, &e, |_, _| {
        blocks += 1;
        true
    })
    .unwrap();
    assert_eq!(blocks, 0, "blocks of the unlinked file were not freed");
}

#[test]
fn statfs_reports_real_figures() {
    let Some(m) = mount() else { return };
    fs::write(m.path("f"), pattern(9, 1 << 20)).unwrap();
    let c = cstr(&m.mnt);
    // SAFETY: valid pointer, zeroed out-struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(sys(unsafe { libc::statvfs(c.as_ptr(), &mut s) }), 0);
    let mut host: libc::statvfs = unsafe { std::mem::zeroed() };
    let hc = cstr(&m.store);
    assert_eq!(sys(unsafe { libc::statvfs(hc.as_ptr(), &mut host) }), 0);
    assert_eq!(s.f_namemax, 255);
    assert!(
        s.f_blocks > s.f_bfree,
        "used space must show: {} {}",
        s.f_blocks,
        s.f_bfree
    );
    // Available is the disk's, less the reserve new data may not take (as ext4's root-reserved
    // blocks); free is the disk's.
    let ours = s.f_bavail * s.f_frsize;
    let theirs = host.f_bavail * host.f_frsize;
    let reserve = kvfs::fs::disk_space(&m.store).unwrap().reserve();
    let want = theirs.saturating_sub(reserve);
    assert!(
        ours.abs_diff(want) < (64 << 20),
        "available {ours} vs disk {theirs} less reserve {reserve}"
    );
    let free = s.f_bfree * s.f_frsize;
    assert!(
        free.abs_diff(theirs) < (64 << 20),
        "free {free} vs disk {theirs}"
    );
    assert!(s.f_files > 0 && s.f_ffree > 0);
}
