//! A parsed turn document: its front matter and its steps.

use std::ops::Range;
use std::time::Duration;

use crate::duration::format_duration;
use crate::error::ParseError;
use crate::front_matter::{self, FrontMatter};
use crate::lines::{Line, LineCounter};
use crate::markdown::{block_lines, fenced_blocks, find_result_section, line_ending_after};
use crate::options::{parse_info, StepOptions};

/// Maximum length of a label taken from a step's first command, in characters.
pub const LABEL_MAX_CHARS: usize = 40;

/// A parsed turn document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Settings from the YAML front matter, or the defaults when there is none.
    pub front_matter: FrontMatter,
    /// The front matter from the opening `---` to the end of the closing line, line ending
    /// included. `None` when the document has no front matter.
    pub front_matter_span: Option<Range<usize>>,
    /// Steps in document order.
    pub steps: Vec<Step>,
}

/// One step: a fenced code block whose info string starts with `bash`, `sh` or `shell`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Position among the steps, from 0.
    pub index: usize,
    /// 1-based line of the opening fence.
    pub line: usize,
    /// Language of the info string: `bash`, `sh` or `shell`.
    pub language: String,
    /// Code as the shell should read it: container prefixes and fence indentation removed,
    /// every line ending in `\n`, whatever line endings the document uses.
    pub code: String,
    /// Options from the info string.
    pub options: StepOptions,
    /// Short name for progress output: the `name` option, or else the start of the first
    /// command line, cut to [`LABEL_MAX_CHARS`] characters.
    pub label: String,
    /// Byte positions of the step and its result section in the source.
    pub spans: StepSpans,
}

/// Byte positions of a step in the source it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpans {
    /// From the first character of the opening fence to the end of the closing fence line,
    /// line ending excluded. A new result section is inserted at `block.end`.
    pub block: Range<usize>,
    /// The result section under the block, from the start of its first line to the end of
    /// its last line, line ending excluded. `None` when the step has no result section.
    pub result: Option<Range<usize>>,
    /// Bytes before the fence on the closing fence line (block quote markers, indentation),
    /// which every line of the result section starts with.
    pub prefix: String,
    /// Line ending of result section lines: the closing fence line's own.
    pub line_ending: String,
}

impl Document {
    /// Returns the time limit of `step`: its own `timeout`, or else the front matter's.
    pub fn timeout_of(&self, step: &Step) -> Duration {
        step.options.timeout.unwrap_or(self.front_matter.timeout)
    }

    /// Lists the steps as `--dry-run` shows them, one line per step, such as
    /// `Step 2: python analyze.py (timeout 10m, continue on error)`.
    pub fn dry_run_listing(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|step| {
                let mut notes = vec![format!(
                    "timeout {}",
                    format_duration(self.timeout_of(step))
                )];
                if step.options.continue_on_error {
                    notes.push("continue on error".to_owned());
                }
                if step.options.skip {
                    notes.push("skipped".to_owned());
                }
                format!(
                    "Step {}: {} ({})",
                    step.index + 1,
                    step.label,
                    notes.join(", ")
                )
            })
            .collect()
    }
}

/// Parses a turn document.
///
/// Fails on invalid or unknown front matter, on invalid or unknown step options, on two
/// steps with the same name, and on lone carriage returns. It also fails on a step block
/// without a closing fence, because a result section written under such a block would
/// become part of its code.
pub fn parse(source: &str) -> Result<Document, ParseError> {
    reject_lone_carriage_returns(source)?;
    let extracted = front_matter::extract(source)?;
    let mut steps = Vec::new();
    let mut closing_lines = Vec::new();
    let mut line_counter = LineCounter::new(source);
    for block in fenced_blocks(source, extracted.body_start) {
        let line = line_counter.line_of(block.span.start);
        let Some(options) = parse_info(&block.info, line)? else {
            continue;
        };
        let lines = block_lines(source, &block);
        let closing = lines.closing.ok_or_else(|| ParseError::UnclosedStep {
            line,
            fence: lines.fence.text(),
        })?;
        let index = steps.len();
        steps.push(Step {
            index,
            line,
            language: info_language(&block.info).to_owned(),
            label: step_label(&options, &block.code, index),
            code: block.code,
            options,
            spans: StepSpans {
                block: block.span.start..closing.end,
                result: None,
                line_ending: line_ending_after(source, closing).to_owned(),
                prefix: lines.prefix,
            },
        });
        closing_lines.push(closing);
    }

    find_result_sections(source, &mut steps, &closing_lines);
    reject_duplicate_names(&steps)?;
    Ok(Document {
        front_matter: extracted.front_matter,
        front_matter_span: extracted.span,
        steps,
    })
}

/// Rejects a carriage return that is not part of `\r\n`.
///
/// CommonMark allows it as a line ending, but pulldown-cmark 0.13 reads the info string of a
/// fence past it, so such a document would be split into steps wrongly.
fn reject_lone_carriage_returns(source: &str) -> Result<(), ParseError> {
    let lone_return = source
        .match_indices('\r')
        .map(|(index, _)| index)
        .find(|&index| !source[index..].starts_with("\r\n"));
    match lone_return {
        Some(index) => Err(ParseError::LoneCarriageReturn {
            line: LineCounter::new(source).line_of(index),
        }),
        None => Ok(()),
    }
}

fn info_language(info: &str) -> &str {
    let info = info.trim_start();
    let end = info
        .find(|c: char| c.is_whitespace() || c == '{')
        .unwrap_or(info.len());
    &info[..end]
}

/// Fills in `spans.result` of each step. A section must end before the next step starts.
fn find_result_sections(source: &str, steps: &mut [Step], closing_lines: &[Line]) {
    let next_starts: Vec<usize> = steps
        .iter()
        .skip(1)
        .map(|step| step.spans.block.start)
        .chain([source.len()])
        .collect();
    for ((step, closing), limit) in steps.iter_mut().zip(closing_lines).zip(next_starts) {
        step.spans.result = find_result_section(source, *closing, &step.spans.prefix, limit);
    }
}

fn reject_duplicate_names(steps: &[Step]) -> Result<(), ParseError> {
    for (position, step) in steps.iter().enumerate() {
        let Some(name) = &step.options.name else {
            continue;
        };
        let earlier = steps[..position]
            .iter()
            .find(|other| other.options.name.as_ref() == Some(name));
        if let Some(first) = earlier {
            return Err(ParseError::DuplicateStepName {
                line: step.line,
                name: name.clone(),
                first_line: first.line,
            });
        }
    }
    Ok(())
}

/// Chooses a step's label: its name, or its first command, or its position.
fn step_label(options: &StepOptions, code: &str, index: usize) -> String {
    if let Some(name) = &options.name {
        return name.clone();
    }
    code.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .map_or_else(
            || format!("step {}", index + 1),
            |command| truncate_label(command, LABEL_MAX_CHARS),
        )
}

/// Cuts `text` to at most `max_chars` characters, ending a cut text with `…`.
pub fn truncate_label(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let head: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    format!("{}…", head.trim_end())
}
