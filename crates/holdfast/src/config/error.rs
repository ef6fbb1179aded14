//! Config errors that say where: file, line, column and key, then what is allowed.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place in the file (it could not be read).
    pub line: usize,
    pub column: usize,
    /// Dotted key path such as `upstream.api.pool.idle_timeout`, when known.
    pub key: Option<String>,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigError {
    pub(super) fn io(path: &Path, e: &std::io::Error) -> Self {
        ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: None,
            message: format!("cannot read config: {e}"),
        }
    }

    pub(super) fn from_toml(
        origin: &Path,
        text: &str,
        e: &toml::de::Error,
        key: Option<String>,
    ) -> Self {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
        // serde_path_to_error says "." for the document root.
        let key = key.filter(|k| k != "." && !k.is_empty());
        let mut message = e.message().trim().to_owned();
        // The parser's "duplicate key" names none; its span is the key written again.
        if message == "duplicate key"
            && let Some(name) = e.span().and_then(|s| text.get(s))
        {
            message = format!("duplicate key `{}`", name.trim());
        }
        ConfigError {
            file: origin.to_owned(),
            line,
            column,
            key,
            message,
        }
    }
}

impl ConfigErrors {
    pub(super) fn single(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }

    /// Turns validation problems keyed by path into errors with line numbers.
    pub(super) fn located(origin: &Path, text: &str, problems: Vec<(String, String)>) -> Self {
        let doc = DeTable::parse(text).ok();
        ConfigErrors(
            problems
                .into_iter()
                .map(|(key, message)| {
                    let (line, column) = doc
                        .as_ref()
                        .and_then(|d| locate(d.get_ref(), &key))
                        .map_or((0, 0), |span| line_col(text, span.start));
                    ConfigError {
                        file: origin.to_owned(),
                        line,
                        column,
                        key: Some(key),
                        message,
                    }
                })
                .collect(),
        )
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Finds the span of the deepest existing part of a key path like `route[1].upstream`.
fn locate(doc: &DeTable<'_>, key: &str) -> Option<Range<usize>> {
    let mut table = doc;
    let mut found: Option<Range<usize>> = None;
    let mut segments = split_key(key).into_iter().peekable();
    while let Some(seg) = segments.next() {
        let seg = seg.as_str();
        let (name, index) = match seg.strip_prefix('"') {
            Some(quoted) => (quoted.strip_suffix('"').unwrap_or(quoted), None),
            None => match seg.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (seg, None),
            },
        };
        // A key left to its default is not in the file: its table's place is the
        // nearest there is.
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            return found;
        };
        found = Some(k.span());
        let mut value = v;
        if let Some(i) = index {
            let DeValue::Array(items) = value.get_ref() else {
                return found;
            };
            let Some(item) = items.get(i) else {
                return found;
            };
            value = item;
            found = Some(value.span());
        }
        match value.get_ref() {
            DeValue::Table(t) if segments.peek().is_some() => table = t,
            _ => return found,
        }
    }
    found
}

/// A key path's segments, split at dots outside double quotes (`upstream."api.v1".x`).
fn split_key(key: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in key.chars() {
        if c == '.' && !quoted {
            out.push(String::new());
            continue;
        }
        if c == '"' {
            quoted = !quoted;
        }
        if let Some(segment) = out.last_mut() {
            segment.push(c);
        }
    }
    out
}
