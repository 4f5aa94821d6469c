//! The OpenAPI document, generated from the handlers' annotations and the model's
//! types. `node/openapi.json` is this document as committed; a test keeps them equal
//! (`TWINRUN_BLESS=1` rewrites the file), and `twinrund --openapi` prints it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use axum::response::{IntoResponse, Response};

use super::handlers;

#[derive(OpenApi)]
#[openapi(
    info(title = "twinrund API", description = "The twinrun node daemon's API: nodes, VMs, commands, events. Both nodes serve the whole cluster."),
    paths(
        openapi,
        handlers::list_nodes,
        handlers::show_node,
        handlers::maintenance::workon_node,
        handlers::maintenance::finalize_node,
        handlers::list_vms,
        handlers::show_vm,
        handlers::create_vm,
        handlers::set_vm,
        handlers::delete_vm,
        handlers::start_vm,
        handlers::shutdown_vm,
        handlers::poweroff_vm,
        handlers::restart_vm,
        handlers::failback_vm,
        handlers::migrate::migrate_vm,
        handlers::migrate::show_migration,
        handlers::events,
    ),
    modifiers(&Security)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as pretty JSON (stable: what is committed).
pub fn json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.info.license = None;
    doc.info.contact = None;
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_document_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let now = super::json() + "\n";
        if std::env::var_os("TWINRUN_BLESS").is_some() {
            std::fs::write(&path, &now).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == now,
            "node/openapi.json differs from the API's code: run `TWINRUN_BLESS=1 cargo test -p twinrund --lib doc` and commit it"
        );
    }
}

/// The OpenAPI document of this API (no token needed).
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json(),
    )
        .into_response()
}
