//! Settings kept in the store (`kvfs config STORE key=value`), so that they need not be
//! repeated on every mount; a mount option of the same name overrides them for that mount
//! (tiering's; `history` is the store's alone).
//! `M config` = `01` + postcard `Vec<(String, String)>`, sorted by key.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::keyspace::records::{decode_v1, encode_v1};
use crate::keyspace::{self as ks};
use crate::kv::{Cf, KvError, KvStore};
use crate::util::parse_size;

/// The settings there are, with what each takes.
pub const KEYS: &[(&str, &str)] = &[
    (
        "cache_size",
        "resident block bytes to stay under (a size: 10G; 0 or unset: no limit)",
    ),
    (
        "min_copies",
        "replicas that must hold a block before it is evicted (default 1)",
    ),
    (
        "fetch_timeout",
        "seconds a read waits for an evicted block from the replicas (default 10)",
    ),
    (
        "history",
        "keep every state for this long, for `mount --at` (7d, 12h, 30m; 0 or unset: off)",
    ),
];

/// Check `value` for `key`; the error says what is wrong.
pub fn check(key: &str, value: &str) -> Result<(), String> {
    match key {
        "cache_size" => parse_size(value).map(|_| ()),
        "min_copies" => match value.parse::<u32>() {
            Ok(1..=16) => Ok(()),
            _ => Err(format!("min_copies {value:?}: a number from 1 to 16")),
        },
        "fetch_timeout" => match value.parse::<u64>() {
            Ok(1..=3600) => Ok(()),
            _ => Err(format!("fetch_timeout {value:?}: seconds, 1 to 3600")),
        },
        "history" => crate::history::when::parse_span(value).map(|_| ()),
        _ => known(key),
    }
}

/// Whether `key` is a setting there is; the error lists them.
fn known(key: &str) -> Result<(), String> {
    if KEYS.iter().any(|(k, _)| *k == key) {
        return Ok(());
    }
    Err(format!(
        "unknown setting {key:?}; there are: {}",
        KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
    ))
}

pub type Settings = BTreeMap<String, String>;

/// `key=value` lines.
pub fn render(s: &Settings) -> String {
    s.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

fn decode(v: Option<Vec<u8>>) -> Result<Settings, KvError> {
    let Some(v) = v else {
        return Ok(Settings::new());
    };
    let pairs: Vec<(String, String)> = decode_v1("settings", &v)?;
    Ok(pairs.into_iter().collect())
}

pub fn read(store: &KvStore) -> Result<Settings, KvError> {
    decode(store.get(Cf::Meta, ks::META_CONFIG)?)
}

/// Apply `changes` (`key=value`; `key=` removes the setting) in one transaction.
pub fn write(store: &KvStore, changes: &[(String, String)]) -> Result<Settings, KvError> {
    for (k, v) in changes {
        let ok = if v.is_empty() { known(k) } else { check(k, v) };
        ok.map_err(KvError::Other)?;
    }
    let out = store.transact(|t| {
        let mut s = decode(t.get(Cf::Meta, ks::META_CONFIG)?)?;
        for (k, v) in changes {
            if v.is_empty() {
                s.remove(k);
            } else {
                s.insert(k.clone(), v.clone());
            }
        }
        let pairs: Vec<(String, String)> = s.clone().into_iter().collect();
        t.put(Cf::Meta, ks::META_CONFIG, &encode_v1(&pairs)?)?;
        Ok::<_, KvError>(s)
    })?;
    store.sync()?;
    Ok(out)
}

/// The tiering settings in force: the store's, overridden by a mount's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierSettings {
    pub cache_size: Option<u64>,
    pub min_copies: u32,
    pub fetch_timeout: Duration,
}

impl TierSettings {
    pub fn resolve(store: &Settings, mount: &Settings) -> Result<TierSettings, String> {
        let get = |k: &str| mount.get(k).or_else(|| store.get(k));
        let mut t = TierSettings {
            cache_size: None,
            min_copies: 1,
            fetch_timeout: Duration::from_secs(10),
        };
        if let Some(v) = get("cache_size") {
            let n = parse_size(v)?;
            t.cache_size = (n > 0).then_some(n);
        }
        if let Some(v) = get("min_copies") {
            check("min_copies", v)?;
            t.min_copies = v.parse().unwrap_or(1);
        }
        if let Some(v) = get("fetch_timeout") {
            check("fetch_timeout", v)?;
            t.fetch_timeout = Duration::from_secs(v.parse().unwrap_or(10));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_settings_override_the_stores_and_bad_values_are_refused() {
        let store: Settings = [
            ("cache_size".into(), "10G".into()),
            ("min_copies".into(), "2".into()),
        ]
        .into_iter()
        .collect();
        let mount: Settings = [("cache_size".into(), "64M".into())].into_iter().collect();
        let t = TierSettings::resolve(&store, &mount).unwrap();
        assert_eq!(t.cache_size, Some(64 << 20));
        assert_eq!(t.min_copies, 2);
        assert_eq!(t.fetch_timeout, Duration::from_secs(10));
        assert!(check("min_copies", "0").is_err());
        assert!(check("colour", "blue")
            .unwrap_err()
            .contains("unknown setting"));
        assert!(check("cache_size", "lots").is_err());
    }
}
