//! `push-busybox HOST:PORT REPO TAG`: builds the busybox test image from Debian's
//! busybox-static (one layer, linux/amd64) and pushes it over plain HTTP to the registry at
//! HOST:PORT. `make demo` uses it to fill its local registry; prints the pushed reference and
//! digests.

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, repo, tag] = args.as_slice() else {
        bail!("usage: push-busybox HOST:PORT REPO TAG");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let pushed = rt.block_on(podvisor_tests::registry::push_busybox_to(host, repo, tag))?;
    println!("pushed {} ({})", pushed.reference, pushed.digest);
    println!("image id {}", pushed.config_digest);
    Ok(())
}
