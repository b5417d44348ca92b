//! The OpenAI API with any body: an answer or an error in OpenAI's shape, never a server
//! failure (500) or a panic, and the server goes on.
#![no_main]

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

fuzz_target!(|data: &[u8]| {
    let h = iris_fuzz::harness();
    h.rt.block_on(async {
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(data.to_vec()))
            .unwrap();
        let resp = h.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            status.as_u16() != 500,
            "500 for {:?}: {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&body)
        );
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!("{status}: not JSON: {:?}", String::from_utf8_lossy(&body))
            });
            assert!(v["error"]["message"].is_string(), "{v}");
        }
    });
});
