//! NVRTC: finding the library and the CUDA headers, compiling to CUBIN, and turning a failed
//! compile into a message that points at the rendered lines and the spec hook they came from.
//!
//! cudarc loads `libnvrtc` dynamically and panics if it is missing, so we probe first. When the
//! library is not on the loader path we look in the usual places (`CUDA_HOME`, `CUDA_PATH`,
//! `/usr/local/cuda`, the `nvidia-cuda-nvrtc` wheel in `./.cuda` or a Python site-packages) and
//! preload it by absolute path; cudarc's later `dlopen` by soname then finds the loaded copy.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use super::{Arch, KernelSource};
use crate::error::{log_line_number, CompileFailure, SourceExcerpt};
use crate::{Error, Result};

/// Where the wheels' files live under an install prefix.
const WHEEL_SUBDIR: &str = "nvidia/cu13";

/// Candidate CUDA roots, most specific first.
fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots.push(PathBuf::from(".cuda").join(WHEEL_SUBDIR));
    roots.extend(site_packages().into_iter().map(|p| p.join(WHEEL_SUBDIR)));
    roots
}

/// Python's site-packages directories, asked of `python3` once (only if nothing else matched).
fn site_packages() -> Vec<PathBuf> {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))"])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect(),
            _ => Vec::new(),
        }
    })
    .clone()
}

/// The directory holding `cuda_fp16.h`, `cuda_bf16.h` and `cuda_fp8.h`.
pub fn find_cuda_include() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ATTNFORGE_CUDA_INCLUDE").map(PathBuf::from) {
        if d.join("cuda_fp16.h").exists() {
            return Ok(d);
        }
    }
    let mut searched = Vec::new();
    for root in cuda_roots() {
        let inc = root.join("include");
        if inc.join("cuda_fp16.h").exists() && inc.join("cuda_bf16.h").exists() {
            return Ok(inc.canonicalize().unwrap_or(inc));
        }
        searched.push(inc);
    }
    Err(Error::CudaHeadersMissing { searched })
}

/// Makes libnvrtc loadable, preloading it from a known directory when it is not on the loader
/// path. Returns a description of where it came from.
fn ensure_library() -> Result<String> {
    static FOUND: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            // SAFETY: probing only dlopens and dlcloses candidate names; no symbol is called.
            if unsafe { sys::is_culib_present() } {
                return Ok("loader path".into());
            }
            let mut dirs: Vec<PathBuf> = std::env::var_os("ATTNFORGE_NVRTC_DIR").map(PathBuf::from).into_iter().collect();
            for root in cuda_roots() {
                dirs.push(root.join("lib64"));
                dirs.push(root.join("lib"));
            }
            let tried: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            for dir in dirs {
                let Some(main) = find_lib(&dir, "libnvrtc.so.") else { continue };
                // The builtins library is dlopened by libnvrtc by soname; load it first.
                if let Some(builtins) = find_lib(&dir, "libnvrtc-builtins.so.") {
                    preload(&builtins)?;
                }
                preload(&main)?;
                // SAFETY: as above.
                if unsafe { sys::is_culib_present() } {
                    return Ok(main.display().to_string());
                }
            }
            Err(format!("not on the loader path, nor in {}", tried.join(", ")))
        })
        .clone()
        .map_err(|detail| Error::NvrtcMissing { detail })
}

fn find_lib(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            n.starts_with(prefix) && !n.contains(".alt.")
        })
        .collect();
    hits.sort();
    hits.into_iter().next()
}

fn preload(path: &Path) -> std::result::Result<(), String> {
    // SAFETY: loading NVIDIA's NVRTC libraries runs their (trusted) initialisers only. The handle
    // is leaked on purpose: the library must stay loaded for the life of the process.
    let lib = unsafe {
        libloading::os::unix::Library::open(Some(path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL)
    }
    .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    std::mem::forget(lib);
    Ok(())
}

/// A usable NVRTC: the library, its version and the CUDA headers.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    version: (i32, i32),
    include: PathBuf,
    library: String,
}

