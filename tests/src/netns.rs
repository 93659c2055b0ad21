//! A throw-away network namespace with a TAP device in it, so a guest's
//! traffic can only reach that TAP. Deleted on drop, even after a failure.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

fn ip(args: &[&str]) -> anyhow::Result<String> {
    crate::host::run("ip", args)
}

/// A network namespace named `pvtest-<pid>-<n>`.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a fresh namespace (replacing a stale one of the same name).
    pub fn create() -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pvtest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).context("create a network namespace (needs root)")?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Creates TAP `tap` with address `cidr` (e.g. `10.213.0.1/24`), up.
    pub fn add_tap(&self, tap: &str, cidr: &str) -> anyhow::Result<()> {
        self.exec(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.exec(&["ip", "addr", "add", cidr, "dev", tap])?;
        self.exec(&["ip", "link", "set", tap, "up"])?;
        Ok(())
    }

    /// A counter of `/sys/class/net/<dev>/statistics/<stat>` as the namespace sees it.
    pub fn net_stat(&self, dev: &str, stat: &str) -> anyhow::Result<u64> {
        let path = format!("/sys/class/net/{dev}/statistics/{stat}");
        let text = self.exec(&["cat", &path])?;
        text.trim()
            .parse()
            .with_context(|| format!("parse {path}: {text:?}"))
    }

    /// The prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys the TAPs in it.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}
