//! Turning a step's raw output into text that is safe inside a fenced code block.
//!
//! The output of a step is arbitrary bytes from an untrusted guest. What reaches the
//! document is valid UTF-8 without terminal escape sequences, carriage returns or other
//! control characters, so it can neither break out of its fence nor disturb a terminal or
//! editor showing the document.

/// Line that stands for the bytes left out between the head and the tail of long output.
pub const ELISION_LINE: &str = "[...]";

/// Output prepared for a result section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShownOutput {
    /// Lines of output, without line endings. Empty when there was no visible output.
    pub lines: Vec<String>,
    /// Bytes of raw output not shown, counting those the executor dropped.
    pub omitted_bytes: u64,
}

/// Prepares raw output for display, keeping at most `head` bytes from its start and `tail`
/// bytes from its end. `dropped` counts bytes the executor already left out.
pub(crate) fn prepare(raw: &[u8], head: usize, tail: usize, dropped: u64) -> ShownOutput {
    let Some((head_end, tail_start)) = cut_points(raw, head, tail) else {
        return ShownOutput {
            lines: text_lines(raw),
            omitted_bytes: dropped,
        };
    };
    let mut lines = text_lines(&raw[..head_end]);
    lines.push(ELISION_LINE.to_owned());
    lines.extend(text_lines(&raw[tail_start..]));
    let cut = u64::try_from(tail_start - head_end).unwrap_or(u64::MAX);
    ShownOutput {
        lines,
        omitted_bytes: dropped.saturating_add(cut),
    }
}

/// Chooses where to cut output longer than `head + tail` bytes.
///
/// Cuts fall on line boundaries when one is near, so that no line, UTF-8 sequence or escape
/// sequence is split. Otherwise they fall on UTF-8 character boundaries.
fn cut_points(raw: &[u8], head: usize, tail: usize) -> Option<(usize, usize)> {
    if raw.len() <= head.saturating_add(tail) {
        return None;
    }
    let head_window = &raw[head / 2..head];
    let head_end = match head_window.iter().rposition(|&byte| byte == b'\n') {
        Some(index) => head / 2 + index + 1,
        None => char_boundary_at_or_before(raw, head),
    };
    let tail_from = raw.len() - tail;
    let tail_window = &raw[tail_from..tail_from + tail / 2];
    let tail_start = match tail_window.iter().position(|&byte| byte == b'\n') {
        Some(index) => tail_from + index + 1,
        None => char_boundary_at_or_after(raw, tail_from),
    };
    Some((head_end, tail_start))
}

fn is_continuation_byte(byte: u8) -> bool {
    byte & 0b1100_0000 == 0b1000_0000
}

fn char_boundary_at_or_before(raw: &[u8], mut index: usize) -> usize {
    // A UTF-8 sequence has at most three continuation bytes.
    for _ in 0..3 {
        if index == 0 || index >= raw.len() || !is_continuation_byte(raw[index]) {
            break;
        }
        index -= 1;
    }
    index
}

fn char_boundary_at_or_after(raw: &[u8], mut index: usize) -> usize {
    for _ in 0..3 {
        if index >= raw.len() || !is_continuation_byte(raw[index]) {
            break;
        }
        index += 1;
    }
    index
}

/// Decodes output into display lines, dropping trailing blank lines.
fn text_lines(raw: &[u8]) -> Vec<String> {
    let without_escapes = strip_escape_sequences(raw);
    let text = String::from_utf8_lossy(&without_escapes);
    let mut lines: Vec<String> = text
        .split('\n')
        .map(|line| replace_controls(last_version(line)))
        .collect();
    while lines.last().is_some_and(|line| line.trim().is_empty()) {
        lines.pop();
    }
    lines
}

/// Returns what a terminal would end up showing for one line: a carriage return moves back
/// to the start of the line, and progress bars use it to redraw. The last non-empty version
/// wins, which is also what `\r\n` line endings leave.
fn last_version(line: &str) -> &str {
    line.rsplit('\r')
        .find(|version| !version.is_empty())
        .unwrap_or("")
}

/// Replaces control characters other than tab with visible stand-ins.
///
/// C0 controls become their Unicode control pictures (`␇` for BEL), DEL becomes `␡`, and C1
/// controls and bidirectional overrides, which can reorder the displayed text, become `�`.
fn replace_controls(line: &str) -> String {
    line.chars()
        .map(|c| match c {
            '\t' => c,
            '\0'..='\u{1f}' => char::from_u32(0x2400 + u32::from(c)).unwrap_or('\u{fffd}'),
            '\u{7f}' => '\u{2421}',
            '\u{80}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => '\u{fffd}',
            _ => c,
        })
        .collect()
}

/// States of the escape sequence scanner.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EscapeState {
    None,
    /// After ESC.
    Start,
    /// In `ESC [ ...`, a control sequence such as a colour.
    Control,
    /// In `ESC ] ...` and the other string sequences, such as a window title.
    String,
    /// ESC inside a string sequence, normally the start of its terminator `ESC \`.
    InStringEscape,
    /// In `ESC` followed by intermediate bytes, such as a character set selection.
    Intermediate,
}

