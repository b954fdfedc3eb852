//! The `attnforge` command line: the demo (no arguments), `check`, and `run`.
//!
//! A thin layer over the library: parse arguments, call the pipeline, print. Errors bubble up as
//! `anyhow` and are printed once, without a backtrace.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use attnforge::kv::{DType, Element, KvLayout};
use attnforge::reference::{self, AttnOutput};
use attnforge::spec::params::{Dims, ParamInput};
use attnforge::spec::shipped::{self, SHIPPED};
use attnforge::spec::soundness::check_kv_range;
use attnforge::spec::Variant;
use attnforge::workload::{Workload, WorkloadSpec};
use clap::{Args, Parser, Subcommand, ValueEnum};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[derive(Parser)]
#[command(name = "attnforge", version, about = "JIT attention kernels for LLM inference over a paged KV cache")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate specs (files or shipped names); also tests each kv_range against its mask.
    Check {
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Run a variant on random inputs and summarise the output.
    Run(RunArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Op {
    Decode,
    Prefill,
}

#[derive(Args)]
struct RunArgs {
    /// A spec file or the name of a shipped variant.
    spec: String,
    /// Run the CPU reference (the only path until GPU kernels exist).
    #[arg(long)]
    cpu: bool,
    #[arg(long, value_enum, default_value = "decode")]
    op: Op,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens of KV per request.
    #[arg(long, default_value_t = 1024)]
    kv_len: usize,
    /// Query tokens per request (1 for decode; defaults to kv_len for prefill).
    #[arg(long)]
    q_len: Option<usize>,
    #[arg(long, default_value_t = 32)]
    qo_heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Value head dim, if it differs from the key head dim (e.g. 192/128).
    #[arg(long)]
    head_dim_vo: Option<usize>,
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    #[arg(long, default_value = "nhd")]
    layout: KvLayout,
    #[arg(long)]
    sm_scale: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A runtime parameter, `name=value` or `name=v0,v1,…` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        None => demo(),
        Some(Cmd::Check { specs }) => check(&specs),
        Some(Cmd::Run(args)) => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(specs: &[String]) -> Result<()> {
    let mut failed = 0;
    for s in specs {
        let outcome = shipped::resolve(s).map_err(anyhow::Error::from).and_then(|v| {
            check_kv_range(&v, 300, 0).map_err(|c| anyhow::anyhow!("{}: {c}", v.origin))?;
            Ok(v)
        });
        match outcome {
            Ok(v) => println!("ok    {:<16} {}", v.name, s),
            Err(e) => {
                failed += 1;
                println!("FAIL  {s}\n{e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} specs failed", specs.len());
    }
    Ok(())
}

fn parse_params(items: &[String]) -> Result<HashMap<String, ParamInput>> {
    items
        .iter()
        .map(|item| {
            let (k, v) = item.split_once('=').with_context(|| format!("--param `{item}`: expected NAME=VALUE"))?;
            let v = ParamInput::parse(v).map_err(|e| anyhow::anyhow!("--param `{item}`: {e}"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

fn run(a: &RunArgs) -> Result<()> {
    if !a.cpu {
        bail!("no GPU path exists in this build yet; pass --cpu to run the CPU reference");
    }
    let variant = shipped::resolve(&a.spec)?;
    let q_len = match a.op {
        Op::Decode => a.q_len.unwrap_or(1),
        Op::Prefill => a.q_len.unwrap_or(a.kv_len),
    };
    let spec = WorkloadSpec {
        lens: vec![(q_len, a.kv_len); a.batch],
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
    if a.page_size == 0 || a.kv_heads == 0 || a.qo_heads % a.kv_heads != 0 {
        bail!("qo_heads ({}) must be a multiple of kv_heads ({}) and page_size at least 1", a.qo_heads, a.kv_heads);
    }
    let given = parse_params(&a.params)?;
    let dims = Dims { qo_heads: a.qo_heads, kv_heads: a.kv_heads, batch: a.batch };
    let params = variant.bind(&given, dims)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (out, secs) = match a.dtype {
        DType::F16 => run_cpu::<f16>(&variant, &params, &spec, a.sm_scale, &mut rng)?,
        DType::Bf16 => run_cpu::<bf16>(&variant, &params, &spec, a.sm_scale, &mut rng)?,
        DType::F32 => bail!("f32 inputs are not supported; use f16 or bf16"),
    };
    println!(
        "variant {} ({}), CPU reference, {} {} × (q {q_len}, kv {}), heads {}/{}, head dim {}/{}, page {}, {}",
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
        a.dtype.name()
    );
    summarise(&out, secs);
    Ok(())
}

fn run_cpu<T: Element>(
    variant: &Variant,
    params: &attnforge::spec::params::ParamValues,
    spec: &WorkloadSpec,
    sm_scale: Option<f32>,
    rng: &mut StdRng,
) -> Result<(AttnOutput, f64)> {
    let w = Workload::<T>::random(spec, rng);
    let t0 = Instant::now();
    let out = reference::attention(variant, params, &w.batch(), &w.q, &w.k, w.v(), sm_scale)?;
    Ok((out, t0.elapsed().as_secs_f64()))
}

fn summarise(out: &AttnOutput, secs: f64) {
    let masked = out.lse.iter().filter(|x| **x == f32::NEG_INFINITY).count();
    let finite: Vec<f32> = out.lse.iter().copied().filter(|x| x.is_finite()).collect();
    let (lo, hi) = finite.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let mean_abs = out.o.iter().map(|x| f64::from(x.abs())).sum::<f64>() / out.o.len().max(1) as f64;
    println!(
        "  {} rows in {:.1} ms; mean |o| {mean_abs:.4}; lse in [{lo:.3}, {hi:.3}]; {masked} fully masked rows",
        out.lse.len(),
        secs * 1e3
    );
}

fn demo() -> Result<()> {
    println!("attnforge {} demo", env!("CARGO_PKG_VERSION"));
    println!("no GPU path exists in this build yet: running the CPU reference (f64) for every shipped variant\n");
    let mut rng = StdRng::seed_from_u64(7);
    println!("{:<16} {:<8} {:>7} {:>8} {:>10} {:>10}", "variant", "op", "rows", "ms", "mean |o|", "masked");
    for (name, _) in SHIPPED {
        let variant = shipped::resolve(name)?;
        for (op, lens) in [("decode", vec![(1, 700), (1, 33), (1, 0), (1, 257)]), ("prefill", vec![(96, 96), (17, 300)])] {
            let spec = WorkloadSpec {
                lens: lens.clone(),
                qo_heads: 8,
                kv_heads: 2,
                head_dim_qk: 128,
                head_dim_vo: 128,
                page_size: 16,
                layout: KvLayout::Nhd,
                interleaved: true,
                permute: true,
                spare_pages: 3,
            };
            let dims = Dims { qo_heads: 8, kv_heads: 2, batch: lens.len() };
            let params = attnforge::spec::params::sample(&variant.params, dims, |lo, hi| {
                use rand::Rng;
                if lo == hi { lo } else { rng.random_range(lo..=hi) }
            });
            let (out, secs) = run_cpu::<bf16>(&variant, &params, &spec, None, &mut rng)?;
            let masked = out.lse.iter().filter(|x| **x == f32::NEG_INFINITY).count();
            let mean_abs = out.o.iter().map(|x| f64::from(x.abs())).sum::<f64>() / out.o.len().max(1) as f64;
            println!("{name:<16} {op:<8} {:>7} {:>8.2} {mean_abs:>10.4} {masked:>10}", out.lse.len(), secs * 1e3);
        }
    }
    println!("\nshipped variants: {}; check one with `attnforge check <spec>`", SHIPPED.len());
    Ok(())
}
