//! Runs the session's [`Op`]s against a real etcd with the `etcd-client` crate (async;
//! tokio lives only in this edge and in `etcd::backend`).
//!
//! Every operation is bounded by `op_timeout`; a timeout or an error is
//! [`OpResult::Failed`] (the session treats the outcome as unknown). A keep-alive is
//! one request on the lease's keep-alive stream followed by the stream's next answer:
//! one operation is in flight at a time, so that answer is the request's. A stream that
//! failed or timed out is dropped (a late answer on it must not be taken for the next
//! request's) and reopened by the next keep-alive.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::keys::VmKeys;
use super::session::{KeyState, Observed, Op, OpResult};

/// One etcd cluster's client, connected on first use (and again after a failed
/// connect: with auth, connecting authenticates and needs etcd up).
pub struct Shared {
    endpoints: Vec<String>,
    options: ConnectOptions,
    client: tokio::sync::OnceCell<Client>,
}

impl Shared {
    pub fn new(endpoints: Vec<String>, options: ConnectOptions) -> Shared {
        Shared {
            endpoints,
            options,
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<Client, String> {
        self.client
            .get_or_try_init(|| async {
                Client::connect(&self.endpoints, Some(self.options.clone()))
                    .await
                    .map_err(|e| format!("cannot connect to etcd {:?}: {e}", self.endpoints))
            })
            .await
            .cloned()
    }
}

/// Runs one session's operations.
pub struct Exec {
    shared: Arc<Shared>,
    op_timeout: Duration,
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Exec {
    pub fn new(shared: Arc<Shared>, op_timeout: Duration) -> Exec {
        Exec {
            shared,
            op_timeout,
            keeper: None,
        }
    }

    /// Runs `op`, within the timeout.
    pub async fn run(&mut self, op: &Op) -> OpResult {
        let r = tokio::time::timeout(self.op_timeout, self.run_inner(op)).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(format!(
                "etcd did not answer {} within {:?}",
                op_name(op),
                self.op_timeout
            )),
        };
        r.unwrap_or_else(|e| {
            if matches!(op, Op::KeepAlive { .. }) {
                self.keeper = None;
            }
            OpResult::Failed(e)
        })
    }

    async fn run_inner(&mut self, op: &Op) -> Result<OpResult, String> {
        let client = self.shared.client().await?;
        let err = |e: etcd_client::Error| format!("etcd {}: {e}", op_name(op));
        match op {
            Op::Read { keys } => {
                let r = client
                    .kv_client()
                    .get(keys.dir.clone(), Some(range(keys)))
                    .await
                    .map_err(err)?;
                Ok(OpResult::Read(observed(keys, r.kvs())))
            }
            Op::Grant { ttl_s } => {
                let r = client
                    .lease_client()
                    .grant(*ttl_s, None)
                    .await
                    .map_err(err)?;
                Ok(OpResult::Granted {
                    lease: r.id(),
                    ttl_s: r.ttl(),
                })
            }
            Op::KeepAlive { lease } => {
                if self.keeper.as_ref().is_none_or(|k| k.0 != *lease) {
                    self.keeper = None;
                    // Opening the stream sends a first keep-alive and waits for its
                    // answer (and does not say the TTL): the one below is ours.
                    match client.lease_client().keep_alive(*lease).await {
                        Ok((k, s)) => self.keeper = Some((*lease, k, s)),
                        // The crate's way of saying the first answer had TTL 0.
                        Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                            return Ok(OpResult::KeepAlive { ttl_s: 0 })
                        }
                        Err(e) => return Err(err(e)),
                    }
                }
                let Some((_, keeper, stream)) = self.keeper.as_mut() else {
                    return Err("no keep-alive stream".into());
                };
                keeper.keep_alive().await.map_err(err)?;
                match stream.message().await.map_err(err)? {
                    Some(r) if r.id() == *lease => Ok(OpResult::KeepAlive { ttl_s: r.ttl() }),
                    Some(r) => Err(format!(
                        "etcd keep-alive of lease {lease:x} answered for lease {:x}",
                        r.id()
                    )),
                    None => Err("etcd closed the keep-alive stream".into()),
                }
            }
            Op::Txn {
                keys,
                compares,
                puts,
            } => {
                let cmps: Vec<Compare> = compares
                    .iter()
                    .map(|(k, rev)| Compare::mod_revision(keys.key(*k), CompareOp::Equal, *rev))
                    .collect();
                let mut then: Vec<TxnOp> = puts
                    .iter()
                    .map(|p| {
                        let opts = (p.lease != 0).then(|| PutOptions::new().with_lease(p.lease));
                        TxnOp::put(keys.key(p.key), p.value.clone(), opts)
                    })
                    .collect();
                then.push(TxnOp::get(keys.dir.clone(), Some(range(keys))));
                let txn = Txn::new()
                    .when(cmps)
                    .and_then(then)
                    .or_else(vec![TxnOp::get(keys.dir.clone(), Some(range(keys)))]);
                let r = client.kv_client().txn(txn).await.map_err(err)?;
                let observed = r
                    .op_responses()
                    .into_iter()
                    .rev()
                    .find_map(|o| match o {
                        TxnOpResponse::Get(g) => Some(observed(keys, g.kvs())),
                        _ => None,
                    })
                    .ok_or("etcd transaction answer without its read")?;
                Ok(OpResult::Txn {
                    succeeded: r.succeeded(),
                    observed,
                })
            }
            Op::Revoke { lease } => match client.lease_client().revoke(*lease).await {
                Ok(_) => Ok(OpResult::Revoked),
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => {
                    Ok(OpResult::Revoked)
                }
                Err(e) => Err(err(e)),
            },
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Read { .. } => "read",
        Op::Grant { .. } => "lease grant",
        Op::KeepAlive { .. } => "lease keep-alive",
        Op::Txn { .. } => "transaction",
        Op::Revoke { .. } => "lease revoke",
    }
}

fn range(keys: &VmKeys) -> GetOptions {
    GetOptions::new().with_range(keys.range_end())
}

/// The VM's three keys among what a range returned (other keys are ignored).
pub fn observed(keys: &VmKeys, kvs: &[KeyValue]) -> Observed {
    let mut o = Observed::default();
    for kv in kvs {
        if let Some(k) = keys.which(kv.key()) {
            *o.slot(k) = Some(KeyState {
                value: kv.value().to_vec(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            });
        }
    }
    o
}
