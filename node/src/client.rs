//! The API's client (blocking HTTP/JSON), used by the `twinrun` CLI and the tests.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ApiError;
use crate::core::CommandResponse;
use crate::model::{NodeView, VmSettings, VmSpec, VmView};
use crate::store::Event;

/// Where the CLI finds the API and its token when not told.
pub const DEFAULT_API: &str = "http://127.0.0.1:7480";
pub const DEFAULT_TOKEN_FILE: &str = "/etc/twinrun/api-token";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API could not be reached (or answered something that is not HTTP/JSON).
    #[error("cannot reach the twinrund API at {url}: {why} (is twinrund running? set --api or $TWINRUN_API)")]
    Unreachable { url: String, why: String },
    /// The API answered with an error.
    #[error("{error}")]
    Api {
        status: u16,
        error: String,
        kind: String,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Unreachable { .. } => None,
            ClientError::Api { status, .. } => Some(*status),
        }
    }
}

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Self::build(base, token, None)
    }

    /// A client of an HTTPS API whose certificate is signed by the PEM CA in `ca`
    /// (or is that self-signed certificate).
    pub fn with_ca(base: &str, token: &str, ca: &std::path::Path) -> Result<Client, String> {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read the CA file {}: {e}", ca.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", ca.display()));
        }
        Ok(Self::build(
            base,
            token,
            Some(ureq::tls::RootCerts::new_with_certs(&certs)),
        ))
    }

    fn build(base: &str, token: &str, roots: Option<ureq::tls::RootCerts>) -> Client {
        let mut cfg = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false);
        if let Some(r) = roots {
            cfg = cfg.tls_config(ureq::tls::TlsConfig::builder().root_certs(r).build());
        }
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            agent: cfg.build().into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            url: self.base.clone(),
            why: e.to_string(),
        }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut r = r.map_err(|e| self.unreachable(e))?;
        let status = r.status().as_u16();
        let text = r
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        if (200..300).contains(&status) {
            return serde_json::from_str(&text)
                .map_err(|e| self.unreachable(format!("bad answer: {e}")));
        }
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => Err(ClientError::Api {
                status,
                error: e.error,
                kind: e.kind,
            }),
            Err(_) => Err(ClientError::Api {
                status,
                error: format!("HTTP {status}: {}", text.trim()),
                kind: "internal".into(),
            }),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call();
        self.finish(r)
    }

    fn send<B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        id: Option<&str>,
    ) -> Result<CommandResponse, ClientError> {
        let url = self.url(path);
        let auth = format!("Bearer {}", self.token);
        let r = match method {
            "DELETE" => {
                let mut b = self.agent.delete(&url).header("Authorization", &auth);
                if let Some(id) = id {
                    b = b.header("X-Command-Id", id);
                }
                b.call()
            }
            _ => {
                let mut b = if method == "PATCH" {
                    self.agent.patch(&url)
                } else {
                    self.agent.post(&url)
                };
                b = b.header("Authorization", &auth);
                if let Some(id) = id {
                    b = b.header("X-Command-Id", id);
                }
                match body {
                    Some(body) => b.send_json(body),
                    None => b.send_empty(),
                }
            }
        };
        self.finish(r)
    }

    pub fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.get("/nodes")
    }

    pub fn node(&self, name: &str) -> Result<NodeView, ClientError> {
        self.get(&format!("/nodes/{name}"))
    }

    pub fn vms(&self) -> Result<Vec<VmView>, ClientError> {
        self.get("/vms")
    }

    pub fn vm(&self, name: &str) -> Result<VmView, ClientError> {
        self.get(&format!("/vms/{name}"))
    }

    pub fn events(&self, vm: Option<&str>, limit: u32) -> Result<Vec<Event>, ClientError> {
        match vm {
            Some(v) => self.get(&format!("/events?vm={v}&limit={limit}")),
            None => self.get(&format!("/events?limit={limit}")),
        }
    }

    pub fn create(&self, spec: &VmSpec, id: Option<&str>) -> Result<CommandResponse, ClientError> {
        self.send("POST", "/vms", Some(spec), id)
    }

    pub fn set(
        &self,
        vm: &str,
        s: &VmSettings,
        id: Option<&str>,
    ) -> Result<CommandResponse, ClientError> {
        self.send("PATCH", &format!("/vms/{vm}"), Some(s), id)
    }

    pub fn delete(&self, vm: &str, id: Option<&str>) -> Result<CommandResponse, ClientError> {
        self.send::<()>("DELETE", &format!("/vms/{vm}"), None, id)
    }

    /// `POST /vms/{vm}/migrate` (to the other node, or `to`).
    pub fn migrate(
        &self,
        vm: &str,
        to: Option<&str>,
        id: Option<&str>,
    ) -> Result<CommandResponse, ClientError> {
        let body = serde_json::json!({ "to": to });
        self.send("POST", &format!("/vms/{vm}/migrate"), Some(&body), id)
    }

    pub fn migration(&self, vm: &str) -> Result<crate::model::MigrationView, ClientError> {
        self.get(&format!("/vms/{vm}/migration"))
    }

    /// `op`: start, shutdown, poweroff, restart, failback.
    /// `POST /nodes/{node}/{op}` (`workon`, `finalize`).
    pub fn node_action(
        &self,
        node: &str,
        op: &str,
        id: Option<&str>,
    ) -> Result<CommandResponse, ClientError> {
        self.send::<()>("POST", &format!("/nodes/{node}/{op}"), None, id)
    }

    pub fn action(
        &self,
        vm: &str,
        op: &str,
        id: Option<&str>,
    ) -> Result<CommandResponse, ClientError> {
        self.send::<()>("POST", &format!("/vms/{vm}/{op}"), None, id)
    }
}
