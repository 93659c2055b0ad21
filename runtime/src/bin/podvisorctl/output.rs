//! What podvisorctl prints: aligned tables, short IDs, sizes, ages, state names and status
//! responses as readable JSON.

use anyhow::Context;
use k8s_cri::v1 as cri;

/// crictl shows IDs cut to this length.
const SHORT_ID: usize = 13;

pub(crate) fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Rows as aligned columns, three spaces apart, as crictl prints them.
pub(crate) fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < r.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn short_id(id: &str) -> String {
    id.chars().take(SHORT_ID).collect()
}

pub(crate) fn short_image_id(id: &str) -> String {
    short_id(id.strip_prefix("sha256:").unwrap_or(id))
}

/// An image for the `ps` table: an image ID shortened, a name as it is.
pub(crate) fn short_image(image: &str) -> String {
    match image.strip_prefix("sha256:") {
        Some(hex) => short_id(hex),
        None => image.to_string(),
    }
}

/// `(repository, tag)` rows for an image: one per tag, else its digest's repository
/// with `<none>`.
pub(crate) fn image_names(image: &cri::Image) -> Vec<(String, String)> {
    let none = || "<none>".to_string();
    if !image.repo_tags.is_empty() {
        return image
            .repo_tags
            .iter()
            .map(|t| match split_tag(t) {
                Some((repo, tag)) => (repo.to_string(), tag.to_string()),
                None => (t.clone(), none()),
            })
            .collect();
    }
    match image.repo_digests.first().and_then(|d| d.split_once('@')) {
        Some((repo, _)) => vec![(repo.to_string(), none())],
        None => vec![(none(), none())],
    }
}

/// `repo:tag` into its parts; a `:` before the last `/` is a registry port.
fn split_tag(repo_tag: &str) -> Option<(&str, &str)> {
    let (repo, tag) = repo_tag.rsplit_once(':')?;
    (!tag.contains('/')).then_some((repo, tag))
}

/// Bytes with three significant digits and decimal units (`4.27MB`), as crictl shows.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    // Display only: the precision lost converting to f64 does not show.
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let mut number = format!("{value:.decimals$}");
    if number.contains('.') {
        number = number
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string();
    }
    format!("{number}{}", UNITS[unit])
}

/// How long ago `then` was, both in nanoseconds since the epoch (`2 minutes ago`).
pub(crate) fn ago(now: i64, then: i64) -> String {
    let secs = now.saturating_sub(then).max(0) / 1_000_000_000;
    let minutes = secs / 60;
    let hours = minutes / 60;
    let text = if secs < 1 {
        "Less than a second".to_string()
    } else if secs == 1 {
        "1 second".to_string()
    } else if secs < 60 {
        format!("{secs} seconds")
    } else if minutes == 1 {
        "About a minute".to_string()
    } else if minutes < 60 {
        format!("{minutes} minutes")
    } else if hours == 1 {
        "About an hour".to_string()
    } else if hours < 48 {
        format!("{hours} hours")
    } else if hours < 24 * 7 * 2 {
        format!("{} days", hours / 24)
    } else if hours < 24 * 30 * 2 {
        format!("{} weeks", hours / 24 / 7)
    } else if hours < 24 * 365 * 2 {
        format!("{} months", hours / 24 / 30)
    } else {
        format!("{} years", hours / 24 / 365)
    };
    format!("{text} ago")
}

pub(crate) fn pod_state(state: i32) -> &'static str {
    match cri::PodSandboxState::try_from(state) {
        Ok(cri::PodSandboxState::SandboxReady) => "Ready",
        Ok(cri::PodSandboxState::SandboxNotready) => "NotReady",
        Err(_) => "?",
    }
}

pub(crate) fn container_state(state: i32) -> &'static str {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => "Created",
        Ok(cri::ContainerState::ContainerRunning) => "Running",
        Ok(cri::ContainerState::ContainerExited) => "Exited",
        Ok(cri::ContainerState::ContainerUnknown) | Err(_) => "Unknown",
    }
}

pub(crate) fn handler_or_default(handler: &str) -> String {
    if handler.is_empty() {
        "(default)".to_string()
    } else {
        handler.to_string()
    }
}

