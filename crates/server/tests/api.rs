//! The API over a real socket on 127.0.0.1:0, with real microVMs.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::TestServer;
use upstream_client::{api, StreamEvent};

fn sh(script: &str) -> api::Exec {
    api::Exec::command(["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_call_flow() {
    let Some(server) = TestServer::start(|_| {}).await else {
        return;
    };
    let client = &server.client;

    let request = api::CreateSandbox {
        metadata: BTreeMap::from([("team".to_string(), "a".to_string())]),
        ..api::CreateSandbox::default()
    };
    let sandbox = client.create_sandbox(&request).await.unwrap();
    let result = client
        .exec(&sandbox.id, &api::Exec::command(["echo", "hello"]))
        .await
        .unwrap();
    client.destroy_sandbox(&sandbox.id).await.unwrap();

    assert_eq!(result.stdout, "hello\n");
    assert_eq!(result.stdout_encoding, api::Encoding::Utf8);
    assert_eq!(result.shell_code(), Some(0));
    assert_eq!(sandbox.state, api::SandboxState::Running);
    assert!(sandbox.boot_secs > 0.0);
    let after_destroy = client.get_sandbox(&sandbox.id).await.unwrap_err();
    assert_eq!(after_destroy.status(), Some(404));
    assert_eq!(after_destroy.code(), Some("sandbox_not_found"));
    assert!(server.run_folders().is_empty());

    let data = server.stop().await;
    let db = upstream_server::open_db(&upstream_vmm::DataDir::new(data.path())).unwrap();
    let usage = db
        .usage_report(
            None,
            &upstream_server::UsageGrouping::Metadata("team".into()),
        )
        .unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].group, "a");
    assert_eq!(usage[0].sandboxes, 1);
    assert!(usage[0].wall_secs > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_times_out_and_reattaches() {
    let Some(server) = TestServer::start(|_| {}).await else {
        return;
    };
    let client = &server.client;
    let sandbox = client
        .create_sandbox(&api::CreateSandbox::default())
        .await
        .unwrap();
    let id = &sandbox.id;

    // Streaming: the first line arrives while the command still sleeps.
    let started = Instant::now();
    let mut stream = client
        .exec_stream(id, &sh("echo first; sleep 2; echo second"))
        .await
        .unwrap();
    let mut first_output = None;
    let mut exit = None;
    let mut stdout = Vec::new();
    while let Some(event) = stream.next_event().await.unwrap() {
        match event {
            StreamEvent::Stdout { data, .. } => {
                first_output.get_or_insert(started.elapsed());
                stdout.extend_from_slice(&data);
            }
            StreamEvent::Exit(info) => exit = Some((info, started.elapsed())),
            _ => {}
        }
    }
    let first_output = first_output.expect("stdout events");
    let (info, exit_after) = exit.expect("an exit event");
    assert_eq!(stdout, b"first\nsecond\n");
    assert_eq!(info.exit_code, Some(0));
    assert!(
        first_output + Duration::from_millis(1500) < exit_after,
        "first output after {first_output:?}, exit after {exit_after:?}"
    );

    // A per-command timeout kills `sleep 60` after about 2 s, and no sleep is left.
    let started = Instant::now();
    let timed = client
        .exec(
            id,
            &api::Exec {
                timeout_ms: Some(2000),
                ..api::Exec::command(["sleep", "60"])
            },
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(timed.exit.as_ref().unwrap().timed_out);
    assert!(
        took >= Duration::from_millis(1900),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(6), "returned after {took:?}");
    let processes = client.exec(id, &sh("cat /proc/[0-9]*/comm")).await.unwrap();
    assert!(
        !processes.stdout.lines().any(|name| name == "sleep"),
        "processes left: {}",
        processes.stdout
    );

    // Output that is not UTF-8 comes back as base64; stdin and env reach the command.
    let binary = client.exec(id, &sh("printf '\\377\\376'")).await.unwrap();
    assert_eq!(binary.stdout_encoding, api::Encoding::Base64);
    assert_eq!(binary.stdout_bytes(), vec![0xff, 0xfe]);
    let piped = client
        .exec(
            id,
            &api::Exec {
                stdin: Some("from stdin".into()),
                env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
                ..sh("cat; echo \" $GREETING\"")
            },
        )
        .await
        .unwrap();
    assert_eq!(piped.stdout, "from stdin hi\n");

    // A missing program is the guest's failure: 422, not 5xx.
    let missing = client
        .exec(id, &api::Exec::command(["no-such-program"]))
        .await
        .unwrap_err();
    assert_eq!(missing.status(), Some(422));
    assert_eq!(missing.code(), Some("command_not_found"));

    // In the background the same failure is in the process record: polling ends.
    let missing = client
        .exec_background(id, &api::Exec::command(["no-such-program"]))
        .await
        .unwrap();
    let missing = wait_for_end(&server, id, &missing.id).await;
    assert_eq!(missing.state, api::ProcessState::Failed);
    assert_eq!(missing.exit, None);
    let error = missing.error.expect("a failed process says why");
    assert_eq!(error.code, "command_not_found");
    assert!(
        error.message.contains("no-such-program"),
        "{}",
        error.message
    );

    // A background process can be reattached from a sequence number, then killed.
    let process = client
        .exec_background(
            id,
            &sh("i=0; while true; do echo line$i; i=$((i+1)); sleep 0.2; done"),
        )
        .await
        .unwrap();
    assert_eq!(process.state, api::ProcessState::Running);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut attached = client.attach(id, &process.id, 0).await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        match attached.next_event().await.unwrap().unwrap() {
            StreamEvent::Stdout { seq, .. } => seqs.push(seq),
            StreamEvent::Started { process_id } => assert_eq!(process_id, process.id),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    drop(attached);
    let mut resumed = client.attach(id, &process.id, 3).await.unwrap();
    let next = loop {
        if let StreamEvent::Stdout { seq, .. } = resumed.next_event().await.unwrap().unwrap() {
            break seq;
        }
    };
    assert_eq!(next, 4);
    drop(resumed);
    client.kill(id, &process.id, None).await.unwrap();
    let killed = wait_for_exit(&server, id, &process.id).await;
    assert_eq!(killed.exit.unwrap().signal, Some(9));
    assert!(killed.stdout.starts_with("line0\n"));

    // Stdin of a background process stays open until eof.
    let cat = client
        .exec_background(
            id,
            &api::Exec {
                keep_stdin_open: true,
                ..api::Exec::command(["cat"])
            },
        )
        .await
        .unwrap();
    client
        .write_stdin(id, &cat.id, b"one ".to_vec(), false)
        .await
        .unwrap();
    client
        .write_stdin(id, &cat.id, b"two".to_vec(), true)
        .await
        .unwrap();
    let cat = wait_for_exit(&server, id, &cat.id).await;
    assert_eq!(cat.stdout, "one two");

    server.stop().await;
}

async fn wait_for_exit(server: &TestServer, id: &str, pid: &str) -> api::ExecResult {
    let result = wait_for_end(server, id, pid).await;
    assert_eq!(result.state, api::ProcessState::Exited, "{result:?}");
    result
}

/// Polls a process until it is no longer running.
async fn wait_for_end(server: &TestServer, id: &str, pid: &str) -> api::ExecResult {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let result = server.client.process(id, pid).await.unwrap();
        if result.state != api::ProcessState::Running {
            return result;
        }
        assert!(Instant::now() < deadline, "process {pid} did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_round_trip_is_binary_safe() {
    let Some(server) = TestServer::start(|_| {}).await else {
        return;
    };
    let client = &server.client;
    let sandbox = client
        .create_sandbox(&api::CreateSandbox::default())
        .await
        .unwrap();
    let id = &sandbox.id;
    // 10 MB of varied bytes that include every value from 0 to 255.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) % 251) as u8 ^ (i >> 8) as u8)
        .collect();

    let written = client
        .upload(id, "/tmp/big.bin", data.clone(), Some(0o600))
        .await
        .unwrap();
    let back = client.download(id, "/tmp/big.bin").await.unwrap();
    let entries = client.list_files(id, "/tmp").await.unwrap();
    let stat = client
        .exec(id, &sh("stat -c '%s %a' /tmp/big.bin"))
        .await
        .unwrap();

    assert_eq!(written.size, data.len() as u64);
    assert_eq!(back.len(), data.len());
    assert!(back == data, "downloaded bytes differ from the upload");
    let entry = entries.iter().find(|e| e.name == "big.bin").unwrap();
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(stat.stdout, "10000000 600\n");

    let empty = client
        .upload(id, "/tmp/empty", Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(empty.size, 0);
    assert!(client.download(id, "/tmp/empty").await.unwrap().is_empty());

    client.remove_file(id, "/tmp/big.bin").await.unwrap();
    let missing = client.download(id, "/tmp/big.bin").await.unwrap_err();
    assert_eq!(missing.status(), Some(404));
    assert_eq!(missing.code(), Some("path_not_found"));
    let relative = client.download(id, "tmp/x").await.unwrap_err();
    assert_eq!(relative.status(), Some(400));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_timeout_destroys_it() {
    let Some(server) = TestServer::start(|_| {}).await else {
        return;
    };
    let client = &server.client;
    let request = api::CreateSandbox {
        timeout_secs: Some(60),
        ..api::CreateSandbox::default()
    };
    let sandbox = client.create_sandbox(&request).await.unwrap();
    assert_eq!(sandbox.timeout_secs, Some(60));
    assert!(sandbox.expires_at.is_some());

    let shortened = client.set_timeout(&sandbox.id, Some(1)).await.unwrap();
    assert_eq!(shortened.timeout_secs, Some(1));
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.get_sandbox(&sandbox.id).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the sandbox outlived its timeout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(server.run_folders().is_empty());

    let data = server.stop().await;
    let db = upstream_server::open_db(&upstream_vmm::DataDir::new(data.path())).unwrap();
    let usage = db
        .usage_report(None, &upstream_server::UsageGrouping::Total)
        .unwrap();
    assert_eq!(usage[0].sandboxes, 1);
    assert!(usage[0].wall_secs >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_destroy_cycles_stay_under_limit() {
    let Some(server) = TestServer::start(|config| config.manager.max_sandboxes = 5).await else {
        return;
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let client = server.client.clone();
        workers.spawn(async move {
            for _ in 0..4 {
                let sandbox = client
                    .create_sandbox(&api::CreateSandbox::default())
                    .await
                    .expect("creating a sandbox under the limit");
                client.destroy_sandbox(&sandbox.id).await.unwrap();
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.unwrap();
    }

    let list = server
        .client
        .list_sandboxes(&BTreeMap::new())
        .await
        .unwrap();
    assert!(list.is_empty());
    assert!(server.run_folders().is_empty());
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("upstream_sandboxes_created_total 20\n"));
    assert!(metrics.contains("upstream_sandboxes_destroyed_total 20\n"));
    assert!(metrics.contains("upstream_sandbox_boot_seconds_count 20\n"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scope_and_limit_sandboxes() {
    let Some(data) = support::prepared_data() else {
        return;
    };
    // Keys go straight into the server's database, as `upstream key create` writes them.
    let db = upstream_server::open_db(&upstream_vmm::DataDir::new(data.path())).unwrap();
    let alice = db.create_key("alice", Some(1)).unwrap();
    let bob = db.create_key("bob", None).unwrap();
    let server = TestServer::start_in(data, |config| config.require_keys = true).await;
    let as_alice = server.client.clone().with_api_key(&alice.secret);
    let as_bob = server.client.clone().with_api_key(&bob.secret);

    let anonymous = server
        .client
        .list_sandboxes(&BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(anonymous.status(), Some(401));
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    let sandbox = as_alice
        .create_sandbox(&api::CreateSandbox::default())
        .await
        .unwrap();
    let over = as_alice
        .create_sandbox(&api::CreateSandbox::default())
        .await
        .unwrap_err();
    assert_eq!(over.status(), Some(429));
    assert_eq!(over.code(), Some("too_many_sandboxes"));
    let hidden = as_bob.get_sandbox(&sandbox.id).await.unwrap_err();
    assert_eq!(hidden.status(), Some(404));
    assert!(as_bob
        .list_sandboxes(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());

    db.revoke_key(&alice.record.id).unwrap();
    let revoked = as_alice.get_sandbox(&sandbox.id).await.unwrap_err();
    assert_eq!(revoked.status(), Some(401));

    // Shutdown destroys the sandbox that is still running.
    let data = server.stop().await;
    assert!(support::run_folders(data.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_records_turn_and_artifacts() {
    let Some(server) = TestServer::start(|_| {}).await else {
        return;
    };
    let document = "---\nimage: base\n---\n# Turn\n\n```sh\necho 42 > \"$UPSTREAM_ARTIFACTS/result.txt\"\necho done\n```\n";

    let run = server
        .client
        .submit_run(&api::SubmitRun {
            document: document.to_string(),
            context: Some("api-test".into()),
            new_context: false,
        })
        .await
        .unwrap();

    assert_eq!(run.outcome, "succeeded", "{}", run.document);
    assert_eq!(run.context, "api-test");
    assert!(
        run.document.contains("**Result:** exit 0"),
        "{}",
        run.document
    );
    assert!(run.document.contains("done"));
    let http = reqwest::Client::new();
    let context: serde_json::Value = server.get_json("/v1/contexts/api-test").await;
    assert_eq!(context["turns"].as_array().unwrap().len(), 1);
    let artifacts: serde_json::Value = server.get_json("/v1/contexts/api-test/artifacts").await;
    assert_eq!(artifacts["artifacts"][0]["name"], "result.txt");
    let content = server
        .get_text("/v1/contexts/api-test/artifacts/result.txt")
        .await;
    assert_eq!(content, "42\n");
    let missing = http
        .get(server.url("/v1/contexts/no-such-context"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let invalid = server
        .client
        .submit_run(&api::SubmitRun {
            document: "---\nvcpus: lots\n---\n".to_string(),
            ..api::SubmitRun::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.status(), Some(400));
    server.stop().await;
}
