//! orchestrate: YAML pipelines → a DAG → a tokio scheduler → a content-addressed store.
//!
//! Modules, bottom up (each uses only modules above it in this list; `docs/architecture.md`
//! has the map): `yaml` (positioned tree) → `diag` (errors with snippets) → `interp`
//! (`${...}`) → `overrides` (`--set`) → `registry` (the stage kinds) → `pipeline` (validated,
//! resolved stages) → `dag` (petgraph) → `objects` (blake3 blobs and trees) → `cache_key` →
//! `store` (sled index, manifests, lock) → `remote` (the shared cache) → `history` (runs, compare) → `exec` (one child process) → `runner` (one stage:
//! inputs in, outputs stored) → `events` → `live` (the run in progress, as a file) → `run_description` → `sched` (the run loop) →
//! `progress` → `deliver` (final outputs copied out) → `plan`, `replay` → `ui` (the web view) → `cli` (one module
//! per verb).

pub mod cache_key;
pub mod cli;
pub mod dag;
pub mod deliver;
pub mod diag;
pub mod events;
pub mod exec;
pub mod executor;
pub mod history;
pub mod interp;
pub mod live;
pub mod objects;
pub mod overrides;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod remote;
pub mod replay;
pub mod run_description;
pub mod runner;
pub mod sched;
pub mod source;
pub mod store;
pub mod ui;
pub mod yaml;
