//! Prefill / append on the GPU against the f64 reference: random ragged batches over every
//! shipped variant, page sizes, GQA ratios, head dims and dtypes.

use attnforge::engine::{Engine, Sm90KvCopy};
use attnforge::testing::harness::{compare, prefill_once};
use attnforge::jit::KernelConfig;
use attnforge::kv::{Element, KvLayout};
use attnforge::plan::PlanMode;
use attnforge::reference::attention;
use attnforge::spec::params::{sample, Dims};
use attnforge::spec::shipped;
use attnforge::testing::workload::{Workload, WorkloadSpec};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[allow(clippy::too_many_arguments)]
fn check<T: Element + cudarc::driver::DeviceRepr>(e: &Engine, variant: usize, lens: Vec<(usize, usize)>, kv_heads: usize, group: usize, dims: (usize, usize), page_size: usize, layout: KvLayout, seed: u64) -> String {
    check_on::<T>(e, None, PlanMode::Default, variant, lens, kv_heads, group, dims, page_size, layout, seed)
}

/// [`check`] on a chosen main loop: `force` `None` the engine's choice (the Hopper loop on
/// sm_90a above d 128, else the portable one), `Some(false)` the portable loop (its default
/// tile given explicitly), `Some(true)` the Hopper loop (its tile given explicitly; the caller
/// checks the GPU has it). Checks which loop the prompt tile runs on.
#[allow(clippy::too_many_arguments)]
fn check_on<T: Element + cudarc::driver::DeviceRepr>(e: &Engine, force: Option<bool>, mode: PlanMode, variant: usize, lens: Vec<(usize, usize)>, kv_heads: usize, group: usize, dims: (usize, usize), page_size: usize, layout: KvLayout, seed: u64) -> String {
    let v = shipped::all().unwrap().swap_remove(variant);
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = WorkloadSpec {
        lens: lens.clone(),
        qo_heads: kv_heads * group,
        kv_heads,
        head_dim_qk: dims.0,
        head_dim_vo: dims.1,
        page_size,
        layout,
        interleaved: dims.0 == dims.1 && rng.random_bool(0.5),
        permute: true,
        spare_pages: rng.random_range(0..3),
    };
    let w = Workload::<T>::random(&spec, &mut rng).unwrap();
    let p = sample(&v.params, Dims { qo_heads: spec.qo_heads, kv_heads, batch: lens.len() }, &lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
    let plain = KernelConfig::prefill(dims.0, dims.1, T::DTYPE, group).unwrap();
    let cfg = match force {
        None => plain.clone(),
        Some(false) => KernelConfig { prefill_override: Some(plain.prefill_tile()), ..plain.clone() },
        Some(true) => plain.sm90_prefill().expect("head dims of 64-column panels"),
    };
    let k = e.prefill_kernel(&v, &cfg).unwrap();
    let sm90 = k.prompt().cfg.prefill_tile().sm90;
    let want = force.unwrap_or(e.arch().has_wgmma() && plain.prefers_sm90_prefill() && plain.sm90_prefill().is_some());
    assert_eq!(sm90, want, "the prompt tile's main loop");
    let (got, plan) = prefill_once(e, &k, &p, &w, mode, None).unwrap();
    let want = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    let cmp = compare(&got, &want, T::DTYPE, dims.1);
    let tile = if plan.rows == k.prompt().cfg.prefill_tile().rows() { if sm90 { "sm90" } else { "sm80" } } else { "append" };
    let line = format!(
        "{:<15} {tile:<6} lens {:?} g{group} d{dims:?} p{page_size} {layout:?} {}: {} items, {} merged rows → {cmp}",
        v.name,
        &lens[..lens.len().min(4)],
        T::DTYPE.name(),
        plan.work.len(),
        plan.merge.len()
    );
    assert!(cmp.ok(), "{line}");
    line
}

pub(crate) fn prefill_matches_the_reference_on_random_ragged_batches() {
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(super::env_or("ATTNFORGE_SEED", 99));
    let cases: usize = super::env_or("ATTNFORGE_GPU_CASES", 40);
    for i in 0..cases {
        let n = rng.random_range(1..=6);
        let lens: Vec<(usize, usize)> = (0..n)
            .map(|_| {
                let kv = rng.random_range(0..=1500);
                let q = if rng.random_bool(0.2) { rng.random_range(0..=kv.min(8)) } else { rng.random_range(0..=kv) };
                (q, kv)
            })
            .collect();
        let dims = [(64, 64), (96, 96), (128, 128), (256, 256), (192, 128)][rng.random_range(0..5)];
        let group = [1, 4, 7, 8][rng.random_range(0..4)];
        let page = [1, 16, 64][rng.random_range(0..3)];
        let layout = if rng.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd };
        let seed = rng.random();
        let kv_heads = rng.random_range(1..=2);
        let line = if rng.random_bool(0.5) {
            check::<bf16>(&e, i % shipped::SHIPPED.len(), lens, kv_heads, group, dims, page, layout, seed)
        } else {
            check::<f16>(&e, i % shipped::SHIPPED.len(), lens, kv_heads, group, dims, page, layout, seed)
        };
        eprintln!("prefill case {i:>3}: {line}");
    }
}

