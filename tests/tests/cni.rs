//! Pod networking on the host, no VM: Debian's CNI plugins (/usr/lib/cni) driven by
//! `podvisor_runtime::network::cni`, namespaces from `podvisor_runtime::network::netns`
//! and the TAP + tc redirect of `podvisor_runtime::network::tap`.
//!
//! One test, in order: a bridge + host-local + portmap network (and loopback) attached to
//! two namespaces; their IPs are distinct and in the subnet; one pings the other; a TAP
//! with redirects in one namespace carries a frame written into it out through `eth0` and
//! the answer back into the TAP (what a guest NIC sees); after the teardown the ping works
//! again; DEL and namespace deletion leave no veth, netns file, IP reservation or iptables
//! rule behind. Names, subnet and host port derive from the pid, so parallel runs do not
//! clash.
//!
//! Needs root, iproute2, iptables (Debian's iptables-nft) and the
//! containernetworking-plugins package. Run: `cargo test -p podvisor-tests --test cni`

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use podvisor_vmm_api::tap::VNET_HDR_LEN;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use podvisor_runtime::network::cni::{
    Attachment, CapabilityArgs, Cni, CniResult, NetworkConfigList, PodRef, PortMapping,
};
use podvisor_runtime::network::netns::NetNs;
use podvisor_runtime::network::tap;
use podvisor_tests::host::run;

const PLUGIN_DIR: &str = "/usr/lib/cni";

/// `ping -c1 -W5 ip` inside `ns` (iputils' ping, or busybox's when that is all there is).
fn ping(ns: &str, ip: &str) -> Result<()> {
    let mut args = vec!["netns", "exec", ns];
    if Command::new("ping").arg("-V").output().is_err() {
        args.push("busybox");
    }
    args.extend(["ping", "-c1", "-W5", ip]);
    run("ip", &args).map(drop)
}

/// Deletes what the test created even when it fails half-way: CNI DEL of the attachments
/// (iptables rules would outlive the test otherwise), namespaces, the bridge.
struct Cleanup {
    cni: Option<(Cni, Vec<Attachment>)>,
    namespaces: Vec<String>,
    bridge: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some((cni, attachments)) = self.cni.take() {
            // Drop runs on the test's runtime thread, which cannot block on a runtime.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    for att in &attachments {
                        let _ = cni.del(att, None).await;
                    }
                });
            })
            .join();
        }
        for ns in &self.namespaces {
            let _ = podvisor_runtime::network::netns::delete(ns);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

fn conflist(net: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": net,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
    .to_string()
}

/// The IPv4 address of `eth0` in a result.
fn ipv4_of(r: &CniResult) -> Result<Ipv4Addr> {
    let (index, _) = r
        .sandbox_interface("eth0")
        .context("no eth0 in the result")?;
    r.ips_of(index)
        .find_map(|ip| match ip.cidr() {
            Ok((IpAddr::V4(a), 24)) => Some(a),
            _ => None,
        })
        .context("no IPv4 /24 on eth0")
}

fn iptables_nat() -> Result<String> {
    run("iptables-save", &["-t", "nat"])
}

/// Builds an ARP request from `mac`/`ip` for `target`, prefixed with a zero
/// virtio-net header (the size the VMM and `tap::open_queue` set on the TAP).
fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06]); // ARP
    f.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend(mac);
    f.extend(ip.octets());
    f.extend([0; 6]);
    f.extend(target.octets());
    f.resize(10 + 60, 0);
    f
}

/// Writes the ARP `request` into the TAP and reads frames until a reply from `from` to
/// `mac` arrives; the request is sent again every second, as a guest's ARP retries (a
/// fresh bridge port may drop the first one while the host is busy).
fn arp_exchange(
    tap: &mut fs::File,
    request: &[u8],
    mac: [u8; 6],
    from: Ipv4Addr,
) -> Result<[u8; 6]> {
    const RETRY: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 65536];
    let mut next_send = Instant::now();
    loop {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        ensure!(!left.is_zero(), "no ARP reply from {from} on the TAP");
        if now >= next_send {
            tap.write_all(request)?;
            next_send = now + RETRY;
        }
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = left.min(next_send.saturating_duration_since(now));
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd that outlives the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        ensure!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
        if ready == 0 {
            continue;
        }
        let n = tap.read(&mut buf)?;
        let frame = &buf[VNET_HDR_LEN.min(n)..n];
        let is_reply = frame.len() >= 42
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 2]
            && frame[28..32] == from.octets()
            && frame[32..38] == mac;
        if is_reply {
            let mut sender = [0u8; 6];
            sender.copy_from_slice(&frame[22..28]);
            return Ok(sender);
        }
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

