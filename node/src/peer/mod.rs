//! The channel between the two daemons: authentication (`wire`), then catch-up of the
//! replicated record (each side sends its digest and gets back what it lacks), then
//! live updates, VMM reports and heartbeats. One connection at a time: the node whose
//! name sorts first dials, the other accepts (and a new connection from the peer
//! replaces an old one, e.g. after the peer's daemon restarted).

pub mod wire;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use wire::{Auth, Hello, Msg, Sealer, WireError};

/// What the channel needs from the daemon (its store and step function).
pub trait Replica: Send + Sync + 'static {
    /// Every record's (name, clock, node) and every command id held.
    fn digest(&self) -> (Vec<(String, u64, String)>, Vec<String>);
    /// Names of the records the peer lacks or holds older, given its digest, as JSON.
    fn records_for(&self, peer: &[(String, u64, String)]) -> Vec<String>;
    /// Commands (JSON) whose ids are not in `peer`.
    fn commands_for(&self, peer: &BTreeSet<String>) -> Vec<String>;
    fn merge_records(&self, records: Vec<String>);
    fn merge_commands(&self, commands: Vec<String>);
    /// This node's VMM report (JSON).
    fn report(&self) -> String;
    /// The peer is connected and caught up.
    fn peer_up(&self, protocol: u32);
    fn peer_report(&self, report: String);
    /// The peer is gone (connection lost or refused): why.
    fn peer_lost(&self, why: String);
}

#[derive(Clone, Debug)]
pub struct LinkSettings {
    pub cluster: String,
    pub me: String,
    pub peer: String,
    pub peer_addr: SocketAddr,
    pub secret: Vec<u8>,
    pub heartbeat: Duration,
    pub timeout: Duration,
    /// The protocol version this daemon announces (tests vary it).
    pub protocol: u32,
}

/// Sends to the current connection, if any (changes reach a disconnected peer through
/// the catch-up when it returns).
#[derive(Clone, Default)]
pub struct Outbox {
    tx: Arc<Mutex<Option<mpsc::UnboundedSender<Msg>>>>,
}

impl Outbox {
    pub fn send(&self, m: Msg) {
        if let Ok(g) = self.tx.lock() {
            if let Some(tx) = g.as_ref() {
                let _ = tx.send(m);
            }
        }
    }

    fn set(&self, tx: Option<mpsc::UnboundedSender<Msg>>) {
        if let Ok(mut g) = self.tx.lock() {
            *g = tx;
        }
    }
}

/// Runs the channel forever on `listener` (bound by the caller, so a bad address
/// fails the start): dials or accepts, session after session.
pub async fn run(
    s: LinkSettings,
    listener: TcpListener,
    replica: Arc<dyn Replica>,
    outbox: Outbox,
) -> std::io::Result<()> {
    let s = Arc::new(s);
    if s.me < s.peer {
        tokio::spawn(async move {
            // The dialer keeps the listener open only to refuse nothing: the peer never
            // dials (it sorts later), so accepted connections are closed at once.
            loop {
                if let Ok((c, _)) = listener.accept().await {
                    drop(c);
                }
            }
        });
        loop {
            if let Ok(Ok(c)) =
                tokio::time::timeout(s.timeout, TcpStream::connect(s.peer_addr)).await
            {
                let why = session(&s, c, &replica, &outbox).await;
                replica.peer_lost(why);
            }
            tokio::time::sleep(s.heartbeat).await;
        }
    } else {
        let mut current: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let (c, from) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and the like pass; the channel must outlive them.
                    warn!("peer channel: accept: {e}");
                    tokio::time::sleep(s.heartbeat).await;
                    continue;
                }
            };
            if let Some(old) = current.take() {
                info!("new connection from {from} replaces the current one");
                old.abort();
            }
            let (s2, r2, o2) = (s.clone(), replica.clone(), outbox.clone());
            current = Some(tokio::spawn(async move {
                let why = session(&s2, c, &r2, &o2).await;
                r2.peer_lost(why);
            }));
        }
    }
}

