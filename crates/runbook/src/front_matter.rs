//! The YAML front matter of a turn document: the settings of the sandbox and the turn.

pub(crate) mod values;

use std::collections::BTreeMap;
use std::num::{NonZeroU16, NonZeroU32, NonZeroU64};
use std::ops::Range;
use std::time::Duration;

use serde_norway::Value;

use crate::error::ParseError;
use crate::lines::lines_from;
use crate::suggest::unknown_name_hint;
use values::{AbsolutePath, Env, NonEmptyString, OneOrMany, Timeout};

pub use values::{NetworkRules, NetworkSetting};

/// Time limit of a step when neither the step nor the front matter sets `timeout`.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Shell that runs each step when the front matter does not set `shell`.
pub const DEFAULT_SHELL: &str = "bash";

/// Keys accepted in the front matter, in the order the documentation lists them.
const KEYS: [&str; 13] = [
    "image",
    "env",
    "timeout",
    "vcpus",
    "memory",
    "disk",
    "network",
    "workdir",
    "shell",
    "context",
    "artifacts",
    "carry",
    "publish",
];

/// Settings of a turn, read from the YAML front matter of its document.
///
/// A key that is absent keeps its default: `None`, an empty collection, or the documented
/// default. Sizes and limits left as `None` are the executor's to choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontMatter {
    /// OCI image reference the sandbox boots from (`image: python:3.12`).
    pub image: Option<String>,
    /// Environment variables set for every step. Scalar YAML values become strings.
    pub env: BTreeMap<String, String>,
    /// Time limit of each step that does not set its own. Default: [`DEFAULT_STEP_TIMEOUT`]
    /// (10 minutes).
    pub timeout: Duration,
    /// Number of virtual CPUs of the sandbox.
    pub vcpus: Option<NonZeroU32>,
    /// Guest memory in MiB (key `memory`).
    pub memory_mib: Option<NonZeroU64>,
    /// Size of the sandbox's writable disk in MiB (key `disk`).
    pub disk_mib: Option<NonZeroU64>,
    /// Network access of the sandbox.
    pub network: Option<NetworkSetting>,
    /// Absolute path in the sandbox where steps start.
    pub workdir: Option<String>,
    /// Shell program that runs each step's code. Default: [`DEFAULT_SHELL`] (`bash`).
    pub shell: String,
    /// Names of earlier turns whose saved context is loaded before the first step. A single
    /// name may be written without a list.
    pub context: Vec<String>,
    /// Glob patterns, relative to `workdir`, of files saved as artifacts after the turn.
    pub artifacts: Vec<String>,
    /// State carried over to the next turn, such as `workspace`. A single name may be
    /// written without a list.
    pub carry: Vec<String>,
    /// Guest ports published on the host.
    pub publish: Vec<NonZeroU16>,
}

impl Default for FrontMatter {
    fn default() -> Self {
        Self {
            image: None,
            env: BTreeMap::new(),
            timeout: DEFAULT_STEP_TIMEOUT,
            vcpus: None,
            memory_mib: None,
            disk_mib: None,
            network: None,
            workdir: None,
            shell: DEFAULT_SHELL.to_owned(),
            context: Vec::new(),
            artifacts: Vec::new(),
            carry: Vec::new(),
            publish: Vec::new(),
        }
    }
}

/// The front matter of a document and where the Markdown body starts.
pub(crate) struct Extracted {
    pub front_matter: FrontMatter,
    /// From the opening `---` to the end of the closing line, line ending included.
    pub span: Option<Range<usize>>,
    pub body_start: usize,
}

