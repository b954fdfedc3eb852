//! Tier 2: needs a GPU. Without one every test is reported *ignored* (with the reason printed),
//! never passed, unless `ATTNFORGE_REQUIRE_GPU=1` (set on the device), which makes a missing GPU
//! a failure. A custom harness (libtest-mimic, `harness = false`) decides that at run time; it
//! takes the usual test arguments (filters, `--list`, `--test-threads`).
//!
//! Every check compares with the f64 CPU reference through `harness::compare` (its doc comment
//! justifies the tolerance) on fresh random inputs with poisoned outputs.

mod hopper;
mod merge;
mod prefill;

use std::collections::HashMap;

use attnforge::engine::{DeviceOutput, Engine};
use attnforge::testing::harness::{compare, decode_once, DeviceResult, DeviceWorkload};
use attnforge::jit::KernelConfig;
use attnforge::kv::{DType, Element, KvLayout};
use attnforge::plan::PlanMode;
use attnforge::reference::attention;
use attnforge::spec::params::{sample, Dims, ParamInput};
use attnforge::spec::shipped;
use attnforge::testing::workload::{Workload, WorkloadSpec};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The GPU for one test. Tests run only where `main` found a GPU, so a failure here is real.
fn engine() -> Engine {
    Engine::new(0).unwrap_or_else(|e| panic!("no GPU: {e}"))
}

/// `name` from the environment (ATTNFORGE_SEED, ATTNFORGE_GPU_CASES), else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    // Probe once: without a GPU every test is ignored (and says why), unless one is required.
    let probe = Engine::new(0);
    let hopper = probe.as_ref().is_ok_and(|e| e.arch().name() == "sm_90a");
    let missing = probe.err().map(|e| e.to_string());
    let required = std::env::var_os("ATTNFORGE_REQUIRE_GPU").is_some();
    if let Some(why) = &missing {
        eprintln!("tier 2: no GPU ({why}); {}", if required { "ATTNFORGE_REQUIRE_GPU is set, so every test fails" } else { "every GPU test is reported ignored" });
    }
    let trial = |name: &'static str, f: fn()| {
        let (ignored, missing) = (missing.is_some() && !required, missing.clone());
        libtest_mimic::Trial::test(name, move || match &missing {
            Some(why) => Err(format!("ATTNFORGE_REQUIRE_GPU is set but there is no GPU: {why}").into()),
            None => {
                f();
                Ok(())
            }
        })
        .with_ignored_flag(ignored)
    };
    // Hopper-only primitives (issue 14): reported ignored, saying so, on another GPU.
    if missing.is_none() && !hopper {
        eprintln!("tier 2: not an sm_90a GPU; the Hopper probes are reported ignored");
    }
    let trial_sm90 = |name: &'static str, f: fn()| trial(name, f).with_ignored_flag(!(hopper || missing.is_some() && required));
    let tests = vec![
        trial_sm90("hopper::the_wgmma_probe_matches_a_cpu_matmul", hopper::the_wgmma_probe_matches_a_cpu_matmul),
        trial_sm90("hopper::the_bulk_copy_ring_delivers_every_chunk", hopper::the_bulk_copy_ring_delivers_every_chunk),
        trial_sm90("hopper::the_attention_tile_probe_matches_an_f64_softmax", hopper::the_attention_tile_probe_matches_an_f64_softmax),
        trial_sm90("hopper::the_paged_gather_ring_feeds_the_warpgroup_mma", hopper::the_paged_gather_ring_feeds_the_warpgroup_mma),
        trial("hopper::the_fma_exp2_matches_f64_and_the_mufu_on_every_edge", hopper::the_fma_exp2_matches_f64_and_the_mufu_on_every_edge),
        trial("decode_matches_the_reference_on_random_batches", decode_matches_the_reference_on_random_batches),
        trial("merges_are_right_with_and_without_the_overlapped_launch", merges_are_right_with_and_without_the_overlapped_launch),
        trial("skewed_big_batches_are_balanced_across_ctas", skewed_big_batches_are_balanced_across_ctas),
        trial("wide_tiles_run_every_variant_where_a_launch_leaves_one_cta_per_sm", wide_tiles_run_every_variant_where_a_launch_leaves_one_cta_per_sm),
        trial("every_variant_splits_and_merges_correctly_with_many_heads", every_variant_splits_and_merges_correctly_with_many_heads),
        trial("deterministic_mode_is_bit_identical_across_batch_compositions", deterministic_mode_is_bit_identical_across_batch_compositions),
        trial("a_fixed_grid_plan_replays_in_a_cuda_graph_with_changing_lengths", a_fixed_grid_plan_replays_in_a_cuda_graph_with_changing_lengths),
        trial("a_fixed_table_replays_in_a_cuda_graph_through_the_low_level_calls", a_fixed_table_replays_in_a_cuda_graph_through_the_low_level_calls),
        trial("capturing_a_default_plan_and_bad_shapes_are_errors", capturing_a_default_plan_and_bad_shapes_are_errors),
        trial("prefill::prefill_matches_the_reference_on_random_ragged_batches", prefill::prefill_matches_the_reference_on_random_ragged_batches),
        trial("prefill::both_main_loops_match_the_reference", prefill::both_main_loops_match_the_reference),
        trial("prefill::a_long_causal_prompt_and_short_appends", prefill::a_long_causal_prompt_and_short_appends),
        trial("prefill::long_caches_split_across_ctas_and_merge", prefill::long_caches_split_across_ctas_and_merge),
        trial("prefill::prefill_is_bit_identical_across_batch_compositions", prefill::prefill_is_bit_identical_across_batch_compositions),
        trial("prefill::a_fixed_grid_prefill_plan_replays_in_a_cuda_graph", prefill::a_fixed_grid_prefill_plan_replays_in_a_cuda_graph),
        trial("prefill::cascades_match_the_reference_on_random_shared_prefixes", prefill::cascades_match_the_reference_on_random_shared_prefixes),
        trial("prefill::a_prefill_wrapper_runs_a_shared_prefix_as_a_cascade", prefill::a_prefill_wrapper_runs_a_shared_prefix_as_a_cascade),
        trial("prefill::a_decode_cascade_replays_in_a_cuda_graph_with_changing_suffix_lengths", prefill::a_decode_cascade_replays_in_a_cuda_graph_with_changing_suffix_lengths),
        trial("merge::the_state_merge_matches_the_reference", merge::the_state_merge_matches_the_reference),
        trial("nan_logits_make_their_rows_nan_as_in_the_reference", nan_logits_make_their_rows_nan_as_in_the_reference),
        trial("the_abi_structs_have_rusts_offsets_on_the_device", the_abi_structs_have_rusts_offsets_on_the_device),
    ];
    libtest_mimic::run(&args, tests).exit();
}

