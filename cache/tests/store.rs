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
    let r = s.clear().unwrap();
    assert_eq!((r.removed, r.not_removed.len()), (2, 0));
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
    let r = s.verify().unwrap();
    assert_eq!(r.kept, 1);
    assert_eq!(r.removed.len(), 1);
    assert!(r.not_removed.is_empty());
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

/// Runs `f` on a thread and fails the test if it has not returned within 20 s (a hang is the
/// bug being tested for; the test must fail, not wait forever).
fn within_20s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what} did not return within 20 s"))
}

/// Regression (hardening audit, item 3): an entry that is a FIFO hung `get` (compile), `list`
/// and `verify` forever. Entries are opened non-blocking, and only regular files are accepted.
#[cfg(unix)]
#[test]
fn a_fifo_entry_is_damage_not_a_hang() {
    let (d, s) = store();
    let k = key("fifo");
    let path = s.path_of(&k, "n");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let s2 = s.clone();
    let list = within_20s("list", move || s2.list().unwrap());
    assert!(list[0].problem.as_deref().unwrap().contains("FIFO"), "{:?}", list[0].problem);
    let s2 = s.clone();
    match within_20s("get", move || s2.get(&k, "n")) {
        Lookup::Corrupt(why) => assert!(why.contains("not a regular file"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!path.exists(), "the FIFO is removed like any damaged entry");
    // verify, with another FIFO.
    unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    let s2 = s.clone();
    let r = within_20s("verify", move || s2.verify().unwrap());
    assert_eq!((r.removed.len(), r.not_removed.len()), (1, 0));
    drop(d);
}

/// Regression (hardening audit, item 3): a symlink to /dev/zero was read until memory ran out.
/// Entries are opened with O_NOFOLLOW: a link is damage (removed; its target untouched), even
/// one pointing at a valid entry.
#[cfg(unix)]
#[test]
fn a_symlink_entry_is_damage_and_is_never_followed() {
    let (_d, s) = store();
    let k = key("link");
    let path = s.path_of(&k, "n");
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    let s2 = s.clone();
    match within_20s("get", move || s2.get(&k, "n")) {
        Lookup::Corrupt(why) => assert!(why.contains("symbolic link"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(std::fs::symlink_metadata(&path).is_err(), "the link is removed");
    // A link to a valid entry of the same key elsewhere is refused too.
    let other = tempfile::tempdir().unwrap();
    let real = Store::open(other.path()).unwrap().put(&k, "n", "", &payload()).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    assert!(matches!(s.get(&k, "n"), Lookup::Corrupt(_)));
    assert!(real.exists(), "the link's target is not touched");
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    let s2 = s.clone();
    let list = within_20s("list", move || s2.list().unwrap());
    assert!(list[0].problem.is_some());
}

/// Regression (hardening audit, item 3): reads are bounded. A file larger than
/// MAX_ENTRY_BYTES (sparse here, so the test writes nothing) is damage, not read.
#[test]
fn an_oversized_entry_is_not_read() {
    let (_d, s) = store();
    let k = key("big");
    let path = s.path_of(&k, "n");
    std::fs::File::create(&path).unwrap().set_len(attnforge_cache::MAX_ENTRY_BYTES + 1).unwrap();
    match s.get(&k, "n") {
        Lookup::Corrupt(why) => assert!(why.contains("more than"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!path.exists());
}

/// Regression (hardening audit, item 4): temp files were named predictably (pid, counter, key)
/// and created with File::create, which follows a planted symlink and overwrites its target.
/// They are created exclusively now under unpredictable names, and the rename replaces a link
/// planted at the entry's own path instead of writing through it.
#[cfg(unix)]
#[test]
fn planted_symlinks_are_never_written_through() {
    let (d, s) = store();
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let k = key("plant");
    // Every name the old scheme would have used for this process's next writes.
    for n in 0..200 {
        let tmp = d.path().join(format!(".tmp-{}-{n}-{}", std::process::id(), k.short()));
        std::os::unix::fs::symlink(&victim, tmp).unwrap();
    }
    let path = s.path_of(&k, "n");
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let published = s.put(&k, "n", "", &payload()).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&published).unwrap().file_type().is_file(), "a symlink was published");
    assert_eq!(s.get(&k, "n"), Lookup::Hit(payload()));
}

/// Regression (hardening audit, item 5): `verify` said "removed" (and `clear` counted nothing
/// and succeeded) when a removal failed. A directory named like an entry cannot be removed by
/// the store: both reports say so.
#[test]
fn failed_removals_are_reported() {
    let (d, s) = store();
    let stuck = d.path().join("x.afk");
    std::fs::create_dir(&stuck).unwrap();
    s.put(&key("ok"), "ok", "", &payload()).unwrap();
    let r = s.verify().unwrap();
    assert_eq!((r.kept, r.removed.len(), r.not_removed.len()), (1, 0, 1));
    assert!(r.not_removed[0].1.contains("directory"), "{:?}", r.not_removed);
    let r = s.clear().unwrap();
    assert_eq!((r.removed, r.not_removed.len()), (1, 1));
    assert!(stuck.exists());
}

/// Regression (hardening audit, item 6): a payload length of u64::MAX - 50 overflowed an
/// addition while decoding (a panic in debug builds, with overflow checks). Every size read from
/// disk goes through checked arithmetic.
#[test]
fn a_crafted_payload_length_is_damage_not_a_panic() {
    let (_d, s) = store();
    let k = key("len");
    for len in [u64::MAX - 50, u64::MAX, u64::MAX / 2, 1 << 40] {
        let path = s.put(&k, "n", "m", &payload()).unwrap();
        // The length field follows the 44-byte header and the 1-byte metadata.
        damage(&path, |b| b[45..53].copy_from_slice(&len.to_le_bytes()));
        assert!(matches!(s.get(&k, "n"), Lookup::Corrupt(_)), "length {len}");
        let path = s.put(&k, "n", "m", &payload()).unwrap();
        damage(&path, |b| b[45..53].copy_from_slice(&len.to_le_bytes()));
        assert!(s.list().unwrap()[0].problem.is_some());
    }
}

/// Regression (hardening audit, item 13): a 100 000-character name gave ENAMETOOLONG, reported
/// as a damaged entry. File names are cut to MAX_NAME_CHARS (the key still tells entries apart).
#[test]
fn an_overlong_name_is_cut_to_fit_a_file_name() {
    let (_d, s) = store();
    let name = "v".repeat(100_000);
    let path = s.put(&key("long"), &name, "", &payload()).unwrap();
    assert!(path.file_name().unwrap().len() < 255);
    assert_eq!(s.get(&key("long"), &name), Lookup::Hit(payload()));
}

/// Regression (hardening audit, item 13): a cache directory that is a regular file gave "File
/// exists (os error 17): File exists (os error 17)". The message says what is wrong, once.
#[test]
fn a_regular_file_as_the_cache_directory_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("is not a directory") && text.contains("plain"), "{text}");
    assert!(std::error::Error::source(&err).is_none(), "the cause is in the message, not repeated by a chain");
    // A path *under* a file: the OS error, once.
    let err = Store::open(file.join("sub")).unwrap_err();
    assert!(std::error::Error::source(&err).is_none() && err.to_string().matches("os error").count() == 1, "{err}");
}
