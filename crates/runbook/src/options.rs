//! Step options in a code block's info string, in Runme's style:
//! ```` ```bash {name=install timeout=2m continue-on-error=true skip=true} ````.

use std::time::Duration;

use crate::error::ParseError;
use crate::front_matter::values::parse_timeout;
use crate::suggest::unknown_name_hint;

/// Info-string languages that make a fenced code block a step.
pub const STEP_LANGUAGES: [&str; 3] = ["bash", "sh", "shell"];

/// Options a step may set, as written in the info string.
const OPTIONS: [&str; 4] = ["name", "timeout", "continue-on-error", "skip"];

/// Options of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOptions {
    /// Name that identifies the step in output and on the command line (`name=install`).
    pub name: Option<String>,
    /// Time limit of this step. When `None`, the front matter's `timeout` applies.
    pub timeout: Option<Duration>,
    /// Whether later steps still run when this one exits non-zero (`continue-on-error`).
    pub continue_on_error: bool,
    /// Whether the step is left out of runs (`skip`).
    pub skip: bool,
}

/// Parses the info string of a fenced code block that starts at line `line`.
///
/// Returns `None` when the block is not a step. A boolean option written without a value,
/// as in `{skip}`, is `true`. Values may be quoted with `"` or `'` to contain spaces.
pub(crate) fn parse_info(info: &str, line: usize) -> Result<Option<StepOptions>, ParseError> {
    let info = info.trim();
    let language_end = info
        .find(|c: char| c.is_whitespace() || c == '{')
        .unwrap_or(info.len());
    let (language, rest) = info.split_at(language_end);
    if !STEP_LANGUAGES.contains(&language) {
        return Ok(None);
    }

    let mut options = StepOptions::default();
    let rest = rest.trim();
    if rest.is_empty() {
        return Ok(Some(options));
    }
    let mut seen: Vec<&str> = Vec::new();
    for attribute in split_attributes(brace_content(rest, language, line)?, line)? {
        if seen.contains(&attribute.key) {
            return Err(ParseError::InvalidOption {
                line,
                option: attribute.key.to_owned(),
                detail: "it is given twice; keep one".to_owned(),
            });
        }
        seen.push(attribute.key);
        apply(&mut options, &attribute, line)?;
    }
    Ok(Some(options))
}

/// One `key=value` or bare `key` inside the braces.
struct Attribute<'a> {
    key: &'a str,
    value: Option<String>,
}

/// Returns the text between `{` and `}`, which must enclose everything after the language.
fn brace_content<'a>(rest: &'a str, language: &str, line: usize) -> Result<&'a str, ParseError> {
    let Some(inner) = rest.strip_prefix('{') else {
        return Err(ParseError::MalformedOptions {
            line,
            detail: format!(
                "unexpected `{rest}` after `{language}`; write step options in braces, as in \
                 `{language} {{name=build timeout=2m}}`"
            ),
        });
    };
    inner
        .strip_suffix('}')
        .ok_or_else(|| ParseError::MalformedOptions {
            line,
            detail: format!("`{rest}` does not end with `}}`; close the options with `}}`"),
        })
}

/// Splits the options at spaces or commas, keeping quoted values whole.
fn split_attributes(text: &str, line: usize) -> Result<Vec<Attribute<'_>>, ParseError> {
    let is_separator = |c: char| c.is_whitespace() || c == ',';
    let mut attributes = Vec::new();
    let mut rest = text.trim_start_matches(is_separator);
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| is_separator(c) || c == '=')
            .unwrap_or(rest.len());
        let (key, after_key) = rest.split_at(key_end);
        if key.is_empty() {
            return Err(ParseError::MalformedOptions {
                line,
                detail: "found `=` without an option name before it".to_owned(),
            });
        }
        let mut value = None;
        rest = after_key;
        if let Some(after_equals) = after_key.strip_prefix('=') {
            let (text, after_value) = split_value(after_equals, key, line)?;
            value = Some(text);
            rest = after_value;
        }
        attributes.push(Attribute { key, value });
        rest = rest.trim_start_matches(is_separator);
    }
    Ok(attributes)
}

/// Splits a value, quoted or not, from the text after it.
fn split_value<'a>(text: &'a str, key: &str, line: usize) -> Result<(String, &'a str), ParseError> {
    if let Some(quote) = text.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let quoted = &text[1..];
        let close = quoted
            .find(quote)
            .ok_or_else(|| ParseError::MalformedOptions {
                line,
                detail: format!("the value of `{key}` has no closing {quote}; add one"),
            })?;
        return Ok((quoted[..close].to_owned(), &quoted[close + 1..]));
    }
    let end = text
        .find(|c: char| c.is_whitespace() || c == ',')
        .unwrap_or(text.len());
    Ok((text[..end].to_owned(), &text[end..]))
}