#[derive(Debug, Clone)]
struct Case {
    variant: usize,
    kv_lens: Vec<usize>,
    kv_heads: usize,
    group: usize,
    dims: (usize, usize),
    page_size: usize,
    layout: KvLayout,
    interleaved: bool,
    bf16: bool,
    mode: PlanMode,
    seed: u64,
}

fn random_case(rng: &mut StdRng, i: usize) -> Case {
    let shape = rng.random_range(0..10);
    let kv_lens: Vec<usize> = match shape {
        // Many short requests (empty ones included).
        0 => (0..rng.random_range(100..=300)).map(|_| rng.random_range(0..=200)).collect(),
        // One long request: split-KV territory.
        1 => vec![rng.random_range(5000..=20000)],
        // A few long, ragged requests.
        2 => (0..rng.random_range(2..=4)).map(|_| rng.random_range(0..=6000)).collect(),
        _ => (0..rng.random_range(1..=12)).map(|_| rng.random_range(0..=3000)).collect(),
    };
    let dims = [(64, 64), (96, 96), (128, 128), (256, 256), (192, 128)][rng.random_range(0..5)];
    let mode = match rng.random_range(0..4) {
        0 => PlanMode::Deterministic { chunk: [64, 256, 1000][rng.random_range(0..3)] },
        _ => PlanMode::Default,
    };
    Case {
        variant: i % shipped::SHIPPED.len(),
        kv_lens,
        kv_heads: rng.random_range(1..=2),
        group: [1, 4, 7, 8][rng.random_range(0..4)],
        dims,
        page_size: [1, 16, 64][rng.random_range(0..3)],
        layout: if rng.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd },
        interleaved: dims.0 == dims.1 && rng.random_bool(0.5),
        bf16: rng.random_bool(0.5),
        mode,
        seed: rng.random(),
    }
}

