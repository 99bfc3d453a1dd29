//! `--allow-ip` rules and the TCP access decision: a rule that parses is stored in canonical
//! form (host bits cleared, an IPv4-mapped rule as the IPv4 network it means) and prints back to
//! text that parses to the same rule; a peer is admitted exactly when the rule contains its
//! canonical address, and an IPv4 peer is judged the same whether it arrives as itself or
//! mapped (`::ffff:a.b.c.d`).
#![no_main]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kvmi_relay::access::{Peer, Policy, Verdict, canonical_ip, canonical_net, decide, parse_rule};
use libfuzzer_sys::fuzz_target;

// Input: 16 address bytes, 2 port bytes, then the rule's text.
fuzz_target!(|data: &[u8]| {
    let Some((head, text)) = data.split_at_checked(18) else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let addr: [u8; 16] = head[..16].try_into().unwrap();
    let port = u16::from_le_bytes([head[16], head[17]]);
    let Some(net) = parse_rule(text) else { return };
    assert_eq!(net, net.trunc(), "{text:?}: host bits kept");
    assert_eq!(canonical_net(net), net, "{text:?}: not canonical");
    assert_eq!(parse_rule(&net.to_string()), Some(net), "{text:?} printed as {net}");

    let policy = Policy { nets: vec![net], ..Policy::default() };
    let v4 = Ipv4Addr::from([addr[0], addr[1], addr[2], addr[3]]);
    let v6 = Ipv6Addr::from(addr);
    for ip in [IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_mapped()), IpAddr::V6(v6)] {
        let verdict = decide(&policy, &Peer::Tcp(SocketAddr::new(ip, port)));
        let contained = net.contains(&canonical_ip(ip));
        assert_eq!(verdict == Verdict::Admit, contained, "rule {net}, peer {ip}: {verdict:?}");
    }
    let plain = decide(&policy, &Peer::Tcp(SocketAddr::new(IpAddr::V4(v4), port)));
    let mapped = decide(&policy, &Peer::Tcp(SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port)));
    assert_eq!(plain, mapped, "rule {net}: {v4} and its mapped form judged apart");
});