/// Splits off and parses the front matter, if the document starts with a `---` line.
///
/// The front matter ends at the first later line that is `---` or `...`.
pub(crate) fn extract(source: &str) -> Result<Extracted, ParseError> {
    // An editor may have saved a byte order mark before the opening line.
    let start = if source.starts_with('\u{feff}') { 3 } else { 0 };
    let mut lines = lines_from(source, start);
    let no_front_matter = Extracted {
        front_matter: FrontMatter::default(),
        span: None,
        body_start: start,
    };
    let Some(opening) = lines.next() else {
        return Ok(no_front_matter);
    };
    if opening.text(source).trim_end() != "---" {
        return Ok(no_front_matter);
    }

    let closing = lines
        .find(|line| matches!(line.text(source).trim_end(), "---" | "..."))
        .ok_or(ParseError::UnclosedFrontMatter { line: 1 })?;
    let yaml = &source[opening.next..closing.start];
    Ok(Extracted {
        front_matter: parse_yaml(yaml, 2)?,
        span: Some(start..closing.next),
        body_start: closing.next,
    })
}

/// Parses the YAML text of the front matter, whose first line is line `first_line` of the
/// document.
fn parse_yaml(yaml: &str, first_line: usize) -> Result<FrontMatter, ParseError> {
    reject_duplicate_keys(yaml, first_line)?;
    let value: Value =
        serde_norway::from_str(yaml).map_err(|error| yaml_error(&error, first_line))?;
    let mapping = match value {
        Value::Null => return Ok(FrontMatter::default()),
        Value::Mapping(mapping) => mapping,
        _ => return Err(ParseError::NotAMapping { line: first_line }),
    };

    let mut front_matter = FrontMatter::default();
    for (key, value) in mapping {
        let key = key_text(&key);
        let line = key_line(yaml, &key).map_or(first_line, |index| first_line + index);
        apply_key(&mut front_matter, &key, value).map_err(|error| match error {
            KeyError::Unknown => ParseError::UnknownKey {
                line,
                hint: unknown_name_hint(&key, &KEYS, "keys"),
                key,
            },
            KeyError::Invalid(detail) => ParseError::InvalidValue {
                line,
                // A detail that already shows how to write the value, as a duration's
                // does, needs no second example.
                hint: if detail.contains("as in `") {
                    String::new()
                } else {
                    value_hint(&key).to_owned()
                },
                key,
                detail,
            },
        })?;
    }
    Ok(front_matter)
}

enum KeyError {
    Unknown,
    Invalid(String),
}

