//! Rendering is pure: golden output, determinism, and a cache key that moves with exactly the
//! inputs that change the binary.

use attnforge::jit::{kernel_key, render::render, Arch, KernelConfig};
use attnforge::kv::DType;
use attnforge::spec::shipped;

/// Compares with `tests/golden/<name>.cu`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, text: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.cu"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert!(want == text, "{} differs from the rendered source; if intended, rerun with UPDATE_GOLDEN=1", path.display());
}

#[test]
fn decode_render_matches_golden() {
    let v = shipped::resolve("gemma2").unwrap();
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let src = render(&v, &cfg).unwrap();
    assert_eq!(src.name, "gemma2.decode.d128.bf16.g4");
    golden(&src.name, &src.code);
    // The hook markers point at the lines holding the emitted expressions.
    let lines: Vec<&str> = src.code.lines().collect();
    let hooks: Vec<&str> = src.hook_lines.iter().map(|(_, h)| h.as_str()).collect();
    assert_eq!(hooks, ["logits", "mask", "kv_range.lo", "kv_range.hi"]);
    let emitted = [
        attnforge::spec::cuda::emit(&v.logits.typed, &v.params),
        attnforge::spec::cuda::emit(&v.mask.as_ref().unwrap().typed, &v.params),
    ];
    for ((line, _), e) in src.hook_lines.iter().zip(&emitted) {
        assert_eq!(lines[line - 1].trim(), format!("return {e};"));
    }
}

#[test]
fn rendering_is_deterministic_and_every_shipped_variant_renders() {
    for v in shipped::all().unwrap() {
        for (d, t, g) in [(64, DType::F16, 1), (128, DType::Bf16, 4), (256, DType::Bf16, 8), (96, DType::F16, 7)] {
            let cfg = KernelConfig::decode(d, d, t, g).unwrap();
            let a = render(&v, &cfg).unwrap();
            let b = render(&v, &cfg).unwrap();
            assert_eq!(a.code, b.code, "{}", a.name);
            assert!(a.code.contains("attnforge_decode") && a.code.contains("attnforge_merge"));
        }
    }
}

#[test]
fn unsupported_configs_are_errors() {
    for (dqk, dvo, dt, g, phrase) in [
        (100, 100, DType::Bf16, 4, "multiples of 16"),
        (512, 512, DType::Bf16, 4, "up to 256"),
        (128, 128, DType::F32, 4, "f32"),
        (128, 128, DType::Bf16, 0, "group 0"),
        (256, 256, DType::Bf16, 256, "1024 threads"),
    ] {
        let err = KernelConfig::decode(dqk, dvo, dt, g).unwrap_err();
        assert!(err.to_string().contains(phrase), "{err}");
    }
}

#[test]
fn decode_tiles_are_whole_warps_within_limits() {
    for d in (16..=256).step_by(16) {
        for g in [1, 2, 3, 4, 5, 6, 7, 8, 16] {
            let Ok(cfg) = KernelConfig::decode(d, d, DType::Bf16, g) else { continue };
            let t = cfg.decode_tile();
            assert!(t.bdx.is_power_of_two());
            assert_eq!(t.threads(g) % 32, 0, "d{d} g{g}: {t:?}");
            assert!(t.threads(g) <= 1024 && t.stages >= 2);
            assert_eq!(t.mma, (2..=16).contains(&g), "d{d} g{g}: tensor cores exactly for grouped heads");
            assert!(t.mma || t.bdx * t.nv * 8 >= d, "d{d} g{g}: {t:?} does not cover the head dim");
            // sm_80 allows 163 KB of shared memory per block (sm_90: 227 KB).
            assert!(cfg.smem_bytes() <= 163 * 1024, "d{d} g{g}: {} bytes", cfg.smem_bytes());
        }
    }
}