impl Nvrtc {
    /// Finds and loads NVRTC and the CUDA headers (see the module docs for where it looks).
    pub fn load() -> Result<Nvrtc> {
        let library = ensure_library()?;
        let include = find_cuda_include()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is loaded (checked above); the out-pointers are valid locals.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| Error::Nvrtc { call: "nvrtcVersion", detail: format!("{e:?}") })?;
        Ok(Nvrtc { version: (major, minor), include, library })
    }

    /// NVRTC's `(major, minor)` version (part of the cache key).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The directory of the CUDA headers kernels include.
    pub fn include_dir(&self) -> &Path {
        &self.include
    }

    /// Where the library was loaded from ("loader path" or a file).
    pub fn library(&self) -> &str {
        &self.library
    }

    /// The compile options for `arch` (part of the cache key), followed by any in
    /// `ATTNFORGE_NVRTC_FLAGS` (whitespace-separated; for tuning, e.g. `-DAF_MAX_SLACK=0.f`).
    pub fn options(&self, arch: &Arch) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={}", arch.name()),
            "-std=c++17".into(),
            "--use_fast_math".into(),
            format!("-I{}", self.include.display()),
        ];
        if let Ok(extra) = std::env::var("ATTNFORGE_NVRTC_FLAGS") {
            o.extend(extra.split_whitespace().map(String::from));
        }
        o
    }

    /// Compiles to CUBIN. On failure, saves the source next to the cache (or in the temp dir)
    /// and reports the log with the failing rendered lines and their spec hook.
    pub fn compile(&self, src: &KernelSource, options: &[String], save_dir: Option<&Path>) -> Result<Vec<u8>> {
        let code = CString::new(src.code.as_str()).map_err(|_| Error::Render("rendered source contains a NUL byte".into()))?;
        let file = CString::new(format!("{}.cu", src.name)).map_err(|_| Error::Render("kernel name contains a NUL byte".into()))?;
        let prog = result::create_program(&code, Some(&file)).map_err(|e| Error::Nvrtc { call: "nvrtcCreateProgram", detail: format!("{e:?}") })?;
        // SAFETY: `prog` was created above and is destroyed exactly once, below, on every path.
        let compiled = unsafe { result::compile_program(prog, options) };
        // SAFETY: `prog` is live until destroy_program.
        let log = unsafe { result::get_program_log(prog) }.map(|l| cstr_log(&l)).unwrap_or_default();
        let out = match compiled {
            Ok(()) => {
                // Tuning: `ATTNFORGE_NVRTC_LOG=1` prints a successful compile's log too (with
                // `ATTNFORGE_NVRTC_FLAGS=--ptxas-options=-v`, registers, spills and shared memory).
                if !log.trim().is_empty() && std::env::var_os("ATTNFORGE_NVRTC_LOG").is_some() {
                    eprintln!("nvrtc log for {}:\n{log}", src.name);
                }
                cubin(prog)
            }
            Err(e) => Err(self.failure(src, &log, &format!("{e:?}"), save_dir)),
        };
        // SAFETY: destroys the program created above; nothing uses it afterwards.
        let _ = unsafe { result::destroy_program(prog) };
        out
    }

    /// Compiles to PTX for `arch`'s virtual architecture (`sm_90a` → `compute_90a`), to check
    /// which instructions a source emits (tests; the pipeline loads CUBIN only).
    pub fn compile_ptx(&self, src: &KernelSource, arch: &Arch) -> Result<String> {
        let mut options = self.options(arch);
        let virt = format!("--gpu-architecture={}", arch.name().replacen("sm_", "compute_", 1));
        options.iter_mut().filter(|o| o.starts_with("--gpu-architecture=")).for_each(|o| *o = virt.clone());
        let code = CString::new(src.code.as_str()).map_err(|_| Error::Render("rendered source contains a NUL byte".into()))?;
        let file = CString::new(format!("{}.cu", src.name)).map_err(|_| Error::Render("kernel name contains a NUL byte".into()))?;
        let prog = result::create_program(&code, Some(&file)).map_err(|e| Error::Nvrtc { call: "nvrtcCreateProgram", detail: format!("{e:?}") })?;
        // SAFETY: `prog` was created above and is destroyed exactly once, below, on every path.
        let compiled = unsafe { result::compile_program(prog, &options) };
        // SAFETY: `prog` is live until destroy_program.
        let log = unsafe { result::get_program_log(prog) }.map(|l| cstr_log(&l)).unwrap_or_default();
        let out = match compiled {
            // SAFETY: `prog` compiled successfully and is live.
            Ok(()) => unsafe { result::get_ptx(prog) }.map(|p| cstr_log(&p)).map_err(|e| Error::Nvrtc { call: "nvrtcGetPTX", detail: format!("{e:?}") }),
            Err(e) => Err(self.failure(src, &log, &format!("{e:?}"), None)),
        };
        // SAFETY: destroys the program created above; nothing uses it afterwards.
        let _ = unsafe { result::destroy_program(prog) };
        out
    }

    fn failure(&self, src: &KernelSource, log: &str, code: &str, save_dir: Option<&Path>) -> Error {
        let saved = save_source(src, save_dir).map_err(|e| e.to_string());
        let lines: Vec<&str> = src.code.lines().collect();
        let mut excerpts: Vec<SourceExcerpt> = Vec::new();
        // One excerpt per line the log names, in log order, each line once.
        for line in log.lines().filter_map(log_line_number) {
            if line == 0 || line > lines.len() || excerpts.iter().any(|x| x.line == line) {
                continue;
            }
            let hook = src.hook_lines.iter().find(|(hl, _)| *hl == line).map(|(_, h)| h.clone());
            let shown = (line.saturating_sub(2).max(1)..=(line + 1).min(lines.len())).map(|n| (n, lines[n - 1].to_string())).collect();
            excerpts.push(SourceExcerpt { line, hook, lines: shown });
        }
        Error::CompileFailed(Box::new(CompileFailure { kernel: src.name.clone(), code: code.to_string(), log: log.to_string(), excerpts, saved }))
    }
}

fn save_source(src: &KernelSource, dir: Option<&Path>) -> std::io::Result<PathBuf> {
    let dir = dir.map(|d| d.join("failed")).unwrap_or_else(|| std::env::temp_dir().join("attnforge-failed"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.cu", src.name));
    std::fs::write(&path, &src.code)?;
    Ok(path)
}

fn cstr_log(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| Error::Nvrtc { call: "nvrtcGetCUBINSize", detail: format!("{e:?}") })?;
    if size == 0 {
        return Err(Error::Nvrtc { call: "nvrtcGetCUBIN", detail: "an empty CUBIN (was a virtual compute_XY arch targeted?)".into() });
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| Error::Nvrtc { call: "nvrtcGetCUBIN", detail: format!("{e:?}") })?;
    Ok(buf)
}