/// Both prefill main loops on the same card (the Hopper one where the GPU has it and the
/// portable one, each forced by its explicit tile, and the engine's own choice), on the same
/// random batches (a third in deterministic mode): long enough prompts
/// that the prompt tile runs, every variant, head dims 64 / 128 / 256 / 192×128, GQA 1/4/7/8,
/// page sizes 1/16/64. The Hopper loop's producer takes its three ways of moving K/V in turn
/// (auto, tensor copies wherever the cache takes them, gathers), so each meets every head dim
/// and page size.
pub(crate) fn both_main_loops_match_the_reference() {
    let mut e = super::engine();
    let mut rng = StdRng::seed_from_u64(super::env_or("ATTNFORGE_SEED", 314));
    let cases: usize = super::env_or("ATTNFORGE_GPU_CASES", 40);
    for i in 0..cases {
        let n = rng.random_range(1..=5);
        let lens: Vec<(usize, usize)> = (0..n)
            .map(|_| {
                let kv = rng.random_range(0..=1300);
                let q = if rng.random_bool(0.15) { rng.random_range(0..=kv.min(4)) } else { rng.random_range(kv / 2..=kv) };
                (q, kv)
            })
            .collect();
        let dims = [(64, 64), (128, 128), (256, 256), (192, 128)][rng.random_range(0..4)];
        let group = [1, 4, 7, 8][rng.random_range(0..4)];
        let page = [1, 16, 64][rng.random_range(0..3)];
        let layout = if rng.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd };
        let seed = rng.random();
        let kv_heads = rng.random_range(1..=2);
        // Every third case in deterministic mode (fixed 512-key chunks, split and merged).
        let mode = if i % 3 == 2 { PlanMode::Deterministic { chunk: 512 } } else { PlanMode::Default };
        for force in [Some(true), Some(false), None] {
            if force == Some(true) && !e.arch().has_wgmma() {
                eprintln!("loops case {i:>3}: the sm90 loop skipped: {} has no wgmma", e.arch().name());
                continue;
            }
            let copy = if force == Some(true) { [Sm90KvCopy::Auto, Sm90KvCopy::Tma, Sm90KvCopy::Gather][i / 3 % 3] } else { Sm90KvCopy::Auto };
            e.set_sm90_kv_copy(copy);
            // Tensor copies of 8 to 64 keys (as many as divide the page).
            let default_run = e.sm90_tma_run();
            let run = if force == Some(true) { [8, 16, 32, 64][i / 2 % 4] } else { default_run };
            e.set_sm90_tma_run(run).unwrap();
            let line = if i % 2 == 0 {
                check_on::<bf16>(&e, force, mode, i % shipped::SHIPPED.len(), lens.clone(), kv_heads, group, dims, page, layout, seed)
            } else {
                check_on::<f16>(&e, force, mode, i % shipped::SHIPPED.len(), lens.clone(), kv_heads, group, dims, page, layout, seed)
            };
            e.set_sm90_kv_copy(Sm90KvCopy::Auto);
            e.set_sm90_tma_run(default_run).unwrap();
            eprintln!("loops case {i:>3}: {line} [{copy:?}, runs of up to {run} keys]");
        }
    }
}

