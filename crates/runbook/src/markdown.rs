//! Fenced code blocks and result sections, found with CommonMark's block structure.
//!
//! pulldown-cmark decides which lines form a fenced code block, so containers (lists, block
//! quotes), indented code and unclosed fences follow CommonMark. The lines around a block
//! are then read byte for byte, because rewriting must keep every other byte as it is.

use std::ops::Range;

use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

use crate::lines::{line_containing, lines_from, Line};

/// Line that opens a result section.
pub const RESULT_START: &str = "<!-- upstream:result -->";

/// Line that closes a result section.
pub const RESULT_END: &str = "<!-- /upstream:result -->";

/// A fenced code block of the document.
pub(crate) struct FencedBlock {
    /// Info string, with backslash escapes and entities resolved.
    pub info: String,
    /// From the opening fence to the end of the block's last line, as pulldown-cmark reports
    /// it: a closed block ends after its closing fence, before the line ending.
    pub span: Range<usize>,
    /// Content with container prefixes and fence indentation removed, lines ending in `\n`.
    pub code: String,
}

/// Lists the fenced code blocks of the Markdown that starts at byte `body_start`.
pub(crate) fn fenced_blocks(source: &str, body_start: usize) -> Vec<FencedBlock> {
    let body = &source[body_start..];
    let mut blocks = Vec::new();
    let mut current: Option<FencedBlock> = None;
    for (event, range) in Parser::new_ext(body, Options::empty()).into_offset_iter() {
        match event {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(info))) => {
                current = Some(FencedBlock {
                    info: info.into_string(),
                    span: body_start + range.start..body_start + range.end,
                    code: String::new(),
                });
            }
            Event::Text(text) => {
                if let Some(block) = &mut current {
                    block.code.push_str(&text);
                }
            }
            Event::End(TagEnd::CodeBlock) => blocks.extend(current.take()),
            _ => {}
        }
    }
    blocks
}

/// A fence: its character (`` ` `` or `~`) and how many of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fence {
    pub char: u8,
    pub length: usize,
}

impl Fence {
    /// Reads the fence at the start of `text`.
    fn at_start_of(text: &str) -> Option<Fence> {
        let char = *text
            .as_bytes()
            .first()
            .filter(|c| matches!(c, b'`' | b'~'))?;
        let length = text.bytes().take_while(|&byte| byte == char).count();
        (length >= 3).then_some(Fence { char, length })
    }

    /// Formats the fence as a line of text would show it.
    pub fn text(self) -> String {
        char::from(self.char).to_string().repeat(self.length)
    }

    /// Reports whether `text`, with containers already removed, closes this fence.
    fn is_closed_by(self, text: &str) -> bool {
        let indent = text.len() - text.trim_start_matches(' ').len();
        let rest = &text[indent..];
        let run = rest.bytes().take_while(|&byte| byte == self.char).count();
        indent <= 3 && run >= self.length && rest[run..].trim().is_empty()
    }
}

/// Fence, closing line and container prefix of a fenced block.
pub(crate) struct BlockLines {
    pub fence: Fence,
    /// The line of the closing fence, or `None` when the block runs to the end of its
    /// container or of the document.
    pub closing: Option<Line>,
    /// Bytes before the fence on the closing line: block quote markers and indentation.
    /// Result section lines start with the same bytes so that they stay in the container.
    pub prefix: String,
}

/// Finds the opening and closing lines of `block`.
pub(crate) fn block_lines(source: &str, block: &FencedBlock) -> BlockLines {
    let opening = line_containing(source, block.span.start);
    let fence_start = block.span.start + source[block.span.start..].find(['`', '~']).unwrap_or(0);
    let fence = Fence::at_start_of(&source[fence_start..]).unwrap_or(Fence {
        char: b'`',
        length: 3,
    });
    let opening_prefix = &source[opening.start..fence_start];
    let closing = closing_line(source, block, opening, fence, opening_prefix);
    let prefix = closing.map_or_else(String::new, |line| {
        let text = line.text(source);
        let fence_at = text.find(char::from(fence.char)).unwrap_or(0);
        text[..fence_at].to_owned()
    });
    BlockLines {
        fence,
        closing,
        prefix,
    }
}

