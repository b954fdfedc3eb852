//! The CPU reference: batch attention over the paged cache, evaluating the same [`Variant`] the
//! kernels are rendered from.
//!
//! Everything runs in `f64` (hooks included), so the reference is the yardstick for the GPU at
//! either precision. Semantics, shared with every kernel:
//!
//! - query `i` of request `b` sits at `q_pos = kv_len - q_len + i`;
//! - key `kv_pos` is visible iff it lies in `kv_range` (when declared) and `mask` holds;
//! - `softmax`: `o = Σ e^(l_j - m) v_j / (Σ e^(l_j - m) + e^(sink - m))`, `lse` = log of the
//!   denominator (sink included), natural log;
//! - `none`: `o = Σ l_j v_j`, `lse = 0`;
//! - a row with no visible key gives `o = 0`, `lse = -inf`, never NaN. So does a softmax row
//!   whose visible logits are all `-inf`, whether or not it has a sink;
//! - a visible NaN logit (a hook computing `sqrt(-1.0)`) makes its softmax row NaN, `o` and
//!   `lse` (with `none` the NaN reaches `o` through the sum), and so does a NaN sink;
//! - `sm_scale` must be positive and finite ([`crate::spec::params::resolve_sm_scale`]).

use rayon::prelude::*;

use crate::kv::{Batch, Element};
use crate::spec::eval::{eval, Env};
use crate::spec::params::{Dims, ParamValues};
use crate::spec::{HookExpr, Normalize, Variant};
use crate::{Error, Result};

/// Attention output `[total_q, qo_heads, head_dim_vo]` and LSE `[total_q, qo_heads]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnOutput {
    /// The output, `[total_q, qo_heads, head_dim_vo]`.
    pub o: Vec<f32>,
    /// The LSE (natural log), `[total_q, qo_heads]`.
    pub lse: Vec<f32>,
}

/// The default softmax scale, `1/sqrt(head_dim_qk)`.
pub fn default_sm_scale(head_dim_qk: usize) -> f32 {
    1.0 / (head_dim_qk as f32).sqrt()
}

/// `(o, lse)` of a row with a NaN logit: NaN, which is what it is (not "fully masked").
fn nan_row(o_row: &mut [f32]) -> f32 {
    o_row.iter_mut().for_each(|x| *x = f32::NAN);
    f32::NAN
}

/// Runs the reference. Validates the batch and the parameters first.
pub fn attention<T: Element>(
    variant: &Variant,
    params: &ParamValues,
    batch: &Batch<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    sm_scale: Option<f32>,
) -> Result<AttnOutput> {
    let (sm_scale, token_req) = prepare(variant, params, batch, q, k, v, sm_scale)?;
    let ctx = RowCtx { variant, params, batch, q, k, v, sm_scale };
    fill_rows(batch, |t, h, o_row| ctx.row(token_req[t], t, h, o_row))
}

/// What both formulations check first: the batch against the buffers, the parameters against
/// their declarations and the batch, the softmax scale. Returns the scale and each query
/// token's request.
fn prepare<T>(variant: &Variant, params: &ParamValues, batch: &Batch<'_>, q: &[T], k: &[T], v: &[T], sm_scale: Option<f32>) -> Result<(f64, Vec<usize>)> {
    batch.validate(q.len(), k.len(), v.len())?;
    let dims = Dims { qo_heads: batch.qo_heads, kv_heads: batch.kv.kv_heads, batch: batch.batch_size() };
    params.fits(&variant.params, dims).map_err(Error::Param)?;
    params.check_bits(&variant.params, |b| (batch.q_len(b), batch.kv_len(b))).map_err(Error::Param)?;
    let sm_scale = f64::from(crate::spec::params::resolve_sm_scale(sm_scale, batch.kv.head_dim_qk).map_err(Error::Param)?);
    let mut token_req = vec![0usize; batch.total_q()];
    for b in 0..batch.batch_size() {
        token_req[batch.qo_indptr[b] as usize..batch.qo_indptr[b + 1] as usize].fill(b);
    }
    Ok((sm_scale, token_req))
}

