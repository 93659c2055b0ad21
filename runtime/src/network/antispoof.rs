//! Anti-spoofing on the TAP: what the guest sends leaves for `eth0` (and the CNI bridge)
//! only when it carries the pod's own MAC and IPs, so a guest cannot pose as the gateway,
//! another pod or another host on the bridge.
//!
//! The rule, for every frame the guest writes into the TAP:
//! - no VLAN tag; source MAC = the pod's MAC;
//! - IPv4: source IP = one of the pod's IPv4s (no `0.0.0.0`: addresses are static from CNI,
//!   there is no DHCP);
//! - ARP: Ethernet/IPv4, sender MAC = the pod's MAC, sender IP = one of the pod's IPv4s;
//! - IPv6, only when the pod has an IPv6 address (else every IPv6 frame is dropped, which
//!   also keeps a guest of an IPv4 cluster from sending router advertisements): source =
//!   one of the pod's IPv6s or the link-local `fe80::` the kernel derives from the MAC
//!   (EUI-64), or `::` for duplicate address detection only (a neighbour solicitation for one
//!   of those addresses) and MLD reports; never a router advertisement, redirect or MLD
//!   query; a neighbour advertisement only for one of those addresses; no routing or
//!   destination-options header (they could hide neighbour discovery). Fragmented neighbour
//!   discovery is left to the receivers (Linux drops it: `suppress_frag_ndisc`, RFC 6980);
//! - any other EtherType: dropped.
//!
//! A pod restored from a VM template has the template's MAC until the agent gives the NIC
//! the pod's (ConfigureNetwork); whatever it sends before is dropped too.
//!
//! How: a classic BPF program generated per pod, run by a `bpf` tc filter in direct-action
//! mode on the TAP's ingress qdisc, in front of the redirect to `eth0` (see
//! [`crate::network::tap`]). It returns `TC_ACT_UNSPEC` for an allowed frame (the next
//! filter, the redirect, takes it) and `TC_ACT_SHOT` for anything else, which the ingress
//! qdisc counts as a drop (`tc -s qdisc show dev tap0_pv ingress`). Why not flower or u32:
//! the hosts this runs on may lack `cls_flower` (this one does), and u32 can match but not
//! drop without `act_gact` (absent too); `cls_bpf` with a classic program needs neither the
//! `bpf(2)` syscall nor a loader, and netlink-packet-route carries it (its `TCA_BPF_OPS`
//! attributes as raw attributes). The filter lives in the pod's namespace: it outlives a
//! podvisord restart and goes with the TAP.
//!
//! A classic BPF load past the end of the frame ends the program with 0, which is
//! `TC_ACT_OK` here (the frame would go to the namespace's own stack, not to `eth0`): every
//! load is preceded by a length check that drops short frames instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_core::DefaultNla;
use rtnetlink::packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};

/// The anti-spoofing filter's preference on the TAP's ingress (it runs first).
pub const FILTER_PREF: u16 = 1;

/// `TCA_BPF_OPS_LEN` and `TCA_BPF_OPS` (linux/pkt_cls.h): a classic program's length and
/// instructions.
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;
/// `BPF_MAXINSNS` (linux/bpf_common.h).
const MAX_INSNS: usize = 4096;

/// tc verdicts (linux/pkt_cls.h): drop, or go on with the next filter (`-1`).
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;

/// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
mod op {
    pub const LD_W_ABS: u16 = 0x20;
    pub const LD_H_ABS: u16 = 0x28;
    pub const LD_B_ABS: u16 = 0x30;
    pub const LD_B_IND: u16 = 0x50;
    pub const LD_LEN: u16 = 0x80;
    pub const ADD_K: u16 = 0x04;
    pub const LSH_K: u16 = 0x64;
    pub const JA: u16 = 0x05;
    pub const JEQ_K: u16 = 0x15;
    pub const JGE_K: u16 = 0x35;
    pub const JGE_X: u16 = 0x3d;
    pub const RET_K: u16 = 0x06;
    pub const TAX: u16 = 0x07;
}

/// `SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT` (linux/filter.h): the ancillary load "the frame
/// has a VLAN tag" (the kernel moved the tag out of the frame before tc runs).
const ANC_VLAN_TAG_PRESENT: u32 = (-0x1000i32 + 48).cast_unsigned();

