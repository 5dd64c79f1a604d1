//! Line positions in a document, with CommonMark's line endings: `\n`, `\r\n` and a lone `\r`.

/// One line of a document: `start..end` is its text and `end..next` its line ending, which
/// is empty on a last line without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line {
    pub start: usize,
    pub end: usize,
    pub next: usize,
}

impl Line {
    pub fn text(self, source: &str) -> &str {
        &source[self.start..self.end]
    }

    pub fn ending(self, source: &str) -> &str {
        &source[self.end..self.next]
    }
}

/// Returns the line that starts at `start`, or `None` at the end of the document.
pub(crate) fn line_starting_at(source: &str, start: usize) -> Option<Line> {
    if start >= source.len() {
        return None;
    }
    let rest = &source.as_bytes()[start..];
    let Some(length) = rest.iter().position(|&byte| byte == b'\n' || byte == b'\r') else {
        return Some(Line {
            start,
            end: source.len(),
            next: source.len(),
        });
    };
    let end = start + length;
    let ending_length = if source[end..].starts_with("\r\n") {
        2
    } else {
        1
    };
    Some(Line {
        start,
        end,
        next: end + ending_length,
    })
}

/// Iterates over the lines from `start`, which must be the start of a line.
pub(crate) fn lines_from(source: &str, start: usize) -> impl Iterator<Item = Line> + '_ {
    std::iter::successors(line_starting_at(source, start), |line| {
        line_starting_at(source, line.next)
    })
}

/// Returns the line that contains byte `offset`, which must not be inside a line ending.
pub(crate) fn line_containing(source: &str, offset: usize) -> Line {
    let start = source[..offset]
        .rfind(['\n', '\r'])
        .map_or(0, |index| index + 1);
    line_starting_at(source, start).unwrap_or(Line {
        start,
        end: start,
        next: start,
    })
}

/// Returns the 1-based line number of byte `offset`.
#[cfg(test)]
pub(crate) fn line_number(source: &str, offset: usize) -> usize {
    LineCounter::new(source).line_of(offset)
}

/// Line numbers of increasing offsets, counted in one pass over the document.
pub(crate) struct LineCounter<'a> {
    source: &'a str,
    counted_up_to: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    pub fn new(source: &'a str) -> Self {
        Self {
            source,
            counted_up_to: 0,
            line: 1,
        }
    }

    /// Returns the 1-based line number of byte `offset`, which must not be smaller than the
    /// offset of the previous call.
    pub fn line_of(&mut self, offset: usize) -> usize {
        let bytes = self.source.as_bytes();
        for index in self.counted_up_to..offset {
            // `\r\n` counts once, at its `\n`.
            let lone_return = bytes[index] == b'\r' && bytes.get(index + 1) != Some(&b'\n');
            if bytes[index] == b'\n' || lone_return {
                self.line += 1;
            }
        }
        self.counted_up_to = self.counted_up_to.max(offset);
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_splits_every_ending() {
        let source = "a\nb\r\nc\rd";
        let texts: Vec<_> = lines_from(source, 0)
            .map(|line| line.text(source))
            .collect();
        let endings: Vec<_> = lines_from(source, 0)
            .map(|line| line.ending(source))
            .collect();
        assert_eq!(texts, ["a", "b", "c", "d"]);
        assert_eq!(endings, ["\n", "\r\n", "\r", ""]);
    }

    #[test]
    fn lines_from_keeps_empty_lines() {
        let source = "\n\nx\n";
        let texts: Vec<_> = lines_from(source, 0)
            .map(|line| line.text(source))
            .collect();
        assert_eq!(texts, ["", "", "x"]);
    }

    #[test]
    fn line_containing_finds_bounds() {
        let source = "one\r\ntwo\r\n";
        let line = line_containing(source, 6);
        assert_eq!(line.text(source), "two");
        assert_eq!(line.ending(source), "\r\n");
    }

    #[test]
    fn line_number_counts_crlf_once() {
        let source = "a\r\nb\rc\nd";
        assert_eq!(line_number(source, 0), 1);
        assert_eq!(line_number(source, 3), 2);
        assert_eq!(line_number(source, 5), 3);
        assert_eq!(line_number(source, 7), 4);
    }
}
