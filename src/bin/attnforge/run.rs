//! The GPU-facing commands: `run`, `bench` and the demo. Each checks the GPU against the CPU
//! reference or times it; with no GPU, each says so and does what the CPU can.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use attnforge::testing::bench::{anchor_decode_shapes, bench_decode, measure_copy_gbps, DecodeTuning, ANCHOR_CARD};
use attnforge::engine::Engine;
use attnforge::testing::harness::{compare, decode_once};
use attnforge::jit::{Jit, KernelConfig, Origin};
use attnforge::kv::{DType, Element, KvLayout};
use attnforge::plan::PlanMode;
use attnforge::reference::{self, AttnOutput};
use attnforge::spec::params::{sample, Dims, ParamValues};
use attnforge::spec::shipped;
use attnforge::spec::Variant;
use attnforge::testing::workload::{Workload, WorkloadSpec};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{parse_params, Op, RunArgs, Suite};

/// The shape flags of `run`, checked before anything is allocated: lengths within
/// `MAX_TOKENS`, counts within the i32 indices, no size that overflows.
fn checked_shape(a: &RunArgs, q_len: usize) -> Result<()> {
    use attnforge::kv::{MAX_KERNEL_INDEX, MAX_TOKENS};
    let limit = |what: &str, v: usize, max: usize, why: &str| if v > max { bail!("--{what} {v}: at most {max} ({why})") } else { Ok(()) };
    limit("kv-len", a.kv_len, MAX_TOKENS, "2^30 tokens per request")?;
    limit("q-len", q_len, MAX_TOKENS, "2^30 tokens per request")?;
    limit("batch", a.batch, MAX_KERNEL_INDEX, "requests are indexed in i32")?;
    limit("page-size", a.page_size, MAX_KERNEL_INDEX, "pages are indexed in i32")?;
    for (what, v) in [("page-size", a.page_size), ("kv-heads", a.kv_heads), ("qo-heads", a.qo_heads)] {
        if v == 0 {
            bail!("--{what} must be at least 1");
        }
    }
    if a.qo_heads % a.kv_heads != 0 {
        bail!("qo_heads ({}) must be a multiple of kv_heads ({})", a.qo_heads, a.kv_heads);
    }
    if a.batch.checked_mul(q_len).is_none_or(|t| t > MAX_KERNEL_INDEX) {
        bail!("--batch {} × --q-len {q_len}: at most 2^31 - 1 query tokens in a batch", a.batch);
    }
    if a.batch.checked_mul(a.kv_len.div_ceil(a.page_size)).is_none_or(|t| t > MAX_KERNEL_INDEX) {
        bail!("--batch {} × --kv-len {} / --page-size {}: at most 2^31 - 1 pages in a cache", a.batch, a.kv_len, a.page_size);
    }
    Ok(())
}

/// Host memory `run` needs for a workload of `elems` input values of `elem` bytes and `out`
/// output rows of `dvo` values (reference and GPU copies, f32), refused with a clear message when
/// the machine has less available (`/proc/meminfo`), rather than dying in the allocator.
fn check_host_memory(elems: u128, elem: u128, out_values: u128) -> Result<()> {
    let need = elems * elem + out_values * 4 * 2;
    let Some(avail) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u128>().ok()).map(|kb| kb * 1024)
    }) else {
        return Ok(());
    };
    if need > avail {
        bail!("this workload needs about {:.1} GB of host memory for its inputs and outputs; {:.1} GB are available", need as f64 / 1e9, avail as f64 / 1e9);
    }
    Ok(())
}

