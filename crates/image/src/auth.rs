//! Registry credentials from the Docker client config file.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::ImageError;

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    /// base64 of `user:password`, as `docker login` writes it.
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Returns the Docker config file to read: `explicit`, else `$DOCKER_CONFIG/config.json`,
/// else `~/.docker/config.json`.
pub(crate) fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// Returns the credentials for `registry` (as in a reference, such as `docker.io` or
/// `localhost:5000`), or anonymous access when the config file or its entry is absent.
///
/// The registry then decides: with a token challenge the client exchanges these
/// credentials (or none) for a token, and with a basic challenge it sends them directly.
// NOTE: `credsStore` and `credHelpers` (credential helper programs) are not consulted;
// only inline `auths` entries are.
pub(crate) fn credentials(
    config_file: Option<&Path>,
    registry: &str,
) -> Result<RegistryAuth, ImageError> {
    let Some(path) = config_path(config_file) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Ok(RegistryAuth::Anonymous)
        }
        Err(source) => return Err(ImageError::Io { path, source }),
    };
    let invalid = |reason: String| ImageError::DockerConfig {
        path: path.clone(),
        reason,
    };
    let config: DockerConfig =
        serde_json::from_slice(&text).map_err(|error| invalid(error.to_string()))?;
    let expected_key = registry_key(registry);
    let Some(entry) = config
        .auths
        .iter()
        .find(|(key, _)| registry_key(key) == expected_key)
        .map(|(_, entry)| entry)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(encoded) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|error| {
                invalid(format!(
                    "the auth value for {registry} is not base64: {error}"
                ))
            })?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| invalid(format!("the auth value for {registry} is not UTF-8")))?;
        let (user, password) = decoded.split_once(':').ok_or_else(|| {
            invalid(format!(
                "the auth value for {registry} is not user:password"
            ))
        })?;
        return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(user), Some(password)) => Ok(RegistryAuth::Basic(user.clone(), password.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// Reduces a config key or registry name to its host and port, mapping the names Docker
/// uses for Docker Hub (`https://index.docker.io/v1/`, `registry-1.docker.io`, …) to one.
fn registry_key(name: &str) -> String {
    let without_scheme = name
        .strip_prefix("https://")
        .or_else(|| name.strip_prefix("http://"))
        .unwrap_or(name);
    let host = without_scheme.split('/').next().unwrap_or("");
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        other => other.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn basic(user: &str, password: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    }

    #[test]
    fn credentials_match_docker_hub_aliases() {
        let text = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
            basic("alice", "secret:with:colons")
        );
        let (_dir, path) = write_config(&text);
        let auth = credentials(Some(&path), "docker.io").unwrap();
        assert!(matches!(auth, RegistryAuth::Basic(user, password)
            if user == "alice" && password == "secret:with:colons"));
    }

    #[test]
    fn credentials_match_host_and_port() {
        let text = format!(
            r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{}"}}}}}}"#,
            basic("bob", "pw")
        );
        let (_dir, path) = write_config(&text);
        assert!(matches!(
            credentials(Some(&path), "127.0.0.1:5000").unwrap(),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            credentials(Some(&path), "127.0.0.1:5001").unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn credentials_absent_file_is_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let auth = credentials(Some(&dir.path().join("none.json")), "ghcr.io").unwrap();
        assert!(matches!(auth, RegistryAuth::Anonymous));
    }

    #[test]
    fn credentials_bad_base64_names_file() {
        let (_dir, path) = write_config(r#"{"auths": {"ghcr.io": {"auth": "%%%"}}}"#);
        let error = credentials(Some(&path), "ghcr.io").unwrap_err();
        assert!(error.to_string().contains("config.json"), "{error}");
    }
}
