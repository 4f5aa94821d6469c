//! Live migration: `POST /api/v1/vms/{name}/migrate` (a command, run once per
//! `X-Command-Id`) and `GET /api/v1/vms/{name}/migration` (its progress).

use super::*;
use crate::model::{MigrationView, NodeName};

/// The body of a migrate command (optional: without it, or without `to`, the VM moves
/// to the node it does not run on).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target node.
    pub to: Option<NodeName>,
}

/// Moves a running VM to the other node while it runs: unprotected VMs by a pre-copy
/// to a receiving VMM there and a handover at a checkpoint (its TCP connections
/// survive, nothing acknowledged is lost), FT VMs by a planned role swap once their
/// standby there is in sync; the target becomes its preferred node. A migration that
/// fails leaves the VM running where it was. HA VMs are refused (409) with the reason,
/// as are VMs not running and a peer not online. Follow it with `GET .../migration`.
#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", tag = "vms", security(("token" = [])),
    params(("name" = String, Path, description = "VM name"), ("X-Command-Id" = Option<String>, Header, description = "Makes the command run once")),
    request_body(content = Option<MigrateRequest>, description = "The target node (optional)"),
    responses((status = 200, body = CommandResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn migrate_vm(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&st, &h, Access::Admin)?;
    let req: MigrateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        MigrateRequest::default()
    } else {
        parse_json(&body)?
    };
    run(st, &h, name, Command::Migrate(req.to)).await
}

/// A VM's live migration: under way or not, its phase (or why it was given up), and,
/// asked of the node the VM runs on, the pre-copy's rounds, pages and bytes sent, the
/// guest's dirty rate and an estimate of the time to the final pause.
#[utoipa::path(get, path = "/api/v1/vms/{name}/migration", tag = "vms", security(("token" = [])),
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = MigrationView), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
pub async fn show_migration(
    State(st): S,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<MigrationView>, ApiError> {
    read_vm(&st, &h, name, |core, n| core.migration_view(n)).await
}
