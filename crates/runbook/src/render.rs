//! Writing step results back into the document, in result sections under the steps.

use std::time::Duration;

use crate::document::Document;
use crate::duration::{format_duration, format_elapsed};
use crate::markdown::{RESULT_END, RESULT_START};
use crate::output::{prepare, ShownOutput};

/// Prefix of the status line of a result section.
pub const STATUS_PREFIX: &str = "**Result:**";

/// Info string of the fence around a step's output.
pub const OUTPUT_INFO: &str = "text";

/// Outcome of one step, as the executor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepReport {
    /// The step ran, to its end or until it was stopped.
    Ran {
        /// Exit code of the step's shell. On a time-out, the code the stopped shell returned.
        exit_code: i32,
        /// Time from start to exit.
        duration: Duration,
        /// Standard output and standard error, interleaved as the guest produced them.
        output: Vec<u8>,
        /// Whether the step was stopped at its time limit.
        timed_out: bool,
        /// Whether the run was interrupted (for example by Ctrl-C) while the step ran.
        interrupted: bool,
        /// Bytes of output the executor left out of `output`, for example to bound memory.
        truncated_bytes: u64,
    },
    /// The step was not run because it has `skip=true`.
    Skipped,
    /// The step was not run because an earlier step failed.
    NotRun,
    /// The step has no outcome yet. Its old result section, if any, is kept unchanged, so
    /// that a run can write the document back after each step.
    Pending,
}

/// Limits on what a result section shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Bytes of output kept from its start when it is too long to show whole.
    pub head_bytes: usize,
    /// Bytes of output kept from its end when it is too long to show whole.
    pub tail_bytes: usize,
}

impl Default for RenderOptions {
    /// Keeps 8 KiB from each end: enough for a build's first error and its summary, small
    /// enough that a loop printing megabytes does not bury the document.
    fn default() -> Self {
        Self {
            head_bytes: 8 * 1024,
            tail_bytes: 8 * 1024,
        }
    }
}

/// Writes the results of a run into `source` with the default [`RenderOptions`].
///
/// See [`render_with_options`].
pub fn render(source: &str, document: &Document, results: &[StepReport]) -> String {
    render_with_options(source, document, results, &RenderOptions::default())
}

/// Writes the results of a run into `source`, the text that `document` was parsed from.
///
/// `results[i]` is the outcome of `document.steps[i]`. Missing entries count as
/// [`StepReport::Pending`], and extra ones are ignored. Each step's result section is replaced
/// in place, or inserted right under the step's closing fence when the step has none. No
/// byte outside result sections changes, except the line ending that joins a new section to
/// its step.
pub fn render_with_options(
    source: &str,
    document: &Document,
    results: &[StepReport],
    options: &RenderOptions,
) -> String {
    let mut rendered = String::with_capacity(source.len() + 256 * document.steps.len());
    let mut copied_up_to = 0;
    for (step, report) in document.steps.iter().zip(results) {
        if *report == StepReport::Pending {
            continue;
        }
        let ending = &step.spans.line_ending;
        let section = section_lines(report, document.timeout_of(step), options)
            .into_iter()
            .map(|line| with_prefix(&step.spans.prefix, &line))
            .collect::<Vec<_>>()
            .join(ending);
        let (replaced, new_text) = match &step.spans.result {
            Some(old) => (old.clone(), section),
            None => (
                step.spans.block.end..step.spans.block.end,
                format!("{ending}{section}"),
            ),
        };
        rendered.push_str(&source[copied_up_to..replaced.start]);
        rendered.push_str(&new_text);
        copied_up_to = replaced.end;
    }
    rendered.push_str(&source[copied_up_to..]);
    rendered
}

/// Puts the container prefix before a line, without trailing whitespace on blank lines.
fn with_prefix(prefix: &str, line: &str) -> String {
    if line.is_empty() {
        prefix.trim_end().to_owned()
    } else {
        format!("{prefix}{line}")
    }
}

