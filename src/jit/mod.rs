//! The JIT pipeline: render a (variant, config) to CUDA, compile it to CUBIN with NVRTC, and
//! keep the result in the content-addressed cache.
//!
//! ```text
//! Variant + KernelConfig ─► render ─► KernelSource ─► key ─► memory ─► disk ─► NVRTC
//! ```
//!
//! [`Jit::get`] is the one entry point: a kernel is compiled at most once per process (memory
//! map) and once per machine (disk store), and a damaged disk entry is rebuilt, never loaded.

mod nvrtc;
pub mod render;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attnforge_cache::{CacheKey, KeyBuilder, Lookup, Store};
use dashmap::DashMap;

pub use self::nvrtc::{find_cuda_include, Nvrtc};
use crate::kv::DType;
use crate::spec::Variant;
use crate::{Error, Result};

/// Which kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// One query token per request.
    Decode,
    /// Ragged query blocks (prompts, appends).
    Prefill,
}

impl Op {
    /// "decode" or "prefill".
    pub fn name(self) -> &'static str {
        match self {
            Op::Decode => "decode",
            Op::Prefill => "prefill",
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "decode" => Ok(Op::Decode),
            "prefill" => Ok(Op::Prefill),
            _ => Err(format!("unknown op `{s}` (expected decode or prefill)")),
        }
    }
}

/// A GPU architecture to compile for, e.g. `sm_90a`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute capability, major.
    pub major: u32,
    /// Compute capability, minor.
    pub minor: u32,
    /// The arch-specific variant (`sm_90a`), which Hopper-only instructions need.
    pub specific: bool,
}

impl Arch {
    /// The arch NVRTC should target for a device of this compute capability. Hopper and later
    /// get the arch-specific target so wgmma/TMA paths can be used.
    pub fn for_device(major: u32, minor: u32) -> Arch {
        Arch { major, minor, specific: major >= 9 }
    }

    /// Whether the Hopper-only instructions of the sm90 main loops are there: sm_90a (the
    /// arch-specific target; later archs' own specific targets do not carry sm_90a's wgmma).
    pub fn has_wgmma(&self) -> bool {
        self.major == 9 && self.specific
    }

    /// "sm_90a", "sm_80", …
    pub fn name(&self) -> String {
        format!("sm_{}{}{}", self.major, self.minor, if self.specific { "a" } else { "" })
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().trim_start_matches("sm_").trim_start_matches("compute_");
        let (digits, specific) = match t.strip_suffix('a') {
            Some(d) => (d, true),
            None => (t, false),
        };
        let bad = || format!("malformed arch `{s}` (expected e.g. sm_80, sm_89, sm_90a)");
        if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let (maj, min) = digits.split_at(digits.len() - 1);
        let major: u32 = maj.parse().map_err(|_| bad())?;
        let minor: u32 = min.parse().map_err(|_| bad())?;
        if major < 8 {
            return Err(format!("arch `{s}` is older than sm_80, which attnforge needs (cp.async, bf16)"));
        }
        Ok(Arch { major, minor, specific })
    }
}

/// Everything about a kernel that is fixed at compile time (runtime values — parameters, page
/// size, lengths, strides — are not here, so changing them never recompiles).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelConfig {
    /// The kernel family.
    pub op: Op,
    /// Query and key head dim.
    pub head_dim_qk: usize,
    /// Value and output head dim.
    pub head_dim_vo: usize,
    /// Query element type.
    pub dtype_q: DType,
    /// K/V cache element type.
    pub dtype_kv: DType,
    /// Output element type.
    pub dtype_o: DType,
    /// Query heads per KV head (GQA group).
    pub group: usize,
    /// Replaces the heuristic decode tile (for tuning sweeps); `None` in normal use.
    pub tile_override: Option<DecodeTile>,
    /// Replaces the heuristic prefill tile (for tuning sweeps); `None` in normal use.
    pub prefill_override: Option<PrefillTile>,
}

