//! ConfigureNetwork: gives the guest NICs (found by MAC: the host picked each NIC's MAC, the
//! guest kernel picked its name) their MTU, addresses and routes, and brings them and `lo`
//! up, over rtnetlink. A VM restored from a template snapshot still has the template's NIC
//! MAC: the request then names it as `current_mac` and the NIC first gets its own.
//!
//! The whole request is validated before anything changes, so bad input
//! (`InvalidArgument`) leaves the network as it was. The changes are idempotent (addresses
//! and routes are replaced, not added twice), so the host may retry.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use podvisor_proto::v1::ConfigureNetworkRequest;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request itself is wrong (unknown MAC, malformed address).
    #[error("{0}")]
    InvalidArgument(String),
    /// The guest is not in the state the request expects (no link has `current_mac`).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("netlink connection")]
    Connection(#[source] io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl From<NetworkError> for tonic::Status {
    fn from(e: NetworkError) -> Self {
        let msg = format!("configure network: {}", podvisor_common::error_chain(&e));
        match e {
            NetworkError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            NetworkError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            NetworkError::Connection(_) | NetworkError::Netlink { .. } => {
                tonic::Status::internal(msg)
            }
        }
    }
}

fn invalid(msg: String) -> NetworkError {
    NetworkError::InvalidArgument(msg)
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// One interface of the request, validated.
#[derive(Debug)]
struct InterfacePlan {
    mac: [u8; 6],
    /// The MAC the NIC has now when it is to be changed to `mac`.
    current_mac: Option<[u8; 6]>,
    name: Option<String>,
    mtu: Option<u32>,
    addresses: Vec<(IpAddr, u8)>,
}

/// One route of the request, validated.
#[derive(Debug)]
struct RoutePlan {
    destination: (IpAddr, u8),
    gateway: Option<IpAddr>,
    interface_mac: Option<[u8; 6]>,
    metric: u32,
}

/// Applies `req` to the network namespace of the calling thread (the guest's only one).
pub async fn configure(req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    let (interfaces, routes) = validate(req)?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connection)?;
    let conn = tokio::spawn(conn);
    let result = apply(&handle, &interfaces, &routes).await;
    conn.abort();
    result
}

/// Checks the whole request before anything changes: its interfaces, then its routes.
fn validate(
    req: &ConfigureNetworkRequest,
) -> Result<(Vec<InterfacePlan>, Vec<RoutePlan>), NetworkError> {
    let interfaces = validate_interfaces(req)?;
    check_mac_changes(&interfaces)?;
    let routes = validate_routes(req, &interfaces)?;
    Ok((interfaces, routes))
}

/// The request's interfaces: MACs, names, MTUs and addresses.
fn validate_interfaces(req: &ConfigureNetworkRequest) -> Result<Vec<InterfacePlan>, NetworkError> {
    let mut interfaces = Vec::new();
    for i in &req.interfaces {
        let mac = parse_mac(&i.mac)?;
        if interfaces.iter().any(|p: &InterfacePlan| p.mac == mac) {
            return Err(invalid(format!("interface MAC {} given twice", i.mac)));
        }
        let current_mac = if i.current_mac.is_empty() {
            None
        } else {
            Some(parse_mac(&i.current_mac)?).filter(|c| *c != mac)
        };
        // The kernel only gives a link a unicast, non-zero Ethernet address.
        if current_mac.is_some() && (mac[0] & 1 != 0 || mac == [0; 6]) {
            return Err(invalid(format!(
                "interface {}: not a unicast MAC, cannot be assigned",
                i.mac
            )));
        }
        let name = if i.name.is_empty() {
            None
        } else {
            podvisor_common::validate_ifname(&i.name).map_err(|e| invalid(e.to_string()))?;
            Some(i.name.clone())
        };
        let mtu = match i.mtu {
            0 => None,
            m @ 68..=65535 => Some(m),
            m => return Err(invalid(format!("interface {}: invalid MTU {m}", i.mac))),
        };
        let addresses = i
            .addresses
            .iter()
            .map(|a| {
                let ip: IpAddr = a
                    .address
                    .parse()
                    .map_err(|_| invalid(format!("invalid IP address {:?}", a.address)))?;
                let len = prefix_len(ip, a.prefix_len).ok_or_else(|| {
                    invalid(format!(
                        "invalid prefix length {}/{}",
                        a.address, a.prefix_len
                    ))
                })?;
                Ok((ip, len))
            })
            .collect::<Result<_, NetworkError>>()?;
        interfaces.push(InterfacePlan {
            mac,
            current_mac,
            name,
            mtu,
            addresses,
        });
    }
    Ok(interfaces)
}

