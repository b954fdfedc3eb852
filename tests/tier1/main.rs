//! Tier 1: needs NVRTC (not a GPU). Without it every test is reported *ignored* (with the reason
//! printed), unless `ATTNFORGE_REQUIRE_NVRTC=1` (set by `tests/run.sh` once it has installed
//! NVRTC), which turns a missing NVRTC into a failure. A custom harness (libtest-mimic) decides
//! at run time.

use std::sync::Arc;

use attnforge::jit::{render::render, Arch, Jit, KernelConfig, Nvrtc, Origin};
use attnforge::kv::DType;
use attnforge::spec::{load, shipped};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

#[path = "../support/gen.rs"]
mod gen;
use gen::gen;

/// NVRTC for one test. Tests run only where `main` found it, so a failure here is real.
fn nvrtc() -> Nvrtc {
    Nvrtc::load().unwrap_or_else(|e| panic!("no NVRTC: {e}"))
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    // Probe once: without NVRTC every test is ignored (and says why), unless one is required.
    let missing = Nvrtc::load().err().map(|e| e.to_string());
    let required = std::env::var_os("ATTNFORGE_REQUIRE_NVRTC").is_some();
    if let Some(why) = &missing {
        eprintln!("tier 1: no NVRTC ({why}); {}", if required { "ATTNFORGE_REQUIRE_NVRTC is set, so every test fails" } else { "every NVRTC test is reported ignored" });
    }
    let trial = |name: &'static str, f: fn()| {
        let (ignored, missing) = (missing.is_some() && !required, missing.clone());
        libtest_mimic::Trial::test(name, move || match &missing {
            Some(why) => Err(format!("ATTNFORGE_REQUIRE_NVRTC is set but there is no NVRTC: {why}").into()),
            None => {
                f();
                Ok(())
            }
        })
        .with_ignored_flag(ignored)
    };
    let tests = vec![
        trial("every_shipped_variant_and_op_compiles_for_sm80_and_sm90a", every_shipped_variant_and_op_compiles_for_sm80_and_sm90a),
        trial("second_lookups_hit_memory_then_disk_and_damage_is_rebuilt", second_lookups_hit_memory_then_disk_and_damage_is_rebuilt),
        trial("an_unusable_cache_directory_degrades_to_memory_with_a_warning", an_unusable_cache_directory_degrades_to_memory_with_a_warning),
        trial("a_kernel_whose_entry_cannot_be_written_has_no_path", a_kernel_whose_entry_cannot_be_written_has_no_path),
        trial("a_compile_failure_names_the_hook_and_shows_the_rendered_lines", a_compile_failure_names_the_hook_and_shows_the_rendered_lines),
        trial("random_well_typed_specs_compile", random_well_typed_specs_compile),
        trial("the_cli_compiles_without_a_gpu_and_hits_the_disk_cache_in_a_new_process", the_cli_compiles_without_a_gpu_and_hits_the_disk_cache_in_a_new_process),
        trial("a_bits_parameter_beside_one_named_like_its_offsets_compiles", a_bits_parameter_beside_one_named_like_its_offsets_compiles),
        trial("the_abi_probe_compiles", the_abi_probe_compiles),
        trial("the_read_ceiling_probe_compiles", the_read_ceiling_probe_compiles),
        trial("the_wgmma_probe_compiles_for_sm90a_to_warpgroup_mmas", the_wgmma_probe_compiles_for_sm90a_to_warpgroup_mmas),
        trial("the_pipeline_probe_compiles_for_sm90a_to_barriers_and_bulk_copies", the_pipeline_probe_compiles_for_sm90a_to_barriers_and_bulk_copies),
        trial("the_attention_tile_probe_compiles_for_sm90a", the_attention_tile_probe_compiles_for_sm90a),
        trial("the_gather_probe_compiles_for_sm90a", the_gather_probe_compiles_for_sm90a),
        trial("the_sm90_prefill_loop_is_refused_for_other_archs", the_sm90_prefill_loop_is_refused_for_other_archs),
        trial("the_state_merge_compiles_for_every_output_dtype_and_is_cached", the_state_merge_compiles_for_every_output_dtype_and_is_cached),
        trial("an_abi_table_that_disagrees_with_the_cpp_types_fails_to_compile", an_abi_table_that_disagrees_with_the_cpp_types_fails_to_compile),
    ];
    libtest_mimic::run(&args, tests).exit();
}

