//! Errors raised while parsing a turn document.

use thiserror::Error;

/// A reason why a turn document could not be parsed.
///
/// Every variant carries the 1-based line of the document where the problem is, and its
/// message names the offending key, option or value and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// The document starts with `---` but no closing `---` line follows.
    #[error(
        "Front matter opened at line {line} is not closed: add a line `---` after the last \
         setting, or remove the first line if it is not front matter"
    )]
    UnclosedFrontMatter { line: usize },

    /// The front matter is not valid YAML.
    #[error(
        "Invalid YAML in the front matter at line {line}: {detail}; check the indentation, \
         colons and quotes on that line and the one above"
    )]
    InvalidYaml { line: usize, detail: String },

    /// The front matter is valid YAML but not a mapping of keys to values.
    #[error(
        "Front matter at line {line} is not a mapping: write one `key: value` per line, as in \
         `image: python:3.12`"
    )]
    NotAMapping { line: usize },

    /// The front matter contains a key that [`crate::FrontMatter`] does not have.
    #[error("Unknown front matter key `{key}` at line {line}: {hint}")]
    UnknownKey {
        line: usize,
        key: String,
        hint: String,
    },

    /// A front matter key appears twice.
    #[error("Duplicate front matter key `{key}` at line {line}: remove one of the two")]
    DuplicateKey { line: usize, key: String },

    /// A front matter value has the wrong type or an invalid value. `hint` is empty when
    /// `detail` already shows how to write the value.
    #[error(
        "Invalid value for front matter key `{key}` at line {line}: {detail}{}",
        hint_suffix(hint)
    )]
    InvalidValue {
        line: usize,
        key: String,
        detail: String,
        hint: String,
    },

    /// A step's info string contains an option that upstream does not know.
    #[error("Unknown step option `{option}` at line {line}: {hint}")]
    UnknownOption {
        line: usize,
        option: String,
        hint: String,
    },

    /// A step option has an invalid value or appears twice.
    #[error("Invalid step option `{option}` at line {line}: {detail}")]
    InvalidOption {
        line: usize,
        option: String,
        detail: String,
    },

    /// A step's info string cannot be split into options.
    #[error("Malformed step options at line {line}: {detail}")]
    MalformedOptions { line: usize, detail: String },

    /// Two steps carry the same `name`.
    #[error(
        "Duplicate step name `{name}` at line {line}, already used at line {first_line}: give \
         each step its own name"
    )]
    DuplicateStepName {
        line: usize,
        name: String,
        first_line: usize,
    },

    /// A line ends with a carriage return alone, as in classic Mac OS files.
    #[error(
        "Line {line} ends with a carriage return alone, which is not supported: save the \
         document with LF or CRLF line endings"
    )]
    LoneCarriageReturn { line: usize },

    /// A step's code block has no closing fence, so no result can be written below it.
    #[error(
        "Step at line {line} has no closing fence: add a line `{fence}` after its last command"
    )]
    UnclosedStep { line: usize, fence: String },
}

impl ParseError {
    /// Returns the 1-based line of the document that the error points at.
    pub fn line(&self) -> usize {
        match self {
            Self::UnclosedFrontMatter { line }
            | Self::InvalidYaml { line, .. }
            | Self::NotAMapping { line }
            | Self::UnknownKey { line, .. }
            | Self::DuplicateKey { line, .. }
            | Self::InvalidValue { line, .. }
            | Self::UnknownOption { line, .. }
            | Self::InvalidOption { line, .. }
            | Self::MalformedOptions { line, .. }
            | Self::DuplicateStepName { line, .. }
            | Self::LoneCarriageReturn { line }
            | Self::UnclosedStep { line, .. } => *line,
        }
    }
}

/// Returns `; HINT`, or nothing for an empty hint.
fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!("; {hint}")
    }
}
