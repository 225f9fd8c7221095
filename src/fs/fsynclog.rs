//! The fsync log: where an fsync on a mount alone with its store writes its pending records
//! (the `journal` module) when RocksDB holds nothing unsynced, so that the fsync costs one
//! overwrite of a preallocated file and its fdatasync instead of a transaction and a sync of
//! RocksDB's WAL, an append whose fdatasync also writes the WAL file's inode (fio's 4 KiB
//! writes with fsync after each: the WAL sync was 198 of an fsync's 218 us at the median,
//! the plain directory's whole fsync 98). Byte layout: keyspace.md, "The fsync log".
//!
//! A record here is in force until the commit of its block, which writes the block's `j`
//! key (the sequence number below which its records are in the block) in its transaction;
//! the log starts over (a new generation) only when no buffered block holds a record of it
//! and RocksDB was synced after the last commit that took one in.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_64;

use crate::util::lock;

/// The log's file in the store's directory.
pub const LOG_NAME: &str = "fsync.journal";
/// Its size, written with zeros when it is made: every later write is an overwrite.
pub const LOG_BYTES: u64 = 8 << 20;
/// Two header slots (a reset writes the one the last did not), then frames from `FRAMES`.
const SLOT: u64 = 512;
const FRAMES: u64 = 4096;
const MAGIC: &[u8; 8] = b"KVFSFLOG";
const VERSION: u32 = 1;
const HEADER: usize = 32;
const FRAME_MAGIC: u32 = 0x4b46_4a52;
const FRAME_HEAD: usize = 24;
/// ino, block number, seq, value length.
const RECORD_HEAD: usize = 28;

/// One record: a `J` value (`PendingWrite`) and where it belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub ino: u64,
    pub bn: u64,
    pub seq: u64,
    pub value: Vec<u8>,
}

pub struct FsyncLog {
    file: File,
    state: Mutex<State>,
}

struct State {
    gen: u64,
    /// Where the next frame goes.
    at: u64,
    /// A write or sync failed: no frames until a reset succeeds (its bytes are unknown).
    broken: bool,
}

impl FsyncLog {
    /// Open the log in `dir`, making it if missing, and read the records of its current
    /// generation, in the order written.
    pub fn open(dir: &Path) -> io::Result<(FsyncLog, Vec<LogRecord>)> {
        let path = dir.join(LOG_NAME);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => make(dir)?,
            Err(e) => return Err(e),
        };
        let (gen, recs, used) = read(&file, &path)?;
        let log = FsyncLog {
            file,
            state: Mutex::new(State {
                gen,
                at: FRAMES + used as u64,
                broken: false,
            }),
        };
        Ok((log, recs))
    }

    /// Append the records of `ino` (block number, seq, value each) as one frame and sync
    /// it. Ok(false): no room, or the log is broken; the caller records them another way.
    pub fn append(&self, ino: u64, recs: &[(u64, u64, Vec<u8>)]) -> io::Result<bool> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(recs.len() as u32).to_le_bytes());
        for (bn, seq, value) in recs {
            payload.extend_from_slice(&ino.to_le_bytes());
            payload.extend_from_slice(&bn.to_le_bytes());
            payload.extend_from_slice(&seq.to_le_bytes());
            payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
            payload.extend_from_slice(value);
        }
        let mut s = lock(&self.state);
        let end = s.at + (FRAME_HEAD + payload.len()) as u64;
        if s.broken || end > LOG_BYTES {
            return Ok(false);
        }
        let frame = frame(s.gen, &payload);
        let r = self
            .file
            .write_all_at(&frame, s.at)
            .and_then(|_| self.file.sync_data());
        match r {
            Ok(()) => {
                s.at = end;
                Ok(true)
            }
            Err(e) => {
                s.broken = true;
                Err(e)
            }
        }
    }

    /// The bytes of the frames written since the last reset (all of it once broken).
    pub fn used(&self) -> u64 {
        let s = lock(&self.state);
        if s.broken {
            LOG_BYTES
        } else {
            s.at - FRAMES
        }
    }

    /// Start a new generation if `quiet()` holds under the log's lock (no frame can be
    /// appended meanwhile): the old frames are no longer read. Returns whether it did.
    pub fn reset_if(&self, quiet: impl FnOnce() -> bool) -> io::Result<bool> {
        let mut s = lock(&self.state);
        if !quiet() {
            return Ok(false);
        }
        let gen = s.gen + 1;
        self.file
            .write_all_at(&header(gen), (gen % 2) * SLOT)
            .and_then(|_| self.file.sync_data())?;
        *s = State {
            gen,
            at: FRAMES,
            broken: false,
        };
        Ok(true)
    }
}

