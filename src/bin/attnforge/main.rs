//! The `attnforge` command line: the demo (no arguments), `check`, `run`, `compile`, `cache`
//! and `bench`. GPU paths live in `run.rs`.
//!
//! A thin layer over the library: parse arguments, call the pipeline, print. Errors bubble up as
//! `anyhow` and are printed once, without a backtrace.

mod run;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use attnforge::kv::{DType, KvLayout};
use attnforge::spec::params::ParamInput;
use attnforge::spec::shipped::{self, SHIPPED};
use attnforge::spec::soundness::check_kv_range;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "attnforge", version, about = "JIT attention kernels for LLM inference over a paged KV cache")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate specs (files, shipped names, or `all`); also tests each kv_range against its mask
    /// and says whether the kernels can skip the mask (it provably follows from kv_range).
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
    /// Time kernels on the GPU (CUDA-graph replay and eager), next to FlashInfer's numbers.
    Bench {
        #[arg(long, value_enum, default_values = ["decode", "prefill", "compile"])]
        suite: Vec<Suite>,
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Tiles to compare (repeatable; tuning): decode `nv,bdz,tile_per_z,stages[,min_ctas]` or
        /// `mma,warps,stages`; prefill `p,warps,mtiles,kv_tile,stages,min_ctas`.
        #[arg(long = "tile", value_name = "TILE")]
        tiles: Vec<String>,
        /// Launch merges in plain stream order instead of overlapping the kernel before them
        /// (programmatic dependent launch, sm_90+), to measure what the overlap gives.
        #[arg(long)]
        no_overlap_merge: bool,
        /// Decode batches too small to fill the GPU are split over about this many CTAs instead
        /// of one per SM (repeatable; tuning).
        #[arg(long = "split-ctas", value_name = "N")]
        split_ctas: Vec<usize>,
        /// Also time every decode shape with balanced plans (one wave of CTAs with equal shares),
        /// skewed or not (tuning).
        #[arg(long)]
        balance: bool,
        /// Prefill: time only the workloads whose name contains one of these (repeatable;
        /// tuning), e.g. `--only "single 16384, MHA"`.
        #[arg(long = "only", value_name = "NAME")]
        only: Vec<String>,
        /// Prefill: time only the `--tile`s, not the engine's own choice (tuning; one kernel
        /// per workload, for a profiler).
        #[arg(long)]
        tile_only: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(crate) enum Suite {
    Decode,
    Prefill,
    Compile,
    /// Shared-prefix decode, plain and through the cascade (issue 15's shapes).
    Cascade,
    /// Latency-bound decode (issue 17's shapes: few requests, long caches; 32/8 and 64/8 heads,
    /// a window of 4096 over 131072), each as a fraction of the measured read ceiling.
    Latency,
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
    /// Prefill tile `warps,mtiles,kv_tile,stages,min_ctas` instead of the default (tuning).
    #[arg(long, value_name = "W,M,K,S,C")]
    tile: Option<attnforge::jit::PrefillTile>,
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Decode,
    Prefill,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// A spec file or the name of a shipped variant.
    pub(crate) spec: String,
    /// Run only the CPU reference (no GPU needed).
    #[arg(long)]
    pub(crate) cpu: bool,
    /// Write q, the KV cache, the page table, the parameters and both outputs as .npy here.
    #[arg(long)]
    pub(crate) dump: Option<PathBuf>,
    /// Plan mode: default, deterministic (fixed 1024-token chunks).
    #[arg(long)]
    pub(crate) deterministic: bool,
    #[arg(long, value_enum, default_value = "decode")]
    pub(crate) op: Op,
    #[arg(long, default_value_t = 4)]
    pub(crate) batch: usize,
    /// Tokens of KV per request.
    #[arg(long, default_value_t = 1024)]
    pub(crate) kv_len: usize,
    /// Query tokens per request (1 for decode; defaults to kv_len for prefill).
    #[arg(long)]
    pub(crate) q_len: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub(crate) qo_heads: usize,
    #[arg(long, default_value_t = 8)]
    pub(crate) kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub(crate) head_dim: usize,
    /// Value head dim, if it differs from the key head dim (e.g. 192/128).
    #[arg(long)]
    pub(crate) head_dim_vo: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub(crate) page_size: usize,
    #[arg(long, default_value = "bf16")]
    pub(crate) dtype: DType,
    #[arg(long, default_value = "nhd")]
    pub(crate) layout: KvLayout,
    #[arg(long)]
    pub(crate) sm_scale: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// A runtime parameter, `name=value` or `name=v0,v1,…` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub(crate) params: Vec<String>,
    /// Every request starts with the same N-token prefix (the same pages, whole pages only: a
    /// partial last prefix page is each request's own). The single- and the multi-level
    /// (cascade) reference are computed and compared; without --cpu the batch then runs through
    /// its cascade on the GPU's prefill kernel (decode batches too) against the reference.
    #[arg(long, value_name = "N")]
    pub(crate) shared_prefix: Option<usize>,
    /// Prefill (and cascades): the prompt tile instead of the engine's choice — `sm90,KV_TILE,STAGES`
    /// for the Hopper main loop (sm_90a only), `WARPS,MTILES,KV_TILE,STAGES,MIN_CTAS` for the
    /// portable one (e.g. `4,2,64,2,1`, to force it on Hopper).
    #[arg(long, value_name = "TILE")]
    pub(crate) tile: Option<attnforge::jit::PrefillTile>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    attnforge::diagnostics::set_warning_hook(|w| eprintln!("attnforge: warning: {w}"));
    let result = match cli.cmd {
        None => run::demo(),
        Some(Cmd::Check { specs }) => check(&specs),
        Some(Cmd::Run(args)) => run::run(&args),
        Some(Cmd::Bench { suite, json, tiles, no_overlap_merge, split_ctas, balance, only, tile_only }) => run::bench(&suite, json.as_deref(), &tiles, &split_ctas, balance, !no_overlap_merge, &only, tile_only),
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
    let all: Vec<String> = SHIPPED.iter().map(|(n, _)| n.to_string()).collect();
    let specs = if specs.iter().any(|s| s == "all") { &all[..] } else { specs };
    let mut failed = 0;
    for s in specs {
        let outcome = shipped::resolve(s).map_err(anyhow::Error::from).and_then(|v| {
            let coverage = check_kv_range(&v, 300, 0).map_err(|c| anyhow::anyhow!("{}: {c}", v.origin))?;
            // `check` means "this renders for every op": rendering is pure and cheap.
            for cfg in [attnforge::jit::KernelConfig::decode(128, 128, DType::Bf16, 4)?, attnforge::jit::KernelConfig::prefill(128, 128, DType::Bf16, 4)?] {
                attnforge::jit::render::render(&v, &cfg).with_context(|| format!("{}: rendering the {} kernel", v.origin, cfg.op.name()))?;
            }
            Ok((v, coverage))
        });
        match outcome {
            Ok((v, coverage)) => {
                // What the kernels will do with the mask: the proof lives in spec::implied.
                let mask = match (&v.mask, attnforge::spec::implied::prove_mask_implied(&v)) {
                    (None, _) => String::new(),
                    (Some(_), attnforge::spec::implied::Proof::Proven) => "   mask follows from kv_range: never evaluated by the kernels".into(),
                    (Some(_), attnforge::spec::implied::Proof::NotProven(why)) if why.contains("nodes") => format!("   mask evaluated per key ({why})"),
                    (Some(_), _) => "   mask evaluated per key (not implied by kv_range)".into(),
                };
                println!("{}", format!("ok    {:<16} {:<16}{mask}", v.name, s).trim_end());
                // What prefill does with the logits: the proofs live in spec::factor.
                if v.normalize == attnforge::spec::Normalize::Softmax {
                    if let Some(f) = attnforge::spec::factor::factor_logits(&v.logits.typed, &v.params) {
                        if let Some((lo, hi)) = f.raw_bounds {
                            println!(
                                "      logits = unit × raw, raw proven in [{lo:.4}, {hi:.4}]: prefill exponentiates against a fixed row max where the bounds' width × unit × log2 e is at most 100 (bf16) or 16 (f16), else keeps a running max"
                            );
                        }
                    }
                }
                if coverage.cut_short() {
                    println!(
                        "      note: kv_range was checked against the mask on {} of {} sampled shapes only: the hooks are too large to sample further within the check's budget",
                        coverage.trials, coverage.wanted
                    );
                }
            }
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
            let vo = a.head_dim_vo.unwrap_or(d);
            configs.push(match a.op {
                attnforge::jit::Op::Decode => attnforge::jit::KernelConfig::decode(d, vo, t, a.group)?,
                attnforge::jit::Op::Prefill => {
                    let mut c = attnforge::jit::KernelConfig::prefill(d, vo, t, a.group)?;
                    c.prefill_override = a.tile;
                    c.validate()?;
                    c
                }
            });
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
            let r = store.verify()?;
            for e in &r.removed {
                println!("removed {}: {}", e.name, e.problem.as_deref().unwrap_or_default());
            }
            for (e, why) in &r.not_removed {
                println!("NOT removed {}: {} ({why})", e.name, e.problem.as_deref().unwrap_or_default());
            }
            println!("{} entries verified, {} damaged entries removed", r.kept, r.removed.len());
            if !r.not_removed.is_empty() {
                bail!("{} damaged entries in {} could not be removed", r.not_removed.len(), dir.display());
            }
        }
        CacheCmd::Clear => {
            let r = store.clear()?;
            for (path, why) in &r.not_removed {
                println!("NOT removed {}: {why}", path.display());
            }
            println!("removed {} files from {}", r.removed, dir.display());
            if !r.not_removed.is_empty() {
                bail!("{} files in {} could not be removed", r.not_removed.len(), dir.display());
            }
        }
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

pub(crate) fn parse_params(items: &[String]) -> Result<HashMap<String, ParamInput>> {
    items
        .iter()
        .map(|item| {
            let (k, v) = item.split_once('=').with_context(|| format!("--param `{item}`: expected NAME=VALUE"))?;
            let v = ParamInput::parse(v).map_err(|e| anyhow::anyhow!("--param `{item}`: {e}"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