fn jit(dir: &std::path::Path) -> Jit {
    Jit::with_store_dir(dir).unwrap()
}

fn every_shipped_variant_and_op_compiles_for_sm80_and_sm90a() {
    let dir = tempfile::tempdir().unwrap();
    let jit = Arc::new(jit(dir.path()));
    let mut jobs = Vec::new();
    for v in shipped::all().unwrap() {
        for prefill in [false, true] {
            for d in [64, 128, 256] {
                for t in [DType::F16, DType::Bf16] {
                    for arch in ["sm_80", "sm_90a"] {
                        jobs.push((v.clone(), prefill, d, t, arch, false));
                    }
                    // The wide decode tile (twice the warps) the engine loads beside it on GPUs
                    // whose shared memory holds its ring, and the Hopper prefill main loop (the
                    // prompt tile the engine loads on sm_90a).
                    jobs.push((v.clone(), prefill, d, t, "sm_90a", true));
                }
            }
        }
    }
    assert_eq!(jobs.len(), 264 + 66 + 66);
    let slowest = jobs
        .par_iter()
        .map(|(v, prefill, d, t, arch, wide)| {
            let cfg = if *prefill { KernelConfig::prefill(*d, *d, *t, 4) } else { KernelConfig::decode(*d, *d, *t, 4) }.unwrap();
            let cfg = match (*wide, *prefill) {
                (false, _) => cfg,
                (true, false) => cfg.wide_decode().expect("GQA 4 decode has a wide tile"),
                (true, true) => cfg.sm90_prefill().expect("head dims of 64-column panels have the sm90 tile"),
            };
            let k = jit.get(v, &cfg, &arch.parse::<Arch>().unwrap()).unwrap_or_else(|e| panic!("{} d{d} {t:?} {arch}: {e}", v.name));
            assert_eq!(k.origin, Origin::Compiled);
            assert!(k.cubin.len() > 1000 && k.cubin.starts_with(b"\x7fELF"), "{}: not a CUBIN", k.name);
            assert!(k.warnings.is_empty(), "{:?}", k.warnings);
            k.elapsed.as_secs_f64()
        })
        .reduce(|| 0.0, f64::max);
    eprintln!("slowest compile: {slowest:.2} s");
    assert_eq!(jit.store().unwrap().list().unwrap().len(), 264 + 66 + 66);
}

fn second_lookups_hit_memory_then_disk_and_damage_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let v = shipped::resolve("soft_cap").unwrap();
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let arch: Arch = "sm_90a".parse().unwrap();
    let j1 = jit(dir.path());
    let first = j1.get(&v, &cfg, &arch).unwrap();
    assert_eq!(first.origin, Origin::Compiled);
    assert_eq!(j1.get(&v, &cfg, &arch).unwrap().origin, Origin::Memory);
    let j2 = jit(dir.path());
    let hit = j2.get(&v, &cfg, &arch).unwrap();
    assert_eq!(hit.origin, Origin::Disk);
    assert_eq!(hit.cubin, first.cubin);
    // Flip one byte of the payload: the next process must rebuild, not load it.
    let path = first.path.clone().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let j3 = jit(dir.path());
    let rebuilt = j3.get(&v, &cfg, &arch).unwrap();
    assert_eq!(rebuilt.origin, Origin::Compiled);
    assert!(rebuilt.warnings.iter().any(|w| w.contains("damaged")), "{:?}", rebuilt.warnings);
    assert_eq!(rebuilt.cubin, first.cubin);
}