/// Frame offsets: Ethernet, then the layer 3 header at 14.
const ETH_SRC: u32 = 6;
const ETH_TYPE: u32 = 12;
const L3: u32 = 14;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_ARP: u32 = 0x0806;
const ETH_P_IPV6: u32 = 0x86dd;
/// IPv6 next headers and ICMPv6 types the rule looks at.
const NH_HOP_BY_HOP: u32 = 0;
const NH_ROUTING: u32 = 43;
const NH_DEST_OPTS: u32 = 60;
const NH_ICMPV6: u32 = 58;
const MLD_QUERY: u32 = 130;
const MLD_REPORT: u32 = 131;
const MLD_DONE: u32 = 132;
const MLD2_REPORT: u32 = 143;
const ND_ROUTER_ADVERT: u32 = 134;
const ND_NEIGHBOR_SOLICIT: u32 = 135;
const ND_NEIGHBOR_ADVERT: u32 = 136;
const ND_REDIRECT: u32 = 137;

#[derive(Debug, thiserror::Error)]
pub enum AntispoofError {
    /// More addresses than a classic BPF program can check.
    #[error("the anti-spoofing program has {insns} instructions (at most {MAX_INSNS})")]
    TooLong { insns: usize },
    /// A branch the generator cannot encode (a classic BPF branch goes forward, at most
    /// 255 instructions).
    #[error("anti-spoofing program: instruction {from} cannot branch to {to:?}")]
    Branch { from: usize, to: Option<usize> },
}

/// One classic BPF instruction, `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// What the guest may send as: the pod's MAC and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    mac: [u8; 6],
    v4: Vec<Ipv4Addr>,
    /// The pod's IPv6s and, when there is one, the link-local address of the MAC.
    v6: Vec<Ipv6Addr>,
}

impl Policy {
    /// The policy for a guest NIC with `mac` and the pod's `ips`.
    pub fn new(mac: [u8; 6], ips: &[IpAddr]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for ip in ips {
            match ip {
                IpAddr::V4(a) if !v4.contains(a) => v4.push(*a),
                IpAddr::V6(a) if !v6.contains(a) => v6.push(*a),
                _ => {}
            }
        }
        let ll = link_local(mac);
        if !v6.is_empty() && !v6.contains(&ll) {
            v6.push(ll);
        }
        Self { mac, v4, v6 }
    }

    /// The classic BPF program enforcing the policy (returns `TC_ACT_UNSPEC` to let a
    /// frame through to the next filter, `TC_ACT_SHOT` to drop it).
    pub fn program(&self) -> Result<Vec<Insn>, AntispoofError> {
        let mut a = Asm::default();
        let drop = a.label();
        let pass = a.label();
        a.insn(op::LD_W_ABS, ANC_VLAN_TAG_PRESENT);
        a.expect(0, drop);
        a.expect_len(L3, drop);
        a.expect_mac(ETH_SRC, self.mac, drop);
        a.insn(op::LD_H_ABS, ETH_TYPE);
        let (ipv4, arp, ipv6) = (a.label(), a.label(), a.label());
        a.dispatch(ETH_P_IP, ipv4);
        a.dispatch(ETH_P_ARP, arp);
        if !self.v6.is_empty() {
            a.dispatch(ETH_P_IPV6, ipv6);
        }
        a.ja(drop);

        // IPv4: the source address (header from 14, source at +12).
        a.bind(ipv4);
        a.expect_len(L3 + 20, drop);
        a.v4_in(L3 + 12, &self.v4, pass);
        a.ja(drop);

        // ARP for Ethernet/IPv4: sender MAC at +8, sender IP at +14.
        a.bind(arp);
        a.expect_len(L3 + 28, drop);
        a.insn(op::LD_W_ABS, L3);
        a.expect(0x0001_0800, drop);
        a.insn(op::LD_H_ABS, L3 + 4);
        a.expect(0x0604, drop);
        a.expect_mac(L3 + 8, self.mac, drop);
        a.v4_in(L3 + 14, &self.v4, pass);
        a.ja(drop);

        if !self.v6.is_empty() {
            a.bind(ipv6);
            self.ipv6(&mut a, drop, pass);
        }
        a.bind(drop);
        a.insn(op::RET_K, TC_ACT_SHOT);
        a.bind(pass);
        a.insn(op::RET_K, TC_ACT_UNSPEC);
        a.finish()
    }

