//! Where a run's two ends live: both on loopback, or in two network namespaces joined by
//! veth pairs (one per link), and the memory the page-moving runs send and receive.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use twinrun_lab::netns::in_netns;
use twinrun_lab::Topology;

pub use twinrun_lab::can_build_namespaces as netns_available;

pub enum Net {
    Loopback,
    /// Two PMs of the lab's topology joined by one veth pair per A-Link.
    Netns(Box<Topology>),
}

/// A thread on one side; joined for its result.
pub enum Thread<T> {
    Plain(std::thread::JoinHandle<T>),
    Ns(twinrun_lab::netns::NsThread<T>),
}

impl<T> Thread<T> {
    pub fn join(self) -> Result<T, String> {
        match self {
            Thread::Plain(h) => h.join().map_err(|_| "thread panicked".to_string()),
            Thread::Ns(h) => h.join().map_err(|e| e.to_string()),
        }
    }
}

impl Net {
    pub fn netns(links: usize) -> Result<Net, String> {
        Topology::builder()
            .alinks(links)
            .build()
            .map(|t| Net::Netns(Box::new(t)))
            .map_err(|e| e.to_string())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Net::Loopback => "loopback",
            Net::Netns(_) => "netns-veth",
        }
    }

    /// Address of `side` (0 sends, 1 receives) on link `link`.
    pub fn addr(&self, link: usize, side: usize, port: u16) -> SocketAddr {
        match self {
            Net::Loopback => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Net::Netns(t) => SocketAddr::new(t.alink_addr(side, link).ip(), port),
        }
    }

    /// Runs `f` on a new thread on `side`.
    pub fn run_in<T: Send + 'static>(
        &self,
        side: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Thread<T> {
        match self {
            Net::Loopback => Thread::Plain(std::thread::spawn(f)),
            Net::Netns(t) => {
                Thread::Ns(in_netns(t.pm_ns(side), f).expect("enter the PM's namespace"))
            }
        }
    }
}

pub const PAGE: usize = 4096;

/// Page-granular memory shared between threads by address (a guest's memory on the
/// sending side, its mirror on the receiving side), touched once so that it is mapped.
pub struct Pages {
    ptr: usize,
    pages: usize,
}

impl Pages {
    pub fn new(pages: usize, fill: u8) -> Pages {
        // Written page by page, so every page is mapped (a zero-filled allocation would
        // be, lazily, on first touch: inside the measurement).
        let mut buf = vec![0u8; pages * PAGE].into_boxed_slice();
        for p in buf.chunks_mut(PAGE) {
            p.fill(fill);
        }
        Pages {
            ptr: Box::leak(buf).as_mut_ptr() as usize,
            pages,
        }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn page(&self, i: usize) -> &'static [u8] {
        assert!(i < self.pages);
        // SAFETY: the buffer is leaked (lives for the process); readers and writers of
        // a page are the benchmark's, and content races do not matter to it.
        unsafe { std::slice::from_raw_parts((self.ptr + i * PAGE) as *const u8, PAGE) }
    }

    pub fn page_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.pages);
        (self.ptr + i * PAGE) as *mut u8
    }
}

/// A fixed scattered order of `n` page indices (any prefix spread over all of them):
/// the lab's seeded RNG, the same every run.
pub fn scattered(n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    twinrun_lab::Rng::new(0x9e37_79b9_7f4a_7c15).shuffle(&mut v);
    v
}