/// Decode rings of whole 128-byte rows are XOR-swizzled (no padding: every cp.async sector lands
/// in one aligned 32-byte unit); other head dims, and prefill, keep rows padded by 16 bytes. The
/// host's shared-memory size must follow the template's row length exactly.
#[test]
fn the_decode_ring_is_swizzled_for_head_dims_of_whole_lines() {
    let v = shipped::resolve("default").unwrap();
    for (dqk, dvo, g, swizzled) in [(128, 128, 4, true), (64, 64, 1, true), (256, 256, 8, true), (192, 128, 4, true), (96, 96, 4, false), (80, 80, 1, false), (128, 96, 4, false)] {
        let cfg = KernelConfig::decode(dqk, dvo, DType::Bf16, g).unwrap();
        assert_eq!(cfg.kv_swizzle(), swizzled, "d{dqk}x{dvo} g{g}");
        let code = render(&v, &cfg).unwrap().code;
        // The traits' last argument is the ring's swizzle.
        let traits = code.lines().find(|l| l.starts_with("using Tr = Decode")).unwrap_or_default();
        assert!(traits.ends_with(&format!(", {swizzled}>;")), "d{dqk}x{dvo} g{g}: {traits}");
    }
    // bf16 d128 GQA 4: 4 warps x 64 keys x 3 stages of unpadded K and V rows.
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    assert_eq!(cfg.smem_bytes(), 3 * 64 * (128 + 128) * 2);
    let cfg = KernelConfig::decode(96, 96, DType::Bf16, 4).unwrap();
    assert_eq!(cfg.smem_bytes(), 3 * 64 * (96 + 8 + 96 + 8) * 2);
    let cfg = KernelConfig::prefill(128, 128, DType::Bf16, 4).unwrap();
    assert!(!cfg.kv_swizzle(), "prefill keeps padded rows");
    // Prefill's traits (PrefillSm80Traits) have no swizzle: its ring rows are padded.
    assert!(render(&v, &cfg).unwrap().code.lines().any(|l| l.starts_with("using Tr = PrefillSm80Traits<")));
}

#[test]
fn cache_key_moves_with_exactly_the_inputs_that_change_the_binary() {
    let arch: Arch = "sm_90a".parse().unwrap();
    let opts = vec!["-std=c++17".to_string(), "--use_fast_math".to_string()];
    let base = kernel_key("src", &opts, &arch, (13, 0));
    assert_eq!(base, kernel_key("src", &opts.clone(), &"sm_90a".parse().unwrap(), (13, 0)));
    assert_ne!(base, kernel_key("src ", &opts, &arch, (13, 0)), "source");
    assert_ne!(base, kernel_key("src", &opts[..1], &arch, (13, 0)), "options");
    assert_ne!(base, kernel_key("src", &["-std=c++17--use_fast_math".to_string()], &arch, (13, 0)), "option boundaries");
    assert_ne!(base, kernel_key("src", &opts, &"sm_90".parse().unwrap(), (13, 0)), "arch");
    assert_ne!(base, kernel_key("src", &opts, &"sm_80".parse().unwrap(), (13, 0)), "arch");
    assert_ne!(base, kernel_key("src", &opts, &arch, (13, 1)), "nvrtc version");
}

#[test]
fn arch_names_parse() {
    for (s, name) in [("sm_90a", "sm_90a"), ("sm_80", "sm_80"), ("89", "sm_89"), ("sm_100a", "sm_100a")] {
        assert_eq!(s.parse::<Arch>().unwrap().name(), name);
    }
    for bad in ["sm_75", "sm_x", "", "sm_9"] {
        assert!(bad.parse::<Arch>().is_err(), "{bad}");
    }
    assert_eq!(Arch::for_device(9, 0).name(), "sm_90a");
    assert_eq!(Arch::for_device(8, 9).name(), "sm_89");
}

/// Regression (hardening audit, item 2): the spec's file path was pasted into the source as
/// `({{ origin }})`, so a path holding a newline and `#define tanhf(x) (x)` compiled a soft-cap
/// kernel without its cap. Nothing but the typed tree reaches the source now: not the path, the
/// name or the description.
#[test]
fn a_spec_path_never_reaches_the_cuda_source() {
    let text = shipped::SHIPPED.iter().find(|(n, _)| *n == "soft_cap").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut v = v.as_object().unwrap().clone();
    v.insert("description".into(), "*/\n#define tanhf(x) (x)\n".into());
    let hostile = serde_json::Value::Object(v).to_string();
    let plain = attnforge::spec::load("soft_cap.json", text).unwrap();
    let evil = attnforge::spec::load("x\n#define tanhf(x) (x)\n//.json", &hostile).unwrap();
    for cfg in [KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap(), KernelConfig::prefill(128, 128, DType::Bf16, 4).unwrap()] {
        let (a, b) = (render(&plain, &cfg).unwrap().code, render(&evil, &cfg).unwrap().code);
        assert!(!b.contains("#define tanhf"), "the path or description reached the source");
        assert_eq!(a, b, "the source depends on the spec's path or description");
        assert!(b.contains("tanhf("), "the soft cap is emitted");
    }
}

