//! Where access is decided: a pure function of (policy, peer identity).
//!
//! The socket code only gathers the identity (SO_PEERCRED, the vsock peer CID, the TCP source
//! address); this file decides. Deny unless allowed:
//! - UNIX: the peer's uid is in `uids` or its primary gid is in `gids`. Config fills `uids` with
//!   the relay's own uid when the operator names neither.
//! - TCP: the source address is inside one of `nets`, or `any_ip` was written explicitly.
//!   An IPv4-mapped IPv6 source (`::ffff:a.b.c.d`) is judged as the IPv4 address it is.
//! - vsock: the peer CID is in `cids`, or `any_cid` was written explicitly.
//!
//! A peer of a kind the listener does not serve is refused (it cannot happen; refusing is the
//! safe answer if it ever does).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Who may connect to the listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub nets: Vec<IpNet>,
    pub any_ip: bool,
    pub cids: Vec<u32>,
    pub any_cid: bool,
}

/// Who a peer is, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Unix { pid: i32, uid: u32, gid: u32 },
    Tcp(SocketAddr),
    Vsock { cid: u32, port: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    Deny(&'static str),
}

impl Policy {
    /// Who is admitted on a listener of `family` ("unix", "tcp", "vsock"), in words: what
    /// `--check` prints, so an operator sees the rule that will be enforced.
    pub fn admits(&self, family: &str) -> String {
        fn list<T: fmt::Display>(items: &[T]) -> String {
            items.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
        }
        match family {
            "unix" => {
                let mut rules = Vec::new();
                if !self.uids.is_empty() {
                    rules.push(format!("uid {}", list(&self.uids)));
                }
                if !self.gids.is_empty() {
                    rules.push(format!("gid {}", list(&self.gids)));
                }
                if rules.is_empty() { "admits nobody".into() } else { format!("admits {}", rules.join(" or ")) }
            }
            "tcp" if self.any_ip => "admits any source address".into(),
            "tcp" if self.nets.is_empty() => "admits nobody".into(),
            "tcp" => format!("admits source {}", list(&self.nets)),
            "vsock" if self.any_cid => "admits any CID".into(),
            "vsock" if self.cids.is_empty() => "admits nobody".into(),
            "vsock" => format!("admits CID {}", list(&self.cids)),
            other => format!("admits nobody (unknown family {other})"),
        }
    }
}

/// The whole access decision.
pub fn decide(policy: &Policy, peer: &Peer) -> Verdict {
    match *peer {
        Peer::Unix { uid, gid, .. } => {
            if policy.uids.contains(&uid) || policy.gids.contains(&gid) {
                Verdict::Admit
            } else {
                Verdict::Deny("uid/gid not allowed")
            }
        }
        Peer::Tcp(addr) => {
            let ip = canonical_ip(addr.ip());
            if policy.any_ip || policy.nets.iter().any(|net| net.contains(&ip)) {
                Verdict::Admit
            } else {
                Verdict::Deny("source address not allowed")
            }
        }
        Peer::Vsock { cid, .. } => {
            if policy.any_cid || policy.cids.contains(&cid) {
                Verdict::Admit
            } else {
                Verdict::Deny("CID not allowed")
            }
        }
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address it carries: `::ffff:10.0.0.9` must meet the
/// IPv4 rules, never slip past them as "some IPv6 address".
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `--allow-ip` rule: a CIDR, or a bare address meaning exactly that host. Host bits are
/// cleared and a mapped rule becomes the IPv4 network it means ([`canonical_net`]), so the
/// stored rule is the network peers are judged against. None when the text is neither.
pub fn parse_rule(text: &str) -> Option<IpNet> {
    let net = text.parse::<IpNet>().or_else(|_| text.parse::<IpAddr>().map(IpNet::from)).ok()?;
    Some(canonical_net(net.trunc()))
}

/// A rule written as an IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is turned into the
/// IPv4 network it means, since peers are judged by their canonical address.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.network().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { pid, uid, gid } => write!(f, "unix pid={pid} uid={uid} gid={gid}"),
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
            Peer::Vsock { cid, port } => write!(f, "vsock cid={cid} port={port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> Peer {
        Peer::Tcp(s.parse().unwrap())
    }

    fn nets(list: &[&str]) -> Policy {
        Policy { nets: list.iter().map(|n| canonical_net(n.parse().unwrap())).collect(), ..Policy::default() }
    }

    #[test]
    fn empty_policy_denies_everyone() {
        let p = Policy::default();
        assert!(matches!(decide(&p, &Peer::Unix { pid: 1, uid: 0, gid: 0 }), Verdict::Deny(_)));
        assert!(matches!(decide(&p, &tcp("127.0.0.1:1")), Verdict::Deny(_)));
        assert!(matches!(decide(&p, &Peer::Vsock { cid: 3, port: 1 }), Verdict::Deny(_)));
    }

    #[test]
    fn unix_by_uid_or_primary_gid() {
        let p = Policy { uids: vec![64055], gids: vec![108], ..Policy::default() };
        assert_eq!(decide(&p, &Peer::Unix { pid: 9, uid: 64055, gid: 1 }), Verdict::Admit);
        assert_eq!(decide(&p, &Peer::Unix { pid: 9, uid: 1000, gid: 108 }), Verdict::Admit);
        assert!(matches!(decide(&p, &Peer::Unix { pid: 9, uid: 0, gid: 0 }), Verdict::Deny(_)));
        assert!(matches!(decide(&p, &Peer::Unix { pid: 9, uid: 65534, gid: 65534 }), Verdict::Deny(_)));
    }

    #[test]
    fn tcp_cidr_v4_and_v6() {
        let p = nets(&["127.0.0.2/32", "2001:db8::/32"]);
        assert_eq!(decide(&p, &tcp("127.0.0.2:5000")), Verdict::Admit);
        assert!(matches!(decide(&p, &tcp("127.0.0.3:5000")), Verdict::Deny(_)));
        assert_eq!(decide(&p, &tcp("[2001:db8::9]:1")), Verdict::Admit);
        assert!(matches!(decide(&p, &tcp("[::1]:1")), Verdict::Deny(_)));
    }

    #[test]
    fn mapped_ipv4_is_judged_as_ipv4() {
        let p = nets(&["127.0.0.2/32"]);
        assert_eq!(decide(&p, &tcp("[::ffff:127.0.0.2]:1")), Verdict::Admit);
        assert!(matches!(decide(&p, &tcp("[::ffff:127.0.0.3]:1")), Verdict::Deny(_)));
        // A v6 rule covering all of ::/0 must not admit a mapped v4 source outside the v4 rules...
        let p6 = nets(&["2001:db8::/32"]);
        assert!(matches!(decide(&p6, &tcp("[::ffff:10.0.0.9]:1")), Verdict::Deny(_)));
        // ...and a rule written in mapped form means the v4 network.
        let mapped_rule = nets(&["::ffff:10.0.0.0/104"]);
        assert_eq!(mapped_rule.nets[0], "10.0.0.0/8".parse::<IpNet>().unwrap());
        assert_eq!(decide(&mapped_rule, &tcp("10.1.2.3:1")), Verdict::Admit);
        assert_eq!(decide(&mapped_rule, &tcp("[::ffff:10.1.2.3]:1")), Verdict::Admit);
    }

    #[test]
    fn any_ip_and_any_cid_are_explicit_opt_outs() {
        let p = Policy { any_ip: true, any_cid: true, ..Policy::default() };
        assert_eq!(decide(&p, &tcp("192.0.2.1:1")), Verdict::Admit);
        assert_eq!(decide(&p, &Peer::Vsock { cid: 77, port: 1 }), Verdict::Admit);
        // ...and neither one opens the UNIX listener.
        assert!(matches!(decide(&p, &Peer::Unix { pid: 1, uid: 5, gid: 5 }), Verdict::Deny(_)));
    }

    #[test]
    fn vsock_by_cid() {
        let p = Policy { cids: vec![1, 42], ..Policy::default() };
        assert_eq!(decide(&p, &Peer::Vsock { cid: 42, port: 1024 }), Verdict::Admit);
        assert!(matches!(decide(&p, &Peer::Vsock { cid: 2, port: 1024 }), Verdict::Deny(_)));
    }
}
