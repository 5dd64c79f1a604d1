//! Parsing turn documents: which blocks are steps, what their code is, and the errors.

use std::time::Duration;

use upstream_runbook::{parse, truncate_label, Document, ParseError};

fn steps_code(source: &str) -> Vec<String> {
    parse(source)
        .unwrap()
        .steps
        .into_iter()
        .map(|step| step.code)
        .collect()
}

#[test]
fn steps_follow_document_order() {
    let source = "# Demo\n\n```bash\necho one\n```\n\n```python\nprint(2)\n```\n\n\
                  ```sh\necho three\n```\n\n```shell\necho four\n```\n";
    let document = parse(source).unwrap();
    let codes: Vec<_> = document
        .steps
        .iter()
        .map(|step| step.code.as_str())
        .collect();
    assert_eq!(codes, ["echo one\n", "echo three\n", "echo four\n"]);
    let indexes: Vec<_> = document.steps.iter().map(|step| step.index).collect();
    assert_eq!(indexes, [0, 1, 2]);
    let languages: Vec<_> = document
        .steps
        .iter()
        .map(|step| step.language.as_str())
        .collect();
    assert_eq!(languages, ["bash", "sh", "shell"]);
}

#[test]
fn step_lines_count_front_matter() {
    let source = "---\nimage: alpine\n---\n\n```bash\ntrue\n```\n";
    assert_eq!(parse(source).unwrap().steps[0].line, 5);
}

#[test]
fn empty_document_has_no_steps() {
    let document = parse("").unwrap();
    assert!(document.steps.is_empty());
    assert_eq!(document.front_matter_span, None);
}

#[test]
fn prose_only_document_has_no_steps() {
    assert!(parse("# Notes\n\nNothing to run.\n")
        .unwrap()
        .steps
        .is_empty());
}

#[test]
fn bash_example_inside_longer_fence_is_not_step() {
    let source = "````markdown\n```bash\nrm -rf /\n```\n````\n\n```bash\necho real\n```\n";
    assert_eq!(steps_code(source), ["echo real\n"]);
}

#[test]
fn bash_example_inside_tilde_fence_is_not_step() {
    let source = "~~~\n```bash\nrm -rf /\n```\n~~~\n";
    assert!(steps_code(source).is_empty());
}

#[test]
fn indented_code_is_not_step() {
    let source = "Example:\n\n    ```bash\n    rm -rf /\n    ```\n";
    assert!(steps_code(source).is_empty());
}

#[test]
fn fence_inside_html_block_is_not_step() {
    let source = "<details>\n```bash\nrm -rf /\n```\n</details>\n";
    assert!(steps_code(source).is_empty());
}

#[test]
fn unclosed_other_fence_swallows_later_blocks() {
    let source = "```text\nnot closed\n\n```bash\necho inside text\n";
    assert!(steps_code(source).is_empty());
}

#[test]
fn tilde_fence_is_step() {
    let source = "~~~bash\necho ```\n~~~\n";
    assert_eq!(steps_code(source), ["echo ```\n"]);
}

#[test]
fn code_in_list_loses_item_indentation() {
    let source = "1. Install:\n\n   ```bash\n   apt-get update\n     && true\n   ```\n";
    assert_eq!(steps_code(source), ["apt-get update\n  && true\n"]);
}

#[test]
fn code_in_quote_loses_markers() {
    let source = "> ```bash\n> echo quoted\n>\n> echo after blank\n> ```\n";
    assert_eq!(steps_code(source), ["echo quoted\n\necho after blank\n"]);
}

#[test]
fn code_of_indented_fence_loses_fence_indentation() {
    let source = "  ```bash\n  echo a\n    echo b\n echo c\n  ```\n";
    assert_eq!(steps_code(source), ["echo a\n  echo b\necho c\n"]);
}

#[test]
fn code_of_crlf_document_uses_line_feeds() {
    let source = "```bash\r\necho one\r\necho two\r\n```\r\n";
    assert_eq!(steps_code(source), ["echo one\necho two\n"]);
}

#[test]
fn heredoc_reaches_shell_unchanged() {
    let body = "cat <<'EOF' > config.ini\n[main]\nkey = \"value with $dollar\"\n\
                EOF\ncat <<-TABS\n\tindented\n\tTABS\n";
    let source = format!("```bash\n{body}```\n");
    assert_eq!(steps_code(&source), [body]);
}

#[test]
fn lone_carriage_return_is_rejected() {
    let source = "one\r\ntwo\rthree\n```bash\recho one\r```\r";
    assert_eq!(
        parse(source).unwrap_err(),
        ParseError::LoneCarriageReturn { line: 2 }
    );
}

#[test]
fn front_matter_without_body() {
    let document = parse("---\nimage: alpine\n---").unwrap();
    assert_eq!(document.front_matter.image.as_deref(), Some("alpine"));
    assert!(document.steps.is_empty());
}

