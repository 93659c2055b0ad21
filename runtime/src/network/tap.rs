//! The host side of a pod's network ("tcfilter", as kata-containers calls it): the CNI
//! plugins leave a veth end (`eth0`) with the pod's IP in the pod's network namespace; we
//! add a persistent TAP next to it for the VMM, and two tc `mirred` redirects glue them:
//! whatever arrives on `eth0` leaves through the TAP (to the guest) and whatever the guest
//! sends into the TAP leaves through `eth0`. The guest NIC uses `eth0`'s MAC and MTU, so the
//! rest of the network (the bridge, ARP caches, the CNI plugins) never notices the VM.
//!
//! Everything runs inside the namespace on a thread of [`NetNs::enter`], with a
//! current-thread tokio runtime for the netlink calls (a netlink socket talks to the
//! namespace it was opened in). The functions block: call them from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};

use podvisor_common::{IfnameError, validate_ifname};
use podvisor_vmm_api::tap::Tap;
#[cfg(doc)]
use podvisor_vmm_api::tap::VNET_HDR_LEN;

use crate::network::netns::{NetNs, NetnsError};

/// The TAP name the runtime uses in every pod namespace.
pub const DEFAULT_TAP_NAME: &str = "tap0_pv";

/// `ffff:`, the ingress qdisc's handle and the parent of its filters.
const INGRESS_PARENT: u32 = 0xffff_0000;

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
/// MTU, brings it up and redirects all traffic between the two with ingress qdiscs and
/// mirred filters. Re-running it replaces the qdiscs and filters (no duplicates).
pub fn setup(netns: &NetNs, cni_ifname: &str, tap_name: &str) -> Result<TapLink, TapError> {
    validate_ifname(cni_ifname)?;
    validate_ifname(tap_name)?;
    netns.enter(|| with_netlink(async |h| setup_in_netns(h, cni_ifname, tap_name).await))?
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

async fn setup_in_netns(h: &Handle, cni_if: &str, tap: &str) -> Result<TapLink, TapError> {
    let (eth_index, mac, mtu) = find_link(h, cni_if)
        .await?
        .ok_or_else(|| TapError::LinkNotFound(cni_if.to_owned()))?;
    if mac.len() != 6 || mtu == 0 {
        return Err(TapError::NoMacOrMtu(cni_if.to_owned()));
    }

    create_persistent_tap(tap)?;
    let (tap_index, _, _) = find_link(h, tap)
        .await?
        .ok_or_else(|| TapError::LinkNotFound(tap.to_owned()))?;
    h.link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {tap} mtu {mtu} up")))?;

    for (from, from_name, to) in [(eth_index, cni_if, tap_index), (tap_index, tap, eth_index)] {
        // A fresh ingress qdisc: deleting an old one drops its filters, so a re-run
        // does not stack a second redirect.
        del_ingress_qdisc(h, from, from_name).await?;
        h.qdisc()
            .add(index_i32(from))
            .ingress()
            .execute()
            .await
            .map_err(nl(format!("add ingress qdisc on {from_name}")))?;
        h.traffic_filter(index_i32(from))
            .add()
            .parent(INGRESS_PARENT)
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(nl("build redirect filter"))?
            .execute()
            .await
            .map_err(nl(format!("add redirect filter on {from_name}")))?;
    }

    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    tracing::debug!(cni_if, tap, %mac, mtu, "TAP redirect set up");
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
        match h.link().del(index).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENODEV) => {}
            Err(e) => return Err(nl(format!("delete {tap}"))(e)),
        }
    }
    tracing::debug!(cni_if, tap, "TAP redirect torn down");
    Ok(())
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
    use std::process::Command;

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

        let link = setup(&ns, "eth0", DEFAULT_TAP_NAME).unwrap();
        assert_eq!(
            link,
            TapLink {
                tap: DEFAULT_TAP_NAME.to_owned(),
                mac: "02:42:0a:00:00:07".to_owned(),
                mtu: 1410
            }
        );
        // Twice: still one filter per direction.
        setup(&ns, "eth0", DEFAULT_TAP_NAME).unwrap();
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

        teardown(&ns, "eth0", DEFAULT_TAP_NAME).unwrap();
        let links = ip(&["-n", &name, "-o", "link", "show"]);
        assert!(!links.contains(DEFAULT_TAP_NAME), "{links}");
        assert_eq!(tc(&name, &["qdisc", "show", "dev", "eth0", "ingress"]), "");
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
            setup(&ns, "eth0", DEFAULT_TAP_NAME),
            Err(TapError::LinkNotFound(n)) if n == "eth0"
        ));
        assert!(matches!(
            setup(&ns, "eth0", "a-name-longer-than-15"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(
            setup(&ns, "../x", DEFAULT_TAP_NAME),
            Err(TapError::InvalidName(_))
        ));
        ns.delete().unwrap();
    }
}
