//! `guest-probe spoof IFACE OWN_IP GATEWAY_IP TAG`: as a hostile guest, sends raw Ethernet
//! frames out of IFACE with an AF_PACKET socket (CAP_NET_RAW), each to the broadcast MAC
//! and carrying the marker `PVSPOOF-<TAG>-<kind>;`, in this order:
//!
//! - `mac`: a UDP packet from OWN_IP, but from a source MAC that is not IFACE's;
//! - `ip`: a UDP packet from IFACE's MAC, but from GATEWAY_IP;
//! - `arp`: a gratuitous ARP from IFACE's MAC claiming GATEWAY_IP;
//! - `ok`: a UDP packet from IFACE's MAC and OWN_IP (the one that must get through).
//!
//! One line per frame sent: `SPOOF-SENT <kind> <marker>`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A locally administered MAC that is nobody's.
const FORGED_MAC: [u8; 6] = [0x02, 0x70, 0x76, 0x66, 0x6f, 0x72];
const BROADCAST: [u8; 6] = [0xff; 6];

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Sends the four frames; the lines to print, one per frame sent.
pub fn spoof(iface: &str, own_ip: &str, gateway: &str, tag: &str) -> Result<Vec<String>, String> {
    let own_ip: Ipv4Addr = own_ip.parse().map_err(|_| format!("bad IP {own_ip:?}"))?;
    let gateway: Ipv4Addr = gateway.parse().map_err(|_| format!("bad IP {gateway:?}"))?;
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let (index, mac) = interface(&sock, iface)?;
    let marker = |kind: &str| format!("PVSPOOF-{tag}-{kind};");
    let frames = [
        ("mac", udp(FORGED_MAC, own_ip, gateway, &marker("mac"))),
        ("ip", udp(mac, gateway, gateway, &marker("ip"))),
        ("arp", gratuitous_arp(mac, gateway, &marker("arp"))),
        ("ok", udp(mac, own_ip, gateway, &marker("ok"))),
    ];
    let mut lines = Vec::new();
    for (kind, frame) in frames {
        send(&sock, index, &frame).map_err(|e| format!("send {kind} (after {lines:?}): {e}"))?;
        lines.push(format!("SPOOF-SENT {kind} {}", marker(kind)));
    }
    Ok(lines)
}

/// IFACE's index and MAC.
fn interface(sock: &OwnedFd, iface: &str) -> Result<(i32, [u8; 6]), String> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.is_empty() || name.len() >= ifr.ifr_name.len() {
        return Err(format!("bad interface name {iface:?}"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq with a NUL-terminated name; the kernel writes the index
    // into it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) } != 0 {
        return Err(os_err(&format!("SIOCGIFINDEX {iface}")));
    }
    // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
    let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
    // SAFETY: as above; the kernel writes the hardware address into it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } != 0 {
        return Err(os_err(&format!("SIOCGIFHWADDR {iface}")));
    }
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data) {
        *d = s as u8;
    }
    Ok((index, mac))
}

fn send(sock: &OwnedFd, index: i32, frame: &[u8]) -> Result<(), String> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = index;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&BROADCAST);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: frame and `to` are valid for the given lengths for the whole call.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            len,
        )
    };
    if n != frame.len() as isize {
        return Err(os_err("sendto"));
    }
    Ok(())
}

fn ethernet(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&BROADCAST[..], &src, &ethertype.to_be_bytes(), payload].concat()
}

/// A UDP datagram (port 9, no checksum) in an IPv4 packet with a correct header checksum.
fn udp(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, data: &str) -> Vec<u8> {
    let udp_len = 8 + data.len() as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let sum = ip
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    ip.extend([0x9c, 0x40, 0, 9]);
    ip.extend(udp_len.to_be_bytes());
    ip.extend([0, 0]);
    ip.extend(data.as_bytes());
    ethernet(src_mac, 0x0800, &ip)
}

/// An ARP request from `mac` for `ip` with `ip` as the sender: "`ip` is at `mac`".
fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr, data: &str) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    arp.extend(mac);
    arp.extend(ip.octets());
    arp.extend([0; 6]);
    arp.extend(ip.octets());
    arp.extend(data.as_bytes());
    ethernet(mac, 0x0806, &arp)
}