/// Stores one front matter value in its typed field.
fn apply_key(front_matter: &mut FrontMatter, key: &str, value: Value) -> Result<(), KeyError> {
    if !KEYS.contains(&key) {
        return Err(KeyError::Unknown);
    }
    if value.is_null() {
        return Err(KeyError::Invalid("the value is missing".to_owned()));
    }
    match key {
        "image" => front_matter.image = Some(decode::<NonEmptyString>(value)?.0),
        "env" => front_matter.env = decode::<Env>(value)?.0,
        "timeout" => front_matter.timeout = decode::<Timeout>(value)?.0,
        "vcpus" => front_matter.vcpus = Some(decode(value)?),
        "memory" => front_matter.memory_mib = Some(decode(value)?),
        "disk" => front_matter.disk_mib = Some(decode(value)?),
        "network" => front_matter.network = Some(decode(value)?),
        "workdir" => front_matter.workdir = Some(decode::<AbsolutePath>(value)?.0),
        "shell" => front_matter.shell = decode::<NonEmptyString>(value)?.0,
        "context" => front_matter.context = decode::<OneOrMany>(value)?.0,
        "artifacts" => front_matter.artifacts = decode::<OneOrMany>(value)?.0,
        "carry" => front_matter.carry = decode::<OneOrMany>(value)?.0,
        "publish" => front_matter.publish = decode(value)?,
        _ => unreachable!("every entry of KEYS has an arm"),
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, KeyError> {
    serde_norway::from_value(value).map_err(|error| KeyError::Invalid(error.to_string()))
}

/// Returns a sentence on how to write a valid value for `key`.
fn value_hint(key: &str) -> &'static str {
    match key {
        "image" => "write an OCI image reference, as in `image: python:3.12`",
        "env" => "write a mapping of variable names to values, as in `env: {LANG: C.UTF-8}`",
        "timeout" => "write a duration, as in `timeout: 90s` or `timeout: 1h30m`",
        "vcpus" => "write a whole number of virtual CPUs, as in `vcpus: 2`",
        "memory" => "write the memory in MiB as a whole number, as in `memory: 2048`",
        "disk" => "write the disk size in MiB as a whole number, as in `disk: 10240`",
        "network" => "write `off`, `on`, or a mapping with `allow` and `deny` lists of hosts",
        "workdir" => "write an absolute path in the sandbox, as in `workdir: /work`",
        "shell" => "write the shell that runs the steps, as in `shell: bash`",
        "context" => "write a turn name or a list of them, as in `context: [research]`",
        "artifacts" => "write a list of glob patterns, as in `artifacts: [out/*.json]`",
        "carry" => "write a name or a list of names, as in `carry: workspace`",
        "publish" => "write a list of ports from 1 to 65535, as in `publish: [8080]`",
        _ => "",
    }
}

/// Names a mapping key for an error message, because YAML allows keys that are not strings.
fn key_text(key: &Value) -> String {
    match key {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        _ => "(a key that is not a string)".to_owned(),
    }
}

/// Rejects a top-level key written twice, which YAML forbids, pointing at the second one.
///
/// serde_norway reports duplicates at the start of the mapping, so the lines are found here.
fn reject_duplicate_keys(yaml: &str, first_line: usize) -> Result<(), ParseError> {
    let mut seen = Vec::new();
    for (index, line) in yaml.lines().enumerate() {
        let Some(key) = top_level_key(line) else {
            continue;
        };
        if seen.contains(&key) {
            return Err(ParseError::DuplicateKey {
                line: first_line + index,
                key: key.to_owned(),
            });
        }
        seen.push(key);
    }
    Ok(())
}

/// Returns the 0-based index of the YAML line that sets top-level `key`.
fn key_line(yaml: &str, key: &str) -> Option<usize> {
    yaml.lines()
        .position(|line| top_level_key(line) == Some(key))
}

/// Returns the key of a block-style top-level `key: value` line, without quotes.
fn top_level_key(line: &str) -> Option<&str> {
    let first = line.chars().next()?;
    if first.is_whitespace() || matches!(first, '#' | '-' | '{' | '[' | '?' | '%') {
        return None;
    }
    if first == '"' || first == '\'' {
        let end = line[1..].find(first)? + 1;
        let after = line[end + 1..].trim_start();
        return after.starts_with(':').then(|| &line[1..end]);
    }
    let colon = line
        .match_indices(':')
        .map(|(index, _)| index)
        .find(|&index| {
            line[index + 1..]
                .chars()
                .next()
                .is_none_or(char::is_whitespace)
        })?;
    Some(line[..colon].trim_end()).filter(|key| !key.is_empty())
}

/// Converts a YAML syntax error into one that names lines of the document.
fn yaml_error(error: &serde_norway::Error, first_line: usize) -> ParseError {
    let mut detail = error.to_string();
    let mut line = first_line;
    if let Some(location) = error.location() {
        line = first_line + location.line().saturating_sub(1);
        let own_location = format!(" at line {} column {}", location.line(), location.column());
        detail = detail.replacen(&own_location, "", 1);
    }
    ParseError::InvalidYaml {
        line,
        detail: shift_line_numbers(&detail, first_line - 1),
    }
}

/// Adds `offset` to every "line N" in a YAML error message, so that it counts document lines.
fn shift_line_numbers(message: &str, offset: usize) -> String {
    let mut shifted = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(index) = rest.find("line ") {
        let (before, after) = rest.split_at(index + "line ".len());
        shifted.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(number) => shifted.push_str(&(number + offset).to_string()),
            Err(_) => shifted.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    shifted.push_str(rest);
    shifted
}

#[cfg(test)]
mod tests;
