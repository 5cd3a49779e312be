//! `orchestrate stages`: the stage kinds this binary knows.

use super::{Env, Failure};

pub(super) fn stages(env: &Env) -> Result<i32, Failure> {
    for s in env.registry.iter() {
        println!("{:<12} v{}  {}", s.kind(), s.version(), s.describe());
    }
    Ok(0)
}
