//! Image references, normalised the way Docker and containerd do (`busybox` is
//! `docker.io/library/busybox:latest`), and image ids (`sha256:<hex>`).

use std::fmt;

use oci_client::Reference;

use super::error::ImageError;

/// A normalised image reference: `registry/repository[:tag][@digest]`, with `docker.io`
/// and `library/` filled in and `latest` as the tag when neither tag nor digest is given.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageName {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageName {
    /// Parses and normalises `reference`.
    pub fn parse(reference: &str) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason,
        };
        // An image id is not something to pull: it would otherwise parse as the tag of a
        // Docker Hub repository called `sha256`.
        if image_id(reference).is_some() {
            return Err(invalid("an image id, not a reference".into()));
        }
        let parsed = Reference::try_from(reference).map_err(|e| invalid(e.to_string()))?;
        // The registry part may have capitals; the repository may not (Docker's rule).
        if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository name must be lowercase".into()));
        }
        if let Some(digest) = parsed.digest()
            && sha256_hex(digest).is_none()
        {
            return Err(invalid(format!("unsupported digest {digest}")));
        }
        Ok(ImageName {
            registry: parsed.registry().to_string(),
            repository: parsed.repository().to_string(),
            tag: parsed.tag().map(str::to_string),
            digest: parsed.digest().map(str::to_string),
        })
    }

    /// The registry as written in references (`docker.io`, `registry.k8s.io:443`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path in the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (a reference with only a digest has none).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest, if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`.
    pub fn repository_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The repo tag recorded for this reference: `registry/repository:tag`, or `None` when
    /// a digest pins the content (the tag was then not what was resolved).
    pub fn repo_tag(&self) -> Option<String> {
        match (&self.tag, &self.digest) {
            (Some(tag), None) => Some(format!("{}:{tag}", self.repository_name())),
            _ => None,
        }
    }

    /// The repo digest `registry/repository@digest`.
    pub fn repo_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.repository_name())
    }

    /// The same repository, tag and digest on `host` (a mirror, or the registry itself).
    pub(crate) fn at_host(&self, host: &str) -> Reference {
        match (&self.tag, &self.digest) {
            (_, Some(digest)) => {
                Reference::with_digest(host.into(), self.repository.clone(), digest.clone())
            }
            (Some(tag), None) => {
                Reference::with_tag(host.into(), self.repository.clone(), tag.clone())
            }
            (None, None) => {
                Reference::with_tag(host.into(), self.repository.clone(), "latest".into())
            }
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// The hex part of a `sha256:<64 lowercase hex>` digest.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| is_sha256_hex(hex))
}

/// `true` for exactly 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An image id as `sha256:<hex>`, if `s` is one (with or without the `sha256:` prefix).
pub fn image_id(s: &str) -> Option<String> {
    match s.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Some(s.to_string()),
        None if is_sha256_hex(s) => Some(format!("sha256:{s}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_names_are_normalised() {
        let n = ImageName::parse("busybox").expect("parse");
        assert_eq!(n.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(n.registry(), "docker.io");
        assert_eq!(n.repository(), "library/busybox");
        assert_eq!(
            n.repo_tag().as_deref(),
            Some("docker.io/library/busybox:latest")
        );

        let n = ImageName::parse("someone/app:1.2").expect("parse");
        assert_eq!(n.to_string(), "docker.io/someone/app:1.2");

        let n = ImageName::parse("index.docker.io/library/busybox:1").expect("parse");
        assert_eq!(n.to_string(), "docker.io/library/busybox:1");
    }

    #[test]
    fn registries_with_ports_and_digests() {
        let n = ImageName::parse("127.0.0.1:5000/test/busybox:1.0").expect("parse");
        assert_eq!(n.registry(), "127.0.0.1:5000");
        assert_eq!(n.repository(), "test/busybox");
        assert_eq!(n.tag(), Some("1.0"));

        let n = ImageName::parse(&format!("registry.k8s.io/pause@{DIGEST}")).expect("parse");
        assert_eq!(n.tag(), None);
        assert_eq!(n.digest(), Some(DIGEST));
        assert_eq!(n.repo_tag(), None);
        assert_eq!(
            n.repo_digest(DIGEST),
            format!("registry.k8s.io/pause@{DIGEST}")
        );

        // A digest pins the content: the tag next to it is not recorded.
        let n = ImageName::parse(&format!("registry.k8s.io/pause:3.9@{DIGEST}")).expect("parse");
        assert_eq!(n.tag(), Some("3.9"));
        assert_eq!(n.repo_tag(), None);
        let on_mirror = n.at_host("127.0.0.1:5000");
        assert_eq!(on_mirror.registry(), "127.0.0.1:5000");
        assert_eq!(on_mirror.repository(), "pause");
        assert_eq!(on_mirror.digest(), Some(DIGEST));
    }

    #[test]
    fn invalid_references_are_refused() {
        for bad in [
            "",
            "UPPER/case",
            "a b",
            ":tag",
            "repo@sha256:1234",
            "repo@md5:0123456789abcdef0123456789abcdef",
            DIGEST,
            &DIGEST["sha256:".len()..],
        ] {
            let err = ImageName::parse(bad).expect_err(bad);
            assert!(
                matches!(err, ImageError::InvalidReference { .. }),
                "{bad}: {err}"
            );
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn image_ids() {
        let hex = &DIGEST["sha256:".len()..];
        assert_eq!(image_id(DIGEST).as_deref(), Some(DIGEST));
        assert_eq!(image_id(hex).as_deref(), Some(DIGEST));
        assert_eq!(image_id("sha256:ABC"), None);
        assert_eq!(image_id("busybox"), None);
        assert_eq!(sha256_hex(DIGEST), Some(hex));
        assert_eq!(sha256_hex(&DIGEST.to_uppercase()), None);
    }
}
