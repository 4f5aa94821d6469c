//! The two ends of one TCP connection between namespaces (or in this one), each on a
//! thread of its own: raw transfers to measure beside the VMM's.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::enter;

/// A thread in `ns` (`None`: this namespace) listening on `ip`: it accepts one
/// connection, gives it a 10 s read timeout and hands it to `serve`. Returns once the
/// listener is bound (10 s at most), with its address.
pub fn tcp_receiver<T: Send + 'static>(
    ns: Option<String>,
    ip: IpAddr,
    serve: impl FnOnce(TcpStream) -> Result<T, String> + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<Result<T, String>>), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let rx = std::thread::spawn(move || -> Result<T, String> {
        let setup = (|| {
            if let Some(ns) = &ns {
                enter(ns).map_err(|e| e.to_string())?;
            }
            let l = TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
            let a = l.local_addr().map_err(|e| e.to_string())?;
            Ok::<_, String>((l, a))
        })();
        let l = match setup {
            Ok((l, a)) => {
                let _ = ready_tx.send(Ok(a));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        serve(s)
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the TCP receiver did not start".to_string())??;
    Ok((addr, rx))
}

/// A thread in `ns` (`None`: this namespace) that connects to `addr` (5 s), gives the
/// connection a 10 s write timeout and hands it to `send`.
pub fn tcp_sender(
    ns: Option<String>,
    addr: SocketAddr,
    send: impl FnOnce(TcpStream) -> Result<(), String> + Send + 'static,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || -> Result<(), String> {
        if let Some(ns) = &ns {
            enter(ns).map_err(|e| e.to_string())?;
        }
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        send(s)
    })
}

/// Waits for both ends; the sender's error first (the receiver's is then usually
/// only its consequence).
pub fn tcp_join<T>(
    tx: JoinHandle<Result<(), String>>,
    rx: JoinHandle<Result<T, String>>,
) -> Result<T, String> {
    let sent = tx.join().map_err(|_| "TCP sender panicked".to_string())?;
    let got = rx.join().map_err(|_| "TCP receiver panicked".to_string())?;
    sent?;
    got
}
