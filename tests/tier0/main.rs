//! Tier 0: everything that runs without NVRTC or a GPU.

mod cascade;
mod cli;
mod factor;
mod fuzz;
mod implied;
mod kv;
mod plan;
mod reference;
mod render;
mod spec_errors;
mod spec_lang;
