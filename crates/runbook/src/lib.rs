//! Turn documents: Markdown runbooks whose shell code blocks are the steps of a turn.
//!
//! This crate parses a document into typed settings and steps, and writes step results back
//! into it. It does no I/O: callers read and write files and run the steps.
//!
//! # Document format
//!
//! ````markdown
//! ---
//! image: python:3.12
//! timeout: 5m
//! ---
//!
//! Install the dependencies:
//!
//! ```bash {name=install timeout=2m}
//! pip install -r requirements.txt
//! ```
//! ````
//!
//! - The optional YAML front matter between `---` lines sets the sandbox and turn
//!   ([`FrontMatter`]). Unknown keys are errors.
//! - Every fenced code block whose info string starts with `bash`, `sh` or `shell` is a
//!   [`Step`], in document order. Other blocks, and anything inside them (such as a
//!   ```` ```bash ```` example inside a four-backtick block), are left alone. Blocks inside
//!   lists and block quotes are steps too.
//! - Step options go in braces after the language: `name`, `timeout`, `continue-on-error`
//!   and `skip` ([`StepOptions`]). Unknown options are errors.
//!
//! # Result sections
//!
//! [`render`] writes the outcome of each step right under its closing fence:
//!
//! ````markdown
//! ```bash
//! python analyze.py
//! ```
//! <!-- upstream:result -->
//! **Result:** exit 0 (1.4s)
//! ```text
//! Found 847 records
//! ```
//! <!-- /upstream:result -->
//! ````
//!
//! The HTML comments are invisible when the Markdown is displayed and mark the section, so a
//! later run replaces it in place. Text counts as a result section only when it follows its
//! step directly or after blank lines, starts and ends with the markers, stays in the step's
//! container, and ends before the next step. Anything else is left as user text, and a new
//! section is inserted above it. Section lines carry the closing fence's prefix (block quote
//! markers, indentation) and its line ending.
//!
//! Status lines read `exit 2 (0.3s)`, `timed out after 2m (exit 137)`, `interrupted (4.0s)`,
//! `skipped`, or `not run (an earlier step failed)`. Output is shown in a backtick fence
//! longer than any backtick run in it, after removing escape sequences, resolving carriage
//! returns as a terminal would, and replacing invalid UTF-8 and control characters. Long
//! output keeps its head and tail ([`RenderOptions`]), joined by a `[...]` line, and the
//! section ends with a note of how many bytes were left out. Steps without output get no
//! fence.
//!
//! # Known limitations
//!
//! - Output lines keep their trailing whitespace, and very long lines are not wrapped.
//! - A step whose block has no closing fence is an error rather than closed for the user.
//! - Documents with lone carriage returns as line endings (classic Mac OS) are rejected,
//!   because pulldown-cmark 0.13 does not end a fence's info string at them.

mod check;
mod document;
mod duration;
mod error;
mod front_matter;
mod lines;
mod markdown;
mod options;
mod output;
mod render;
mod suggest;

pub use check::results_differ_ignoring_timings;
pub use document::{parse, truncate_label, Document, Step, StepSpans, LABEL_MAX_CHARS};
pub use duration::{format_duration, format_elapsed, parse_duration, DurationError};
pub use error::ParseError;
pub use front_matter::{
    FrontMatter, NetworkRules, NetworkSetting, DEFAULT_SHELL, DEFAULT_STEP_TIMEOUT,
};
pub use markdown::{RESULT_END, RESULT_START};
pub use options::{StepOptions, STEP_LANGUAGES};
pub use output::ELISION_LINE;
pub use render::{
    render, render_with_options, RenderOptions, StepReport, OUTPUT_INFO, STATUS_PREFIX,
};