#[tokio::test]
async fn bridge_network_tap_redirect_and_clean_teardown() -> Result<()> {
    ensure!(
        Path::new(PLUGIN_DIR).join("bridge").exists(),
        "the CNI plugins are not installed in {PLUGIN_DIR} (Debian: containernetworking-plugins)"
    );
    run("iptables", &["-t", "nat", "-L", "-n"])
        .context("iptables does not work on this host (portmap needs it)")?;

    let pid = std::process::id();
    let bridge = format!("pvt{}", pid % 1_000_000);
    let subnet_octet = 20 + pid % 200;
    let subnet = format!("10.213.{subnet_octet}.0/24");
    let net = format!("pvtest-{pid}");
    let host_port = u16::try_from(20_000 + pid % 20_000)?;
    let names = [format!("pvt-cni-a-{pid}"), format!("pvt-cni-b-{pid}")];
    let ids = [format!("pvtest-{pid}-a"), format!("pvtest-{pid}-b")];
    let mut cleanup = Cleanup {
        cni: None,
        namespaces: names.to_vec(),
        bridge: bridge.clone(),
    };

    let dir = tempfile::tempdir()?;
    let conf_dir = dir.path().join("net.d");
    let ipam_dir = dir.path().join("ipam");
    fs::create_dir(&conf_dir)?;
    fs::write(
        conf_dir.join("10-pvtest.conflist"),
        conflist(&net, &bridge, &subnet, &ipam_dir),
    )?;
    fs::write(
        conf_dir.join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
    )?;
    let bin_dirs = vec![PathBuf::from(PLUGIN_DIR)];
    let cni = Cni::load(&conf_dir, bin_dirs.clone())?.with_timeout(Duration::from_secs(60));
    ensure!(cni.network().name == net, "the first file by name wins");
    let loopback = Cni::new(
        NetworkConfigList::from_conf(&fs::read(conf_dir.join("99-loopback.conf"))?, None)?,
        bin_dirs,
    );

    let namespaces = [NetNs::create(&names[0])?, NetNs::create(&names[1])?];
    let attachments: Vec<Attachment> = (0..2)
        .map(|i| Attachment {
            container_id: ids[i].clone(),
            netns: namespaces[i].path().to_owned(),
            ifname: "eth0".into(),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: format!("pod-{i}"),
                uid: format!("uid-{pid}-{i}"),
            }),
            capabilities: CapabilityArgs {
                // Only the first pod publishes a port.
                port_mappings: if i == 0 {
                    vec![PortMapping {
                        host_port,
                        container_port: 80,
                        protocol: "tcp".into(),
                        host_ip: String::new(),
                    }]
                } else {
                    vec![]
                },
            },
        })
        .collect();

    cleanup.cni = Some((cni.clone(), attachments.clone()));

    // ADD both, persisting the results as the runtime will.
    let mut stored = Vec::new();
    for att in &attachments {
        let lo = Attachment {
            ifname: "lo".into(),
            ..att.clone()
        };
        loopback.add(&lo).await?;
        let result = cni.add(att).await?;
        stored.push(serde_json::to_string(&result)?);
    }
    let results: Vec<CniResult> = stored
        .iter()
        .map(|s| serde_json::from_str(s))
        .collect::<Result<_, _>>()?;
    let ips = [ipv4_of(&results[0])?, ipv4_of(&results[1])?];
    ensure!(ips[0] != ips[1], "distinct IPs: {ips:?}");
    for ip in ips {
        ensure!(
            ip.octets()[..3] == [10, 213, subnet_octet as u8],
            "{ip} not in {subnet}"
        );
    }
    let lo = run("ip", &["-n", &names[0], "-o", "link", "show", "lo"])?;
    ensure!(lo.contains(",UP"), "loopback up: {lo}");

    // host-local keeps one file per reserved IP.
    let reservations = dir.path().join("ipam").join(&net);
    for ip in ips {
        ensure!(
            reservations.join(ip.to_string()).exists(),
            "host-local reservation for {ip}"
        );
    }
    // portmap's DNAT chain for the first pod, found by its rule's comment.
    let nat = iptables_nat()?;
    let dn_chain = nat
        .lines()
        .find(|l| l.contains(&format!("id: \\\"{}\\\"", ids[0])) && l.contains("-j CNI-DN-"))
        .and_then(|l| l.split("-j ").nth(1))
        .map(|c| c.trim().to_owned())
        .with_context(|| format!("no portmap DNAT rule for {} in:\n{nat}", ids[0]))?;
    ensure!(
        nat.contains(&format!("--dport {host_port}")),
        "host port {host_port} in {dn_chain}"
    );

    // Pod to pod over the bridge.
    ping(&names[0], &ips[1].to_string())?;

    // The TAP and the redirects in the first namespace.
    let eth0 = results[0]
        .sandbox_interface("eth0")
        .context("eth0")?
        .1
        .clone();
    let link = tap::setup(
        &namespaces[0],
        "eth0",
        tap::DEFAULT_TAP_NAME,
        &[IpAddr::V4(ips[0])],
    )?;
    ensure!(
        link.mac == eth0.mac,
        "guest MAC {} is eth0's {}",
        link.mac,
        eth0.mac
    );
    ensure!(link.mtu == 1500, "MTU {}", link.mtu);
    let filters = run(
        "ip",
        &[
            "netns", "exec", &names[0], "tc", "filter", "show", "dev", "eth0", "ingress",
        ],
    )?;
    ensure!(
        filters.contains("Egress Redirect to device tap0_pv"),
        "eth0 -> tap filter: {filters}"
    );
    let tap_filters = run(
        "ip",
        &[
            "netns", "exec", &names[0], "tc", "filter", "show", "dev", "tap0_pv", "ingress",
        ],
    )?;
    ensure!(
        tap_filters.contains("Egress Redirect to device eth0"),
        "tap -> eth0 filter: {tap_filters}"
    );
    let tap_link = run("ip", &["-n", &names[0], "link", "show", "tap0_pv"])?;
    ensure!(tap_link.contains("mtu 1500"), "{tap_link}");

    // Be the guest: an ARP request written into the TAP leaves through eth0 and pod B's
    // answer comes back into the TAP, not to eth0's own stack.
    let mac = parse_mac(&link.mac)?;
    let (a, b) = (ips[0], ips[1]);
    let b_mac = namespaces[0].enter(|| -> Result<[u8; 6]> {
        let mut q = tap::open_queue(tap::DEFAULT_TAP_NAME)?;
        arp_exchange(&mut q, &arp_request(mac, a, b), mac, b)
    })??;
    let b_link = run("ip", &["-n", &names[1], "link", "show", "eth0"])?;
    let b_mac_text = b_mac
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ensure!(
        b_link.contains(&b_mac_text),
        "ARP reply from pod B's eth0 ({b_mac_text}): {b_link}"
    );

    // Teardown restores plain eth0: the ping works again; twice is fine.
    tap::teardown(&namespaces[0], "eth0", tap::DEFAULT_TAP_NAME)?;
    tap::teardown(&namespaces[0], "eth0", tap::DEFAULT_TAP_NAME)?;
    let links = run("ip", &["-n", &names[0], "-o", "link", "show"])?;
    ensure!(!links.contains("tap0_pv"), "TAP gone: {links}");
    ping(&names[0], &ips[1].to_string())?;

    // CHECK while attached, on pod B: portmap's CHECK of a pod with published ports and
    // IPv4 only fails looking for ip6tables rules it never made
    // (containernetworking/plugins#819), a plugin bug not ours.
    cni.check(&attachments[1], &results[1]).await?;

    // DEL: B normally, A after its namespace is gone (the runtime may lose it), then A
    // again (idempotent).
    cni.del(&attachments[1], Some(&results[1])).await?;
    loopback
        .del(
            &Attachment {
                ifname: "lo".into(),
                ..attachments[1].clone()
            },
            None,
        )
        .await?;
    let [ns_a, ns_b] = namespaces;
    ns_b.delete()?;
    ns_a.delete()?;
    cni.del(&attachments[0], Some(&results[0])).await?;
    cni.del(&attachments[0], Some(&results[0])).await?;
    loopback
        .del(
            &Attachment {
                ifname: "lo".into(),
                ..attachments[0].clone()
            },
            None,
        )
        .await?;

    // No leaks.
    let ports = run("ip", &["-o", "link", "show", "master", &bridge])?;
    ensure!(ports.trim().is_empty(), "veths left on {bridge}: {ports}");
    for name in &names {
        ensure!(
            !Path::new("/run/netns").join(name).exists(),
            "netns {name} left"
        );
    }
    for ip in ips {
        ensure!(
            !reservations.join(ip.to_string()).exists(),
            "host-local still reserves {ip}"
        );
    }
    let nat = iptables_nat()?;
    for id in &ids {
        ensure!(
            !nat.contains(id.as_str()),
            "iptables rules for {id} left:\n{nat}"
        );
    }
    ensure!(
        !nat.contains(&format!(":{dn_chain} ")),
        "chain {dn_chain} left:\n{nat}"
    );
    let filter = run("iptables-save", &["-t", "filter"])?;
    for id in &ids {
        ensure!(!filter.contains(id.as_str()), "filter rules for {id} left");
    }

    run("ip", &["link", "del", &bridge])?;
    cleanup.cni = None;
    Ok(())
}
