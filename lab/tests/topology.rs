//! The lab's topologies on this machine (root): they come up with every part the
//! options ask for, traffic flows where it should and stops where a link is cut, and
//! every namespace goes away on drop, also when the owner panics.

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use twinrun_lab::netns::{in_netns, NetNs};
use twinrun_lab::tap::{capture, PacketSocket};
use twinrun_lab::topology::{Topology, ALINK_PORT};
use twinrun_lab::{can_build_namespaces, have};

fn require_root_and_tools() {
    assert!(
        can_build_namespaces(),
        "these tests build network namespaces: run them as root with iproute2 installed"
    );
    assert!(
        have("ping"),
        "`ping` is not installed: install Debian's iputils-ping (scripts/install-deps.sh does)"
    );
}

/// One ping from namespace `ns` to `to`: answered?
fn ping(ns: &NetNs, to: Ipv4Addr) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "2", &to.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn namespaces(t: &Topology) -> Vec<String> {
    let mut v: Vec<String> = t.pms.iter().map(|p| p.ns.name().to_string()).collect();
    v.extend(t.witnesses.iter().map(|w| w.ns.name().to_string()));
    v.push(t.client_ns().to_string());
    v.push(t.switch_ns().to_string());
    v
}

#[test]
fn pair_with_witnesses_comes_up_pings_across_and_goes_away() {
    require_root_and_tools();
    let t = Topology::builder()
        .alinks(3)
        .witnesses(2)
        .host_addrs()
        .build()
        .unwrap();
    let names = namespaces(&t);
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.iter().all(|n| NetNs::exists(n)), "{names:?}");
    let (pm1, pm2) = (&t.pms[0].ns, &t.pms[1].ns);
    // Every A-Link carries traffic between the PMs, and only between them.
    assert_eq!(t.alinks(), 3);
    for k in 0..3 {
        let (a, b) = t.alink(k);
        assert_eq!((a.port(), b.port()), (ALINK_PORT, ALINK_PORT));
        let (a, b) = (a.ip(), b.ip());
        assert_ne!(a, b);
        assert!(ping(pm1, ip4(b)), "PM1 -> PM2 over A-Link {k}");
        assert!(ping(pm2, ip4(a)), "PM2 -> PM1 over A-Link {k}");
        assert!(
            !ping(&t.client.ns, ip4(b)),
            "the client is not on the A-Links"
        );
    }
    // The LAN: the client reaches each PM's own stack.
    for i in 0..2 {
        let h = t.host_ip(i).unwrap();
        assert!(ping(&t.client.ns, h), "client -> PM{} on the LAN", i + 1);
    }
    // The management network: both PMs reach both witnesses, the client does not.
    for j in 0..2 {
        let w = t.witness(j).unwrap().ip;
        assert!(ping(pm1, w) && ping(pm2, w), "PMs -> witness {j}");
        assert!(
            !ping(&t.client.ns, w),
            "the client is not on the management network"
        );
    }
    assert!(ping(&t.witnesses[0].ns, t.mgmt_ip(1).unwrap()));
    // Cuts: an A-Link, a PM's management link, a witness.
    let b0 = ip4(t.alink(0).1.ip());
    t.set_alink(0, 0, false).unwrap();
    assert!(!ping(pm1, b0), "A-Link 0 is cut");
    assert!(ping(pm1, ip4(t.alink(1).1.ip())), "A-Link 1 still up");
    t.set_alink(0, 0, true).unwrap();
    assert!(
        twinrun_lab::poll(Duration::from_secs(10), Duration::from_millis(100), || {
            ping(pm1, b0).then_some(())
        })
        .is_some(),
        "A-Link 0 restored"
    );
    t.set_mgmt(1, false).unwrap();
    assert!(!ping(pm2, t.witness(0).unwrap().ip));
    assert!(ping(pm1, t.witness(0).unwrap().ip));
    t.set_witness(1, false).unwrap();
    assert!(!ping(pm1, t.witness(1).unwrap().ip));
    // Counters of the A-Link interfaces move.
    assert!(t.alink_tx_bytes(0, 1).unwrap() > 0);
    drop(t);
    assert!(names.iter().all(|n| !NetNs::exists(n)), "{names:?}");
}

