//! Moments as users write them (`--at`) and as kvfs shows them. A moment is nanoseconds
//! since the Unix epoch (u64).
//!
//! Accepted: `2026-11-28 14:00` or `2026-11-28 14:00:05.25` or `2026-11-28` (local time),
//! RFC 3339 (`2026-11-28T14:00:05.250Z`, `...+01:00`), `@1764338405.25` (Unix seconds),
//! `-2h` (a span before now: s, m, h, d, w), `now`.

use std::time::Duration;

const NS: u64 = 1_000_000_000;

/// A span such as `7d`, `12h`, `90m`, `30s`, `2w`, or `0`.
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("{s:?}: a span such as 7d, 12h, 90m, 30s, 2w (or 0)");
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        'w' => 7 * 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs)
        .filter(|t| *t < 200 * 365 * 86400)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// The moment `s` names, `now` being now.
pub fn parse(s: &str, now: u64) -> Result<u64, String> {
    let s = s.trim();
    let bad = |why: &str| {
        format!("{s:?}: {why} (use '2026-11-28 14:00' local time, RFC 3339, '@SECONDS' or '-2h')")
    };
    if s == "now" {
        return Ok(now);
    }
    if let Some(rest) = s.strip_prefix('-') {
        let d = parse_span(rest).map_err(|e| bad(&e))?;
        return now
            .checked_sub(d.as_nanos() as u64)
            .ok_or_else(|| bad("before 1970"));
    }
    if let Some(rest) = s.strip_prefix('@') {
        let (secs, frac) = rest.split_once('.').unwrap_or((rest, ""));
        let secs: u64 = secs.parse().map_err(|_| bad("seconds expected"))?;
        return secs
            .checked_mul(NS)
            .and_then(|n| n.checked_add(fraction(frac).ok()?))
            .ok_or_else(|| bad("out of range"));
    }
    date_time(s).ok_or_else(|| bad("not a moment"))
}

/// `.250` → 250_000_000 ns (at most 9 digits).
fn fraction(f: &str) -> Result<u64, ()> {
    if f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    let mut n = 0u64;
    for (i, b) in f.bytes().enumerate() {
        n += (b - b'0') as u64 * 10u64.pow(8 - i as u32);
    }
    Ok(n)
}

fn num(s: &str, len: usize) -> Option<i64> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn date_time(s: &str) -> Option<u64> {
    let (date, rest) = match s.find([' ', 'T', 't']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut d = date.split('-');
    let (y, mo, da) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let (mut h, mut mi, mut sec, mut ns, mut offset) = (0, 0, 0, 0u64, None);
    if let Some(rest) = rest {
        // The zone: Z, +HH:MM or -HH:MM at the end.
        let (time, zone) = if let Some(t) = rest.strip_suffix(['Z', 'z']) {
            (t, Some(0i64))
        } else if rest.len() > 6 && matches!(rest.as_bytes()[rest.len() - 6], b'+' | b'-') {
            let (t, z) = rest.split_at(rest.len() - 6);
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (zh, zm) = z[1..].split_once(':')?;
            (t, Some(sign * (num(zh, 2)? * 3600 + num(zm, 2)? * 60)))
        } else {
            (rest, None)
        };
        offset = zone;
        let mut p = time.split(':');
        h = num(p.next()?, 2)?;
        mi = num(p.next()?, 2)?;
        if let Some(sf) = p.next() {
            let (s, f) = sf.split_once('.').unwrap_or((sf, ""));
            sec = num(s, 2)?;
            ns = fraction(f).ok()?;
        }
        if p.next().is_some() || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
    }
    let secs = match offset {
        Some(off) => {
            days_from_civil(y, mo as u32, da as u32) * 86400 + h * 3600 + mi * 60 + sec - off
        }
        None => local(y, mo, da, h, mi, sec)?,
    };
    u64::try_from(secs).ok()?.checked_mul(NS)?.checked_add(ns)
}

/// Local time to Unix seconds (the machine's zone, daylight saving as it applies then).
fn local(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    // SAFETY: a zeroed tm is valid; mktime only reads and normalizes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = (y - 1900) as i32;
    tm.tm_mon = (mo - 1) as i32;
    tm.tm_mday = d as i32;
    tm.tm_hour = h as i32;
    tm.tm_min = mi as i32;
    tm.tm_sec = s as i32;
    tm.tm_isdst = -1;
    // SAFETY: tm is a valid, initialized struct.
    let t = unsafe { libc::mktime(&mut tm) };
    (t != -1).then_some(t)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// RFC 3339 in UTC, with the fraction when there is one: `2026-11-28T14:00:05.25Z`.
pub fn show(at: u64) -> String {
    let secs = (at / NS) as i64;
    let ns = at % NS;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let t = secs.rem_euclid(86400);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    );
    if ns > 0 {
        let f = format!("{ns:09}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_parse_and_show() {
        let now = 1_764_338_405 * NS + 250_000_000;
        assert_eq!(show(now), "2025-11-28T14:00:05.25Z");
        assert_eq!(parse("2025-11-28T14:00:05.250Z", 0), Ok(now));
        assert_eq!(parse("@1764338405.25", 0), Ok(now));
        assert_eq!(parse("2025-11-28T15:00:05.25+01:00", 0), Ok(now));
        assert_eq!(parse("-2h", now), Ok(now - 7200 * NS));
        assert_eq!(parse("now", now), Ok(now));
        for bad in [
            "yesterday",
            "2025-13-01",
            "2025-11-28 25:00",
            "@x",
            "-2y",
            "@1.1234567891",
        ] {
            assert!(parse(bad, now).is_err(), "{bad}");
        }
        // Local time: whatever the zone, the parse and the zone's offset agree.
        let l = parse("2025-11-28 14:00", 0).unwrap();
        let u = parse("2025-11-28T14:00:00Z", 0).unwrap();
        assert!(l.abs_diff(u) <= 14 * 3600 * NS);
        assert_eq!(parse("2025-11-28", 0), parse("2025-11-28 00:00:00", 0));
        for d in [-800_000i64, -1, 0, 59, 60, 365, 11_016, 20_420, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(parse_span("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_span("0"), Ok(Duration::ZERO));
        assert!(parse_span("7").is_err() && parse_span("d").is_err());
    }
}
