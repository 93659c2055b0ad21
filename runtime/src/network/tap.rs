//! The host side of a pod's network ("tcfilter", as kata-containers calls it): the CNI
//! plugins leave a veth end (`eth0`) with the pod's IP in the pod's network namespace; we
//! add a persistent TAP next to it for the VMM, and two tc `mirred` redirects glue them:
//! whatever arrives on `eth0` leaves through the TAP (to the guest) and whatever the guest
//! sends into the TAP leaves through `eth0`. The guest NIC uses `eth0`'s MAC and MTU, so the
//! rest of the network (the bridge, ARP caches, the CNI plugins) never notices the VM.
//!
//! In front of the TAP's redirect, an anti-spoofing filter ([`crate::network::antispoof`])
//! drops what the guest sends with a source MAC or IP that is not the pod's. It is in place
//! before the VMM starts, lives in the namespace (a podvisord restart keeps it) and goes
//! with the TAP.
//!
//! Everything runs inside the namespace on a thread of [`NetNs::enter`], with a
//! current-thread tokio runtime for the netlink calls (a netlink socket talks to the
//! namespace it was opened in). The functions block: call them from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcStats2};
use rtnetlink::{Handle, LinkUnspec};

use podvisor_common::{IfnameError, validate_ifname};
use podvisor_vmm_api::tap::Tap;
#[cfg(doc)]
use podvisor_vmm_api::tap::VNET_HDR_LEN;

use crate::network::antispoof::{self, AntispoofError, Policy};
use crate::network::netns::{NetNs, NetnsError};

/// The TAP name the runtime uses in every pod namespace.
pub const DEFAULT_TAP_NAME: &str = "tap0_pv";

/// `ffff:`, the ingress qdisc's handle and the parent of its filters.
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The redirects' preference: after the TAP's anti-spoofing filter
/// ([`antispoof::FILTER_PREF`]).
const REDIRECT_PREF: u16 = 2;