pub(crate) fn a_long_causal_prompt_and_short_appends() {
    let e = super::engine();
    // One 3000-token prompt (MHA) and speculative-decoding-style appends (q 8 over kv 900).
    eprintln!("{}", check::<bf16>(&e, 1, vec![(3000, 3000)], 2, 1, (128, 128), 16, KvLayout::Nhd, 1));
    eprintln!("{}", check::<bf16>(&e, 4, vec![(8, 900); 5], 2, 4, (128, 128), 16, KvLayout::Nhd, 2));
}

/// Few short queries over long caches: the plan splits the KV across CTAs and merges the
/// partial states (sink counted once, `normalize: none` summed, windows and masks per chunk).
pub(crate) fn long_caches_split_across_ctas_and_merge() {
    let e = super::engine();
    // (Windowed and chunked variants sample windows and chunks of at most 64 keys, too short to
    // split; the random test covers their splits over short prompts.)
    let names = ["causal", "sink", "sigmoid", "soft_cap", "tree_mask", "default", "alibi", "prefix_lm"];
    let all = shipped::all().unwrap();
    for (i, name) in names.iter().enumerate() {
        let idx = all.iter().position(|v| v.name == *name).unwrap();
        let lens = [vec![(8, 20000)], vec![(16, 12000), (1, 5000)], vec![(3, 7000), (0, 100), (5, 2600)]][i % 3].clone();
        let group = [4, 8, 1, 2][i % 4];
        let dims = [(128, 128), (64, 64)][i % 2];
        let line = if i % 2 == 0 {
            check::<bf16>(&e, idx, lens, 2, group, dims, 16, KvLayout::Nhd, 70 + i as u64)
        } else {
            check::<f16>(&e, idx, lens, 2, group, dims, [1, 16][i / 2 % 2], KvLayout::Hnd, 70 + i as u64)
        };
        assert!(!line.contains(" 0 merged rows"), "the plan did not split: {line}");
        eprintln!("split {line}");
    }
}

