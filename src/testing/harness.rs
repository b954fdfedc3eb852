//! Runs a host [`Workload`] on the GPU and compares it with the CPU reference. Shared by the
//! CLI (`run`, the demo), the benchmark and the GPU tests, so they all check the same way.
//!
//! Outputs are poisoned (NaN) before every launch, so an element the kernel forgot to write fails
//! the comparison instead of passing as a stale value.

use cudarc::driver::{CudaSlice, DeviceRepr};

use crate::engine::{DecodeKernel, DeviceBatch, DeviceOutput, DeviceParams, DeviceTable, Engine, Family, Kernel, KvCache, PlanBuffers, PrefillKernel};
use crate::kv::{DType, Element, ValidBatch};
use crate::plan::{DecodePlan, PlanMode, PrefillPlan};
use crate::reference::AttnOutput;
use crate::spec::params::ParamValues;
use crate::testing::workload::Workload;
use crate::Result;

/// A workload's inputs on the device: queries, the cache, and its validated page table.
pub struct DeviceWorkload<T> {
    /// Queries.
    pub q: CudaSlice<T>,
    /// The K buffer (the whole cache when interleaved).
    pub k: CudaSlice<T>,
    /// The V buffer when separate.
    pub v: Option<CudaSlice<T>>,
    /// The page table and query offsets, as the engine uploaded them.
    pub table: DeviceTable,
}

impl<T: Element + DeviceRepr> DeviceWorkload<T> {
    /// Uploads `w` (validating its batch once).
    pub fn upload(e: &Engine, w: &Workload<T>) -> Result<Self> {
        let mut table = None;
        e.upload_table(&w.batch().validated()?, &mut table)?;
        Ok(DeviceWorkload {
            q: e.upload(&w.q)?,
            k: e.upload(&w.k)?,
            v: if w.kv.interleaved { None } else { Some(e.upload(&w.v)?) },
            table: table.ok_or(crate::error::PlanError::NotUploaded)?,
        })
    }

    /// The K/V cache.
    pub fn kv(&self) -> KvCache<'_, T> {
        match &self.v {
            None => KvCache::Interleaved(&self.k),
            Some(v) => KvCache::Separate { k: &self.k, v },
        }
    }

    /// The launch inputs.
    pub fn batch(&self) -> DeviceBatch<'_, T> {
        DeviceBatch { q: &self.q, kv: self.kv() }
    }
}

/// Output buffers, poisoned with NaN.
pub struct DeviceResult<T> {
    /// The output.
    pub o: CudaSlice<T>,
    /// The LSE.
    pub lse: CudaSlice<f32>,
}

impl<T: Element + DeviceRepr> DeviceResult<T> {
    /// Outputs of the given lengths, filled with NaN.
    pub fn poisoned(e: &Engine, o_len: usize, lse_len: usize) -> Result<Self> {
        Ok(DeviceResult { o: e.upload(&vec![T::from_f32(f32::NAN); o_len])?, lse: e.upload(&vec![f32::NAN; lse_len])? })
    }

    /// The launch's view.
    pub fn out(&mut self) -> DeviceOutput<'_, T> {
        DeviceOutput { o: &mut self.o, lse: &mut self.lse }
    }

    /// Downloads (and widens) the outputs.
    pub fn download(&self, e: &Engine) -> Result<AttnOutput> {
        let o = e.download(&self.o)?.iter().map(|x| x.to_f64() as f32).collect();
        Ok(AttnOutput { o, lse: e.download(&self.lse)? })
    }
}

