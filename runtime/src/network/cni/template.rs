//! The node's CNI config from a template and kubelet's pod CIDR (UpdateRuntimeConfig), as
//! containerd's `conf_template`: `{{.PodCIDR}}` becomes the first CIDR, `{{.PodCIDRRanges}}`
//! the CIDRs as a JSON list of strings, `{{.Routes}}` a default route per address family
//! (`{"dst": "0.0.0.0/0"}`, `{"dst": "::/0"}`). Anything else between `{{ }}` is refused.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The file the rendered config is written to, in the CNI conf dir.
pub const RENDERED_NAME: &str = "10-podvisor-net.conflist";
/// The largest template read.
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// Why the CNI config could not be made from the template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A pod CIDR that is not `address/prefix`.
    #[error("pod CIDR {0:?} is not an address/prefix")]
    Cidr(String),
    /// The template has a placeholder this renderer does not know, or is too big.
    #[error("CNI config template {path}: {why}")]
    Template {
        /// The template.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Reading the template or writing the config failed.
    #[error("{what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Renders `template` for `cidrs` (comma-separated, as kubelet sends them).
pub fn render(template: &str, cidrs: &str, path: &Path) -> Result<String, TemplateError> {
    let cidrs: Vec<&str> = cidrs
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let mut families = Vec::new();
    for c in &cidrs {
        let (ip, prefix) = c
            .split_once('/')
            .ok_or_else(|| TemplateError::Cidr((*c).to_string()))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| TemplateError::Cidr((*c).to_string()))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix.parse::<u8>().ok().is_none_or(|p| p > max) {
            return Err(TemplateError::Cidr((*c).to_string()));
        }
        let route = if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        if !families.contains(&route) {
            families.push(route);
        }
    }
    let first = cidrs
        .first()
        .ok_or_else(|| TemplateError::Cidr(String::new()))?;
    let ranges = format!(
        "[{}]",
        cidrs
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let routes = families
        .iter()
        .map(|r| format!("{{\"dst\": \"{r}\"}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let out = template
        .replace("{{.PodCIDR}}", first)
        .replace("{{.PodCIDRRanges}}", &ranges)
        .replace("{{.Routes}}", &routes);
    if let Some(at) = out.find("{{") {
        let rest: String = out[at..].chars().take(40).collect();
        return Err(TemplateError::Template {
            path: path.to_path_buf(),
            why: format!("unknown placeholder at {rest:?}"),
        });
    }
    Ok(out)
}

/// Renders `template` for `cidrs` into `conf_dir`'s [`RENDERED_NAME`] (a new file renamed
/// over the old one, so the plugins never read half of it); returns its path.
pub fn write(template: &Path, conf_dir: &Path, cidrs: &str) -> Result<PathBuf, TemplateError> {
    use std::io::Read;
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| TemplateError::Io { what, path, source }
    };
    let mut text = String::new();
    std::fs::File::open(template)
        .map_err(io("open", template))?
        .take(MAX_TEMPLATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io("read", template))?;
    if text.len() as u64 > MAX_TEMPLATE_BYTES {
        return Err(TemplateError::Template {
            path: template.to_path_buf(),
            why: format!("over {MAX_TEMPLATE_BYTES} bytes"),
        });
    }
    let rendered = render(&text, cidrs, template)?;
    std::fs::create_dir_all(conf_dir).map_err(io("create", conf_dir))?;
    let target = conf_dir.join(RENDERED_NAME);
    let tmp = conf_dir.join(format!(".{RENDERED_NAME}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(rendered.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &target).map_err(io("rename", &target))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"{"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "{{.PodCIDR}}"}]],
        "routes": [{{.Routes}}]}}], "all": {{.PodCIDRRanges}}}"#;

    #[test]
    fn placeholders_are_filled() {
        let out = render(TEMPLATE, "10.244.1.0/24,fd00:1::/64", Path::new("t")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.1.0/24"
        );
        assert_eq!(v["plugins"][0]["ipam"]["routes"][1]["dst"], "::/0");
        assert_eq!(v["all"][1], "fd00:1::/64");
    }

    #[test]
    fn bad_cidrs_and_placeholders_are_refused() {
        for bad in ["", "10.0.0.0", "10.0.0.0/33", "x/8", "10.0.0.0/24,nope"] {
            assert!(
                matches!(
                    render(TEMPLATE, bad, Path::new("t")),
                    Err(TemplateError::Cidr(_))
                ),
                "{bad:?}"
            );
        }
        let e = render("{{.Other}}", "10.0.0.0/8", Path::new("t")).unwrap_err();
        assert!(e.to_string().contains("unknown placeholder"), "{e}");
    }

    #[test]
    fn written_whole_into_the_conf_dir() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("cni.template");
        std::fs::write(&template, TEMPLATE).unwrap();
        let conf = dir.path().join("net.d");
        let path = write(&template, &conf, "10.244.2.0/24").unwrap();
        assert_eq!(path, conf.join(RENDERED_NAME));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("10.244.2.0/24"), "{text}");
        assert_eq!(
            std::fs::read_dir(&conf).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
