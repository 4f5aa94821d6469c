//! The kv command engine (`resp` + `store`) behind a host TCP listener, so real
//! clients (redis-cli, redis-benchmark) can be pointed at the same parsing and command
//! code the guest runs, without a VM: `cargo run --example kv_host -- 127.0.0.1:6390`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use twinrun_guest::resp::{self, reply};
use twinrun_guest::store::{Args, Outcome, Store};

fn serve(mut s: TcpStream, store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    let mut input = Vec::new();
    let mut ranges = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        input.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut close = false;
        loop {
            match resp::parse(&input[pos..], &mut ranges) {
                Ok(Some(used)) => {
                    let mut st = store
                        .lock()
                        .map_err(|_| std::io::Error::other("poisoned"))?;
                    close = st.exec(Args::new(&input[pos..], &ranges), &mut out) == Outcome::Close;
                    pos += used;
                    if close {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    reply::error(&mut out, &[b"ERR ", e.0.as_bytes()]);
                    close = true;
                    break;
                }
            }
        }
        input.drain(..pos);
        s.write_all(&out)?;
        if close {
            return Ok(());
        }
    }
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6390".into());
    let l = TcpListener::bind(&addr)?;
    eprintln!("kv_host listening {addr}");
    let store = Arc::new(Mutex::new(Store::new(64 << 20)));
    for s in l.incoming() {
        let s = s?;
        let store = store.clone();
        std::thread::spawn(move || {
            let _ = serve(s, store);
        });
    }
    Ok(())
}
