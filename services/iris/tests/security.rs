//! Credentials and TLS: the gateway asks for API keys (HTTP bearer, gRPC
//! `authorization`), health stays open and metrics are behind the key; tiers speak
//! mutual TLS and refuse a call without the cluster token; a plaintext, certificate-less
//! or foreign-CA caller never reaches a tier.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use iris_proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// A CA and a certificate it signed for 127.0.0.1 / localhost, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = p.signed_by(&key, &issuer).unwrap();
    let write = |file: &str, pem: String| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        cert: write("cert.pem", cert.pem()),
        key: write("key.pem", key.serialize_pem()),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn https(ca: &Path) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap()
}

#[test]
fn api_keys_guard_the_gateway_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# one per line\nfrom-file\n").unwrap();
    let srv = spawn(
        env!("CARGO_BIN_EXE_iris"),
        &[
            "serve",
            "--model",
            &model_arg(),
            "--api-key",
            "k1,k2",
            "--api-key-file",
            s(&file),
        ],
    );
    let http = reqwest::blocking::Client::new();
    let body = serde_json::json!({"model": MODEL, "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hi"}]});
    let chat = |key: Option<&str>| {
        let mut r = http
            .post(format!("http://{}/v1/chat/completions", srv.http))
            .json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap()
    };
    for key in [None, Some("wrong"), Some("k")] {
        let r = chat(key);
        assert_eq!(r.status().as_u16(), 401, "{key:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    }
    for key in ["k1", "k2", "from-file"] {
        assert_eq!(chat(Some(key)).status().as_u16(), 200, "{key}");
    }
    let get = |path: &str, key: Option<&str>| {
        let mut r = http.get(format!("http://{}{path}", srv.http));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(get("/health", None), 200);
    assert_eq!(get("/v1/models", None), 401);
    assert_eq!(get("/v1/models", Some("k1")), 200);
    assert_eq!(get("/metrics", None), 401);
    assert_eq!(get("/metrics", Some("k2")), 200);
    rt().block_on(async {
        let mut g = client(&srv.grpc).await;
        let e = generate(&mut g, request(PROMPT, vec![image("scene.png")], 2))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let mut req = tonic::Request::new(request(PROMPT, vec![image("scene.png")], 2));
        req.metadata_mut()
            .insert("authorization", "Bearer k2".parse().unwrap());
        let mut st = g.generate(req).await.unwrap().into_inner();
        while let Some(ev) = st.message().await.unwrap() {
            if let Some(pb::generate_event::Event::Finished(f)) = ev.event {
                assert_eq!(f.completion_tokens, 2);
            }
        }
        // Health answers anyone.
        let ch = Endpoint::from_shared(format!("http://{}", srv.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let h = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.status, 1, "SERVING");
    });
}

#[test]
fn tiers_speak_mutual_tls_and_refuse_calls_without_the_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = pki(dir.path(), "cluster");
    let rogue = pki(dir.path(), "rogue");
    let m = model_arg();
    let tier_args = [
        "--model",
        &m,
        "--tls-cert",
        s(&cluster.cert),
        "--tls-key",
        s(&cluster.key),
        "--tls-client-ca",
        s(&cluster.ca),
        "--cluster-token",
        "sesame",
    ];
    let encoder = spawn(env!("CARGO_BIN_EXE_iris-encoder"), &tier_args);
    let connector = spawn(env!("CARGO_BIN_EXE_iris-connector"), &tier_args);
    let decoder = spawn(env!("CARGO_BIN_EXE_iris-decoder"), &tier_args);
    let gateway = spawn(
        env!("CARGO_BIN_EXE_iris-gateway"),
        &[
            "--model",
            &m,
            "--encoder",
            &encoder.grpc,
            "--connector",
            &connector.grpc,
            "--decoder",
            &decoder.grpc,
            "--tls-ca",
            s(&cluster.ca),
            "--tls-cert",
            s(&cluster.cert),
            "--tls-key",
            s(&cluster.key),
            "--cluster-token",
            "sesame",
            "--api-key",
            "user-key",
        ],
    );
    let ca = Certificate::from_pem(std::fs::read(&cluster.ca).unwrap());
    let identity = |p: &Pki| {
        Identity::from_pem(
            std::fs::read(&p.cert).unwrap(),
            std::fs::read(&p.key).unwrap(),
        )
    };
    let tls_channel = |addr: &str, id: Option<Identity>| {
        let mut tls = ClientTlsConfig::new().ca_certificate(ca.clone());
        if let Some(id) = id {
            tls = tls.identity(id);
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    rt().block_on(async {
        // The whole path, every hop over TLS: a user with a key gets tokens.
        let ch = tls_channel(&gateway.grpc, None).connect().await.unwrap();
        let mut g = pb::gateway_client::GatewayClient::new(ch);
        let mut req = tonic::Request::new(request(PROMPT, vec![image("scene.png")], 4));
        req.metadata_mut()
            .insert("authorization", "Bearer user-key".parse().unwrap());
        let mut st = g.generate(req).await.unwrap().into_inner();
        let mut tokens = 0;
        while let Some(ev) = st.message().await.unwrap() {
            if let Some(pb::generate_event::Event::Token(_)) = ev.event {
                tokens += 1;
            }
        }
        assert_eq!(tokens, 4);

        // Straight at the decoder: a made-up request (for no model, so any answer past
        // the credentials is NOT_FOUND).
        let call = |ch: tonic::transport::Channel, token: Option<&'static str>| async move {
            let mut c = pb::decoder_client::DecoderClient::new(ch);
            let mut req = tonic::Request::new(pb::DecodeRequest::default());
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            c.generate(req).await.map(|_| ())
        };
        // Plaintext: no TLS, no call.
        let plain = Endpoint::from_shared(format!("http://{}", decoder.grpc)).unwrap();
        if let Ok(ch) = plain.connect().await {
            assert!(call(ch, Some("sesame")).await.is_err());
        }
        // TLS without a client certificate, or with one from another CA: the
        // handshake fails (or the first call does).
        for id in [None, Some(identity(&rogue))] {
            if let Ok(ch) = tls_channel(&decoder.grpc, id).connect().await {
                // Refused by the transport: the service never answers.
                let e = call(ch, Some("sesame")).await.unwrap_err();
                assert!(
                    matches!(
                        e.code(),
                        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                    ),
                    "{e}"
                );
            }
        }
        // A member's certificate but no (or a wrong) cluster token.
        let ch = tls_channel(&decoder.grpc, Some(identity(&cluster)))
            .connect()
            .await
            .unwrap();
        for t in [None, Some("open")] {
            let e = call(ch.clone(), t).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        }
        let e = call(ch, Some("sesame")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e}");
    });
    // The HTTP listeners are TLS too: health open, metrics behind the token (tier) or
    // the API key (gateway).
    let web = https(&cluster.ca);
    let status = |url: String, token: Option<&str>| {
        let mut r = web.get(url);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(
        status(format!("https://{}/health", decoder.http), None),
        200
    );
    assert_eq!(
        status(format!("https://{}/metrics", decoder.http), None),
        401
    );
    assert_eq!(
        status(format!("https://{}/metrics", decoder.http), Some("sesame")),
        200
    );
    assert_eq!(
        status(
            format!("https://{}/metrics", gateway.http),
            Some("user-key")
        ),
        200
    );
    let r = web
        .post(format!("https://{}/v1/chat/completions", gateway.http))
        .bearer_auth("user-key")
        .json(&serde_json::json!({"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Plain HTTP to a TLS port gets no answer.
    assert!(
        reqwest::blocking::get(format!("http://{}/health", decoder.http))
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
    );
}

#[test]
fn members_reach_an_etcd_that_asks_for_certificates_and_a_password() {
    use iris_cluster::etcd_server::{EtcdServer, EtcdTls};
    let dir = tempfile::tempdir().unwrap();
    let cluster = pki(dir.path(), "cluster");
    let etcd = EtcdServer::start_with(
        dir.path().join("etcd"),
        Some(EtcdTls {
            cert: cluster.cert.clone(),
            key: cluster.key.clone(),
            ca: cluster.ca.clone(),
        }),
    )
    .unwrap();
    let ep = etcd.endpoint();
    let tls = || {
        etcd_client::TlsOptions::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&cluster.ca).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(&cluster.cert).unwrap(),
                std::fs::read(&cluster.key).unwrap(),
            ))
    };
    let connect = |user: Option<(&str, &str)>| {
        let mut o = etcd_client::ConnectOptions::new().with_tls(tls());
        if let Some((u, p)) = user {
            o = o.with_user(u, p);
        }
        etcd_client::Client::connect([ep.clone()], Some(o))
    };
    rt().block_on(async {
        let mut admin = connect(None).await.unwrap();
        admin.user_add("root", "root-pw", None).await.unwrap();
        let _ = admin.user_grant_role("root", "root").await;
        admin.auth_enable().await.unwrap();
        // Certificates alone no longer do.
        let mut anon = connect(None).await.unwrap();
        assert!(anon.get("/iris/", None).await.is_err());
    });
    let m = model_arg();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "--model",
            m.as_str(),
            "--etcd",
            ep.as_str(),
            "--cluster",
            "sec",
            "--etcd-ca",
            s(&cluster.ca),
            "--tls-cert",
            s(&cluster.cert),
            "--tls-key",
            s(&cluster.key),
            "--etcd-user",
            "root",
            "--etcd-password",
            "root-pw",
        ];
        a.extend(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |bin: &str, extra: &[&str]| {
        let a = args(extra);
        spawn(bin, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let _encoder = run(env!("CARGO_BIN_EXE_iris-encoder"), &[]);
    let _connector = run(env!("CARGO_BIN_EXE_iris-connector"), &[]);
    let _decoder = run(env!("CARGO_BIN_EXE_iris-decoder"), &[]);
    let gateway = run(
        env!("CARGO_BIN_EXE_iris-gateway"),
        &["--tls-ca", s(&cluster.ca)],
    );
    // Every member registered through the secured etcd, and the gateway found the tiers
    // there.
    let members = || {
        rt().block_on(async {
            let mut c = connect(Some(("root", "root-pw"))).await.unwrap();
            let r = c
                .get(
                    iris_cluster::members_prefix("sec"),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            r.kvs().len()
        })
    };
    eventually(std::time::Duration::from_secs(60), "four members", || {
        members() == 4
    });
    // `iris cluster status` reaches it with the same credentials, and not without.
    let status = |password: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_iris"))
            .args(["cluster", "status", "--etcd", &ep, "--cluster", "sec"])
            .args(["--etcd-ca", s(&cluster.ca), "--etcd-cert", s(&cluster.cert)])
            .args(["--etcd-key", s(&cluster.key), "--etcd-user", "root"])
            .args(["--etcd-password", password])
            .output()
            .unwrap()
    };
    let ok = status("root-pw");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["members"].as_array().unwrap().len(), 4, "{v}");
    assert!(!status("wrong").status.success());
    let ca = Certificate::from_pem(std::fs::read(&cluster.ca).unwrap());
    rt().block_on(async {
        let ch = Endpoint::from_shared(format!("https://{}", gateway.grpc))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(ca))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut g = pb::gateway_client::GatewayClient::new(ch);
        let mut ok = false;
        for _ in 0..100 {
            if generate(&mut g, request(PROMPT, vec![image("scene.png")], 2))
                .await
                .is_ok()
            {
                ok = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(ok, "the gateway never reached the tiers it found in etcd");
    });
}