/// A MAC being replaced must name neither another NIC nor the NIC another one becomes:
/// two links would share it, or which link is meant would depend on the order of changes.
fn check_mac_changes(interfaces: &[InterfacePlan]) -> Result<(), NetworkError> {
    for (n, plan) in interfaces.iter().enumerate() {
        let Some(current) = plan.current_mac else {
            continue;
        };
        let clash = interfaces.iter().enumerate().any(|(m, other)| {
            other.mac == current || (m != n && other.current_mac == Some(current))
        });
        if clash {
            return Err(invalid(format!(
                "interface {}: current MAC {} also names another interface",
                format_mac(&plan.mac),
                format_mac(&current)
            )));
        }
    }
    Ok(())
}

/// The request's routes, each through a gateway or on an interface of the request (by its
/// new MAC) or of the VM.
fn validate_routes(
    req: &ConfigureNetworkRequest,
    interfaces: &[InterfacePlan],
) -> Result<Vec<RoutePlan>, NetworkError> {
    let mut routes = Vec::new();
    for r in &req.routes {
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            Some(
                r.gateway
                    .parse::<IpAddr>()
                    .map_err(|_| invalid(format!("invalid gateway {:?}", r.gateway)))?,
            )
        };
        let destination = if r.destination.is_empty() {
            match gateway {
                Some(IpAddr::V4(_)) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                None => return Err(invalid("route with neither destination nor gateway".into())),
            }
        } else {
            parse_cidr(&r.destination)?
        };
        if let Some(gw) = gateway
            && gw.is_ipv4() != destination.0.is_ipv4()
        {
            return Err(invalid(format!(
                "route {}: gateway {gw} of another address family",
                r.destination
            )));
        }
        let interface_mac = if r.interface_mac.is_empty() {
            None
        } else {
            let mac = parse_mac(&r.interface_mac)?;
            if interfaces.iter().any(|i| i.current_mac == Some(mac)) {
                return Err(invalid(format!(
                    "route {}: interface MAC {} is being replaced (name the new one)",
                    r.destination, r.interface_mac
                )));
            }
            Some(mac)
        };
        if gateway.is_none() && interface_mac.is_none() {
            return Err(invalid(format!(
                "route {}: needs a gateway or an interface",
                r.destination
            )));
        }
        routes.push(RoutePlan {
            destination,
            gateway,
            interface_mac,
            metric: r.metric,
        });
    }
    Ok(routes)
}

