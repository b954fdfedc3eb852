//! The public merge of attention states (`Engine::merge_state`, `merge_state_into`,
//! `merge_states`) against the reference's `merge_state`, folded in f64.

use attnforge::engine::{StateShape, States, StatesMut};
use attnforge::kv::Element;
use attnforge::spec::Normalize;
use attnforge::reference::{merge_state, State};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{engine, env_or};

/// Random states `[tokens, n, heads, dim]`: LSEs in [-30, 30], about a fifth of them `-inf` with
/// a NaN output (which must not be read), some rows all `-inf`, and (when `nan`) one NaN LSE.
fn states(rng: &mut StdRng, tokens: usize, n: usize, heads: usize, dim: usize, nan: bool) -> (Vec<f32>, Vec<f32>) {
    let mut o: Vec<f32> = (0..tokens * n * heads * dim).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mut lse: Vec<f32> = (0..tokens * n * heads).map(|_| if rng.random_bool(0.2) { f32::NEG_INFINITY } else { rng.random_range(-30.0..30.0) }).collect();
    for t in 0..tokens {
        let all_masked = rng.random_bool(0.05);
        for s in 0..n {
            for h in 0..heads {
                let i = (t * n + s) * heads + h;
                if all_masked {
                    lse[i] = f32::NEG_INFINITY;
                }
                if lse[i] == f32::NEG_INFINITY {
                    o[i * dim..(i + 1) * dim].fill(f32::NAN);
                }
            }
        }
    }
    if nan && !lse.is_empty() {
        let i = rng.random_range(0..lse.len());
        lse[i] = f32::NAN;
    }
    (o, lse)
}

/// The f64 merge of row `(t, h)`'s states (already rounded to `T`), starting from no key.
fn expect<T: Element>(o: &[T], lse: &[f32], t: usize, n: usize, heads: usize, dim: usize, h: usize) -> State {
    (0..n).fold(State::empty(dim), |acc, s| {
        let i = (t * n + s) * heads + h;
        let st = State { o: o[i * dim..(i + 1) * dim].iter().map(|x| x.to_f64()).collect(), lse: f64::from(lse[i]) };
        merge_state(Normalize::Softmax, &acc, &st)
    })
}

/// `got` against `want` for every row: outputs within one rounding of `T` of a convex combination
/// (plus the fast exponent's error), LSEs within 1e-4 (absolute) + 1e-5 (relative); NaN for NaN,
/// `-inf` for `-inf`.
fn check<T: Element>(what: &str, got_o: &[T], got_lse: &[f32], want: impl Fn(usize, usize) -> State, tokens: usize, heads: usize, dim: usize) {
    let eps = match T::DTYPE {
        attnforge::kv::DType::F16 => 2e-3,
        attnforge::kv::DType::Bf16 => 1.6e-2,
        attnforge::kv::DType::F32 => 2e-5,
    };
    for t in 0..tokens {
        for h in 0..heads {
            let w = want(t, h);
            let r = t * heads + h;
            let gl = f64::from(got_lse[r]);
            if w.lse.is_nan() {
                assert!(gl.is_nan(), "{what}: row ({t}, {h}) lse {gl}, want NaN");
                assert!(got_o[r * dim..(r + 1) * dim].iter().all(|x| x.to_f64().is_nan()), "{what}: row ({t}, {h}) o not NaN");
                continue;
            }
            if w.lse == f64::NEG_INFINITY {
                assert_eq!(gl, f64::NEG_INFINITY, "{what}: row ({t}, {h}) fully masked");
            } else {
                assert!((gl - w.lse).abs() <= 1e-4 + 1e-5 * w.lse.abs(), "{what}: row ({t}, {h}) lse {gl}, want {}", w.lse);
            }
            for d in 0..dim {
                let (g, x) = (got_o[r * dim + d].to_f64(), w.o[d]);
                assert!((g - x).abs() <= eps * (1.0 + x.abs()), "{what}: row ({t}, {h}) dim {d}: {g}, want {x}");
            }
        }
    }
}

fn up<T: DeviceRepr>(e: &attnforge::engine::Engine, x: &[T]) -> CudaSlice<T> {
    e.upload(x).unwrap()
}

fn poisoned<T: DeviceRepr + ValidAsZeroBits + Element>(e: &attnforge::engine::Engine, n: usize) -> CudaSlice<T> {
    up(e, &vec![T::from_f32(f32::NAN); n])
}