/// Returns the last line of `block` if it is a closing fence in the same containers as the
/// opening one.
fn closing_line(
    source: &str,
    block: &FencedBlock,
    opening: Line,
    fence: Fence,
    opening_prefix: &str,
) -> Option<Line> {
    // pulldown-cmark ends an unclosed block after the line ending of its last line.
    let span_text = &source[block.span.clone()];
    if span_text.ends_with(['\n', '\r']) {
        return None;
    }
    let last = line_containing(source, block.span.end - 1);
    if last.start == opening.start {
        return None;
    }

    let text = last.text(source).trim_end_matches([' ', '\t']);
    let run = text
        .bytes()
        .rev()
        .take_while(|&byte| byte == fence.char)
        .count();
    let prefix = &text[..text.len() - run];
    let only_containers = prefix
        .bytes()
        .all(|byte| matches!(byte, b' ' | b'\t' | b'>'));
    let quote_depth = |text: &str| text.bytes().filter(|&byte| byte == b'>').count();
    let same_depth = quote_depth(prefix) == quote_depth(opening_prefix);
    (run >= fence.length && only_containers && same_depth).then_some(last)
}

/// Removes the container prefix from a line. A blank line inside the containers counts as
/// carrying it. Returns `None` for a line outside the containers.
pub(crate) fn strip_prefix<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    if let Some(rest) = text.strip_prefix(prefix) {
        return Some(rest);
    }
    (text.trim_end() == prefix.trim_end()).then_some("")
}

/// Finds the result section under the step block whose closing fence line is `closing`.
///
/// The section may follow after blank lines. It must start with a [`RESULT_START`] line and
/// end with a [`RESULT_END`] line outside any fence, every line carrying `prefix`, before
/// byte `limit` (the next step). Anything else is not taken for a result section, so that
/// rewriting never replaces text the user wrote. The returned span runs from the start of
/// the first line to the end of the last one, line ending excluded.
pub(crate) fn find_result_section(
    source: &str,
    closing: Line,
    prefix: &str,
    limit: usize,
) -> Option<Range<usize>> {
    let mut lines = lines_from(source, closing.next).take_while(|line| line.start < limit);
    let start = lines
        .by_ref()
        .map(|line| (line, strip_prefix(line.text(source), prefix)))
        .find(|(_, text)| text.is_none_or(|text| !text.trim().is_empty()))?;
    if start.1.map(str::trim) != Some(RESULT_START) {
        return None;
    }

    let mut open_fence: Option<Fence> = None;
    for line in lines {
        let text = strip_prefix(line.text(source), prefix)?;
        if let Some(fence) = open_fence {
            if fence.is_closed_by(text) {
                open_fence = None;
            }
            continue;
        }
        match text.trim() {
            RESULT_END => return Some(start.0.start..line.end),
            RESULT_START => return None,
            _ => open_fence = opening_fence(text),
        }
    }
    None
}

/// Reads a line, containers removed, that opens a fenced code block.
fn opening_fence(text: &str) -> Option<Fence> {
    let indent = text.len() - text.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let fence = Fence::at_start_of(&text[indent..])?;
    // CommonMark: a backtick fence's info string contains no backtick.
    let info = &text[indent + fence.length..];
    (fence.char == b'~' || !info.contains('`')).then_some(fence)
}