/// Regression (hardening audit, item 2): the path was part of the source and so of the cache
/// key, and `causal.json`, `./causal.json` and its absolute path compiled three times. The key
/// depends on what changes the binary only — not on the path or the variant's name.
#[test]
fn the_cache_key_does_not_depend_on_the_spec_path_or_name() {
    let text = shipped::SHIPPED.iter().find(|(n, _)| *n == "causal").unwrap().1;
    let renamed = text.replacen("\"causal\"", "\"my_causal\"", 1);
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let arch: Arch = "sm_90a".parse().unwrap();
    let key = |file: &str, text: &str| kernel_key(&render(&attnforge::spec::load(file, text).unwrap(), &cfg).unwrap().code, &[], &arch, (13, 0));
    let base = key("causal.json", text);
    for (file, text) in [("./causal.json", text), ("/work/variants/causal.json", text), ("causal.json", renamed.as_str())] {
        assert_eq!(key(file, text), base, "{file}");
    }
    // The entry's readable name still says which variant it is.
    let v = attnforge::spec::load("x.json", &renamed).unwrap();
    assert_eq!(render(&v, &cfg).unwrap().name, "my_causal.decode.d128.bf16.g4");
}

/// Regression (hardening audit, item 2): a `Variant` built by hand (its fields are public) with
/// a name or parameter name that is not a plain identifier is refused at render, so it can reach
/// neither the params struct nor a file name.
#[test]
fn a_hand_built_variant_with_a_hostile_name_is_a_render_error() {
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let base = shipped::resolve("soft_cap").unwrap();
    let mut bad_name = base.clone();
    bad_name.name = "x\n#define tanhf(x) (x)\n".into();
    let mut bad_param = base.clone();
    bad_param.params[0].name = "cap; }; #define tanhf(x) (x) //".into();
    let mut long = base.clone();
    long.name = "v".repeat(100_000);
    for v in [bad_name, bad_param, long] {
        let e = render(&v, &cfg).unwrap_err().to_string();
        assert!(e.contains("not a plain identifier") && !e.contains('\n'), "{e}");
    }
}

/// Regression (hardening audit, item 11): a `bits` parameter `t` declared a second field
/// `u_t_off`, which a parameter named `t_off` declared again (NVRTC: already declared). Generated
/// fields have their own prefix now, so every field is distinct whatever the names.
#[test]
fn a_bits_parameter_beside_one_named_like_its_offset_field_has_distinct_fields() {
    let v = attnforge::spec::load(
        "t.json",
        r#"{ "name": "t", "params": { "t": "bits", "t_off": "i32", "o_t": "i32" }, "mask": "bit(t) && kv_pos != t_off + o_t" }"#,
    )
    .unwrap();
    let layout = attnforge::abi::param_layout(&v.params).unwrap();
    let mut fields: Vec<&str> = layout.iter().map(|f| f.field.as_str()).collect();
    fields.sort();
    let n = fields.len();
    fields.dedup();
    assert_eq!(fields.len(), n, "{fields:?}");
    let code = render(&v, &KernelConfig::decode(64, 64, DType::F16, 2).unwrap()).unwrap().code;
    for f in &fields {
        assert_eq!(code.matches(&format!(" {f};")).count(), 1, "{f} declared once");
    }
}

/// The ABI declarations cover every struct exactly: Rust's fields in offset order, padding in
/// every gap, sizes adding up to the struct's — what the compile-time layout proof rests on.
#[test]
fn every_abi_struct_is_declared_without_gaps() {
    for l in attnforge::abi::layouts() {
        let members = l.members().unwrap();
        let mut end = 0;
        for m in &members {
            assert_eq!(m.offset, end, "{}::{} follows the member before it", l.name, m.name);
            end += m.size;
        }
        assert_eq!(end, l.size, "{}: members add up to its size", l.name);
        // Today's structs need no padding: every member is a field.
        assert_eq!(members.iter().filter(|m| !m.pad).count(), l.fields.len(), "{}", l.name);
        assert!(members.iter().all(|m| !m.pad), "{}", l.name);
    }
    let code = render(&attnforge::spec::shipped::resolve("default").unwrap(), &KernelConfig::decode(64, 64, DType::F16, 2).unwrap()).unwrap().code;
    for l in attnforge::abi::layouts() {
        for f in &l.fields {
            let assert = format!("static_assert(sizeof({}) == {}, \"{}::{} has another size in src/abi.rs\");", f.ctype, f.size, l.name, f.name);
            assert!(code.contains(&assert), "missing: {assert}");
        }
        assert!(code.contains(&format!("static_assert(sizeof({}) == {},", l.instance, l.size)), "{}", l.name);
    }
}