fn ip4(a: std::net::IpAddr) -> Ipv4Addr {
    match a {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(_) => panic!("IPv6"),
    }
}

#[test]
fn single_pm_with_a_client() {
    require_root_and_tools();
    let t = Topology::builder().single().host_addrs().build().unwrap();
    assert_eq!((t.pms.len(), t.alinks()), (1, 0));
    assert!(t.tap(0).len() <= 15);
    let link = t.pms[0]
        .ns
        .command("ip")
        .args(["link", "show", t.tap(0)])
        .output()
        .unwrap();
    assert!(link.status.success(), "the TAP is in PM1's namespace");
    let addrs = t
        .client
        .ns
        .command("ip")
        .args(["-4", "addr", "show"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains(&format!("{}/24", t.client_ip())));
    assert!(ping(&t.client.ns, t.host_ip(0).unwrap()));
    assert_eq!(
        t.vm_net_args(0)[1],
        format!("{},{}", t.tap(0), t.guest_mac())
    );
    assert!(t.alink_args(0).is_empty());
}

#[test]
fn namespaces_go_away_when_the_owner_panics() {
    require_root_and_tools();
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let t = Topology::builder().witnesses(1).build().unwrap();
        *names.lock().unwrap() = namespaces(&t);
        panic!("simulated test failure");
    });
    assert!(r.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 5);
    assert!(names.iter().all(|n| !NetNs::exists(n)), "{names:?}");
}

#[test]
fn bad_options_are_refused_and_leave_nothing() {
    require_root_and_tools();
    for b in [
        Topology::builder().prefix("much-too-long-prefix"),
        Topology::builder().prefix(""),
        Topology::builder().alinks(11),
        Topology::builder().single().alinks(1),
    ] {
        assert!(b.build().is_err());
    }
    // A failure half-way (the name of an existing namespace) removes what was made.
    let p = twinrun_lab::unique_prefix("tz");
    let taken = NetNs::new(&format!("{p}-cl")).unwrap();
    assert!(Topology::builder().prefix(&p).build().is_err());
    assert!(!NetNs::exists(&format!("{p}-sw")) && !NetNs::exists(&format!("{p}-p1")));
    drop(taken);
}

#[test]
fn threads_enter_namespaces_and_capture_frames() {
    require_root_and_tools();
    let t = Topology::builder().alinks(1).build().unwrap();
    let (a, b) = t.alink(0);
    // Binding PM2's A-Link address works only inside PM2's namespace.
    assert!(TcpListener::bind((b.ip(), 0)).is_err());
    let bound = in_netns(t.pm_ns(1), move || TcpListener::bind((b.ip(), 0)).is_ok())
        .unwrap()
        .join()
        .unwrap();
    assert!(bound);
    assert!(in_netns("no-such-namespace-here", || ()).is_err());
    // An ICMP echo request from PM1 seen on PM2's end of the A-Link.
    let seen = capture(
        t.pm_ns(1),
        &t.pms[1].alink_ifs[0],
        Duration::from_secs(5),
        |eth| {
            (eth.len() > 34 && eth[12..14] == [0x08, 0x00] && eth[23] == 1 && eth[34] == 8)
                .then_some(())
        },
    )
    .unwrap();
    assert!(ping(&t.pms[0].ns, ip4(b.ip())));
    assert_eq!(seen.join().unwrap(), Some(()));
    // A packet socket sends a frame out of an interface.
    let sent = in_netns(t.pm_ns(0), {
        let dev = t.pms[0].alink_ifs[0].clone();
        move || {
            let s = PacketSocket::bind(&dev).unwrap();
            s.send(&twinrun_lab::tap::arp_request(
                [2, 0, 0, 0, 0, 1],
                [10, 0, 0, 1],
                [10, 0, 0, 2],
            ))
        }
    })
    .unwrap()
    .join()
    .unwrap();
    assert!(sent);
    let _ = a;
}
