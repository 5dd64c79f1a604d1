//! End-to-end tests of `upstream run` and `upstream context`: the real binary, real
//! microVMs from the data directory that `UPSTREAM_TEST_HOME` names, and a real store in a
//! temp data directory per test.

mod support;

use std::fs;
use std::time::Duration;

use support::{eventually, send_signal, text, Home};

const SESSION: &str = r#"---
timeout: 1m
---

```bash
mkdir -p sub && cd sub
echo from-step-one > note.txt
export GREETING=hello
```

```bash
pwd
cat note.txt
echo "greeting=$GREETING"
cat <<'EOF'
heredoc $NOT_EXPANDED
EOF
if read -r line; then echo "stdin had: $line"; else echo "stdin at end of file"; fi
sleep 300 &
echo started background
```

```bash
printf 'bin:\377\376\n'
echo to-stderr >&2
```
"#;

#[test]
fn session_state_carries_between_steps() {
    let Some(home) = Home::new() else { return };
    let doc = home.document("session.md", SESSION);

    let output = home.run(&["run", "--json", "session.md"]);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let written = fs::read_to_string(&doc).unwrap();
    assert!(
        written.contains("/work/sub\nfrom-step-one\ngreeting=hello\n"),
        "{written}"
    );
    assert!(written.contains("heredoc $NOT_EXPANDED"), "{written}");
    assert!(written.contains("stdin at end of file"), "{written}");
    assert!(written.contains("started background"), "{written}");
    assert!(written.contains("bin:\u{fffd}\u{fffd}"), "{written}");
    assert!(written.contains("to-stderr"), "{written}");
    assert_eq!(
        written.matches("**Result:** exit 0").count(),
        3,
        "{written}"
    );
    assert!(stderr.contains("Step 2: pwd"), "{stderr}");
    assert!(stderr.contains("done ("), "{stderr}");

    let stdout = text(&output.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"turn_started"));
    assert_eq!(types.last(), Some(&"turn_finished"));
    assert_eq!(types.iter().filter(|t| **t == "step_finished").count(), 3);
    let binary = events
        .iter()
        .find(|e| e["type"] == "step_output" && e["data"]["data"]["bytes"].is_string())
        .expect("an output event with base64 bytes");
    assert_eq!(binary["data"]["step"], 3);
    let finished = events.last().unwrap();
    assert_eq!(finished["data"]["outcome"], "succeeded");
    assert_eq!(
        finished["data"]["turn"]["steps"].as_array().unwrap().len(),
        3
    );

    let turns = |home: &Home| {
        let show = home.run(&["context", "show", "--json", "."]);
        let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        detail["turns"].as_array().unwrap().len()
    };
    let before = turns(&home);
    let check = home.run(&["run", "--check", "session.md"]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert_eq!(
        fs::read_to_string(&doc).unwrap(),
        written,
        "--check must not write"
    );
    assert_eq!(turns(&home), before, "--check must not record a turn");
}