/// Uploads `w`, plans it with `plan`, uploads the plan and the parameters, launches with `k`,
/// and downloads the result: every one-shot run.
fn run_once<F: Family, T: Element + DeviceRepr>(
    e: &Engine,
    k: &Kernel<F>,
    params: &ParamValues,
    w: &Workload<T>,
    plan: impl FnOnce(&ValidBatch<'_>) -> Result<F::Plan>,
    sm_scale: Option<f32>,
) -> Result<(AttnOutput, F::Plan)> {
    run_with(e, k, params, w, plan, |plan, bufs, dp, dev, out| e.launch(k, plan, bufs, dp, &dev.table, &dev.batch(), out, sm_scale))
}

/// [`run_once`] with the launch given.
fn run_with<F: Family, T: Element + DeviceRepr>(
    e: &Engine,
    k: &Kernel<F>,
    params: &ParamValues,
    w: &Workload<T>,
    plan: impl FnOnce(&ValidBatch<'_>) -> Result<F::Plan>,
    launch: impl FnOnce(&F::Plan, &PlanBuffers, &DeviceParams, &DeviceWorkload<T>, DeviceOutput<'_, T>) -> Result<()>,
) -> Result<(AttnOutput, F::Plan)> {
    let dev = DeviceWorkload::upload(e, w)?;
    let batch = dev.table.batch();
    let plan = plan(&batch)?;
    let mut res = DeviceResult::<T>::poisoned(e, batch.o_elems(), batch.total_q() * batch.qo_heads)?;
    let mut bufs: Option<PlanBuffers> = None;
    e.upload_plan(&plan, &mut bufs)?;
    let dp = e.upload_params(&k.layout, params)?;
    let bufs = bufs.ok_or(crate::error::PlanError::NotUploaded)?;
    launch(&plan, &bufs, &dp, &dev, res.out())?;
    Ok((res.download(e)?, plan))
}

/// Plans, uploads and runs one decode batch; returns the output and the plan.
pub fn decode_once<T: Element + DeviceRepr>(e: &Engine, k: &DecodeKernel, params: &ParamValues, w: &Workload<T>, mode: PlanMode, sm_scale: Option<f32>) -> Result<(AttnOutput, DecodePlan)> {
    run_once(e, k, params, w, |b| e.plan_decode(k, params, b, mode), sm_scale)
}

/// Plans `w` through the cascade `policy` detects in its page table (`None` when it finds none),
/// uploads and runs it on the prefill kernel (decode batches included: a decode request is an
/// append of one token); returns the output, the plan and the cascade.
pub fn cascade_once<T: Element + DeviceRepr>(
    e: &Engine,
    k: &PrefillKernel,
    params: &ParamValues,
    w: &Workload<T>,
    policy: &crate::cascade::Policy,
    mode: PlanMode,
    sm_scale: Option<f32>,
) -> Result<Option<(AttnOutput, PrefillPlan, crate::cascade::Cascade)>> {
    let Some(c) = crate::cascade::detect(&w.batch().validated()?, policy) else { return Ok(None) };
    let (out, plan) = run_once(e, k, params, w, |b| e.plan_cascade(k, params, b, &c, mode), sm_scale)?;
    Ok(Some((out, plan, c)))
}

/// Plans `w` (a decode batch) through `cascade` with its shared levels on `pk` and its suffixes
/// on `dk` ([`Engine::plan_decode_cascade`]), uploads and runs it; returns the output and the plan.
#[allow(clippy::too_many_arguments)]
pub fn decode_cascade_once<T: Element + DeviceRepr>(
    e: &Engine,
    dk: &DecodeKernel,
    pk: &PrefillKernel,
    params: &ParamValues,
    w: &Workload<T>,
    cascade: &crate::cascade::Cascade,
    mode: PlanMode,
    sm_scale: Option<f32>,
) -> Result<(AttnOutput, DecodePlan)> {
    run_with(e, dk, params, w, |b| e.plan_decode_cascade(dk, pk, params, b, cascade, mode), |plan, bufs, dp, dev, out| {
        e.run_decode_cascade(dk, pk, plan, bufs, dp, &dev.table, &dev.batch(), out, sm_scale)
    })
}

/// Plans, uploads and runs one prefill/append batch; returns the output and the plan.
pub fn prefill_once<T: Element + DeviceRepr>(e: &Engine, k: &PrefillKernel, params: &ParamValues, w: &Workload<T>, mode: PlanMode, sm_scale: Option<f32>) -> Result<(AttnOutput, PrefillPlan)> {
    run_once(e, k, params, w, |b| e.plan_prefill(k, params, b, mode), sm_scale)
}

/// How a kernel's output differs from the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Elements outside the tolerance (NaN and unwritten included).
    pub bad: usize,
    /// The first element out of tolerance.
    pub worst: Option<usize>,
    /// The largest absolute error of the output (infinite for a NaN error).
    pub max_err: f32,
    /// ‖got − want‖ / ‖want‖ over the output.
    pub rel_l2: f64,
    /// LSE entries outside tolerance, or -inf where the reference is finite (or vice versa).
    pub bad_lse: usize,
    /// The largest absolute LSE error among finite entries.
    pub max_lse_err: f32,
}

impl Comparison {
    /// Whether every output and LSE entry is within tolerance.
    pub fn ok(&self) -> bool {
        self.bad == 0 && self.bad_lse == 0
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: max |Δo| {:.2e}, rel L2 {:.2e}, max |Δlse| {:.2e}, {} bad outputs{}, {} bad lse",
            if self.ok() { "ok" } else { "MISMATCH" },
            self.max_err,
            self.rel_l2,
            self.max_lse_err,
            self.bad,
            self.worst.map_or(String::new(), |w| format!(" (first at {w})")),
            self.bad_lse
        )
    }
}

/// Unit roundoff of the output type.
fn unit_roundoff(t: DType) -> f32 {
    match t {
        DType::Bf16 => 2f32.powi(-8),
        DType::F16 => 2f32.powi(-11),
        DType::F32 => 2f32.powi(-24),
    }
}

/// Compares with the f64 reference. Inputs are the same stored values on both sides, so the
/// kernel's error is f32 accumulation (with `ex2.approx`, relative error ~2^-22) plus rounding the
/// result to the output type, at most `u·|ref|`. The bound per element is `2u·(|ref| + max |ref|
/// of its row)`: twice the unavoidable rounding, plus a row-scaled slack for cancellation in the
/// weighted sum. A wrong index, a missed key or a lost tile is an error of order the row's
/// magnitude, far outside it. LSE is f32 throughout: `1e-3·(1 + |lse|)`.
pub fn compare(got: &AttnOutput, want: &AttnOutput, out_dtype: DType, head_dim_vo: usize) -> Comparison {
    let u = unit_roundoff(out_dtype);
    let mut c = Comparison { bad: 0, worst: None, max_err: 0.0, rel_l2: 0.0, bad_lse: 0, max_lse_err: 0.0 };
    let (mut num, mut den) = (0f64, 0f64);
    for (r, (g_row, w_row)) in got.o.chunks(head_dim_vo.max(1)).zip(want.o.chunks(head_dim_vo.max(1))).enumerate() {
        let row_max = w_row.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (g, w)) in g_row.iter().zip(w_row).enumerate() {
            if w.is_nan() && g.is_nan() {
                continue; // a NaN row (NaN logit) agrees; it has no error to measure
            }
            let err = (g - w).abs();
            num += f64::from(err) * f64::from(err);
            den += f64::from(*w) * f64::from(*w);
            // A NaN error is out of bounds too (`within` is false for it), including a finite
            // kernel value where the reference is NaN.
            let within = err <= 2.0 * u * (w.abs() + row_max);
            if !within {
                c.bad += 1;
                c.worst.get_or_insert(r * head_dim_vo + i);
            }
            if err.is_finite() {
                c.max_err = c.max_err.max(err);
            } else {
                c.max_err = f32::INFINITY;
            }
        }
    }
    if got.o.len() != want.o.len() {
        c.bad += got.o.len().abs_diff(want.o.len());
    }
    c.rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    for (g, w) in got.lse.iter().zip(&want.lse) {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= 1e-3 * (1.0 + w.abs())
        };
        if !ok {
            c.bad_lse += 1;
        }
        if w.is_finite() && g.is_finite() {
            c.max_lse_err = c.max_lse_err.max((g - w).abs());
        }
    }
    c
}

