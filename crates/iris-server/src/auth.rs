//! Credentials a listener asks for: the gateway's API keys (HTTP `Authorization:
//! Bearer KEY`, gRPC `authorization` metadata) and, at a tier, the cluster token the
//! gateway sends the same way. Keys are kept as BLAKE3 hashes and compared hash to hash
//! (constant time), so neither a key nor its length shows in timing. No keys: open.

use std::path::Path;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request as GrpcRequest, Status};

#[derive(Clone, Default)]
pub struct Keys {
    hashes: Arc<Vec<blake3::Hash>>,
    /// What the keys are, for error messages ("API key", "cluster token").
    what: &'static str,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} {}s)", self.hashes.len(), self.what)
    }
}

/// Keys one per line (blank lines and `#` comments skipped).
pub fn read_key_file(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// The token of an `authorization` value: `Bearer TOKEN` (any case of `Bearer`).
fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Keys {
    pub fn new(what: &'static str, keys: impl IntoIterator<Item = String>) -> Keys {
        let hashes = keys
            .into_iter()
            .filter(|k| !k.is_empty())
            .map(|k| blake3::hash(k.as_bytes()))
            .collect();
        Keys {
            hashes: Arc::new(hashes),
            what,
        }
    }

    /// No keys: everything is let in.
    pub fn is_open(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether an `authorization` value carries one of the keys.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(token) = authorization.and_then(bearer) else {
            return false;
        };
        let h = blake3::hash(token.as_bytes());
        // Every key compared, so the time does not tell which (if any) matched.
        self.hashes.iter().fold(false, |ok, k| ok | (*k == h))
    }

    fn refusal(&self, authorization: Option<&str>) -> String {
        match authorization {
            None => format!(
                "no {}: send `authorization: Bearer <{}>`",
                self.what, self.what
            ),
            Some(_) => format!("the {} is not valid", self.what),
        }
    }

    /// Axum middleware: 401 with an OpenAI error body for a request without a key.
    pub async fn require(
        axum::extract::State(keys): axum::extract::State<Keys>,
        req: Request,
        next: Next,
    ) -> Response {
        let v = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if keys.allows(v) {
            return next.run(req).await;
        }
        let body = serde_json::json!({"error": {
            "message": keys.refusal(v),
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key",
        }});
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(body),
        )
            .into_response()
    }
}

/// Keys as a tonic interceptor: a call without one is UNAUTHENTICATED.
impl tonic::service::Interceptor for Keys {
    fn call(&mut self, req: GrpcRequest<()>) -> Result<GrpcRequest<()>, Status> {
        let v = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if self.allows(v) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(self.refusal(v)))
        }
    }
}

/// `Bearer TOKEN` as gRPC metadata, for a client that must present `token`.
pub fn bearer_metadata(token: &str) -> Result<MetadataValue<Ascii>, String> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| "a token must be printable ASCII".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_whole_bearer_tokens_only() {
        let k = Keys::new("API key", ["k1".to_string(), "second".to_string()]);
        assert!(k.allows(Some("Bearer k1")));
        assert!(k.allows(Some("bearer second")));
        for bad in [
            None,
            Some("k1"),
            Some("Bearer k"),
            Some("Bearer k1x"),
            Some("Basic k1"),
            Some("Bearer "),
        ] {
            assert!(!k.allows(bad), "{bad:?}");
        }
        assert!(Keys::default().allows(None));
        assert!(Keys::new("API key", [String::new()]).is_open());
    }
}
