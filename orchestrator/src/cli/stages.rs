//! `orchestrate stages`: the stage kinds this binary knows, with a short form of each one's
//! implementation fingerprint (it changes whenever the code the kind runs changes).

use super::{Env, Failure};

pub(super) fn stages(env: &Env) -> Result<i32, Failure> {
    for s in env.registry.iter() {
        let parts = env.registry.implementation(s.kind());
        let text: Vec<String> = parts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let short = blake3::hash(text.join("\n").as_bytes()).to_hex();
        println!("{:<12} {}  {}", s.kind(), &short[..12], s.describe());
    }
    Ok(0)
}