pub(crate) fn prefill_is_bit_identical_across_batch_compositions() {
    let e = super::engine();
    use attnforge::spec::params::ParamInput;
    use std::collections::HashMap;
    let v = shipped::resolve("soft_cap").unwrap();
    let k = e.prefill_kernel(&v, &KernelConfig::prefill(128, 128, attnforge::kv::DType::Bf16, 4).unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    let spec = |lens: Vec<(usize, usize)>| WorkloadSpec { lens, qo_heads: 8, kv_heads: 2, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let big = Workload::<bf16>::random(&spec(vec![(300, 700), (100, 1200), (5, 90)]), &mut rng).unwrap();
    // Request 1 alone, its pages copied into a fresh cache in another order.
    let mut alone = Workload::<bf16>::random(&spec(vec![(100, 1200)]), &mut rng).unwrap();
    let stride = big.kv.page_stride(128);
    for (n, &src) in big.pages.pages(1).iter().enumerate() {
        let dst = alone.pages.indices[n] as usize;
        alone.k[dst * stride..(dst + 1) * stride].copy_from_slice(&big.k[src as usize * stride..(src as usize + 1) * stride]);
    }
    let q0 = 300 * 8 * 128;
    alone.q.copy_from_slice(&big.q[q0..q0 + 100 * 8 * 128]);
    let given: HashMap<String, ParamInput> = [("soft_cap".to_string(), ParamInput::Scalar(20.0))].into();
    let run = |w: &Workload<bf16>| {
        let p = v.bind(&given, Dims { qo_heads: 8, kv_heads: 2, batch: w.pages.batch_size() }).unwrap();
        prefill_once(&e, &k, &p, w, PlanMode::Deterministic { chunk: 1024 }, None).unwrap().0
    };
    let (a, b) = (run(&big), run(&alone));
    assert!(a.o[q0..q0 + 100 * 8 * 128].iter().zip(&b.o).all(|(x, y)| x.to_bits() == y.to_bits()), "outputs differ in bits");
    assert!(a.lse[300 * 8..400 * 8].iter().zip(&b.lse).all(|(x, y)| x.to_bits() == y.to_bits()), "lse differs in bits");
}

pub(crate) fn a_fixed_grid_prefill_plan_replays_in_a_cuda_graph() {
    let e = super::engine();
    // Through the prefill wrapper in graph mode.
    use attnforge::engine::{DeviceOutput, GraphCapacity, KvCache, PrefillWrapper, WrapperOptions};
    use attnforge::kv::{Batch, PageTable};
    use attnforge::testing::harness::DeviceResult;
    use std::collections::HashMap;
    let v = shipped::resolve("causal").unwrap();
    let cfg = KernelConfig::prefill(64, 64, attnforge::kv::DType::F16, 2).unwrap();
    let (max_batch, max_tokens, max_pages) = (4usize, 512usize, 200usize);
    let graph_cap = GraphCapacity { max_batch, max_tokens, max_pages, max_ctas: 64 };
    let mut w = PrefillWrapper::new(&e, &v, &cfg, WrapperOptions { graph: Some(graph_cap), ..Default::default() }).unwrap();
    let kvs = attnforge::kv::KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: max_pages, page_size: 16, kv_heads: 2, head_dim_qk: 64, head_dim_vo: 64 };
    let mut rng = StdRng::seed_from_u64(8);
    let cache_host: Vec<f16> = (0..kvs.k_len()).map(|_| f16::from_f32(rng.random_range(-1.0..1.0))).collect();
    let cache = e.upload(&cache_host).unwrap();
    let mut q = e.alloc::<f16>(max_tokens * 4 * 64).unwrap();
    let mut res = DeviceResult::<f16>::poisoned(&e, max_tokens * 4 * 64, max_tokens * 4).unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: max_batch }).unwrap();
    let mut graph = None;
    for (step, lens) in [vec![(200usize, 300usize), (60, 60)], vec![(3, 900), (100, 100), (7, 7), (40, 800)], vec![(8, 300), (4, 50)], vec![(250, 1000)]].into_iter().enumerate() {
        let mut order: Vec<usize> = (0..max_pages).collect();
        order.shuffle(&mut rng);
        let table = PageTable::from_lens(&lens.iter().map(|l| l.1).collect::<Vec<_>>(), 16, &mut order.into_iter()).unwrap();
        let mut qo_host = vec![0i32];
        for &(ql, _) in &lens {
            qo_host.push(qo_host.last().unwrap() + ql as i32);
        }
        let total_q = *qo_host.last().unwrap() as usize;
        let q_host: Vec<f16> = (0..total_q * 4 * 64).map(|_| f16::from_f32(rng.random_range(-1.0..1.0))).collect();
        let batch = Batch { qo_indptr: &qo_host, pages: &table, kv: kvs, qo_heads: 4 };
        let p_step = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: lens.len() }).unwrap();
        let blocks = w.plan(&batch, &p_step).unwrap().work.len();
        e.copy_into(&q_host, &mut q).unwrap();
        if graph.is_none() {
            e.synchronize().unwrap();
            e.stream().begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            w.run(&q, KvCache::Interleaved(&cache), DeviceOutput { o: &mut res.o, lse: &mut res.lse }).unwrap();
            graph = e.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap();
        }
        e.copy_into(&vec![f16::from_f32(f32::NAN); max_tokens * 4 * 64], &mut res.o).unwrap();
        graph.as_ref().unwrap().launch().unwrap();
        let got_all = res.download(&e).unwrap();
        let want = attention(&v, &p, &batch, &q_host, &cache_host, &cache_host, None).unwrap();
        let got = attnforge::reference::AttnOutput { o: got_all.o[..total_q * 4 * 64].to_vec(), lse: got_all.lse[..total_q * 4].to_vec() };
        let cmp = compare(&got, &want, attnforge::kv::DType::F16, 64);
        eprintln!("prefill graph step {step}: {lens:?}: {blocks} blocks: {cmp}");
        assert!(cmp.ok(), "step {step}: {cmp}");
    }
}