fn an_unusable_cache_directory_degrades_to_memory_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let j = jit(&file.join("cache"));
    assert!(j.store().is_none());
    let v = shipped::resolve("causal").unwrap();
    let k = j.get(&v, &KernelConfig::decode(64, 64, DType::F16, 1).unwrap(), &"sm_80".parse().unwrap()).unwrap();
    assert_eq!(k.origin, Origin::Compiled);
    assert!(k.warnings.iter().any(|w| w.contains("memory only")), "{:?}", k.warnings);
    assert!(k.path.is_none(), "a kernel kept in memory has no disk path");
}

/// Regression (hardening audit, item 13): a kernel whose entry could not be written printed the
/// path it would have had. Here a directory sits at the entry's path: the lookup reports damage
/// it cannot remove, the write fails, and the kernel has no path (in memory hits too).
fn a_kernel_whose_entry_cannot_be_written_has_no_path() {
    let dir = tempfile::tempdir().unwrap();
    let v = shipped::resolve("causal").unwrap();
    let cfg = KernelConfig::decode(64, 64, DType::F16, 1).unwrap();
    let arch: Arch = "sm_80".parse().unwrap();
    let first = jit(dir.path()).get(&v, &cfg, &arch).unwrap();
    let path = first.path.clone().expect("written");
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let j = jit(dir.path());
    let k = j.get(&v, &cfg, &arch).unwrap();
    assert_eq!(k.origin, Origin::Compiled);
    assert!(k.path.is_none(), "{:?}", k.path);
    assert!(k.warnings.iter().any(|w| w.contains("could not be removed")), "{:?}", k.warnings);
    assert!(k.warnings.iter().any(|w| w.contains("memory only")), "{:?}", k.warnings);
    let again = j.get(&v, &cfg, &arch).unwrap();
    assert_eq!((again.origin, again.path), (Origin::Memory, None));
}

fn a_compile_failure_names_the_hook_and_shows_the_rendered_lines() {
    let nvrtc = nvrtc();
    // The emitter is total over the typed language, so no valid spec is known to fail NVRTC
    // (see `random_well_typed_specs_compile`). Simulate an emitter bug instead: corrupt the line
    // the `mask` hook was emitted to, and check the report.
    let v = shipped::resolve("sliding_window").unwrap();
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let mut src = render(&v, &cfg).unwrap();
    let (line, hook) = src.hook_lines.iter().find(|(_, h)| h == "mask").cloned().unwrap();
    let mut lines: Vec<String> = src.code.lines().map(String::from).collect();
    lines[line - 1] = "  return kv_pos <= q_pos && undefined_thing;".into();
    src.code = lines.join("\n");
    let dir = tempfile::tempdir().unwrap();
    let arch: Arch = "sm_90a".parse().unwrap();
    let err = nvrtc.compile(&src, &nvrtc.options(&arch), Some(dir.path())).unwrap_err();
    // A program can act on the failure: its kind and fields, not only its text.
    let attnforge::Error::CompileFailed(f) = &err else { panic!("not CompileFailed: {err}") };
    assert!(f.log.contains("undefined_thing"), "{}", f.log);
    let x = f.excerpts.iter().find(|x| x.line == line).expect("an excerpt of the failing line");
    assert_eq!(x.hook.as_deref(), Some("mask"));
    assert!(x.lines.iter().any(|(n, t)| *n == line && t.contains("undefined_thing")));
    assert_eq!(f.saved.as_ref().unwrap(), &dir.path().join("failed").join(format!("{}.cu", src.name)));
    let err = err.to_string();
    assert_eq!(hook, "mask");
    assert!(err.contains("undefined_thing"), "{err}");
    assert!(err.contains("in the code emitted for spec hook `mask`"), "{err}");
    assert!(err.contains(&format!("> {line:>5} |   return kv_pos <= q_pos && undefined_thing;")), "{err}");
    let saved = dir.path().join("failed").join(format!("{}.cu", src.name));
    assert!(err.contains(&saved.display().to_string()), "{err}");
    assert_eq!(std::fs::read_to_string(saved).unwrap(), src.code);
}