    /// IPv6 (header from 14: next header at +6, source at +8, payload at +40).
    fn ipv6(&self, a: &mut Asm, drop: Label, pass: Label) {
        const NEXT: u32 = L3 + 6;
        const SRC: u32 = L3 + 8;
        const PAYLOAD: u32 = L3 + 40;
        // ICMPv6 neighbour solicitation/advertisement: the target at +8.
        const TARGET: u32 = PAYLOAD + 8;
        let (own, unspecified, icmp, hbh, target) =
            (a.label(), a.label(), a.label(), a.label(), a.label());
        a.expect_len(PAYLOAD, drop);
        a.v6_in(SRC, &self.v6, own);
        a.v6_in(SRC, &[Ipv6Addr::UNSPECIFIED], unspecified);
        a.ja(drop);

        a.bind(own);
        a.insn(op::LD_B_ABS, NEXT);
        a.dispatch(NH_ICMPV6, icmp);
        a.dispatch(NH_HOP_BY_HOP, hbh);
        a.dispatch(NH_ROUTING, drop);
        a.dispatch(NH_DEST_OPTS, drop);
        a.ja(pass);

        a.bind(icmp);
        a.expect_len(PAYLOAD + 1, drop);
        a.insn(op::LD_B_ABS, PAYLOAD);
        for t in [ND_ROUTER_ADVERT, ND_REDIRECT, MLD_QUERY] {
            a.dispatch(t, drop);
        }
        a.dispatch(ND_NEIGHBOR_ADVERT, target);
        a.ja(pass);

        // From `::`: duplicate address detection and MLD reports only.
        a.bind(unspecified);
        a.insn(op::LD_B_ABS, NEXT);
        a.dispatch(NH_HOP_BY_HOP, hbh);
        a.expect(NH_ICMPV6, drop);
        a.expect_len(PAYLOAD + 1, drop);
        a.insn(op::LD_B_ABS, PAYLOAD);
        a.expect(ND_NEIGHBOR_SOLICIT, drop);

        a.bind(target);
        a.expect_len(TARGET + 16, drop);
        a.v6_in(TARGET, &self.v6, pass);
        a.ja(drop);

        a.bind(hbh);
        Self::mld_after_hop_by_hop(a, drop, pass);
    }

    /// A hop-by-hop options header (at 54) must be followed by an MLD report or done:
    /// X = its length in bytes (8 * (hdr ext len + 1)), the ICMPv6 type at X + 54.
    fn mld_after_hop_by_hop(a: &mut Asm, drop: Label, pass: Label) {
        const HBH: u32 = L3 + 40;
        a.expect_len(HBH + 2, drop);
        a.insn(op::LD_B_ABS, HBH);
        a.expect(NH_ICMPV6, drop);
        // The ICMPv6 type byte must be in the frame: length >= X + 54 + 1.
        a.insn(op::LD_B_ABS, HBH + 1);
        a.insn(op::ADD_K, 1);
        a.insn(op::LSH_K, 3);
        a.insn(op::ADD_K, HBH + 1);
        a.insn(op::TAX, 0);
        a.insn(op::LD_LEN, 0);
        let long_enough = a.label();
        a.branch(op::JGE_X, 0, To::L(long_enough), To::Next);
        a.ja(drop);
        a.bind(long_enough);
        a.insn(op::LD_B_ABS, HBH + 1);
        a.insn(op::ADD_K, 1);
        a.insn(op::LSH_K, 3);
        a.insn(op::TAX, 0);
        a.insn(op::LD_B_IND, HBH);
        for t in [MLD_REPORT, MLD_DONE, MLD2_REPORT] {
            a.dispatch(t, pass);
        }
        a.ja(drop);
    }
}

/// The link-local address Linux gives a NIC with `mac` (EUI-64, RFC 4291 appendix A).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// The `RTM_NEWTFILTER` body of the filter on the ingress qdisc (`ingress_parent`) of
/// interface `index`: `bpf` in direct-action mode with `program`, for every protocol,
/// preference [`FILTER_PREF`].
pub fn filter_message(index: i32, ingress_parent: u32, program: &[Insn]) -> TcMessage {
    let mut ops = Vec::with_capacity(program.len() * 8);
    for i in program {
        ops.extend(i.code.to_ne_bytes());
        ops.push(i.jt);
        ops.push(i.jf);
        ops.extend(i.k.to_ne_bytes());
    }
    let len = u16::try_from(program.len()).unwrap_or(u16::MAX);
    let mut msg = TcMessage::with_index(index);
    msg.header.parent = ingress_parent.into();
    msg.header.info = u32::from(TcHandle {
        major: FILTER_PREF,
        minor: (libc::ETH_P_ALL as u16).to_be(),
    });
    msg.attributes
        .push(TcAttribute::Kind(TcFilterBpf::KIND.to_owned()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
            TCA_BPF_OPS_LEN,
            len.to_ne_bytes().to_vec(),
        ))),
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(TCA_BPF_OPS, ops))),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    msg
}