/// One random shared-prefix batch through its detected cascade (any sharing pays) on the
/// prefill kernel, against the single-level f64 reference; deterministic plans run twice and
/// must agree bit for bit.
#[allow(clippy::too_many_arguments)]
fn check_cascade<T: Element + cudarc::driver::DeviceRepr>(e: &Engine, variant: usize, lens: Vec<(usize, usize)>, kv_heads: usize, group: usize, dims: (usize, usize), page_size: usize, deterministic: bool, seed: u64) -> String {
    use attnforge::cascade::Policy;
    use attnforge::testing::harness::cascade_once;
    let v = shipped::all().unwrap().swap_remove(variant);
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = WorkloadSpec {
        lens: lens.clone(),
        qo_heads: kv_heads * group,
        kv_heads,
        head_dim_qk: dims.0,
        head_dim_vo: dims.1,
        page_size,
        layout: if rng.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd },
        interleaved: dims.0 == dims.1 && rng.random_bool(0.5),
        permute: true,
        spare_pages: 1,
    };
    let mut w = Workload::<T>::random(&spec, &mut rng).unwrap();
    if rng.random_bool(0.5) {
        w.share_prefix(usize::MAX);
    } else {
        w.share_random_prefixes(&mut rng);
    }
    let p = sample(&v.params, Dims { qo_heads: spec.qo_heads, kv_heads, batch: lens.len() }, &lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
    let k = e.prefill_kernel(&v, &KernelConfig::prefill(dims.0, dims.1, T::DTYPE, group).unwrap()).unwrap();
    let policy = Policy { min_saved_bytes: 0, weigh_states: false, ..Policy::default() };
    let mode = if deterministic { PlanMode::Deterministic { chunk: 256 } } else { PlanMode::Default };
    let want = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    let Some((got, plan, cascade)) = cascade_once(e, &k, &p, &w, &policy, mode, None).unwrap() else {
        return format!("{:<15} lens {:?}: no shared page, no cascade", v.name, &lens[..lens.len().min(4)]);
    };
    let cmp = compare(&got, &want, T::DTYPE, dims.1);
    let line = format!(
        "{:<15} lens {:?} g{group} d{dims:?} p{page_size} {} {}: {} levels, {} keys read of {}, {} group items, {} slots → {cmp}",
        v.name,
        &lens[..lens.len().min(4)],
        T::DTYPE.name(),
        if deterministic { "det" } else { "default" },
        cascade.levels.len(),
        cascade.keys_read(),
        attnforge::cascade::Cascade::single(&w.batch()).keys_read(),
        plan.work.len(),
        plan.num_partials
    );
    assert!(cmp.ok(), "{line}");
    let bits = |o: &attnforge::reference::AttnOutput| o.o.iter().chain(&o.lse).map(|x| x.to_bits()).collect::<Vec<u32>>();
    if deterministic {
        let (again, _, _) = cascade_once(e, &k, &p, &w, &policy, mode, None).unwrap().unwrap();
        assert!(bits(&again) == bits(&got), "{line}: a deterministic cascade differs between two runs");
    }
    // A decode batch also runs as a decode cascade: shared levels on the prefill kernel,
    // suffixes on the decode kernel.
    let line = if lens.iter().all(|&(q, _)| q <= 1) {
        let dk = e.decode_kernel(&v, &KernelConfig::decode(dims.0, dims.1, T::DTYPE, group).unwrap()).unwrap();
        let (dgot, dplan) = attnforge::testing::harness::decode_cascade_once(e, &dk, &k, &p, &w, &cascade, mode, None).unwrap();
        let dcmp = compare(&dgot, &want, T::DTYPE, dims.1);
        let pre = dplan.prefix.as_ref().map_or(0, |x| x.work.len());
        let line = format!("{line}; decode cascade: {pre} group items + {} decode items, {} merges → {dcmp}", dplan.work.len(), dplan.merge.len());
        assert!(dcmp.ok(), "{line}");
        if deterministic {
            let (again, _) = attnforge::testing::harness::decode_cascade_once(e, &dk, &k, &p, &w, &cascade, mode, None).unwrap();
            assert!(bits(&again) == bits(&dgot), "{line}: a deterministic decode cascade differs between two runs");
        } else {
            // And in its fixed-grid (CUDA-graph) form, at a graph wrapper's capacity for twice
            // the batch (idle prefill CTAs exit, groups that do not fit are read by decode items).
            let target = e.plan_target(&dk);
            let fixed = PlanMode::FixedGrid { max_ctas: attnforge::plan::decode_fixed_grid_bound(&v, target, kv_heads, 2 * lens.len()) };
            let (fgot, fplan) = attnforge::testing::harness::decode_cascade_once(e, &dk, &k, &p, &w, &cascade, fixed, None).unwrap();
            let fcmp = compare(&fgot, &want, T::DTYPE, dims.1);
            let pre = fplan.prefix.as_ref().map_or(0, |x| x.work.len());
            let line = format!("{line}; fixed grid: {pre} group items → {fcmp}");
            assert!(fcmp.ok(), "{line}");
            return line;
        }
        line
    } else {
        line
    };
    line
}

