//! Writing results into turn documents: snapshots of the rewritten Markdown and checks that
//! nothing outside result sections changes.

use std::time::Duration;

use insta::assert_snapshot;
use upstream_runbook::{
    parse, render, render_with_options, results_differ_ignoring_timings, RenderOptions, StepReport,
    ELISION_LINE, RESULT_END, RESULT_START,
};

/// Lists the Markdown blocks of `source` that belong to result sections, as pulldown-cmark
/// parses them, one line each, with the nesting depth of the containers around them.
fn section_structure(source: &str) -> Vec<String> {
    use pulldown_cmark::{Event, Parser, Tag, TagEnd};

    let mut structure = Vec::new();
    let mut depth = 0;
    let mut in_section = false;
    for event in Parser::new(source) {
        match event {
            Event::Start(Tag::BlockQuote(_) | Tag::List(_) | Tag::Item) => depth += 1,
            Event::End(TagEnd::BlockQuote(_) | TagEnd::List(_) | TagEnd::Item) => depth -= 1,
            Event::Html(html) if html.trim() == RESULT_START => {
                in_section = true;
                structure.push(format!("{depth} start"));
            }
            Event::Html(html) if html.trim() == RESULT_END => {
                in_section = false;
                structure.push(format!("{depth} end"));
            }
            // Tight lists hide paragraphs, so the bold label stands for the status line.
            Event::Start(Tag::Strong) if in_section => structure.push(format!("{depth} status")),
            Event::Start(Tag::CodeBlock(_)) if in_section => {
                structure.push(format!("{depth} code"))
            }
            _ => {}
        }
    }
    structure
}

fn ran(exit_code: i32, millis: u64, output: &[u8]) -> StepReport {
    StepReport::Ran {
        exit_code,
        duration: Duration::from_millis(millis),
        output: output.to_vec(),
        timed_out: false,
        interrupted: false,
        truncated_bytes: 0,
    }
}

fn run(source: &str, reports: &[StepReport]) -> String {
    let document = parse(source).unwrap();
    render(source, &document, reports)
}

/// Removes each result section and the line ending that joins it to its step, which undoes
/// a first render of a document that had no sections.
fn strip_sections(rendered: &str) -> String {
    let document = parse(rendered).unwrap();
    let mut stripped = String::new();
    let mut copied_up_to = 0;
    for step in &document.steps {
        if let Some(section) = &step.spans.result {
            stripped.push_str(&rendered[copied_up_to..step.spans.block.end]);
            copied_up_to = section.end;
        }
    }
    stripped.push_str(&rendered[copied_up_to..]);
    stripped
}

/// Renders `source`, checks that only sections were added, renders the result again with
/// other timings, and checks that only timings changed. Returns the first rendering.
fn run_twice(source: &str, reports: &[StepReport]) -> String {
    let first = run(source, reports);
    assert_eq!(
        strip_sections(&first),
        source,
        "bytes outside sections changed"
    );

    let again = run(&first, reports);
    assert_eq!(
        again, first,
        "a second run with the same results changed the document"
    );

    let slower: Vec<StepReport> = reports.iter().cloned().map(slow_down).collect();
    let second = run(&first, &slower);
    assert!(!results_differ_ignoring_timings(&first, &second));
    let sections = |text: &str| text.matches(RESULT_START).count();
    assert_eq!(
        sections(&second),
        sections(&first),
        "sections were duplicated"
    );
    first
}

fn slow_down(report: StepReport) -> StepReport {
    match report {
        StepReport::Ran {
            exit_code,
            duration,
            output,
            timed_out,
            interrupted,
            truncated_bytes,
        } => StepReport::Ran {
            exit_code,
            duration: duration * 3 + Duration::from_millis(700),
            output,
            timed_out,
            interrupted,
            truncated_bytes,
        },
        other => other,
    }
}

/// Shows carriage returns, which a snapshot would otherwise hide.
fn visible_returns(text: &str) -> String {
    text.replace('\r', "␍")
}

#[test]
fn two_steps() {
    let source =
        "---\nimage: python:3.12\n---\n\n# Analysis\n\n```bash\npip install pandas\n```\n\n\
                  Then:\n\n```bash {name=analyze}\npython analyze.py\n```\n\nDone.\n";
    let reports = [
        ran(0, 3_100, b"Successfully installed pandas\n"),
        ran(2, 300, b"Found 847 records\nerror: no column `mean`\n"),
    ];
    assert_snapshot!(run_twice(source, &reports));
}

