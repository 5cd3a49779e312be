//! A remote cache shared by a team: an S3 bucket (or an S3-compatible server) or a directory
//! on a shared filesystem, both through the `object_store` crate.
//!
//! Layout, like Bazel's remote cache: `cas/<blake3>` holds immutable blobs — files, trees,
//! manifests, logs — named by their hash, and `ac/<cache key>` holds the digest of the stage
//! manifest cached under that key. A push uploads every blob a result needs before its `ac/`
//! entry, so a push that stops half-way is never seen as a hit; a pull hashes every blob as it
//! streams in and installs it only if the hash matches its name.

pub mod config;
mod gc;
mod runs;
mod transfer;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

pub use config::Location;
pub use gc::RemoteGcReport;
pub use runs::{RunsPulled, RunsPushed};
pub use transfer::{PullReport, PushReport, Transfer};

use crate::objects::ObjectError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote cannot be used as given (bad location, missing credentials).
    #[error("{0}")]
    Setup(String),
    #[error("{op} {path} on {remote}: {detail}{hint}")]
    Transfer {
        op: &'static str,
        path: String,
        remote: String,
        /// The source's message, with any S3 error document in it cut down by [`brief`].
        detail: String,
        #[source]
        source: Box<object_store::Error>,
        /// What to do about it, when the server says (` — …`), else empty.
        hint: &'static str,
    },
    #[error(
        "remote blob {path} ({what}) is corrupt: its content hashes to {actual}; it was not used \
         (`orchestrate push --repair` from a store that has the result uploads it again)"
    )]
    Corrupt { path: String, what: String, actual: String },
    #[error(
        "remote blob {path} ({what}) is missing (`orchestrate push --repair` from a store that has the result \
         uploads it again)"
    )]
    Missing { path: String, what: String },
    #[error("remote entry {path} is not valid: {why}")]
    Invalid { path: String, why: String },
    #[error(transparent)]
    Local(#[from] StoreError),
    #[error("interrupted")]
    Interrupted,
}

impl From<ObjectError> for RemoteError {
    fn from(e: ObjectError) -> Self {
        RemoteError::Local(StoreError::Object(e))
    }
}

pub type Result<T> = std::result::Result<T, RemoteError>;

/// Requests in flight at once: existence checks are tiny, transfers move data.
const CHECKS_IN_FLIGHT: usize = 32;
const TRANSFERS_IN_FLIGHT: usize = 8;

/// An opened remote.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix` or the directory, for messages.
    pub shown: String,
    /// Blobs this process found corrupt on the remote: a push here overwrites them.
    corrupt: Mutex<HashSet<String>>,
    /// Push every blob of the results again, overwriting the remote's (`push --repair`): a
    /// blob damaged or deleted on the remote is otherwise never sent again, since its
    /// result's entry is already there.
    pub repair: bool,
}

/// Variables that, without an access key pair, let the AWS SDKs (and object_store) find
/// credentials another way.
const OTHER_CREDENTIAL_SOURCES: [&str; 3] =
    ["AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"];

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Transient failures (connection refused, 5xx, throttling) are retried with exponential
/// back-off, for at most 30 s per request, then reported.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(4),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(30),
    }
}

fn open_s3(loc: &Location) -> Result<Arc<dyn ObjectStore>> {
    let Location::S3 { bucket, endpoint, region, allow_http, .. } = loc else {
        return Err(RemoteError::Setup("not an S3 location".into()));
    };
    let has_keys = env_set("AWS_ACCESS_KEY_ID") && env_set("AWS_SECRET_ACCESS_KEY");
    if !has_keys && !OTHER_CREDENTIAL_SOURCES.iter().any(|v| env_set(v)) {
        return Err(RemoteError::Setup(format!(
            "no credentials for {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_REGION; for an \
             S3-compatible server also AWS_ENDPOINT_URL, plus AWS_ALLOW_HTTP=true if it speaks plain http)",
            loc.shown()
        )));
    }
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry());
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = region {
        b = b.with_region(r);
    }
    if let Some(h) = allow_http {
        b = b.with_allow_http(*h);
    }
    let s3 = b.build().map_err(|e| RemoteError::Setup(format!("cannot use {}: {e}", loc.shown())))?;
    Ok(Arc::new(s3))
}

