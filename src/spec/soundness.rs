//! Checks that a declared `kv_range` never hides a key the `mask` admits.
//!
//! `kv_range` lets kernels skip whole pages, so it must contain every visible key. The check
//! evaluates both hooks over many sampled shapes and parameter values (the same sampling the
//! property tests use) and reports the first counterexample. It is a test, not a proof: it can
//! miss a bound that fails only for shapes it never drew.
//!
//! The work is bounded: every hook evaluation is charged its tree's size against
//! [`EVAL_BUDGET`], and a check that runs out stops early and says so ([`Coverage`]), so a long
//! hook cannot make `attnforge check` run for minutes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::eval::{eval, Env};
use super::params::{sample, Dims};
use super::{HookExpr, Variant};

/// A query and key where the mask says visible but the range says skip.
#[derive(Debug, Clone, PartialEq)]
pub struct Counterexample {
    /// The query's position in its request's KV sequence.
    pub q_pos: i32,
    /// The key the mask admits but the range skips.
    pub kv_pos: i32,
    /// The request's number of query tokens.
    pub q_len: i32,
    /// The request's number of KV tokens.
    pub kv_len: i32,
    /// The request's index in the batch.
    pub req: i32,
    /// The query head for which the mask admits the key.
    pub qo_head: i32,
    /// The KV head of `qo_head`.
    pub kv_head: i32,
    /// The range's lower bound for this query (`i64::MIN` when open).
    pub lo: i64,
    /// The range's upper bound for this query (`i64::MAX` when open).
    pub hi: i64,
    /// The sampled parameter values as `name = value` pairs joined by `, `; empty when there are none.
    pub params: String,
}

impl std::fmt::Display for Counterexample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kv_range hides a visible key: with {}q_pos = {} (q_len {}, kv_len {}, req {}, qo_head {}, \
             kv_head {}) the mask admits kv_pos = {} but kv_range is [{}, {}]",
            if self.params.is_empty() { String::new() } else { format!("{}, ", self.params) },
            self.q_pos,
            self.q_len,
            self.kv_len,
            self.req,
            self.qo_head,
            self.kv_head,
            self.kv_pos,
            self.lo,
            self.hi
        )
    }
}

/// Tree nodes the check may evaluate in all: about a second of evaluation on one core (a 4 KB
/// mask over an empty range took 18 s for 300 shapes without a budget). No shipped variant
/// comes near it (`the_soundness_check_is_bounded_and_says_when_it_was_cut_short`).
pub const EVAL_BUDGET: u64 = 100_000_000;

/// How much of the requested sampling a check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Shapes fully checked.
    pub trials: usize,
    /// Shapes asked for.
    pub wanted: usize,
    /// Tree nodes evaluated.
    pub evaluated: u64,
}

impl Coverage {
    /// Whether the budget ran out before every shape was checked.
    pub fn cut_short(&self) -> bool {
        self.trials < self.wanted
    }
}

/// Samples `trials` random shapes; returns the first counterexample found, or how many shapes
/// were checked within the budget.
pub fn check_kv_range(v: &Variant, trials: usize, seed: u64) -> Result<Coverage, Box<Counterexample>> {
    check_kv_range_within(v, trials, seed, EVAL_BUDGET)
}

/// [`check_kv_range`] with an explicit budget of evaluated tree nodes.
pub fn check_kv_range_within(v: &Variant, trials: usize, seed: u64, budget: u64) -> Result<Coverage, Box<Counterexample>> {
    let mut cov = Coverage { trials: 0, wanted: trials, evaluated: 0 };
    let Some(range) = &v.kv_range else {
        cov.trials = trials;
        return Ok(cov);
    };
    let size = |h: &Option<HookExpr>| h.as_ref().map_or(0, |h| h.typed.size() as u64);
    let (range_cost, mask_cost) = (size(&range.lo) + size(&range.hi), size(&v.mask).max(1));
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..trials {
        let kv_heads = rng.random_range(1..=2usize);
        let group = rng.random_range(1..=3usize);
        let dims = Dims { qo_heads: kv_heads * group, kv_heads, batch: rng.random_range(1..=3) };
        let req = rng.random_range(0..dims.batch) as i32;
        let kv_len = rng.random_range(0..=160i32);
        let q_len = rng.random_range(1..=kv_len.clamp(1, 48));
        let lens = vec![(q_len as usize, kv_len as usize); dims.batch];
        let params = sample(&v.params, dims, &lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
        let describe = || {
            v.params
                .iter()
                .zip(params.values())
                .map(|(d, x)| format!("{} = {}", d.name, value_text(x)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // The most this shape can cost; a shape is checked whole or not at all.
        let worst = q_len as u64 * kv_heads as u64 * (range_cost + kv_len as u64 * group as u64 * mask_cost);
        if cov.evaluated + worst > budget {
            return Ok(cov);
        }
        for i in 0..q_len {
            for kv_head in 0..kv_heads as i32 {
                let mut env = Env {
                    score: 0.0f64,
                    sm_scale: 0.125,
                    q_pos: kv_len - q_len + i,
                    kv_pos: 0,
                    qo_head: kv_head * group as i32,
                    kv_head,
                    req,
                    q_len,
                    kv_len,
                    params: &params,
                };
                let bound = |h: &Option<HookExpr>, env: &Env<'_, f64>, open: i64| {
                    h.as_ref().map_or(open, |h| i64::from(eval(&h.typed, env).as_i()))
                };
                let lo = bound(&range.lo, &env, i64::MIN);
                let hi = bound(&range.hi, &env, i64::MAX);
                cov.evaluated += range_cost;
                for kv_pos in 0..kv_len {
                    if (lo..=hi).contains(&i64::from(kv_pos)) {
                        continue;
                    }
                    env.kv_pos = kv_pos;
                    cov.evaluated += group as u64 * mask_cost;
                    for g in 0..group as i32 {
                        env.qo_head = kv_head * group as i32 + g;
                        let visible = v.mask.as_ref().is_none_or(|m| eval(&m.typed, &env).as_b());
                        if visible {
                            return Err(Box::new(Counterexample {
                                q_pos: env.q_pos,
                                kv_pos,
                                q_len,
                                kv_len,
                                req,
                                qo_head: env.qo_head,
                                kv_head,
                                lo,
                                hi,
                                params: describe(),
                            }));
                        }
                    }
                }
            }
        }
        cov.trials += 1;
    }
    Ok(cov)
}

fn value_text(v: &super::params::ParamValue) -> String {
    use super::params::ParamValue::*;
    match v {
        I32(x) => x.to_string(),
        F32(x) => x.to_string(),
        I32s(xs) => format!("{xs:?}"),
        F32s(xs) => format!("{xs:?}"),
        Bits { .. } => "<bits>".to_string(),
    }
}
