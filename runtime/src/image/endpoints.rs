//! Where to fetch a registry's content from: its mirrors in order, then the registry
//! itself, each over HTTPS or plain HTTP.

use std::collections::{HashMap, HashSet};

use super::RegistryConfig;
use super::error::ImageError;

/// One host serving a registry's repositories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host` or `host:port`.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// A mirror rather than the registry itself: credentials for the registry are not
    /// sent to it.
    pub mirror: bool,
}

/// A [`RegistryConfig`], checked once.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    insecure: HashSet<String>,
    mirrors: HashMap<String, Vec<Endpoint>>,
}

impl Endpoints {
    /// Checks `config`: every mirror must be `[http://|https://]host[:port][/]`.
    pub fn new(config: &RegistryConfig) -> Result<Self, ImageError> {
        let insecure: HashSet<String> = config
            .insecure
            .iter()
            .map(|r| canonical_registry(r).to_string())
            .collect();
        let mut mirrors = HashMap::new();
        for (registry, urls) in &config.mirrors {
            let parsed = urls
                .iter()
                .map(|url| parse_mirror(url, &insecure))
                .collect::<Result<Vec<_>, _>>()?;
            mirrors.insert(canonical_registry(registry).to_string(), parsed);
        }
        Ok(Endpoints { insecure, mirrors })
    }

    /// The endpoints for `registry` (as in a normalised reference), in the order to try.
    pub fn for_registry(&self, registry: &str) -> Vec<Endpoint> {
        let registry = canonical_registry(registry);
        let mut list = self.mirrors.get(registry).cloned().unwrap_or_default();
        list.push(Endpoint {
            host: registry.to_string(),
            plain_http: self.insecure.contains(registry),
            mirror: false,
        });
        list
    }
}

/// The hosts among `endpoints` to reach over plain HTTP, as the registry client names
/// them (it talks to `index.docker.io` for `docker.io`).
pub fn plain_http_hosts(endpoints: &[Endpoint]) -> Vec<String> {
    let mut hosts = Vec::new();
    for e in endpoints.iter().filter(|e| e.plain_http) {
        hosts.push(e.host.clone());
        if e.host == "docker.io" {
            hosts.push("index.docker.io".to_string());
        }
    }
    hosts
}

/// Docker Hub has several names; references use `docker.io`.
fn canonical_registry(registry: &str) -> &str {
    match registry {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

fn parse_mirror(url: &str, insecure: &HashSet<String>) -> Result<Endpoint, ImageError> {
    let bad = |why: &str| ImageError::InvalidConfig(format!("mirror {url:?}: {why}"));
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let host = rest.strip_suffix('/').unwrap_or(rest);
    let host = host.strip_suffix("/v2").unwrap_or(host);
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.contains('/') {
        return Err(bad(
            "a path is not supported, the mirror serves /v2/ at its root",
        ));
    }
    let host_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    if !host_ok {
        return Err(bad("not a host[:port]"));
    }
    let plain_http = match scheme {
        Some("http") => true,
        Some("https") => false,
        Some(other) => return Err(bad(&format!("unknown scheme {other}"))),
        None => insecure.contains(host),
    };
    Ok(Endpoint {
        host: host.to_string(),
        plain_http,
        mirror: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageName;

    fn config(insecure: &[&str], mirrors: &[(&str, &[&str])]) -> RegistryConfig {
        RegistryConfig {
            insecure: insecure.iter().map(|s| s.to_string()).collect(),
            mirrors: mirrors
                .iter()
                .map(|(r, urls)| (r.to_string(), urls.iter().map(|u| u.to_string()).collect()))
                .collect(),
        }
    }

    #[test]
    fn mirrors_come_first_then_the_registry() {
        let cfg = config(
            &["mirror.local:5000"],
            &[(
                "registry.k8s.io",
                &[
                    "http://127.0.0.1:5000",
                    "https://mirror.example/",
                    "mirror.local:5000",
                ],
            )],
        );
        let endpoints = Endpoints::new(&cfg).expect("valid config");
        let list = endpoints.for_registry("registry.k8s.io");
        let got: Vec<(&str, bool, bool)> = list
            .iter()
            .map(|e| (e.host.as_str(), e.plain_http, e.mirror))
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.1:5000", true, true),
                ("mirror.example", false, true),
                ("mirror.local:5000", true, true),
                ("registry.k8s.io", false, false),
            ]
        );
        assert_eq!(
            plain_http_hosts(&list),
            ["127.0.0.1:5000", "mirror.local:5000"]
        );

        // A registry without mirrors is fetched from itself only.
        let only = endpoints.for_registry("quay.io");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].host, "quay.io");
        assert!(!only[0].mirror);
    }

    #[test]
    fn mirror_reference_keeps_the_repository_path() {
        let cfg = config(&[], &[("docker.io", &["http://127.0.0.1:5000"])]);
        let endpoints = Endpoints::new(&cfg).expect("valid config");
        let name = ImageName::parse("busybox:1.36").expect("parse");
        let list = endpoints.for_registry(name.registry());
        assert_eq!(list.len(), 2);
        let on_mirror = name.at_host(&list[0].host);
        assert_eq!(
            on_mirror.whole(),
            "127.0.0.1:5000/library/busybox:1.36",
            "same repository path on the mirror"
        );
        // Docker Hub's registry endpoint stays `docker.io`; the client resolves it.
        assert_eq!(list[1].host, "docker.io");
        assert_eq!(
            name.at_host(&list[1].host).resolve_registry(),
            "index.docker.io"
        );
    }

    #[test]
    fn docker_hub_aliases_and_insecure_registries() {
        let cfg = config(
            &["index.docker.io", "10.0.0.1:5000"],
            &[("registry-1.docker.io", &["https://hub-mirror.example"])],
        );
        let endpoints = Endpoints::new(&cfg).expect("valid config");
        let hub = endpoints.for_registry("docker.io");
        assert_eq!(hub.len(), 2);
        assert_eq!(hub[0].host, "hub-mirror.example");
        assert!(hub[1].plain_http);
        assert_eq!(
            plain_http_hosts(&hub),
            ["docker.io", "index.docker.io"],
            "the client names docker.io index.docker.io"
        );
        assert!(endpoints.for_registry("10.0.0.1:5000")[0].plain_http);
    }

    #[test]
    fn bad_mirror_urls_are_refused() {
        for url in [
            "",
            "http://",
            "ftp://host",
            "http://host/some/path",
            "http://user@host",
            "http://host?x=1",
        ] {
            let cfg = config(&[], &[("docker.io", &[url])]);
            let err = Endpoints::new(&cfg).expect_err(url);
            assert!(matches!(err, ImageError::InvalidConfig(_)), "{url}: {err}");
        }
        // A trailing slash or /v2 is the root all the same.
        let cfg = config(&[], &[("docker.io", &["http://host:1/v2/"])]);
        let endpoints = Endpoints::new(&cfg).expect("valid");
        assert_eq!(endpoints.for_registry("docker.io")[0].host, "host:1");
    }
}