/// A directory remote. Reading needs it to exist: a mistyped path or an unmounted share must
/// not read as an empty cache (nor get created on the local disk); a push creates it.
fn open_dir(dir: &std::path::Path, access: Access) -> Result<Arc<dyn ObjectStore>> {
    match access {
        Access::Write => std::fs::create_dir_all(dir)
            .map_err(|e| RemoteError::Setup(format!("cannot create the remote directory {}: {e}", dir.display())))?,
        Access::Read if !dir.is_dir() => {
            return Err(RemoteError::Setup(format!(
                "the remote directory {} does not exist: check the path (a share not mounted?); a push creates it",
                dir.display()
            )))
        }
        Access::Read => {}
    }
    let fs = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| RemoteError::Setup(format!("cannot use {} as a remote: {e}", dir.display())))?;
    Ok(Arc::new(fs))
}

/// What a command does with a remote: a directory remote is created only for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Remote {
    pub fn open(loc: &Location, access: Access) -> Result<Remote> {
        let store = match loc {
            Location::S3 { prefix, .. } if !prefix.is_empty() => {
                Arc::new(PrefixStore::new(open_s3(loc)?, ObjPath::from(prefix.as_str()))) as Arc<dyn ObjectStore>
            }
            Location::S3 { .. } => open_s3(loc)?,
            Location::Dir(dir) => open_dir(dir, access)?,
        };
        Ok(Remote { store, shown: loc.shown(), corrupt: Mutex::new(HashSet::new()), repair: false })
    }

    fn cas(digest: &str) -> ObjPath {
        ObjPath::from(format!("cas/{digest}"))
    }

    fn ac(key: &str) -> ObjPath {
        ObjPath::from(format!("ac/{key}"))
    }

    fn transfer_error(&self, op: &'static str, path: &ObjPath, source: object_store::Error) -> RemoteError {
        let text = source.to_string();
        let hint = if text.contains("NoSuchBucket") {
            " — the bucket does not exist: create it, or fix the remote's URL"
        } else if text.contains("error sending request") {
            " — the server did not answer: check the endpoint (AWS_ENDPOINT_URL) and the network"
        } else if text.contains("AccessDenied")
            || text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
        {
            " — the server refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        } else {
            ""
        };
        let (path, remote, detail) = (path.to_string(), self.shown.clone(), brief(&text));
        RemoteError::Transfer { op, path, remote, detail, source: Box::new(source), hint }
    }

    fn mark_corrupt(&self, digest: &str) {
        if let Ok(mut set) = self.corrupt.lock() {
            set.insert(digest.to_string());
        }
    }

    fn known_corrupt(&self, digest: &str) -> bool {
        self.corrupt.lock().map(|s| s.contains(digest)).unwrap_or(false)
    }
}

/// object_store's message with the S3 error document it quotes (an XML body with request and
/// host ids) cut down to the document's code and message.
fn brief(text: &str) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else { return text.to_string() };
    let field = |name: &str| {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        let from = text.find(&open)? + open.len();
        Some(&text[from..from + text[from..].find(&close)?])
    };
    let head = text[..start].trim_end().trim_end_matches(':');
    match (field("Code"), field("Message")) {
        (Some(code), Some(message)) => format!("{head}: {code}: {message}"),
        (Some(code), None) => format!("{head}: {code}"),
        _ => head.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_s3_error_document_is_cut_to_its_code_and_message() {
        let text = "Error performing GET http://h/b/k in 4ms - Server returned non-2xx status code: 404 Not Found: \
                    <?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error><Code>NoSuchBucket</Code><Message>The \
                    specified bucket does not exist</Message><BucketName>b</BucketName><RequestId>X1</RequestId>\
                    <HostId>H2</HostId></Error>";
        assert_eq!(
            super::brief(text),
            "Error performing GET http://h/b/k in 4ms - Server returned non-2xx status code: 404 Not Found: \
             NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(super::brief("HTTP error: error sending request"), "HTTP error: error sending request");
    }
}