/// Builds the lines of a result section, without container prefix or line endings.
fn section_lines(report: &StepReport, timeout: Duration, options: &RenderOptions) -> Vec<String> {
    let mut lines = vec![
        RESULT_START.to_owned(),
        format!("{STATUS_PREFIX} {}", status(report, timeout)),
    ];
    if let StepReport::Ran {
        output,
        truncated_bytes,
        ..
    } = report
    {
        let prepared = prepare(
            output,
            options.head_bytes,
            options.tail_bytes,
            *truncated_bytes,
        );
        lines.extend(output_lines(&prepared, output.len(), *truncated_bytes));
    }
    lines.push(RESULT_END.to_owned());
    lines
}

/// Describes the outcome after `**Result:**`. A measured duration always comes last, in
/// parentheses, which is what [`crate::results_differ_ignoring_timings`] relies on.
fn status(report: &StepReport, timeout: Duration) -> String {
    match report {
        StepReport::Ran {
            interrupted: true,
            duration,
            ..
        } => format!("interrupted ({})", format_elapsed(*duration)),
        StepReport::Ran {
            timed_out: true,
            exit_code,
            ..
        } => format!(
            "timed out after {} (exit {exit_code})",
            format_duration(timeout)
        ),
        StepReport::Ran {
            exit_code,
            duration,
            ..
        } => format!("exit {exit_code} ({})", format_elapsed(*duration)),
        StepReport::Skipped => "skipped".to_owned(),
        StepReport::NotRun => "not run (an earlier step failed)".to_owned(),
        StepReport::Pending => "pending".to_owned(),
    }
}

/// Builds the output fence and the note on left-out bytes.
fn output_lines(prepared: &ShownOutput, kept_bytes: usize, dropped_bytes: u64) -> Vec<String> {
    let mut lines = Vec::new();
    if !prepared.lines.is_empty() {
        let fence = "`".repeat(fence_length(&prepared.lines));
        lines.push(format!("{fence}{OUTPUT_INFO}"));
        lines.extend(prepared.lines.iter().cloned());
        lines.push(fence);
    }
    if prepared.omitted_bytes > 0 {
        let total = u64::try_from(kept_bytes)
            .unwrap_or(u64::MAX)
            .saturating_add(dropped_bytes);
        lines.push(format!(
            "*Output shortened: {} of {total} bytes left out.*",
            prepared.omitted_bytes
        ));
    }
    lines
}

/// Returns a backtick fence length longer than any backtick run in the output, so that no
/// output line can close the fence.
fn fence_length(lines: &[String]) -> usize {
    let longest_run = lines
        .iter()
        .flat_map(|line| line.split(|c| c != '`'))
        .map(str::len)
        .max()
        .unwrap_or(0);
    (longest_run + 1).max(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_length_exceeds_backtick_runs() {
        assert_eq!(fence_length(&["plain".to_owned()]), 3);
        assert_eq!(fence_length(&["```".to_owned()]), 4);
        assert_eq!(fence_length(&["a `````` b".to_owned(), "``".to_owned()]), 7);
    }

    #[test]
    fn status_describes_each_outcome() {
        let ran = |exit_code, timed_out, interrupted| StepReport::Ran {
            exit_code,
            duration: Duration::from_millis(1_400),
            output: Vec::new(),
            timed_out,
            interrupted,
            truncated_bytes: 0,
        };
        let timeout = Duration::from_secs(120);
        assert_eq!(status(&ran(0, false, false), timeout), "exit 0 (1.4s)");
        assert_eq!(status(&ran(2, false, false), timeout), "exit 2 (1.4s)");
        assert_eq!(
            status(&ran(137, true, false), timeout),
            "timed out after 2m (exit 137)"
        );
        assert_eq!(status(&ran(130, true, true), timeout), "interrupted (1.4s)");
        assert_eq!(status(&StepReport::Skipped, timeout), "skipped");
        let not_run = status(&StepReport::NotRun, timeout);
        assert_eq!(not_run, "not run (an earlier step failed)");
    }
}
