//! POSIX ACLs against a plain ext4 directory: an access ACL sets the mode, chmod rewrites the
//! ACL, an ACL the mode says all of is not stored, default ACLs are inherited (instead of the
//! umask), setgid is cleared for a setter outside the group, and the kernel enforces a named
//! user's entry.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

const ACCESS: &str = "system.posix_acl_access";
const DEFAULT: &str = "system.posix_acl_default";

/// An ACL xattr value from (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const USER_OBJ: u16 = 1;
const USER: u16 = 2;
const GROUP_OBJ: u16 = 4;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

fn set(p: &Path, name: &str, v: &[u8]) -> i32 {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(cstr(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    sys(r)
}

fn get(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::getxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// In a child that is uid 1000, gid 1001 and in no other group: set `p`'s access ACL
/// (0 or the errno), and whether reading `q` works.
fn as_user(p: &Path, v: &[u8], q: &Path) -> (i32, bool) {
    let (cp, cq) = (cstr(p), cstr(q));
    let n = std::ffi::CString::new(ACCESS).unwrap();
    // SAFETY: the child makes only raw system calls and leaves with _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(1001) == 0
                && libc::setuid(1000) == 0;
            if !ok {
                libc::_exit(100);
            }
            let r = libc::setxattr(cp.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0);
            let e = if r == 0 { 0 } else { *libc::__errno_location() };
            let fd = libc::open(cq.as_ptr(), libc::O_RDONLY);
            libc::_exit(e.min(99) + if fd >= 0 { 0 } else { 128 });
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        let code = libc::WEXITSTATUS(st);
        assert_ne!(code, 100, "the child could not become uid 1000");
        (code & 127, code & 128 == 0)
    }
}

/// Everything the case observes, in order.
fn acl_case(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let f = dir.join("f");
    fs::write(&f, b"data").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    let named = acl(&[
        (USER_OBJ, 7, 0),
        (USER, 4, 1000),
        (GROUP_OBJ, 5, 0),
        (MASK, 6, 0),
        (OTHER, 0, 0),
    ]);
    out.push(format!("set named: {}", set(&f, ACCESS, &named)));
    out.push(format!("mode after the ACL: {:o}", mode(&f)));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o604)).unwrap();
    out.push(format!("ACL after chmod 604: {:?}", get(&f, ACCESS)));
    let plain = acl(&[(USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 0, 0)]);
    out.push(format!("set mode-only: {}", set(&f, ACCESS, &plain)));
    out.push(format!(
        "mode-only ACL: {:?}, mode {:o}",
        get(&f, ACCESS),
        mode(&f)
    ));
    out.push(format!("bad ACL: {}", set(&f, ACCESS, &named[..10])));
    // Inheritance.
    let d = dir.join("d");
    fs::create_dir(&d).unwrap();
    let def = acl(&[
        (USER_OBJ, 7, 0),
        (USER, 7, 1000),
        (GROUP_OBJ, 5, 0),
        (MASK, 7, 0),
        (OTHER, 0, 0),
    ]);
    out.push(format!("set default: {}", set(&d, DEFAULT, &def)));
    out.push(format!("default on a file: {}", set(&f, DEFAULT, &def)));
    let nf = d.join("new");
    fs::write(&nf, b"x").unwrap();
    out.push(format!(
        "inherited file: {:o} {:?}",
        mode(&nf),
        get(&nf, ACCESS)
    ));
    fs::create_dir(d.join("sub")).unwrap();
    let sub = d.join("sub");
    out.push(format!(
        "inherited dir: {:o} {:?} {:?}",
        mode(&sub),
        get(&sub, ACCESS),
        get(&sub, DEFAULT)
    ));
    std::os::unix::fs::symlink("new", d.join("ln")).unwrap();
    out.push(format!(
        "symlink: {:o}",
        fs::symlink_metadata(d.join("ln")).unwrap().mode() & 0o7777
    ));
    // The kernel enforces the named entry: uid 1000 reads a file others may not.
    let secret = dir.join("secret");
    fs::write(&secret, b"s").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let reader = acl(&[
        (USER_OBJ, 6, 0),
        (USER, 4, 1000),
        (GROUP_OBJ, 0, 0),
        (MASK, 4, 0),
        (OTHER, 0, 0),
    ]);
    let g = dir.join("g");
    fs::write(&g, b"g").unwrap();
    // SAFETY: valid C path.
    assert_eq!(
        sys(unsafe { libc::chown(cstr(&g).as_ptr(), 1000, 1000) }),
        0
    );
    fs::set_permissions(&g, fs::Permissions::from_mode(0o2770)).unwrap();
    let before = as_user(&g, &plain, &secret);
    out.push(format!(
        "uid 1000 before the ACL: set {} read {}",
        before.0, before.1
    ));
    out.push(format!("set reader: {}", set(&secret, ACCESS, &reader)));
    let after = as_user(&g, &plain, &secret);
    out.push(format!(
        "uid 1000 after the ACL: set {} read {}",
        after.0, after.1
    ));
    // Set by its owner outside its group: setgid goes.
    out.push(format!("setgid file after the owner's ACL: {:o}", mode(&g)));
    out
}

#[test]
fn acls_behave_as_on_ext4() {
    if !root_for("change owners and switch users") {
        return;
    }
    let Some(m) = mount() else { return };
    let plain = plain_dir(&m);
    for d in [&m.mnt, &plain] {
        // SAFETY: valid C path; uid 1000 must reach the files.
        assert_eq!(sys(unsafe { libc::chmod(cstr(d).as_ptr(), 0o755) }), 0);
    }
    let want = acl_case(&plain);
    // The plain directory's disk must take ACLs for the comparison to mean anything.
    assert_eq!(want[0], "set named: 0", "{want:#?}");
    let got = acl_case(&m.mnt);
    assert_eq!(got, want);
}
