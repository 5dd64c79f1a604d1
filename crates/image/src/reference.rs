//! Image reference parsing, with Docker's defaults.

use oci_client::Reference;

use crate::ImageError;

/// Parses `reference` the way `docker pull` does: no registry means Docker Hub, a one-part
/// name on Docker Hub lives under `library/`, and no tag or digest means `latest`.
pub(crate) fn parse(reference: &str) -> Result<Reference, ImageError> {
    Reference::try_from(reference).map_err(|error| ImageError::InvalidReference {
        reference: reference.to_string(),
        reason: format!(
            "{error}; expected a form such as python:3.12, ghcr.io/org/image:tag \
             or localhost:5000/image@sha256:<64 hex digits>"
        ),
    })
}

/// Returns the full form of a reference, such as `docker.io/library/python:3.12`, under
/// which images are stored in the index.
pub(crate) fn canonical(reference: &Reference) -> String {
    reference.whole()
}

/// Reports whether `text` names an image by digest alone: `sha256:<hex>` or a hex prefix of
/// at least 12 digits, as `docker images` prints.
pub(crate) fn digest_query(text: &str) -> Option<&str> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    let is_hex = hex
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    (is_hex && (12..=64).contains(&hex.len())).then_some(hex)
}

/// Reports whether a registry host is on the loopback interface. Like Docker's default for
/// insecure registries, those are reached over plain HTTP.
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    if host == "localhost" {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_applies_docker_hub_defaults() {
        let cases = [
            ("python:3.12", "docker.io/library/python:3.12"),
            ("python", "docker.io/library/python:latest"),
            (
                "docker.io/library/python:3.12",
                "docker.io/library/python:3.12",
            ),
            (
                "index.docker.io/library/python:3.12",
                "docker.io/library/python:3.12",
            ),
            ("ghcr.io/org/img:tag", "ghcr.io/org/img:tag"),
            ("user/tool:1", "docker.io/user/tool:1"),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical(&parse(input).unwrap()), expected, "input {input}");
        }
    }

    #[test]
    fn parse_keeps_digest_and_port() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let parsed = parse(&format!("localhost:5000/img@{digest}")).unwrap();
        assert_eq!(parsed.registry(), "localhost:5000");
        assert_eq!(parsed.repository(), "img");
        assert_eq!(parsed.digest(), Some(digest.as_str()));
        assert_eq!(parsed.tag(), None);
    }

    #[test]
    fn parse_rejects_upper_case_name() {
        let error = parse("Python:3").unwrap_err();
        assert!(error.to_string().contains("'Python:3'"), "{error}");
    }

    #[test]
    fn loopback_registries() {
        assert!(is_loopback_registry("localhost:5000"));
        assert!(is_loopback_registry("127.0.0.1:41234"));
        assert!(is_loopback_registry("127.1.2.3"));
        assert!(is_loopback_registry("[::1]:5000"));
        assert!(!is_loopback_registry("docker.io"));
        assert!(!is_loopback_registry("localhost.example.com:5000"));
    }

    #[test]
    fn digest_queries() {
        let full = format!("sha256:{}", "0123456789ab".repeat(5) + "cdef");
        assert!(digest_query(&full).is_some());
        assert_eq!(digest_query("0123456789ab"), Some("0123456789ab"));
        assert_eq!(digest_query("python:3.12"), None);
        assert_eq!(digest_query("abc"), None);
    }
}
