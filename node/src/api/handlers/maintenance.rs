//! Maintenance mode: `POST /api/v1/nodes/{name}/workon` and `.../finalize` (commands
//! about a node, run once per `X-Command-Id` like the VM commands).

use super::*;
use crate::cluster::NodeCommand;

async fn run_node(
    st: Arc<ApiState>,
    h: &HeaderMap,
    node: String,
    cmd: NodeCommand,
) -> Result<Response, ApiError> {
    authorize(&st, h, Access::Admin)?;
    let id = command_id(h)?;
    let core = st.core.clone();
    let r = blocking(move || core.node_command(id, &node, cmd)).await?;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, Json(r.body)).into_response())
}

/// Puts a node in maintenance: every VM leaves it (FT and HA VMs run simplex on the
/// other node, their VMMs here stopped cleanly; unprotected VMs shut down cleanly, to be
/// started again by finalize), then the node runs nothing until finalized. Refused
/// (409) when the other node is in maintenance, or is down while this one holds a
/// running VM's only copy, or when an FT/HA primary here has no standby in sync.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/workon", tag = "nodes", security(("token" = [])),
    params(("name" = String, Path, description = "Node name"), ("X-Command-Id" = Option<String>, Header, description = "Makes the command run once")),
    responses((status = 200, body = CommandResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn workon_node(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    run_node(st, &h, name, NodeCommand::WorkOn).await
}

/// Brings a node back from maintenance: its FT/HA standbys start and resync, the
/// unprotected VMs workon shut down start again there, then failback follows each VM's
/// policy.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/finalize", tag = "nodes", security(("token" = [])),
    params(("name" = String, Path, description = "Node name"), ("X-Command-Id" = Option<String>, Header, description = "Makes the command run once")),
    responses((status = 200, body = CommandResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn finalize_node(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    run_node(st, &h, name, NodeCommand::Finalize).await
}
