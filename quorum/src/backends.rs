//! Opening the configured quorum backend: what [`QuorumConfig::open`] gives, one set of
//! backends per VM (a file of its own so that the configuration, which the etcd client
//! reads, does not depend on the clients it opens).

use std::net::SocketAddr;
#[cfg(feature = "etcd")]
use std::time::Duration;

use crate::client::{Backend, WitnessClient};
use crate::config::{read_secret, BackendKind, QuorumConfig, QuorumConfigError};
use crate::types::NodeId;
use crate::witness::wire::MIN_SECRET;

impl QuorumConfig {
    /// Reads the files the backend needs and opens it, for node `node`: a factory of
    /// backends, one set per VM.
    pub fn open(&self, node: NodeId) -> Result<Backends, QuorumConfigError> {
        self.validate()?;
        let timing = self.timing();
        match self.backend {
            BackendKind::Witness => {
                let w = self
                    .witness
                    .as_ref()
                    .ok_or(QuorumConfigError::MissingTable("witness"))?;
                let secret = read_secret(&w.secret_file)?;
                if secret.len() < MIN_SECRET {
                    return Err(QuorumConfigError::ShortSecret {
                        path: w.secret_file.clone(),
                        len: secret.len(),
                    });
                }
                let addr = |a: &String| {
                    a.parse::<SocketAddr>()
                        .map_err(|_| QuorumConfigError::WitnessAddr(a.clone()))
                };
                Ok(Backends::Witness {
                    cluster: self.cluster.clone(),
                    node,
                    secret,
                    preferred: addr(&w.preferred)?,
                    alternate: w.alternate.as_ref().map(addr).transpose()?,
                })
            }
            BackendKind::Etcd => {
                #[cfg(feature = "etcd")]
                {
                    let e = self
                        .etcd
                        .as_ref()
                        .ok_or(QuorumConfigError::MissingTable("etcd"))?;
                    let op_timeout = e
                        .op_timeout_ms
                        .map_or(timing.renew_interval, Duration::from_millis);
                    let conn = crate::etcd::EtcdConnection::start(e, op_timeout)?;
                    Ok(Backends::Etcd {
                        conn,
                        cluster: self.cluster.clone(),
                        node,
                        busy_retry: timing.retry,
                    })
                }
                #[cfg(not(feature = "etcd"))]
                {
                    let _ = timing;
                    Err(QuorumConfigError::NoEtcd)
                }
            }
            BackendKind::None => Ok(Backends::None),
        }
    }
}

/// What [`QuorumConfig::open`] gives: makes the backends of one VM's [`Runner`].
///
/// [`Runner`]: crate::client::Runner
pub enum Backends {
    Witness {
        cluster: String,
        node: NodeId,
        secret: Vec<u8>,
        preferred: SocketAddr,
        alternate: Option<SocketAddr>,
    },
    #[cfg(feature = "etcd")]
    Etcd {
        conn: std::sync::Arc<crate::etcd::EtcdConnection>,
        cluster: String,
        node: NodeId,
        busy_retry: Duration,
    },
    None,
}

/// The backends of the preferred and the alternate slot.
pub type SlotBackends = (Option<Box<dyn Backend>>, Option<Box<dyn Backend>>);

impl Backends {
    /// A fresh set for one VM (each VM has its own witness sessions; etcd backends of
    /// one node share one connection).
    pub fn for_vm(&self) -> Result<SlotBackends, QuorumConfigError> {
        match self {
            Backends::Witness {
                cluster,
                node,
                secret,
                preferred,
                alternate,
            } => {
                let mk = |a: SocketAddr| -> Result<Box<dyn Backend>, QuorumConfigError> {
                    Ok(Box::new(
                        WitnessClient::new(a, cluster, *node, secret)
                            .map_err(QuorumConfigError::Socket)?,
                    ))
                };
                Ok((Some(mk(*preferred)?), alternate.map(mk).transpose()?))
            }
            #[cfg(feature = "etcd")]
            Backends::Etcd {
                conn,
                cluster,
                node,
                busy_retry,
            } => Ok((
                Some(Box::new(conn.backend(*node, cluster, *busy_retry)?)),
                None,
            )),
            Backends::None => Ok((None, None)),
        }
    }
}
