//! The network-namespace test harness itself (tests/e2e/common/netns.rs): real traffic between
//! two namespaces with exact counts, before the netflow tests rely on it. Needs root (creates
//! namespaces, veth pairs and iptables rules); no eBPF.

mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    process::Command,
    time::{Duration, Instant},
};

use common::netns::{
    NetPair, Netns, TcpExchange, packet_loss, short_connections, short_connections_at,
    tcp_exchange, tcp_exchange_hold, tcp_session, udp_exchange,
};
use common::privileged;

const REQUEST: usize = 1_234_567;
const RESPONSE: usize = 7_654_321;

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `ip netns list` prints `name` or `name (id: N)`; true when `name` is among them.
fn listed(list: &str, name: &str) -> bool {
    list.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn check_exchange(x: &TcpExchange, client_ip: IpAddr, server_ip: IpAddr, req: u64, resp: u64) {
    assert_eq!(x.client_local.ip(), client_ip, "{x:?}");
    assert_eq!(x.server_local.ip(), server_ip, "{x:?}");
    assert_ne!(x.client_local.port(), 0);
    assert_ne!(x.server_local.port(), 0);
    // The kernel counts the client's SYN in its bytes_acked (see TcpInfo::bytes_acked).
    assert_eq!(
        x.client_info.bytes_acked,
        req + 1,
        "client bytes_acked: {x:?}"
    );
    assert_eq!(x.client_info.payload_acked(true), req, "{x:?}");
    assert_eq!(x.server_info.payload_acked(false), resp, "{x:?}");
    assert_eq!(
        x.client_info.bytes_received, resp,
        "client bytes_received: {x:?}"
    );
    assert_eq!(x.server_info.bytes_acked, resp, "server bytes_acked: {x:?}");
    assert_eq!(
        x.server_info.bytes_received, req,
        "server bytes_received: {x:?}"
    );
    assert!(x.client_info.rtt_us > 0, "{x:?}");
    assert!(x.server_info.rtt_us > 0, "{x:?}");
}

#[test]
fn tcp_exchange_ipv4_and_ipv6_exact_counts() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hx");
    let t = Instant::now();
    let v4 = tcp_exchange(&pair, pair.b_v4.into(), 0, REQUEST, RESPONSE);
    eprintln!("IPv4 exchange {:?}: {v4:?}", t.elapsed());
    check_exchange(
        &v4,
        pair.a_v4.into(),
        pair.b_v4.into(),
        REQUEST as u64,
        RESPONSE as u64,
    );

    let t = Instant::now();
    let v6 = tcp_exchange(&pair, pair.b_v6.into(), 0, REQUEST, RESPONSE);
    eprintln!("IPv6 exchange {:?}: {v6:?}", t.elapsed());
    check_exchange(
        &v6,
        pair.a_v6.into(),
        pair.b_v6.into(),
        REQUEST as u64,
        RESPONSE as u64,
    );

    // A fixed port, and empty directions.
    let port = v4.server_local.port();
    let fixed = tcp_exchange(&pair, pair.b_v4.into(), port, 0, 10);
    assert_eq!(fixed.server_local.port(), port);
    check_exchange(&fixed, pair.a_v4.into(), pair.b_v4.into(), 0, 10);
    let fixed = tcp_exchange(&pair, pair.b_v6.into(), port, 10, 0);
    check_exchange(&fixed, pair.a_v6.into(), pair.b_v6.into(), 10, 0);
}

#[test]
fn tcp_exchange_hold_keeps_connection_open() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hh");
    let t = Instant::now();
    let x = tcp_exchange_hold(
        &pair,
        pair.b_v4.into(),
        0,
        100,
        200,
        Duration::from_millis(300),
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    check_exchange(&x, pair.a_v4.into(), pair.b_v4.into(), 100, 200);
}

#[test]
fn tcp_session_steps() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hs");
    for server_ip in [IpAddr::from(pair.b_v4), pair.b_v6.into()] {
        let mut s = tcp_session(&pair, server_ip, 0);
        assert_eq!(s.client_local.ip(), pair.a_ip_for(server_ip));
        assert_eq!(s.server_local.ip(), server_ip);
        let (c, v) = s.info();
        // The client's SYN is in its bytes_acked (see TcpInfo::bytes_acked).
        assert_eq!((c.bytes_acked, c.bytes_received), (1, 0), "{c:?}");
        assert_eq!((v.bytes_acked, v.bytes_received), (0, 0), "{v:?}");

        let mut up = 0u64;
        let mut down = 0u64;
        for (client, server) in [(1, 0), (0, 1), (1000, 2000), (300_000, 0), (0, 3_000_000)] {
            if client > 0 {
                s.send_client(client);
                up += client as u64;
            }
            if server > 0 {
                s.send_server(server);
                down += server as u64;
            }
            assert_eq!(s.sent(), (up, down));
            let (c, v) = s.info();
            assert_eq!(
                (c.bytes_acked, c.bytes_received),
                (up + 1, down),
                "client {c:?}"
            );
            assert_eq!(c.payload_acked(true), up);
            assert_eq!(
                (v.bytes_acked, v.bytes_received),
                (down, up),
                "server {v:?}"
            );
        }
        let (c, v) = s.close();
        assert_eq!(
            (c.bytes_acked, c.bytes_received),
            (up + 1, down),
            "client {c:?}"
        );
        assert_eq!(
            (v.bytes_acked, v.bytes_received),
            (down, up),
            "server {v:?}"
        );
    }
}

