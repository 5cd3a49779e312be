//! Where a remote is: `--remote R` resolved against the project's `orchestrate.toml`.
//!
//! R is a remote's name from `orchestrate.toml` (found beside the pipeline or in a folder above
//! it), an `s3://bucket/prefix` URL, or a directory path. The file holds locations and
//! endpoints only — it is meant to be committed — so a credential in it is an error; S3
//! credentials come from the standard AWS variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const CONFIG_FILE: &str = "orchestrate.toml";

/// `orchestrate.toml`: `[remote.NAME]` tables, and which one `push` and `pull` use when no
/// `--remote` is given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub default_remote: Option<String>,
    #[serde(default)]
    pub remote: BTreeMap<String, RemoteConfig>,
}

/// One `[remote.NAME]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `s3://bucket/prefix` or a directory (relative to the config file's folder).
    pub url: String,
    /// S3 endpoint for S3-compatible servers (else `AWS_ENDPOINT_URL`, else AWS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Permit plain http (else `AWS_ALLOW_HTTP`).
    pub allow_http: Option<bool>,
}

/// A resolved remote location.
#[derive(Clone, Debug, PartialEq)]
pub enum Location {
    S3 { bucket: String, prefix: String, endpoint: Option<String>, region: Option<String>, allow_http: Option<bool> },
    Dir(PathBuf),
}

impl Location {
    /// How the location is shown to the user (never with credentials: there are none in it).
    pub fn shown(&self) -> String {
        match self {
            Location::S3 { bucket, prefix, .. } if prefix.is_empty() => format!("s3://{bucket}"),
            Location::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
            Location::Dir(p) => p.display().to_string(),
        }
    }
}

/// Words that mark a credential; such keys never belong in a committed file.
const SECRET_WORDS: [&str; 5] = ["secret", "access_key", "token", "password", "credential"];

/// Read `path` as a project config. Errors name the file and, for TOML errors, line and column.
pub fn read_config(path: &Path) -> Result<ProjectConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for (name, remote) in table.get("remote").and_then(|r| r.as_table()).into_iter().flatten() {
        for key in remote.as_table().into_iter().flat_map(|t| t.keys()) {
            if SECRET_WORDS.iter().any(|w| key.to_ascii_lowercase().contains(w)) {
                return Err(format!(
                    "{}: [remote.{name}] has `{key}`: credentials do not belong in {CONFIG_FILE}, which is meant to \
                     be committed; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment instead",
                    path.display()
                ));
            }
        }
    }
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The nearest `orchestrate.toml` in `start` or a folder above it.
pub fn find_config(start: &Path) -> Option<PathBuf> {
    let start = std::path::absolute(start).ok()?;
    start.ancestors().map(|d| d.join(CONFIG_FILE)).find(|p| p.is_file())
}

fn parse_s3(url: &str, rest: &str) -> Result<(String, String), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("remote `{url}` has no bucket; write s3://BUCKET/PREFIX"));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// A location written directly (`s3://…`, `file://…`, or a path), relative paths against `base`.
/// On the command line a bare word is a remote's name, not a path; in the config file (`cfg`
/// given) every `url` that is not a URL is a path.
fn direct(spec: &str, base: &Path, cfg: Option<&RemoteConfig>) -> Result<Option<Location>, String> {
    if let Some(rest) = spec.strip_prefix("s3://") {
        let (bucket, prefix) = parse_s3(spec, rest)?;
        let cfg = cfg.cloned().unwrap_or_default();
        let (endpoint, region, allow_http) = (cfg.endpoint, cfg.region, cfg.allow_http);
        return Ok(Some(Location::S3 { bucket, prefix, endpoint, region, allow_http }));
    }
    // `components` drops the `.` of `./cache`, so the folder is shown as it is.
    let dir = |p: &str| Location::Dir(base.join(p).components().collect());
    if let Some(path) = spec.strip_prefix("file://") {
        return Ok(Some(dir(path)));
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        return Err(format!("remote `{spec}`: `{scheme}://` is not supported; use s3://BUCKET/PREFIX or a directory"));
    }
    let looks_like_path = cfg.is_some() || spec.contains('/') || spec.starts_with('.');
    Ok(looks_like_path.then(|| dir(spec)))
}

/// The `default_remote` of the nearest `orchestrate.toml`, if it names one.
pub fn default_spec(near: &Path) -> Result<Option<String>, String> {
    match find_config(near) {
        Some(file) => Ok(read_config(&file)?.default_remote),
        None => Ok(None),
    }
}

/// Resolve `--remote SPEC`; `near` is where to look for `orchestrate.toml` (the pipeline's folder).
pub fn resolve(spec: &str, near: &Path) -> Result<Location, String> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    if let Some(loc) = direct(spec, &cwd, None)? {
        return Ok(loc);
    }
    let Some(file) = find_config(near) else {
        return Err(format!(
            "`{spec}` is not a remote: no {CONFIG_FILE} was found in {} or a folder above it to name it; give \
             s3://BUCKET/PREFIX or a directory path, or add [remote.{spec}] with a `url` to {CONFIG_FILE}",
            near.display()
        ));
    };
    let config = read_config(&file)?;
    let Some(remote) = config.remote.get(spec) else {
        let names: Vec<&str> = config.remote.keys().map(String::as_str).collect();
        let known = if names.is_empty() { "it names none".to_string() } else { format!("it has {}", names.join(", ")) };
        return Err(format!("{} has no remote `{spec}` ({known})", file.display()));
    };
    let base = file.parent().unwrap_or(Path::new("."));
    direct(&remote.url, base, Some(remote))
        .map_err(|e| format!("{}: [remote.{spec}]: {e}", file.display()))?
        .ok_or_else(|| format!("{}: [remote.{spec}] has an empty url", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_locations() {
        let base = Path::new("/w");
        let s3 = resolve("s3://team-cache/a/b/", base).unwrap();
        assert_eq!(s3.shown(), "s3://team-cache/a/b");
        assert!(matches!(resolve("/mnt/cache", base).unwrap(), Location::Dir(p) if p == Path::new("/mnt/cache")));
        assert!(resolve("s3:///x", base).unwrap_err().contains("no bucket"));
        assert!(resolve("gs://b/x", base).unwrap_err().contains("not supported"));
    }

    #[test]
    fn names_come_from_the_nearest_config() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("pipelines");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[remote.team]\nurl = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:9\"\nallow_http = true\n\
             [remote.nfs]\nurl = \"shared/cache\"\n",
        )
        .unwrap();
        match resolve("team", &sub).unwrap() {
            Location::S3 { bucket, prefix, endpoint, allow_http, .. } => {
                assert_eq!((bucket.as_str(), prefix.as_str()), ("b", "p"));
                assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:9"));
                assert_eq!(allow_http, Some(true));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(resolve("nfs", &sub).unwrap(), Location::Dir(dir.path().join("shared/cache")));
        let err = resolve("other", &sub).unwrap_err();
        assert!(err.contains("no remote `other`") && err.contains("nfs, team"), "{err}");
    }

    #[test]
    fn credentials_in_the_config_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(CONFIG_FILE);
        std::fs::write(&f, "[remote.team]\nurl = \"s3://b\"\nsecret_access_key = \"x\"\n").unwrap();
        let err = read_config(&f).unwrap_err();
        assert!(err.contains("credentials do not belong") && err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
        std::fs::write(&f, "[remote.team]\nurl = \"s3://b\"\nregoin = \"x\"\n").unwrap();
        let err = read_config(&f).unwrap_err();
        assert!(err.contains("line 3") && err.contains("regoin"), "{err}");
    }
}