/// One connection from handshake to its end; returns why it ended.
async fn session(
    s: &LinkSettings,
    c: TcpStream,
    replica: &Arc<dyn Replica>,
    outbox: &Outbox,
) -> String {
    let _ = c.set_nodelay(true);
    let (mut rd, mut wr) = c.into_split();
    let (peer_hello, key) =
        match tokio::time::timeout(s.timeout * 2, handshake(s, &mut rd, &mut wr)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let why = format!("peer {} at {}: {e}", s.peer, s.peer_addr);
                warn!("{why}");
                return why;
            }
            Err(_) => return format!("peer {}: handshake timed out", s.peer),
        };
    let mut tx_seal = Sealer::new(key, &s.me);
    let mut rx_seal = Sealer::new(key, &s.peer);
    // Reads run in their own task: a read cut short by select! would lose bytes.
    let (frames_tx, mut frames) = mpsc::channel::<Result<Vec<u8>, WireError>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let f = wire::read_frame(&mut rd).await;
            let end = f.is_err();
            if frames_tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    outbox.set(Some(out_tx));
    let why = async {
        let (records, commands) = replica.digest();
        send(&mut wr, &mut tx_seal, &Msg::Digest { records, commands }).await?;
        let mut beat = tokio::time::interval(s.heartbeat);
        let mut up = false;
        loop {
            tokio::select! {
                f = tokio::time::timeout(s.timeout, frames.recv()) => {
                    let frame = match f {
                        Err(_) => return Err(format!("no message from {} for {} ms", s.peer, s.timeout.as_millis())),
                        Ok(None) => return Err("connection closed".to_string()),
                        Ok(Some(Err(e))) => return Err(format!("connection: {e}")),
                        Ok(Some(Ok(b))) => b,
                    };
                    match rx_seal.open(&frame).map_err(|e| e.to_string())? {
                        Msg::Digest { records, commands } => {
                            let recs = replica.records_for(&records);
                            let ids: BTreeSet<String> = commands.into_iter().collect();
                            let cmds = replica.commands_for(&ids);
                            send(&mut wr, &mut tx_seal, &Msg::Records(recs)).await?;
                            send(&mut wr, &mut tx_seal, &Msg::Commands(cmds)).await?;
                            send(&mut wr, &mut tx_seal, &Msg::SyncDone).await?;
                        }
                        Msg::Records(r) => replica.merge_records(r),
                        Msg::Commands(c) => replica.merge_commands(c),
                        Msg::SyncDone => {
                            if !up {
                                up = true;
                                info!("peer {} connected (protocol {}), records caught up", s.peer, peer_hello.protocol);
                                replica.peer_up(peer_hello.protocol);
                                send(&mut wr, &mut tx_seal, &Msg::Report(replica.report())).await?;
                            }
                        }
                        Msg::Report(r) => replica.peer_report(r),
                        Msg::Heartbeat => {}
                    }
                }
                m = out_rx.recv() => {
                    if let Some(m) = m {
                        send(&mut wr, &mut tx_seal, &m).await?;
                    }
                }
                _ = beat.tick() => send(&mut wr, &mut tx_seal, &Msg::Heartbeat).await?,
            }
        }
    }
    .await
    .unwrap_or_else(|e: String| e);
    outbox.set(None);
    reader.abort();
    why
}

async fn send(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    seal: &mut Sealer,
    m: &Msg,
) -> Result<(), String> {
    let b = seal.seal(m).map_err(|e| e.to_string())?;
    wire::write_frame(wr, &b)
        .await
        .map_err(|e| format!("sending: {e}"))
}

/// Hello both ways, checks, proofs both ways; returns the peer's hello and the key.
async fn handshake(
    s: &LinkSettings,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Result<(Hello, [u8; 32]), WireError> {
    let mine = Hello {
        magic: wire::MAGIC,
        protocol: s.protocol,
        cluster: s.cluster.clone(),
        node: s.me.clone(),
        nonce: wire::nonce(),
    };
    wire::write_frame(wr, &postcard::to_allocvec(&mine)?).await?;
    let theirs: Hello =
        postcard::from_bytes(&wire::read_frame(rd).await?).map_err(|_| WireError::Magic)?;
    if theirs.magic != wire::MAGIC {
        return Err(WireError::Magic);
    }
    let refusal = if theirs.cluster != s.cluster {
        Some(format!(
            "it belongs to cluster {:?}, this node to {:?} (check `cluster` in both nodes' configs)",
            theirs.cluster, s.cluster
        ))
    } else if !wire::accepts(s.protocol, theirs.protocol) {
        Some(format!(
            "it speaks daemon protocol {}, this node {} (accepting {} to {}): upgrade one node, one version at a time",
            theirs.protocol,
            s.protocol,
            s.protocol.saturating_sub(1),
            s.protocol.saturating_add(1)
        ))
    } else if theirs.node != s.peer {
        Some(format!(
            "it calls itself {:?} but this node's config names its peer {:?}",
            theirs.node, s.peer
        ))
    } else {
        None
    };
    if let Some(why) = refusal {
        // Tell the other side why, so both logs say the same.
        let _ = wire::write_frame(wr, &postcard::to_allocvec(&Auth::Refused(why.clone()))?).await;
        return Err(WireError::Refused(why));
    }
    let p = wire::proof(
        &s.secret,
        &s.cluster,
        &s.me,
        &s.peer,
        &mine.nonce,
        &theirs.nonce,
    );
    wire::write_frame(wr, &postcard::to_allocvec(&Auth::Proof(p))?).await?;
    match postcard::from_bytes::<Auth>(&wire::read_frame(rd).await?)? {
        Auth::Refused(why) => Err(WireError::Refused(format!(
            "the peer refused this node: {why}"
        ))),
        Auth::Proof(p) => {
            let want = wire::proof(
                &s.secret,
                &s.cluster,
                &s.peer,
                &s.me,
                &theirs.nonce,
                &mine.nonce,
            );
            if !wire::same_mac(&want, &p) {
                return Err(WireError::Refused(
                    "it failed authentication: the cluster secrets differ (copy the same secret file to both nodes)".into(),
                ));
            }
            let key = wire::session_key(&s.secret, (&s.me, &mine.nonce), (&s.peer, &theirs.nonce));
            Ok((theirs, key))
        }
    }
}