/// Removes ANSI escape sequences: colours, cursor movement, titles and hyperlinks.
///
/// A line feed always ends a sequence, so a stray ESC can hide at most the rest of its line.
fn strip_escape_sequences(raw: &[u8]) -> Vec<u8> {
    let mut visible = Vec::with_capacity(raw.len());
    let mut state = EscapeState::None;
    for &byte in raw {
        state = match (state, byte) {
            (_, b'\n') => {
                visible.push(byte);
                EscapeState::None
            }
            (EscapeState::None, 0x1b) => EscapeState::Start,
            (EscapeState::None, _) => {
                visible.push(byte);
                EscapeState::None
            }
            (EscapeState::Start, b'[') => EscapeState::Control,
            (EscapeState::Start, b']' | b'P' | b'X' | b'^' | b'_') => EscapeState::String,
            (EscapeState::Start, 0x1b) => EscapeState::Start,
            (EscapeState::Start | EscapeState::Intermediate, 0x20..=0x2f) => {
                EscapeState::Intermediate
            }
            (EscapeState::Control, 0x20..=0x3f) => EscapeState::Control,
            (EscapeState::String, 0x07) | (EscapeState::InStringEscape, _) => EscapeState::None,
            (EscapeState::String, 0x1b) => EscapeState::InStringEscape,
            (EscapeState::String, _) => EscapeState::String,
            // A final byte ends the sequence; anything else means it was malformed.
            _ => EscapeState::None,
        };
    }
    visible
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(raw: &[u8]) -> Vec<String> {
        prepare(raw, 1024, 1024, 0).lines
    }

    #[test]
    fn prepare_splits_lines_and_drops_trailing_blank() {
        assert_eq!(shown(b"a\nb\n\n\n"), ["a", "b"]);
        assert!(shown(b"").is_empty());
        assert!(shown(b"\n \n").is_empty());
    }

    #[test]
    fn prepare_keeps_leading_blank_lines_and_tabs() {
        assert_eq!(shown(b"\n\tindented\n"), ["", "\tindented"]);
    }

    #[test]
    fn prepare_turns_crlf_into_lines() {
        assert_eq!(shown(b"one\r\ntwo\r\n"), ["one", "two"]);
    }

    #[test]
    fn prepare_keeps_last_progress_version() {
        assert_eq!(shown(b"10%\r50%\r100%\ndone\n"), ["100%", "done"]);
        assert_eq!(shown(b"finished\r"), ["finished"]);
        assert_eq!(shown(b"long line\rshort\n"), ["short"]);
    }

    #[test]
    fn prepare_strips_colour_and_cursor_codes() {
        assert_eq!(shown(b"\x1b[1;31mred\x1b[0m plain\x1b[K\n"), ["red plain"]);
        assert_eq!(
            shown(b"\x1b[?25lhidden cursor\x1b[?25h\n"),
            ["hidden cursor"]
        );
    }

    #[test]
    fn prepare_strips_title_and_hyperlink_sequences() {
        assert_eq!(shown(b"\x1b]0;title\x07text\n"), ["text"]);
        let link = b"\x1b]8;;https://example.test\x1b\\label\x1b]8;;\x1b\\\n";
        assert_eq!(shown(link), ["label"]);
        assert_eq!(shown(b"\x1b(Bcharset\n"), ["charset"]);
    }

    #[test]
    fn prepare_limits_unterminated_sequence_to_its_line() {
        assert_eq!(shown(b"a\x1b]never ends\nnext\n"), ["a", "next"]);
    }

    #[test]
    fn prepare_replaces_controls() {
        assert_eq!(
            shown(b"bell\x07 nul\x00 del\x7f\n"),
            ["bell\u{2407} nul\u{2400} del\u{2421}"]
        );
        assert_eq!(
            shown("c1\u{85} rtl\u{202e}x".as_bytes()),
            ["c1\u{fffd} rtl\u{fffd}x"]
        );
    }

    #[test]
    fn prepare_decodes_invalid_utf8_lossily() {
        assert_eq!(shown(b"ok \xff\xfe end\n"), ["ok \u{fffd}\u{fffd} end"]);
    }

    #[test]
    fn prepare_cuts_long_output_at_lines() {
        let raw: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        let output = prepare(raw.as_bytes(), 50, 50, 0);
        assert_eq!(output.lines.first().map(String::as_str), Some("line 000"));
        assert_eq!(output.lines.last().map(String::as_str), Some("line 099"));
        assert!(output.lines.contains(&ELISION_LINE.to_owned()));
        let shown_bytes: usize = output
            .lines
            .iter()
            .filter(|line| *line != ELISION_LINE)
            .map(|line| line.len() + 1)
            .sum();
        assert_eq!(output.omitted_bytes, (raw.len() - shown_bytes) as u64);
        assert!(shown_bytes <= 100);
    }

    #[test]
    fn prepare_cuts_long_line_on_char_boundary() {
        let raw = "é".repeat(100);
        let output = prepare(raw.as_bytes(), 11, 11, 0);
        assert_eq!(output.lines.len(), 3);
        assert!(!output.lines.iter().any(|line| line.contains('\u{fffd}')));
        assert_eq!(output.lines[0], "é".repeat(5));
    }

    #[test]
    fn prepare_adds_executor_dropped_bytes() {
        assert_eq!(prepare(b"short\n", 8, 8, 1000).omitted_bytes, 1000);
        assert_eq!(prepare(b"0123456789abcdef", 4, 4, 1000).omitted_bytes, 1008);
    }

    #[test]
    fn prepare_with_zero_bounds_shows_only_elision() {
        let output = prepare(b"some output\n", 0, 0, 0);
        assert_eq!(output.lines, [ELISION_LINE]);
        assert_eq!(output.omitted_bytes, 12);
    }
}
