//! `openapi.json` against the router and against real responses.

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::TestServer;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn document() -> Value {
    serde_json::from_str(upstream_server::api::OPENAPI).expect("openapi.json is valid JSON")
}

/// (METHOD, path) of every operation in the document.
fn documented_routes(document: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

/// A validator for `#/components/schemas/NAME` with the document's other schemas in reach.
fn validator(document: &Value, name: &str) -> jsonschema::Validator {
    let schema = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": document["components"],
    });
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

fn assert_valid(document: &Value, name: &str, instance: &Value) {
    let validator = validator(document, name);
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|err| format!("{} at {}", err, err.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "response does not match {name}: {errors:?}\n{instance:#}"
    );
}

#[test]
fn every_schema_compiles() {
    let document = document();
    for name in document["components"]["schemas"]
        .as_object()
        .unwrap()
        .keys()
    {
        validator(&document, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_matches_router_and_responses() {
    let Some(server) = TestServer::start(|_| {}).await else {
        return;
    };
    let document = document();

    // The served document is the one in the repository.
    let served: Value = reqwest::get(server.url("/v1/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, document);

    // Every route in the router is documented, and every documented route is routed.
    let documented = documented_routes(&document);
    let routed: BTreeSet<(String, String)> = server
        .routes
        .iter()
        .map(|(method, path)| (method.clone(), path.replace("{*", "{")))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing in openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "openapi.json routes the router lacks: {unrouted:?}"
    );

    // Real responses validate against their schemas.
    let http = reqwest::Client::new();
    let health: Value = server.get_json("/healthz").await;
    assert_valid(&document, "Health", &health);

    let created = http
        .post(server.url("/v1/sandboxes"))
        .json(&json!({ "metadata": { "suite": "openapi" }, "timeout_secs": 600 }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let sandbox: Value = created.json().await.unwrap();
    assert_valid(&document, "Sandbox", &sandbox);
    let id = sandbox["id"].as_str().unwrap();

    let list: Value = server
        .get_json("/v1/sandboxes?metadata.suite=openapi&state=running")
        .await;
    assert_valid(&document, "SandboxList", &list);
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);

    let result: Value = http
        .post(server.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&json!({ "command": ["sh", "-c", "echo out; echo err >&2; exit 3"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_valid(&document, "ExecResult", &result);
    assert_eq!(result["exit"]["exit_code"], 3);
    assert_eq!(result["stderr"], "err\n");

    let processes: Value = server
        .get_json(&format!("/v1/sandboxes/{id}/processes"))
        .await;
    assert_valid(&document, "ProcessList", &processes);

    let files: Value = server
        .get_json(&format!("/v1/sandboxes/{id}/files/list?path=/"))
        .await;
    assert_valid(&document, "FileList", &files);

    // Errors: a bad field names it, an unknown sandbox is 404, both with the Error body.
    let invalid = http
        .post(server.url("/v1/sandboxes"))
        .json(&json!({ "vcpus": "two" }))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    let invalid: Value = invalid.json().await.unwrap();
    assert_valid(&document, "Error", &invalid);
    assert_eq!(invalid["error"]["field"], "vcpus");
    let unknown = http
        .post(server.url("/v1/sandboxes"))
        .json(&json!({ "cpus": 2 }))
        .send()
        .await
        .unwrap();
    let unknown: Value = unknown.json().await.unwrap();
    assert_eq!(unknown["error"]["field"], "cpus");
    let missing = http
        .get(server.url("/v1/sandboxes/sb-000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_valid(&document, "Error", &missing.json().await.unwrap());
    let wrong_method = http
        .patch(server.url(&format!("/v1/sandboxes/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let wrong_method: Value = wrong_method.json().await.unwrap();
    assert_valid(&document, "Error", &wrong_method);
    assert_eq!(wrong_method["error"]["code"], "method_not_allowed");
    let bad_query = http
        .get(server.url(&format!(
            "/v1/sandboxes/{id}/processes/p-1/events?after=abc"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_query.status(), 400);
    let bad_query: Value = bad_query.json().await.unwrap();
    assert_valid(&document, "Error", &bad_query);
    assert_eq!(bad_query["error"]["code"], "invalid_query");

    let destroyed = http
        .delete(server.url(&format!("/v1/sandboxes/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(destroyed.status(), 204);

    let contexts: Value = server.get_json("/v1/contexts").await;
    assert_valid(&document, "ContextList", &contexts);

    let metrics = server.get_text("/metrics").await;
    assert!(metrics.contains(
        "upstream_http_requests_total{route=\"/v1/sandboxes/{id}\",method=\"GET\",status=\"404\"} 1\n"
    ));
    assert!(metrics.contains("upstream_execs_total 1\n"));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let Some(server) = TestServer::start(|config| config.max_body_bytes = 1024).await else {
        return;
    };
    let response = reqwest::Client::new()
        .post(server.url("/v1/sandboxes"))
        .header("content-type", "application/json")
        .body(format!("{{\"image\": \"{}\"}}", "x".repeat(4096)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large");
    server.stop().await;
}
