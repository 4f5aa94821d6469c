//! The API's error answer (a leaf: the daemon's core builds and reads it too, for the
//! answers of commands it keeps).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What went wrong and what to do about it.
    pub error: String,
    /// unauthorized, forbidden, bad-request, not-found, conflict, invalid, internal.
    pub kind: String,
    /// The refused command's id (commands only): sent again, it gets this answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    #[serde(skip)]
    pub status: u16,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, error: impl Into<String>) -> ApiError {
        ApiError {
            error: error.into(),
            kind: kind.into(),
            command_id: None,
            status: status.as_u16(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self)).into_response()
    }
}