/// A position in the program, bound once; branches only go forward.
#[derive(Debug, Clone, Copy)]
struct Label(usize);

/// Where a conditional branch goes.
#[derive(Debug, Clone, Copy)]
enum To {
    Next,
    L(Label),
}

/// A classic BPF assembler with forward labels. Conditional branches stay short (a few
/// instructions); longer ways go through `ja`, whose offset has 32 bits.
#[derive(Debug, Default)]
struct Asm {
    insns: Vec<Insn>,
    /// Instructions whose offsets name labels: (index, jt or ja target, jf target).
    fixups: Vec<(usize, To, To)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }

    fn insn(&mut self, code: u16, k: u32) {
        self.insns.push(Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn branch(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.fixups.push((self.insns.len(), jt, jf));
        self.insn(code, k);
    }

    fn ja(&mut self, to: Label) {
        self.branch(op::JA, 0, To::L(to), To::Next);
    }

    /// Goes to `to` when A == `k`, on otherwise.
    fn dispatch(&mut self, k: u32, to: Label) {
        let other = self.label();
        self.branch(op::JEQ_K, k, To::Next, To::L(other));
        self.ja(to);
        self.bind(other);
    }

    /// Goes on when A == `k`, to `drop` otherwise.
    fn expect(&mut self, k: u32, drop: Label) {
        let ok = self.label();
        self.branch(op::JEQ_K, k, To::L(ok), To::Next);
        self.ja(drop);
        self.bind(ok);
    }

    /// Goes on when the frame has at least `len` bytes, to `drop` otherwise.
    fn expect_len(&mut self, len: u32, drop: Label) {
        self.insn(op::LD_LEN, 0);
        let ok = self.label();
        self.branch(op::JGE_K, len, To::L(ok), To::Next);
        self.ja(drop);
        self.bind(ok);
    }

    /// Goes on when the 6 bytes at `off` are `mac`, to `drop` otherwise.
    fn expect_mac(&mut self, off: u32, mac: [u8; 6], drop: Label) {
        self.insn(op::LD_W_ABS, off);
        self.expect(u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]), drop);
        self.insn(op::LD_H_ABS, off + 4);
        self.expect(u32::from(u16::from_be_bytes([mac[4], mac[5]])), drop);
    }

    /// Goes to `hit` when the IPv4 address at `off` is in `set`, on otherwise.
    fn v4_in(&mut self, off: u32, set: &[Ipv4Addr], hit: Label) {
        self.insn(op::LD_W_ABS, off);
        for a in set {
            self.dispatch(u32::from(*a), hit);
        }
    }

    /// Goes to `hit` when the IPv6 address at `off` is in `set`, on otherwise.
    fn v6_in(&mut self, off: u32, set: &[Ipv6Addr], hit: Label) {
        for a in set {
            let other = self.label();
            let o = a.octets();
            for (w, word) in o.chunks_exact(4).enumerate() {
                self.insn(op::LD_W_ABS, off + 4 * w as u32);
                let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
                self.branch(op::JEQ_K, word, To::Next, To::L(other));
            }
            self.ja(hit);
            self.bind(other);
        }
    }

    /// Resolves the labels: the program.
    fn finish(mut self) -> Result<Vec<Insn>, AntispoofError> {
        if self.insns.len() > MAX_INSNS {
            return Err(AntispoofError::TooLong {
                insns: self.insns.len(),
            });
        }
        for &(at, jt, jf) in &self.fixups {
            let offset = |to: To| -> Result<u32, AntispoofError> {
                let To::L(l) = to else { return Ok(0) };
                let target = self.labels[l.0];
                target
                    .and_then(|t| t.checked_sub(at + 1))
                    .and_then(|d| u32::try_from(d).ok())
                    .ok_or(AntispoofError::Branch {
                        from: at,
                        to: target,
                    })
            };
            let short = |d: u32| {
                u8::try_from(d).map_err(|_| AntispoofError::Branch {
                    from: at,
                    to: Some(at + 1 + d as usize),
                })
            };
            let insn = &mut self.insns[at];
            if insn.code == op::JA {
                insn.k = offset(jt)?;
            } else {
                insn.jt = short(offset(jt)?)?;
                insn.jf = short(offset(jf)?)?;
            }
        }
        Ok(self.insns)
    }
}

