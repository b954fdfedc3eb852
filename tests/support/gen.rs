//! Random well-typed hook text, shared by tier 0's spec fuzzer and tier 1's compile test.

use rand::rngs::StdRng;
use rand::Rng;

/// Random expression text of the given type over the given identifiers.
pub fn gen(rng: &mut StdRng, ty: char, depth: u32, ints: &[&str], floats: &[&str]) -> String {
    let leaf = depth == 0 || rng.random_bool(0.3);
    match ty {
        'f' if leaf => match rng.random_range(0..3) {
            0 if !floats.is_empty() => floats[rng.random_range(0..floats.len())].to_string(),
            1 => format!("{:?}", rng.random_range(-100.0f32..100.0)),
            _ => format!("float({})", gen(rng, 'i', 0, ints, floats)),
        },
        'f' => {
            let a = gen(rng, 'f', depth - 1, ints, floats);
            let b = gen(rng, 'f', depth - 1, ints, floats);
            match rng.random_range(0..8) {
                0 => format!("({a} + {b})"),
                1 => format!("({a} * {b})"),
                2 => format!("({a} / {b})"),
                3 => format!("tanh({a})"),
                4 => format!("exp(min({a}, 10.0))"),
                5 => format!("select({}, {a}, {b})", gen(rng, 'b', depth - 1, ints, floats)),
                6 => format!("sigmoid({a} - {b})"),
                _ => format!("max(sqrt(abs({a})), log2(abs({b}) + 1.0))"),
            }
        }
        'i' if leaf => match rng.random_range(0..2) {
            0 => ints[rng.random_range(0..ints.len())].to_string(),
            _ => rng.random_range(-50..50).to_string(),
        },
        'i' => {
            let a = gen(rng, 'i', depth - 1, ints, floats);
            let b = gen(rng, 'i', depth - 1, ints, floats);
            match rng.random_range(0..7) {
                0 => format!("({a} + {b})"),
                1 => format!("({a} - {b})"),
                2 => format!("({a} * {b})"),
                3 => format!("({a} / {b})"),
                4 => format!("({a} % {b})"),
                5 => format!("min(abs({a}), {b})"),
                _ => format!("int({})", gen(rng, 'f', depth - 1, ints, floats)),
            }
        }
        _ => {
            let a = gen(rng, 'i', depth.saturating_sub(1), ints, floats);
            let b = gen(rng, 'i', depth.saturating_sub(1), ints, floats);
            match rng.random_range(0..4) {
                0 => format!("({a} <= {b})"),
                1 => format!("(({a} != {b}) || !({a} > 3))"),
                2 => format!("({a} == {b} && true)"),
                _ => format!("({} < {})", gen(rng, 'f', depth.saturating_sub(1), ints, floats), gen(rng, 'f', 0, ints, floats)),
            }
        }
    }
}

