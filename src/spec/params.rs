//! Runtime parameters: their declarations in a spec, and their values for one launch.
//!
//! Every numeric constant of a model is a parameter, so changing a value never recompiles. A
//! declaration gives the type (`"f32"`, `"i32"`, an array such as `"f32[qo_heads]"`, or `"bits"`:
//! a packed per-request bit matrix of q_len × kv_len, read in a hook as `bit(name)`), and
//! optionally a `default`, a valid `range` and a `sample` range for random testing.

use std::collections::HashMap;

use super::eval::{Real, Val};
use super::typed::{Builtin, ParamDim, ParamTy, Ty};

/// A parameter as a spec declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    /// The parameter's name: a plain identifier that is not reserved.
    pub name: String,
    /// The parameter's declared type.
    pub ty: ParamTy,
    /// Free text from the spec (empty when absent).
    pub description: String,
    /// Used when a launch does not give the parameter; a scalar default fills an array.
    pub default: Option<f64>,
    /// Inclusive bounds every value must satisfy.
    pub range: Option<(f64, f64)>,
    /// Inclusive bounds for random values in tests and demos (defaults to `range`).
    pub sample: Option<(f64, f64)>,
}

impl ParamDecl {
    /// Bounds for random values: `sample`, else `range`, else a small default.
    pub fn sample_bounds(&self) -> (f64, f64) {
        self.sample.or(self.range).unwrap_or(match self.ty.elem {
            Ty::I32 => (0.0, 64.0),
            _ => (-1.0, 1.0),
        })
    }
}

/// Words in the fixed-size params blob every kernel takes (128 bytes): a spec whose parameters
/// need more is refused by `spec::load`.
pub const PARAM_WORDS: usize = 16;

/// One field of the rendered `Params` struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamField {
    /// The C++ field name (`u_<name>`, or `o_<name>` for a `bits` parameter's offsets).
    pub field: String,
    /// The field's C type (`int`, `float`, `const float*`, …).
    pub ctype: &'static str,
    /// Byte offset of the field in the blob.
    pub offset: usize,
    /// Size of the field in bytes (4 or 8).
    pub size: usize,
}

/// C layout of the params struct in declaration order: scalars are 4 bytes, arrays are device
/// pointers (8 bytes, 8-aligned), a `bits` parameter is two pointers (`u_<name>` to the packed
/// bits, `o_<name>` to the per-request offsets). Errors if it does not fit the blob.
pub fn param_layout(decls: &[ParamDecl]) -> Result<Vec<ParamField>, String> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(decls.len());
    for d in decls {
        if d.ty.dim == Some(ParamDim::QueryKey) {
            at = at.div_ceil(8) * 8;
            out.push(ParamField { field: super::cuda::param_field(&d.name), ctype: "const unsigned char*", offset: at, size: 8 });
            out.push(ParamField { field: super::cuda::bits_offsets_field(&d.name), ctype: "const long long*", offset: at + 8, size: 8 });
            at += 16;
            continue;
        }
        let (ctype, size) = match (d.ty.elem, d.ty.dim.is_some()) {
            (Ty::I32, false) => ("int", 4),
            (_, false) => ("float", 4),
            (Ty::I32, true) => ("const int*", 8),
            (_, true) => ("const float*", 8),
        };
        at = at.div_ceil(size) * size;
        out.push(ParamField { field: super::cuda::param_field(&d.name), ctype, offset: at, size });
        at += size;
    }
    if at > PARAM_WORDS * 8 {
        return Err(format!("the parameters need {at} bytes; at most {} fit a kernel's params blob", PARAM_WORDS * 8));
    }
    Ok(out)
}

/// The bounds of a softmax scale, inclusive: 2^-100 and 2^100 (any real scale, 1/sqrt(d) or a
/// model's own, lies far inside; `sm_scale · log2 e` stays a normal f32).
pub const SM_SCALE_RANGE: (f32, f32) = (7.888609e-31, 1.2676506e30);

