//! Checks every request body the backend sends against Firecracker's
//! OpenAPI (Swagger 2.0) schema.
//!
//! The schema is Firecracker's `src/firecracker/swagger/firecracker.yaml` at
//! tag v1.16.1. It belongs to that project, so the repository does not
//! carry it: place a copy at `crates/vmm/tests/data/firecracker-v1.16.1.yaml`
//! to run these tests. Without it they print why and pass, except the
//! validator's own unit tests.
//!
//! The validator covers what these bodies use: `$ref`, object types with
//! `required` and `properties`, strings, integers with `minimum` and
//! `maximum`, booleans, arrays and `enum`. Unknown properties are errors
//! unless a schema sets `additionalProperties: true`, because Firecracker
//! parses bodies with serde's `deny_unknown_fields` and rejects them.

use serde_json::Value as Json;
use serde_norway::Value as Yaml;

use super::api::ApiRequest;
use super::config::{self, BootConfig, NetworkConfig, RateLimits};

const SCHEMA_FILE: &str = "tests/data/firecracker-v1.16.1.yaml";

struct Schema {
    document: Yaml,
}

impl Schema {
    /// Loads the schema copy, or prints why it cannot and returns `None`.
    fn load() -> Option<Self> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                eprintln!(
                    "skipped: Firecracker's API schema is not at {} ({err}); copy \
                     src/firecracker/swagger/firecracker.yaml of Firecracker v1.16.1 there",
                    path.display()
                );
                return None;
            }
        };
        let document = serde_norway::from_str(&text).expect("the schema is valid YAML");
        Some(Self { document })
    }

    /// Finds the operation for `request`, matching path templates such as
    /// `/drives/{drive_id}` segment by segment.
    fn operation(&self, request: &ApiRequest) -> Option<&Yaml> {
        let method = request.method.as_str().to_ascii_lowercase();
        let paths = self.document.get("paths")?.as_mapping()?;
        paths.iter().find_map(|(template, operations)| {
            let template = template.as_str()?;
            path_matches(template, &request.path).then(|| operations.get(method.as_str()))?
        })
    }

    /// Returns the schema of the operation's body parameter, if it has one.
    fn body_schema<'a>(&'a self, operation: &'a Yaml) -> Option<&'a Yaml> {
        operation
            .get("parameters")?
            .as_sequence()?
            .iter()
            .find(|parameter| parameter.get("in").and_then(Yaml::as_str) == Some("body"))?
            .get("schema")
    }

    fn resolve<'a>(&'a self, schema: &'a Yaml) -> &'a Yaml {
        match schema.get("$ref").and_then(Yaml::as_str) {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/definitions/")
                    .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
                self.document
                    .get("definitions")
                    .and_then(|definitions| definitions.get(name))
                    .unwrap_or_else(|| panic!("definition {name} not found"))
            }
            None => schema,
        }
    }

    /// Returns every way `value` breaks `schema`, each with its JSON path.
    fn validate(&self, schema: &Yaml, value: &Json, at: &str) -> Vec<String> {
        let schema = self.resolve(schema);
        let mut errors = Vec::new();
        if let Some(allowed) = schema.get("enum").and_then(Yaml::as_sequence) {
            if !allowed.iter().any(|option| enum_matches(option, value)) {
                errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        let kind = schema.get("type").and_then(Yaml::as_str);
        match kind {
            Some("object") | None if schema.get("properties").is_some() => {
                self.validate_object(schema, value, at, &mut errors)
            }
            Some("object") if !value.is_object() => {
                errors.push(format!("{at}: expected an object, found {value}"))
            }
            Some("string") if !value.is_string() => {
                errors.push(format!("{at}: expected a string, found {value}"))
            }
            Some("boolean") if !value.is_boolean() => {
                errors.push(format!("{at}: expected a boolean, found {value}"))
            }
            Some("object" | "string" | "boolean") => {}
            Some("integer") => validate_integer(schema, value, at, &mut errors),
            Some("array") => match (value.as_array(), schema.get("items")) {
                (Some(items), Some(item_schema)) => {
                    for (i, item) in items.iter().enumerate() {
                        errors.extend(self.validate(item_schema, item, &format!("{at}[{i}]")));
                    }
                }
                _ => errors.push(format!("{at}: expected an array, found {value}")),
            },
            Some(other) => errors.push(format!("{at}: the validator does not handle type {other}")),
            None => {}
        }
        errors
    }

    fn validate_object(&self, schema: &Yaml, value: &Json, at: &str, errors: &mut Vec<String>) {
        let Some(object) = value.as_object() else {
            errors.push(format!("{at}: expected an object, found {value}"));
            return;
        };
        let required = schema.get("required").and_then(Yaml::as_sequence);
        for name in required.into_iter().flatten().filter_map(Yaml::as_str) {
            if !object.contains_key(name) {
                errors.push(format!("{at}: required property {name} is missing"));
            }
        }
        let properties = schema.get("properties").and_then(Yaml::as_mapping);
        let open = schema.get("additionalProperties").and_then(Yaml::as_bool) == Some(true);
        for (name, field) in object {
            let property = properties.and_then(|props| props.get(name.as_str()));
            let path = format!("{at}.{name}");
            match property {
                Some(property) => {
                    if property.get("readOnly").and_then(Yaml::as_bool) == Some(true) {
                        errors.push(format!("{path}: property is read-only"));
                    }
                    errors.extend(self.validate(property, field, &path));
                }
                None if open => {}
                None => errors.push(format!("{path}: unknown property")),
            }
        }
    }

    /// Checks `request` against the schema and returns every problem.
    fn check(&self, request: &ApiRequest) -> Vec<String> {
        let described = request.describe();
        let Some(operation) = self.operation(request) else {
            return vec![format!("{described}: no such operation in the schema")];
        };
        match (self.body_schema(operation), &request.body) {
            (Some(schema), Some(body)) => self.validate(schema, body, &described),
            (Some(_), None) => vec![format!("{described}: the body is missing")],
            (None, Some(_)) => vec![format!("{described}: the operation takes no body")],
            (None, None) => Vec::new(),
        }
    }
}

fn path_matches(template: &str, path: &str) -> bool {
    let template: Vec<&str> = template.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    template.len() == path.len()
        && template.iter().zip(&path).all(|(expected, actual)| {
            (expected.starts_with('{') && !actual.is_empty()) || expected == actual
        })
}

fn enum_matches(option: &Yaml, value: &Json) -> bool {
    match (option, value) {
        (Yaml::String(option), Json::String(value)) => option == value,
        (Yaml::Number(option), Json::Number(value)) => option.to_string() == value.to_string(),
        (Yaml::Bool(option), Json::Bool(value)) => option == value,
        _ => false,
    }
}

fn validate_integer(schema: &Yaml, value: &Json, at: &str, errors: &mut Vec<String>) {
    let Some(number) = value
        .as_i64()
        .map(i128::from)
        .or(value.as_u64().map(i128::from))
    else {
        errors.push(format!("{at}: expected an integer, found {value}"));
        return;
    };
    let bound = |key: &str| schema.get(key).and_then(Yaml::as_i64).map(i128::from);
    if let Some(minimum) = bound("minimum") {
        if number < minimum {
            errors.push(format!("{at}: {number} is below the minimum {minimum}"));
        }
    }
    if let Some(maximum) = bound("maximum") {
        if number > maximum {
            errors.push(format!("{at}: {number} is above the maximum {maximum}"));
        }
    }
}

fn boot_config(limits: RateLimits) -> BootConfig {
    BootConfig {
        id: "sb-0123456789ab".into(),
        vcpus: 2,
        memory_mib: 512,
        kernel_args: vec!["tsc_early_khz=2000000".into()],
        limits,
        network: None,
    }
}

fn network_config(bandwidth: Option<u64>) -> NetworkConfig {
    NetworkConfig {
        tap_name: "tap0".into(),
        guest_mac: "06:00:0a:00:02:0f".into(),
        bandwidth,
    }
}

/// Builds every request the backend sends, in each variant it can take.
fn every_request() -> Vec<ApiRequest> {
    let limited = RateLimits {
        disk_bytes_per_sec: Some(100 << 20),
        disk_ops_per_sec: Some(5000),
        entropy_bytes_per_sec: Some(1 << 20),
    };
    let bandwidth_only = RateLimits {
        disk_bytes_per_sec: Some(1 << 20),
        ..RateLimits::default()
    };
    let mut requests = Vec::new();
    for limits in [RateLimits::default(), limited, bandwidth_only] {
        requests.extend(config::boot_requests(&boot_config(limits)));
    }
    for bandwidth in [None, Some(10 << 20)] {
        let mut with_network = boot_config(RateLimits::default());
        with_network.network = Some(network_config(bandwidth));
        requests.extend(config::boot_requests(&with_network));
    }
    requests.extend([
        config::logger(),
        config::pause(),
        config::snapshot_create(),
        config::snapshot_load(),
        ApiRequest::get("/version"),
        ApiRequest::get("/vm/config"),
    ]);
    requests
}

#[test]
fn every_request_matches_schema() {
    let Some(schema) = Schema::load() else { return };
    let errors: Vec<String> = every_request()
        .iter()
        .flat_map(|request| schema.check(request))
        .collect();

    assert!(
        errors.is_empty(),
        "schema violations:\n{}",
        errors.join("\n")
    );
}

#[test]
fn drive_ids_match_their_paths() {
    for request in config::boot_requests(&boot_config(RateLimits::default())) {
        let Some(id) = request.path.strip_prefix("/drives/") else {
            continue;
        };
        let body = request.body.as_ref().unwrap();
        assert_eq!(body["drive_id"], id, "{}", request.describe());
    }
}

#[test]
fn network_interface_id_matches_its_path() {
    let request = config::network_interface(&network_config(None));
    let body = request.body.as_ref().unwrap();

    assert_eq!(
        request.path,
        format!("/network-interfaces/{}", body["iface_id"].as_str().unwrap())
    );
}

#[test]
fn schema_version_is_pinned() {
    let Some(schema) = Schema::load() else { return };
    let version = schema
        .document
        .get("info")
        .and_then(|info| info.get("version"))
        .and_then(Yaml::as_str);

    assert_eq!(version, Some("1.16.1"));
}

/// The validator itself must catch each kind of mistake, or the test above
/// proves nothing.
#[test]
fn validator_rejects_bad_bodies() {
    let Some(schema) = Schema::load() else { return };
    let cases = [
        (
            ApiRequest::put("/vsock", &serde_json::json!({"guest_cid": 3})),
            "required property uds_path is missing",
        ),
        (
            ApiRequest::put(
                "/vsock",
                &serde_json::json!({"guest_cid": 2, "uds_path": "v.sock"}),
            ),
            "below the minimum 3",
        ),
        (
            ApiRequest::put(
                "/machine-config",
                &serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "memory": 1}),
            ),
            "unknown property",
        ),
        (
            ApiRequest::put(
                "/machine-config",
                &serde_json::json!({"vcpu_count": "1", "mem_size_mib": 128}),
            ),
            "expected an integer",
        ),
        (
            ApiRequest::put("/actions", &serde_json::json!({"action_type": "Start"})),
            "is not one of",
        ),
        (
            ApiRequest::put(
                "/drives/rootfs",
                &serde_json::json!({
                    "drive_id": "rootfs",
                    "is_root_device": false,
                    "rate_limiter": {"bandwidth": {"size": 1}}
                }),
            ),
            "required property refill_time is missing",
        ),
        (
            ApiRequest::put("/no-such-endpoint", &serde_json::json!({})),
            "no such operation",
        ),
        (ApiRequest::get("/boot-source"), "no such operation"),
    ];
    for (request, expected) in cases {
        let errors = schema.check(&request);
        assert!(
            errors.iter().any(|error| error.contains(expected)),
            "{}: expected an error containing '{expected}', got {errors:?}",
            request.describe()
        );
    }
}

#[test]
fn path_templates_match_segments() {
    assert!(path_matches("/drives/{drive_id}", "/drives/rootfs"));
    assert!(!path_matches("/drives/{drive_id}", "/drives/"));
    assert!(!path_matches("/drives/{drive_id}", "/drives/a/b"));
    assert!(path_matches("/snapshot/load", "/snapshot/load"));
}
