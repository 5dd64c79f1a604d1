use super::*;

fn front_matter(source: &str) -> FrontMatter {
    extract(source)
        .map(|extracted| extracted.front_matter)
        .unwrap()
}

fn error(source: &str) -> ParseError {
    extract(source)
        .err()
        .expect("front matter should be rejected")
}

#[test]
fn extract_reads_every_key() {
    let source = "---\n\
        image: python:3.12\n\
        env:\n  LANG: C.UTF-8\n  PORT: 8080\n  DEBUG: true\n\
        timeout: 1h30m\n\
        vcpus: 2\n\
        memory: 2048\n\
        disk: 10240\n\
        network: {allow: [pypi.org], deny: [10.0.0.0/8]}\n\
        workdir: /work\n\
        shell: sh\n\
        context: research\n\
        artifacts: [out/*.json, report.md]\n\
        carry: workspace\n\
        publish: [8080, 9090]\n\
        ---\n# Title\n";
    let parsed = front_matter(source);

    assert_eq!(parsed.image.as_deref(), Some("python:3.12"));
    assert_eq!(parsed.env["LANG"], "C.UTF-8");
    assert_eq!(parsed.env["PORT"], "8080");
    assert_eq!(parsed.env["DEBUG"], "true");

    assert_eq!(parsed.timeout, Duration::from_secs(5400));
    assert_eq!(parsed.vcpus.map(NonZeroU32::get), Some(2));
    assert_eq!(parsed.memory_mib.map(NonZeroU64::get), Some(2048));
    assert_eq!(parsed.disk_mib.map(NonZeroU64::get), Some(10240));

    let rules = NetworkRules {
        allow: vec!["pypi.org".into()],
        deny: vec!["10.0.0.0/8".into()],
    };
    assert_eq!(parsed.network, Some(NetworkSetting::Rules(rules)));

    assert_eq!(parsed.workdir.as_deref(), Some("/work"));
    assert_eq!(parsed.shell, "sh");
    assert_eq!(parsed.context, ["research"]);
    assert_eq!(parsed.artifacts, ["out/*.json", "report.md"]);
    assert_eq!(parsed.carry, ["workspace"]);

    let ports: Vec<u16> = parsed.publish.iter().map(|port| port.get()).collect();
    assert_eq!(ports, [8080, 9090]);
}

#[test]
fn extract_applies_defaults() {
    let parsed = front_matter("---\nimage: alpine\n---\n");
    assert_eq!(parsed.timeout, DEFAULT_STEP_TIMEOUT);
    assert_eq!(parsed.timeout, Duration::from_secs(600));
    assert_eq!(parsed.shell, "bash");
    assert_eq!(parsed.network, None);
    assert_eq!(front_matter("no front matter\n"), FrontMatter::default());
}

#[test]
fn extract_accepts_empty_front_matter() {
    assert_eq!(front_matter("---\n---\nbody\n"), FrontMatter::default());
    assert_eq!(
        front_matter("---\n# only a comment\n...\n"),
        FrontMatter::default()
    );
}

#[test]
fn extract_reports_body_start_and_span() {
    let source = "---\r\nimage: alpine\r\n---\r\nbody\r\n";
    let extracted = extract(source).unwrap();
    assert_eq!(&source[extracted.body_start..], "body\r\n");
    assert_eq!(extracted.span, Some(0..25));
}

#[test]
fn extract_skips_byte_order_mark() {
    let source = "\u{feff}---\nimage: alpine\n---\n";
    assert_eq!(front_matter(source).image.as_deref(), Some("alpine"));
}

#[test]
fn extract_needs_dashes_on_first_line() {
    let source = "\n---\nimage: alpine\n---\n";
    assert_eq!(front_matter(source), FrontMatter::default());
}

#[test]
fn network_accepts_words_and_booleans() {
    assert_eq!(
        front_matter("---\nnetwork: off\n---\n").network,
        Some(NetworkSetting::Off)
    );
    assert_eq!(
        front_matter("---\nnetwork: on\n---\n").network,
        Some(NetworkSetting::On)
    );
    assert_eq!(
        front_matter("---\nnetwork: false\n---\n").network,
        Some(NetworkSetting::Off)
    );
    let allow_only = front_matter("---\nnetwork:\n  allow: [example.org]\n---\n").network;
    let Some(NetworkSetting::Rules(rules)) = allow_only else {
        panic!("expected rules, got {allow_only:?}");
    };
    assert_eq!(rules.allow, ["example.org"]);
    assert!(rules.deny.is_empty());
}

