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
    /// Render and compile a variant to CUBIN (through the cache); prints key, path, hit or miss.
    Compile(CompileArgs),
    /// Manage the kernel cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
}

#[derive(Args)]
struct CompileArgs {
    /// Spec files or shipped variant names; `all` compiles every shipped variant.
    #[arg(required = true)]
    specs: Vec<String>,
    #[arg(long, default_value = "decode")]
    op: attnforge::jit::Op,
    #[arg(long = "head-dim", default_values_t = vec![128])]
    head_dims: Vec<usize>,
    #[arg(long)]
    head_dim_vo: Option<usize>,
    #[arg(long = "dtype", default_values = ["bf16"])]
    dtypes: Vec<DType>,
    /// Query heads per KV head.
    #[arg(long, default_value_t = 4)]
    group: usize,
    /// Target arch (e.g. sm_90a); defaults to the GPU's. Needed when there is no GPU.
    #[arg(long)]
    arch: Option<attnforge::jit::Arch>,
    /// Print the rendered CUDA source instead of compiling.
    #[arg(long)]
    emit_source: bool,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Print the cache directory.
    Path,
    /// List entries: name, size, age, metadata.
    List,
    /// Verify every entry's checksum; damaged entries are removed.
    Verify,
    /// Remove every entry.
    Clear,
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
        Some(Cmd::Compile(args)) => compile(&args),
        Some(Cmd::Cache { cmd }) => cache(cmd),
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

fn device_arch() -> Result<attnforge::jit::Arch> {
    attnforge::engine::device_arch(0).map_err(|e| anyhow::anyhow!("{e}; pass --arch (e.g. --arch sm_90a) to compile without a GPU"))
}

fn compile(a: &CompileArgs) -> Result<()> {
    let names: Vec<String> = if a.specs.iter().any(|s| s == "all") {
        SHIPPED.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        a.specs.clone()
    };
    let variants = names.iter().map(|n| shipped::resolve(n)).collect::<Result<Vec<_>, _>>()?;
    let mut configs = Vec::new();
    for &d in &a.head_dims {
        for &t in &a.dtypes {
            configs.push(attnforge::jit::KernelConfig::decode(d, a.head_dim_vo.unwrap_or(d), t, a.group)?);
        }
    }
    if a.emit_source {
        for v in &variants {
            for c in &configs {
                print!("{}", attnforge::jit::render::render(v, c)?.code);
            }
        }
        return Ok(());
    }
    let arch = match &a.arch {
        Some(x) => x.clone(),
        None => device_arch()?,
    };
    let jit = attnforge::jit::Jit::new()?;
    let total = variants.len() * configs.len();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut n = 0;
    for v in &variants {
        for c in &configs {
            n += 1;
            if progress {
                eprint!("[{n}/{total}] compiling {} for {} …\r", c.entry_name(&v.name), arch.name());
            }
            let k = jit.get(v, c, &arch)?;
            if progress {
                eprint!("\x1b[2K\r");
            }
            for w in &k.warnings {
                eprintln!("warning: {w}");
            }
            let origin = match k.origin {
                attnforge::jit::Origin::Compiled => "miss, compiled",
                attnforge::jit::Origin::Disk => "hit (disk)",
                attnforge::jit::Origin::Memory => "hit (memory)",
            };
            println!(
                "{:<44} {:<16} {:>8.1} ms  {:>7} KB  key {}  {}",
                k.name,
                origin,
                k.elapsed.as_secs_f64() * 1e3,
                k.cubin.len() / 1024,
                k.key.short(),
                k.path.map_or("(memory only)".to_string(), |p| p.display().to_string())
            );
        }
    }
    Ok(())
}

fn cache(cmd: CacheCmd) -> Result<()> {
    let dir = attnforge_cache::Store::default_dir()?;
    if let CacheCmd::Path = cmd {
        println!("{}", dir.display());
        return Ok(());
    }
    let store = attnforge_cache::Store::open(&dir)?;
    match cmd {
        CacheCmd::Path => {}
        CacheCmd::List => {
            let entries = store.list()?;
            for e in &entries {
                println!(
                    "{:<56} {:>8} KB  {:>8}  {}",
                    e.name,
                    e.size / 1024,
                    human_age(e.age),
                    e.problem.as_deref().map_or(e.meta.clone(), |p| format!("DAMAGED: {p}"))
                );
            }
            println!("{} entries in {}", entries.len(), dir.display());
        }
        CacheCmd::Verify => {
            let (ok, bad) = store.verify()?;
            for e in &bad {
                println!("removed {}: {}", e.name, e.problem.as_deref().unwrap_or_default());
            }
            println!("{ok} entries verified, {} damaged entries removed", bad.len());
        }
        CacheCmd::Clear => println!("removed {} files from {}", store.clear()?, dir.display()),
    }
    Ok(())
}

fn human_age(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
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