fn one_case<T: Element + DeviceRepr + ValidAsZeroBits + Default + Clone>(e: &attnforge::engine::Engine, rng: &mut StdRng, i: usize) {
    let tokens = [0, 1, 7, 64, 300][rng.random_range(0..5)];
    let heads = rng.random_range(1..=8);
    let dim = [1, 32, 64, 100, 128, 256, 512][rng.random_range(0..7)];
    let n = [0, 1, 2, 3, 8, 31, 33, 70][rng.random_range(0..8)];
    let shape = StateShape { tokens, heads, head_dim: dim };
    let what = format!("case {i} ({}): tokens {tokens}, heads {heads}, dim {dim}, n {n}", T::DTYPE.name());
    let (o, lse) = states(rng, tokens, n, heads, dim, i % 3 == 0);
    let o: Vec<T> = o.iter().map(|&x| T::from_f32(x)).collect();

    // merge_states over all n.
    let (d_o, d_l) = (up(e, &o), up(e, &lse));
    let (mut out_o, mut out_l) = (poisoned::<T>(e, tokens * heads * dim), up(e, &vec![f32::NAN; tokens * heads]));
    e.merge_states(States { o: &d_o, lse: &d_l }, n, StatesMut { o: &mut out_o, lse: &mut out_l }, shape).unwrap();
    let (go, gl) = (e.download(&out_o).unwrap(), e.download(&out_l).unwrap());
    if tokens * heads > 0 {
        check(&format!("{what} merge_states"), &go, &gl, |t, h| expect(&o, &lse, t, n, heads, dim, h), tokens, heads, dim);
    }

    // merge_state of the first two states (as separate buffers), then in place with a mask.
    if n < 2 {
        return;
    }
    let split = |s: usize| -> (Vec<T>, Vec<f32>) {
        let mut so = Vec::with_capacity(tokens * heads * dim);
        let mut sl = Vec::with_capacity(tokens * heads);
        for t in 0..tokens {
            let i = (t * n + s) * heads;
            so.extend_from_slice(&o[i * dim..(i + heads) * dim]);
            sl.extend_from_slice(&lse[i..i + heads]);
        }
        (so, sl)
    };
    let ((ao, al), (bo, bl)) = (split(0), split(1));
    let pair = |t: usize, h: usize| {
        let st = |o: &[T], l: &[f32]| State { o: o[(t * heads + h) * dim..(t * heads + h + 1) * dim].iter().map(|x| x.to_f64()).collect(), lse: f64::from(l[t * heads + h]) };
        let a = merge_state(Normalize::Softmax, &State::empty(dim), &st(&ao, &al));
        merge_state(Normalize::Softmax, &a, &st(&bo, &bl))
    };
    let (da_o, da_l, db_o, db_l) = (up(e, &ao), up(e, &al), up(e, &bo), up(e, &bl));
    let (mut out_o, mut out_l) = (poisoned::<T>(e, tokens * heads * dim), up(e, &vec![f32::NAN; tokens * heads]));
    e.merge_state(States { o: &da_o, lse: &da_l }, States { o: &db_o, lse: &db_l }, StatesMut { o: &mut out_o, lse: &mut out_l }, shape).unwrap();
    let (go, gl) = (e.download(&out_o).unwrap(), e.download(&out_l).unwrap());
    check(&format!("{what} merge_state"), &go, &gl, pair, tokens, heads, dim);

    let mask: Vec<u8> = (0..tokens).map(|_| rng.random_bool(0.7) as u8).collect();
    let (mut va, mut la) = (up(e, &ao), up(e, &al));
    let dm = up(e, &mask);
    e.merge_state_into(StatesMut { o: &mut va, lse: &mut la }, States { o: &db_o, lse: &db_l }, Some(&dm), shape).unwrap();
    let (go, gl) = (e.download(&va).unwrap(), e.download(&la).unwrap());
    for t in (0..tokens).filter(|&t| mask[t] == 0) {
        // Untouched, bit for bit (NaN outputs of masked-out states included).
        let r = t * heads * dim..(t + 1) * heads * dim;
        assert!(go[r.clone()].iter().zip(&ao[r]).all(|(g, a)| g.to_f64().to_bits() == a.to_f64().to_bits()), "{what}: token {t} masked out but changed");
        assert!(gl[t * heads..(t + 1) * heads].iter().zip(&al[t * heads..(t + 1) * heads]).all(|(g, a)| g.to_bits() == a.to_bits()));
    }
    let kept: Vec<usize> = (0..tokens).filter(|&t| mask[t] != 0).collect();
    for &t in &kept {
        check(&format!("{what} merge_state_into, token {t}"), &go[t * heads * dim..(t + 1) * heads * dim], &gl[t * heads..(t + 1) * heads], |_, h| pair(t, h), 1, heads, dim);
    }
}

/// Every entry point on random states of every output dtype, head dims 1–512, 0–70 states
/// (one and more shuffle rounds), masked states whose outputs are NaN, fully masked rows and NaN
/// LSEs; then the errors for sizes the kernel cannot take.
pub fn the_state_merge_matches_the_reference() {
    let e = engine();
    let mut rng = StdRng::seed_from_u64(env_or("ATTNFORGE_SEED", 0x3e46e));
    let cases: usize = env_or("ATTNFORGE_GPU_CASES", 24);
    for i in 0..cases {
        match i % 3 {
            0 => one_case::<f16>(&e, &mut rng, i),
            1 => one_case::<bf16>(&e, &mut rng, i),
            _ => one_case::<f32>(&e, &mut rng, i),
        }
    }
    let (o, l) = (up(&e, &vec![f16::ZERO; 4 * 2 * 64]), up(&e, &[0f32; 4 * 2]));
    let (mut oo, mut ol) = (up(&e, &vec![f16::ZERO; 2 * 64]), up(&e, &[0f32; 2]));
    let shape = StateShape { tokens: 2, heads: 1, head_dim: 64 };
    // Too short an output, too large a head dim, a states count whose buffers are too short.
    let err = e.merge_states(States { o: &o, lse: &l }, 2, StatesMut { o: &mut oo, lse: &mut ol }, StateShape { tokens: 2, heads: 2, head_dim: 64 }).unwrap_err();
    assert!(err.to_string().contains("merge_states: out.o"), "{err}");
    let err = e.merge_states(States { o: &o, lse: &l }, 1, StatesMut { o: &mut oo, lse: &mut ol }, StateShape { head_dim: 513, ..shape }).unwrap_err();
    assert!(matches!(err, attnforge::Error::UnsupportedConfig(_)), "{err}");
    let err = e.merge_states(States { o: &o, lse: &l }, 5, StatesMut { o: &mut oo, lse: &mut ol }, shape).unwrap_err();
    assert!(err.to_string().contains("merge_states: states.o"), "{err}");
    let err = e.merge_states(States { o: &o, lse: &l }, 2, StatesMut { o: &mut oo, lse: &mut ol }, StateShape { tokens: usize::MAX / 2, ..shape }).unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
}
