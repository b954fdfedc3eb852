//! The store under damage and contention: truncated and bit-flipped entries, foreign files,
//! leftover temp files, unwritable directories, and many processes racing on one key.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use attnforge_cache::{CacheKey, KeyBuilder, Lookup, Store};

fn key(s: &str) -> CacheKey {
    KeyBuilder::new().field("source", s.as_bytes()).finish()
}

fn payload() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    (dir, s)
}

#[test]
fn put_then_get_round_trips_and_lists() {
    let (_d, s) = store();
    let k = key("a");
    assert_eq!(s.get(&k, "v.decode"), Lookup::Miss);
    let path = s.put(&k, "v.decode", "variant=v op=decode", &payload()).unwrap();
    assert!(path.file_name().unwrap().to_str().unwrap().starts_with("v.decode-"));
    assert_eq!(s.get(&k, "v.decode"), Lookup::Hit(payload()));
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].meta, "variant=v op=decode");
    assert!(list[0].problem.is_none());
}

#[test]
fn key_builder_separates_fields() {
    let a = KeyBuilder::new().field("x", b"ab").field("y", b"c").finish();
    let b = KeyBuilder::new().field("x", b"a").field("y", b"bc").finish();
    let c = KeyBuilder::new().field("x", b"ab").field("y", b"c").finish();
    assert_ne!(a, b);
    assert_eq!(a, c);
    assert_eq!(a.hex().len(), 64);
}

fn damage(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

#[test]
fn truncated_entries_are_rejected_and_removed() {
    let (_d, s) = store();
    let k = key("t");
    let full_len = std::fs::read(s.put(&k, "n", "", &payload()).unwrap()).unwrap().len();
    for cut in [0, 3, 40, 100, full_len - 33, full_len - 1] {
        let path = s.put(&k, "n", "", &payload()).unwrap();
        damage(&path, |b| b.truncate(cut));
        match s.get(&k, "n") {
            Lookup::Corrupt(why) => assert!(!why.is_empty()),
            other => panic!("cut at {cut}: {other:?}"),
        }
        assert!(!path.exists(), "a corrupt entry must be removed");
        assert_eq!(s.get(&k, "n"), Lookup::Miss);
    }
}

#[test]
fn every_flipped_byte_is_caught() {
    let (_d, s) = store();
    let k = key("f");
    let len = std::fs::read(s.put(&k, "n", "meta", &payload()).unwrap()).unwrap().len();
    for at in (0..len).step_by(97).chain([len - 1]) {
        let path = s.put(&k, "n", "meta", &payload()).unwrap();
        damage(&path, |b| b[at] ^= 0x10);
        assert!(matches!(s.get(&k, "n"), Lookup::Corrupt(_)), "flip at {at} not caught");
    }
}

#[test]
fn foreign_files_are_not_loaded() {
    let (_d, s) = store();
    let (k1, k2) = (key("one"), key("two"));
    // Random bytes under the right name.
    std::fs::write(s.path_of(&k1, "n"), b"hello, I am not a kernel").unwrap();
    assert!(matches!(s.get(&k1, "n"), Lookup::Corrupt(why) if why.contains("magic")));
    // A valid entry of another key copied under this key's name.
    let other = s.put(&k2, "n", "", &payload()).unwrap();
    std::fs::copy(other, s.path_of(&k1, "n")).unwrap();
    assert!(matches!(s.get(&k1, "n"), Lookup::Corrupt(why) if why.contains("instead of")));
    // Extra bytes after a valid entry.
    let path = s.put(&k1, "n", "", &payload()).unwrap();
    damage(&path, |b| b.extend_from_slice(b"junk"));
    assert!(matches!(s.get(&k1, "n"), Lookup::Corrupt(why) if why.contains("trailing")));
}

#[test]
fn leftover_temp_files_from_a_killed_writer_are_harmless_and_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let k = key("tmp");
    let s = Store::open(dir.path()).unwrap();
    // A writer killed mid-write leaves a partial temp file; a fresh one is someone else's.
    let stale = dir.path().join(format!(".tmp-99999-0-{}", k.short()));
    std::fs::write(&stale, b"AFKC partial").unwrap();
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
    let fresh = dir.path().join(format!(".tmp-99998-0-{}", k.short()));
    std::fs::write(&fresh, b"AFKC in progress").unwrap();
    assert_eq!(s.get(&k, "n"), Lookup::Miss, "a temp file is never an entry");
    assert!(s.list().unwrap().is_empty());
    s.put(&k, "n", "", &payload()).unwrap();
    assert_eq!(s.get(&k, "n"), Lookup::Hit(payload()));
    // Reopening removes the stale one and keeps the fresh one.
    let _ = Store::open(dir.path()).unwrap();
    assert!(!stale.exists());
    assert!(fresh.exists());
    assert_eq!(s.clear().unwrap(), 2);
    assert!(!fresh.exists());
}

#[test]
fn unwritable_directories_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(file.join("cache")).unwrap_err();
    assert!(err.to_string().contains("cannot use cache directory"), "{err}");
    let err = Store::open("/proc/attnforge-cache").unwrap_err();
    assert!(err.to_string().contains("/proc/attnforge-cache"), "{err}");
    // A store whose directory vanished: writing fails cleanly.
    let gone = tempfile::tempdir().unwrap();
    let s = Store::open(gone.path()).unwrap();
    std::fs::remove_dir_all(gone.path()).unwrap();
    let err = s.put(&key("x"), "n", "", b"abc").unwrap_err();
    assert!(err.to_string().contains("cannot write cache entry"), "{err}");
    assert_eq!(s.get(&key("x"), "n"), Lookup::Miss);
}

#[test]
fn verify_removes_damaged_entries_only() {
    let (_d, s) = store();
    s.put(&key("good"), "good", "", &payload()).unwrap();
    let bad = s.put(&key("bad"), "bad", "", &payload()).unwrap();
    damage(&bad, |b| b[60] ^= 1);
    let (ok, removed) = s.verify().unwrap();
    assert_eq!(ok, 1);
    assert_eq!(removed.len(), 1);
    assert!(!bad.exists());
}

/// Child side of the race test: publishes and reads back one key, many times.
#[test]
fn race_child() {
    let Ok(dir) = std::env::var("AFK_RACE_DIR") else { return };
    let s = Store::open(&dir).unwrap();
    let k = key("race");
    for _ in 0..50 {
        s.put(&k, "race", "m", &payload()).unwrap();
        match s.get(&k, "race") {
            Lookup::Hit(b) => assert_eq!(b, payload()),
            other => panic!("child saw {other:?}"),
        }
    }
}

#[test]
fn many_processes_racing_on_one_key_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..12)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "race_child", "--nocapture", "--test-threads=1"])
                .env("AFK_RACE_DIR", dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a racing process failed");
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.get(&key("race"), "race"), Lookup::Hit(payload()));
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names.len(), 1, "no temp file may survive a clean race: {names:?}");
}