pub(crate) fn cascades_match_the_reference_on_random_shared_prefixes() {
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(super::env_or("ATTNFORGE_SEED", 15));
    let cases: usize = super::env_or("ATTNFORGE_GPU_CASES", 40);
    for i in 0..cases {
        let n = rng.random_range(1..=12);
        // Decode-like batches (one query token) and appends, an empty request now and then.
        let decode = rng.random_bool(0.5);
        let lens: Vec<(usize, usize)> = (0..n)
            .map(|_| {
                let kv = if rng.random_bool(0.1) { 0 } else { rng.random_range(1..=1200) };
                let q = if decode { kv.min(1) } else { rng.random_range(0..=kv.min(40)) };
                (q, kv)
            })
            .collect();
        let dims = [(64, 64), (128, 128), (256, 256), (192, 128)][rng.random_range(0..4)];
        let group = [1, 4, 7, 8][rng.random_range(0..4)];
        let page = [1, 16, 64][rng.random_range(0..3)];
        let kv_heads = rng.random_range(1..=2);
        let det = rng.random_bool(0.25);
        let seed = rng.random();
        let line = if rng.random_bool(0.5) {
            check_cascade::<bf16>(&e, i % shipped::SHIPPED.len(), lens, kv_heads, group, dims, page, det, seed)
        } else {
            check_cascade::<f16>(&e, i % shipped::SHIPPED.len(), lens, kv_heads, group, dims, page, det, seed)
        };
        eprintln!("cascade case {i:>3}: {line}");
    }
}