/// Changes the VM's links, then adds the routes; every MAC is resolved before the first
/// change.
async fn apply(
    h: &Handle,
    interfaces: &[InterfacePlan],
    routes: &[RoutePlan],
) -> Result<(), NetworkError> {
    let links = list_links(h).await?;
    // Every MAC is checked before the first change.
    let targets = interfaces
        .iter()
        .map(|i| find_link(&links, i))
        .collect::<Result<Vec<_>, _>>()?;
    let route_indexes = routes
        .iter()
        .map(|r| {
            let Some(mac) = &r.interface_mac else {
                return Ok(None);
            };
            // A NIC named by its new MAC is found by the old one.
            let planned = interfaces.iter().zip(&targets).find(|(i, _)| i.mac == *mac);
            match planned {
                Some((_, target)) => Ok(Some(target.index)),
                None => index_of(&links, mac).map(Some),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    set_up(h, LinkUnspec::new_with_name("lo"), "lo").await?;
    for (plan, target) in interfaces.iter().zip(&targets) {
        configure_link(h, plan, target).await?;
    }
    for (r, oif) in routes.iter().zip(route_indexes) {
        add_route(h, r, oif).await?;
    }
    Ok(())
}

/// One interface: its MAC (when it changes), name, MTU and addresses, then up.
async fn configure_link(
    h: &Handle,
    plan: &InterfacePlan,
    target: &TargetLink,
) -> Result<(), NetworkError> {
    let index = target.index;
    let mac = format_mac(&plan.mac);
    if let Some(current) = target.replace_mac {
        let current = format_mac(&current);
        // Drivers without live address change refuse a new MAC while the link is up; it
        // comes up again below, with the new MAC.
        h.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl(format!("set {current} down")))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(plan.mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("change MAC {current} to {mac}")))?;
        tracing::info!(from = %current, to = %mac, "interface MAC changed");
    }
    let current_name = target.name.as_str();
    if let Some(name) = plan.name.as_deref()
        && name != current_name
    {
        // The kernel renames only links that are down.
        h.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl(format!("set {mac} down")))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(name.to_owned())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("rename {mac} to {name}")))?;
    }
    if let Some(mtu) = plan.mtu {
        h.link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(nl(format!("set {mac} mtu {mtu}")))?;
    }
    for &(ip, len) in &plan.addresses {
        h.address()
            .add(index, ip, len)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add address {ip}/{len} to {mac}")))?;
    }
    // Up after the addresses, before the routes: the connected routes that make the
    // gateways reachable appear when the link comes up.
    set_up(h, LinkUnspec::new_with_index(index), &mac).await?;
    tracing::info!(%mac, name = ?plan.name, mtu = ?plan.mtu, addresses = ?plan.addresses, "interface configured");
    Ok(())
}

/// One route, on the output interface `oif` when it names one.
async fn add_route(h: &Handle, r: &RoutePlan, oif: Option<u32>) -> Result<(), NetworkError> {
    let (dst, len) = r.destination;
    let what = format!("add route {dst}/{len}");
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, len)
        .map_err(|e| invalid(format!("route {dst}/{len}: {e}")))?;
    match r.gateway {
        Some(gw) => {
            b = b
                .gateway(gw)
                .map_err(|e| invalid(format!("route {dst}/{len}: {e}")))?;
        }
        // Directly reachable on the interface.
        None => b = b.scope(RouteScope::Link),
    }
    if let Some(oif) = oif {
        b = b.output_interface(oif);
    }
    if r.metric != 0 {
        b = b.priority(r.metric);
    }
    h.route()
        .add(b.build())
        .replace()
        .execute()
        .await
        .map_err(nl(what))?;
    tracing::info!(destination = %format!("{dst}/{len}"), gateway = ?r.gateway, metric = r.metric, "route added");
    Ok(())
}

async fn set_up(
    h: &Handle,
    link: rtnetlink::LinkMessageBuilder<LinkUnspec>,
    what: &str,
) -> Result<(), NetworkError> {
    h.link()
        .set(link.up().build())
        .execute()
        .await
        .map_err(nl(format!("set {what} up")))
}

/// The existing link an interface of the request is applied to.
#[derive(Debug)]
struct TargetLink {
    index: u32,
    name: String,
    /// The link's MAC, when it is to be changed to the plan's.
    replace_mac: Option<[u8; 6]>,
}

fn index_of(links: &HashMap<[u8; 6], (u32, String)>, mac: &[u8; 6]) -> Result<u32, NetworkError> {
    links
        .get(mac)
        .map(|(index, _)| *index)
        .ok_or_else(|| invalid(format!("no interface with MAC {}", format_mac(mac))))
}

/// Finds the link `plan` is about: the one with its current MAC if that is to be replaced,
/// else the one with its MAC.
fn find_link(
    links: &HashMap<[u8; 6], (u32, String)>,
    plan: &InterfacePlan,
) -> Result<TargetLink, NetworkError> {
    let target = |(index, name): &(u32, String), replace_mac| TargetLink {
        index: *index,
        name: name.clone(),
        replace_mac,
    };
    let Some(current) = plan.current_mac else {
        return links
            .get(&plan.mac)
            .map(|link| target(link, None))
            .ok_or_else(|| invalid(format!("no interface with MAC {}", format_mac(&plan.mac))));
    };
    match (links.get(&current), links.get(&plan.mac)) {
        (Some(link), None) => Ok(target(link, Some(current))),
        // A retry after the MAC was changed.
        (None, Some(link)) => Ok(target(link, None)),
        (Some(_), Some(_)) => Err(NetworkError::FailedPrecondition(format!(
            "cannot change MAC {} to {}: another interface has it",
            format_mac(&current),
            format_mac(&plan.mac)
        ))),
        (None, None) => Err(NetworkError::FailedPrecondition(format!(
            "no interface with current MAC {}",
            format_mac(&current)
        ))),
    }
}