/// How many records the log in `dir` holds (none if there is no log), without changing it:
/// for `kvfs audit`, which may run while the store is mounted.
pub fn records_in(dir: &Path) -> io::Result<usize> {
    Ok(read_records(dir)?.len())
}

/// The records of the fsync log in `dir`, read only (none if there is no log).
pub(super) fn read_records(dir: &Path) -> io::Result<Vec<LogRecord>> {
    let path = dir.join(LOG_NAME);
    match File::open(&path) {
        Ok(f) => Ok(read(&f, &path)?.1),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The current generation, its records and the bytes their frames take.
fn read(file: &File, path: &Path) -> io::Result<(u64, Vec<LogRecord>, usize)> {
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let len = file.metadata()?.len();
    if len < LOG_BYTES {
        return Err(bad(format!("{len} bytes, not {LOG_BYTES}")));
    }
    let mut head = vec![0u8; FRAMES as usize];
    file.read_exact_at(&mut head, 0)?;
    let gen = [0, SLOT as usize]
        .iter()
        .filter_map(|&o| parse_header(&head[o..o + HEADER]))
        .max()
        .ok_or_else(|| bad("no valid header".into()))?;
    let mut body = vec![0u8; (LOG_BYTES - FRAMES) as usize];
    file.read_exact_at(&mut body, FRAMES)?;
    let (recs, used) = scan(&body, gen);
    Ok((gen, recs, used))
}

/// A new log: zeros (so that no write to it allocates), generation 1, synced with its name.
fn make(dir: &Path) -> io::Result<File> {
    let tmp = dir.join(format!("{LOG_NAME}.new"));
    make_at(dir, &tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn make_at(dir: &Path, tmp: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < LOG_BYTES {
        f.write_all_at(&zeros, at)?;
        at += zeros.len() as u64;
    }
    f.write_all_at(&header(1), SLOT)?;
    f.sync_all()?;
    std::fs::rename(tmp, dir.join(LOG_NAME))?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

fn header(gen: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&gen.to_le_bytes());
    let sum = xxh3_64(&h);
    h.extend_from_slice(&sum.to_le_bytes());
    h
}

/// The generation of a valid header slot.
fn parse_header(h: &[u8]) -> Option<u64> {
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
    (h.len() == HEADER
        && &h[..8] == MAGIC
        && h[8..12] == VERSION.to_le_bytes()
        && u64_at(24) == xxh3_64(&h[..24]))
    .then(|| u64_at(16))
}

fn frame(gen: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEAD + payload.len());
    f.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&gen.to_le_bytes());
    f.extend_from_slice(&frame_sum(gen, payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn frame_sum(gen: u64, payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&gen.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.digest()
}

/// The records of the frames of generation `gen` from the start of `body`, up to the first
/// that is not one (torn, of an older generation, or zeros), and the bytes they take.
fn scan(body: &[u8], gen: u64) -> (Vec<LogRecord>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = body.get(at..at + FRAME_HEAD) {
        let u32_at =
            |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at =
            |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let len = u32_at(head, 4) as usize;
        let Some(payload) = body.get(at + FRAME_HEAD..at + FRAME_HEAD + len) else {
            break;
        };
        if u32_at(head, 0) != FRAME_MAGIC
            || u64_at(head, 8) != gen
            || u64_at(head, 16) != frame_sum(gen, payload)
        {
            break;
        }
        let Some(recs) = parse_payload(payload) else {
            // A frame whose sum holds but whose records do not parse: written by another
            // build; nothing after it is trusted either.
            tracing::error!(
                offset = FRAMES as usize + at,
                "fsync log: a frame does not parse"
            );
            break;
        };
        out.extend(recs);
        at += FRAME_HEAD + len;
    }
    (out, at)
}

fn parse_payload(p: &[u8]) -> Option<Vec<LogRecord>> {
    let n = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
    let mut at = 4;
    let mut out = Vec::new();
    for _ in 0..n {
        let h = p.get(at..at + RECORD_HEAD)?;
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
        let vlen = u32::from_le_bytes(h[24..28].try_into().ok()?) as usize;
        let value = p.get(at + RECORD_HEAD..at + RECORD_HEAD + vlen)?.to_vec();
        out.push(LogRecord {
            ino: u64_at(0),
            bn: u64_at(8),
            seq: u64_at(16),
            value,
        });
        at += RECORD_HEAD + vlen;
    }
    (at == p.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, len: usize) -> LogRecord {
        LogRecord {
            ino: 7,
            bn: seq % 3,
            seq,
            value: vec![seq as u8; len],
        }
    }

    /// Append records of inode 7 as one frame.
    fn append(log: &FsyncLog, recs: &[LogRecord]) -> bool {
        let parts: Vec<_> = recs
            .iter()
            .map(|r| (r.bn, r.seq, r.value.clone()))
            .collect();
        log.append(7, &parts).unwrap()
    }

    #[test]
    fn frames_come_back_in_order_until_a_reset() {
        let d = tempfile::tempdir().unwrap();
        let (log, recs) = FsyncLog::open(d.path()).unwrap();
        assert!(recs.is_empty() && log.used() == 0);
        assert!(append(&log, &[rec(1, 10), rec(2, 0)]));
        assert!(append(&log, &[rec(3, 4000)]));
        drop(log);
        let (log, recs) = FsyncLog::open(d.path()).unwrap();
        assert_eq!(recs, vec![rec(1, 10), rec(2, 0), rec(3, 4000)]);
        assert!(log.used() > 0);
        // Appends go after what was found.
        assert!(append(&log, &[rec(4, 1)]));
        assert!(!log.reset_if(|| false).unwrap());
        assert!(log.reset_if(|| true).unwrap());
        assert_eq!(log.used(), 0);
        assert!(append(&log, &[rec(5, 3)]));
        drop(log);
        // The new generation's frame only: the old ones after it are not read.
        let (log, recs) = FsyncLog::open(d.path()).unwrap();
        assert_eq!(recs, vec![rec(5, 3)]);
        // Two resets: both header slots written in turn.
        assert!(log.reset_if(|| true).unwrap() && log.reset_if(|| true).unwrap());
        drop(log);
        assert!(FsyncLog::open(d.path()).unwrap().1.is_empty());
    }

    #[test]
    fn a_torn_or_damaged_frame_ends_the_log() {
        let d = tempfile::tempdir().unwrap();
        let (log, _) = FsyncLog::open(d.path()).unwrap();
        for s in 1..=3 {
            assert!(append(&log, &[rec(s, 100)]));
        }
        drop(log);
        // Flip a byte of the second frame's payload.
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join(LOG_NAME))
            .unwrap();
        let second = FRAMES + (FRAME_HEAD + 4 + RECORD_HEAD + 100) as u64;
        f.write_all_at(&[0xee], second + FRAME_HEAD as u64 + 40)
            .unwrap();
        let (_, recs) = FsyncLog::open(d.path()).unwrap();
        assert_eq!(recs, vec![rec(1, 100)]);
    }

    #[test]
    fn a_full_log_says_so() {
        let d = tempfile::tempdir().unwrap();
        let (log, _) = FsyncLog::open(d.path()).unwrap();
        let big = rec(1, 1 << 20);
        let mut n = 0;
        while append(&log, std::slice::from_ref(&big)) {
            n += 1;
        }
        let frame = (FRAME_HEAD + 4 + RECORD_HEAD + (1 << 20)) as u64;
        assert_eq!(n, (LOG_BYTES - FRAMES) / frame);
        assert!(log.reset_if(|| true).unwrap());
        assert!(append(&log, &[big]));
    }

    #[test]
    fn payloads_that_do_not_add_up_are_refused() {
        assert!(parse_payload(&[]).is_none());
        assert!(parse_payload(&1u32.to_le_bytes()).is_none());
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; RECORD_HEAD]);
        assert_eq!(parse_payload(&p).map(|r| r.len()), Some(1));
        p.push(0);
        assert!(parse_payload(&p).is_none());
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 24]);
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_payload(&p).is_none());
    }
}
