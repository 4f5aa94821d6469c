//! TAP names, raw packet (AF_PACKET) sockets on an interface, frame capture inside a
//! namespace, and the few Ethernet/ARP frames tests exchange with the guest.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::netns::{in_netns, NsThread};
use crate::LabError;

/// A TAP name in this namespace unique to this process and call (`prefix` of at most 9
/// bytes tells tests apart); the interface, whoever creates it, is deleted on drop.
#[derive(Debug)]
pub struct Tap(String);

impl Tap {
    pub fn new(prefix: &str) -> Tap {
        static N: AtomicU32 = AtomicU32::new(0);
        Tap(format!(
            "{prefix}{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed) % 10
        ))
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.0).exists() {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
}

/// A raw packet socket bound to an interface of the calling thread's namespace: what
/// is sent on it leaves through the interface (a TAP's frames reach the VM), and every
/// frame the interface sees or sends can be read from it. Non-blocking.
#[derive(Debug)]
pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    pub fn bind(ifname: &str) -> Result<PacketSocket, LabError> {
        let name = CString::new(ifname)
            .map_err(|_| LabError::Invalid(format!("interface name {ifname:?}")))?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if idx == 0 {
            return Err(LabError::Invalid(format!("no interface {ifname}")));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(LabError::Io {
                what: "AF_PACKET socket".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is a valid value; the fields used are set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = idx as i32;
        // SAFETY: `sa` is a valid sockaddr_ll of the size passed and lives across the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(LabError::Io {
                what: format!("binding an AF_PACKET socket to {ifname}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(PacketSocket(fd))
    }

    /// Sends one frame; false if it did not go out whole.
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sends from a valid buffer of the given length on a bound socket.
        let r = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        r == frame.len() as isize
    }

    /// One frame into `buf` if one is waiting (its length).
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: receives into a valid buffer of the given length.
        let r = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(r).ok()
    }

    /// One frame into `buf`, waiting up to `timeout` for it.
    pub fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> Option<usize> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return None;
        }
        self.try_recv(buf)
    }

    /// One frame into `buf` if one is waiting: its length, and whether the interface
    /// sent it (`PACKET_OUTGOING`: on a TAP, a frame going into the VM) rather than
    /// received it (on a TAP, a frame the VM wrote).
    pub fn try_recv_dir(&self, buf: &mut [u8]) -> Option<(usize, bool)> {
        // SAFETY: an all-zero sockaddr_ll is a valid value for the kernel to fill.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: receives into a valid buffer of the given length; `sa` and `len` are
        // valid for writes of the sizes given and live across the call.
        let r = unsafe {
            libc::recvfrom(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(sa).cast(),
                &mut len,
            )
        };
        let n = usize::try_from(r).ok()?;
        Some((n, sa.sll_pkttype == libc::PACKET_OUTGOING))
    }

    /// Calls `f` with each frame waiting on the socket, until none is left.
    pub fn drain(&self, buf: &mut [u8], mut f: impl FnMut(&[u8])) {
        while let Some(n) = self.try_recv(buf) {
            f(&buf[..n]);
        }
    }
}

/// Captures the frames of interface `ifname` in namespace `ns` on a thread of its own
/// (capturing before this returns) until `pick` returns something or `timeout` passes.
pub fn capture<T: Send + 'static>(
    ns: &str,
    ifname: &str,
    timeout: Duration,
    pick: impl Fn(&[u8]) -> Option<T> + Send + 'static,
) -> Result<NsThread<Option<T>>, LabError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let label = format!("{ns}/{ifname}");
    let ifname = ifname.to_string();
    let t = in_netns(ns, move || {
        let sock = match PacketSocket::bind(&ifname) {
            Ok(s) => {
                let _ = ready_tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return None;
            }
        };
        let mut buf = vec![0u8; 256 << 10];
        let t0 = Instant::now();
        while let Some(left) = timeout.checked_sub(t0.elapsed()) {
            let wait = left.min(Duration::from_millis(100));
            if let Some(n) = sock.recv_timeout(&mut buf, wait) {
                if let Some(v) = pick(&buf[..n]) {
                    return Some(v);
                }
            }
        }
        None
    })?;
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok(t),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LabError::Timeout(format!(
            "the capture on {label} did not start"
        ))),
    }
}