/// The batch's output, each row (token `t`, head `h`) written by `row`, which returns its LSE;
/// in parallel over rows.
fn fill_rows(batch: &Batch<'_>, row: impl Fn(usize, usize, &mut [f32]) -> f32 + Sync) -> Result<AttnOutput> {
    let total_q = batch.total_q();
    let heads = batch.qo_heads;
    let dvo = batch.kv.head_dim_vo;
    // Validation bounded these sizes; an allocation that still fails is an error, not an abort.
    let zeros = |n: usize, what: &str| -> Result<Vec<f32>> {
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| Error::UnsupportedConfig(format!("the reference cannot allocate its {what} ({n} f32 values)")))?;
        v.resize(n, 0.0);
        Ok(v)
    };
    let mut out = AttnOutput { o: zeros(total_q * heads * dvo, "output")?, lse: zeros(total_q * heads, "LSE")? };
    out.o
        .par_chunks_mut(dvo.max(1))
        .zip(out.lse.par_iter_mut())
        .enumerate()
        .for_each(|(r, (o_row, lse))| *lse = row(r / heads, r % heads, o_row));
    Ok(out)
}

struct RowCtx<'a, T> {
    variant: &'a Variant,
    params: &'a ParamValues,
    batch: &'a Batch<'a>,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    sm_scale: f64,
}

/// The visible keys of one row over a window of its positions.
struct RowKeys {
    /// (position, logit, page, slot) of each visible key.
    visible: Vec<(usize, f64, usize, usize)>,
    /// The row's sink logit, when the variant has one.
    sink: Option<f64>,
    kv_head: usize,
}

impl<T: Element> RowCtx<'_, T> {
    /// The visible keys of row (token `t`, head `h` of request `b`) among logical positions
    /// `from..to`, which `pages` hold from position `first` on (`first` a multiple of the page
    /// size): in `kv_range`, unmasked, with their logits.
    #[allow(clippy::too_many_arguments)]
    fn keys(&self, b: usize, t: usize, h: usize, from: usize, to: usize, pages: &[i32], first: usize) -> RowKeys {
        let batch = self.batch;
        let kv = &batch.kv;
        let dqk = kv.head_dim_qk;
        let kv_len = batch.kv_len(b);
        let q_len = batch.q_len(b);
        let i = t - batch.qo_indptr[b] as usize;
        let kv_head = h / batch.group();
        let mut env = Env {
            score: 0.0f64,
            sm_scale: self.sm_scale,
            q_pos: kv_len as i32 - q_len as i32 + i as i32,
            kv_pos: 0,
            qo_head: h as i32,
            kv_head: kv_head as i32,
            req: b as i32,
            q_len: q_len as i32,
            kv_len: kv_len as i32,
            params: self.params,
        };
        let bound = |e: &Option<HookExpr>, env: &Env<'_, f64>, open: i64| {
            e.as_ref().map_or(open, |h| i64::from(eval(&h.typed, env).as_i()))
        };
        let (lo, hi) = match &self.variant.kv_range {
            None => (0, kv_len as i64 - 1),
            Some(r) => (bound(&r.lo, &env, 0).max(0), bound(&r.hi, &env, i64::MAX).min(kv_len as i64 - 1)),
        };
        let (lo, hi) = (lo.max(from as i64), hi.min(to as i64 - 1));
        let qv: Vec<f64> = (0..dqk).map(|d| self.q[(t * batch.qo_heads + h) * dqk + d].to_f64()).collect();
        let locate = |pos: usize| (pages[(pos - first) / kv.page_size] as usize, pos % kv.page_size);

        let mut visible = Vec::new();
        for pos in lo.max(0)..=hi {
            env.kv_pos = pos as i32;
            if let Some(m) = &self.variant.mask {
                if !eval(&m.typed, &env).as_b() {
                    continue;
                }
            }
            let (page, slot) = locate(pos as usize);
            let base = kv.k_index(page, slot, kv_head);
            env.score = (0..dqk).map(|d| qv[d] * self.k[base + d].to_f64()).sum();
            visible.push((pos as usize, eval(&self.variant.logits.typed, &env).as_f(), page, slot));
        }
        let sink = self.variant.sink.as_ref().map(|s| eval(&s.typed, &env).as_f());
        RowKeys { visible, sink, kv_head }
    }

    /// Computes one output row (token `t`, head `h` of request `b`) and returns its LSE.
    fn row(&self, b: usize, t: usize, h: usize, o_row: &mut [f32]) -> f32 {
        let kv = &self.batch.kv;
        let dvo = kv.head_dim_vo;
        let RowKeys { visible, sink, kv_head } = self.keys(b, t, h, 0, self.batch.kv_len(b), self.batch.pages.pages(b), 0);
        let visible: Vec<(usize, f64)> = visible.iter().map(|&(pos, l, _, _)| (pos, l)).collect();
        let pages = self.batch.pages.pages(b);
        let locate = |pos: usize| (pages[pos / kv.page_size] as usize, pos % kv.page_size);
        o_row.iter_mut().for_each(|x| *x = 0.0);
        if visible.is_empty() {
            return f32::NEG_INFINITY;
        }
        let (weights, lse) = match self.variant.normalize {
            Normalize::None => (visible.iter().map(|&(_, l)| l).collect::<Vec<_>>(), 0.0),
            Normalize::Softmax => {
                // A NaN logit (say sqrt(-1.0)) makes the row NaN; `max` below would skip it.
                if visible.iter().any(|&(_, l)| l.is_nan()) {
                    return nan_row(o_row);
                }
                let m = visible.iter().map(|&(_, l)| l).fold(f64::NEG_INFINITY, f64::max);
                // No visible key with a finite logit: 0 and -inf, sink or not (as the kernels do).
                if m == f64::NEG_INFINITY {
                    return f32::NEG_INFINITY;
                }
                let m = sink.map_or(m, |s| m.max(s));
                let e: Vec<f64> = visible.iter().map(|&(_, l)| (l - m).exp()).collect();
                let denom = e.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - m).exp());
                (e.iter().map(|x| x / denom).collect(), m + denom.ln())
            }
        };
        let mut acc = vec![0.0f64; dvo];
        for (&(pos, _), w) in visible.iter().zip(&weights) {
            let (page, slot) = locate(pos);
            let base = kv.v_index(page, slot, kv_head);
            for (d, a) in acc.iter_mut().enumerate() {
                *a += w * self.v[base + d].to_f64();
            }
        }
        for (o, a) in o_row.iter_mut().zip(&acc) {
            *o = *a as f32;
        }
        lse as f32
    }
}

