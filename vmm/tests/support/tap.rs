//! The host side of the tests that give the test guest a NIC: `twinrun_lab`'s unique
//! TAP names (deleted on drop) and raw packet sockets, and the ARP request for the
//! guest's address (10.0.0.2) the tests send.

pub use twinrun_lab::tap::{is_arp_reply, is_from, PacketSocket, Tap};

/// A broadcast ARP request for the guest's address (10.0.0.2) from 10.0.0.1 at
/// `host_mac`.
pub fn arp_request(host_mac: [u8; 6]) -> Vec<u8> {
    twinrun_lab::tap::arp_request(host_mac, [10, 0, 0, 1], [10, 0, 0, 2])
}
