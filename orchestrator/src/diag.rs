//! Pipeline diagnostics: what went wrong, where (file:line:column), and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::yaml::Pos;

/// An invalid pipeline or command line. Always exit code 2; nothing ran, nothing was written.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Diagnostic {
    /// Stable code, e.g. `E-UNKNOWN-KEY`, for scripts and docs.
    pub code: &'static str,
    pub message: String,
    pub file: Option<PathBuf>,
    pub pos: Option<Pos>,
    pub help: Option<String>,
    /// The file's text, for the snippet under the message.
    pub source_text: Option<std::sync::Arc<str>>,
}

impl Diagnostic {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic { code, message: message.into(), file: None, pos: None, help: None, source_text: None }
    }
    pub fn at(mut self, pos: Pos) -> Self {
        self.pos = Some(pos);
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn in_file(mut self, file: &Path, source: std::sync::Arc<str>) -> Self {
        self.file = Some(file.to_path_buf());
        self.source_text = Some(source);
        self
    }

    /// `file:line:col` (or `file`, or `--set`), the place to quote in one-line logs.
    pub fn location(&self) -> Option<String> {
        match (&self.file, self.pos) {
            (_, Some(p)) if p.is_cli() => Some("--set".to_string()),
            (Some(f), Some(p)) => Some(format!("{}:{}:{}", f.display(), p.line, p.col)),
            (Some(f), None) => Some(f.display().to_string()),
            (None, _) => None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location() {
            Some(loc) => writeln!(f, "{loc}: error[{}]: {}", self.code, self.message)?,
            None => writeln!(f, "error[{}]: {}", self.code, self.message)?,
        }
        if let (Some(src), Some(pos)) = (&self.source_text, self.pos) {
            if !pos.is_cli() {
                if let Some(line) = src.lines().nth(pos.line.saturating_sub(1) as usize) {
                    let num = pos.line.to_string();
                    let pad = " ".repeat(num.len());
                    writeln!(f, "{pad} |")?;
                    writeln!(f, "{num} | {line}")?;
                    let caret_at = (pos.col.saturating_sub(1) as usize).min(line.chars().count());
                    writeln!(f, "{pad} | {}^", " ".repeat(caret_at))?;
                }
            }
        }
        if let Some(h) = &self.help {
            writeln!(f, "  = help: {h}")?;
        }
        Ok(())
    }
}

/// The closest candidate within a small edit distance, if any.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, c.len()))
        .map(|(_, c)| c)
}

/// "did you mean `x`?" or the list of valid names.
pub fn suggest(word: &str, candidates: &[&str], what: &str) -> String {
    match closest(word, candidates.iter().copied()) {
        Some(c) => format!("did you mean `{c}`? valid {what}: {}", candidates.join(", ")),
        None if candidates.is_empty() => format!("there are no {what}"),
        None => format!("valid {what}: {}", candidates.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(closest("comand", ["command", "corpus", "train"]), Some("command"));
        assert_eq!(closest("zzzzzz", ["command", "corpus"]), None);
    }

    #[test]
    fn renders_location_and_snippet() {
        let src: std::sync::Arc<str> = "name: x\nstages:\n  a:\n    kindd: command\n".into();
        let d = Diagnostic::new("E-UNKNOWN-KEY", "unknown key `kindd`")
            .at(Pos { line: 4, col: 5 })
            .in_file(Path::new("p.yaml"), src)
            .help("did you mean `kind`?");
        let text = d.to_string();
        assert!(text.starts_with("p.yaml:4:5: error[E-UNKNOWN-KEY]: unknown key `kindd`"), "{text}");
        assert!(text.contains("4 |     kindd: command"));
        assert!(text.contains("    ^"));
        assert!(text.contains("help: did you mean `kind`?"));
    }
}