/// A prefill wrapper with the default policy plans 24 decode requests sharing a 4096-token
/// prefix as a cascade by itself (the prefix's keys read once), and gives the reference's result.
pub(crate) fn a_prefill_wrapper_runs_a_shared_prefix_as_a_cascade() {
    use attnforge::engine::{DeviceOutput, KvCache, PrefillWrapper, WrapperOptions};
    use attnforge::testing::harness::DeviceResult;
    use std::collections::HashMap;
    let e = super::engine();
    let v = shipped::resolve("causal").unwrap();
    let cfg = KernelConfig::prefill(128, 128, attnforge::kv::DType::Bf16, 4).unwrap();
    let lens: Vec<(usize, usize)> = (0..24).map(|i| (1, 4096 + 37 * i + 1)).collect();
    let spec = WorkloadSpec { lens: lens.clone(), qo_heads: 32, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let mut rng = StdRng::seed_from_u64(21);
    let mut w = Workload::<bf16>::random(&spec, &mut rng).unwrap();
    w.share_prefix(4096);
    let batch = w.batch();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: lens.len() }).unwrap();
    let mut wr = PrefillWrapper::new(&e, &v, &cfg, WrapperOptions::default()).unwrap();
    let plan = wr.plan(&batch, &p).unwrap().clone();
    assert!(!plan.groups.is_empty(), "the wrapper did not plan a cascade: {} items", plan.work.len());
    let q = e.upload(&w.q).unwrap();
    let cache = e.upload(&w.k).unwrap();
    let mut res = DeviceResult::<bf16>::poisoned(&e, w.q.len(), lens.len() * 32).unwrap();
    wr.run(&q, KvCache::Interleaved(&cache), DeviceOutput { o: &mut res.o, lse: &mut res.lse }).unwrap();
    let got = res.download(&e).unwrap();
    let want = attention(&v, &p, &batch, &w.q, &w.k, w.v(), None).unwrap();
    let cmp = compare(&got, &want, attnforge::kv::DType::Bf16, 128);
    eprintln!("wrapper cascade: {} group items, {} slots → {cmp}", plan.work.len(), plan.num_partials);
    assert!(cmp.ok(), "{cmp}");
    // Turned off, the same batch plans without one.
    let mut off = PrefillWrapper::new(&e, &v, &cfg, WrapperOptions { cascade: attnforge::cascade::Policy { enabled: false, ..Default::default() }, ..Default::default() }).unwrap();
    assert!(off.plan(&batch, &p).unwrap().groups.is_empty());
}