/// Stores one option in `options`.
fn apply(options: &mut StepOptions, attribute: &Attribute, line: usize) -> Result<(), ParseError> {
    let invalid = |detail: String| ParseError::InvalidOption {
        line,
        option: attribute.key.to_owned(),
        detail,
    };
    let value = attribute.value.as_deref();
    match attribute.key {
        "name" => {
            let name = value
                .filter(|name| !name.trim().is_empty())
                .ok_or_else(|| {
                    invalid("the name is empty; write one, as in `name=install`".to_owned())
                })?;
            options.name = Some(name.to_owned());
        }
        "timeout" => {
            let text = value.unwrap_or_default();
            options.timeout = Some(parse_timeout(text).map_err(invalid)?);
        }
        "continue-on-error" => options.continue_on_error = parse_flag(value).map_err(invalid)?,
        "skip" => options.skip = parse_flag(value).map_err(invalid)?,
        key => {
            return Err(ParseError::UnknownOption {
                line,
                option: key.to_owned(),
                hint: unknown_name_hint(key, &OPTIONS, "options"),
            })
        }
    }
    Ok(())
}

fn parse_flag(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(format!(
            "`{other}` is not a boolean; write `true` or `false`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(info: &str) -> StepOptions {
        parse_info(info, 7).unwrap().unwrap()
    }

    fn error(info: &str) -> ParseError {
        parse_info(info, 7).unwrap_err()
    }

    #[test]
    fn parse_info_recognises_step_languages() {
        for info in ["bash", "sh", "shell", " bash ", "bash{}", "sh {}"] {
            assert_eq!(
                parse_info(info, 1),
                Ok(Some(StepOptions::default())),
                "{info}"
            );
        }
    }

    #[test]
    fn parse_info_ignores_other_blocks() {
        for info in [
            "",
            "python",
            "Bash",
            "bashrc",
            "console",
            "text {name=x}",
            "{bash}",
        ] {
            assert_eq!(parse_info(info, 1), Ok(None), "{info}");
        }
    }

    #[test]
    fn parse_info_reads_all_options() {
        let parsed = options("bash {name=install timeout=2m continue-on-error=true skip=true}");
        assert_eq!(parsed.name.as_deref(), Some("install"));
        assert_eq!(parsed.timeout, Some(Duration::from_secs(120)));
        assert!(parsed.continue_on_error);
        assert!(parsed.skip);
    }

    #[test]
    fn parse_info_accepts_quotes_commas_and_bare_flags() {
        let parsed = options(r#"sh { name="build all", skip , continue-on-error=false }"#);
        assert_eq!(parsed.name.as_deref(), Some("build all"));
        assert!(parsed.skip);
        assert!(!parsed.continue_on_error);
        assert_eq!(options("sh {name='a}b'}").name.as_deref(), Some("a}b"));
    }

    #[test]
    fn parse_info_rejects_unknown_option() {
        let ParseError::UnknownOption { line, option, hint } = error("bash {nmae=x}") else {
            panic!("expected UnknownOption");
        };
        assert_eq!(line, 7);
        assert_eq!(option, "nmae");
        assert_eq!(hint, "did you mean `name`?");
    }

    #[test]
    fn parse_info_lists_options_when_no_suggestion() {
        let message = error("bash {interactive=true}").to_string();
        assert_eq!(
            message,
            "Unknown step option `interactive` at line 7: remove it; the known options are \
             name, timeout, continue-on-error, skip"
        );
    }

    #[test]
    fn parse_info_rejects_bad_values() {
        let message = error("bash {timeout=2x}").to_string();
        assert!(message.contains("invalid duration `2x`"), "{message}");
        let message = error("bash {skip=yes}").to_string();
        assert!(message.contains("`yes` is not a boolean"), "{message}");
        let message = error("bash {timeout=0s}").to_string();
        assert!(message.contains("stop every step at once"), "{message}");
        let message = error("bash {name=}").to_string();
        assert!(message.contains("the name is empty"), "{message}");
        let message = error("bash {timeout}").to_string();
        assert!(message.contains("empty duration"), "{message}");
    }

    #[test]
    fn parse_info_rejects_repeated_option() {
        let message = error("bash {skip skip=false}").to_string();
        assert!(message.contains("given twice"), "{message}");
    }

    #[test]
    fn parse_info_rejects_malformed_text() {
        for info in [
            "bash title",
            "bash {name=x",
            "bash {name=x} extra",
            "bash {=x}",
        ] {
            assert!(
                matches!(error(info), ParseError::MalformedOptions { line: 7, .. }),
                "{info}"
            );
        }
        let message = error(r#"bash {name="x}"#).to_string();
        assert!(message.contains("no closing \""), "{message}");
    }
}