/// A status response as JSON for people: `info` values that hold JSON are nested as
/// JSON, and state numbers are shown by name.
pub(crate) fn readable_json(response: &impl serde::Serialize) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(response).context("encode response")?;
    if let Some(info) = value.get_mut("info").and_then(|i| i.as_object_mut()) {
        for v in info.values_mut() {
            if let Some(parsed) = v.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                *v = parsed;
            }
        }
    }
    // PodSandboxStatusResponse: the pod's state; its containers' states.
    let pod_response = value.get("containers_statuses").is_some();
    if let Some(status) = value.get_mut("status") {
        if pod_response {
            name_state(status, pod_state);
        } else {
            name_state(status, container_state);
        }
    }
    if let Some(list) = value
        .get_mut("containers_statuses")
        .and_then(|l| l.as_array_mut())
    {
        for c in list {
            name_state(c, container_state);
        }
    }
    Ok(value)
}

fn name_state(status: &mut serde_json::Value, name: fn(i32) -> &'static str) {
    if let Some(state) = status.get_mut("state")
        && let Some(n) = state.as_i64().and_then(|n| i32::try_from(n).ok())
    {
        *state = serde_json::Value::from(name(n));
    }
}

pub(crate) fn print_json(value: serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&value).context("encode JSON")?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn tables_and_units() {
        let table = format_table(&[
            row(["POD ID", "NAME"]),
            row(["0123456789abc", "web"]),
            row(["x", ""]),
        ]);
        assert_eq!(table, "POD ID          NAME\n0123456789abc   web\nx\n");
        assert_eq!(human_size(100), "100B");
        assert_eq!(human_size(1234), "1.23kB");
        assert_eq!(human_size(4_270_000), "4.27MB");
        assert_eq!(human_size(12_000_000), "12MB");
        assert_eq!(human_size(150_400_000), "150MB");
        let s = 1_000_000_000;
        assert_eq!(ago(10 * s, 10 * s), "Less than a second ago");
        assert_eq!(ago(10 * s, 9 * s), "1 second ago");
        assert_eq!(ago(100 * s, 10 * s), "About a minute ago");
        assert_eq!(ago(3600 * s, 0), "About an hour ago");
        assert_eq!(ago(3 * 86_400 * s, 0), "3 days ago");
        assert_eq!(ago(0, 5 * s), "Less than a second ago");
        assert_eq!(
            short_image_id(&format!("sha256:{}", "a".repeat(64))),
            "a".repeat(13)
        );
        assert_eq!(
            split_tag("localhost:5000/app:v1"),
            Some(("localhost:5000/app", "v1"))
        );
        assert_eq!(split_tag("localhost:5000/app"), None);
    }

    #[test]
    fn image_rows() {
        let image = cri::Image {
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            ..Default::default()
        };
        assert_eq!(
            image_names(&image),
            [(
                "docker.io/library/busybox".to_string(),
                "latest".to_string()
            )]
        );
        let untagged = cri::Image {
            repo_digests: vec!["docker.io/library/busybox@sha256:00".into()],
            ..Default::default()
        };
        assert_eq!(
            image_names(&untagged),
            [(
                "docker.io/library/busybox".to_string(),
                "<none>".to_string()
            )]
        );
    }

    #[test]
    fn readable_status_json() {
        let response = cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "p1".into(),
                state: cri::PodSandboxState::SandboxNotready as i32,
                ..Default::default()
            }),
            info: HashMap::from([
                ("info".to_string(), r#"{"vm_pid": 42}"#.to_string()),
                ("note".to_string(), "plain text".to_string()),
            ]),
            containers_statuses: vec![cri::ContainerStatus {
                state: cri::ContainerState::ContainerExited as i32,
                ..Default::default()
            }],
            timestamp: 0,
        };
        let json = readable_json(&response).expect("json");
        assert_eq!(json["status"]["state"], "NotReady");
        assert_eq!(json["containers_statuses"][0]["state"], "Exited");
        assert_eq!(json["info"]["info"]["vm_pid"], 42);
        assert_eq!(json["info"]["note"], "plain text");
    }
}