/// A decode wrapper with a cascade kernel in CUDA-graph mode: one graph captured around `run`
/// on the first step replays steps whose shared prefix, suffix lengths and batch change —
/// sharing, not sharing, sharing again — against the f64 reference each time.
pub(crate) fn a_decode_cascade_replays_in_a_cuda_graph_with_changing_suffix_lengths() {
    use attnforge::engine::{DecodeWrapper, DeviceOutput, GraphCapacity, KvCache, WrapperOptions};
    use attnforge::testing::harness::DeviceResult;
    use std::sync::Arc;
    let e = super::engine();
    let v = shipped::resolve("sink").unwrap();
    let dk = Arc::new(e.decode_kernel(&v, &KernelConfig::decode(128, 128, attnforge::kv::DType::Bf16, 4).unwrap()).unwrap());
    let pk = Arc::new(e.prefill_kernel(&v, &KernelConfig::prefill(128, 128, attnforge::kv::DType::Bf16, 4).unwrap()).unwrap());
    // Pages: the workloads allocate every request's pages before sharing, so the pool and the
    // table hold the largest step's unshared count (step 1: 16 × about 560).
    let (max_batch, max_pages) = (48usize, 10000usize);
    let max_ctas = attnforge::plan::decode_fixed_grid_bound(&v, e.plan_target(&dk), 4, max_batch);
    let graph = GraphCapacity { max_batch, max_tokens: max_batch, max_pages, max_ctas };
    let policy = attnforge::cascade::Policy { min_saved_bytes: 0, weigh_states: false, ..Default::default() };
    let mut w = DecodeWrapper::with_cascade(&e, dk, pk, WrapperOptions { graph: Some(graph), cascade: policy, ..Default::default() }).unwrap();
    let spec = |lens: &[usize]| WorkloadSpec { lens: lens.iter().map(|&l| (1, l)).collect(), qo_heads: 16, kv_heads: 4, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let mut rng = StdRng::seed_from_u64(15);
    // (requests' lengths, tokens of request 0 the others share: 0 shares nothing)
    let steps: Vec<(Vec<usize>, usize)> = vec![
        ((0..16).map(|i| 8192 + 1 + 13 * i).collect(), 8192),
        ((0..16).map(|i| 8192 + 40 + 97 * i).collect(), 8192),
        (vec![3000, 40, 0, 777, 5000], 0),
        ((0..48).map(|i| 2048 + 200 + (i * 7919) % 300).collect(), 2048),
        ((0..5).map(|i| 20000 + 5 * i).collect(), 16384),
        (vec![1, 17], 0),
    ];
    let first = Workload::<bf16>::random(&spec(&steps[0].0), &mut rng).unwrap();
    let cache_len = max_pages * first.kv.page_stride(128);
    let mut cache = e.alloc::<bf16>(cache_len).unwrap();
    let mut q = e.alloc::<bf16>(max_batch * 16 * 128).unwrap();
    let mut res = DeviceResult::<bf16>::poisoned(&e, max_batch * 16 * 128, max_batch * 16).unwrap();
    let p = v.bind(&[("sinks".to_string(), attnforge::spec::params::ParamInput::Scalar(0.5))].into(), Dims { qo_heads: 16, kv_heads: 4, batch: max_batch }).unwrap();
    let mut captured = None;
    let mut cascades = 0;
    for (i, (lens, shared)) in steps.iter().enumerate() {
        let mut wl = Workload::<bf16>::random(&spec(lens), &mut rng).unwrap();
        if *shared > 0 {
            wl.share_prefix(*shared);
        }
        wl.kv.num_pages = max_pages;
        wl.k.resize(cache_len, bf16::from_f32(0.25));
        let batch = wl.batch();
        let plan = w.plan(&batch, &p).unwrap().clone();
        cascades += usize::from(w.plans_cascade());
        assert_eq!(w.plans_cascade(), *shared > 0, "step {i}: a cascade iff the step shares a prefix");
        e.copy_into(&wl.k, &mut cache).unwrap();
        e.copy_into(&wl.q, &mut q).unwrap();
        if captured.is_none() {
            e.synchronize().unwrap();
            e.stream().begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            w.run(&q, KvCache::Interleaved(&cache), DeviceOutput { o: &mut res.o, lse: &mut res.lse }).unwrap();
            captured = e.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap();
        }
        e.copy_into(&vec![bf16::from_f32(f32::NAN); max_batch * 16 * 128], &mut res.o).unwrap();
        e.copy_into(&vec![f32::NAN; max_batch * 16], &mut res.lse).unwrap();
        captured.as_ref().unwrap().launch().unwrap();
        let all = res.download(&e).unwrap();
        let total_q = batch.total_q();
        let got = attnforge::reference::AttnOutput { o: all.o[..total_q * 16 * 128].to_vec(), lse: all.lse[..total_q * 16].to_vec() };
        let want = attention(&v, &p, &batch, &wl.q, &wl.k, &wl.k, None).unwrap();
        let cmp = compare(&got, &want, attnforge::kv::DType::Bf16, 128);
        let pre = plan.prefix.as_ref().map_or(0, |x| x.work.len());
        eprintln!("decode cascade graph step {i}: {} requests, shared {shared}: {pre} group items, {} decode items, {} merges: {cmp}", lens.len(), plan.work.len(), plan.merge.len());
        assert!(cmp.ok(), "step {i}: {cmp}");
    }
    assert_eq!(cascades, 4);
}