pub(crate) fn run(a: &RunArgs) -> Result<()> {
    let variant = shipped::resolve(&a.spec)?;
    let q_len = match a.op {
        Op::Decode => a.q_len.unwrap_or(1),
        Op::Prefill => a.q_len.unwrap_or(a.kv_len),
    };
    checked_shape(a, q_len)?;
    // The scale is checked before any work (the reference and the launch check it again).
    attnforge::spec::params::resolve_sm_scale(a.sm_scale, a.head_dim).map_err(anyhow::Error::msg)?;
    let mut lens = Vec::new();
    lens.try_reserve_exact(a.batch).map_err(|_| anyhow::anyhow!("--batch {}: cannot allocate the request list", a.batch))?;
    lens.resize(a.batch, (q_len, a.kv_len));
    let spec = WorkloadSpec {
        lens,
        qo_heads: a.qo_heads,
        kv_heads: a.kv_heads,
        head_dim_qk: a.head_dim,
        head_dim_vo: a.head_dim_vo.unwrap_or(a.head_dim),
        page_size: a.page_size,
        layout: a.layout,
        interleaved: a.head_dim_vo.is_none_or(|d| d == a.head_dim),
        permute: true,
        spare_pages: 0,
    };
    let (kv, total_q) = spec.shape()?;
    let dvo = spec.head_dim_vo as u128;
    let inputs = total_q as u128 * spec.qo_heads as u128 * spec.head_dim_qk as u128 + kv.k_len() as u128 + if spec.interleaved { 0 } else { kv.v_len() as u128 };
    check_host_memory(inputs, a.dtype.size() as u128, total_q as u128 * spec.qo_heads as u128 * (dvo + 1))?;
    let mut given = parse_params(&a.params)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let dims = Dims { qo_heads: a.qo_heads, kv_heads: a.kv_heads, batch: a.batch };
    let missing: Vec<_> = variant.params.iter().filter(|d| d.ty.dim == Some(attnforge::spec::typed::ParamDim::QueryKey) && !given.contains_key(&d.name)).collect();
    for d in missing {
        // A bit matrix cannot be typed on a command line: draw one, and say so.
        println!("  note: bits parameter `{}` not given; using random bits (each set with probability 1/2)", d.name);
        if let Some(attnforge::spec::params::ParamValue::Bits { data, offsets }) = sample(std::slice::from_ref(d), dims, &spec.lens, |lo, hi| rng.random_range(lo..=hi)).values().next() {
            given.insert(d.name.clone(), attnforge::spec::params::ParamInput::Bits(data.clone(), offsets.clone()));
        }
    }
    let params = variant.bind(&given, dims)?;
    println!(
        "variant {} ({}), {} × {} (q {q_len}, kv {}), heads {}/{}, head dim {}/{}, page {}, {}, {}",
        variant.name,
        variant.origin,
        a.batch,
        if a.op == Op::Decode { "decode" } else { "prefill" },
        a.kv_len,
        a.qo_heads,
        a.kv_heads,
        spec.head_dim_qk,
        spec.head_dim_vo,
        a.page_size,
        a.dtype.name(),
        a.layout.name()
    );
    match a.dtype {
        DType::F16 => run_typed::<f16>(a, &variant, &params, &spec, &mut rng),
        DType::Bf16 => run_typed::<bf16>(a, &variant, &params, &spec, &mut rng),
        DType::F32 => bail!("f32 inputs are not supported; use f16 or bf16"),
    }
}

fn run_typed<T: Element + cudarc::driver::DeviceRepr>(a: &RunArgs, v: &Variant, p: &ParamValues, spec: &WorkloadSpec, rng: &mut StdRng) -> Result<()> {
    // The prefill kernel's config (prefill, and the cascades of --shared-prefix), with --tile
    // checked before any work.
    // (Only with --tile: a reference-only run takes head dims no kernel does.)
    let prefill_cfg = || -> Result<KernelConfig> {
        let mut c = KernelConfig::prefill(spec.head_dim_qk, spec.head_dim_vo, T::DTYPE, spec.qo_heads / spec.kv_heads)?;
        c.prefill_override = a.tile;
        c.validate()?;
        Ok(c)
    };
    if a.tile.is_some() {
        if a.op == Op::Decode && a.shared_prefix.is_none() {
            bail!("--tile picks a prefill tile: it applies to --op prefill and to --shared-prefix cascades");
        }
        prefill_cfg()?;
    }
    let mut w = Workload::<T>::random(spec, rng)?;
    if let Some(n) = a.shared_prefix {
        if n > a.kv_len {
            bail!("--shared-prefix {n} is longer than --kv-len {}", a.kv_len);
        }
        w.share_prefix(n);
    }
    let t0 = Instant::now();
    let want = reference::attention(v, p, &w.batch(), &w.q, &w.k, w.v(), a.sm_scale)?;
    let ref_secs = t0.elapsed().as_secs_f64();
    println!("  CPU reference (f64): {} rows in {:.1} ms", want.lse.len(), ref_secs * 1e3);
    summarise(&want, spec.head_dim_vo);
    if a.shared_prefix.is_some() {
        compare_cascade(a, v, p, &w, &want)?;
    }
    let mut got = None;
    if !a.cpu {
        let e = Engine::new(0).context("the GPU path needs a GPU (pass --cpu for the reference alone)")?;
        let group = spec.qo_heads / spec.kv_heads;
        let mode = if a.deterministic { PlanMode::Deterministic { chunk: 1024 } } else { PlanMode::Default };
        let out = if a.shared_prefix.is_some() {
            // The cascade runs on the prefill kernel, decode batches too (one-token appends).
            let k = e.prefill_kernel(v, &prefill_cfg()?)?;
            let policy = attnforge::cascade::Policy { min_saved_bytes: 0, weigh_states: false, ..Default::default() };
            let Some((out, plan, c)) = attnforge::testing::harness::cascade_once(&e, &k, p, &w, &policy, mode, a.sm_scale)? else {
                bail!("no shared whole page to read once (the prefix is shorter than a page, or there is one request): no cascade to run");
            };
            println!(
                "  cascade on {}: {} levels, {} group items over blocks of {} rows, {} partial states merged into {} tokens (chunk {})",
                e.describe(),
                c.levels.len(),
                plan.work.len(),
                plan.rows,
                plan.num_partials,
                plan.merge.len(),
                plan.chunk
            );
            out
        } else if a.op == Op::Decode {
            let k = e.decode_kernel(v, &KernelConfig::decode(spec.head_dim_qk, spec.head_dim_vo, T::DTYPE, group)?)?;
            println!("  decode on {}: kernel {} ({}, {:.1} ms)", e.describe(), k.compiled().name, origin(k.compiled().origin), k.compiled().elapsed.as_secs_f64() * 1e3);
            let (out, plan) = decode_once(&e, &k, p, &w, mode, a.sm_scale)?;
            let wide = if k.runs_wide(&plan) { " (wide)" } else { "" };
            println!("  plan: {} work items, {} split requests (chunk {}), workspace {} KB; tile {}{wide}", plan.work.len(), plan.merge.len(), plan.chunk, plan.workspace_bytes / 1024, k.decode_tile_for(&plan).label());
            out
        } else {
            let k = e.prefill_kernel(v, &prefill_cfg()?)?;
            for f in &k.tiles {
                let t = f.cfg.prefill_tile();
                println!("  prefill on {}: kernel {} ({} rows, {}; {}, {:.1} ms)", e.describe(), f.compiled.name, t.rows(), t.label(), origin(f.compiled.origin), f.compiled.elapsed.as_secs_f64() * 1e3);
            }
            let (out, plan) = attnforge::testing::harness::prefill_once(&e, &k, p, &w, mode, a.sm_scale)?;
            println!(
                "  plan: {} work items over blocks of {} query rows; {} tokens merged from KV chunks (chunk {}), workspace {} KB",
                plan.work.len(),
                plan.rows,
                plan.merge.len(),
                plan.chunk,
                plan.workspace_bytes / 1024
            );
            out
        };
        let cmp = compare(&out, &want, T::DTYPE, spec.head_dim_vo);
        println!("  GPU vs reference: {cmp}");
        let ok = cmp.ok();
        got = Some(out);
        if !ok && a.dump.is_none() {
            bail!("the GPU output does not match the reference");
        }
    }
    if let Some(dir) = &a.dump {
        dump(dir, v, p, &w, &want, got.as_ref())?;
        println!("  wrote q, k_cache, v_cache, page table, params, o/lse (reference{}) to {}", if got.is_some() { " and GPU" } else { "" }, dir.display());
    }
    Ok(())
}