#[test]
fn every_status() {
    let source = "```sh {timeout=2m}\nsleep 999\n```\n```sh\nsleep 5\n```\n```sh {skip}\nls\n```\n\
                  ```sh\nfalse\n```\n```sh\ntrue\n```\n";
    let reports = [
        StepReport::Ran {
            exit_code: 137,
            duration: Duration::from_secs(120),
            output: b"waiting\n".to_vec(),
            timed_out: true,
            interrupted: false,
            truncated_bytes: 0,
        },
        StepReport::Ran {
            exit_code: 130,
            duration: Duration::from_millis(4_000),
            output: Vec::new(),
            timed_out: false,
            interrupted: true,
            truncated_bytes: 0,
        },
        StepReport::Skipped,
        ran(1, 20, b""),
        StepReport::NotRun,
    ];
    let rendered = run_twice(source, &reports);
    assert_snapshot!(rendered);
    let with_output = ["0 start", "0 status", "0 code", "0 end"];
    let without_output = ["0 start", "0 status", "0 end"];
    let expected = [
        &with_output[..],
        &without_output,
        &without_output,
        &without_output,
        &without_output,
    ]
    .concat();
    assert_eq!(section_structure(&rendered), expected);
}

#[test]
fn output_with_backtick_fences() {
    let source = "```bash\ncat README.md\n```\n";
    let output = b"# Readme\n```bash\nmake\n```\n`````\ninline ``code``\n";
    let rendered = run_twice(source, &[ran(0, 100, output)]);
    assert_snapshot!(rendered);
    assert!(rendered.contains("\n``````text\n"), "{rendered}");
    assert_eq!(
        parse(&rendered).unwrap().steps.len(),
        1,
        "output became a step"
    );
}

#[test]
fn output_cannot_close_section_or_inject_html() {
    let source = "```bash\ncat old-report.md\n```\ntail\n";
    let output = format!(
        "{RESULT_END}\n```\n<script>alert(1)</script>\n{RESULT_START}\n**Result:** exit 0 (1.0s)\n"
    );
    let rendered = run_twice(source, &[ran(0, 100, output.as_bytes())]);
    assert_snapshot!(rendered);
    let document = parse(&rendered).unwrap();
    let section = document.steps[0].spans.result.clone().unwrap();
    assert!(rendered[section.end..].starts_with("\ntail"), "{rendered}");
    let structure = ["0 start", "0 status", "0 code", "0 end"];
    assert_eq!(section_structure(&rendered), structure);
}

#[test]
fn crlf_document() {
    let source = "Intro\r\n\r\n```bash\r\necho hi\r\n```\r\nOutro\r\n";
    let rendered = run_twice(source, &[ran(0, 1_400, b"hi\r\nthere\n")]);
    assert_snapshot!(visible_returns(&rendered));
    let lone_feeds = rendered
        .match_indices('\n')
        .filter(|(at, _)| *at == 0 || rendered.as_bytes()[at - 1] != b'\r');
    assert_eq!(lone_feeds.count(), 0, "{rendered:?}");
}

#[test]
fn crlf_without_final_newline() {
    let source = "---\r\nimage: alpine\r\n---\r\n```bash\r\necho hi\r\n```";
    let rendered = run_twice(source, &[ran(0, 10, b"hi\n")]);
    assert!(rendered.ends_with(RESULT_END), "{rendered:?}");
    assert_eq!(
        rendered.matches("\r\n").count(),
        rendered.matches('\n').count()
    );
}

#[test]
fn byte_order_mark_is_kept() {
    let source = "\u{feff}---\nimage: alpine\n---\n```bash\necho hi\n```\n";
    let rendered = run_twice(source, &[ran(0, 10, b"hi\n")]);
    assert!(rendered.starts_with("\u{feff}---\n"), "{rendered:?}");
}

#[test]
fn missing_final_newline_stays_missing() {
    let source = "```bash\necho hi\n```";
    let rendered = run_twice(source, &[ran(0, 10, b"hi\n")]);
    assert!(rendered.ends_with(RESULT_END), "{rendered:?}");
    assert_snapshot!(rendered);
}

#[test]
fn final_newline_stays() {
    let rendered = run_twice("```bash\necho hi\n```\n", &[ran(0, 10, b"hi\n")]);
    assert!(
        rendered.ends_with(&format!("{RESULT_END}\n")),
        "{rendered:?}"
    );
}