/// Thread and tile shape of the decode kernel; see `templates/common/decode.cuh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeTile {
    /// 16-byte vectors of the head dim per thread.
    pub nv: usize,
    /// Threads along the head dim, a power of two.
    pub bdx: usize,
    /// Thread groups splitting each KV tile.
    pub bdz: usize,
    /// Keys per thread group per tile.
    pub tile_per_z: usize,
    /// Depth of the cp.async ring.
    pub stages: usize,
    /// Minimum resident CTAs per SM asked of the register allocator (`__launch_bounds__`).
    pub min_ctas: usize,
    /// The tensor-core main loop (`decode_mma.cuh`): query heads are MMA rows, `warps` warps
    /// each take 16 keys of a tile. `nv`, `bdx`, `bdz`, `tile_per_z` then do not apply.
    pub mma: bool,
    /// Warps of the tensor-core loop (`mma`).
    pub warps: usize,
}

impl DecodeTile {
    /// Threads per CTA for a GQA group.
    pub fn threads(&self, group: usize) -> usize {
        if self.mma {
            32 * self.warps
        } else {
            self.bdx * group * self.bdz
        }
    }

    /// Keys per K/V tile.
    pub fn kv_tile(&self) -> usize {
        if self.mma {
            16 * self.warps
        } else {
            self.bdz * self.tile_per_z
        }
    }

    /// A short name for tables: "mma 4w 3s" (tensor cores: warps, stages) or "simt
    /// NV,BDZ,TPZ,STAGES,MIN_CTAS" (the CUDA-core loop).
    pub fn label(&self) -> String {
        if self.mma {
            format!("mma {}w {}s", self.warps, self.stages)
        } else {
            format!("simt {},{},{},{},{}", self.nv, self.bdz, self.tile_per_z, self.stages, self.min_ctas)
        }
    }

    /// The launch's block shape.
    pub fn block(&self, group: usize) -> (u32, u32, u32) {
        if self.mma {
            (32 * self.warps as u32, 1, 1)
        } else {
            (self.bdx as u32, group as u32, self.bdz as u32)
        }
    }
}

/// Keys per KV tile in the decode kernel.
const DECODE_KV_TILE: usize = 32;
/// Ring depth of the decode kernel.
const DECODE_STAGES: usize = 2;

/// Tile shape of the prefill kernel; see `templates/common/prefill.cuh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefillTile {
    /// Warps per CTA; each owns `mtiles` blocks of 16 query rows.
    pub warps: usize,
    /// 16-row blocks per warp: each K/V fragment read from shared memory feeds this many MMAs.
    pub mtiles: usize,
    /// Keys per K/V tile.
    pub kv_tile: usize,
    /// Depth of the cp.async ring.
    pub stages: usize,
    /// Minimum resident CTAs per SM asked of the register allocator (`__launch_bounds__`).
    pub min_ctas: usize,
    /// The Hopper main loop (`templates/common/prefill_sm90.cuh`, sm_90a only): 12 warps — a
    /// producer warpgroup and two consumer warpgroups of 64 rows — `kv_tile` 64 or 128 keys on
    /// wgmma, a `stages`-deep mbarrier ring; `mtiles` 1, `min_ctas` 1.
    pub sm90: bool,
}

impl std::str::FromStr for PrefillTile {
    type Err = String;
    /// `WARPS,MTILES,KV_TILE,STAGES,MIN_CTAS` for the portable loop, e.g. `4,2,64,2,1`, or
    /// `sm90,KV_TILE,STAGES` for the Hopper one, e.g. `sm90,128,2`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(rest) = s.trim().strip_prefix("sm90") {
            let n: Vec<usize> = rest.trim_start_matches(',').split(',').map(|x| x.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|e| format!("prefill tile `{s}`: {e}"))?;
            let [kv_tile, stages] = n[..] else {
                return Err(format!("prefill tile `{s}`: expected sm90,KV_TILE,STAGES"));
            };
            return Ok(PrefillTile::sm90(kv_tile, stages));
        }
        let n: Vec<usize> = s.split(',').map(|x| x.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|e| format!("prefill tile `{s}`: {e}"))?;
        let [warps, mtiles, kv_tile, stages, min_ctas] = n[..] else {
            return Err(format!("prefill tile `{s}`: expected WARPS,MTILES,KV_TILE,STAGES,MIN_CTAS"));
        };
        Ok(PrefillTile { warps, mtiles, kv_tile, stages, min_ctas, sm90: false })
    }
}

