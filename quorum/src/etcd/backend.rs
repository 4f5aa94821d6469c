//! The etcd backend as the node's runtime sees it: [`EtcdConnection`] (one etcd
//! cluster per node: a thread with a single-threaded tokio runtime and one gRPC
//! client) and [`EtcdBackend`] (one per VM: an [`EtcdSession`] running as a task on
//! that thread, fed through a channel, its answers returned through a channel and a
//! wake-up datagram that `Runner` polls). The caller never blocks and never sees tokio.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::exec::{Exec, Shared};
use super::session::{EtcdSession, SessionConfig, SessionStats};
use crate::client::Backend;
use crate::config::{read_secret, EtcdConfig, QuorumConfigError};
use crate::types::NodeId;
use crate::witness::ops::{Reply, Request};

/// Requests waiting for a session's task (more are dropped: the machine resends).
const CHANNEL: usize = 64;
/// A repeated etcd failure is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// One etcd cluster for the backends of one node.
pub struct EtcdConnection {
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
    prefix: String,
    endpoints: Vec<String>,
    op_timeout: Duration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EtcdConnection {
    /// Checks `cfg`, reads its TLS and password files, and starts the client thread.
    /// Does not wait for etcd: an unreachable etcd shows as unanswered requests.
    pub fn start(
        cfg: &EtcdConfig,
        op_timeout: Duration,
    ) -> Result<Arc<EtcdConnection>, QuorumConfigError> {
        cfg.validate()?;
        let mut opts = ConnectOptions::new()
            // A member without a leader answers at once instead of hanging.
            .with_require_leader(true)
            .with_connect_timeout(op_timeout)
            .with_keep_alive(
                Duration::from_secs(1),
                op_timeout.max(Duration::from_secs(1)),
            )
            .with_auto_token_refresh(true);
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password_file) {
            let pw = String::from_utf8(read_secret(p)?).map_err(|_| {
                QuorumConfigError::Etcd(format!("{}: the password is not UTF-8", p.display()))
            })?;
            opts = opts.with_user(u.clone(), pw);
        }
        if cfg.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_secret(ca)?));
            }
            if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
                tls = tls.identity(Identity::from_pem(read_secret(c)?, read_secret(k)?));
            }
            opts = opts.with_tls(tls);
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (htx, hrx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("quorum-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = htx.send(Err(e));
                        return;
                    }
                };
                let _ = htx.send(Ok(rt.handle().clone()));
                // Runs the sessions' tasks until the connection is dropped.
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| QuorumConfigError::Runtime(e.to_string()))?;
        let handle = hrx
            .recv()
            .map_err(|e| QuorumConfigError::Runtime(e.to_string()))?
            .map_err(|e| QuorumConfigError::Runtime(e.to_string()))?;
        Ok(Arc::new(EtcdConnection {
            handle,
            shared: Arc::new(Shared::new(cfg.endpoints.clone(), opts)),
            prefix: cfg.prefix.clone(),
            endpoints: cfg.endpoints.clone(),
            op_timeout,
            stop: Some(stop_tx),
            thread: Some(thread),
        }))
    }

    /// A backend for one VM's machine of `node` in `cluster`. `busy_retry`: how soon a
    /// node refused because another's owner key stands asks again.
    pub fn backend(
        self: &Arc<Self>,
        node: NodeId,
        cluster: &str,
        busy_retry: Duration,
    ) -> Result<EtcdBackend, QuorumConfigError> {
        let session = EtcdSession::new(SessionConfig::new(node, cluster, &self.prefix, busy_retry))
            .map_err(QuorumConfigError::Etcd)?;
        let (req_tx, req_rx) = tokio::sync::mpsc::channel(CHANNEL);
        let (ans_tx, ans_rx) = mpsc::channel();
        let (wake_tx, wake_rx) = UnixDatagram::pair().map_err(QuorumConfigError::Socket)?;
        wake_tx
            .set_nonblocking(true)
            .map_err(QuorumConfigError::Socket)?;
        wake_rx
            .set_nonblocking(true)
            .map_err(QuorumConfigError::Socket)?;
        let status = Arc::new(Mutex::new(Status::default()));
        let task = Task {
            session,
            exec: Exec::new(self.shared.clone(), self.op_timeout),
            requests: req_rx,
            answers: ans_tx,
            wake: wake_tx,
            status: status.clone(),
            what: format!("etcd {} for {node}", self.endpoints.join(",")),
        };
        self.handle.spawn(task.run());
        Ok(EtcdBackend {
            _conn: self.clone(),
            requests: req_tx,
            answers: ans_rx,
            wake: wake_rx,
            status,
            describe: format!(
                "etcd {} ({}/{cluster})",
                self.endpoints.join(","),
                self.prefix
            ),
        })
    }
}

