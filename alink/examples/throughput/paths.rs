//! A-Link runs: 4 MiB messages of 1,024 scattered 4 KiB pages over 1 or 2 links.
//!
//! - `staged`: the path the checkpoint layer uses today: the sender copies each
//!   message's scattered pages into a pooled staging buffer and sends it (one CRC per
//!   frame body), the receiver gets it in a pooled buffer and copies the pages into its
//!   mirror;
//! - `lent+placed`: the zero-copy path: pages lent straight from "guest memory"
//!   (`send_lent`, batches of 8 messages, CRC per page computed chunk by chunk on the
//!   way, checked again after the write with `volatile`) and read by the receiver
//!   straight into its mirror's pages (`set_placer`), checked as they arrive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::WindowLimits;
use alink::{Alink, AlinkConfig, Bytes, LinkAddrs, PlaceRequest, Placement, SegOpts};
use serde::{Deserialize, Serialize};

use super::net::{scattered, Net, Pages, PAGE};

const SECRET: &[u8] = b"throughput-example-secret-0123";
/// Pages per message (4 MiB, the checkpoint layer's sync part).
const MSG_PAGES: usize = 1024;
/// Messages per lent batch.
const BATCH: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Staged,
    LentPlaced { volatile: bool },
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Staged => "staged",
            Path::LentPlaced { volatile: false } => "lent+placed",
            Path::LentPlaced { volatile: true } => "lent+placed volatile",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Head {
    first: u32,
}

fn cfg(net: &Net, side: usize, links: usize, port: u16) -> AlinkConfig {
    let addrs = (0..links)
        .map(|l| LinkAddrs {
            local: net.addr(l, side, if side == 1 { port + l as u16 } else { 0 }),
            remote: net.addr(l, 1 - side, if side == 0 { port + l as u16 } else { 0 }),
        })
        .collect();
    let (me, peer) = if side == 0 { (1, 2) } else { (2, 1) };
    let mut c = AlinkConfig::new(1, me, peer, SECRET, addrs);
    c.window = WindowLimits {
        max_msgs: 1024,
        max_bytes: 128 << 20,
    };
    c
}

/// Runs `path` over `links` links for `secs`; returns bytes/s as the receiver counts them.
pub fn run(
    net: &Net,
    links: usize,
    path: Path,
    secs: f64,
    src: &Arc<Pages>,
    dst: &Arc<Pages>,
    port: u16,
) -> Result<f64, String> {
    let (cb, ca) = (cfg(net, 1, links, port), cfg(net, 0, links, port));
    let b = net
        .run_in(1, move || Alink::start(cb))
        .join()
        .map_err(|_| "panic")?
        .map_err(|e| e.to_string())?;
    let a = net
        .run_in(0, move || Alink::start(ca))
        .join()
        .map_err(|_| "panic")?
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    while a.link_status().iter().any(|s| !s.up) {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("links did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let order = Arc::new(scattered(src.pages()));
    if let Path::LentPlaced { .. } = path {
        // The mirror's pages for a message: the same scattered pages as the sender's.
        let (dst, order) = (dst.clone(), order.clone());
        b.set_placer(move |r: &PlaceRequest<'_>| {
            let h: Head = postcard::from_bytes(r.head).ok()?;
            let dests = (0..r.payload_len / PAGE)
                .map(|j| {
                    let p = order[(h.first as usize + j) % order.len()] as usize;
                    (dst.page_ptr(p), PAGE)
                })
                .collect();
            // SAFETY: the mirror is leaked (lives for the process). Messages cycle over
            // a region four times the window, so pages are rewritten only long after
            // the message that last wrote them was consumed (content does not matter
            // to the measurement either way).
            Some(unsafe { Placement::new(dests) })
        });
    }
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let (mirror, rorder) = (dst.clone(), order.clone());
    let receiver = std::thread::spawn(move || {
        let (mut bytes, mut placed, mut first, mut last) = (0u64, 0u64, None, Instant::now());
        loop {
            match b.recv(Duration::from_millis(100)) {
                Ok(Some(m)) => {
                    first.get_or_insert_with(Instant::now);
                    if m.at == alink::PayloadAt::InBody {
                        // Into the mirror's pages, as the standby does today.
                        if let Ok(h) = m.head::<Head>() {
                            for (j, page) in m.payload().chunks(PAGE).enumerate() {
                                let p = rorder[(h.first as usize + j) % rorder.len()] as usize;
                                // SAFETY: a page of the leaked mirror; only this thread
                                // writes it in a staged run.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        page.as_ptr(),
                                        mirror.page_ptr(p),
                                        page.len(),
                                    )
                                };
                            }
                        }
                    }
                    bytes += (m.body.len() + m.placed_len) as u64;
                    placed += u64::from(m.at == alink::PayloadAt::Placed);
                    last = Instant::now();
                }
                Ok(None) if d.load(Ordering::Relaxed) => break,
                Ok(None) => {}
                Err(_) => break,
            }
        }
        (bytes, placed, last - first.unwrap_or(last))
    });
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut k = 0usize;
    match path {
        Path::Staged => {
            // Pooled staging buffers, as the checkpoint layer's capture uses.
            let pool = alink::BufPool::default();
            while Instant::now() < end {
                let first = k % order.len();
                let mut buf = pool.take(MSG_PAGES * PAGE);
                for (j, dst) in buf.chunks_mut(PAGE).enumerate() {
                    dst.copy_from_slice(src.page(order[(first + j) % order.len()] as usize));
                }
                let chunk: Vec<Bytes> = vec![buf.into_bytes()];
                a.send(
                    &Head {
                        first: first as u32,
                    },
                    chunk,
                )
                .map_err(|e| e.to_string())?;
                k += MSG_PAGES;
            }
        }
        Path::LentPlaced { volatile } => {
            let opts = SegOpts {
                seg_size: PAGE as u32,
                volatile,
                barrier: 0,
            };
            while Instant::now() < end {
                let heads: Vec<Head> = (0..BATCH)
                    .map(|i| Head {
                        first: ((k + i * MSG_PAGES) % order.len()) as u32,
                    })
                    .collect();
                let slices: Vec<Vec<&[u8]>> = heads
                    .iter()
                    .map(|h| {
                        (0..MSG_PAGES)
                            .map(|j| src.page(order[(h.first as usize + j) % order.len()] as usize))
                            .collect()
                    })
                    .collect();
                let batch: Vec<(&Head, &[&[u8]])> = heads
                    .iter()
                    .zip(&slices)
                    .map(|(h, s)| (h, s.as_slice()))
                    .collect();
                a.send_lent(&batch, opts, Duration::from_secs(30))
                    .map_err(|e| e.to_string())?;
                k += BATCH * MSG_PAGES;
            }
        }
    }
    a.flush(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    done.store(true, Ordering::Relaxed);
    let (bytes, placed, time) = receiver.join().map_err(|_| "receiver panicked")?;
    if let Path::LentPlaced { .. } = path {
        if placed == 0 {
            return Err("no message was placed".into());
        }
    }
    let lost = a.take_lost();
    if !lost.is_empty() {
        eprintln!("  {} messages lost during the run", lost.len());
    }
    Ok(bytes as f64 / time.as_secs_f64())
}