/// The softmax scale of a launch: the given one, else `1/sqrt(head_dim_qk)`. It must lie in
/// [`SM_SCALE_RANGE`] — kernels fold it into the exponent, so the row max of raw scores is the
/// max of the logits, and the logits hook's factoring (`spec::factor`) proves its bounds from
/// these — and every entry point (the reference, every launch) refuses anything else.
pub fn resolve_sm_scale(given: Option<f32>, head_dim_qk: usize) -> Result<f32, String> {
    let s = given.unwrap_or_else(|| 1.0 / (head_dim_qk as f32).sqrt());
    if (SM_SCALE_RANGE.0..=SM_SCALE_RANGE.1).contains(&s) {
        Ok(s)
    } else {
        Err(format!("sm_scale {s}: it must be positive and finite, between 2^-100 and 2^100"))
    }
}

/// The sizes that array parameters are indexed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Query heads.
    pub qo_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Requests in the batch.
    pub batch: usize,
}

impl Dims {
    /// The element count of an array over `d`; a `bits` parameter has one matrix (one offset) per
    /// request.
    pub fn len(&self, d: ParamDim) -> usize {
        match d {
            ParamDim::QoHeads => self.qo_heads,
            ParamDim::KvHeads => self.kv_heads,
            ParamDim::Batch | ParamDim::QueryKey => self.batch,
        }
    }
}

/// A value as a user gives it: one number, or one per element.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamInput {
    /// One number; for an array, it fills every element.
    Scalar(f64),
    /// One number per element, in index order.
    List(Vec<f64>),
    /// A `bits` value: little-endian packed bits, and per request the bit offset of its
    /// row-major q_len × kv_len matrix.
    Bits(Vec<u8>, Vec<i64>),
}

impl ParamInput {
    /// Parses `30`, `-1.5` or `0.5,0.25,0.125`.
    pub fn parse(text: &str) -> Result<ParamInput, String> {
        let nums = text
            .split(',')
            .map(|s| {
                s.trim().parse::<f64>().map_err(|_| format!("`{}` is not a number", s.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match nums.as_slice() {
            [x] if !text.contains(',') => ParamInput::Scalar(*x),
            _ => ParamInput::List(nums),
        })
    }
}

/// One bound parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// An `i32` scalar.
    I32(i32),
    /// An `f32` scalar.
    F32(f32),
    /// An `i32` array, one element per index of its dimension.
    I32s(Vec<i32>),
    /// An `f32` array, one element per index of its dimension.
    F32s(Vec<f32>),
    /// Packed bits (bit `k` is `data[k / 8] >> (k % 8) & 1`) and each request's bit offset.
    Bits {
        /// The packed bits of every request's matrix.
        data: Vec<u8>,
        /// Each request's bit offset into `data`, one per request.
        offsets: Vec<i64>,
    },
}

/// The values of all of a variant's parameters, in declaration order, checked against the
/// declarations (types, lengths, ranges). Only [`bind`] and [`sample`] make one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamValues {
    values: Vec<(ParamValue, Option<ParamDim>)>,
}

impl ParamValues {
    /// The bound values, in declaration order.
    pub fn values(&self) -> impl Iterator<Item = &ParamValue> {
        self.values.iter().map(|(v, _)| v)
    }

    /// How many parameters are bound.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no parameter is bound.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The value of parameter `i` for the element `index` selects (arrays are indexed by
    /// `qo_head`, `kv_head` or `req`).
    pub fn get<F: Real>(&self, i: usize, index: impl Fn(Builtin) -> i32) -> Val<F> {
        let Some((v, dim)) = self.values.get(i) else { return Val::I(0) };
        let at = dim.map_or(0, |d| usize::try_from(index(d.index())).unwrap_or(usize::MAX));
        match v {
            ParamValue::I32(x) => Val::I(*x),
            ParamValue::F32(x) => Val::F(F::from_f32(*x)),
            ParamValue::I32s(xs) => Val::I(xs.get(at).copied().unwrap_or(0)),
            ParamValue::F32s(xs) => Val::F(F::from_f32(xs.get(at).copied().unwrap_or(0.0))),
            ParamValue::Bits { .. } => Val::B(false),
        }
    }

    /// Bit (`row`, `kv_pos`) of request `req`'s matrix in `bits` parameter `i`; false outside it.
    pub fn bit(&self, i: usize, req: i32, row: i32, kv_pos: i32, kv_len: i32) -> bool {
        let Some((ParamValue::Bits { data, offsets }, _)) = self.values.get(i) else { return false };
        let Some(&off) = usize::try_from(req).ok().and_then(|r| offsets.get(r)) else { return false };
        if row < 0 || kv_pos < 0 || kv_pos >= kv_len {
            return false;
        }
        let k = off + i64::from(row) * i64::from(kv_len) + i64::from(kv_pos);
        usize::try_from(k).ok().and_then(|k| data.get(k / 8).map(|b| (b >> (k % 8)) & 1 == 1)).unwrap_or(false)
    }