/// What the guest NIC must look like: the CNI interface's MAC and MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapLink {
    /// The TAP's name in the namespace (for the VMM's `--net tap=`).
    pub tap: String,
    /// `eth0`'s MAC, "aa:bb:cc:dd:ee:ff": the guest NIC's MAC.
    pub mac: String,
    /// `eth0`'s MTU, also set on the TAP: the guest NIC's MTU.
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    InvalidName(#[from] IfnameError),
    #[error(transparent)]
    Antispoof(#[from] AntispoofError),
    #[error("interface {0} not found in the pod network namespace")]
    LinkNotFound(String),
    #[error("interface {0} has no MAC address or MTU")]
    NoMacOrMtu(String),
    #[error("attach to TAP {name}")]
    Attach {
        name: String,
        #[source]
        source: podvisor_vmm_api::tap::TapError,
    },
    #[error("{what} TAP {name}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink connection")]
    Connection(#[source] io::Error),
    #[error("tokio runtime for netlink")]
    Runtime(#[source] io::Error),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> TapError {
    let what = what.into();
    move |source| TapError::Netlink { what, source }
}

/// The errno of a netlink error reply.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// In `netns`: creates the persistent TAP `tap_name` (or reuses it), gives it `cni_ifname`'s
/// MTU, brings it up and redirects traffic between the two with ingress qdiscs and mirred
/// filters: all of it towards the TAP, and towards `cni_ifname` only frames with its MAC
/// and one of the pod's `ips` as their source ([`antispoof`]). Re-running it replaces the
/// qdiscs and filters (no duplicates).
pub fn setup(
    netns: &NetNs,
    cni_ifname: &str,
    tap_name: &str,
    ips: &[IpAddr],
) -> Result<TapLink, TapError> {
    validate_ifname(cni_ifname)?;
    validate_ifname(tap_name)?;
    netns.enter(|| with_netlink(async |h| setup_in_netns(h, cni_ifname, tap_name, ips).await))?
}

/// In `netns`: how many frames the guest sent into the TAP `tap_name` were dropped (the
/// ingress qdisc's drop counter: forged sources, and anything the redirect could not
/// deliver). None when the TAP or its qdisc is not there.
pub fn guest_drops(netns: &NetNs, tap_name: &str) -> Result<Option<u64>, TapError> {
    validate_ifname(tap_name)?;
    netns.enter(|| {
        with_netlink(async |h| match find_link(h, tap_name).await? {
            Some((index, _, _)) => ingress_drops(h, index).await,
            None => Ok(None),
        })
    })?
}

/// In `netns`: removes the filters and qdiscs on `cni_ifname` and deletes the TAP (its own
/// qdisc and filters go with it). Idempotent: a missing namespace, interface or qdisc is
/// fine.
pub fn teardown(netns: &NetNs, cni_ifname: &str, tap_name: &str) -> Result<(), TapError> {
    validate_ifname(cni_ifname)?;
    validate_ifname(tap_name)?;
    match netns.enter(|| with_netlink(async |h| teardown_in_netns(h, cni_ifname, tap_name).await)) {
        Err(NetnsError::NotFound(_)) => Ok(()),
        other => other?,
    }
}

/// Opens a queue of the TAP `name` in the current thread's namespace, creating the
/// interface when it does not exist, exactly as the VMM attaches to it (podvisor-vmm's
/// [`Tap::open`]: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking). Frames read and
/// written through it start with a virtio_net_hdr_v1 of [`VNET_HDR_LEN`] bytes.
pub fn open_queue(name: &str) -> Result<File, TapError> {
    validate_ifname(name)?;
    Tap::open(name)
        .map(Tap::into_file)
        .map_err(|source| TapError::Attach {
            name: name.to_owned(),
            source,
        })
}

/// Creates (or attaches to) the TAP and makes it outlive our file: the VMM attaches later.
fn create_persistent_tap(name: &str) -> Result<(), TapError> {
    let file = open_queue(name)?;
    // SAFETY: the fd is a tun file we own; TUNSETPERSIST takes its argument by value (no
    // pointer). The result is checked.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if ret < 0 {
        return Err(TapError::Ioctl {
            what: "make persistent (TUNSETPERSIST)",
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` with a netlink handle on a current-thread runtime of the calling thread.
fn with_netlink<T, F>(f: F) -> Result<T, TapError>
where
    F: AsyncFnOnce(&Handle) -> Result<T, TapError>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(TapError::Runtime)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(TapError::Connection)?;
        let conn = tokio::spawn(conn);
        let result = f(&handle).await;
        conn.abort();
        result
    })
}

/// A link's index, MAC and MTU, or None when it does not exist.
async fn find_link(h: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>, u32)>, TapError> {
    let mut links = h.link().get().match_name(name).execute();
    let msg: LinkMessage = match links.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(None),
        Err(e) => return Err(nl(format!("get link {name}"))(e)),
    };
    let mut mac = Vec::new();
    let mut mtu = 0;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Address(a) => mac.clone_from(a),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    Ok(Some((msg.header.index, mac, mtu)))
}

async fn setup_in_netns(
    h: &Handle,
    cni_if: &str,
    tap: &str,
    ips: &[IpAddr],
) -> Result<TapLink, TapError> {
    let (eth_index, mac, mtu) = find_link(h, cni_if)
        .await?
        .ok_or_else(|| TapError::LinkNotFound(cni_if.to_owned()))?;
    let (Ok(mac6), true) = (<[u8; 6]>::try_from(mac.as_slice()), mtu > 0) else {
        return Err(TapError::NoMacOrMtu(cni_if.to_owned()));
    };
    let program = Policy::new(mac6, ips).program()?;

    create_persistent_tap(tap)?;
    let (tap_index, _, _) = find_link(h, tap)
        .await?
        .ok_or_else(|| TapError::LinkNotFound(tap.to_owned()))?;
    h.link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {tap} mtu {mtu} up")))?;

    // eth0 -> TAP: everything.
    fresh_ingress_qdisc(h, eth_index, cni_if).await?;
    add_redirect(h, eth_index, cni_if, tap_index).await?;
    // TAP -> eth0: the anti-spoofing filter first, so that nothing passes unchecked.
    fresh_ingress_qdisc(h, tap_index, tap).await?;
    let filter = antispoof::filter_message(index_i32(tap_index), INGRESS_PARENT, &program);
    add_filter(h, filter)
        .await
        .map_err(nl(format!("add anti-spoofing filter on {tap}")))?;
    add_redirect(h, tap_index, tap, eth_index).await?;

    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    tracing::debug!(cni_if, tap, %mac, mtu, ?ips, "TAP redirect and anti-spoofing set up");
    Ok(TapLink {
        tap: tap.to_owned(),
        mac,
        mtu,
    })
}

async fn teardown_in_netns(h: &Handle, cni_if: &str, tap: &str) -> Result<(), TapError> {
    if let Some((index, _, _)) = find_link(h, cni_if).await? {
        del_ingress_qdisc(h, index, cni_if).await?;
    }
    if let Some((index, _, _)) = find_link(h, tap).await? {
        match ingress_drops(h, index).await {
            Ok(Some(n)) if n > 0 => {
                tracing::info!(tap, dropped = n, "frames of the guest dropped at the TAP");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(tap, "read the TAP's drop counter: {e}"),
        }
        match h.link().del(index).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENODEV) => {}
            Err(e) => return Err(nl(format!("delete {tap}"))(e)),
        }
    }
    tracing::debug!(cni_if, tap, "TAP redirect torn down");
    Ok(())
}

/// Gives a link a fresh ingress qdisc: deleting an old one drops its filters, so a re-run
/// does not stack a second redirect.
async fn fresh_ingress_qdisc(h: &Handle, index: u32, name: &str) -> Result<(), TapError> {
    del_ingress_qdisc(h, index, name).await?;
    h.qdisc()
        .add(index_i32(index))
        .ingress()
        .execute()
        .await
        .map_err(nl(format!("add ingress qdisc on {name}")))
}

/// Redirects what arrives on `from` (after its other filters) to `to`.
async fn add_redirect(h: &Handle, from: u32, from_name: &str, to: u32) -> Result<(), TapError> {
    h.traffic_filter(index_i32(from))
        .add()
        .parent(INGRESS_PARENT)
        .priority(REDIRECT_PREF)
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)
        .map_err(nl("build redirect filter"))?
        .execute()
        .await
        .map_err(nl(format!("add redirect filter on {from_name}")))
}

/// Adds a filter rtnetlink has no builder for (`tc filter add`: create, exclusive).
async fn add_filter(h: &Handle, filter: TcMessage) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(filter));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut replies = h.clone().request(req)?;
    while let Some(reply) = replies.next().await {
        if let NetlinkPayload::Error(e) = reply.payload
            && e.code.is_some()
        {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// The drop counter of a link's ingress qdisc; None without one.
async fn ingress_drops(h: &Handle, index: u32) -> Result<Option<u64>, TapError> {
    let mut qdiscs = h.qdisc().get().index(index_i32(index)).ingress().execute();
    while let Some(q) = qdiscs
        .try_next()
        .await
        .map_err(nl(format!("list qdiscs of link {index}")))?
    {
        let ingress = q.header.index == index_i32(index) && q.header.parent == TcHandle::INGRESS;
        if !ingress {
            continue;
        }
        for attr in &q.attributes {
            if let TcAttribute::Stats2(stats) = attr {
                for s in stats {
                    if let TcStats2::Queue(queue) = s {
                        return Ok(Some(u64::from(queue.drops)));
                    }
                }
            }
        }
    }
    Ok(None)
}

/// Deletes the ingress qdisc of a link (and with it all its filters), if it has one.
async fn del_ingress_qdisc(h: &Handle, index: u32, name: &str) -> Result<(), TapError> {
    let mut req = h.qdisc().del(index_i32(index));
    req.message_mut().header.parent = TcHandle::INGRESS;
    match req.execute().await {
        Ok(()) => Ok(()),
        // ENOENT / EINVAL: no ingress qdisc there.
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(e) => Err(nl(format!("delete ingress qdisc on {name}"))(e)),
    }
}

/// Interface indexes are positive `int`s in the kernel; tc messages carry them signed.
fn index_i32(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::process::Command;

    const IPS: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))];

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tc(ns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "tc"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tc {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A namespace with a veth `eth0` (peer in the same namespace), like a CNI plugin leaves.
    #[test]
    fn setup_is_idempotent_and_teardown_cleans_up() {
        let name = format!("pvt-tap-{}", std::process::id());
        let ns = NetNs::create(&name).unwrap();
        ip(&[
            "-n",
            &name,
            "link",
            "add",
            "eth0",
            "mtu",
            "1410",
            "address",
            "02:42:0a:00:00:07",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);

        let link = setup(&ns, "eth0", DEFAULT_TAP_NAME, &IPS).unwrap();
        assert_eq!(
            link,
            TapLink {
                tap: DEFAULT_TAP_NAME.to_owned(),
                mac: "02:42:0a:00:00:07".to_owned(),
                mtu: 1410
            }
        );
        // Twice: still one filter per direction.
        setup(&ns, "eth0", DEFAULT_TAP_NAME, &IPS).unwrap();
        let tap_show = ip(&["-n", &name, "-d", "link", "show", DEFAULT_TAP_NAME]);
        assert!(tap_show.contains("mtu 1410"), "{tap_show}");
        assert!(tap_show.contains("tun type tap"), "{tap_show}");
        assert!(tap_show.contains("persist on"), "{tap_show}");
        for (dev, target) in [("eth0", DEFAULT_TAP_NAME), (DEFAULT_TAP_NAME, "eth0")] {
            let filters = tc(&name, &["filter", "show", "dev", dev, "ingress"]);
            let redirects = filters
                .matches(&format!("Egress Redirect to device {target}"))
                .count();
            assert_eq!(redirects, 1, "{dev}: {filters}");
        }
        // The TAP's anti-spoofing filter, once, in front of its redirect.
        let filters = tc(
            &name,
            &["filter", "show", "dev", DEFAULT_TAP_NAME, "ingress"],
        );
        assert_eq!(filters.matches("direct-action").count(), 1, "{filters}");
        assert!(filters.contains("pref 1 bpf"), "{filters}");
        assert!(filters.contains("pref 2 u32"), "{filters}");
        assert_eq!(guest_drops(&ns, DEFAULT_TAP_NAME).unwrap(), Some(0));

        teardown(&ns, "eth0", DEFAULT_TAP_NAME).unwrap();
        let links = ip(&["-n", &name, "-o", "link", "show"]);
        assert!(!links.contains(DEFAULT_TAP_NAME), "{links}");
        assert_eq!(tc(&name, &["qdisc", "show", "dev", "eth0", "ingress"]), "");
        assert_eq!(tc(&name, &["filter", "show", "ingress"]), "");
        assert_eq!(guest_drops(&ns, DEFAULT_TAP_NAME).unwrap(), None);
        // Idempotent, also once the namespace is gone.
        teardown(&ns, "eth0", DEFAULT_TAP_NAME).unwrap();
        ns.clone().delete().unwrap();
        teardown(&ns, "eth0", DEFAULT_TAP_NAME).unwrap();
    }

    #[test]
    fn missing_interface_and_bad_names() {
        let name = format!("pvt-tapmiss-{}", std::process::id());
        let ns = NetNs::create(&name).unwrap();
        assert!(matches!(
            setup(&ns, "eth0", DEFAULT_TAP_NAME, &IPS),
            Err(TapError::LinkNotFound(n)) if n == "eth0"
        ));
        assert!(matches!(
            setup(&ns, "eth0", "a-name-longer-than-15", &IPS),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(
            setup(&ns, "../x", DEFAULT_TAP_NAME, &IPS),
            Err(TapError::InvalidName(_))
        ));
        ns.delete().unwrap();
    }
}