fn dump<T: Element>(dir: &Path, v: &Variant, p: &ParamValues, w: &Workload<T>, want: &AttnOutput, got: Option<&AttnOutput>) -> Result<()> {
    use attnforge::testing::npy::write;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let f = |x: &[T]| x.iter().map(|e| e.to_f64() as f32).collect::<Vec<f32>>();
    let kv = w.kv;
    let total_q = *w.qo_indptr.last().unwrap_or(&0) as usize;
    let page_shape = |d: usize| match (kv.layout, kv.interleaved) {
        (KvLayout::Nhd, true) => vec![kv.num_pages, 2, kv.page_size, kv.kv_heads, d],
        (KvLayout::Hnd, true) => vec![kv.num_pages, 2, kv.kv_heads, kv.page_size, d],
        (KvLayout::Nhd, false) => vec![kv.num_pages, kv.page_size, kv.kv_heads, d],
        (KvLayout::Hnd, false) => vec![kv.num_pages, kv.kv_heads, kv.page_size, d],
    };
    write(&dir.join("q.npy"), &[total_q, w.qo_heads, kv.head_dim_qk], &f(&w.q))?;
    if kv.interleaved {
        write(&dir.join("kv_cache.npy"), &page_shape(kv.head_dim_qk), &f(&w.k))?;
    } else {
        write(&dir.join("k_cache.npy"), &page_shape(kv.head_dim_qk), &f(&w.k))?;
        write(&dir.join("v_cache.npy"), &page_shape(kv.head_dim_vo), &f(&w.v))?;
    }
    write(&dir.join("qo_indptr.npy"), &[w.qo_indptr.len()], &w.qo_indptr)?;
    write(&dir.join("kv_indptr.npy"), &[w.pages.indptr.len()], &w.pages.indptr)?;
    write(&dir.join("kv_indices.npy"), &[w.pages.indices.len()], &w.pages.indices)?;
    write(&dir.join("kv_last_page_len.npy"), &[w.pages.last_page_len.len()], &w.pages.last_page_len)?;
    let o_shape = [total_q, w.qo_heads, kv.head_dim_vo];
    write(&dir.join("o_ref.npy"), &o_shape, &want.o)?;
    write(&dir.join("lse_ref.npy"), &[total_q, w.qo_heads], &want.lse)?;
    if let Some(g) = got {
        write(&dir.join("o.npy"), &o_shape, &g.o)?;
        write(&dir.join("lse.npy"), &[total_q, w.qo_heads], &g.lse)?;
    }
    let params: serde_json::Map<String, serde_json::Value> = v
        .params
        .iter()
        .zip(p.values())
        .map(|(d, x)| {
            use attnforge::spec::params::ParamValue::*;
            let j = match x {
                I32(i) => serde_json::json!(i),
                F32(f) => serde_json::json!(f),
                I32s(xs) => serde_json::json!(xs),
                F32s(xs) => serde_json::json!(xs),
                Bits { data, offsets } => serde_json::json!({ "offsets": offsets, "bytes_hex": data.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
            };
            (d.name.clone(), j)
        })
        .collect();
    let meta = serde_json::json!({ "variant": v.name, "params": params, "layout": kv.layout.name(), "interleaved": kv.interleaved, "page_size": kv.page_size, "note": "f16/bf16 values are stored exactly as f32" });
    std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    Ok(())
}

fn origin(o: Origin) -> &'static str {
    match o {
        Origin::Compiled => "compiled now",
        Origin::Disk => "disk cache hit",
        Origin::Memory => "memory hit",
    }
}

fn summarise(out: &AttnOutput, head_dim_vo: usize) {
    if out.lse.is_empty() {
        println!("  no output rows (the batch has no query tokens)");
        return;
    }
    let rows = || out.o.chunks(head_dim_vo.max(1)).zip(&out.lse);
    // A NaN row (a NaN logit) is not a masked one: count them apart.
    let nan = rows().filter(|(o, l)| l.is_nan() || o.iter().any(|x| x.is_nan())).count();
    let masked = out.lse.iter().filter(|x| **x == f32::NEG_INFINITY).count();
    let finite: Vec<f32> = out.lse.iter().copied().filter(|x| x.is_finite()).collect();
    let lse = match finite.iter().copied().reduce(f32::min).zip(finite.iter().copied().reduce(f32::max)) {
        Some((lo, hi)) => format!("lse in [{lo:.3}, {hi:.3}]"),
        None => "no finite lse".to_string(),
    };
    let values: Vec<f64> = out.o.iter().filter(|x| !x.is_nan()).map(|x| f64::from(x.abs())).collect();
    let mean_abs = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let nan_note = if nan > 0 { format!("; {nan} rows are NaN (a NaN logit or sink)") } else { String::new() };
    println!("  mean |o| {mean_abs:.4}; {lse}; {masked} fully masked rows{nan_note}");
}

fn random_params(v: &Variant, dims: Dims, lens: &[(usize, usize)], rng: &mut StdRng) -> ParamValues {
    sample(&v.params, dims, lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) })
}