#[test]
fn two_hundred_short_connections() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hc");
    let t = Instant::now();
    let ports = short_connections(&pair, pair.b_v4.into(), 0, 200, 100, 1000);
    eprintln!("200 short IPv4 connections: {:?}", t.elapsed());
    assert_eq!(ports.len(), 200);
    assert!(ports.iter().all(|&p| p != 0));
    assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 200, "{ports:?}");

    let t = Instant::now();
    let (server, ports) = short_connections_at(&pair, pair.b_v6.into(), 0, 20, 1, 1);
    eprintln!("20 short IPv6 connections: {:?}", t.elapsed());
    assert_eq!(server.ip(), IpAddr::from(pair.b_v6));
    assert_ne!(server.port(), 0);
    assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 20);
}

#[test]
fn udp_exchange_ipv4_and_ipv6() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hu");
    for server_ip in [IpAddr::from(pair.b_v4), pair.b_v6.into()] {
        let (client, server) = udp_exchange(&pair, server_ip, 0, &[100, 1000, 1472], &[10, 20, 30]);
        assert_eq!(client.ip(), pair.a_ip_for(server_ip));
        assert_ne!(client.port(), 0);
        assert_eq!(server.ip(), server_ip);
        assert_ne!(server.port(), 0);
        // A fixed port works too.
        let again = udp_exchange(&pair, server_ip, server.port(), &[1], &[0]);
        assert_eq!(again.1, server);
    }
}

#[test]
fn packet_loss_causes_retransmissions() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hl");
    let rules =
        || String::from_utf8(pair.b.exec("iptables", &["-w", "-S", "INPUT"]).stdout).unwrap();
    let loss = packet_loss(&pair, 0.1);
    assert!(rules().contains("statistic"), "{}", rules());

    const SIZE: usize = 2 * 1024 * 1024;
    for server_ip in [IpAddr::from(pair.b_v4), pair.b_v6.into()] {
        let t = Instant::now();
        let x = tcp_exchange(&pair, server_ip, 0, SIZE, SIZE);
        eprintln!(
            "2 MB each way at 10% loss ({server_ip}): {:?}: {x:?}",
            t.elapsed()
        );
        check_exchange(
            &x,
            pair.a_ip_for(server_ip),
            server_ip,
            SIZE as u64,
            SIZE as u64,
        );
        assert!(x.client_info.total_retrans > 0, "{x:?}");
    }

    drop(loss);
    assert!(!rules().contains("statistic"), "{}", rules());
    // Without the rule the pair carries traffic as before (no assertion on retransmissions:
    // a tail-loss probe on a busy machine is one, and veth itself never drops).
    let x = tcp_exchange(&pair, pair.b_v4.into(), 0, SIZE, 10);
    check_exchange(&x, pair.a_v4.into(), pair.b_v4.into(), SIZE as u64, 10);
}

#[test]
fn netns_inode_and_isolation() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("hi");
    let path = format!("/run/netns/{}", ns.name);
    let out = Command::new("stat")
        .args(["-L", "-c", "%i", &path])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stat: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(ns.inode(), stat);

    // The thread of `run` is in the namespace; the test thread is not.
    let inside = ns.run(|| std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino());
    assert_eq!(inside, stat);
    let outside = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_ne!(outside, stat);

    // Only `lo` exists in a bare namespace.
    let links = String::from_utf8(ns.ip(&["-o", "link", "show"]).stdout).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");

    // A panic inside `run` reaches the caller.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ns.run(|| panic!("boom inside the namespace"))
    }));
    assert!(caught.is_err());

    // Sockets made inside are bound to the namespace: its addresses only.
    let pair = NetPair::create("hn");
    let a_v4 = pair.a_v4;
    let bind_in_b = pair
        .b
        .run(move || std::net::TcpListener::bind(SocketAddr::from((a_v4, 0))).is_err());
    assert!(bind_in_b, "a's address must not exist in b");
    assert_ne!(pair.a.inode(), pair.b.inode());
}

#[test]
fn namespaces_are_gone_after_drop() {
    if !privileged() {
        return;
    }
    let pair = NetPair::create("hd");
    let single = Netns::new("hd");
    let names = [
        pair.a.name.clone(),
        pair.b.name.clone(),
        single.name.clone(),
    ];
    let list = netns_list();
    for name in &names {
        assert!(listed(&list, name), "{name} missing:\n{list}");
    }
    // With a connection and a loss rule alive at drop time.
    let loss = packet_loss(&pair, 0.01);
    let x = tcp_exchange(&pair, pair.b_v4.into(), 0, 1000, 1000);
    assert_eq!(x.server_info.bytes_received, 1000);
    drop(pair);
    drop(loss);
    drop(single);
    let list = netns_list();
    for name in &names {
        assert!(!listed(&list, name), "{name} still there:\n{list}");
        assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
    }
}