#[test]
fn unclosed_front_matter_is_rejected() {
    assert_eq!(
        error("---\nimage: alpine\n"),
        ParseError::UnclosedFrontMatter { line: 1 }
    );
}

#[test]
fn unknown_key_names_line_and_suggestion() {
    let source = "---\nimage: alpine\n\nimgae: python\n---\n";
    assert_eq!(
        error(source),
        ParseError::UnknownKey {
            line: 4,
            key: "imgae".into(),
            hint: "did you mean `image`?".into(),
        }
    );
}

#[test]
fn unknown_key_without_suggestion_lists_keys() {
    let message = error("---\ncolour: blue\n---\n").to_string();
    assert_eq!(
        message,
        "Unknown front matter key `colour` at line 2: remove it; the known keys are image, env, \
         timeout, vcpus, memory, disk, network, workdir, shell, context, artifacts, carry, \
         publish"
    );
}

#[test]
fn invalid_yaml_names_document_line() {
    let source = "---\nimage: alpine\nenv:\n  A: 1\n B: 2\n---\n";
    let ParseError::InvalidYaml { line, detail } = error(source) else {
        panic!("expected InvalidYaml");
    };
    assert_eq!(line, 5);
    assert!(!detail.contains("line 4 "), "{detail}");
}

#[test]
fn invalid_yaml_shifts_inner_line_numbers() {
    let source = "---\nimage: 'alpine\n---\n";
    let ParseError::InvalidYaml { line, detail } = error(source) else {
        panic!("expected InvalidYaml");
    };
    assert_eq!(line, 3);
    assert!(detail.contains("at line 2 column 8"), "{detail}");
}

#[test]
fn duplicate_key_points_at_second() {
    let source = "---\nimage: a\nvcpus: 1\nimage: b\n---\n";
    assert_eq!(
        error(source),
        ParseError::DuplicateKey {
            line: 4,
            key: "image".into()
        }
    );
}

#[test]
fn list_front_matter_is_not_a_mapping() {
    assert_eq!(
        error("---\n- image\n---\n"),
        ParseError::NotAMapping { line: 2 }
    );
}

#[test]
fn invalid_values_name_key_line_and_fix() {
    let cases = [
        ("timeout: 2x", "timeout", "invalid duration `2x`"),
        ("timeout: 90", "timeout", "has no unit: write `90s`"),
        ("timeout: 0s", "timeout", "stop every step at once"),
        ("vcpus: 0", "vcpus", "nonzero"),
        ("memory: 2G", "memory", "in MiB"),
        ("network: maybe", "network", "maybe"),
        (
            "network: {allow: [a], block: [b]}",
            "network",
            "unknown field `block`",
        ),
        ("workdir: work", "workdir", "`work` is not an absolute path"),
        ("env: {1A: x}", "env", "`1A` is not a valid variable name"),
        ("env: {A: [1]}", "env", "a string, number or boolean"),
        ("publish: [0]", "publish", "nonzero"),
        ("publish: [70000]", "publish", "70000"),
        ("image:", "image", "the value is missing"),
        ("shell: ''", "shell", "the value is empty"),
    ];
    for (yaml, key, expected) in cases {
        let source = format!("---\n# settings\n{yaml}\n---\n");
        let error = error(&source);
        let message = error.to_string();
        assert_eq!(error.line(), 3, "{message}");
        assert!(
            message.contains(&format!("key `{key}` at line 3")),
            "{message}"
        );
        assert!(message.contains(expected), "{yaml}: {message}");
    }
}

#[test]
fn top_level_key_reads_plain_and_quoted() {
    assert_eq!(top_level_key("image: python:3.12"), Some("image"));
    assert_eq!(top_level_key("\"env\" : {}"), Some("env"));
    assert_eq!(top_level_key("  nested: 1"), None);
    assert_eq!(top_level_key("# image: x"), None);
    assert_eq!(top_level_key("- item"), None);
    assert_eq!(top_level_key("url:http://x"), None);
}

#[test]
fn shift_line_numbers_adds_offset() {
    assert_eq!(
        shift_line_numbers("at line 2 column 1, while scanning at line 1 column 4", 1),
        "at line 3 column 1, while scanning at line 2 column 4"
    );
    assert_eq!(shift_line_numbers("no numbers here", 5), "no numbers here");
}
