//! Checking a document's settings and the run options before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use upstream_runbook::{Document, NetworkSetting};
use upstream_vmm::{Limits, NetworkPolicy, PortForward};

use crate::error::TurnError;
use crate::guest;

/// Image used when the front matter names none: the one `upstream setup` builds.
pub const DEFAULT_IMAGE: &str = "base";

/// Working directory of the steps when neither the front matter nor the image sets one.
/// An image's `/` is replaced too, because `carry: workspace` archives the working
/// directory and artifact globs are relative to it.
pub const DEFAULT_WORKDIR: &str = "/work";

/// Values of `carry:` that the executor implements.
const CARRY_WORKSPACE: &str = "workspace";

/// The settings of one turn, checked and with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TurnPlan {
    pub image: String,
    pub limits: Limits,
    /// Working directory from the front matter; the image's applies when `None`.
    pub workdir: Option<String>,
    pub shell: String,
    pub env: BTreeMap<String, String>,
    pub artifact_globs: Vec<String>,
    pub carry_workspace: bool,
    /// Context named by the front matter.
    pub context: Option<String>,
    pub network: NetworkPolicy,
    /// Guest ports published on the host (`publish`).
    pub publish: Vec<PortForward>,
}

impl TurnPlan {
    /// Checks the front matter of `document` and returns what the executor needs from it.
    ///
    /// Rejects settings that parse but that this build cannot honour, so that a turn never
    /// runs with a setting silently ignored.
    pub fn new(path: &Path, document: &Document) -> Result<TurnPlan, TurnError> {
        let front = &document.front_matter;
        let invalid = |message: String| TurnError::InvalidSetting {
            path: path.to_owned(),
            message,
        };

        let network = match &front.network {
            None | Some(NetworkSetting::Off) => NetworkPolicy::off(),
            Some(NetworkSetting::On) => NetworkPolicy::internet(),
            Some(NetworkSetting::Rules(rules)) => {
                NetworkPolicy::rules(&rules.allow, &rules.deny)
                    .map_err(|error| invalid(format!("invalid `network` rule: {error}")))?
            }
        };
        let publish = front
            .publish
            .iter()
            .map(|port| PortForward {
                guest: port.get(),
                host: None,
            })
            .collect();
        if let Some(other) = front.carry.iter().find(|item| *item != CARRY_WORKSPACE) {
            return Err(invalid(format!(
                "unknown `carry` item `{other}`; the only supported item is `workspace`"
            )));
        }
        if front.context.len() > 1 {
            return Err(invalid(format!(
                "`context` names {} contexts, but a turn belongs to one; keep one name",
                front.context.len()
            )));
        }
        for name in front.env.keys() {
            if name.starts_with(guest::RESERVED_ENV_PREFIX) {
                return Err(invalid(format!(
                    "environment variable `{name}` uses the prefix {}, which upstream sets \
                     itself; rename it",
                    guest::RESERVED_ENV_PREFIX
                )));
            }
        }
        for pattern in &front.artifacts {
            check_glob(pattern).map_err(|reason| {
                invalid(format!("invalid `artifacts` pattern `{pattern}`: {reason}"))
            })?;
        }

        let defaults = Limits::default();
        let limits = Limits {
            vcpus: front.vcpus.map_or(defaults.vcpus, |n| n.get()),
            memory_mib: to_u32(
                "memory",
                front.memory_mib.map(|n| n.get()),
                defaults.memory_mib,
            )
            .map_err(&invalid)?,
            disk_mib: to_u32("disk", front.disk_mib.map(|n| n.get()), defaults.disk_mib)
                .map_err(&invalid)?,
        };
        limits
            .validate()
            .map_err(|error| invalid(format!("{error}")))?;

        Ok(TurnPlan {
            image: front
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_IMAGE.to_owned()),
            limits,
            workdir: front.workdir.clone(),
            shell: front.shell.clone(),
            env: front.env.clone(),
            artifact_globs: front.artifacts.clone(),
            carry_workspace: front.carry.iter().any(|item| item == CARRY_WORKSPACE),
            context: front.context.first().cloned(),
            network,
            publish,
        })
    }
}

