//! Proto requests as any caller may send them: a `GenerateRequest` at the gateway and a
//! `DecodeRequest` (made-up visual tokens and all) at the decoder tier get tokens or a
//! specific error, never INTERNAL or a panic.
#![no_main]

use futures::StreamExt;
use iris_proto::v1 as pb;
use iris_proto::v1::gateway_server::Gateway as _;
use iris_server::services::GatewayService;
use iris_server::tiers::DecoderTier;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::time::{Duration, Instant};
use tonic::Code;

fn check(s: &tonic::Status) {
    assert!(
        s.code() != Code::Internal && s.code() != Code::Unknown,
        "{s:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let h = iris_fuzz::harness();
    h.rt.block_on(async {
        if which % 2 == 0 {
            let Ok(mut req) = pb::DecodeRequest::decode(bytes) else {
                return;
            };
            req.max_tokens = req.max_tokens.min(4);
            let deadline = Instant::now() + Duration::from_secs(30);
            match h.decoder.generate(req, deadline).await {
                Ok(mut st) => {
                    while let Some(ev) = st.next().await {
                        if let Err(s) = ev {
                            check(&s);
                        }
                    }
                }
                Err(e) => check(&tonic::Status::from(e)),
            }
        } else {
            let Ok(req) = pb::GenerateRequest::decode(bytes) else {
                return;
            };
            let svc = GatewayService(h.gateway.clone());
            match svc.generate(tonic::Request::new(req)).await {
                Ok(r) => {
                    let mut st = r.into_inner();
                    while let Some(ev) = st.next().await {
                        if let Err(s) = ev {
                            check(&s);
                        }
                    }
                }
                Err(s) => check(&s),
            }
        }
    });
});