/// Gaps and a tail in Rust's layout become explicit padding; fields are declared in offset
/// order whatever the table's order; overlapping fields or fields past the end are an error.
#[test]
fn abi_members_pad_gaps_and_reject_overlaps() {
    use attnforge::abi::{FieldLayout, StructLayout};
    let f = |name, ctype, offset, size| FieldLayout { name, ctype, offset, size };
    let s = |size, fields| StructLayout { name: "S", template: "", instance: "S", probe: "S", size, fields };
    let m = s(24, vec![f("b", "long long", 8, 8), f("a", "int", 0, 4), f("c", "int", 16, 4)]).members().unwrap();
    let got: Vec<(&str, usize, usize, bool)> = m.iter().map(|m| (m.name.as_str(), m.offset, m.size, m.pad)).collect();
    assert_eq!(got, [("a", 0, 4, false), ("_pad4", 4, 4, true), ("b", 8, 8, false), ("c", 16, 4, false), ("_pad20", 20, 4, true)]);
    let e = s(16, vec![f("a", "long long", 0, 8), f("b", "int", 4, 4)]).members().unwrap_err();
    assert!(e.contains("S::b at offset 4 overlaps"), "{e}");
    let e = s(8, vec![f("a", "long long", 4, 8)]).members().unwrap_err();
    assert!(e.contains("past its size 8"), "{e}");
}

/// A variant's `Params` with alignment gaps is declared with explicit padding, each member's
/// size asserted: `a` (4 bytes), a gap to the pointer `w` at 8, `b` at 16 and a tail to 24.
#[test]
fn params_with_alignment_gaps_are_declared_with_explicit_padding() {
    let v = attnforge::spec::load(
        "p.json",
        r#"{ "name": "p", "params": { "a": "i32", "w": "f32[qo_heads]", "b": "i32" }, "logits": "score * sm_scale + w * a + b" }"#,
    )
    .unwrap();
    let code = render(&v, &KernelConfig::decode(64, 64, DType::F16, 2).unwrap()).unwrap().code;
    let start = code.find("struct Params {").unwrap();
    let decl: Vec<&str> = code[start..].lines().take_while(|l| *l != "};").filter(|l| !l.contains("static_assert")).map(str::trim).collect();
    assert_eq!(
        decl,
        [
            "struct Params {",
            "int u_a;  // offset 0",
            "unsigned char _pad4[4];  // offset 4: padding",
            "const float* u_w;  // offset 8",
            "int u_b;  // offset 16",
            "unsigned char _pad20[4];  // offset 20: padding",
        ]
    );
    assert!(code.contains("static_assert(sizeof(const float*) == 8, \"Params::u_w has another size in src/spec/params.rs\");"));
    assert!(code.contains("static_assert(sizeof(Params) == 24,"));
}

/// The public state merge renders one deterministic unit per output dtype: the kernel entry, the
/// ABI struct it takes (with its size asserted) and the dtype, nothing of any variant.
#[test]
fn the_state_merge_renders_per_output_dtype() {
    use attnforge::jit::render::merge_states_source;
    let mut codes = Vec::new();
    for (dt, ty) in [(DType::F16, "__half"), (DType::Bf16, "__nv_bfloat16"), (DType::F32, "float")] {
        let src = merge_states_source(dt).unwrap();
        assert_eq!(src.code, merge_states_source(dt).unwrap().code, "deterministic");
        assert!(src.code.contains("extern \"C\" __global__ void __launch_bounds__(128) attnforge_merge_states(const StateMergeArgs a)"));
        assert!(src.code.contains(&format!("typedef {ty} DType;")), "{ty}");
        let size = std::mem::size_of::<attnforge::abi::StateMergeArgs>();
        assert!(src.code.contains(&format!("static_assert(sizeof(StateMergeArgs) == {size},")));
        assert!(!src.code.contains("{{") && !src.code.contains("{%"), "no template syntax left");
        codes.push(src.code);
    }
    assert!(codes[0] != codes[1] && codes[1] != codes[2]);
}