fn random_well_typed_specs_compile() {
    let dir = tempfile::tempdir().unwrap();
    let jit = jit(dir.path());
    let mut rng = StdRng::seed_from_u64(42);
    let all_i = ["q_pos", "kv_pos", "qo_head", "kv_head", "req", "q_len", "kv_len", "w", "pre"];
    let range_i = ["q_pos", "kv_head", "req", "q_len", "kv_len", "w", "pre"];
    let specs: Vec<String> = (0..12)
        .map(|i| {
            let spec = serde_json::json!({
                "name": format!("random{i}"),
                "params": { "w": "i32", "s": "f32", "sl": "f32[qo_heads]", "pre": "i32[batch]", "kh": "f32[kv_heads]" },
                "logits": gen(&mut rng, 'f', 4, &all_i, &["score", "sm_scale", "s", "sl", "kh"]),
                "mask": gen(&mut rng, 'b', 3, &all_i, &["sm_scale", "s", "sl"]),
                "kv_range": { "lo": gen(&mut rng, 'i', 2, &range_i, &[]), "hi": gen(&mut rng, 'i', 2, &range_i, &["s", "kh"]) },
                "sink": gen(&mut rng, 'f', 2, &["q_pos", "qo_head", "req"], &["s", "sl"]),
            });
            spec.to_string()
        })
        .collect();
    for text in &specs {
        let v = load("random.json", text).unwrap_or_else(|e| panic!("generator made an ill-typed spec: {e}\n{text}"));
        let cfg = KernelConfig::decode(64, 64, DType::Bf16, 2).unwrap();
        jit.get(&v, &cfg, &"sm_90a".parse().unwrap()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

fn the_cli_compiles_without_a_gpu_and_hits_the_disk_cache_in_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        // Cargo's build, or the packed binary where tests run on another machine (device-pack).
        let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_attnforge"));
        let bin = if built.exists() { built } else { std::path::PathBuf::from(".device/bin/attnforge") };
        let out = std::process::Command::new(bin)
            .args(args)
            .env("ATTNFORGE_CACHE_DIR", dir.path())
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, text) = run(&["compile", "gemma2", "--arch", "sm_90a"]);
    assert!(ok, "{text}");
    assert!(text.contains("gemma2.decode.d128.bf16.g4.sm_90a") && text.contains("miss, compiled"), "{text}");
    let (ok, text) = run(&["compile", "gemma2", "--arch", "sm_90a"]);
    assert!(ok && text.contains("hit (disk)"), "{text}");
    let (ok, text) = run(&["cache", "list"]);
    assert!(ok && text.contains("1 entries") && text.contains("variant=gemma2 op=decode arch=sm_90a"), "{text}");
    let (ok, text) = run(&["cache", "verify"]);
    assert!(ok && text.contains("1 entries verified"), "{text}");
    let (ok, text) = run(&["compile", "gemma2", "--arch", "sm_75"]);
    assert!(!ok && text.contains("older than sm_80"), "{text}");
    if !attnforge::engine::driver_present() {
        let (ok, text) = run(&["compile", "gemma2"]);
        assert!(!ok && text.contains("pass --arch"), "{text}");
    }
    let (ok, text) = run(&["cache", "clear"]);
    assert!(ok && text.contains("removed 1 files"), "{text}");
}

/// Regression (hardening audit, item 11): a `bits` parameter `t` beside a parameter `t_off`
/// failed NVRTC ("already declared"): the offsets field was `u_t_off`. It compiles now.
fn a_bits_parameter_beside_one_named_like_its_offsets_compiles() {
    let dir = tempfile::tempdir().unwrap();
    let v = load("t.json", r#"{ "name": "t", "params": { "t": "bits", "t_off": "i32" }, "mask": "bit(t) && kv_pos != t_off" }"#).unwrap();
    // And a Params with alignment gaps, declared with explicit padding (its layout proof holds).
    let padded = load("p.json", r#"{ "name": "p", "params": { "a": "i32", "w": "f32[qo_heads]", "b": "i32" }, "logits": "score * sm_scale + w * a + b" }"#).unwrap();
    let j = jit(dir.path());
    for v in [&v, &padded] {
        for cfg in [KernelConfig::decode(64, 64, DType::F16, 2).unwrap(), KernelConfig::prefill(64, 64, DType::F16, 2).unwrap()] {
            j.get(v, &cfg, &"sm_90a".parse().unwrap()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The layout proof can fail: a table whose C++ type has another size than Rust's field (a
/// field changed on one side only) is a compile error naming the field, and one whose struct
/// size disagrees with its members' is one naming the struct.
fn an_abi_table_that_disagrees_with_the_cpp_types_fails_to_compile() {
    let n = nvrtc();
    let arch: Arch = "sm_90a".parse().unwrap();
    let compile_log = |layouts: &[attnforge::abi::StructLayout]| {
        let src = attnforge::jit::render::abi_probe_source_for(layouts).unwrap();
        match n.compile(&src, &n.options(&arch), None) {
            Err(attnforge::Error::CompileFailed(f)) => f.log,
            other => panic!("expected a compile failure, got {:?}", other.map(|c| c.len())),
        }
    };
    // `k_slot_stride` widened to 64 bits in C++ only: every later offset would move.
    let mut t = attnforge::abi::layouts();
    let a = t.iter_mut().find(|l| l.name == "AttnArgs").unwrap();
    a.fields.iter_mut().find(|f| f.name == "k_slot_stride").unwrap().ctype = "long long";
    let log = compile_log(&t);
    assert!(log.contains("AttnArgs::k_slot_stride has another size in src/abi.rs"), "{log}");
    // A pointer declared where Rust has a 4-byte field.
    let mut t = attnforge::abi::layouts();
    let m = t.iter_mut().find(|l| l.name == "MergeArgs").unwrap();
    m.fields.iter_mut().find(|f| f.name == "group").unwrap().ctype = "const int*";
    assert!(compile_log(&t).contains("MergeArgs::group has another size"));
    // A table that packs a `long long` at offset 4: the sizes match, but C++ aligns it to 8,
    // which the struct's size shows.
    use attnforge::abi::{FieldLayout, StructLayout};
    let mut t = attnforge::abi::layouts();
    t.push(StructLayout {
        name: "Packed",
        template: "",
        instance: "Packed",
        probe: "Packed",
        size: 12,
        fields: vec![FieldLayout { name: "a", ctype: "int", offset: 0, size: 4 }, FieldLayout { name: "b", ctype: "long long", offset: 4, size: 8 }],
    });
    assert!(compile_log(&t).contains("Packed size differs from Rust"));
}

/// The device probe of the ABI structs' offsets (run by tier 2's `check_abi`) compiles.
/// `bench`'s read-only stream (decode's ceiling) compiles for every arch the kernels take.
fn the_read_ceiling_probe_compiles() {
    let n = nvrtc();
    let src = attnforge::testing::bench::read_probe_source();
    for arch in ["sm_80", "sm_90a"] {
        let arch: Arch = arch.parse().unwrap();
        let cubin = n.compile(&src, &n.options(&arch), None).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cubin.is_empty());
    }
}

/// The Hopper primitives (`templates/common/wgmma.cuh`, issue 14) compile for sm_90a, and the
/// probe's code holds the warpgroup MMAs (four m64n64k16 per entry) with their fence, commit and
/// wait; the header compiles to nothing elsewhere (sm_80 builds without the instructions).
fn the_wgmma_probe_compiles_for_sm90a_to_warpgroup_mmas() {
    let n = nvrtc();
    let src = attnforge::testing::hopper::wgmma_probe_source();
    let sm90: Arch = "sm_90a".parse().unwrap();
    let ptx = n.compile_ptx(&src, &sm90).unwrap_or_else(|e| panic!("{e}"));
    // Three probes per type: Q · Kᵀ (n64 and n128) from shared memory, P · V with A in registers.
    for (what, count) in [("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16", 8), ("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16", 8), ("wgmma.fence.sync.aligned", 6), ("wgmma.commit_group.sync.aligned", 6), ("wgmma.wait_group.sync.aligned 0", 6), ("fence.proxy.async.shared::cta", 6)] {
        assert_eq!(ptx.matches(what).count(), count, "{what} in the PTX");
    }
    for ty in ["bf16", "f16"] {
        assert_eq!(ptx.matches(&format!("wgmma.mma_async.sync.aligned.m64n128k16.f32.{ty}.{ty}")).count(), 4, "{ty}: the n128 probe");
    }
    let cubin = n.compile(&src, &n.options(&sm90), None).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cubin.is_empty());
    let sm80: Arch = "sm_80".parse().unwrap();
    let ptx80 = n.compile_ptx(&src, &sm80).unwrap_or_else(|e| panic!("{e}"));
    assert!(!ptx80.contains("wgmma.") && !ptx80.contains("fence.proxy.async"), "sm_80 has no warpgroup MMA");
}

/// The pipeline primitives (`templates/common/pipeline.cuh`: mbarriers with transaction
/// counts, bulk copies, setmaxnreg) compile for sm_90a into the probe's instructions, and to
/// none of them for sm_80.
fn the_pipeline_probe_compiles_for_sm90a_to_barriers_and_bulk_copies() {
    let n = nvrtc();
    let src = attnforge::testing::hopper::pipeline_probe_source();
    let sm90: Arch = "sm_90a".parse().unwrap();
    let ptx = n.compile_ptx(&src, &sm90).unwrap_or_else(|e| panic!("{e}"));
    for what in ["mbarrier.init.shared::cta.b64", "fence.mbarrier_init.release.cluster", "mbarrier.arrive.expect_tx.shared::cta.b64", "mbarrier.try_wait.parity.shared::cta.b64", "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes", "setmaxnreg.dec.sync.aligned.u32 40", "setmaxnreg.inc.sync.aligned.u32 232"] {
        assert!(ptx.contains(what), "{what} in the PTX");
    }
    assert!(!n.compile(&src, &n.options(&sm90), None).unwrap_or_else(|e| panic!("{e}")).is_empty());
    let ptx80 = n.compile_ptx(&src, &"sm_80".parse().unwrap()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!ptx80.contains("mbarrier.") && !ptx80.contains("setmaxnreg"), "sm_80 has none of them");
}

/// The one-tile attention probe (S = Q · Kᵀ, softmax on the fragments, P · V from registers)
/// compiles for sm_90a to four MMAs of each form per type.
fn the_attention_tile_probe_compiles_for_sm90a() {
    let n = nvrtc();
    let src = attnforge::testing::hopper::attention_tile_probe_source();
    let ptx = n.compile_ptx(&src, &"sm_90a".parse().unwrap()).unwrap_or_else(|e| panic!("{e}"));
    for ty in ["bf16", "f16"] {
        // d 64: 4 Q·Kᵀ + 4 P·V (n64); d 128: 8 Q·Kᵀ (n64, two panels) + 4 P·V (n128).
        assert_eq!(ptx.matches(&format!("wgmma.mma_async.sync.aligned.m64n64k16.f32.{ty}.{ty}")).count(), 16, "{ty}: m64n64");
        assert_eq!(ptx.matches(&format!("wgmma.mma_async.sync.aligned.m64n128k16.f32.{ty}.{ty}")).count(), 4, "{ty}: m64n128");
        assert!(ptx.contains(&format!("cvt.rn.{ty}x2.f32")), "{ty}: P packed in registers");
    }
    assert!(!n.compile(&src, &n.options(&"sm_90a".parse().unwrap()), None).unwrap_or_else(|e| panic!("{e}")).is_empty());
}

fn the_abi_probe_compiles() {
    let n = nvrtc();
    let src = attnforge::jit::render::abi_probe_source().unwrap();
    for arch in ["sm_80", "sm_90a"] {
        let arch: Arch = arch.parse().unwrap();
        n.compile(&src, &n.options(&arch), None).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The public state merge (`merge_states.cu.tera`) compiles for f16/bf16/f32 outputs on both
/// arches, goes through the same disk cache (a second process finds it), and its three dtypes
/// are three different entries.
fn the_state_merge_compiles_for_every_output_dtype_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let j1 = jit(dir.path());
    let mut keys = std::collections::HashSet::new();
    for arch in ["sm_80", "sm_90a"] {
        let arch: Arch = arch.parse().unwrap();
        for dt in [DType::F16, DType::Bf16, DType::F32] {
            let k = j1.get_merge_states(dt, &arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(k.origin, Origin::Compiled, "{}", k.name);
            assert!(k.name.starts_with(&format!("merge_states.{}", dt.name())), "{}", k.name);
            assert!(keys.insert(k.key), "{} has its own key", k.name);
            assert_eq!(j1.get_merge_states(dt, &arch).unwrap().origin, Origin::Memory);
        }
    }
    let j2 = jit(dir.path());
    assert_eq!(j2.get_merge_states(DType::Bf16, &"sm_90a".parse().unwrap()).unwrap().origin, Origin::Disk);
}

/// The paged gather ring probe (cp.async gathers announced on mbarriers, consumed by the
/// warpgroup MMA) compiles for sm_90a to its gathers, noinc arrivals and four MMAs per type.
fn the_gather_probe_compiles_for_sm90a() {
    let n = nvrtc();
    let src = attnforge::testing::hopper::gather_probe_source();
    let sm90: Arch = "sm_90a".parse().unwrap();
    let ptx = n.compile_ptx(&src, &sm90).unwrap_or_else(|e| panic!("{e}"));
    for what in ["cp.async.cg.shared.global", "cp.async.mbarrier.arrive.noinc.shared::cta.b64", "fence.proxy.async.shared::cta", "setmaxnreg.dec.sync.aligned.u32 40"] {
        assert!(ptx.contains(what), "{what} in the PTX");
    }
    for ty in ["bf16", "f16"] {
        assert_eq!(ptx.matches(&format!("wgmma.mma_async.sync.aligned.m64n64k16.f32.{ty}.{ty}")).count(), 4, "{ty}");
    }
    assert!(!n.compile(&src, &n.options(&sm90), None).unwrap_or_else(|e| panic!("{e}")).is_empty());
}

/// The Hopper prefill tile compiles only for sm_90a: for any other arch `Jit::get` refuses it
/// with an error naming the arch, before NVRTC sees it.
fn the_sm90_prefill_loop_is_refused_for_other_archs() {
    let dir = tempfile::tempdir().unwrap();
    let j = jit(dir.path());
    let v = shipped::resolve("causal").unwrap();
    let cfg = KernelConfig::prefill(128, 128, DType::Bf16, 4).unwrap().sm90_prefill().unwrap();
    for arch in ["sm_80", "sm_89", "sm_90", "sm_100a"] {
        let err = j.get(&v, &cfg, &arch.parse().unwrap()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("needs sm_90a") && err.contains(arch), "{arch}: {err}");
    }
    assert!(j.get(&v, &cfg, &"sm_90a".parse().unwrap()).is_ok());
}