impl PrefillTile {
    /// The Hopper tile: a producer and two consumer warpgroups (128 query rows), `kv_tile` keys
    /// per tile, a `stages`-deep ring.
    pub fn sm90(kv_tile: usize, stages: usize) -> PrefillTile {
        PrefillTile { warps: 12, mtiles: 1, kv_tile, stages, min_ctas: 1, sm90: true }
    }

    /// A short name for tables: "sm90 128k 2s" (the Hopper loop: keys per tile, stages) or
    /// "4w×2 64k 2s 1c" (the portable one: warps × row blocks, keys, stages, min CTAs).
    pub fn label(&self) -> String {
        if self.sm90 {
            format!("sm90 {}k {}s", self.kv_tile, self.stages)
        } else {
            format!("{}w×{} {}k {}s {}c", self.warps, self.mtiles, self.kv_tile, self.stages, self.min_ctas)
        }
    }

    /// Query rows ((token, head) pairs) per CTA: the Hopper tile's producer warpgroup has none.
    pub fn rows(&self) -> usize {
        if self.sm90 {
            16 * self.mtiles * self.warps.saturating_sub(4)
        } else {
            16 * self.mtiles * self.warps
        }
    }
}

impl KernelConfig {
    /// A prefill config with validated dims and dtypes.
    pub fn prefill(head_dim_qk: usize, head_dim_vo: usize, dtype: DType, group: usize) -> Result<KernelConfig> {
        let cfg = KernelConfig { op: Op::Prefill, head_dim_qk, head_dim_vo, dtype_q: dtype, dtype_kv: dtype, dtype_o: dtype, group, tile_override: None, prefill_override: None };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The prefill tile. Up to d128: 8 warps (128 query rows), 32-key tiles, a 2-deep ring and
    /// registers capped for 2 CTAs per SM — on the H100 at bf16 d128 this ran 20–25% faster than
    /// 4 warps × 64-key tiles (latency-bound at 8 warps per SM, 202 registers), and than 4 warps ×
    /// 32 keys at 3 CTAs; 2 warps × 32 keys was 20% faster on q=8 appends but 15–20% slower on
    /// prompts (BENCHMARKS.md). Above d128 the 16 × 256 f32 accumulators need the registers: 4
    /// warps, 32-key tiles, no cap.
    pub fn prefill_tile(&self) -> PrefillTile {
        if let Some(t) = self.prefill_override {
            return t;
        }
        if self.head_dim_qk.max(self.head_dim_vo) > 128 {
            PrefillTile { warps: 4, mtiles: 1, kv_tile: 32, stages: 2, min_ctas: 1, sm90: false }
        } else {
            PrefillTile { warps: 4, mtiles: 2, kv_tile: 64, stages: 2, min_ctas: 1, sm90: false }
        }
    }

    /// Whether the engine runs prompts on the Hopper loop on sm_90a (where [`Self::sm90_prefill`]
    /// has a tile): at every head dim. Measured on the H200 (2026-12-03, eleventh session, one
    /// call, bf16, causal unless named, TFLOP/s, sm90 loop with its tensor copies spread over
    /// the producer warps / portable default, BENCHMARKS.md): d 128 single 4096 448 / 267, 16K
    /// 642 / 348, skewed 527 / 351, non-causal 16K 578 / 351, soft cap 16K 472 / 309, batch
    /// 16 × 2048 GQA 4 341 / 311; d 64 16K 389 / 303; d 256 16K 584 against 279 for the
    /// portable 4w×1 32k (tenth session). Appends keep the portable companion tile
    /// ([`Self::append_prefill`]).
    pub fn prefers_sm90_prefill(&self) -> bool {
        true
    }

    /// The Hopper prompt tile of a prefill config (`prefill_sm90.cuh`), which the engine loads
    /// instead of the portable one on sm_90a where [`Self::prefers_sm90_prefill`]: `None` when a
    /// tile was chosen explicitly (forcing the portable loop on Hopper is an override of the
    /// portable tile; forcing this one, an override with this tile) or the config does not fit
    /// it (head dims not multiples of 64). 128-key tiles up to d 128 (S is m64n128 per
    /// consumer), 64-key tiles above (the ring of 2 × 64 keys × d 256 and Q take 192 KB); a
    /// 2-deep ring.
    pub fn sm90_prefill(&self) -> Option<KernelConfig> {
        if self.op != Op::Prefill || self.prefill_override.is_some() || self.head_dim_qk % 64 != 0 || self.head_dim_vo % 64 != 0 || self.dtype_q != self.dtype_kv {
            return None;
        }
        let kv_tile = if self.head_dim_qk.max(self.head_dim_vo) <= 128 { 128 } else { 64 };
        let mut cfg = self.clone();
        cfg.prefill_override = Some(PrefillTile::sm90(kv_tile, 2));
        Some(cfg)
    }

    /// The append companion of a prefill config (the prompt tile is the config's own): 2 warps (32 query rows), which on the H100
    /// ran a q=8, kv=4096, B=64 append in 392 µs against 647 µs with the 128-row tile (the plan
    /// picks it when every request fits in 32 rows). `None` when a tuning tile was chosen
    /// explicitly; an explicit tile that only picks a main loop (the portable default, or
    /// [`Self::sm90_prefill`]'s) keeps the companion, so forcing a loop never slows appends.
    pub fn append_prefill(&self) -> Option<KernelConfig> {
        if self.op != Op::Prefill {
            return None;
        }
        if let Some(t) = self.prefill_override {
            let base = KernelConfig { prefill_override: None, ..self.clone() };
            let picks_a_loop = t == base.prefill_tile() || base.sm90_prefill().is_some_and(|c| c.prefill_override == Some(t));
            if !picks_a_loop {
                return None;
            }
        }
        let min_ctas = if self.head_dim_qk.max(self.head_dim_vo) > 128 { 1 } else { 6 };
        let mut cfg = self.clone();
        cfg.prefill_override = Some(PrefillTile { warps: 2, mtiles: 1, kv_tile: 32, stages: 2, min_ctas, sm90: false });
        Some(cfg)
    }

    /// A decode config with validated dims and dtypes.
    pub fn decode(head_dim_qk: usize, head_dim_vo: usize, dtype: DType, group: usize) -> Result<KernelConfig> {
        let cfg = KernelConfig { op: Op::Decode, head_dim_qk, head_dim_vo, dtype_q: dtype, dtype_kv: dtype, dtype_o: dtype, group, tile_override: None, prefill_override: None };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the head dims, dtypes, group and tile; `UnsupportedConfig` names what does not fit.
    pub fn validate(&self) -> Result<()> {
        for (what, d) in [("head_dim_qk", self.head_dim_qk), ("head_dim_vo", self.head_dim_vo)] {
            if d == 0 || d % 16 != 0 || d > 256 {
                return Err(Error::UnsupportedConfig(format!("{what} {d}: head dims must be multiples of 16 up to 256")));
            }
        }
        for (what, t) in [("q", self.dtype_q), ("kv", self.dtype_kv), ("o", self.dtype_o)] {
            if t == DType::F32 {
                return Err(Error::UnsupportedConfig(format!("{what} dtype f32: kernels take f16 or bf16")));
            }
        }
        if self.group == 0 {
            return Err(Error::UnsupportedConfig("GQA group 0".into()));
        }
        if self.op == Op::Prefill {
            let t = self.prefill_tile();
            if t.sm90 {
                if t.warps != 12 || t.mtiles != 1 || t.min_ctas != 1 || !matches!(t.kv_tile, 64 | 128) || !(2..=4).contains(&t.stages) {
                    return Err(Error::UnsupportedConfig(format!("sm90 prefill tile {t:?}: kv_tile 64 or 128, stages 2–4")));
                }
                if self.head_dim_qk % 64 != 0 || self.head_dim_vo % 64 != 0 {
                    return Err(Error::UnsupportedConfig(format!("the sm90 prefill tile takes head dims that are multiples of 64, not {}/{}", self.head_dim_qk, self.head_dim_vo)));
                }
                // Hopper's 227 KB per block, less the loop's static tables (at most 4.4 KB).
                const SM90_DYNAMIC_SMEM: usize = 227 * 1024 - 4400;
                if self.smem_bytes() > SM90_DYNAMIC_SMEM {
                    return Err(Error::UnsupportedConfig(format!(
                        "sm90 prefill tile {}k {}s at head dims {}/{} needs {} bytes of shared memory, more than the {SM90_DYNAMIC_SMEM} an sm_90a block has beside its tables",
                        t.kv_tile,
                        t.stages,
                        self.head_dim_qk,
                        self.head_dim_vo,
                        self.smem_bytes()
                    )));
                }
            } else if t.warps == 0 || t.warps > 16 || !(1..=4).contains(&t.mtiles) || t.kv_tile == 0 || t.kv_tile % 16 != 0 || t.stages < 2 || t.min_ctas == 0 {
                return Err(Error::UnsupportedConfig(format!("prefill tile {t:?}: warps 1–16, mtiles 1–4, kv_tile a multiple of 16, stages ≥ 2")));
            }
            if self.dtype_q != self.dtype_kv {
                return Err(Error::UnsupportedConfig("prefill needs the same dtype for q and the KV cache (tensor-core operands)".into()));
            }
            return Ok(());
        }
        let t = self.decode_tile();
        let simt_ok = t.nv > 0 && t.bdx > 0 && t.bdx.is_power_of_two() && t.bdx <= 32 && t.bdx * t.nv * 8 >= self.head_dim_qk.max(self.head_dim_vo) && t.tile_per_z > 0 && t.bdz > 0;
        let mma_ok = t.warps > 0 && self.group <= 16 && self.dtype_q == self.dtype_kv;
        if !(if t.mma { mma_ok } else { simt_ok }) || t.stages < 2 || t.min_ctas == 0 || t.threads(self.group) % 32 != 0 {
            return Err(Error::UnsupportedConfig(format!("decode tile {t:?} does not fit head dims {}/{} and group {}", self.head_dim_qk, self.head_dim_vo, self.group)));
        }
        if self.op == Op::Decode && t.threads(self.group) > 1024 {
            return Err(Error::UnsupportedConfig(format!(
                "decode with a GQA group of {} at head dim {} needs more than 1024 threads per block",
                self.group,
                self.head_dim_qk.max(self.head_dim_vo)
            )));
        }
        Ok(())
    }

    /// The decode tile shape: a pure function of the config.
    ///
    /// Each thread owns 32 dims (four 16-byte vectors; two at head dims under 128), so a score
    /// needs only log2(BDX) = 2–3 shuffle levels; an earlier shape with 8 dims per thread (4
    /// levels) and a 64 KB ring ran at 37–47% of the copy ceiling on the H100 (BENCHMARKS.md).
    /// The block is at least 128 threads of whole warps; the ring holds DECODE_STAGES tiles of 32
    /// keys, small enough for several CTAs per SM.
    pub fn decode_tile(&self) -> DecodeTile {
        if let Some(t) = self.tile_override {
            return t;
        }
        let max_d = self.head_dim_qk.max(self.head_dim_vo);
        let nv = if max_d >= 128 { 4 } else { 2 };
        let bdx = max_d.div_ceil(8 * nv).next_power_of_two();
        let base = bdx * self.group;
        let mut bdz = (128 / base).max(1);
        while (base * bdz) % 32 != 0 {
            bdz *= 2;
        }
        let tile_per_z = (DECODE_KV_TILE / bdz).max(1);
        // Grouped heads fill MMA rows; a group of 1 would waste 15 of 16 rows, so MHA keeps the
        // CUDA-core loop.
        let mma = (2..=16).contains(&self.group) && self.dtype_q == self.dtype_kv;
        // Tensor cores: 4 warps (64-key tiles) and a 3-deep ring up to d128 (104 KB, 2 CTAs per SM),
        // measured on the H100 at bf16 d128 GQA 4 against 2 warps × 2 stages (up to 20% slower),
        // 8 warps × 2 stages (up to 7% slower) and 4 warps × 2 stages (up to 19% slower, except
        // B256 L4096, 2% faster); above d128, 2 warps (32-key tiles) keep the same ring size.
        let warps = if max_d <= 128 { 4 } else { 2 };
        let stages = if mma { 3 } else { DECODE_STAGES };
        DecodeTile { nv, bdx, bdz, tile_per_z, stages, min_ctas: 1, mma, warps }
    }

    /// The config of the wide decode tile, for launches that leave each SM at most one CTA: the
    /// default tensor-core tile with twice the warps, so that every scheduler has two warps to
    /// switch between while the one CTA streams its span (at bf16 d128 GQA 4 on the H200, B16
    /// L4096: 8 warps 72.6 µs against 4 warps 80.5). `None` for CUDA-core tiles (MHA, mixed
    /// dtypes) and when a tile was forced. The engine uses it only where its ring fits the GPU.
    pub fn wide_decode(&self) -> Option<KernelConfig> {
        if self.op != Op::Decode || self.tile_override.is_some() {
            return None;
        }
        let t = self.decode_tile();
        if !t.mma {
            return None;
        }
        let mut c = self.clone();
        c.tile_override = Some(DecodeTile { warps: 2 * t.warps, ..t });
        Some(c)
    }

    /// Whether the K/V ring's shared-memory rows are XOR-swizzled (`AF_KV_SWIZZLE` in
    /// `decode_args.cuh`) instead of padded: decode, with both head dims multiples of 64 (rows of
    /// whole 128-byte lines). A padded row shifts odd rows by 16 bytes, so that their cp.async
    /// sectors straddle two 32-byte units of shared memory and are fetched from L2 twice (on the
    /// H200, 1.5× the L2 sectors of the bytes read).
    pub fn kv_swizzle(&self) -> bool {
        self.op == Op::Decode && self.head_dim_qk % 64 == 0 && self.head_dim_vo % 64 == 0
    }

    /// Elements of padding per shared-memory K or V row of the ring: none when swizzled, one
    /// 16-byte vector otherwise.
    fn kv_row_pad(&self) -> usize {
        if self.kv_swizzle() {
            0
        } else {
            8
        }
    }

    /// Dynamic shared memory of the kernel, in bytes: the K/V ring (rows swizzled, or padded by
    /// one 16-byte vector), which decode reuses afterwards for its cross-warp reduction.
    pub fn smem_bytes(&self) -> usize {
        let row = self.head_dim_qk + self.head_dim_vo + 2 * self.kv_row_pad();
        if self.op == Op::Prefill {
            let t = self.prefill_tile();
            if t.sm90 {
                // Q's 128 rows and the ring's K and V slots, unpadded (swizzled), plus the
                // slack that aligns them to 1024 bytes.
                let q = t.rows() * self.head_dim_qk * self.dtype_q.size();
                let ring = t.stages * t.kv_tile * (self.head_dim_qk + self.head_dim_vo) * self.dtype_kv.size();
                return 1024 + q + ring;
            }
            let ring = t.stages * t.kv_tile * row * self.dtype_kv.size();
            let q = t.rows() * (self.head_dim_qk + 8) * self.dtype_q.size();
            return ring + q;
        }
        let t = self.decode_tile();
        let ring = t.stages * t.kv_tile() * row * self.dtype_kv.size();
        let states = if t.mma { t.warps } else { t.bdz };
        let reduction = states * self.group * (2 + self.head_dim_vo) * 4;
        ring.max(reduction)
    }

    /// A readable name: variant, then [`KernelConfig::config_name`].
    pub fn entry_name(&self, variant: &str) -> String {
        format!("{variant}.{}", self.config_name())
    }

    /// The config's part of a kernel's name: op, dims, dtypes, group, and a forced tile.
    pub fn config_name(&self) -> String {
        let dims = if self.head_dim_qk == self.head_dim_vo {
            format!("d{}", self.head_dim_qk)
        } else {
            format!("d{}x{}", self.head_dim_qk, self.head_dim_vo)
        };
        let dt = if self.dtype_q == self.dtype_kv && self.dtype_kv == self.dtype_o {
            self.dtype_q.name().to_string()
        } else {
            format!("{}-{}-{}", self.dtype_q.name(), self.dtype_kv.name(), self.dtype_o.name())
        };
        let tile = match (self.op, self.prefill_override, self.tile_override) {
            (Op::Prefill, Some(t), _) if t.sm90 => format!(".sm90k{}s{}", t.kv_tile, t.stages),
            (Op::Prefill, Some(t), _) => format!(".w{}m{}k{}s{}", t.warps, t.mtiles, t.kv_tile, t.stages),
            (Op::Decode, _, Some(t)) if t.mma => format!(".mma{}w{}s", t.warps, t.stages),
            _ => String::new(),
        };
        format!("{}.{dims}.{dt}.g{}{tile}", self.op.name(), self.group)
    }
}

/// A rendered translation unit.
#[derive(Debug, Clone)]
pub struct KernelSource {
    /// Readable name: variant, op, dims, dtypes, group.
    pub name: String,
    /// The CUDA source.
    pub code: String,
    /// `(1-based line, hook)`: the line holding each hook's expression.
    pub hook_lines: Vec<(usize, String)>,
}

/// The cache key: blake3 over everything that changes the binary.
pub fn kernel_key(source: &str, options: &[String], arch: &Arch, nvrtc_version: (i32, i32)) -> CacheKey {
    KeyBuilder::new()
        .field("source", source.as_bytes())
        .field("options", options.join("\u{1f}").as_bytes())
        .field("arch", arch.name().as_bytes())
        .field("nvrtc", format!("{}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes())
        .field("crate", env!("CARGO_PKG_VERSION").as_bytes())
        .finish()
}

/// Where a kernel came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This process compiled or loaded it earlier.
    Memory,
    /// Read from the disk cache.
    Disk,
    /// Compiled by NVRTC now.
    Compiled,
}

/// A compiled kernel and how it was obtained.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    /// Its cache key.
    pub key: CacheKey,
    /// Readable name: variant, config, arch.
    pub name: String,
    /// The arch it was compiled for.
    pub arch: Arch,
    /// The CUBIN.
    pub cubin: Arc<Vec<u8>>,
    /// Where it came from.
    pub origin: Origin,
    /// Time spent in this call (render + lookup + compile).
    pub elapsed: Duration,
    /// The disk entry this kernel was read from or written to; `None` when it lives in memory
    /// only (no usable store, or the write failed).
    pub path: Option<PathBuf>,
    /// Cache problems worked around (a rebuilt corrupt entry, an unwritable directory).
    pub warnings: Vec<String>,
}

/// Compiles and caches kernels. Cheap to share across threads.
pub struct Jit {
    nvrtc: Nvrtc,
    store: Option<Store>,
    store_error: Option<String>,
    /// Compiled kernels of this process, with the disk entry each was read from or written to.
    memory: DashMap<CacheKey, (Arc<Vec<u8>>, Option<PathBuf>)>,
}

impl Jit {
    /// Finds NVRTC and the CUDA headers, and opens the disk store (an unusable store is a
    /// warning on each compile, not an error).
    pub fn new() -> Result<Jit> {
        let nvrtc = Nvrtc::load()?;
        let (store, store_error) = match Store::default_dir().and_then(Store::open) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(Jit { nvrtc, store, store_error, memory: DashMap::new() })
    }

    /// Like [`Jit::new`] with an explicit cache directory.
    pub fn with_store_dir(dir: impl Into<PathBuf>) -> Result<Jit> {
        let nvrtc = Nvrtc::load()?;
        let (store, store_error) = match Store::open(dir) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(Jit { nvrtc, store, store_error, memory: DashMap::new() })
    }

    /// The NVRTC it compiles with.
    pub fn nvrtc(&self) -> &Nvrtc {
        &self.nvrtc
    }

    /// The disk store, when usable.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Renders, looks up and, on a miss, compiles.
    pub fn get(&self, variant: &Variant, cfg: &KernelConfig, arch: &Arch) -> Result<CompiledKernel> {
        let t0 = Instant::now();
        cfg.validate()?;
        if cfg.op == Op::Prefill && cfg.prefill_tile().sm90 && !arch.has_wgmma() {
            return Err(Error::UnsupportedConfig(format!("the sm90 prefill tile needs sm_90a (wgmma, mbarrier transactions, setmaxnreg), not {}", arch.name())));
        }
        let src = render::render(variant, cfg)?;
        let meta = format!("variant={} op={} arch={}", variant.name, cfg.op.name(), arch.name());
        self.cached(src, arch, &meta, t0)
    }

    /// The public state merge for outputs of `dtype` ([`render::merge_states_source`]), through
    /// the same memory and disk cache as the attention kernels.
    pub fn get_merge_states(&self, dtype: crate::kv::DType, arch: &Arch) -> Result<CompiledKernel> {
        let t0 = Instant::now();
        let src = render::merge_states_source(dtype)?;
        self.cached(src, arch, &format!("op=merge_states dtype={} arch={}", dtype.name(), arch.name()), t0)
    }

    /// Looks `src` up in memory, then on disk, and compiles it on a miss; `meta` describes the
    /// disk entry.
    fn cached(&self, src: KernelSource, arch: &Arch, meta: &str, t0: Instant) -> Result<CompiledKernel> {
        let options = self.nvrtc.options(arch);
        let key = kernel_key(&src.code, &options, arch, self.nvrtc.version());
        let name = format!("{}.{}", src.name, arch.name());
        let mut warnings = Vec::new();
        let done = |cubin, origin, path, warnings| CompiledKernel { key, name: name.clone(), arch: arch.clone(), cubin, origin, elapsed: t0.elapsed(), path, warnings };
        if let Some(hit) = self.memory.get(&key) {
            let (cubin, path) = hit.value().clone();
            return Ok(done(cubin, Origin::Memory, path, warnings));
        }
        if let Some(store) = &self.store {
            match store.get(&key, &name) {
                Lookup::Hit(bytes) => {
                    let (cubin, path) = (Arc::new(bytes), Some(store.path_of(&key, &name)));
                    self.memory.insert(key, (cubin.clone(), path.clone()));
                    return Ok(done(cubin, Origin::Disk, path, warnings));
                }
                Lookup::Miss => {}
                Lookup::Corrupt(why) => warnings.push(format!("cache entry {name} was damaged ({why}); rebuilt it")),
                Lookup::Unreadable(why) => warnings.push(format!("cache entry {name} could not be read ({why}); compiled the kernel again")),
            }
        }
        let cubin = Arc::new(self.nvrtc.compile(&src, &options, self.store.as_ref().map(|s| s.dir()))?);
        let path = match (&self.store, &self.store_error) {
            (Some(store), _) => {
                let meta = format!("{meta} nvrtc={}.{}", self.nvrtc.version().0, self.nvrtc.version().1);
                match store.put(&key, &name, &meta, &cubin) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warnings.push(format!("{e}; keeping the kernel in memory only"));
                        None
                    }
                }
            }
            (None, Some(e)) => {
                warnings.push(format!("{e}; keeping the kernel in memory only"));
                None
            }
            (None, None) => None,
        };
        self.memory.insert(key, (cubin.clone(), path.clone()));
        Ok(done(cubin, Origin::Compiled, path, warnings))
    }
}
