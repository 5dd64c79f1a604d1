//! Rules for context and artifact names.

use std::path::Path;

use crate::error::{Result, StoreError};

/// Maximum length of a context or artifact name, in bytes. It equals Linux's `PATH_MAX`
/// (4096), because the default context name is a folder path.
pub const MAX_NAME_BYTES: usize = 4096;

/// Returns the default context of a document: the absolute path of its folder, with symbolic
/// links resolved so that two spellings of one folder share a context.
pub fn default_context_name(document: &Path) -> Result<String> {
    let canonical = document
        .canonicalize()
        .map_err(|source| StoreError::io("resolve the path of", document, source))?;
    let folder = canonical.parent().unwrap_or(&canonical);
    let name = folder
        .to_str()
        .ok_or_else(|| StoreError::InvalidContextName {
            name: folder.to_string_lossy().into_owned(),
            reason: "the folder path is not valid UTF-8; pass a context name instead",
        })?;
    validate_context_name(name)?;
    Ok(name.to_owned())
}

/// Checks that `name` can name a context: non-empty, at most [`MAX_NAME_BYTES`] long, and
/// free of control characters, which would corrupt one-line listings.
pub fn validate_context_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("it is longer than 4096 bytes")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidContextName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks that `name` is a normalised relative path that stays inside the folder it is
/// exported to: `/`-separated, no leading `/`, no empty, `.` or `..` component, no control
/// character, at most [`MAX_NAME_BYTES`] long.
pub fn validate_artifact_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("it is longer than 4096 bytes")
    } else if name.starts_with('/') {
        Some("it is an absolute path")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if name.split('/').any(|part| part.is_empty()) {
        Some("it has an empty path component")
    } else if name.split('/').any(|part| part == "." || part == "..") {
        Some("it has a '.' or '..' component")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidArtifactName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_names_accepted() {
        for name in [
            "a",
            "out/report.csv",
            "a/b/c.tar.gz",
            ".hidden",
            "a..b",
            "sp ace",
        ] {
            assert!(validate_artifact_name(name).is_ok(), "{name:?} rejected");
        }
    }

    #[test]
    fn artifact_names_rejected() {
        for name in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\nb",
            "a\0b",
        ] {
            assert!(validate_artifact_name(name).is_err(), "{name:?} accepted");
        }
        assert!(validate_artifact_name(&"x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn context_names_checked() {
        assert!(validate_context_name("/home/me/project").is_ok());
        assert!(validate_context_name("nightly research").is_ok());
        assert!(validate_context_name("").is_err());
        assert!(validate_context_name("a\tb").is_err());
    }

    #[test]
    fn default_context_is_document_folder() {
        let dir = tempfile::tempdir().unwrap();
        let document = dir.path().join("doc.md");
        std::fs::write(&document, "# doc\n").unwrap();
        let expected = dir.path().canonicalize().unwrap();
        let name = default_context_name(&document).unwrap();
        assert_eq!(name, expected.to_str().unwrap());
    }
}