#[test]
fn options_are_read_from_info_string() {
    let source = "```bash {name=install timeout=2m continue-on-error=true skip=true}\ntrue\n```\n";
    let step = &parse(source).unwrap().steps[0];
    assert_eq!(step.options.name.as_deref(), Some("install"));
    assert_eq!(step.options.timeout, Some(Duration::from_secs(120)));
    assert!(step.options.continue_on_error);
    assert!(step.options.skip);
    assert_eq!(step.label, "install");
}

#[test]
fn unknown_option_names_document_line() {
    let source = "---\nimage: alpine\n---\n\ntext\n\n```bash {nmae=x}\ntrue\n```\n";
    let error = parse(source).unwrap_err();
    assert_eq!(error.line(), 7);
    assert_eq!(
        error.to_string(),
        "Unknown step option `nmae` at line 7: did you mean `name`?"
    );
}

#[test]
fn options_on_other_blocks_are_ignored() {
    let source = "```python {anything=goes}\nprint(1)\n```\n";
    assert!(steps_code(source).is_empty());
}

#[test]
fn duplicate_step_names_are_rejected() {
    let source = "```sh {name=a}\n1\n```\n\n```sh {name=a}\n2\n```\n";
    assert_eq!(
        parse(source).unwrap_err(),
        ParseError::DuplicateStepName {
            line: 5,
            name: "a".into(),
            first_line: 1
        }
    );
}

#[test]
fn unclosed_step_is_rejected() {
    let error = parse("text\n\n````bash\necho never closed\n").unwrap_err();
    assert_eq!(
        error,
        ParseError::UnclosedStep {
            line: 3,
            fence: "````".into()
        }
    );
    assert!(error.to_string().contains("add a line `````"), "{error}");
}

#[test]
fn step_unclosed_at_quote_end_is_rejected() {
    let source = "> ```bash\n> echo\n\nafter\n";
    assert!(matches!(
        parse(source),
        Err(ParseError::UnclosedStep { line: 1, .. })
    ));
}

#[test]
fn invalid_front_matter_names_document_line() {
    let source = "---\nimage: alpine\ntimeout: soon\n---\n```bash\ntrue\n```\n";
    let error = parse(source).unwrap_err();
    assert_eq!(error.line(), 3);
    assert_eq!(
        error.to_string(),
        "Invalid value for front matter key `timeout` at line 3: invalid duration `soon`: write \
         whole numbers with the units h, m, s or ms, largest first, as in `500ms`, `90s` or \
         `1h30m`"
    );
}

#[test]
fn front_matter_is_not_markdown() {
    // Without front matter handling the closing `---` would make a setext heading.
    let source = "---\nimage: alpine\n---\n```bash\ntrue\n```\n";
    let document = parse(source).unwrap();
    assert_eq!(document.front_matter.image.as_deref(), Some("alpine"));
    assert_eq!(document.front_matter_span, Some(0..22));
    assert_eq!(document.steps.len(), 1);
}

#[test]
fn label_uses_first_command() {
    let source = "```bash\n#!/bin/bash\n# install things\n\n  pip install -r requirements.txt \
                  --quiet --no-cache-dir\n```\n\n```sh\n# only a comment\n```\n";
    let document = parse(source).unwrap();
    assert_eq!(
        document.steps[0].label,
        "pip install -r requirements.txt --quiet…"
    );
    assert_eq!(document.steps[0].label.chars().count(), 40);
    assert_eq!(document.steps[1].label, "step 2");
}

#[test]
fn truncate_label_keeps_short_text() {
    assert_eq!(truncate_label("ls", 40), "ls");
    assert_eq!(truncate_label("abcdef", 4), "abc…");
    assert_eq!(truncate_label("ab  cdef", 4), "ab…");
    assert_eq!(truncate_label("ééééé", 3), "éé…");
}

#[test]
fn timeout_of_prefers_step_option() {
    let source = "---\ntimeout: 5m\n---\n```sh {timeout=30s}\na\n```\n```sh\nb\n```\n";
    let document = parse(source).unwrap();
    assert_eq!(
        document.timeout_of(&document.steps[0]),
        Duration::from_secs(30)
    );
    assert_eq!(
        document.timeout_of(&document.steps[1]),
        Duration::from_secs(300)
    );
    let default = Document {
        front_matter: Default::default(),
        front_matter_span: None,
        steps: Vec::new(),
    };
    assert_eq!(default.front_matter.timeout, Duration::from_secs(600));
}

#[test]
fn dry_run_listing_describes_steps() {
    let source = "```bash {name=install timeout=2m}\npip install x\n```\n\
                  ```bash {continue-on-error}\npython analyze.py\n```\n\
                  ```bash {skip}\nrm -rf build\n```\n";
    let listing = parse(source).unwrap().dry_run_listing();
    assert_eq!(
        listing,
        [
            "Step 1: install (timeout 2m)",
            "Step 2: python analyze.py (timeout 10m, continue on error)",
            "Step 3: rm -rf build (timeout 10m, skipped)",
        ]
    );
}