/// The multi-level formulation of [`attention`]: each level's groups give every row a partial
/// state over the group's keys (logical positions, the group's own pages), the partial states
/// merge by `(o, lse)` ([`merge_state`]) and the sink joins once, at the end. Equal to
/// [`attention`] of `batch` up to floating-point reassociation when `cascade` decomposes it
/// (validated first).
#[allow(clippy::too_many_arguments)]
pub fn attention_cascade<T: Element>(
    variant: &Variant,
    params: &ParamValues,
    batch: &Batch<'_>,
    cascade: &crate::cascade::Cascade,
    q: &[T],
    k: &[T],
    v: &[T],
    sm_scale: Option<f32>,
) -> Result<AttnOutput> {
    let (sm_scale, token_req) = prepare(variant, params, batch, q, k, v, sm_scale)?;
    cascade.validate(batch)?;
    // Each request's groups, level by level.
    let mut groups: Vec<Vec<&crate::cascade::Group>> = vec![Vec::new(); batch.batch_size()];
    for level in &cascade.levels {
        for g in &level.groups {
            for &r in &g.requests {
                groups[r].push(g);
            }
        }
    }
    let ctx = RowCtx { variant, params, batch, q, k, v, sm_scale };
    fill_rows(batch, |t, h, o_row| {
        let b = token_req[t];
        let mut acc = State::empty(o_row.len());
        let mut sink = None;
        for g in &groups[b] {
            let keys = ctx.keys(b, t, h, g.kv_start, g.kv_start + g.len, &g.pages, g.kv_start);
            sink = keys.sink;
            acc = merge_state(variant.normalize, &acc, &ctx.partial(&keys));
        }
        let done = acc.finish(variant.normalize, sink);
        for (o, x) in o_row.iter_mut().zip(&done.o) {
            *o = *x as f32;
        }
        done.lse as f32
    })
}

