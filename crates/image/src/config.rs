//! The parts of an OCI image configuration that sandboxes use.

use serde::{Deserialize, Serialize};

/// How a sandbox runs commands in an image: the `config` object of the OCI image
/// configuration, reduced to the fields upstream honours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Environment as `KEY=VALUE` strings, in image order.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory of commands, an absolute path in the guest.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// User of commands: `name`, `uid`, `name:group` or `uid:gid`, resolved in the guest.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint argv, empty when the image sets none.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command argv, empty when the image sets none.
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// The OCI image configuration blob (`application/vnd.oci.image.config.v1+json`, also the
/// Docker `container.image.v1` config), with only the fields read here.
#[derive(Debug, Deserialize)]
pub(crate) struct ConfigBlob {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub config: Option<RawRunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    /// Digests of the uncompressed layer tars, in layer order.
    pub diff_ids: Vec<String>,
}

/// Docker writes `null` for absent lists, so every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RawRunConfig {
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
}

impl ConfigBlob {
    /// Returns the run settings, with empty strings treated as unset as Docker does.
    pub fn image_config(&self) -> ImageConfig {
        let raw = self.config.as_ref();
        let non_empty = |value: &Option<String>| value.clone().filter(|text| !text.is_empty());
        ImageConfig {
            env: raw.and_then(|raw| raw.env.clone()).unwrap_or_default(),
            working_dir: raw.and_then(|raw| non_empty(&raw.working_dir)),
            user: raw.and_then(|raw| non_empty(&raw.user)),
            entrypoint: raw
                .and_then(|raw| raw.entrypoint.clone())
                .unwrap_or_default(),
            cmd: raw.and_then(|raw| raw.cmd.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_docker_fields() {
        let json = r#"{
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/bin", "LANG=C.UTF-8"], "WorkingDir": "/app",
                       "User": "1000:1000", "Entrypoint": null, "Cmd": ["python3"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:00"]}
        }"#;
        let blob: ConfigBlob = serde_json::from_str(json).unwrap();
        let config = blob.image_config();
        assert_eq!(config.env, ["PATH=/usr/bin", "LANG=C.UTF-8"]);
        assert_eq!(config.working_dir.as_deref(), Some("/app"));
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        assert!(config.entrypoint.is_empty());
        assert_eq!(config.cmd, ["python3"]);
    }

    #[test]
    fn config_empty_strings_are_unset() {
        let json = r#"{"config": {"WorkingDir": "", "User": ""}, "rootfs": {"diff_ids": []}}"#;
        let blob: ConfigBlob = serde_json::from_str(json).unwrap();
        let config = blob.image_config();
        assert_eq!(config.working_dir, None);
        assert_eq!(config.user, None);
    }
}
