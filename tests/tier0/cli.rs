//! The command line, run as a user would.

use std::path::PathBuf;
use std::process::Command;

/// The CLI under test: cargo's build, or, where test binaries were packed for another machine
/// (`../shared/tools/device-pack`, run from the repo root), the packed release binary.
pub fn attnforge_bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_attnforge"));
    if built.exists() {
        built
    } else {
        PathBuf::from(".device/bin/attnforge")
    }
}

fn attnforge(args: &[&str]) -> (bool, String) {
    let out = Command::new(attnforge_bin()).args(args).output().expect("spawn attnforge");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_accepts_every_shipped_spec_file() {
    let files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/variants"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    assert_eq!(files.len(), 11);
    let args: Vec<&str> = std::iter::once("check").chain(files.iter().map(String::as_str)).collect();
    let (ok, text) = attnforge(&args);
    assert!(ok, "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("ok ")).count(), 11, "{text}");
    // Seven shipped masks are proven implied by their kv_range, three are evaluated per key.
    assert_eq!(text.lines().filter(|l| l.contains("mask follows from kv_range")).count(), 7, "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("mask evaluated per key")).count(), 3, "{text}");
    // The two soft caps (soft_cap, gemma2) have bounded logits: prefill may fix the row max.
    assert_eq!(text.lines().filter(|l| l.contains("raw proven in [-1.0010, 1.0010]: prefill exponentiates against a fixed row max")).count(), 2, "{text}");
}

#[test]
fn check_reports_an_unsound_kv_range_and_a_type_error() {
    let dir = std::env::temp_dir().join(format!("attnforge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_range = dir.join("bad_range.json");
    std::fs::write(
        &bad_range,
        r#"{ "name": "bad_range", "mask": "kv_pos <= q_pos", "kv_range": { "hi": "q_pos - 1" } }"#,
    )
    .unwrap();
    let bad_type = dir.join("bad_type.json");
    std::fs::write(&bad_type, "{\n \"name\": \"bad_type\",\n \"mask\": \"kv_pos + 1\"\n}").unwrap();
    let (ok, text) = attnforge(&["check", "causal", bad_range.to_str().unwrap(), bad_type.to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("ok    causal"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("ok    causal") && l.contains("mask follows from kv_range")), "{text}");
    assert!(text.contains("the mask admits kv_pos"), "{text}");
    assert!(text.contains("bad_type.json:3: hook `mask`, column 1: hook `mask` must be a bool, found i32"), "{text}");
    assert!(text.contains("2 of 3 specs failed"), "{text}");
}

#[test]
fn run_cpu_summarises_and_rejects_bad_parameters() {
    let (ok, text) = attnforge(&["run", "gemma2", "--cpu", "--batch", "2", "--kv-len", "100", "--qo-heads", "4", "--kv-heads", "2", "--head-dim", "64", "--param", "window=8"]);
    assert!(ok, "{text}");
    assert!(text.contains("8 rows"), "{text}");
    let (ok, text) = attnforge(&["run", "gemma2", "--cpu", "--param", "windw=8"]);
    assert!(!ok);
    assert!(text.contains("unknown parameter `windw`: variant `gemma2` declares soft_cap, window"), "{text}");
    let (ok, text) = attnforge(&["run", "sliding_window", "--cpu", "--param", "window=0"]);
    assert!(!ok);
    assert!(text.contains("outside its declared range"), "{text}");
    let (ok, text) = attnforge(&["run", "alibi", "--cpu", "--qo-heads", "4", "--kv-heads", "2", "--param", "slopes=0.5,0.25"]);
    assert!(!ok);
    assert!(text.contains("has 2 values, expected 4 (one per qo_head)"), "{text}");
    let (ok, text) = attnforge(&["run", "alibi", "--cpu", "--qo-heads", "3", "--kv-heads", "2"]);
    assert!(!ok, "{text}");
    let (ok, text) = attnforge(&["run", "no_such_variant", "--cpu"]);
    assert!(!ok);
    assert!(text.contains("no shipped variant of that name"), "{text}");
}

#[test]
fn the_demo_runs_every_shipped_variant() {
    let (ok, text) = attnforge(&[]);
    assert!(ok, "{text}");
    for (name, _) in attnforge::spec::shipped::SHIPPED {
        assert!(text.lines().any(|l| l.trim_start().starts_with(name)), "{name} missing from:\n{text}");
    }
}

fn attnforge_in(cache: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(attnforge_bin()).args(args).env("ATTNFORGE_CACHE_DIR", cache).output().expect("spawn attnforge");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// Regression (hardening audit, items 3 and 5): `cache list`/`verify` hung on a FIFO entry, and
/// `verify`/`clear` exited 0 saying "removed …" when a removal failed.
#[test]
fn cache_commands_report_what_they_could_not_remove_and_never_hang() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("stuck.afk")).unwrap();
    #[cfg(unix)]
    {
        let fifo = std::ffi::CString::new(dir.path().join("pipe.afk").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path inside our temp dir.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    }
    let (ok, text) = attnforge_in(dir.path(), &["cache", "list"]);
    assert!(ok && text.contains("DAMAGED"), "{text}");
    let (ok, text) = attnforge_in(dir.path(), &["cache", "verify"]);
    assert!(!ok, "{text}");
    assert!(text.contains("NOT removed stuck") && text.contains("could not be removed"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("removed stuck")), "{text}");
    let (ok, text) = attnforge_in(dir.path(), &["cache", "clear"]);
    assert!(!ok && text.contains("NOT removed") && text.contains("1 files in"), "{text}");
    std::fs::remove_dir(dir.path().join("stuck.afk")).unwrap();
    let (ok, text) = attnforge_in(dir.path(), &["cache", "clear"]);
    assert!(ok, "{text}");
}

/// Regression (hardening audit, item 13): a cache directory that is a regular file printed the
/// OS error twice ("File exists (os error 17): File exists (os error 17)").
#[test]
fn a_cache_directory_that_is_a_file_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let (ok, text) = attnforge_in(&file, &["cache", "list"]);
    assert!(!ok && text.contains("is not a directory"), "{text}");
    assert!(!text.contains("os error 17"), "{text}");
}

/// Regression (hardening audit, item 8): `run --cpu` allocated before validating
/// (`--kv-len 2147483648` aborted allocating 8 TB; huge `--q-len`, `--batch` and `--page-size`
/// panicked on capacity overflow) and truncated `--q-len 4294967297` to one row. Every shape is
/// checked first; each of these is a clear error and a normal exit code.
#[test]
fn run_validates_shapes_before_allocating_and_never_truncates() {
    for (args, phrase) in [
        (&["--kv-len", "2147483648"][..], "--kv-len 2147483648: at most"),
        (&["--op", "prefill", "--q-len", "2147483648"], "--q-len 2147483648: at most"),
        (&["--q-len", "4294967297"], "--q-len 4294967297: at most"),
        (&["--batch", "18446744073709551615"], "--batch 18446744073709551615: at most"),
        (&["--page-size", "18446744073709551615"], "--page-size 18446744073709551615: at most"),
        (&["--page-size", "0"], "--page-size must be at least 1"),
        (&["--batch", "100000", "--q-len", "100000"], "query tokens in a batch"),
        (&["--qo-heads", "1099511627776", "--kv-heads", "1"], "qo_heads is 1099511627776"),
        (&["--kv-len", "1073741824"], "GB of host memory"),
    ] {
        let mut all = vec!["run", "gemma2", "--cpu"];
        all.extend_from_slice(args);
        let out = Command::new(attnforge_bin()).args(&all).output().expect("spawn");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} must fail cleanly (no abort, no panic): {text}");
        assert!(text.contains(phrase) && !text.contains("panicked"), "{args:?}: {text}");
    }
}

/// Regression (hardening audit, items 9 and 13): a NaN, infinite, zero or negative
/// `--sm-scale` ran; NaN logits were counted as "fully masked rows"; an empty output printed
/// "lse in [inf, -inf]".
#[test]
fn run_rejects_a_bad_scale_and_names_nan_rows_and_empty_outputs() {
    for s in ["nan", "inf", "0", "-1"] {
        let (ok, text) = attnforge(&["run", "causal", "--cpu", &format!("--sm-scale={s}")]);
        assert!(!ok && text.contains("must be positive and finite"), "{s}: {text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("nan.json");
    std::fs::write(&spec, r#"{ "name": "nan_logits", "logits": "sqrt(-1.0 - abs(score))" }"#).unwrap();
    let (ok, text) = attnforge(&["run", spec.to_str().unwrap(), "--cpu", "--batch", "2", "--kv-len", "30", "--qo-heads", "4", "--kv-heads", "2", "--head-dim", "16"]);
    assert!(ok, "{text}");
    assert!(text.contains("0 fully masked rows") && text.contains("8 rows are NaN"), "{text}");
    let (ok, text) = attnforge(&["run", "causal", "--cpu", "--batch", "0"]);
    assert!(ok && text.contains("no output rows") && !text.contains("inf, -inf"), "{text}");
}

/// Regression (hardening audit, items 11 and 12): `check` on a spec that can never bind fails,
/// and on a spec too large to sample fully it says the sampling was cut short.
#[test]
fn check_refuses_unbindable_specs_and_says_when_sampling_was_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.json");
    let mask = vec!["kv_pos"; 570].join("+") + "<0-1";
    std::fs::write(&long, format!(r#"{{ "name": "long", "mask": "{mask}", "kv_range": {{ "hi": "-1" }} }}"#)).unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{ "name": "bad", "params": { "w": { "type": "i32", "default": 1e20 } } }"#).unwrap();
    let (ok, text) = attnforge(&["check", long.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(text.contains("ok    long") && text.contains("sampled shapes only"), "{text}");
    assert!(text.contains("more than the 1024 the prover analyses"), "{text}");
    assert!(text.contains("FAIL") && text.contains("must be an integer in i32"), "{text}");
}

#[test]
fn run_cpu_shared_prefix_compares_both_formulations() {
    let (ok, out) = attnforge(&["run", "gemma2", "--cpu", "--shared-prefix", "100", "--batch", "5", "--kv-len", "160", "--qo-heads", "8", "--kv-heads", "2", "--head-dim", "64", "--param", "window=120"]);
    assert!(ok, "{out}");
    assert!(out.contains("cascade: 2 levels (1 group(s), 5 group(s)), 416 keys read instead of 800"), "{out}");
    assert!(out.contains("multi-level reference"), "{out}");
    // Without --cpu the cascade runs on the GPU (checked against the reference), or says there is none.
    let (ok, out) = attnforge(&["run", "causal", "--shared-prefix", "64", "--batch", "2", "--kv-len", "100"]);
    if ok {
        assert!(out.contains("cascade on") && out.contains("GPU vs reference"), "{out}");
    } else {
        assert!(out.contains("needs a GPU"), "{out}");
    }
    let (ok, out) = attnforge(&["run", "causal", "--cpu", "--shared-prefix", "200", "--kv-len", "100"]);
    assert!(!ok && out.contains("longer than --kv-len"), "{out}");
    // An empty batch shares nothing (it panicked on request 0's pages).
    let (ok, out) = attnforge(&["run", "causal", "--cpu", "--shared-prefix", "16", "--batch", "0"]);
    assert!(ok && out.contains("no shared whole page"), "{out}");
}

/// `run --tile` picks the prefill tile and is checked before any work: a tile that does not
/// fit, a malformed one, and a tile given to a plain decode run are clear errors; a fitting
/// one passes to the reference with `--cpu`.
#[test]
fn run_takes_a_prefill_tile_and_refuses_one_that_does_not_fit() {
    let (ok, text) = attnforge(&["run", "causal", "--op", "prefill", "--tile", "sm90,96,2", "--cpu", "--batch", "1", "--kv-len", "64"]);
    assert!(!ok && text.contains("kv_tile 64 or 128") && !text.contains("CPU reference"), "{text}");
    let (ok, text) = attnforge(&["run", "causal", "--op", "prefill", "--tile", "sm90,128,2", "--head-dim", "96", "--cpu", "--batch", "1", "--kv-len", "64"]);
    assert!(!ok && text.contains("multiples of 64"), "{text}");
    let (ok, text) = attnforge(&["run", "causal", "--op", "prefill", "--tile", "4,x", "--cpu"]);
    assert!(!ok && text.contains("--tile") && !text.contains("panicked"), "{text}");
    let (ok, text) = attnforge(&["run", "causal", "--tile", "sm90,128,2", "--cpu"]);
    assert!(!ok && text.contains("applies to --op prefill"), "{text}");
    let (ok, text) = attnforge(&["run", "soft_cap", "--op", "prefill", "--tile", "sm90,128,2", "--cpu", "--batch", "1", "--kv-len", "64"]);
    assert!(ok && text.contains("CPU reference"), "{text}");
    // Without --tile, a reference-only run takes head dims no kernel does.
    let (ok, text) = attnforge(&["run", "causal", "--cpu", "--head-dim", "40", "--batch", "1", "--kv-len", "16"]);
    assert!(ok && text.contains("CPU reference"), "{text}");
}

#[test]
fn bench_refuses_tile_only_without_a_prefill_tile_before_looking_for_a_gpu() {
    let (ok, text) = attnforge(&["bench", "--suite", "prefill", "--tile-only"]);
    assert!(!ok, "{text}");
    assert!(text.contains("--tile-only times only the prefill tiles given with --tile p,"), "{text}");
    // A decode tile is no prefill tile.
    let (ok, text) = attnforge(&["bench", "--suite", "prefill", "--tile-only", "--tile", "mma,4,2"]);
    assert!(!ok, "{text}");
    assert!(text.contains("--tile-only"), "{text}");
}
