//! orchestrate: YAML pipelines → a DAG → a tokio scheduler → a content-addressed store.
//!
//! Layers, bottom up: `yaml` (positioned tree) → `pipeline` (validated, resolved stages) →
//! `dag` (petgraph) → `objects`/`store` (blake3 objects + sled index) → `exec`/`runner` (one
//! stage in a child process) → `sched` (the run loop) → `plan`/`replay` → `cli`.

pub mod cli;
pub mod dag;
pub mod diag;
pub mod exec;
pub mod interp;
pub mod objects;
pub mod overrides;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod replay;
pub mod report;
pub mod runmeta;
pub mod runner;
pub mod sched;
pub mod store;
pub mod yaml;