#[test]
fn block_in_list_item() {
    let source =
        "1. Build:\n\n   ```bash\n   make\n   ```\n2. Test:\n\n   ```bash\n   make test\n   ```\n";
    let reports = [
        ran(0, 2_000, b"cc main.c\n\nok\n"),
        ran(1, 500, b"1 failed\n"),
    ];
    let rendered = run_twice(source, &reports);
    assert_snapshot!(rendered);
    assert!(
        rendered.contains("\n   **Result:** exit 0 (2.0s)\n"),
        "{rendered}"
    );
    let section = ["2 start", "2 status", "2 code", "2 end"];
    assert_eq!(section_structure(&rendered), [section, section].concat());
}

#[test]
fn block_in_quote() {
    let source = "> Run this:\n>\n> ```bash\n> echo quoted\n> ```\n\nafter\n";
    let rendered = run_twice(source, &[ran(0, 50, b"quoted\n\nsecond\n")]);
    assert_snapshot!(rendered);
    let quoted_lines = rendered.lines().take_while(|line| !line.is_empty());
    assert!(
        quoted_lines.clone().all(|line| line.starts_with('>')),
        "{rendered}"
    );
    assert_eq!(quoted_lines.count(), 13, "{rendered}");
    let section = ["1 start", "1 status", "1 code", "1 end"];
    assert_eq!(section_structure(&rendered), section);
}

#[test]
fn block_in_nested_quote_and_list() {
    let source = "> - item\n>   ```sh\n>   pwd\n>   ```\n";
    let rendered = run_twice(source, &[ran(0, 50, b"/work\n")]);
    assert_snapshot!(rendered);
    let section = ["3 start", "3 status", "3 code", "3 end"];
    assert_eq!(section_structure(&rendered), section);
}

#[test]
fn tilde_fence() {
    let source = "~~~bash\nprintf '```\\n'\n~~~\n";
    assert_snapshot!(run_twice(source, &[ran(0, 10, b"```\n")]));
}

#[test]
fn example_in_longer_fence_gets_no_section() {
    let source = "````markdown\n```bash\necho example\n```\n````\n\n```bash\necho real\n```\n";
    let rendered = run_twice(source, &[ran(0, 10, b"real\n")]);
    assert_snapshot!(rendered);
    assert_eq!(rendered.matches(RESULT_START).count(), 1);
}

#[test]
fn huge_output_keeps_head_and_tail() {
    let source = "```bash\nseq 100000\n```\n";
    let output: String = (1..=100_000).map(|n| format!("{n}\n")).collect();
    let document = parse(source).unwrap();
    let options = RenderOptions {
        head_bytes: 20,
        tail_bytes: 20,
    };
    let rendered = render_with_options(
        source,
        &document,
        &[ran(0, 900, output.as_bytes())],
        &options,
    );
    assert_snapshot!(rendered);
    assert!(
        rendered.contains(&format!("\n{ELISION_LINE}\n")),
        "{rendered}"
    );
}

#[test]
fn huge_output_is_bounded_by_default() {
    let source = "```bash\nyes\n```\n";
    let output = "y\n".repeat(1 << 20);
    let rendered = run_twice(source, &[ran(0, 900, output.as_bytes())]);
    assert!(rendered.len() < 17 * 1024, "{} bytes", rendered.len());
    assert!(rendered.contains("bytes left out.*"), "{rendered}");
}

#[test]
fn executor_truncation_is_noted() {
    let source = "```bash\nyes\n```\n";
    let report = StepReport::Ran {
        exit_code: 0,
        duration: Duration::from_secs(1),
        output: b"y\ny\n".to_vec(),
        timed_out: false,
        interrupted: false,
        truncated_bytes: 5_000,
    };
    let rendered = run_twice(source, &[report]);
    assert!(
        rendered.contains("\n*Output shortened: 5000 of 5004 bytes left out.*\n"),
        "{rendered}"
    );
}

#[test]
fn ansi_codes_and_progress_bars() {
    let source = "```bash\n./build.sh\n```\n";
    let output = b"\x1b[1;32mCompiling\x1b[0m upstream\n\
                   [=>   ] 10%\r[===> ] 60%\r[=====] 100%\n\
                   \x1b]0;window title\x07\x1b[2Kdone\r\n";
    let rendered = run_twice(source, &[ran(0, 5_000, output)]);
    assert_snapshot!(rendered);
    assert_eq!(
        section_structure(&rendered),
        ["0 start", "0 status", "0 code", "0 end"]
    );
}