    /// Checks every `bits` matrix against the batch: request `b` of `(q_len, kv_len)` needs
    /// bits `[offset, offset + q_len · kv_len)` inside the data. Kernels read them unchecked.
    pub fn check_bits(&self, decls: &[ParamDecl], lens: impl Fn(usize) -> (usize, usize)) -> Result<(), String> {
        for (d, (v, _)) in decls.iter().zip(&self.values) {
            let ParamValue::Bits { data, offsets } = v else { continue };
            for (req, &off) in offsets.iter().enumerate() {
                let (q, kv) = lens(req);
                let end = off.checked_add((q * kv) as i64);
                if off < 0 || end.is_none_or(|e| e > data.len() as i64 * 8) {
                    return Err(format!(
                        "bits parameter `{}`: request {req} needs bits [{off}, {off} + {q} × {kv}) but {} bits were given",
                        d.name,
                        data.len() * 8
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Binds user-given values to a variant's declarations. Unknown names, missing values without a
/// default, non-integers for `i32`, wrong array lengths and out-of-range values are errors.
pub fn bind(
    variant: &str,
    decls: &[ParamDecl],
    given: &HashMap<String, ParamInput>,
    dims: Dims,
) -> Result<ParamValues, String> {
    for name in given.keys() {
        if !decls.iter().any(|d| &d.name == name) {
            let declared: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
            return Err(format!(
                "unknown parameter `{name}`: variant `{variant}` declares {}",
                if declared.is_empty() { "no parameters".into() } else { declared.join(", ") }
            ));
        }
    }
    let mut values = Vec::with_capacity(decls.len());
    for d in decls {
        if d.ty.dim == Some(ParamDim::QueryKey) {
            match given.get(&d.name) {
                Some(ParamInput::Bits(data, offsets)) if offsets.len() == dims.batch => {
                    values.push((ParamValue::Bits { data: data.clone(), offsets: offsets.clone() }, d.ty.dim));
                    continue;
                }
                Some(ParamInput::Bits(_, offsets)) => {
                    return Err(format!("bits parameter `{}` has {} offsets, expected {} (one per request)", d.name, offsets.len(), dims.batch))
                }
                Some(_) => return Err(format!("parameter `{}` is a bit matrix; give it as packed bits with per-request offsets (ParamInput::Bits)", d.name)),
                None => return Err(format!("missing parameter `{}` (bits) of variant `{variant}`", d.name)),
            }
        }
        let input = match (given.get(&d.name), d.default) {
            (Some(v), _) => v.clone(),
            (None, Some(x)) => ParamInput::Scalar(x),
            (None, None) => {
                return Err(format!(
                    "missing parameter `{}` ({}) of variant `{variant}`; it has no default",
                    d.name, d.ty
                ))
            }
        };
        let nums = match (input, d.ty.dim) {
            (ParamInput::Scalar(x), None) => vec![x],
            (ParamInput::Scalar(x), Some(dim)) => vec![x; dims.len(dim)],
            (ParamInput::List(xs), Some(dim)) if xs.len() == dims.len(dim) => xs,
            (ParamInput::List(xs), Some(dim)) => {
                return Err(format!(
                    "parameter `{}` has {} values, expected {} (one per {})",
                    d.name,
                    xs.len(),
                    dims.len(dim),
                    dim.index().name()
                ))
            }
            (ParamInput::List(xs), None) => {
                return Err(format!(
                    "parameter `{}` is a scalar ({}), but {} values were given",
                    d.name,
                    d.ty,
                    xs.len()
                ))
            }
            (ParamInput::Bits(..), _) => return Err(format!("parameter `{}` is {}, not a bit matrix", d.name, d.ty)),
        };
        for &x in &nums {
            check_value(d, x)?;
        }
        values.push((to_value(d, &nums), d.ty.dim));
    }
    Ok(ParamValues { values })
}

fn check_value(d: &ParamDecl, x: f64) -> Result<(), String> {
    if !x.is_finite() {
        return Err(format!("parameter `{}` = {x} is not finite", d.name));
    }
    if d.ty.elem == Ty::I32 && (x.fract() != 0.0 || x < i32::MIN as f64 || x > i32::MAX as f64) {
        return Err(format!("parameter `{}` is {}, so {x} is not allowed (not an i32)", d.name, d.ty));
    }
    if d.ty.elem == Ty::F32 && x.abs() > f32::MAX as f64 {
        return Err(format!("parameter `{}` = {x} does not fit in f32", d.name));
    }
    if let Some((lo, hi)) = d.range {
        if x < lo || x > hi {
            return Err(format!(
                "parameter `{}` = {x} is outside its declared range [{lo}, {hi}]",
                d.name
            ));
        }
    }
    Ok(())
}

fn to_value(d: &ParamDecl, nums: &[f64]) -> ParamValue {
    match (d.ty.elem, d.ty.dim) {
        (_, Some(ParamDim::QueryKey)) => ParamValue::Bits { data: Vec::new(), offsets: Vec::new() },
        (Ty::I32, None) => ParamValue::I32(nums[0] as i32),
        (Ty::I32, Some(_)) => ParamValue::I32s(nums.iter().map(|&x| x as i32).collect()),
        (_, None) => ParamValue::F32(nums[0] as f32),
        (_, Some(_)) => ParamValue::F32s(nums.iter().map(|&x| x as f32).collect()),
    }
}

/// Random values within each declaration's sample bounds, for tests and demos. `uniform(lo, hi)`
/// must return a value in `[lo, hi]`. `lens` gives each request's `(q_len, kv_len)`, which sizes
/// `bits` matrices (random bits, each set with probability one half).
pub fn sample(decls: &[ParamDecl], dims: Dims, lens: &[(usize, usize)], mut uniform: impl FnMut(f64, f64) -> f64) -> ParamValues {
    let values = decls
        .iter()
        .map(|d| {
            if d.ty.dim == Some(ParamDim::QueryKey) {
                let mut offsets = Vec::with_capacity(dims.batch);
                let mut total = 0i64;
                for b in 0..dims.batch {
                    offsets.push(total);
                    let (q, kv) = lens.get(b).copied().unwrap_or((0, 0));
                    total += (q * kv) as i64;
                }
                let data = (0..(total as usize).div_ceil(8)).map(|_| uniform(0.0, 255.0).round() as u8).collect();
                return (ParamValue::Bits { data, offsets }, d.ty.dim);
            }
            // Bounds clamped to the type (a declared range may exceed it: an f32 range of ±1e300
            // would otherwise sample infinities, an i32 one values that do not bind).
            let (lo, hi) = d.sample_bounds();
            let (lo, hi) = match d.ty.elem {
                Ty::I32 => (lo.max(i32::MIN as f64), hi.min(i32::MAX as f64)),
                _ => (lo.max(-(f32::MAX as f64)), hi.min(f32::MAX as f64)),
            };
            let n = d.ty.dim.map_or(1, |dim| dims.len(dim));
            let nums: Vec<f64> = (0..n)
                .map(|_| {
                    let x = uniform(lo, hi);
                    if d.ty.elem == Ty::I32 {
                        x.round().clamp(lo.ceil(), hi.floor())
                    } else {
                        x
                    }
                })
                .collect();
            (to_value(d, &nums), d.ty.dim)
        })
        .collect();
    ParamValues { values }
}

impl ParamValues {
    /// Checks that these values were bound for `decls` and arrays match `dims`, so that a value
    /// bound for another batch or variant is an error rather than a silent wrong index.
    pub fn fits(&self, decls: &[ParamDecl], dims: Dims) -> Result<(), String> {
        if self.values.len() != decls.len() {
            return Err(format!(
                "{} parameter values given for {} declared parameters",
                self.values.len(),
                decls.len()
            ));
        }
        for (d, (v, _)) in decls.iter().zip(&self.values) {
            let n = match v {
                ParamValue::I32s(xs) => xs.len(),
                ParamValue::F32s(xs) => xs.len(),
                ParamValue::Bits { offsets, .. } => offsets.len(),
                _ => 1,
            };
            let want = d.ty.dim.map_or(1, |dim| dims.len(dim));
            if n != want {
                return Err(format!("parameter `{}` has {n} values, expected {want}", d.name));
            }
        }
        Ok(())
    }
}
