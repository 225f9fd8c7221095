//! `kvfs bench-encodings`: how fast each block encoding encodes and decodes (with the SHA-256
//! check a read does) and how much it saves, on the caller's own data. Used to choose the
//! defaults recorded in keyspace.md.

use std::path::Path;
use std::time::Instant;

use crate::blocks::{self, encode, Codec};
use crate::keyspace::records::{COMP_LZ4, COMP_NONE, COMP_ZSTD};

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub content_bytes: u64,
    pub stored_bytes: u64,
    pub encode_mb_s: f64,
    pub decode_mb_s: f64,
}

fn collect(p: &Path, out: &mut Vec<u8>, limit: usize) {
    if out.len() >= limit {
        return;
    }
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return;
    };
    if md.is_dir() {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for n in names {
            collect(&n, out, limit);
        }
    } else if md.is_file() {
        if let Ok(b) = std::fs::read(p) {
            let room = limit - out.len();
            out.extend_from_slice(&b[..b.len().min(room)]);
        }
    }
}

/// Concatenate up to `limit` bytes of the files under `paths` (directories walked in name
/// order): the sample the table is measured on.
pub fn sample(paths: &[&Path], limit: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for p in paths {
        collect(p, &mut v, limit);
    }
    v
}

/// Measure every codec on `data` cut into `block_size` slots.
pub fn run(data: &[u8], block_size: usize) -> Vec<Row> {
    let mut codecs = vec![("plain", COMP_NONE, 0)];
    codecs.push(("lz4", COMP_LZ4, 0));
    codecs.push(("zstd:1", COMP_ZSTD, 1));
    codecs.push(("zstd:3", COMP_ZSTD, 3));
    let mut rows = Vec::new();
    for parity in [false, true] {
        for (name, compression, level) in &codecs {
            let c = Codec {
                compression: *compression,
                level: *level,
                parity,
            };
            let t0 = Instant::now();
            let mut stored = Vec::new();
            let mut content = 0u64;
            for slot in data.chunks(block_size) {
                if let Some(p) = blocks::prepare(slot, &c) {
                    content += p.len as u64;
                    stored.push(p);
                }
            }
            let enc = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for p in &stored {
                // A read: decode and verify against the name.
                let _ = encode::decode(&p.encoded.value, &p.hash, p.len);
            }
            let dec = t1.elapsed().as_secs_f64();
            let mb = content as f64 / 1e6;
            rows.push(Row {
                name: if parity {
                    format!("{name}+parity")
                } else {
                    name.to_string()
                },
                content_bytes: content,
                stored_bytes: stored.iter().map(|p| p.encoded.value.len() as u64).sum(),
                encode_mb_s: mb / enc.max(1e-9),
                decode_mb_s: mb / dec.max(1e-9),
            });
        }
    }
    rows
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| encoding | stored / content | hash+encode MB/s | decode+verify MB/s |\n| --- | --- | --- | --- |\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.3} | {:.0} | {:.0} |\n",
            r.name,
            r.stored_bytes as f64 / r.content_bytes.max(1) as f64,
            r.encode_mb_s,
            r.decode_mb_s
        ));
    }
    s
}

/// Rates of the metadata phases of `tools/bench`, in operations per second.
#[derive(Clone, Debug)]
pub struct MetaRates {
    pub create: f64,
    pub stat: f64,
    pub unlink: f64,
    pub mkdir: f64,
    pub rmdir: f64,
}

/// Ask the kernel to drop its page, dentry and inode caches (root only; otherwise a no-op),
/// so the next stat of each file goes to the filesystem.
pub fn drop_caches() {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Apply `op` to every path; the rate per second.
fn rate(
    paths: &[std::path::PathBuf],
    op: impl Fn(&Path) -> std::io::Result<()>,
) -> std::io::Result<f64> {
    let t = Instant::now();
    for p in paths {
        op(p)?;
    }
    Ok(paths.len() as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// Create, stat (after dropping caches) and unlink `files` empty files in one directory under
/// `dir`, then mkdir and rmdir `dirs` directories.
pub fn meta(dir: &Path, files: usize, dirs: usize) -> std::io::Result<MetaRates> {
    let d = dir.join("meta");
    std::fs::create_dir_all(&d)?;
    let names: Vec<_> = (0..files).map(|i| d.join(format!("f{i:06}"))).collect();
    let create = rate(&names, |p| std::fs::File::create(p).map(drop))?;
    drop_caches();
    let stat = rate(&names, |p| std::fs::symlink_metadata(p).map(drop))?;
    let unlink = rate(&names, |p| std::fs::remove_file(p))?;
    let dnames: Vec<_> = (0..dirs).map(|i| d.join(format!("d{i:06}"))).collect();
    let mkdir = rate(&dnames, |p| std::fs::create_dir(p))?;
    let rmdir = rate(&dnames, |p| std::fs::remove_dir(p))?;
    std::fs::remove_dir(&d)?;
    Ok(MetaRates {
        create,
        stat,
        unlink,
        mkdir,
        rmdir,
    })
}