#[test]
fn binary_output_is_shown_safely() {
    let source = "```bash\nhead -c 64 /bin/true\n```\n";
    let output = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00\x01\x00\x00\x00\xe0\x1b\x00\x00\x08\x0c\x1b\x9b\x1b[31m\n";
    let rendered = run_twice(source, &[ran(0, 10, output)]);
    assert_snapshot!(rendered);
    let controls = rendered.chars().filter(|c| c.is_control() && *c != '\n');
    assert_eq!(controls.count(), 0, "{rendered:?}");
}

#[test]
fn heredoc_step() {
    let source = "```bash\ncat <<'EOF'\n# not a heading\n<!-- not a comment -->\nEOF\n```\n";
    let output = b"# not a heading\n<!-- not a comment -->\n";
    assert_snapshot!(run_twice(source, &[ran(0, 10, output)]));
}

#[test]
fn document_without_steps_is_unchanged() {
    for source in [
        "",
        "\n",
        "# Notes\r\n\r\nNo code.",
        "```python\nprint(1)\n```\n",
    ] {
        assert_eq!(run(source, &[]), source);
        assert_eq!(run(source, &[ran(0, 1, b"x")]), source);
    }
}

#[test]
fn pending_keeps_old_section() {
    let source = "```sh\na\n```\n\n```sh\nb\n```\n";
    let first = run(source, &[ran(0, 10, b"a\n"), ran(0, 10, b"b\n")]);
    let second = run(&first, &[ran(1, 10, b"A\n"), StepReport::Pending]);
    assert_snapshot!(second);
    assert!(second.contains("exit 1"), "{second}");
    assert!(second.contains("\nb\n"), "{second}");
}

#[test]
fn pending_without_section_writes_nothing() {
    let source = "```sh\na\n```\n";
    assert_eq!(run(source, &[StepReport::Pending]), source);
}

#[test]
fn missing_reports_count_as_pending() {
    let source = "```sh\na\n```\n```sh\nb\n```\n";
    let rendered = run(source, &[ran(0, 10, b"")]);
    assert_eq!(rendered.matches(RESULT_START).count(), 1);
}

#[test]
fn rerun_replaces_section_after_blank_line() {
    let source = "```sh\necho\n```\n\n<!-- upstream:result -->\n**Result:** exit 9 (1.0s)\n\
                  <!-- /upstream:result -->\n\nnext\n";
    let rendered = run(source, &[ran(0, 100, b"fresh\n")]);
    assert_snapshot!(rendered);
    assert_eq!(rendered.matches(RESULT_START).count(), 1);
}

#[test]
fn edited_section_is_replaced() {
    let source = "```sh\necho\n```\n<!-- upstream:result -->\n**Result:** exit 0 (1.0s)\n\
                  I added a note here.\n```text\nedited output\n```\n<!-- /upstream:result -->\n";
    let rendered = run(source, &[ran(0, 100, b"fresh\n")]);
    assert!(!rendered.contains("edited output"), "{rendered}");
    assert_eq!(rendered.matches(RESULT_START).count(), 1);
}

#[test]
fn section_without_end_marker_keeps_user_text() {
    let source = "```sh\necho\n```\n<!-- upstream:result -->\n**Result:** exit 0 (1.0s)\n\n\
                  ## My notes\n\nImportant text.\n";
    let rendered = run_twice(source, &[ran(0, 100, b"fresh\n")]);
    assert_snapshot!(rendered);
    assert!(
        rendered.ends_with("## My notes\n\nImportant text.\n"),
        "{rendered}"
    );
}

#[test]
fn section_reaching_next_step_keeps_user_text() {
    let source = "```sh\none\n```\n<!-- upstream:result -->\ntext\n\n```sh\ntwo\n```\n\
                  <!-- /upstream:result -->\n";
    let document = parse(source).unwrap();
    assert_eq!(document.steps[0].spans.result, None);
    assert_eq!(document.steps[1].spans.result, None);
    let rendered = run(source, &[ran(0, 1, b"1\n"), ran(0, 1, b"2\n")]);
    assert_eq!(rendered.matches("\ntext\n").count(), 1, "{rendered}");
    assert_snapshot!(rendered);
}

#[test]
fn section_outside_quote_is_not_taken() {
    let source = "> ```sh\n> echo\n> ```\n\n<!-- upstream:result -->\n<!-- /upstream:result -->\n";
    let document = parse(source).unwrap();
    assert_eq!(document.steps[0].spans.result, None);
}

#[test]
fn check_detects_changed_results() {
    let source = "```sh\ndate\n```\n";
    let first = run(source, &[ran(0, 100, b"Mon\n")]);
    let same = run(&first, &[ran(0, 900, b"Mon\n")]);
    let changed = run(&first, &[ran(0, 100, b"Tue\n")]);
    assert!(!results_differ_ignoring_timings(&first, &same));
    assert!(results_differ_ignoring_timings(&first, &changed));
    assert!(results_differ_ignoring_timings(source, &first));
}