#[cfg(test)]
mod tests {
    //! Real frames through a real TAP: the test is the guest. It writes frames into the TAP
    //! that [`tap::setup`] made next to a veth `eth0` and reads what comes out of the veth's
    //! other end (`peer0`) with an AF_PACKET socket; the TAP's ingress drop counter must
    //! count exactly the forged ones. Runs as root, in a namespace of its own.

    use super::*;
    use crate::network::netns::NetNs;
    use crate::network::tap;
    use podvisor_vmm_api::tap::VNET_HDR_LEN;
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::Command;
    use std::time::{Duration, Instant};

    const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x00, 0x07];
    const FORGED_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x00, 0x01];
    const IP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);
    const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);
    const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const BCAST: [u8; 6] = [0xff; 6];
    const MARK: &[u8] = b"PVAS:";

    fn marker(name: &str) -> Vec<u8> {
        [MARK, name.as_bytes(), b";"].concat()
    }

    fn eth(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        [&BCAST[..], &src, &ethertype.to_be_bytes(), payload].concat()
    }

    fn ipv4_udp(src: Ipv4Addr, name: &str) -> Vec<u8> {
        let data = marker(name);
        let udp_len = 8 + data.len() as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip.extend(src.octets());
        ip.extend(GW4.octets());
        ip.extend([0x30, 0x39, 0, 9]);
        ip.extend(udp_len.to_be_bytes());
        ip.extend([0, 0]);
        ip.extend(data);
        ip
    }

    fn arp(sha: [u8; 6], spa: Ipv4Addr, name: &str) -> Vec<u8> {
        let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
        a.extend(sha);
        a.extend(spa.octets());
        a.extend([0; 6]);
        a.extend(GW4.octets());
        a.extend(marker(name));
        a
    }

    fn ipv6(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
        h.extend([next, 255]);
        h.extend(src.octets());
        h.extend(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
        h.extend(payload);
        h
    }

    fn udp6(src: Ipv6Addr, name: &str) -> Vec<u8> {
        ipv6(
            src,
            17,
            &[&[0x30, 0x39, 0, 9, 0, 0, 0, 0][..], &marker(name)].concat(),
        )
    }

    /// ICMPv6 of `t`, with a neighbour discovery target (unused by other types).
    fn icmp6(t: u8, target: Ipv6Addr, name: &str) -> Vec<u8> {
        [
            &[t, 0, 0, 0, 0, 0, 0, 0][..],
            &target.octets(),
            &marker(name),
        ]
        .concat()
    }

    /// A hop-by-hop header of `8 * (len + 1)` bytes (Pad1 options) before `next`.
    fn hbh(next: u8, len: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![next, len];
        h.resize(8 * (usize::from(len) + 1), 0);
        h.extend(payload);
        h
    }

    /// Every kind of frame, and whether the pod (IP4 and IP6) may send it.
    fn dual_stack_frames() -> Vec<(&'static str, Vec<u8>, bool)> {
        let ll = link_local(MAC);
        let unspec = Ipv6Addr::UNSPECIFIED;
        let e6 = |src, next, payload: Vec<u8>| eth(MAC, 0x86dd, &ipv6(src, next, &payload));
        let vlan = eth(
            MAC,
            0x8100,
            &[&[0, 5, 0x08, 0x00][..], &ipv4_udp(IP4, "vlan")].concat(),
        );
        // Frames that end inside what the filter reads (it must drop them, not run off the
        // end): an IPv4 header cut before the source address (26 bytes), an advertisement
        // whose target is the pod's but for its last 4 bytes (marked in the destination).
        let short4 = eth(MAC, 0x0800, &marker("short4"));
        let na_body = [&[136, 0, 0, 0, 0, 0, 0, 0][..], &IP6.octets()[..12]].concat();
        let mut short_na = e6(IP6, 58, na_body);
        short_na[38..52].copy_from_slice(&marker("short-na"));
        vec![
            ("udp4", eth(MAC, 0x0800, &ipv4_udp(IP4, "udp4")), true),
            ("arp", eth(MAC, 0x0806, &arp(MAC, IP4, "arp")), true),
            ("udp6", eth(MAC, 0x86dd, &udp6(IP6, "udp6")), true),
            ("udp6-ll", eth(MAC, 0x86dd, &udp6(ll, "udp6-ll")), true),
            ("ns-dad", e6(unspec, 58, icmp6(135, IP6, "ns-dad")), true),
            ("na-own", e6(ll, 58, icmp6(136, IP6, "na-own")), true),
            ("ns-any", e6(IP6, 58, icmp6(135, GW6, "ns-any")), true),
            (
                "mld-unspec",
                e6(unspec, 0, hbh(58, 0, &icmp6(143, GW6, "mld-unspec"))),
                true,
            ),
            (
                "mld-ll",
                e6(ll, 0, hbh(58, 1, &icmp6(131, GW6, "mld-ll"))),
                true,
            ),
            ("frag6", e6(IP6, 44, marker("frag6")), true),
            ("mac", eth(FORGED_MAC, 0x0800, &ipv4_udp(IP4, "mac")), false),
            ("ip4", eth(MAC, 0x0800, &ipv4_udp(GW4, "ip4")), false),
            (
                "ip4-zero",
                eth(MAC, 0x0800, &ipv4_udp(Ipv4Addr::UNSPECIFIED, "ip4-zero")),
                false,
            ),
            (
                "arp-spa",
                eth(MAC, 0x0806, &arp(MAC, GW4, "arp-spa")),
                false,
            ),
            (
                "arp-sha",
                eth(MAC, 0x0806, &arp(FORGED_MAC, IP4, "arp-sha")),
                false,
            ),
            ("vlan", vlan, false),
            ("short4", short4, false),
            ("lldp", eth(MAC, 0x88cc, &marker("lldp")), false),
            ("ip6", eth(MAC, 0x86dd, &udp6(GW6, "ip6")), false),
            (
                "udp6-unspec",
                eth(MAC, 0x86dd, &udp6(unspec, "udp6-unspec")),
                false,
            ),
            ("ra", e6(ll, 58, icmp6(134, unspec, "ra")), false),
            ("redirect", e6(ll, 58, icmp6(137, GW6, "redirect")), false),
            (
                "mld-query",
                e6(ll, 58, icmp6(130, unspec, "mld-query")),
                false,
            ),
            (
                "mld-query-hbh",
                e6(ll, 0, hbh(58, 0, &icmp6(130, unspec, "mld-query-hbh"))),
                false,
            ),
            ("na-gw", e6(IP6, 58, icmp6(136, GW6, "na-gw")), false),
            (
                "ns-dad-gw",
                e6(unspec, 58, icmp6(135, GW6, "ns-dad-gw")),
                false,
            ),
            (
                "na-unspec",
                e6(unspec, 58, icmp6(136, IP6, "na-unspec")),
                false,
            ),
            ("short-na", short_na, false),
            ("routing", e6(IP6, 43, marker("routing")), false),
            ("dstopts", e6(IP6, 60, marker("dstopts")), false),
            ("hbh-udp", e6(IP6, 0, hbh(17, 0, &marker("hbh-udp"))), false),
            (
                "hbh-short",
                e6(ll, 0, [&[58, 5][..], &marker("hbh-short")].concat()),
                false,
            ),
            ("end", eth(MAC, 0x0800, &ipv4_udp(IP4, "end")), true),
        ]
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    /// Deletes the test's namespace (and all in it) also when an assertion fails.
    struct TestNs(NetNs);

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = self.0.clone().delete();
        }
    }

    /// An AF_PACKET socket on `ifname` of the current thread's namespace, 100 ms timeouts.
    fn capture(ifname: &str) -> OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no {ifname}");
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = i32::try_from(index).unwrap();
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_ll of `len` bytes that outlives the call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let tv_len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: tv is a valid timeval of `tv_len` bytes that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                tv_len,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        fd
    }

    /// The markers in the frames `fd` receives until every one of `want` came, or 10 s.
    fn markers_until(fd: &OwnedFd, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen: Vec<String> = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline && !want.iter().all(|w| seen.iter().any(|s| s == w)) {
            // SAFETY: buf is valid for writes of buf.len() bytes for the whole call.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let frame = &buf[..n];
            if let Some(at) = frame.windows(MARK.len()).position(|w| w == MARK) {
                let rest = &frame[at + MARK.len()..];
                let end = rest.iter().position(|b| *b == b';').unwrap_or(rest.len());
                seen.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
        }
        seen
    }

    /// Sets the TAP up for a pod with `ips` next to a veth `eth0` with [`MAC`], writes
    /// `frames` into it as the guest, and returns the markers that came out of the veth's
    /// peer and the TAP's drop count. Nothing is left afterwards.
    fn send_as_guest(
        tag: &str,
        ips: &[IpAddr],
        frames: &[(&str, Vec<u8>, bool)],
    ) -> (Vec<String>, u64) {
        let name = format!("pvt-as{tag}-{}", std::process::id());
        let ns = TestNs(NetNs::create(&name).unwrap());
        let mac = MAC.map(|b| format!("{b:02x}")).join(":");
        ip(&[
            "-n", &name, "link", "add", "eth0", "address", &mac, "type", "veth", "peer", "name",
            "peer0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "peer0", "up"]);
        tap::setup(&ns.0, "eth0", tap::DEFAULT_TAP_NAME, ips).unwrap();
        let want: Vec<&str> = frames.iter().filter(|f| f.2).map(|f| f.0).collect();
        let seen =
            ns.0.enter(|| {
                let peer = capture("peer0");
                let mut queue = tap::open_queue(tap::DEFAULT_TAP_NAME).unwrap();
                for (what, frame, _) in frames {
                    let mut out = vec![0u8; VNET_HDR_LEN];
                    out.extend(frame);
                    let n = queue.write(&out).unwrap();
                    assert_eq!(n, out.len(), "{what}");
                }
                markers_until(&peer, &want)
            })
            .unwrap();
        let drops = tap::guest_drops(&ns.0, tap::DEFAULT_TAP_NAME).unwrap();
        tap::teardown(&ns.0, "eth0", tap::DEFAULT_TAP_NAME).unwrap();
        (seen, drops.unwrap())
    }

    #[test]
    fn only_the_pods_own_frames_leave_the_tap() {
        let frames = dual_stack_frames();
        let (seen, drops) = send_as_guest("d", &[IP4.into(), IP6.into()], &frames);
        println!("passed: {seen:?}; dropped: {drops}");
        let allowed: Vec<&str> = frames.iter().filter(|f| f.2).map(|f| f.0).collect();
        let mut got: Vec<&str> = seen.iter().map(String::as_str).collect();
        got.sort_unstable();
        got.dedup();
        let mut want = allowed.clone();
        want.sort_unstable();
        assert_eq!(got, want, "frames that left the TAP");
        assert_eq!(drops, (frames.len() - allowed.len()) as u64, "drop counter");
    }

    #[test]
    fn a_pod_without_ipv6_sends_no_ipv6() {
        let ll = link_local(MAC);
        let frames = vec![
            ("udp4", eth(MAC, 0x0800, &ipv4_udp(IP4, "udp4")), true),
            ("udp6-ll", eth(MAC, 0x86dd, &udp6(ll, "udp6-ll")), false),
            (
                "ns-dad",
                eth(
                    MAC,
                    0x86dd,
                    &ipv6(Ipv6Addr::UNSPECIFIED, 58, &icmp6(135, ll, "ns-dad")),
                ),
                false,
            ),
            ("end", eth(MAC, 0x0800, &ipv4_udp(IP4, "end")), true),
        ];
        let (seen, drops) = send_as_guest("4", &[IP4.into()], &frames);
        println!("passed: {seen:?}; dropped: {drops}");
        assert_eq!(seen, ["udp4", "end"]);
        assert_eq!(drops, 2);
    }

    #[test]
    fn link_local_is_eui64_of_the_mac() {
        assert_eq!(
            link_local(MAC),
            "fe80::42:aff:fe00:7".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn branches_stay_encodable_with_many_addresses() {
        let ips: Vec<IpAddr> = (1..=40u16)
            .flat_map(|i| {
                [
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8)),
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)),
                ]
            })
            .collect();
        let program = Policy::new(MAC, &ips).program().unwrap();
        assert!(program.len() < MAX_INSNS, "{}", program.len());
        let ips: Vec<IpAddr> = (0..1000u16)
            .map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)))
            .collect();
        assert!(matches!(
            Policy::new(MAC, &ips).program(),
            Err(AntispoofError::TooLong { .. })
        ));
    }
}
