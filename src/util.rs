//! Small helpers shared by every layer: a fast thread-local random source (jitter, shard
//! choice, mount ids) and wall-clock timestamps in the form records store.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The latest time the kernel stamped on a file and pushed to us (ns since the epoch); see
/// [`Timestamp::now`].
static FLOOR: AtomicI64 = AtomicI64::new(i64::MIN);

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    u64::from_le_bytes(b) ^ t ^ 0x9E37_79B9_7F4A_7C15
}

/// xorshift64*: not cryptographic, only for jitter and spreading load.
pub fn rand_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get() | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A point in time as stored in records: seconds and nanoseconds since the epoch.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

impl Timestamp {
    /// Now, by the clock the kernel stamps file times with: the coarse realtime clock (one
    /// tick, a few ms, behind the precise one), never earlier than a time the kernel pushed
    /// ([`Timestamp::observe`]; its stamps may run a little ahead of the coarse clock). With
    /// the writeback cache the kernel stamps some times itself (a write's mtime, a link's
    /// ctime) and the daemon the others: one clock keeps them in order, as on ext4.
    pub fn now() -> Timestamp {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill; the clock exists on every Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        let t = Timestamp {
            secs: ts.tv_sec,
            nsecs: ts.tv_nsec as u32,
        };
        let floor = FLOOR.load(Ordering::Relaxed);
        if floor > t.nanos() {
            Timestamp::from_nanos(floor)
        } else {
            t
        }
    }

    /// The kernel stamped `t` as its "now" (a ctime it pushed): later times are not earlier.
    /// Ignored unless within a second ahead of our clock (the kernel's lead is a tick).
    pub fn observe(t: Timestamp) {
        let n = t.nanos();
        let ours = Timestamp::now().nanos();
        if n > ours && n - ours < 1_000_000_000 {
            FLOOR.fetch_max(n, Ordering::Relaxed);
        }
    }

    pub fn nanos(self) -> i64 {
        self.secs
            .saturating_mul(1_000_000_000)
            .saturating_add(self.nsecs as i64)
    }

    fn from_nanos(n: i64) -> Timestamp {
        Timestamp {
            secs: n.div_euclid(1_000_000_000),
            nsecs: n.rem_euclid(1_000_000_000) as u32,
        }
    }

    pub fn from_system(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nsecs: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Timestamp {
                        secs: -(d.as_secs() as i64),
                        nsecs: 0,
                    }
                } else {
                    Timestamp {
                        secs: -(d.as_secs() as i64) - 1,
                        nsecs: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        use std::time::Duration;
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsecs)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nsecs as u64)
        }
    }
}

/// Lock `m`, taking over a lock whose holder panicked: that panic is a bug reported where it
/// happened, and the filesystem keeps serving.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A size such as `64K`, `256M`, `1G` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1u64 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1u64 << 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 1u64 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_follows_the_kernels_clock_and_never_goes_back_past_a_pushed_time() {
        let before = Timestamp::from_system(SystemTime::now());
        let t = Timestamp::now();
        // The coarse clock is at most a tick behind the precise one.
        assert!(t <= before || t.nanos() - before.nanos() < 1_000_000);
        assert!(
            before.nanos() - t.nanos() < 100_000_000,
            "{t:?} vs {before:?}"
        );
        let ahead = Timestamp::from_nanos(t.nanos() + 50_000_000);
        Timestamp::observe(ahead);
        assert!(Timestamp::now() >= ahead);
        // Far ahead (a bogus pushed time) is not taken.
        Timestamp::observe(Timestamp::from_nanos(t.nanos() + 3_600_000_000_000));
        assert!(Timestamp::now().nanos() < t.nanos() + 1_000_000_000);
    }

    #[test]
    fn timestamps_round_trip_before_and_after_epoch() {
        for (s, n) in [
            (0i64, 0u32),
            (1_700_000_000, 123_456_789),
            (-1, 500),
            (-10, 0),
        ] {
            let t = Timestamp { secs: s, nsecs: n };
            assert_eq!(Timestamp::from_system(t.to_system()), t);
            assert_eq!(Timestamp::from_nanos(t.nanos()), t);
        }
    }
}