/// Records, on a thread inside namespace `ns`, every frame the VM behind TAP `ifname`
/// writes (frames the interface receives; not those it sends into the VM), from the
/// moment [`VmFrames::start`] returns until [`VmFrames::stop`] (dropped unstopped, the
/// thread ends within 50 ms).
pub struct VmFrames {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<Vec<Vec<u8>>>>,
}

impl VmFrames {
    pub fn start(ns: &str, ifname: &str) -> Result<VmFrames, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let label = format!("{ns}/{ifname}");
        let ifname = ifname.to_string();
        let flag = stop.clone();
        let thread = in_netns(ns, move || {
            let sock = match PacketSocket::bind(&ifname) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Vec::new();
                }
            };
            let mut buf = vec![0u8; 256 << 10];
            let mut frames = Vec::new();
            let mut take = |sock: &PacketSocket, frames: &mut Vec<Vec<u8>>| {
                while let Some((n, into_vm)) = sock.try_recv_dir(&mut buf) {
                    if !into_vm {
                        frames.push(buf[..n].to_vec());
                    }
                }
            };
            while !flag.load(Ordering::Acquire) {
                let mut pfd = libc::pollfd {
                    fd: sock.0.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd that lives across the call.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                take(&sock, &mut frames);
            }
            // What reached the socket before `stop` was asked for.
            take(&sock, &mut frames);
            frames
        })?;
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(VmFrames {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LabError::Timeout(format!(
                "the recording on {label} did not start"
            ))),
        }
    }

    /// The frames the VM wrote since the start, in order.
    pub fn stop(mut self) -> Result<Vec<Vec<u8>>, LabError> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t.join(),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for VmFrames {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// A broadcast ARP request for `target` from `sender` at `sender_mac`.
pub fn arp_request(sender_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// Whether `frame` is an Ethernet frame sent from `mac`.
pub fn is_from(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.len() >= 14 && frame[6..12] == mac
}

/// Whether `frame` is an ARP reply (EtherType 0x0806, operation 2).
pub fn is_arp_reply(frame: &[u8]) -> bool {
    frame.len() >= 22 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2]
}

/// Whether `frame` is a RARP frame (EtherType 0x8035) from `mac`: the announcement a
/// failed-over VM's VMM sends (as QEMU does after a migration) so that the LAN learns
/// the MAC's new port.
pub fn is_rarp_from(frame: &[u8], mac: [u8; 6]) -> bool {
    is_from(frame, mac) && frame[12..14] == [0x80, 0x35]
}

/// The TCP payload of an Ethernet frame carrying IPv4/TCP to port `port`.
pub fn tcp_payload_to(eth: &[u8], port: u16) -> Option<&[u8]> {
    if eth.len() < 14 || eth[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &eth[14..];
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.get(9) != Some(&6) {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let tcp = ip.get(ihl..total.min(ip.len()))?;
    if u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]) != port {
        return None;
    }
    let off = usize::from(tcp.get(12)? >> 4) * 4;
    tcp.get(off..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_frames() {
        let mac = parse_mac("02:00:00:77:00:02").unwrap();
        assert_eq!(mac, [2, 0, 0, 0x77, 0, 2]);
        assert_eq!(parse_mac("02:00:00:77:00"), None);
        assert_eq!(parse_mac("02:00:00:77:00:02:03"), None);
        let req = arp_request(mac, [10, 0, 0, 1], [10, 0, 0, 2]);
        assert_eq!(req.len(), 42);
        assert!(is_from(&req, mac) && !is_arp_reply(&req));
        let mut rarp = req.clone();
        rarp[12..14].copy_from_slice(&[0x80, 0x35]);
        assert!(is_rarp_from(&rarp, mac) && !is_rarp_from(&req, mac));
    }
}