/// One demo workload (d128, page 16, bf16, permuted pages) with random parameters, and the CPU
/// reference's output and time in ms.
fn demo_case(v: &Variant, lens: Vec<(usize, usize)>, qo: usize, kvh: usize, rng: &mut StdRng) -> Result<(Workload<bf16>, ParamValues, AttnOutput, f64)> {
    let batch = lens.len();
    let spec = WorkloadSpec { lens, qo_heads: qo, kv_heads: kvh, head_dim_qk: 128, head_dim_vo: 128, page_size: 16, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 3 };
    let params = random_params(v, Dims { qo_heads: qo, kv_heads: kvh, batch }, &spec.lens, rng);
    let w = Workload::<bf16>::random(&spec, rng)?;
    let t0 = Instant::now();
    let want = reference::attention(v, &params, &w.batch(), &w.q, &w.k, w.v(), None)?;
    Ok((w, params, want, t0.elapsed().as_secs_f64() * 1e3))
}

/// `cargo run --release`: compile every shipped variant (cache miss or hit, with times), run
/// decode on the GPU and check it against the reference. With no GPU: say so, compile for sm_90a
/// if NVRTC is present, and run the reference on a small workload.
pub(crate) fn demo() -> Result<()> {
    println!("attnforge {} demo", env!("CARGO_PKG_VERSION"));
    let engine = Engine::new(0);
    let mut rng = StdRng::seed_from_u64(7);
    match &engine {
        Ok(e) => println!("GPU: {}\n", e.describe()),
        Err(err) => println!("no GPU: {err}\nrunning what the CPU can: NVRTC compiles (if present) and the CPU reference\n"),
    }
    let variants = shipped::all()?;
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4)?;
    println!("compile (decode, d128, bf16, GQA 4):");
    match &engine {
        Ok(e) => {
            for v in &variants {
                let t0 = Instant::now();
                let k = e.decode_kernel(v, &cfg)?;
                println!("  {:<44} {:<15} {:>8.1} ms", k.compiled().name, origin(k.compiled().origin), t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Err(_) => match Jit::new() {
            Ok(jit) => {
                let arch = "sm_90a".parse().map_err(anyhow::Error::msg)?;
                for v in &variants {
                    let k = jit.get(v, &cfg, &arch)?;
                    println!("  {:<44} {:<15} {:>8.1} ms", k.name, origin(k.origin), k.elapsed.as_secs_f64() * 1e3);
                }
            }
            Err(err) => println!("  skipped: {err}"),
        },
    }
    let (batch, kv_len, qo, kvh) = if engine.is_ok() { (16, 4096, 32, 8) } else { (4, 300, 8, 2) };
    println!("\ndecode, {batch} requests of ~{kv_len} tokens (ragged), {qo}/{kvh} heads, d128, page 16, bf16, permuted pages:");
    println!("  {:<16} {:>10} {:>10} {:>10}  check vs CPU reference (f64)", "variant", "GPU µs", "GB/s", "CPU ms");
    for v in &variants {
        let lens: Vec<(usize, usize)> = (0..batch).map(|i| (1, kv_len - i * 37 % (kv_len / 2))).collect();
        let (w, params, want, cpu_ms) = demo_case(v, lens, qo, kvh, &mut rng)?;
        match &engine {
            Ok(e) => {
                let k = e.decode_kernel(v, &cfg)?;
                let (got, _) = decode_once(e, &k, &params, &w, PlanMode::Default, None)?;
                let cmp = compare(&got, &want, DType::Bf16, 128);
                let (us, gbps) = time_decode(e, &k, &params, &w)?;
                println!("  {:<16} {us:>10.1} {gbps:>10.0} {cpu_ms:>10.1}  {cmp}", v.name);
                if !cmp.ok() {
                    bail!("{}: GPU output does not match the reference", v.name);
                }
            }
            Err(_) => println!("  {:<16} {:>10} {:>10} {cpu_ms:>10.1}  (reference only)", v.name, "-", "-"),
        }
    }
    let lens = if engine.is_ok() { vec![(700, 700), (9, 1500)] } else { vec![(40, 120), (3, 200)] };
    println!("\nprefill / append, (q, kv) = {lens:?}, {qo}/{kvh} heads, d128, bf16:");
    println!("  {:<16} {:>10} {:>10}  check vs CPU reference (f64)", "variant", "GPU ms", "CPU ms");
    for v in &variants {
        let (w, params, want, cpu_ms) = demo_case(v, lens.clone(), qo, kvh, &mut rng)?;
        match &engine {
            Ok(e) => {
                let k = e.prefill_kernel(v, &KernelConfig::prefill(128, 128, DType::Bf16, qo / kvh)?)?;
                attnforge::testing::harness::prefill_once(e, &k, &params, &w, PlanMode::Default, None)?;
                let t1 = Instant::now();
                let (got, _) = attnforge::testing::harness::prefill_once(e, &k, &params, &w, PlanMode::Default, None)?;
                let gpu_ms = t1.elapsed().as_secs_f64() * 1e3;
                let cmp = compare(&got, &want, DType::Bf16, 128);
                println!("  {:<16} {gpu_ms:>10.2} {cpu_ms:>10.1}  {cmp}", v.name);
                if !cmp.ok() {
                    bail!("{}: GPU prefill output does not match the reference", v.name);
                }
            }
            Err(_) => println!("  {:<16} {:>10} {cpu_ms:>10.1}  (reference only)", v.name, "-"),
        }
    }
    if engine.is_ok() {
        println!("\n(prefill GPU ms includes uploading the batch; kernel timings: attnforge bench)");
        println!("full benchmark against FlashInfer's numbers: attnforge bench");
    }
    Ok(())
}

/// Median µs of eager decode calls on one workload (plan, upload, launch), and GB/s of the
/// visible KV. A quick number for the demo; `bench` is the careful one.
fn time_decode(e: &Engine, k: &attnforge::engine::DecodeKernel, p: &ParamValues, w: &Workload<bf16>) -> Result<(f64, f64)> {
    use attnforge::testing::harness::{DeviceResult, DeviceWorkload};
    let batch = w.batch();
    let dev = DeviceWorkload::upload(e, w)?;
    let mut res = DeviceResult::<bf16>::poisoned(e, batch.o_elems(), batch.total_q() * batch.qo_heads)?;
    let dp = e.upload_params(&k.layout, p)?;
    let plan = e.plan_decode(k, p, &dev.table.batch(), PlanMode::Default)?;
    let mut bufs = None;
    e.upload_plan(&plan, &mut bufs)?;
    let bufs = bufs.context("plan buffers")?;
    let mut samples = Vec::new();
    for i in 0..12 {
        e.synchronize()?;
        let t0 = Instant::now();
        e.run_decode(k, &plan, &bufs, &dp, &dev.table, &dev.batch(), res.out(), None)?;
        e.synchronize()?;
        if i >= 2 {
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let us = samples[samples.len() / 2];
    let visible: usize = (0..batch.batch_size()).map(|b| {
        let (lo, hi) = attnforge::plan::visible_span(&k.variant, p, b, 1, batch.kv_len(b), 0);
        hi - lo
    }).sum();
    let bytes = (visible * batch.kv.kv_heads * 128 * 2 * 2) as f64;
    Ok((us, bytes / (us * 1e-6) / 1e9))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bench(suites: &[Suite], json: Option<&Path>, tiles: &[String], split_ctas: &[usize], balance: bool, overlap_merge: bool, only: &[String], tile_only: bool) -> Result<()> {
    // Arguments first: a bad one is an error with or without a GPU.
    if tile_only && !tiles.iter().any(|t| t.starts_with("p,")) {
        anyhow::bail!("--tile-only times only the prefill tiles given with --tile p,…, and none was given");
    }
    let mut e = Engine::new(0).context("`attnforge bench` times GPU kernels and needs a GPU")?;
    e.set_programmatic_merge(overlap_merge);
    let date = std::process::Command::new("date").arg("+%Y-%m-%d").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    println!("attnforge {} bench on {}, {date}; merges {}", env!("CARGO_PKG_VERSION"), e.describe(), if e.programmatic_merge() { "overlap the kernel before them (programmatic launch)" } else { "in plain stream order" });
    let mut records = Vec::new();
    let anchor_card = e.name() == ANCHOR_CARD;
    if !anchor_card {
        println!(
            "note: the FI columns are FlashInfer on the {ANCHOR_CARD} (ANCHORS.md), not on this card ({}); for a same-card comparison run benches/flashinfer_decode.py here",
            e.name()
        );
    }
    // The decode table's ceiling; measured only when that suite runs (it takes 2 GiB).
    let mut copy_gbps = None;
    let mut read_gbps = None;
    if suites.contains(&Suite::Compile) {
        println!("\ncompile (first use into an empty cache; then a new Jit + disk hit + module load):");
        let dir = std::env::temp_dir().join(format!("attnforge-bench-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, params_cfg) in [("default", (128, DType::Bf16, 4)), ("gemma2", (128, DType::Bf16, 4)), ("alibi", (256, DType::F16, 8))] {
            let v = shipped::resolve(name)?;
            let cfg = KernelConfig::decode(params_cfg.0, params_cfg.0, params_cfg.1, params_cfg.2)?;
            let cold = Jit::with_store_dir(&dir)?;
            let t0 = Instant::now();
            let k = cold.get(&v, &cfg, e.arch())?;
            let first = t0.elapsed().as_secs_f64() * 1e3;
            let warm = Jit::with_store_dir(&dir)?;
            let t1 = Instant::now();
            let hit = warm.get(&v, &cfg, e.arch())?;
            let module = e.context().load_module(cudarc::nvrtc::Ptx::from_binary(hit.cubin.to_vec()))?;
            let _f = module.load_function("attnforge_decode")?;
            let cached = t1.elapsed().as_secs_f64() * 1e3;
            println!("  {:<40} first use {first:>7.1} ms (FlashInfer 15.1 s)   cached load {cached:>5.1} ms ({})", k.name, origin(hit.origin));
            records.push(serde_json::json!({ "suite": "compile", "kernel": k.name, "first_use_ms": first, "cached_load_ms": cached }));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if suites.contains(&Suite::Decode) || suites.contains(&Suite::Latency) {
        let copy = measure_copy_gbps(&e)?;
        copy_gbps = Some(copy);
        let read = attnforge::testing::bench::measure_read_gbps(&e)?;
        read_gbps = Some(read);
        println!("\ndevice-to-device copy: {copy:.0} GB/s (bytes read + written; the % copy column is against it)");
        println!("read-only stream (ours, 1 GiB, 16-byte loads, best of 2 kernels x 3 grids): {read:.0} GB/s (decode's ceiling; the % read column is against it)");
        println!("decode: bf16, 32/8 heads unless said (H64/8), d128, page 16, NHD, permuted pages; graph = per call inside a 20-call CUDA graph");
        let card = if anchor_card { "" } else { " (H100)" };
        println!("  {:<34} {:>9} {:>9} {:>8} {:>7} {:>7} {:>12} {:>12} {:>8} {:>6}", "shape", "graph µs", "eager µs", "GB/s", "% copy", "% read", format!("FI{card} graph"), format!("FI{card} eager"), "target", "items  tile");
        let mut overrides: Vec<Option<attnforge::jit::DecodeTile>> = vec![None];
        for t in tiles.iter().filter(|t| !t.starts_with("p,")) {
            // `mma,WARPS,STAGES` picks the tensor-core loop; four or five numbers the CUDA-core one.
            if let Some(rest) = t.strip_prefix("mma,") {
                let n: Vec<usize> = rest.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().with_context(|| format!("--tile {t}"))?;
                let [warps, stages] = n[..] else { bail!("--tile {t}: expected mma,WARPS,STAGES") };
                overrides.push(Some(attnforge::jit::DecodeTile { nv: 4, bdx: 4, bdz: 1, tile_per_z: 1, stages, min_ctas: 1, mma: true, warps }));
                continue;
            }
            let n: Vec<usize> = t.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().with_context(|| format!("--tile {t}"))?;
            let (nv, bdz, tile_per_z, stages, min_ctas) = match n[..] {
                [a, b, c, d] => (a, b, c, d, 1),
                [a, b, c, d, m] => (a, b, c, d, m),
                _ => bail!("--tile {t}: expected NV,BDZ,TPZ,STAGES[,MIN_CTAS] or mma,WARPS,STAGES"),
            };
            let bdx = (128usize).div_ceil(8 * nv).next_power_of_two();
            overrides.push(Some(attnforge::jit::DecodeTile { nv, bdx, bdz, tile_per_z, stages, min_ctas, mma: false, warps: 0 }));
        }
        let mut tunings = Vec::new();
        for tile in &overrides {
            tunings.push(DecodeTuning { tile: *tile, ..Default::default() });
            tunings.extend(split_ctas.iter().map(|&n| DecodeTuning { tile: *tile, split_ctas: Some(n), ..Default::default() }));
            if balance {
                tunings.push(DecodeTuning { tile: *tile, balance: true, ..Default::default() });
            }
        }
        let mut shapes = Vec::new();
        if suites.contains(&Suite::Decode) {
            shapes.extend(anchor_decode_shapes());
        }
        if suites.contains(&Suite::Latency) {
            shapes.extend(attnforge::testing::bench::latency_decode_shapes());
        }
        for (s, tuning) in shapes.into_iter().flat_map(|s| tunings.iter().map(move |t| (s.clone(), *t))) {
            let r = bench_decode(&e, &s, tuning)?;
            let tile = tuning.tile;
            let split = tuning.split_ctas.map_or(String::new(), |n| format!(" [split {n}]")) + if tuning.balance { " [bal]" } else { "" };
            let label = format!("{} {}{}{split}", s.variant, s.label(), tile.map_or(String::new(), |t| format!(" [{}]", t.label())));
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
            println!(
                "  {label:<34} {:>9.1} {:>9.1} {:>8.0} {:>6.0}% {:>6.0}% {:>12} {:>12} {:>8} {:>6}  {}",
                r.graph_us,
                r.eager_us,
                r.gbps(),
                100.0 * r.gbps() / copy,
                100.0 * r.gbps() / read,
                fmt(s.anchor_graph_us),
                fmt(s.anchor_eager_us),
                fmt(s.target_us),
                r.work_items,
                r.tile
            );
            records.push(serde_json::json!({
                "suite": "decode", "variant": s.variant, "params": s.params.iter().map(|(n, x)| (n.to_string(), *x)).collect::<std::collections::BTreeMap<_, _>>(),
                "batch": s.batch, "kv_len": s.kv_len, "first_len": s.first_len, "qo_heads": s.qo_heads, "kv_heads": s.kv_heads, "target_us": s.target_us, "label": s.label(), "graph_us": r.graph_us, "eager_us": r.eager_us, "gbps": r.gbps(),
                "flashinfer_graph_us": s.anchor_graph_us, "flashinfer_eager_us": s.anchor_eager_us, "work_items": r.work_items, "splits": r.splits, "copies": r.copies, "tile_run": r.tile,
                "tile": tile.map(|t| format!("{t:?}")), "split_ctas": tuning.split_ctas, "balanced": tuning.balance, "pct_copy": 100.0 * r.gbps() / copy, "pct_read": 100.0 * r.gbps() / read,
            }));
        }
    }
    if suites.contains(&Suite::Prefill) {
        println!("\nprefill: bf16, d128 unless named, page 16, NHD, permuted pages, causal unless named; CUDA events, median of 7 × 3 launches; FLOPs on the visible pairs");
        println!("  {:<34} {:>10} {:>9} {:>12} {:>10} {:>8}  kernel", "workload", "µs", "TFLOP/s", "FI TFLOP/s", "FI µs", "blocks");
        // `p,WARPS,MTILES,KV_TILE,STAGES,MIN_CTAS` adds a prefill tile to compare.
        let mut ptiles: Vec<Option<attnforge::jit::PrefillTile>> = if tile_only { vec![] } else { vec![None] };
        for t in tiles.iter().filter_map(|t| t.strip_prefix("p,")) {
            ptiles.push(Some(t.parse::<attnforge::jit::PrefillTile>().map_err(|e| anyhow::anyhow!("--tile p,{t}: {e}"))?));
        }
        let shapes = attnforge::testing::bench::anchor_prefill_shapes().into_iter().filter(|s| only.is_empty() || only.iter().any(|o| s.name.contains(o.as_str())));
        for (s, tile) in shapes.flat_map(|s| ptiles.iter().map(move |t| (s.clone(), *t))) {
            let name = format!("{}{}", s.name, tile.map_or(String::new(), |t| format!(" [{}]", t.label())));
            let r = match (attnforge::testing::bench::bench_prefill(&e, &s, tile), tile) {
                (Ok(r), _) => r,
                // A tile to compare that this shape cannot take (a ring too large for its head
                // dim, a loop the card lacks) is reported and left out; the engine's own must run.
                (Err(err), Some(_)) => {
                    println!("  {name:<34} not timed: {err}");
                    continue;
                }
                (Err(err), None) => return Err(err.into()),
            };
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
            let t = r.tile;
            let kernel = format!("{}, {} regs, {} B spilled, {} CTA/SM", t.label(), r.regs, r.local_bytes, r.ctas_per_sm);
            println!("  {:<34} {:>10.1} {:>9.1} {:>12} {:>10} {:>8}  {kernel}", name, r.us, r.tflops(), fmt(s.anchor_tflops), fmt(s.anchor_us), r.blocks);
            records.push(serde_json::json!({
                "suite": "prefill", "workload": s.name, "us": r.us, "tflops": r.tflops(), "kv_gbps": r.kv_bytes / (r.us * 1e-6) / 1e9,
                "flashinfer_tflops": s.anchor_tflops, "flashinfer_us": s.anchor_us, "blocks": r.blocks,
                "tile": format!("{t:?}"), "regs": r.regs, "spill_bytes": r.local_bytes, "ctas_per_sm": r.ctas_per_sm,
            }));
        }
    }
    if suites.contains(&Suite::Cascade) {
        println!("\ncascade (causal decode over a shared prompt): bf16, 32/8 heads, d128, page 16; CUDA events, median of 7 × 10 launches of one step");
        println!("  (cascade: every level on the prefill kernel; decode cascade: shared levels on the prefill kernel, suffixes on the decode kernel)");
        println!("  (graph: fixed-grid plans, 10 launches captured in one CUDA graph, median of 7 × 5 replays)");
        println!(
            "  {:<30} {:>10} {:>12} {:>8} {:>12} {:>8} {:>11} {:>13} {:>8} {:>7} {:>7} {:>9} {:>9}",
            "workload", "plain µs", "cascade µs", "speedup", "dec-casc µs", "speedup", "g-plain µs", "g-dec-casc µs", "speedup", "levels", "items", "plan µs", "dplan µs"
        );
        for s in attnforge::testing::bench::cascade_shapes() {
            let r = attnforge::testing::bench::bench_cascade(&e, &s)?;
            println!(
                "  {:<30} {:>10.1} {:>12.1} {:>7.2}× {:>12.1} {:>7.2}× {:>11.1} {:>13.1} {:>7.2}× {:>7} {:>7} {:>9.1} {:>9.1}",
                s.name,
                r.plain_us,
                r.cascade_us,
                r.plain_us / r.cascade_us,
                r.decode_cascade_us,
                r.plain_us / r.decode_cascade_us,
                r.graph_plain_us,
                r.graph_decode_cascade_us,
                r.graph_plain_us / r.graph_decode_cascade_us,
                r.levels,
                r.items,
                r.plan_us,
                r.decode_plan_us
            );
            records.push(serde_json::json!({
                "suite": "cascade", "workload": s.name, "prefix": s.prefix, "suffix": s.suffix, "plain_us": r.plain_us, "cascade_us": r.cascade_us,
                "decode_cascade_us": r.decode_cascade_us, "decode_plan_us": r.decode_plan_us,
                "graph_plain_us": r.graph_plain_us, "graph_decode_cascade_us": r.graph_decode_cascade_us,
                "levels": r.levels, "items": r.items, "plan_us": r.plan_us,
            }));
        }
    }
    if let Some(path) = json {
        let doc = serde_json::json!({ "device": e.describe(), "date": date, "version": env!("CARGO_PKG_VERSION"), "copy_gbps": copy_gbps, "read_gbps": read_gbps, "flashinfer_numbers_card": ANCHOR_CARD, "results": records });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("write {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// The multi-level formulation of the same batch (levels detected from the page table) against
/// the single-level reference.
fn compare_cascade<T: Element>(a: &RunArgs, v: &Variant, p: &ParamValues, w: &Workload<T>, want: &AttnOutput) -> Result<()> {
    use attnforge::cascade::{detect, Policy};
    let batch = w.batch();
    let Some(cascade) = detect(&batch.validated()?, &Policy { min_saved_bytes: 0, weigh_states: false, ..Policy::default() }) else {
        println!("  cascade: no shared whole page to read once (prefix shorter than a page, or one request)");
        return Ok(());
    };
    let shape: Vec<String> = cascade.levels.iter().map(|l| format!("{} group(s)", l.groups.len())).collect();
    let single = attnforge::cascade::Cascade::single(&batch).keys_read();
    println!("  cascade: {} levels ({}), {} keys read instead of {single}", cascade.levels.len(), shape.join(", "), cascade.keys_read());
    let t0 = Instant::now();
    let multi = reference::attention_cascade(v, p, &batch, &cascade, &w.q, &w.k, w.v(), a.sm_scale)?;
    let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(a, b)| !(a.is_nan() && b.is_nan()) && a != b).map(|(a, b)| (a - b).abs() / a.abs().max(1.0)).fold(0.0f32, f32::max);
    let (d_o, d_lse) = (diff(&want.o, &multi.o), diff(&want.lse, &multi.lse));
    println!("  multi-level reference ({:.1} ms) vs single-level: max relative |Δo| {d_o:.2e}, |Δlse| {d_lse:.2e}", t0.elapsed().as_secs_f64() * 1e3);
    if d_o > 1e-5 || d_lse > 1e-5 || !d_o.is_finite() || !d_lse.is_finite() {
        bail!("the multi-level reference differs from the single-level one");
    }
    Ok(())
}