/// Returns the working directory of the steps: the front matter's, else the image's, else
/// [`DEFAULT_WORKDIR`].
pub(crate) fn resolve_workdir(plan: &TurnPlan, image_workdir: Option<&str>) -> String {
    plan.workdir
        .clone()
        .or_else(|| {
            image_workdir
                .filter(|dir| dir.starts_with('/') && *dir != "/")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| DEFAULT_WORKDIR.to_owned())
}

fn to_u32(key: &str, value: Option<u64>, default: u32) -> Result<u32, String> {
    match value {
        None => Ok(default),
        Some(value) => u32::try_from(value)
            .map_err(|_| format!("`{key}: {value}` is too large; write a size in MiB")),
    }
}

/// Rejects a glob that could match outside the working directory.
fn check_glob(pattern: &str) -> Result<(), &'static str> {
    if pattern.trim().is_empty() {
        return Err("it is empty");
    }
    if pattern.starts_with('/') {
        return Err("it is absolute; write it relative to the working directory");
    }
    if pattern.split('/').any(|part| part == "..") {
        return Err("it has a `..` component; artifacts must lie in the working directory");
    }
    Ok(())
}

/// Path of a document as recorded: absolute when it can be resolved.
pub(crate) fn absolute_path(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_owned())
}

/// How long a step may run.
pub(crate) fn timeout_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(front_matter: &str) -> Result<TurnPlan, TurnError> {
        let source = format!("---\n{front_matter}\n---\n\n```bash\ntrue\n```\n");
        let document = upstream_runbook::parse(&source).expect("valid document");
        TurnPlan::new(Path::new("doc.md"), &document)
    }

    #[test]
    fn defaults_apply() {
        let plan = plan("timeout: 1m").unwrap();
        assert_eq!(plan.image, DEFAULT_IMAGE);
        assert_eq!(plan.limits, Limits::default());
        assert_eq!(plan.shell, "bash");
        assert!(!plan.carry_workspace);
        assert_eq!(plan.context, None);
    }

    #[test]
    fn sizes_and_carry_are_read() {
        let plan =
            plan("vcpus: 2\nmemory: 1024\ndisk: 4096\ncarry: workspace\ncontext: a").unwrap();
        assert_eq!(plan.limits.vcpus, 2);
        assert_eq!(plan.limits.memory_mib, 1024);
        assert_eq!(plan.limits.disk_mib, 4096);
        assert!(plan.carry_workspace);
        assert_eq!(plan.context.as_deref(), Some("a"));
    }

    #[test]
    fn network_settings_become_a_policy() {
        assert_eq!(plan("network: off").unwrap().network, NetworkPolicy::off());
        assert_eq!(
            plan("network: on").unwrap().network,
            NetworkPolicy::internet()
        );
        let rules = plan("network: {allow: [pypi.org], deny: ['10.0.0.0/8']}").unwrap();
        assert_eq!(rules.network.allow.len(), 1);
        assert_eq!(rules.network.deny.len(), 1);
    }

    #[test]
    fn invalid_network_rule_is_rejected() {
        let message = plan("network: {allow: ['a b']}").unwrap_err().to_string();
        assert!(message.contains("`a b`"), "{message}");
    }

    #[test]
    fn publish_is_read() {
        let plan = plan("publish: [8080]").unwrap();
        assert_eq!(
            plan.publish,
            [PortForward {
                guest: 8080,
                host: None
            }]
        );
    }

    #[test]
    fn unknown_carry_is_rejected() {
        let message = plan("carry: [workspace, cache]").unwrap_err().to_string();
        assert!(message.contains("`cache`"), "{message}");
    }

    #[test]
    fn escaping_globs_are_rejected() {
        for pattern in ["/etc/*", "../x", "out/../../y"] {
            let error = plan(&format!("artifacts: ['{pattern}']")).unwrap_err();
            assert!(error.is_usage_error(), "{pattern}");
        }
        assert!(plan("artifacts: ['out/**/*.json']").is_ok());
    }

    #[test]
    fn out_of_range_memory_is_rejected() {
        let message = plan("memory: 16").unwrap_err().to_string();
        assert!(message.contains("memory"), "{message}");
    }

    #[test]
    fn reserved_env_names_are_rejected() {
        let message = plan("env: {UPSTREAM_CONTEXT: x}").unwrap_err().to_string();
        assert!(message.contains("UPSTREAM_CONTEXT"), "{message}");
    }

    #[test]
    fn workdir_falls_back_past_root() {
        let plan = plan("timeout: 1m").unwrap();
        assert_eq!(resolve_workdir(&plan, None), DEFAULT_WORKDIR);
        assert_eq!(resolve_workdir(&plan, Some("/")), DEFAULT_WORKDIR);
        assert_eq!(resolve_workdir(&plan, Some("/app")), "/app");
    }
}