/// Links by MAC: (index, name). Links without a 6-byte MAC (lo, tunnels) are left out.
async fn list_links(h: &Handle) -> Result<HashMap<[u8; 6], (u32, String)>, NetworkError> {
    let mut links = HashMap::new();
    let mut stream = h.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl("list links"))? {
        if msg.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let mut mac = None;
        let mut name = String::new();
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::IfName(n) => name.clone_from(n),
                _ => {}
            }
        }
        if let Some(mac) = mac {
            links.insert(mac, (msg.header.index, name));
        }
    }
    Ok(links)
}

fn parse_mac(s: &str) -> Result<[u8; 6], NetworkError> {
    let bad = || invalid(format!("invalid MAC {s:?}"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn prefix_len(ip: IpAddr, len: u32) -> Option<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    u8::try_from(len).ok().filter(|&l| l <= max)
}

/// "10.1.0.0/16": the network address (no host bits) and the prefix length.
fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetworkError> {
    let bad = || invalid(format!("invalid CIDR {s:?}"));
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let len = prefix_len(ip, len.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    let host_bits = match ip {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(len)).unwrap_or(0) != 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(len)).unwrap_or(0) != 0,
    };
    if host_bits {
        return Err(invalid(format!("CIDR {s:?} has host bits set")));
    }
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::v1::{Interface, IpAddress, Route};
    use rtnetlink::LinkVeth;
    use std::process::Command;

    const MAC: &str = "02:00:0a:01:02:03";
    /// The MAC a NIC restored from a template is to get instead of [`MAC`].
    const NEW_MAC: &str = "02:00:0a:09:08:07";

    /// Runs `f` on a new thread in a new, empty network namespace (the host's is never
    /// touched) with a veth link `veth0` of MAC [`MAC`], and a current-thread runtime.
    fn in_fresh_netns<F>(f: F)
    where
        F: AsyncFnOnce(&Handle) + Send + 'static,
    {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (conn, h, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(conn);
                // A veth pair (this kernel has no dummy driver); its peer stays down, which
                // keeps the link's carrier off but routes and addresses work all the same.
                h.link()
                    .add(
                        LinkVeth::new("veth0", "peer0")
                            .address(parse_mac(MAC).unwrap().to_vec())
                            .build(),
                    )
                    .execute()
                    .await
                    .unwrap();
                f(&h).await;
            });
        })
        .join()
        .unwrap();
    }

    /// `ip ARGS` in the calling thread's network namespace (children inherit it).
    fn ip(args: &[&str]) -> String {
        let mut child = Command::new("ip")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        match child.wait() {
            Ok(status) => assert!(status.success(), "ip {args:?}: {status}"),
            // The container tests' reaper (waitpid(-1) in this same process) collected it
            // first: its status is lost, its output is complete.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {}
            Err(e) => panic!("wait for ip {args:?}: {e}"),
        }
        out
    }

    fn request() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            interfaces: vec![Interface {
                mac: MAC.to_uppercase(),
                name: "eth0".into(),
                addresses: vec![
                    IpAddress {
                        address: "10.1.2.3".into(),
                        prefix_len: 24,
                    },
                    IpAddress {
                        address: "fd00::3".into(),
                        prefix_len: 64,
                    },
                ],
                mtu: 1410,
                current_mac: String::new(),
            }],
            routes: vec![
                Route {
                    destination: String::new(),
                    gateway: "10.1.2.1".into(),
                    interface_mac: String::new(),
                    metric: 0,
                },
                Route {
                    destination: "192.168.50.0/24".into(),
                    gateway: "10.1.2.254".into(),
                    interface_mac: MAC.into(),
                    metric: 50,
                },
                Route {
                    destination: "10.99.0.0/16".into(),
                    gateway: String::new(),
                    interface_mac: MAC.into(),
                    metric: 0,
                },
                Route {
                    destination: String::new(),
                    gateway: "fd00::1".into(),
                    interface_mac: String::new(),
                    metric: 0,
                },
            ],
        }
    }

    #[test]
    fn configures_interface_addresses_and_routes() {
        in_fresh_netns(async |_| {
            let req = request();
            configure(&req).await.unwrap();
            // Idempotent: a retry changes nothing and does not fail.
            configure(&req).await.unwrap();

            let link = ip(&["-o", "link", "show", "eth0"]);
            assert!(link.contains("mtu 1410"), "{link}");
            assert!(link.contains(MAC), "{link}");
            assert!(link.contains(",UP"), "{link}");
            assert!(ip(&["-o", "link", "show", "lo"]).contains(",UP"));

            let addrs = ip(&["-o", "addr", "show", "dev", "eth0"]);
            assert!(addrs.contains("inet 10.1.2.3/24"), "{addrs}");
            assert!(addrs.contains("inet6 fd00::3/64"), "{addrs}");
            assert_eq!(addrs.matches("inet 10.1.2.3/24").count(), 1, "{addrs}");

            let v4 = ip(&["route", "show"]);
            assert!(v4.contains("default via 10.1.2.1 dev eth0"), "{v4}");
            assert!(
                v4.contains("192.168.50.0/24 via 10.1.2.254 dev eth0"),
                "{v4}"
            );
            assert!(v4.contains("metric 50"), "{v4}");
            assert!(v4.contains("10.99.0.0/16 dev eth0"), "{v4}");
            assert!(v4.contains("scope link"), "{v4}");
            assert_eq!(v4.matches("default").count(), 1, "{v4}");
            let v6 = ip(&["-6", "route", "show"]);
            assert!(v6.contains("default via fd00::1 dev eth0"), "{v6}");
        });
    }

    #[test]
    fn bad_input_is_invalid_argument_and_changes_nothing() {
        in_fresh_netns(async |_| {
            let mut unknown = request();
            unknown.interfaces[0].mac = "02:00:00:00:00:99".into();
            let mut bad_cidr = request();
            bad_cidr.routes[1].destination = "192.168.50.0/33".into();
            let mut host_bits = request();
            host_bits.routes[1].destination = "192.168.50.7/24".into();
            let mut bad_addr = request();
            bad_addr.interfaces[0].addresses[0].address = "10.1.2".into();
            let mut bad_mac = request();
            bad_mac.interfaces[0].mac = "02:00:0a:01:02".into();
            let mut unknown_route_mac = request();
            unknown_route_mac.routes[2].interface_mac = "02:00:00:00:00:98".into();
            let mut mixed = request();
            mixed.routes[1].gateway = "fd00::1".into();
            let mut bad_current_mac = request();
            bad_current_mac.interfaces[0].current_mac = "02:00:0a:01:02:zz".into();
            let mut multicast = request();
            multicast.interfaces[0].mac = "03:00:0a:01:02:03".into();
            multicast.interfaces[0].current_mac = MAC.into();
            // Two interfaces, the second "taking over" the first one's MAC.
            let mut taken = request();
            taken.interfaces.push(Interface {
                mac: NEW_MAC.into(),
                current_mac: MAC.into(),
                ..Default::default()
            });
            let mut route_to_old_mac = request();
            route_to_old_mac.interfaces[0].mac = NEW_MAC.into();
            route_to_old_mac.interfaces[0].current_mac = MAC.into();
            for (what, req) in [
                ("no interface with MAC 02:00:00:00:00:99", unknown),
                ("invalid CIDR \"192.168.50.0/33\"", bad_cidr),
                ("host bits", host_bits),
                ("invalid IP address \"10.1.2\"", bad_addr),
                ("invalid MAC", bad_mac),
                ("no interface with MAC 02:00:00:00:00:98", unknown_route_mac),
                ("another address family", mixed),
                ("invalid MAC \"02:00:0a:01:02:zz\"", bad_current_mac),
                ("not a unicast MAC", multicast),
                ("current MAC 02:00:0a:01:02:03 also names another", taken),
                ("is being replaced", route_to_old_mac),
            ] {
                let e = configure(&req).await.unwrap_err();
                assert!(
                    matches!(&e, NetworkError::InvalidArgument(m) if m.contains(what)),
                    "{what}: {e:?}"
                );
                assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
            }
            // Nothing was applied: still veth0, down, no address.
            let link = ip(&["-o", "link", "show", "veth0"]);
            assert!(
                !link.contains(",UP") && !link.contains("mtu 1410"),
                "{link}"
            );
            assert_eq!(ip(&["-o", "-4", "addr", "show", "dev", "veth0"]), "");
        });
    }

    #[test]
    fn replaces_the_mac_of_a_restored_nic_then_configures_it() {
        in_fresh_netns(async |h| {
            let mut req = request();
            req.interfaces[0].mac = NEW_MAC.into();
            req.interfaces[0].current_mac = MAC.to_uppercase();
            // Routes name the NIC by its new MAC.
            req.routes[1].interface_mac = NEW_MAC.into();
            req.routes[2].interface_mac = NEW_MAC.into();
            configure(&req).await.unwrap();
            // A retry finds the NIC by its new MAC.
            configure(&req).await.unwrap();

            // The old MAC is gone; the link has the new one, its name, MTU and is up.
            let links = list_links(h).await.unwrap();
            assert!(!links.contains_key(&parse_mac(MAC).unwrap()), "{links:?}");
            let (index, name) = &links[&parse_mac(NEW_MAC).unwrap()];
            assert_eq!(name, "eth0");
            let link = link_by_index(h, *index).await;
            assert!(link.header.flags.contains(LinkFlags::Up), "{link:?}");
            assert!(
                link.attributes.contains(&LinkAttribute::Mtu(1410)),
                "{link:?}"
            );
        });
    }

    async fn link_by_index(h: &Handle, index: u32) -> rtnetlink::packet_route::link::LinkMessage {
        h.link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn missing_current_mac_is_failed_precondition() {
        in_fresh_netns(async |h| {
            // Neither the current nor the new MAC is there.
            let mut gone = request();
            gone.interfaces[0].mac = "02:00:00:00:00:96".into();
            gone.interfaces[0].current_mac = "02:00:00:00:00:97".into();
            // Both MACs present: changing would leave two links with one MAC.
            h.link()
                .add(
                    LinkVeth::new("veth1", "peer1")
                        .address(parse_mac(NEW_MAC).unwrap().to_vec())
                        .build(),
                )
                .execute()
                .await
                .unwrap();
            let mut both = request();
            both.interfaces[0].mac = NEW_MAC.into();
            both.interfaces[0].current_mac = MAC.into();
            both.routes.clear();
            for (what, req) in [
                ("no interface with current MAC 02:00:00:00:00:97", gone),
                (
                    "cannot change MAC 02:00:0a:01:02:03 to 02:00:0a:09:08:07",
                    both,
                ),
            ] {
                let e = configure(&req).await.unwrap_err();
                assert!(
                    matches!(&e, NetworkError::FailedPrecondition(m) if m.contains(what)),
                    "{what}: {e:?}"
                );
                let status = tonic::Status::from(e);
                assert_eq!(status.code(), tonic::Code::FailedPrecondition);
                assert!(status.message().contains(what), "{}", status.message());
            }
            // Nothing changed: veth0 still has its MAC and is down.
            let links = list_links(h).await.unwrap();
            let (index, name) = &links[&parse_mac(MAC).unwrap()];
            assert_eq!(name, "veth0");
            let link = link_by_index(h, *index).await;
            assert!(!link.header.flags.contains(LinkFlags::Up), "{link:?}");
        });
    }

    #[test]
    fn netlink_failures_are_internal() {
        in_fresh_netns(async |_| {
            // The gateway is not reachable from any interface: the kernel refuses.
            let req = ConfigureNetworkRequest {
                interfaces: vec![],
                routes: vec![Route {
                    destination: String::new(),
                    gateway: "10.77.0.1".into(),
                    interface_mac: String::new(),
                    metric: 0,
                }],
            };
            let e = configure(&req).await.unwrap_err();
            assert!(matches!(e, NetworkError::Netlink { .. }), "{e:?}");
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::Internal);
            assert!(
                status.message().contains("add route 0.0.0.0/0"),
                "{}",
                status.message()
            );
        });
    }
}