/// A row's attention state over some of its keys, in f64: for softmax, the output normalised
/// over those keys and their LSE (`-inf`: no visible key; NaN: a NaN logit); with
/// `normalize: "none"`, the sum `Σ logit · v` and 0 (`-inf` without a visible key). No sink.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The output.
    pub o: Vec<f64>,
    /// The LSE (natural log).
    pub lse: f64,
}

impl State {
    /// The state of no key: `(0, -inf)`.
    pub fn empty(dim: usize) -> State {
        State { o: vec![0.0; dim], lse: f64::NEG_INFINITY }
    }

    /// The final `(o, lse)` of a row: the sink (a logit that joins the softmax denominator only)
    /// added once. A row with no visible key stays `(0, -inf)`, sink or not, as the kernels do.
    pub fn finish(mut self, normalize: Normalize, sink: Option<f64>) -> State {
        if self.lse.is_nan() {
            self.o.iter_mut().for_each(|x| *x = f64::NAN);
            return self;
        }
        match (normalize, sink) {
            (Normalize::Softmax, Some(s)) if self.lse > f64::NEG_INFINITY => {
                let m = self.lse.max(s);
                let lse = m + ((self.lse - m).exp() + (s - m).exp()).ln();
                let scale = (self.lse - lse).exp();
                self.o.iter_mut().for_each(|x| *x *= scale);
                State { o: self.o, lse }
            }
            _ => self,
        }
    }
}

/// Merges the states of a row over two disjoint key sets (associative and commutative): for
/// softmax, `lse = log(e^a + e^b)` and the outputs weighted by `e^(lse_side - lse)`; a side
/// with `lse = -inf` contributes nothing, and a NaN side makes the row NaN. With
/// `normalize: "none"`, the sums add.
pub fn merge_state(normalize: Normalize, a: &State, b: &State) -> State {
    if a.lse.is_nan() || b.lse.is_nan() {
        return State { o: vec![f64::NAN; a.o.len()], lse: f64::NAN };
    }
    if b.lse == f64::NEG_INFINITY {
        return a.clone();
    }
    if a.lse == f64::NEG_INFINITY {
        return b.clone();
    }
    match normalize {
        Normalize::None => State { o: a.o.iter().zip(&b.o).map(|(x, y)| x + y).collect(), lse: 0.0 },
        Normalize::Softmax => {
            let m = a.lse.max(b.lse);
            let (wa, wb) = ((a.lse - m).exp(), (b.lse - m).exp());
            let lse = m + (wa + wb).ln();
            let (wa, wb) = (wa / (wa + wb), wb / (wa + wb));
            State { o: a.o.iter().zip(&b.o).map(|(x, y)| wa * x + wb * y).collect(), lse }
        }
    }
}

impl<T: Element> RowCtx<'_, T> {
    /// The state of a row over `keys` (no sink).
    fn partial(&self, keys: &RowKeys) -> State {
        let kv = &self.batch.kv;
        let dvo = kv.head_dim_vo;
        if keys.visible.is_empty() {
            return State::empty(dvo);
        }
        let (weights, lse): (Vec<f64>, f64) = match self.variant.normalize {
            Normalize::None => (keys.visible.iter().map(|k| k.1).collect(), 0.0),
            Normalize::Softmax => {
                if keys.visible.iter().any(|k| k.1.is_nan()) {
                    return State { o: vec![f64::NAN; dvo], lse: f64::NAN };
                }
                let m = keys.visible.iter().map(|k| k.1).fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    return State::empty(dvo);
                }
                let e: Vec<f64> = keys.visible.iter().map(|k| (k.1 - m).exp()).collect();
                let d: f64 = e.iter().sum();
                (e.iter().map(|x| x / d).collect(), m + d.ln())
            }
        };
        let mut o = vec![0.0f64; dvo];
        for (&(_, _, page, slot), w) in keys.visible.iter().zip(&weights) {
            let base = kv.v_index(page, slot, keys.kv_head);
            for (d, a) in o.iter_mut().enumerate() {
                *a += w * self.v[base + d].to_f64();
            }
        }
        State { o, lse }
    }
}
