//! Comparing documents for `upstream run --check`.

use crate::duration::is_elapsed;
use crate::lines::lines_from;
use crate::markdown::RESULT_START;
use crate::render::STATUS_PREFIX;

/// Reports whether two versions of a document differ in anything but measured durations.
///
/// `upstream run --check` renders a fresh run and compares it with the document on disk:
/// `false` means the document already records what the run produced. A measured duration is
/// the trailing parenthesised duration, such as `(1.4s)`, of a status line directly under a
/// result section's opening marker. Everything else counts, byte for byte: exit codes,
/// states, output, and any text outside result sections. Timings printed by the steps
/// themselves are output and count too.
pub fn results_differ_ignoring_timings(a: &str, b: &str) -> bool {
    mask_timings(a) != mask_timings(b)
}

/// Replaces the measured duration of every status line with `(…)`.
fn mask_timings(document: &str) -> String {
    let mut masked = String::with_capacity(document.len());
    let mut after_start_marker = false;
    for line in lines_from(document, 0) {
        let text = line.text(document);
        let content = text.trim_start_matches([' ', '\t', '>']);
        match timing_start(content).filter(|_| after_start_marker) {
            Some(timing_at) => {
                let keep = text.len() - content.len() + timing_at;
                masked.push_str(&text[..keep]);
                masked.push_str("(…)");
            }
            None => masked.push_str(text),
        }
        masked.push_str(line.ending(document));
        after_start_marker = content.trim_end() == RESULT_START;
    }
    masked
}

/// Returns where the trailing `(duration)` of a status line starts, if it has one.
fn timing_start(content: &str) -> Option<usize> {
    let content = content.trim_end();
    if !content.starts_with(STATUS_PREFIX) {
        return None;
    }
    let open = content.rfind(" (")? + 1;
    let inner = content[open + 1..].strip_suffix(')')?;
    is_elapsed(inner).then_some(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(status: &str, output: &str) -> String {
        format!("```sh\nx\n```\n<!-- upstream:result -->\n**Result:** {status}\n```text\n{output}\n```\n<!-- /upstream:result -->\n")
    }

    #[test]
    fn timings_alone_do_not_count() {
        let a = section("exit 0 (1.4s)", "hello");
        let b = section("exit 0 (2m5s)", "hello");
        assert!(!results_differ_ignoring_timings(&a, &b));
        let a = section("interrupted (0.2s)", "");
        let b = section("interrupted (9.9s)", "");
        assert!(!results_differ_ignoring_timings(&a, &b));
    }

    #[test]
    fn exit_code_counts() {
        let a = section("exit 0 (1.4s)", "hello");
        let b = section("exit 1 (1.4s)", "hello");
        assert!(results_differ_ignoring_timings(&a, &b));
    }

    #[test]
    fn output_counts() {
        let a = section("exit 0 (1.4s)", "hello");
        let b = section("exit 0 (1.4s)", "hallo");
        assert!(results_differ_ignoring_timings(&a, &b));
    }

    #[test]
    fn status_kind_counts() {
        let a = section("timed out after 2m (exit 137)", "");
        let b = section("timed out after 2m (exit 143)", "");
        assert!(results_differ_ignoring_timings(&a, &b));
        let a = section("skipped", "");
        let b = section("not run (an earlier step failed)", "");
        assert!(results_differ_ignoring_timings(&a, &b));
    }

    #[test]
    fn timing_outside_status_line_counts() {
        let a = "**Result:** exit 0 (1.4s)\n";
        let b = "**Result:** exit 0 (1.5s)\n";
        assert!(results_differ_ignoring_timings(a, b));
    }

    #[test]
    fn quoted_status_lines_are_masked() {
        let a = "> <!-- upstream:result -->\n> **Result:** exit 0 (1.4s)\n";
        let b = "> <!-- upstream:result -->\n> **Result:** exit 0 (0.1s)\n";
        assert!(!results_differ_ignoring_timings(a, b));
    }

    #[test]
    fn missing_result_section_counts() {
        let a = "```sh\nx\n```\n";
        let b = section("exit 0 (1.4s)", "hello");
        assert!(results_differ_ignoring_timings(a, &b));
    }
}
