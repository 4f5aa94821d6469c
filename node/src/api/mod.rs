//! The node's REST API (HTTP/JSON, axum). Every node serves it; both answer for the
//! whole cluster (the record is replicated) and a command sent to either runs once.
//!
//! Paths live under `/api/v1`. Reads need a token; changes an admin token. Commands take
//! an optional `X-Command-Id` header: the same id sent again (to either node) gets the
//! first answer back (`replayed: true`) and runs nothing. The OpenAPI document is
//! generated from these handlers and types (`doc.rs`), served at
//! `/api/v1/openapi.json`, and kept in `node/openapi.json`.

pub mod auth;
pub mod doc;
mod error;
mod handlers;
pub mod tls;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::core::Core;

pub use auth::{Access, Tokens};
pub use error::ApiError;

pub struct ApiState {
    pub core: Arc<Core>,
    pub tokens: Tokens,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(doc::openapi))
        .route("/api/v1/nodes", get(handlers::list_nodes))
        .route("/api/v1/nodes/{name}", get(handlers::show_node))
        .route(
            "/api/v1/nodes/{name}/workon",
            post(handlers::maintenance::workon_node),
        )
        .route(
            "/api/v1/nodes/{name}/finalize",
            post(handlers::maintenance::finalize_node),
        )
        .route(
            "/api/v1/vms",
            get(handlers::list_vms).post(handlers::create_vm),
        )
        .route(
            "/api/v1/vms/{name}",
            get(handlers::show_vm)
                .delete(handlers::delete_vm)
                .patch(handlers::set_vm),
        )
        .route("/api/v1/vms/{name}/start", post(handlers::start_vm))
        .route("/api/v1/vms/{name}/shutdown", post(handlers::shutdown_vm))
        .route("/api/v1/vms/{name}/poweroff", post(handlers::poweroff_vm))
        .route("/api/v1/vms/{name}/restart", post(handlers::restart_vm))
        .route("/api/v1/vms/{name}/failback", post(handlers::failback_vm))
        .route(
            "/api/v1/vms/{name}/migrate",
            post(handlers::migrate::migrate_vm),
        )
        .route(
            "/api/v1/vms/{name}/migration",
            get(handlers::migrate::show_migration),
        )
        .route("/api/v1/events", get(handlers::events))
        .fallback(handlers::not_found)
        .with_state(state)
}

/// Serves the API on `listener` until the process ends, over TLS when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<ApiState>,
) -> std::io::Result<()> {
    match tls {
        Some(acceptor) => {
            axum::serve(
                tls::TlsListener {
                    tcp: listener,
                    acceptor,
                },
                router(state),
            )
            .await
        }
        None => axum::serve(listener, router(state)).await,
    }
}
