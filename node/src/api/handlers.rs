//! The API's handlers. Each checks the token first, then calls the core on a blocking
//! thread (the core's lock, SQLite and process spawns block).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{Access, ApiError, ApiState};
use crate::cluster::Command;
use crate::core::{CommandResponse, Core};
use crate::model::{NodeView, VmSettings, VmSpec, VmView};
use crate::store::Event;

type S = State<Arc<ApiState>>;

pub mod maintenance;
pub mod migrate;

fn authorize(st: &ApiState, h: &HeaderMap, need: Access) -> Result<Access, ApiError> {
    let Some(v) = h.get("authorization") else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no token: send `Authorization: Bearer <token>` (the CLI reads --token-file or $TWINRUN_TOKEN)",
        ));
    };
    let token = v
        .to_str()
        .ok()
        .and_then(|s| s.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    match st.tokens.check(token) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the token is not valid on this node (check the tokens file)",
        )),
        Some(Access::ReadOnly) if need == Access::Admin => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is read-only: changes need an admin token",
        )),
        Some(a) => Ok(a),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {e}"),
        )
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!(
                "bad JSON body at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })
}

fn command_id(h: &HeaderMap) -> Result<Option<String>, ApiError> {
    match h.get("x-command-id") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            let ok = !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
            if ok {
                Ok(Some(s.to_string()))
            } else {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "X-Command-Id must be 1-128 letters, digits, '-', '_', '.' or ':'",
                ))
            }
        }
    }
}

async fn run(
    st: Arc<ApiState>,
    h: &HeaderMap,
    vm: String,
    cmd: Command,
) -> Result<Response, ApiError> {
    authorize(&st, h, Access::Admin)?;
    let id = command_id(h)?;
    let core = st.core.clone();
    let r = blocking(move || core.command(id, &vm, cmd)).await?;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, Json(r.body)).into_response())
}

/// Both nodes of the cluster and their state as this node sees them.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes", security(("token" = [])),
    responses((status = 200, body = [NodeView]), (status = 401, body = ApiError)))]
pub async fn list_nodes(State(st): S, h: HeaderMap) -> Result<Json<Vec<NodeView>>, ApiError> {
    authorize(&st, &h, Access::ReadOnly)?;
    let core = st.core.clone();
    Ok(Json(blocking(move || core.node_views()).await?))
}

/// One node.
#[utoipa::path(get, path = "/api/v1/nodes/{name}", tag = "nodes", security(("token" = [])),
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
pub async fn show_node(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    authorize(&st, &h, Access::ReadOnly)?;
    let core = st.core.clone();
    let nodes = blocking(move || core.node_views()).await?;
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    nodes
        .into_iter()
        .find(|n| n.name == name)
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no node named {name:?} (nodes: {})", names.join(", ")),
            )
        })
}

/// Every VM with its state and why it is there.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", security(("token" = [])),
    responses((status = 200, body = [VmView]), (status = 401, body = ApiError)))]
pub async fn list_vms(State(st): S, h: HeaderMap) -> Result<Json<Vec<VmView>>, ApiError> {
    authorize(&st, &h, Access::ReadOnly)?;
    let core = st.core.clone();
    Ok(Json(blocking(move || core.vm_views()).await?))
}

/// One VM: its spec, state, reason, VMM processes.
#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms", security(("token" = [])),
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmView), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
pub async fn show_vm(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    read_vm(&st, &h, name, |core, n| core.vm_view(n)).await
}

/// A read-only view of the VM `name` (run off the async runtime), or 404 in the words
/// every per-VM endpoint uses.
async fn read_vm<T: Send + 'static>(
    st: &ApiState,
    h: &HeaderMap,
    name: String,
    read: impl FnOnce(&Core, &str) -> Option<T> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    authorize(st, h, Access::ReadOnly)?;
    let core = st.core.clone();
    let n = name.clone();
    blocking(move || read(&core, &n))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no VM named {name:?} (see `twinrun vm list`)"),
            )
        })
}

/// Defines a VM (created stopped).
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", security(("token" = [])),
    params(("X-Command-Id" = Option<String>, Header, description = "Makes the command run once")),
    request_body = VmSpec,
    responses((status = 201, body = CommandResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_vm(State(st): S, h: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&st, &h, Access::Admin)?;
    let spec: VmSpec = parse_json(&body)?;
    let vm = spec.name.clone();
    crate::model::check_vm_name(&vm)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e))?;
    run(st, &h, vm, Command::Create(spec)).await
}

/// Changes protection level, preferred node, autostart or failback.
#[utoipa::path(patch, path = "/api/v1/vms/{name}", tag = "vms", security(("token" = [])),
    params(("name" = String, Path, description = "VM name"), ("X-Command-Id" = Option<String>, Header, description = "Makes the command run once")),
    request_body = VmSettings,
    responses((status = 200, body = CommandResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn set_vm(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&st, &h, Access::Admin)?;
    let set: VmSettings = parse_json(&body)?;
    run(st, &h, name, Command::Set(set)).await
}

macro_rules! vm_command {
    ($fn:ident, $path:literal, $method:ident, $cmd:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path($method, path = $path, tag = "vms", security(("token" = [])),
            params(("name" = String, Path, description = "VM name"), ("X-Command-Id" = Option<String>, Header, description = "Makes the command run once")),
            responses((status = 200, body = CommandResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
                (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
        pub async fn $fn(State(st): S, h: HeaderMap, Path(name): Path<String>) -> Result<Response, ApiError> {
            run(st, &h, name, $cmd).await
        }
    };
}

vm_command!(
    delete_vm,
    "/api/v1/vms/{name}",
    delete,
    Command::Delete,
    "Deletes a stopped VM (and its disk images on both nodes)."
);
vm_command!(
    start_vm,
    "/api/v1/vms/{name}/start",
    post,
    Command::Start,
    "Starts a VM (and clears an error state)."
);
vm_command!(
    shutdown_vm,
    "/api/v1/vms/{name}/shutdown",
    post,
    Command::Shutdown,
    "Stops a VM: its VMMs get SIGTERM and flush their devices."
);
vm_command!(
    poweroff_vm,
    "/api/v1/vms/{name}/poweroff",
    post,
    Command::PowerOff,
    "Stops a VM at once (SIGKILL)."
);
vm_command!(
    restart_vm,
    "/api/v1/vms/{name}/restart",
    post,
    Command::Restart,
    "Stops and starts a running VM."
);
vm_command!(
    failback_vm,
    "/api/v1/vms/{name}/failback",
    post,
    Command::Failback,
    "Moves a VM back to its preferred node once that node is in sync."
);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only this VM's events.
    pub vm: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// The node's event log, oldest first.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", security(("token" = [])),
    params(EventQuery),
    responses((status = 200, body = [Event]), (status = 400, body = ApiError), (status = 401, body = ApiError)))]
pub async fn events(
    State(st): S,
    h: HeaderMap,
    q: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    authorize(&st, &h, Access::ReadOnly)?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", e.body_text()))?;
    let limit = q.limit.unwrap_or(100).min(1000);
    let core = st.core.clone();
    Ok(Json(
        blocking(move || core.events(q.vm.as_deref(), limit)).await?,
    ))
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such endpoint (see /api/v1/openapi.json)",
    )
}