/// Runs one case against the reference (panicking on a mismatch); returns a summary line, the
/// plan's items per CTA (above 1: a balanced plan) and whether it ran on the wide tile.
fn check_case<T: Element + cudarc::driver::DeviceRepr>(e: &Engine, c: &Case) -> (String, usize, bool) {
    let v = shipped::all().unwrap().swap_remove(c.variant);
    let mut rng = StdRng::seed_from_u64(c.seed);
    let spec = WorkloadSpec {
        lens: c.kv_lens.iter().map(|&l| (1, l)).collect(),
        qo_heads: c.kv_heads * c.group,
        kv_heads: c.kv_heads,
        head_dim_qk: c.dims.0,
        head_dim_vo: c.dims.1,
        page_size: c.page_size,
        layout: c.layout,
        interleaved: c.interleaved,
        permute: true,
        spare_pages: rng.random_range(0..4),
    };
    let w = Workload::<T>::random(&spec, &mut rng).unwrap();
    let dims = Dims { qo_heads: spec.qo_heads, kv_heads: c.kv_heads, batch: c.kv_lens.len() };
    let p = sample(&v.params, dims, &spec.lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
    let cfg = KernelConfig::decode(c.dims.0, c.dims.1, T::DTYPE, c.group).unwrap();
    let k = e.decode_kernel(&v, &cfg).unwrap();
    let (got, plan) = decode_once(e, &k, &p, &w, c.mode, None).unwrap();
    let tile = k.decode_tile_for(&plan);
    let wide = k.runs_wide(&plan);
    if matches!(c.mode, PlanMode::Deterministic { .. }) {
        assert!(!wide, "a deterministic plan ran on the wide tile");
    }
    let want = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    let cmp = compare(&got, &want, T::DTYPE, c.dims.1);
    assert!(cmp.ok(), "{} {cmp}\nplan: {} items, {} merges, chunk {}\n{c:?}", v.name, plan.work.len(), plan.merge.len(), plan.chunk);
    let line = format!(
        "{:<15} B {:>3} max kv {:>5} g{} d{:?} p{} {:?} {}: {} items ({} per CTA), {} split, {}{} → {cmp}",
        v.name,
        c.kv_lens.len(),
        c.kv_lens.iter().max().unwrap_or(&0),
        c.group,
        c.dims,
        c.page_size,
        c.layout,
        if c.bf16 { "bf16" } else { "f16" },
        plan.work.len(),
        plan.per_cta,
        plan.merge.len(),
        tile.label(),
        if wide { " (wide)" } else { "" }
    );
    (line, plan.per_cta, wide)
}

fn decode_matches_the_reference_on_random_batches() {
    let e = engine();
    let mut rng = StdRng::seed_from_u64(env_or("ATTNFORGE_SEED", 2026));
    let cases: usize = env_or("ATTNFORGE_GPU_CASES", 60);
    for i in 0..cases {
        let c = random_case(&mut rng, i);
        let (line, _, _) = if c.bf16 { check_case::<bf16>(&e, &c) } else { check_case::<f16>(&e, &c) };
        eprintln!("case {i:>3}: {line}");
    }
}

fn merges_are_right_with_and_without_the_overlapped_launch() {
    let mut e = engine();
    let mut rng = StdRng::seed_from_u64(29);
    for on in [true, false] {
        e.set_programmatic_merge(on);
        assert_eq!(e.programmatic_merge(), on && e.arch().major >= 9);
        // A long request beside short ones on 8 KV heads splits, so merge_states runs.
        for (variant, group) in [(0, 4), (3, 1), (7, 8)] {
            let c = Case { variant, kv_lens: vec![12000, 40, 0, 3000], kv_heads: 8, group, dims: (128, 128), page_size: 16, layout: KvLayout::Nhd, interleaved: true, bf16: true, mode: PlanMode::Default, seed: rng.random() };
            eprintln!("overlap {on}: {}", check_case::<bf16>(&e, &c).0);
        }
    }
}

fn skewed_big_batches_are_balanced_across_ctas() {
    let e = engine();
    let mut rng = StdRng::seed_from_u64(23);
    // 300 requests (one empty, one of 20 000 positions, the rest 0–400) on 2 KV heads: more work
    // than one wave and one request far above a CTA's share, so every plan is balanced and the
    // long request is cut across CTAs and merged.
    for variant in 0..shipped::SHIPPED.len() {
        let mut kv_lens: Vec<usize> = (0..300).map(|_| rng.random_range(0..=400)).collect();
        (kv_lens[7], kv_lens[100]) = (20000, 0);
        let group = [4, 1, 8][variant % 3];
        let c = Case { variant, kv_lens, kv_heads: 2, group, dims: (128, 128), page_size: [16, 1][variant % 2], layout: KvLayout::Nhd, interleaved: true, bf16: variant % 2 == 0, mode: PlanMode::Default, seed: rng.random() };
        let (line, per_cta, _) = if c.bf16 { check_case::<bf16>(&e, &c) } else { check_case::<f16>(&e, &c) };
        eprintln!("{line}");
        let windowed = ["sliding_window", "gemma2", "chunked", "prefix_lm"].iter().any(|w| line.starts_with(w));
        assert!(windowed || per_cta > 1, "not balanced: {line}");
    }
}

fn wide_tiles_run_every_variant_where_a_launch_leaves_one_cta_per_sm() {
    let e = engine();
    let mut rng = StdRng::seed_from_u64(41);
    let mut wide_runs = 0;
    for variant in 0..shipped::SHIPPED.len() {
        for (j, dims) in [(128, 128), (64, 64), (256, 256), (192, 128)].into_iter().enumerate() {
            // SMs / 4 requests on 4 KV heads: one CTA per SM, unsplit, so every tensor-core
            // config whose wide ring fits runs on the wide tile. One request is empty, one ends
            // mid-page and mid-tile; group 1 (MHA, no wide tile) checks the CUDA-core loop beside.
            let len = rng.random_range(1200..=2600);
            let mut kv_lens = vec![len; e.sm_count() / 4];
            (kv_lens[0], kv_lens[1]) = (0, len - 37);
            let group = [4, 2, 8, 1][(variant + j) % 4];
            let c = Case {
                variant,
                kv_lens,
                kv_heads: 4,
                group,
                dims,
                page_size: [16, 1, 64][(variant + j) % 3],
                layout: if j % 2 == 0 { KvLayout::Nhd } else { KvLayout::Hnd },
                interleaved: dims.0 == dims.1 && variant % 2 == 0,
                bf16: (variant + j) % 2 == 0,
                mode: PlanMode::Default,
                seed: rng.random(),
            };
            let (line, _, wide) = if c.bf16 { check_case::<bf16>(&e, &c) } else { check_case::<f16>(&e, &c) };
            eprintln!("{line}");
            let cfg = KernelConfig::decode(dims.0, dims.1, DType::Bf16, group).unwrap();
            let fits = cfg.wide_decode().is_some_and(|w| w.smem_bytes() <= e.max_smem_per_block().unwrap());
            assert_eq!(wide, fits, "wide tile expected exactly where it exists: {line}");
            wide_runs += usize::from(wide);
        }
    }
    assert!(wide_runs >= 20, "only {wide_runs} cases ran on the wide tile");
}

fn every_variant_splits_and_merges_correctly_with_many_heads() {
    let e = engine();
    let mut rng = StdRng::seed_from_u64(7);
    for variant in 0..shipped::SHIPPED.len() {
        // 8 KV heads, GQA 4, one long and one short request: the planner must split.
        let c = Case { variant, kv_lens: vec![9000, 3], kv_heads: 8, group: 4, dims: (128, 128), page_size: 16, layout: KvLayout::Nhd, interleaved: true, bf16: true, mode: PlanMode::Default, seed: rng.random() };
        eprintln!("{}", check_case::<bf16>(&e, &c).0);
    }
}

fn deterministic_mode_is_bit_identical_across_batch_compositions() {
    let e = engine();
    let v = shipped::resolve("gemma2").unwrap();
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let k = e.decode_kernel(&v, &cfg).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let spec = |lens: Vec<usize>| WorkloadSpec { lens: lens.into_iter().map(|l| (1, l)).collect(), qo_heads: 8, kv_heads: 2, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let big = Workload::<bf16>::random(&spec(vec![7000, 300, 12000, 5]), &mut rng).unwrap();
    // The same request 2 alone: copy its pages into a fresh cache in another order.
    let mut alone = Workload::<bf16>::random(&spec(vec![12000]), &mut rng).unwrap();
    let kv = big.kv;
    let pages = big.pages.pages(2).to_vec();
    for (n, &src) in pages.iter().enumerate() {
        let dst = alone.pages.indices[n] as usize;
        let stride = kv.page_stride(128);
        let (from, to) = (src as usize * stride, dst * stride);
        alone.k[to..to + stride].copy_from_slice(&big.k[from..from + stride]);
    }
    alone.q.copy_from_slice(&big.q[2 * 8 * 128..3 * 8 * 128]);
    let given: HashMap<String, ParamInput> = [("window".to_string(), ParamInput::Scalar(9000.0)), ("soft_cap".to_string(), ParamInput::Scalar(30.0))].into();
    let run = |w: &Workload<bf16>| {
        let p = v.bind(&given, Dims { qo_heads: 8, kv_heads: 2, batch: w.pages.batch_size() }).unwrap();
        decode_once(&e, &k, &p, w, PlanMode::Deterministic { chunk: 1024 }, None).unwrap().0
    };
    let (a, b) = (run(&big), run(&alone));
    let row = &a.o[2 * 8 * 128..3 * 8 * 128];
    assert!(row.iter().zip(&b.o).all(|(x, y)| x.to_bits() == y.to_bits()), "outputs differ in bits");
    assert!(a.lse[16..24].iter().zip(&b.lse).all(|(x, y)| x.to_bits() == y.to_bits()), "lse differs in bits");
    // And it is right.
    let p = v.bind(&given, Dims { qo_heads: 8, kv_heads: 2, batch: 1 }).unwrap();
    let want = attention(&v, &p, &alone.batch(), &alone.q, &alone.k, alone.v(), None).unwrap();
    assert!(compare(&b, &want, DType::Bf16, 128).ok());
}

fn a_fixed_grid_plan_replays_in_a_cuda_graph_with_changing_lengths() {
    // Through the two-call wrapper in graph mode: buffers fixed at their capacities, `plan`
    // rewrites them between replays of a graph captured around one `run`.
    use attnforge::engine::{DecodeWrapper, GraphCapacity, KvCache, WrapperOptions};
    let e = engine();
    let v = shipped::resolve("sink").unwrap();
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let (max_batch, max_pages) = (8usize, 2000usize);
    let graph_cap = GraphCapacity { max_batch, max_tokens: max_batch, max_pages, max_ctas: 256 };
    let mut w = DecodeWrapper::new(&e, &v, &cfg, WrapperOptions { graph: Some(graph_cap), ..Default::default() }).unwrap();
    let spec = |lens: &[usize]| WorkloadSpec { lens: lens.iter().map(|&l| (1, l)).collect(), qo_heads: 16, kv_heads: 4, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let steps: Vec<Vec<usize>> = vec![vec![3000, 40, 0, 777], vec![5000, 1, 2, 3, 4000, 100, 9, 17], vec![10], vec![16000, 15000]];
    let first = Workload::<bf16>::random(&spec(&steps[0]), &mut rng).unwrap();
    let cache_len = max_pages * first.kv.page_stride(128);
    let mut cache = e.alloc::<bf16>(cache_len).unwrap();
    let mut q = e.alloc::<bf16>(max_batch * 16 * 128).unwrap();
    let mut res = DeviceResult::<bf16>::poisoned(&e, max_batch * 16 * 128, max_batch * 16).unwrap();
    let mut graph = None;
    let p = v.bind(&[("sinks".to_string(), ParamInput::Scalar(1.5))].into(), Dims { qo_heads: 16, kv_heads: 4, batch: max_batch }).unwrap();
    for (i, lens) in steps.iter().enumerate() {
        let mut wl = Workload::<bf16>::random(&spec(lens), &mut rng).unwrap();
        // One fixed cache pool for every step (the wrapper pads the batch to its capacity).
        wl.kv.num_pages = max_pages;
        wl.k.resize(cache_len, bf16::from_f32(0.5));
        let batch = wl.batch();
        let plan = w.plan(&batch, &p).unwrap().clone();
        e.copy_into(&wl.k, &mut cache).unwrap();
        e.copy_into(&wl.q, &mut q).unwrap();
        let total_q = batch.total_q();
        if graph.is_none() {
            e.synchronize().unwrap();
            e.stream().begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            w.run(&q, KvCache::Interleaved(&cache), DeviceOutput { o: &mut res.o, lse: &mut res.lse }).unwrap();
            graph = e.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap();
        }
        // Poison again, then replay.
        e.copy_into(&vec![bf16::from_f32(f32::NAN); max_batch * 16 * 128], &mut res.o).unwrap();
        e.copy_into(&vec![f32::NAN; max_batch * 16], &mut res.lse).unwrap();
        graph.as_ref().unwrap().launch().unwrap();
        let got_all = res.download(&e).unwrap();
        let want = attention(&v, &p, &batch, &wl.q, &wl.k, &wl.k, None).unwrap();
        let got = attnforge::reference::AttnOutput { o: got_all.o[..total_q * 16 * 128].to_vec(), lse: got_all.lse[..total_q * 16].to_vec() };
        let cmp = compare(&got, &want, DType::Bf16, 128);
        eprintln!("graph step {i}: lens {lens:?}: {} items, {} merges: {cmp}", plan.work.len(), plan.merge.len());
        assert!(cmp.ok(), "step {i}: {cmp}");
    }
    // A batch beyond the capacity, and parameters that change, are errors, not a silent write
    // past the captured buffers.
    let big = Workload::<bf16>::random(&spec(&[10; 9]), &mut rng).unwrap();
    assert!(w.plan(&big.batch(), &p).unwrap_err().to_string().contains("fixed table holds 8"));
}

/// Without a wrapper: a fixed table and fixed plan buffers, captured around one low-level
/// launch (buffers sized for the capacity), replayed with changing batches.
fn a_fixed_table_replays_in_a_cuda_graph_through_the_low_level_calls() {
    use attnforge::engine::{Capacity, KvCache};
    let e = engine();
    let v = shipped::resolve("gemma2").unwrap();
    let k = e.decode_kernel(&v, &KernelConfig::decode(64, 64, DType::F16, 2).unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(15);
    let cap = Capacity { max_batch: 6, max_tokens: 6, max_pages: 900 };
    let spec = |lens: &[usize]| WorkloadSpec { lens: lens.iter().map(|&l| (1, l)).collect(), qo_heads: 4, kv_heads: 2, head_dim_qk: 64, head_dim_vo: 64, page_size: 16, layout: KvLayout::Hnd, interleaved: true, permute: true, spare_pages: 0 };
    let p = v.bind(&[("window".to_string(), ParamInput::Scalar(700.0))].into(), Dims { qo_heads: 4, kv_heads: 2, batch: 1 }).unwrap();
    let dp = e.upload_params(&k.layout, &p).unwrap();
    let cache_len = cap.max_pages * 2 * 16 * 2 * 64;
    let (mut cache, mut q) = (e.alloc::<f16>(cache_len).unwrap(), e.alloc::<f16>(cap.max_tokens * 4 * 64).unwrap());
    let mut res = DeviceResult::<f16>::poisoned(&e, cap.max_tokens * 4 * 64, cap.max_tokens * 4).unwrap();
    let mode = PlanMode::FixedGrid { max_ctas: 128 };
    let (mut table, mut bufs, mut graph) = (None, None, None);
    for (i, lens) in [vec![3000, 20], vec![1, 2, 5000, 4, 900, 0], vec![6000]].iter().enumerate() {
        let mut wl = Workload::<f16>::random(&spec(lens), &mut rng).unwrap();
        wl.kv.num_pages = cap.max_pages;
        wl.k.resize(cache_len, f16::from_f32(0.25));
        let batch = wl.batch().validated().unwrap();
        match &mut table {
            None => table = Some(e.fixed_table(&batch, cap).unwrap()),
            Some(_) => e.upload_table(&batch, &mut table).unwrap(),
        }
        let t = table.as_ref().unwrap();
        let plan = e.plan_decode(&k, &p, &t.batch(), mode).unwrap();
        e.upload_plan(&plan, &mut bufs).unwrap();
        e.copy_into(&wl.k, &mut cache).unwrap();
        e.copy_into(&wl.q, &mut q).unwrap();
        if graph.is_none() {
            e.synchronize().unwrap();
            e.stream().begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            let dev = attnforge::engine::DeviceBatch { q: &q, kv: KvCache::Interleaved(&cache) };
            e.run_decode(&k, &plan, bufs.as_ref().unwrap(), &dp, t, &dev, DeviceOutput { o: &mut res.o, lse: &mut res.lse }, None).unwrap();
            graph = e.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap();
        }
        e.copy_into(&vec![f16::from_f32(f32::NAN); cap.max_tokens * 4 * 64], &mut res.o).unwrap();
        graph.as_ref().unwrap().launch().unwrap();
        let got_all = res.download(&e).unwrap();
        let total_q = batch.total_q();
        let want = attention(&v, &p, batch.batch(), &wl.q, &wl.k, &wl.k, None).unwrap();
        let got = attnforge::reference::AttnOutput { o: got_all.o[..total_q * 4 * 64].to_vec(), lse: got_all.lse[..total_q * 4].to_vec() };
        let cmp = compare(&got, &want, DType::F16, 64);
        eprintln!("low-level graph step {i}: lens {lens:?}: {} items: {cmp}", plan.work.len());
        assert!(cmp.ok(), "step {i}: {cmp}");
    }
}

fn capturing_a_default_plan_and_bad_shapes_are_errors() {
    let e = engine();
    let v = shipped::resolve("causal").unwrap();
    let cfg = KernelConfig::decode(64, 64, DType::F16, 2).unwrap();
    let k = e.decode_kernel(&v, &cfg).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let spec = WorkloadSpec { lens: vec![(1, 100), (1, 50)], qo_heads: 4, kv_heads: 2, head_dim_qk: 64, head_dim_vo: 64, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let w = Workload::<f16>::random(&spec, &mut rng).unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: 2 }).unwrap();
    let dev = DeviceWorkload::upload(&e, &w).unwrap();
    let plan = e.plan_decode(&k, &p, &dev.table.batch(), PlanMode::Default).unwrap();
    let mut bufs = None;
    e.upload_plan(&plan, &mut bufs).unwrap();
    let dp = e.upload_params(&k.layout, &p).unwrap();
    let bufs = bufs.unwrap();
    // Output one element short.
    let mut short = DeviceResult::<f16>::poisoned(&e, 2 * 4 * 64 - 1, 8).unwrap();
    let err = e.run_decode(&k, &plan, &bufs, &dp, &dev.table, &dev.batch(), short.out(), None).unwrap_err();
    assert!(err.to_string().contains("output length"), "{err}");
    // Wrong dtype for the kernel.
    let wb = Workload::<bf16>::random(&spec, &mut rng).unwrap();
    let devb = DeviceWorkload::upload(&e, &wb).unwrap();
    let mut outb = DeviceResult::<bf16>::poisoned(&e, 2 * 4 * 64, 8).unwrap();
    let err = e.run_decode(&k, &plan, &bufs, &dp, &devb.table, &devb.batch(), outb.out(), None).unwrap_err();
    assert!(err.to_string().contains("compiled for f16"), "{err}");
    // A softmax scale that is not positive and finite.
    let mut out = DeviceResult::<f16>::poisoned(&e, 2 * 4 * 64, 8).unwrap();
    for bad in [0.0, -0.125, f32::NAN, f32::INFINITY] {
        let err = e.run_decode(&k, &plan, &bufs, &dp, &dev.table, &dev.batch(), out.out(), Some(bad)).unwrap_err();
        assert!(err.to_string().contains("positive and finite"), "{err}");
    }
    // A plan made for another batch (same size, other lengths), and one not uploaded.
    let other = Workload::<f16>::random(&WorkloadSpec { lens: vec![(1, 300), (1, 10)], ..spec.clone() }, &mut rng).unwrap();
    let dev_other = DeviceWorkload::upload(&e, &other).unwrap();
    let err = e.run_decode(&k, &plan, &bufs, &dp, &dev_other.table, &dev_other.batch(), out.out(), None).unwrap_err();
    assert!(err.to_string().contains("made for another batch"), "{err}");
    let plan2 = e.plan_decode(&k, &p, &dev_other.table.batch(), PlanMode::Default).unwrap();
    let err = e.run_decode(&k, &plan2, &bufs, &dp, &dev_other.table, &dev_other.batch(), out.out(), None).unwrap_err();
    assert!(err.to_string().contains("not uploaded"), "{err}");
    // Capture with a default plan.
    e.synchronize().unwrap();
    e.stream().begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let err = e.run_decode(&k, &plan, &bufs, &dp, &dev.table, &dev.batch(), out.out(), None).unwrap_err();
    let _ = e.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
    assert!(err.to_string().contains("FixedGrid"), "{err}");
    // And through a wrapper that is not in graph mode (FlashInfer issue #3904 corrupts silently).
    let mut wr = attnforge::engine::DecodeWrapper::new(&e, &v, &cfg, Default::default()).unwrap();
    wr.plan(&w.batch(), &p).unwrap();
    e.synchronize().unwrap();
    e.stream().begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let err = wr.run(&dev.q, dev.kv(), out.out()).unwrap_err();
    let _ = e.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
    assert!(err.to_string().contains("FixedGrid"), "{err}");
    // A prefill-shaped batch given to decode.
    let spec2 = WorkloadSpec { lens: vec![(3, 100)], ..spec };
    let w2 = Workload::<f16>::random(&spec2, &mut rng).unwrap();
    let p2 = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: 1 }).unwrap();
    let err = e.plan_decode(&k, &p2, &w2.batch().validated().unwrap(), PlanMode::Default).unwrap_err();
    assert!(err.to_string().contains("use prefill"), "{err}");
    // A fixed grid too small for the batch.
    let err = e.plan_decode(&k, &p, &dev.table.batch(), PlanMode::FixedGrid { max_ctas: 1 }).unwrap_err();
    assert!(err.to_string().contains("fixed grid holds 1"), "{err}");
}

/// Regression (hardening audit, item 9): the reference reports a row with a NaN logit as NaN;
/// the kernels must too (a NaN logit becomes +inf, which poisons the row's sum), in decode on
/// both main loops and in prefill, split or not, with one NaN key or all of them.
fn nan_logits_make_their_rows_nan_as_in_the_reference() {
    let e = engine();
    let mut rng = StdRng::seed_from_u64(13);
    for logits in ["select(kv_pos == 3 && q_pos > 40, sqrt(-1.0), score * sm_scale * 0.5)", "sqrt(-1.0 - abs(score))"] {
        let text = format!(r#"{{ "name": "nan_logits", "logits": "{logits}" }}"#);
        let v = attnforge::spec::load("nan.json", &text).unwrap();
        for (group, lens) in [(1usize, vec![(1usize, 9000usize), (1, 60), (1, 2)]), (4, vec![(1, 9000), (1, 60), (1, 2)]), (4, vec![(50, 300), (3, 8000)])] {
            let spec = WorkloadSpec { lens: lens.clone(), qo_heads: 2 * group, kv_heads: 2, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 1 };
            let w = Workload::<bf16>::random(&spec, &mut rng).unwrap();
            let p = v.bind(&HashMap::new(), Dims { qo_heads: 2 * group, kv_heads: 2, batch: lens.len() }).unwrap();
            let decode = lens.iter().all(|l| l.0 == 1);
            let got = if decode {
                let k = e.decode_kernel(&v, &KernelConfig::decode(128, 128, DType::Bf16, group).unwrap()).unwrap();
                decode_once(&e, &k, &p, &w, PlanMode::Default, None).unwrap().0
            } else {
                let k = e.prefill_kernel(&v, &KernelConfig::prefill(128, 128, DType::Bf16, group).unwrap()).unwrap();
                attnforge::testing::harness::prefill_once(&e, &k, &p, &w, PlanMode::Default, None).unwrap().0
            };
            let want = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
            let nan_rows = want.lse.iter().filter(|x| x.is_nan()).count();
            assert!(nan_rows > 0, "the test must produce NaN rows");
            let cmp = compare(&got, &want, DType::Bf16, 128);
            eprintln!("{logits} g{group} {lens:?}: {nan_rows} NaN rows: {cmp}");
            assert!(cmp.ok(), "{logits} g{group} {lens:?}: {cmp}");
        }
    }
}

/// Every ABI struct's size and field offsets as the device compiler lays them out equal Rust's
/// (NVRTC has no compile-time offsetof; the sizes are also static_asserted in every kernel).
fn the_abi_structs_have_rusts_offsets_on_the_device() {
    engine().check_abi().unwrap();
    // And the probe really reads them: a layout with a field moved is caught.
    let src = attnforge::jit::render::abi_probe_source().unwrap();
    assert_eq!(src.code.matches("out[i++] =").count(), attnforge::abi::layouts().iter().map(|l| 1 + l.fields.len()).sum::<usize>());
}