#[test]
fn failing_step_stops_the_turn() {
    let Some(home) = Home::new() else { return };
    let doc = home.document(
        "fail.md",
        "```bash {timeout=2s continue-on-error}\nsleep 60\n```\n\n\
         ```bash\nyes line | head -c 5000000\n```\n\n\
         ```bash {skip}\necho skipped\n```\n\n\
         ```bash\necho before; exit 3\n```\n\n\
         ```bash\necho never\n```\n",
    );

    let output = home.run(&["run", "fail.md"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(stderr.contains("failed (exit 3,"), "{stderr}");
    assert!(stderr.contains("skipped"), "{stderr}");
    assert!(stderr.contains("not run"), "{stderr}");

    let written = fs::read_to_string(&doc).unwrap();
    assert!(
        written.contains("**Result:** timed out after 2s"),
        "{written}"
    );
    assert!(written.contains("**Result:** exit 3 ("), "{written}");
    assert!(written.contains("**Result:** skipped"), "{written}");
    assert!(
        written.contains("**Result:** not run (an earlier step failed)"),
        "{written}"
    );
    assert!(!written.contains("```text\nnever"), "{written}");
    assert!(written.contains("*Output shortened: "), "{written}");
    assert!(written.contains("of 5000000 bytes left out.*"), "{written}");
    assert!(
        written.len() < 64 * 1024,
        "document grew to {} bytes",
        written.len()
    );

    let show = home.run(&["context", "show", "--json", "."]);
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let steps = &detail["turns"][0]["steps"];
    assert_eq!(detail["turns"][0]["state"], "failed");
    assert_eq!(steps[0]["state"], "timed_out");
    assert_eq!(steps[3]["exit_code"], 3);
    assert!(
        steps[1]["full_output"].is_object(),
        "full output kept as a blob"
    );
}

#[test]
fn interrupt_marks_step_and_cleans_up() {
    let Some(home) = Home::new() else { return };
    let doc = home.document(
        "slow.md",
        "```bash\necho first\n```\n\n```bash\necho waiting; sleep 120\n```\n\n```bash\necho last\n```\n",
    );

    let mut child = home.spawn_until(&["run", "--json", "slow.md"], r#""step":2,"stream""#);
    send_signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));

    let written = fs::read_to_string(&doc).unwrap();
    upstream_runbook::parse(&written).expect("the document stays valid");
    assert!(written.contains("**Result:** exit 0"), "{written}");
    assert!(written.contains("**Result:** interrupted ("), "{written}");
    assert!(home.run_folders().is_empty(), "{:?}", home.run_folders());
    assert!(home.vmm_processes().is_empty(), "VMM left running");

    let show = home.run(&["context", "show", "--json", "."]);
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(detail["turns"][0]["state"], "interrupted");
}

#[test]
fn turns_chain_through_context() {
    let Some(home) = Home::new() else { return };
    home.document(
        "one.md",
        "---\nartifacts: [out/*.txt, \"deep/**/*.log\"]\n---\n\n```bash\n\
         echo '{\"mean\": 42.3}' > \"$UPSTREAM_ARTIFACTS/results.json\"\n\
         printf 'notes\\n\\000\\377' > \"$UPSTREAM_ARTIFACTS/notes.txt\"\n\
         mkdir -p out && echo globbed > out/extra.txt\n\
         mkdir -p deep/a/b && echo deep > deep/a/b/x.log\n```\n",
    );
    home.document(
        "two.md",
        "```bash\ncat \"$UPSTREAM_CONTEXT/artifacts/results.json\"\n\
         wc -c < \"$UPSTREAM_CONTEXT/artifacts/notes.txt\"\n\
         grep -c '\"turns\"' \"$UPSTREAM_CONTEXT/turns.json\"\n\
         touch \"$UPSTREAM_CONTEXT/artifacts/new\" 2>/dev/null || echo context is read-only\n\
         cp \"$UPSTREAM_CONTEXT/artifacts/results.json\" \"$UPSTREAM_ARTIFACTS/copy.json\"\n```\n",
    );
    home.document(
        "three.md",
        "```bash\nls \"$UPSTREAM_CONTEXT/artifacts\" | wc -l\n```\n",
    );

    let first = home.run(&["run", "one.md"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(!text(&first.stderr).contains("Context loaded"));
    let blobs_after_first = home.blob_count();
    assert_eq!(blobs_after_first, 4, "four distinct artifact contents");

    let second = home.run(&["run", "two.md"]);
    let stderr = text(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(
        stderr.contains("Context loaded: 4 artifacts from previous turn"),
        "{stderr}"
    );
    let written = fs::read_to_string(home.docs.path().join("two.md")).unwrap();
    assert!(
        written.contains("{\"mean\": 42.3}\n8\n1\ncontext is read-only"),
        "{written}"
    );
    assert_eq!(
        home.blob_count(),
        blobs_after_first,
        "copy.json shares a blob"
    );

    let third = home.run(&["run", "--new-context", "three.md"]);
    let stderr = text(&third.stderr);
    assert!(third.status.success(), "{stderr}");
    assert!(!stderr.contains("Context loaded"), "{stderr}");
    let written = fs::read_to_string(home.docs.path().join("three.md")).unwrap();
    assert!(written.contains("```text\n0\n```"), "{written}");

    let got = home.run(&["context", "get", ".", "notes.txt"]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(got.stdout, b"notes\n\x00\xff");
    let got = home.run(&["context", "get", ".", "out/extra.txt", "-o", "extra.txt"]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(
        fs::read(home.docs.path().join("extra.txt")).unwrap(),
        b"globbed\n"
    );

    // `**` matched across folders, although the base image's /bin/sh is dash.
    let got = home.run(&["context", "get", ".", "deep/a/b/x.log"]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(got.stdout, b"deep\n");

    let export = home.docs.path().join("export");
    let exported = home.run(&["context", "export", ".", export.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", text(&exported.stderr));
    assert_eq!(
        fs::read(export.join("artifacts/notes.txt")).unwrap(),
        b"notes\n\x00\xff"
    );
    assert_eq!(
        fs::read(export.join("artifacts/results.json")).unwrap(),
        b"{\"mean\": 42.3}\n"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(export.join("turns.json")).unwrap()).unwrap();
    assert_eq!(manifest["turns"].as_array().unwrap().len(), 2);

    let list = text(&home.run(&["context", "ls"]).stdout);
    assert!(
        list.contains("~2"),
        "--new-context used a fresh name: {list}"
    );
}

#[test]
fn concurrent_run_is_rejected_then_waits() {
    let Some(home) = Home::new() else { return };
    home.document("long.md", "```bash\nsleep 6\n```\n");
    home.document("short.md", "```bash\necho short\n```\n");

    let mut first = home.spawn_until(&["run", "--json", "long.md"], "step_started");
    let rejected = home.run(&["run", "short.md"]);
    let stderr = text(&rejected.stderr);
    assert_eq!(rejected.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("is in use by turn"), "{stderr}");

    let waited = home.run(&["run", "--wait", "5m", "short.md"]);
    assert!(waited.status.success(), "{}", text(&waited.stderr));
    assert!(first.wait().unwrap().success());
}

#[test]
fn kill_during_turn_leaves_store_usable() {
    let Some(home) = Home::new() else { return };
    let doc = home.document(
        "killed.md",
        "```bash\necho one\n```\n\n```bash\nsleep 120\n```\n",
    );

    let mut child = home.spawn_until(&["run", "--json", "killed.md"], r#""step":2"#);
    send_signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let written = fs::read_to_string(&doc).unwrap();
    upstream_runbook::parse(&written).expect("the document stays valid");
    assert!(
        eventually(Duration::from_secs(10), || home.vmm_processes().is_empty()),
        "the VMM dies with its owner"
    );

    home.document("next.md", "```bash\necho next\n```\n");
    let next = home.run(&["run", "next.md"]);
    assert!(next.status.success(), "{}", text(&next.stderr));
    let show = home.run(&["context", "show", "--json", "."]);
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(detail["turns"][0]["state"], "interrupted");
    assert_eq!(detail["turns"][1]["state"], "succeeded");
    assert!(home.run_folders().is_empty(), "{:?}", home.run_folders());
}

#[test]
fn bad_front_matter_leaves_document_untouched() {
    let home = Home::without_vm();
    let source = "---\nimage: base\ntimeuot: 5m\n---\n\n```bash\necho hi\n```\n";
    let doc = home.document("bad.md", source);

    let output = home.run(&["run", "bad.md"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at line 3"), "{stderr}");
    assert!(stderr.contains("timeout"), "{stderr}");
    assert_eq!(fs::read_to_string(&doc).unwrap(), source);
}

#[test]
fn invalid_network_rule_is_rejected() {
    let home = Home::without_vm();
    let source = "---\nnetwork:\n  allow: [\"10.0.0.0/99\"]\n---\n\n```bash\necho hi\n```\n";
    let doc = home.document("net.md", source);
    let output = home.run(&["run", "net.md"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`10.0.0.0/99` is not a CIDR range"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&doc).unwrap(), source);
}

#[test]
fn dry_run_lists_steps() {
    let home = Home::without_vm();
    home.document(
        "plan.md",
        "```bash {timeout=2m}\necho one\n```\n\n```sh {skip}\necho two\n```\n",
    );
    let output = home.run(&["run", "--dry-run", "plan.md"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "Step 1: echo one (timeout 2m)\nStep 2: echo two (timeout 10m, skipped)\n"
    );
}