/// The Hopper prefill tile: which configs have it, its shape and shared memory (within the
/// H100/H200's 227 KB per block beside its static tables), its parsing and name, the portable
/// tile's rendering unchanged by it, and configs that do not fit it refused.
#[test]
fn the_sm90_prefill_tile_fits_its_configs_and_refuses_the_rest() {
    for (dqk, dvo) in [(64, 64), (128, 128), (256, 256), (192, 128), (128, 64)] {
        for g in [1, 4, 7, 8] {
            let cfg = KernelConfig::prefill(dqk, dvo, DType::Bf16, g).unwrap();
            let s = cfg.sm90_prefill().unwrap_or_else(|| panic!("d{dqk}x{dvo} g{g} has the sm90 tile"));
            let t = s.prefill_tile();
            assert!(t.sm90 && t.rows() == 128 && t.warps == 12, "{t:?}");
            // The engine's default on sm_90a: the Hopper loop only where it was measured ahead.
            assert!(cfg.prefers_sm90_prefill(), "d{dqk}x{dvo}: the sm90 loop is the default at every head dim");
            assert_eq!(t.kv_tile, if dqk.max(dvo) <= 128 { 128 } else { 64 });
            s.validate().unwrap();
            // 227 KB per block, less the static tables (at most 4.2 KB at GQA 1).
            assert!(s.smem_bytes() + 4400 <= 227 * 1024, "d{dqk}x{dvo} g{g}: {} bytes", s.smem_bytes());
            assert!(s.config_name().ends_with(".sm90k128s2") || s.config_name().ends_with(".sm90k64s2"), "{}", s.config_name());
            let text = render(&shipped::resolve("soft_cap").unwrap(), &s).unwrap().code;
            assert!(text.contains("using MainLoop = PrefillSm90<Tr>;") && text.contains("PrefillSm90Traits<Shape, "), "the sm90 tile renders the sm90 loop");
            let portable = render(&shipped::resolve("soft_cap").unwrap(), &cfg).unwrap().code;
            assert!(portable.contains("using MainLoop = PrefillSm80<Tr>;") && !portable.contains("wgmma.mma_async"));
        }
    }
    // Head dims that are not whole 64-column panels, explicit tiles and decode have none.
    assert!(KernelConfig::prefill(96, 96, DType::F16, 4).unwrap().sm90_prefill().is_none());
    assert!(KernelConfig::prefill(128, 80, DType::F16, 4).unwrap().sm90_prefill().is_none());
    assert!(KernelConfig::decode(128, 128, DType::F16, 4).unwrap().sm90_prefill().is_none());
    let mut forced = KernelConfig::prefill(128, 128, DType::F16, 4).unwrap();
    forced.prefill_override = Some(forced.prefill_tile());
    assert!(forced.sm90_prefill().is_none() && !forced.prefill_tile().sm90);
    // A tile that only picks a main loop keeps the append companion; a tuning tile does not.
    let plain = KernelConfig::prefill(128, 128, DType::Bf16, 4).unwrap();
    let portable = KernelConfig { prefill_override: Some(plain.prefill_tile()), ..plain.clone() };
    let hopper = plain.sm90_prefill().unwrap();
    for c in [&plain, &portable, &hopper] {
        assert_eq!(c.append_prefill().map(|a| a.prefill_tile().rows()), Some(32), "{c:?}");
    }
    let tuning = KernelConfig { prefill_override: Some("4,1,32,2,1".parse().unwrap()), ..plain.clone() };
    assert!(tuning.append_prefill().is_none());
    // Parsing, and tiles that do not fit.
    let t: attnforge::jit::PrefillTile = "sm90,64,3".parse().unwrap();
    assert!(t.sm90 && t.kv_tile == 64 && t.stages == 3 && t.rows() == 128);
    assert!("sm90,64".parse::<attnforge::jit::PrefillTile>().unwrap_err().contains("sm90,KV_TILE,STAGES"));
    for (tile, d, phrase) in [("sm90,96,2", 128, "kv_tile 64 or 128"), ("sm90,128,1", 128, "stages 2–4"), ("sm90,128,2", 96, "multiples of 64"), ("sm90,128,2", 256, "bytes of shared memory"), ("sm90,128,3", 128, "bytes of shared memory")] {
        let mut c = KernelConfig::prefill(d, d, DType::Bf16, 4).unwrap();
        c.prefill_override = Some(tile.parse().unwrap());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(phrase), "{tile} d{d}: {err}");
    }
    assert!("sm_90a".parse::<Arch>().unwrap().has_wgmma());
    assert!(!"sm_90".parse::<Arch>().unwrap().has_wgmma() && !"sm_80".parse::<Arch>().unwrap().has_wgmma() && !"sm_100a".parse::<Arch>().unwrap().has_wgmma());
}