impl Drop for EtcdConnection {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a backend's task last saw, for status views and tests.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub stats: SessionStats,
    pub last_error: Option<String>,
}

/// One VM's etcd backend (see the module docs).
pub struct EtcdBackend {
    _conn: Arc<EtcdConnection>,
    requests: tokio::sync::mpsc::Sender<(u64, Request)>,
    answers: mpsc::Receiver<(u64, Reply)>,
    wake: UnixDatagram,
    status: Arc<Mutex<Status>>,
    describe: String,
}

impl EtcdBackend {
    /// Counters and the last etcd error.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Backend for EtcdBackend {
    fn send(&mut self, id: u64, req: &Request) -> io::Result<()> {
        match self.requests.try_send((id, req.clone())) {
            Ok(()) => Ok(()),
            // Full: etcd is slow; the machine asks again.
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                Err(io::Error::other("the etcd client thread has stopped"))
            }
        }
    }

    fn drain(&mut self) -> io::Result<Vec<(u64, Reply)>> {
        // Wake-ups first, then answers: an answer queued after this read sends a new
        // wake-up.
        let mut b = [0u8; 16];
        loop {
            match self.wake.recv(&mut b) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.answers.try_iter().collect())
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// A session's task on the connection's runtime.
struct Task {
    session: EtcdSession,
    exec: Exec,
    requests: tokio::sync::mpsc::Receiver<(u64, Request)>,
    answers: mpsc::Sender<(u64, Reply)>,
    wake: UnixDatagram,
    status: Arc<Mutex<Status>>,
    what: String,
}

impl Task {
    async fn run(mut self) {
        let mut logged: Option<(Instant, String)> = None;
        loop {
            loop {
                match self.requests.try_recv() {
                    Ok((id, r)) => self.session.request(id, r),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    // The backend was dropped.
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            let op = self.session.poll_op();
            if let Some((op_id, op)) = op {
                let r = self.exec.run(&op).await;
                self.session.on_result(op_id, r);
            }
            if let Some(e) = self.session.last_error.take() {
                let repeat = logged
                    .as_ref()
                    .is_some_and(|(t, m)| *m == e && t.elapsed() < LOG_EVERY);
                if !repeat {
                    log::warn!("quorum: {}: {e}", self.what);
                    logged = Some((Instant::now(), e.clone()));
                }
                if let Ok(mut s) = self.status.lock() {
                    s.last_error = Some(e);
                }
            }
            if let Ok(mut s) = self.status.lock() {
                s.stats = self.session.stats;
            }
            let answers = self.session.take_answers();
            if !answers.is_empty() {
                for a in answers {
                    if self.answers.send(a).is_err() {
                        return;
                    }
                }
                // Full buffer: a wake-up is pending anyway.
                let _ = self.wake.send(&[1]);
            }
            if self.session.is_idle() {
                match self.requests.recv().await {
                    Some((id, r)) => self.session.request(id, r),
                    None => return,
                }
            }
        }
    }
}