/// Returns the line ending that new lines written after `line` should use: that line's own,
/// or else the first one in the document, or else `\n`.
pub(crate) fn line_ending_after(source: &str, line: Line) -> &str {
    let own = line.ending(source);
    if !own.is_empty() {
        return own;
    }
    lines_from(source, 0)
        .map(|line| line.ending(source))
        .find(|ending| !ending.is_empty())
        .unwrap_or("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_block(source: &str) -> (FencedBlock, BlockLines) {
        let mut blocks = fenced_blocks(source, 0);
        assert_eq!(blocks.len(), 1, "{source:?}");
        let block = blocks.remove(0);
        let lines = block_lines(source, &block);
        (block, lines)
    }

    #[test]
    fn block_lines_finds_closing_fence_in_quote() {
        let source = "> ```sh\n> echo q\n>\n> ```\n";
        let (block, lines) = only_block(source);
        assert_eq!(block.code, "echo q\n\n");
        assert_eq!(lines.closing.map(|line| line.text(source)), Some("> ```"));
        assert_eq!(lines.prefix, "> ");
    }

    #[test]
    fn block_lines_finds_list_indentation() {
        let source = "1. ```bash\n   echo\n   ```";
        let (block, lines) = only_block(source);
        assert_eq!(block.code, "echo\n");
        assert_eq!(lines.prefix, "   ");
    }

    #[test]
    fn block_lines_reports_unclosed_block() {
        for source in [
            "```bash\necho x\n",
            "```bash\necho x",
            "> ```sh\n> echo\nlazy\n",
        ] {
            let block = fenced_blocks(source, 0).remove(0);
            assert!(block_lines(source, &block).closing.is_none(), "{source:?}");
        }
    }

    #[test]
    fn block_lines_rejects_quote_marker_inside_code() {
        // The last line is code that looks like a closing fence in a block quote.
        let source = "```bash\n> ```";
        let block = fenced_blocks(source, 0).remove(0);
        assert!(block_lines(source, &block).closing.is_none());
    }

    #[test]
    fn block_lines_accepts_longer_closing_fence() {
        let source = "~~~bash\necho\n~~~~~  \n";
        let (_, lines) = only_block(source);
        assert_eq!(
            lines.fence,
            Fence {
                char: b'~',
                length: 3
            }
        );
        assert!(lines.closing.is_some());
    }

    #[test]
    fn strip_prefix_treats_blank_quote_line_as_inside() {
        assert_eq!(strip_prefix("> x", "> "), Some("x"));
        assert_eq!(strip_prefix(">", "> "), Some(""));
        assert_eq!(strip_prefix("x", "> "), None);
    }

    fn section(source: &str) -> Option<&str> {
        let block = fenced_blocks(source, 0).remove(0);
        let lines = block_lines(source, &block);
        let range = find_result_section(source, lines.closing?, &lines.prefix, source.len())?;
        Some(&source[range])
    }

    #[test]
    fn find_result_section_spans_markers() {
        let source = "```sh\nx\n```\n\n<!-- upstream:result -->\n**Result:** exit 0 (0.1s)\n\
                      <!-- /upstream:result -->\nafter\n";
        let found = section(source).unwrap();
        assert!(found.starts_with(RESULT_START));
        assert!(found.ends_with(RESULT_END));
    }

    #[test]
    fn find_result_section_skips_end_marker_in_fence() {
        let source = "```sh\nx\n```\n<!-- upstream:result -->\n````text\n\
                      <!-- /upstream:result -->\n````\n<!-- /upstream:result -->\n";
        let found = section(source).unwrap();
        assert!(
            found.ends_with("````\n<!-- /upstream:result -->"),
            "{found:?}"
        );
    }

    #[test]
    fn find_result_section_rejects_unterminated() {
        let source = "```sh\nx\n```\n<!-- upstream:result -->\nuser text\n";
        assert_eq!(section(source), None);
    }

    #[test]
    fn find_result_section_rejects_text_before_marker() {
        let source = "```sh\nx\n```\nprose\n<!-- upstream:result -->\n<!-- /upstream:result -->\n";
        assert_eq!(section(source), None);
    }

    #[test]
    fn find_result_section_rejects_second_start() {
        let source = "```sh\nx\n```\n<!-- upstream:result -->\n<!-- upstream:result -->\n\
                      <!-- /upstream:result -->\n";
        assert_eq!(section(source), None);
    }

    #[test]
    fn find_result_section_stops_at_container_end() {
        let source = "> ```sh\n> x\n> ```\n> <!-- upstream:result -->\n\n\
                      <!-- /upstream:result -->\n";
        assert_eq!(section(source), None);
    }

    #[test]
    fn line_ending_after_prefers_own_then_first() {
        let source = "a\r\nb";
        let last = line_containing(source, 3);
        assert_eq!(line_ending_after(source, last), "\r\n");
        assert_eq!(line_ending_after("solo", line_containing("solo", 0)), "\n");
    }
}
