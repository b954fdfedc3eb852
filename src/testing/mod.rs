//! Support for the CLI, the tests and the benchmarks — not the pipeline: random workloads, the
//! GPU-vs-reference runner and its tolerance, the decode and prefill benchmarks, the `.npy`
//! writer. Behind the `testing` feature (on by default, through `cli`), so a library user who
//! turns default features off sees only the pipeline.

pub mod bench;
pub mod harness;
pub mod hopper;
pub mod npy;
pub mod workload;
