//! The gRPC API through the real server on a temp Unix socket, with the daemon watching real
//! processes and the fake NVML. Root only (the daemon loads eBPF programs).
use std::time::Duration;

use reclaimd::api::{
    client,
    pb::{self, event::Kind},
};
use reclaimd_tests::{
    Daemon, DaemonBuilder, FakeGpu, Workload, alive, kill, ledger_records, llm_service,
    spawn_server, wait_for_record,
};
use tonic::Code;

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const WAIT: Duration = Duration::from_secs(20);
const DEVICE: &str = "device 0 GPU-api 16384 Fake H100";
const MIB: u64 = 1 << 20;

struct Service {
    server: Workload,
    worker: u32,
}

/// Services, each a server with one worker holding the device; all listed with 64 MiB.
fn services(gpu: &FakeGpu, n: usize) -> Vec<Service> {
    let device = gpu.device_file(0);
    let v: Vec<Service> = (0..n)
        .map(|_| {
            let (server, worker) =
                spawn_server(&workload(), "llm-server", device.to_str().unwrap(), &[]);
            Service { server, worker }
        })
        .collect();
    let procs: String = v
        .iter()
        .map(|s| format!("proc 0 {} 64 compute\n", s.worker))
        .collect();
    gpu.set_state(&format!("{DEVICE}\n{procs}"));
    v
}

/// A daemon whose socket `nobody` may open (group nogroup), with the `llm` service.
fn daemon(gpu: &FakeGpu) -> DaemonBuilder {
    Daemon::builder(gpu)
        .set("api", "group", "nogroup")
        .service(llm_service())
}

async fn connect(gpu: &FakeGpu) -> pb::reclaimd_client::ReclaimdClient<tonic::transport::Channel> {
    client::connect(&Daemon::api_socket(gpu))
        .await
        .expect("connect to the API socket")
}

/// Holders until `pred` holds for the list (snapshots come with sweeps).
async fn holders_until(
    c: &mut pb::reclaimd_client::ReclaimdClient<tonic::transport::Channel>,
    req: pb::ListHoldersRequest,
    pred: impl Fn(&[pb::Holder]) -> bool,
) -> Vec<pb::Holder> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let h = c
            .list_holders(req.clone())
            .await
            .unwrap()
            .into_inner()
            .holders;
        if pred(&h) {
            return h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "holders never matched: {h:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains(field), "message names {field}: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_filters_paging_and_bad_arguments() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu).policy("grace", "0s").start();
    let s = services(&gpu, 3);
    let mut c = connect(&gpu).await;
    holders_until(&mut c, Default::default(), |h| {
        s.iter()
            .all(|s| h.iter().any(|x| x.pid == s.worker && x.verdict == "live"))
    })
    .await;
    // Two sessions die; report mode keeps their workers, as orphans.
    kill(s[0].server.pid());
    kill(s[1].server.pid());
    for w in [s[0].worker, s[1].worker] {
        wait_for_record(&d.ledger, w, WAIT);
    }

    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.policy_mode, "report");
    assert_eq!(st.probe_mode, "ebpf");
    assert!(st.nvml_available, "{st:?}");
    assert!(st.events_seen > 0);
    assert_eq!(st.queue_capacity, 1024);
    assert!(!st.breaker_tripped);
    let dev = &st.devices[0];
    assert_eq!(
        (dev.uuid.as_str(), dev.total_bytes),
        ("GPU-api", 16384 * MIB)
    );
    assert_eq!(dev.used_bytes, 3 * 64 * MIB);
    assert_eq!(dev.orphaned_bytes, 2 * 64 * MIB, "{dev:?}");

    let orphans = c
        .list_holders(pb::ListHoldersRequest {
            verdict: "orphan".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .holders;
    let mut pids: Vec<u32> = orphans.iter().map(|h| h.pid).collect();
    pids.sort_unstable();
    let mut want = vec![s[0].worker, s[1].worker];
    want.sort_unstable();
    assert_eq!(pids, want);
    let live = c
        .list_holders(pb::ListHoldersRequest {
            service: "llm".into(),
            verdict: "live".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .holders;
    assert_eq!(live.len(), 1);
    let h = &live[0];
    assert_eq!(
        (h.pid, h.comm.as_str(), h.status.as_str()),
        (s[2].worker, "gpu-worker", "live")
    );
    assert_eq!(h.memory[0].bytes, Some(64 * MIB));
    assert_eq!(h.memory[0].gpu_uuid, "GPU-api");
    assert!(!h.device_files.is_empty());
    let root_key = format!("pid:{}@", s[2].server.pid());
    assert!(h.session_keys[0].starts_with(&root_key), "{h:?}");

    let live_sessions = c
        .list_sessions(pb::ListSessionsRequest {
            service: "llm".into(),
            include_dead: false,
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(
        live_sessions
            .iter()
            .any(|x| x.key.starts_with(&root_key) && !x.dead && x.kind == "process"),
        "{live_sessions:#?}"
    );
    let dead_key = format!("pid:{}@", s[0].server.pid());
    assert!(!live_sessions.iter().any(|x| x.key.starts_with(&dead_key)));
    let all = c
        .list_sessions(pb::ListSessionsRequest {
            service: String::new(),
            include_dead: true,
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    let dead = all
        .iter()
        .find(|x| x.key.starts_with(&dead_key))
        .expect("dead session kept");
    assert!(
        dead.dead && dead.death_cause == "killed by signal 9",
        "{dead:?}"
    );

    // The ledger: two skipped decisions, newest first, a page at a time.
    let page = |size, token: String| pb::ListReclaimsRequest {
        page_size: size,
        page_token: token,
        ..Default::default()
    };
    let p1 = c
        .list_reclaims(page(1, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.reclaims.len(), 1);
    assert!(!p1.next_page_token.is_empty());
    let p2 = c
        .list_reclaims(page(1, p1.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.reclaims.len(), 1);
    assert!(p2.next_page_token.is_empty(), "last page");
    assert!(p1.reclaims[0].id > p2.reclaims[0].id, "newest first");
    let all = c
        .list_reclaims(page(0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.reclaims.len(), 2);
    assert!(
        all.reclaims
            .iter()
            .all(|r| r.outcome == "skipped" && r.reason == "report mode")
    );
    assert_eq!(all.reclaims[0].bytes, Some(64 * MIB));
    let count = |q: pb::ListReclaimsRequest| {
        let mut c = c.clone();
        async move {
            c.list_reclaims(q)
                .await
                .unwrap()
                .into_inner()
                .reclaims
                .len()
        }
    };
    let q = |f: fn(&mut pb::ListReclaimsRequest)| {
        let mut q = pb::ListReclaimsRequest::default();
        f(&mut q);
        q
    };
    assert_eq!(count(q(|q| q.outcome = "skipped".into())).await, 2);
    assert_eq!(count(q(|q| q.outcome = "reclaimed".into())).await, 0);
    assert_eq!(count(q(|q| q.service = "llm".into())).await, 2);
    assert_eq!(count(q(|q| q.service = "other".into())).await, 0);
    let by_pid = pb::ListReclaimsRequest {
        pid: s[0].worker,
        ..Default::default()
    };
    assert_eq!(count(by_pid).await, 1);
    let future = pb::ListReclaimsRequest {
        since_ms: all.reclaims[0].time_ms + 60_000,
        ..Default::default()
    };
    assert_eq!(count(future).await, 0);

    // Bad arguments name the field.
    invalid(
        c.list_reclaims(page(5000, String::new())).await,
        "page_size",
    );
    invalid(
        c.list_reclaims(page(1, "not-a-token".into())).await,
        "page_token",
    );
    invalid(
        c.list_reclaims(q(|q| q.outcome = "bogus".into())).await,
        "outcome",
    );
    invalid(
        c.list_reclaims(q(|q| {
            q.since_ms = 10;
            q.until_ms = 5
        }))
        .await,
        "since_ms",
    );
    invalid(
        c.list_holders(pb::ListHoldersRequest {
            verdict: "bogus".into(),
            ..Default::default()
        })
        .await,
        "verdict",
    );

    d.stop();
    for s in s {
        kill(s.worker);
        kill(s.server.pid());
        let _ = s.server.finish();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_reclaim_is_for_admins_and_keeps_every_safety_rule() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu).policy("grace", "0s").start();
    let s = services(&gpu, 1).pop().unwrap();
    // A holder outside every service.
    let outsider = Workload::spawn(&workload(), &["hold", gpu.device_file(0).to_str().unwrap()]);
    outsider.line("holding");
    let mut c = connect(&gpu).await;
    holders_until(&mut c, Default::default(), |h| {
        h.iter().any(|x| x.pid == s.worker && x.verdict == "live")
            && h.iter()
                .any(|x| x.pid == outsider.pid() && x.verdict == "unmanaged")
    })
    .await;

    // Not root, not in the admin group: may read, may not act; the refusal is on record.
    let nobody = Workload::spawn(
        &workload(),
        &[
            "api-as-nobody",
            Daemon::api_socket(&gpu).to_str().unwrap(),
            &s.worker.to_string(),
        ],
    );
    assert_eq!(nobody.line("status"), "Ok");
    assert_eq!(nobody.line("reclaim"), "PermissionDenied");
    let _ = nobody.finish();
    assert!(alive(s.worker));
    let refused = ledger_records(&d.ledger);
    assert!(
        refused
            .iter()
            .any(|r| r.decision.pid == s.worker && r.decision.reason.contains("refused: uid 65534")),
        "{refused:#?}"
    );

    let req = |pid, dry_run, reason: &str| pb::ReclaimRequest {
        pid,
        dry_run,
        reason: reason.into(),
        session_key: String::new(),
    };
    invalid(c.reclaim(req(s.worker, false, " ")).await, "reason");
    let mut both = req(s.worker, false, "x");
    both.session_key = "pid:1@1".into();
    invalid(c.reclaim(both).await, "session_key");
    let missing = c.reclaim(req(4_000_000, false, "x")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // The safety screen holds for an operator too.
    let r = c
        .reclaim(req(outsider.pid(), false, "test: outsider"))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(r[0].outcome, "skipped");
    assert!(r[0].reason.contains("manual request refused"), "{r:?}");
    assert!(alive(outsider.pid()));

    let dry = c
        .reclaim(req(s.worker, true, "test: dry run"))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0].outcome, "skipped");
    assert!(dry[0].reason.contains("dry run by uid 0"), "{dry:?}");
    assert!(alive(s.worker), "a dry run signalled");

    // Report mode, a live session: an operator's explicit request still acts.
    let done = c
        .reclaim(req(s.worker, false, "test: operator asked"))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(done[0].outcome, "reclaimed", "{done:?}");
    assert_eq!(done[0].bytes_freed, Some(64 * MIB));
    assert!(
        done[0]
            .reason
            .contains("manual request by uid 0: test: operator asked")
    );
    assert!(!alive(s.worker));

    d.stop();
    kill(s.server.pid());
    let _ = s.server.finish();
    let _ = outsider.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_the_admin_group_may_reclaim() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu).set("api", "admin_group", "nogroup").start();
    let s = services(&gpu, 1).pop().unwrap();
    let mut c = connect(&gpu).await;
    holders_until(&mut c, Default::default(), |h| {
        h.iter().any(|x| x.pid == s.worker && x.verdict == "live")
    })
    .await;
    let nobody = Workload::spawn(
        &workload(),
        &[
            "api-as-nobody",
            Daemon::api_socket(&gpu).to_str().unwrap(),
            &s.worker.to_string(),
            "dry-run",
        ],
    );
    assert_eq!(nobody.line("status"), "Ok");
    assert_eq!(nobody.line("reclaim"), "Ok", "gid 65534 is the admin group");
    let _ = nobody.finish();
    let r = ledger_records(&d.ledger);
    assert!(
        r.iter()
            .any(|r| r.decision.pid == s.worker
                && r.decision.reason.contains("dry run by uid 65534")),
        "{r:#?}"
    );
    assert!(alive(s.worker));
    d.stop();
    kill(s.worker);
    kill(s.server.pid());
    let _ = s.server.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_deaths_verdicts_and_outcomes() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .start();
    let mut c = connect(&gpu).await;
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let s = services(&gpu, 1).pop().unwrap();
    holders_until(&mut c, Default::default(), |h| {
        h.iter().any(|x| x.pid == s.worker && x.verdict == "live")
    })
    .await;
    kill(s.server.pid());
    let (mut died, mut orphan, mut outcome) = (false, false, None);
    let deadline = tokio::time::Instant::now() + WAIT;
    while outcome.is_none() {
        let ev = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("events in time")
            .expect("stream ok")
            .expect("stream open");
        assert!(ev.time_ms > 0);
        match ev.kind.expect("kind") {
            Kind::SessionDied(x) => {
                let sess = x.session.unwrap();
                died |= sess.key.starts_with(&format!("pid:{}@", s.server.pid()))
                    && sess.death_cause == "killed by signal 9";
            }
            Kind::Verdict(v) => orphan |= v.pid == s.worker && v.verdict == "orphan",
            Kind::Reclaim(r) => {
                let r = r.record.unwrap();
                if r.pid == s.worker && r.outcome != "pending" {
                    outcome = Some(r.outcome);
                }
            }
        }
    }
    assert!(died, "no session death event");
    assert!(orphan, "no orphan verdict event");
    assert_eq!(outcome.as_deref(), Some("reclaimed"));
    d.stop();
    let _ = s.server.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_dropped_and_slows_nothing() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu)
        .policy("grace", "0s")
        .set("api", "watch_buffer", 16)
        .start();
    let socket = Daemon::api_socket(&gpu);
    // A client whose HTTP/2 windows hold one byte: until it reads, nothing gets through.
    let stalled_channel = client::channel_on(
        client::endpoint()
            .initial_stream_window_size(1)
            .initial_connection_window_size(1),
        &socket,
    )
    .await
    .unwrap();
    let mut stalled = pb::reclaimd_client::ReclaimdClient::new(stalled_channel)
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut c = connect(&gpu).await;
    let mut fast = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    // Eight sessions die one after another: small bursts (which the buffer holds for a
    // reader that keeps up), many events in all (more than a stalled reader may miss).
    let s = services(&gpu, 8);
    holders_until(&mut c, Default::default(), |h| {
        s.iter()
            .all(|s| h.iter().any(|x| x.pid == s.worker && x.verdict == "live"))
    })
    .await;
    // The reader that keeps up sees every outcome, in normal time.
    for s in &s {
        kill(s.server.pid());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, fast.message())
                .await
                .expect("the fast watcher is not held back")
                .expect("fast stream ok")
                .expect("fast stream open");
            if let Some(Kind::Reclaim(r)) = ev.kind
                && r.record.unwrap().pid == s.worker
            {
                break;
            }
        }
    }
    // The stalled one, reading at last, gets what was in flight and then a clear status.
    let mut got = 0;
    let status = loop {
        match tokio::time::timeout(WAIT, stalled.message())
            .await
            .expect("an answer")
        {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream ended without a status after {got} events"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too slow"), "{status:?}");
    assert!(
        got <= 16,
        "more than the buffer reached a stalled client: {got}"
    );
    d.stop();
    for s in s {
        kill(s.worker);
        let _ = s.server.finish();
    }
}

#[test]
fn a_tcp_listener_without_tls_refuses_to_start() {
    let gpu = FakeGpu::new(DEVICE);
    let (config, _) = Daemon::builder(&gpu)
        .unset("policy", "sweep")
        .set("api", "listen", "127.0.0.1:7443")
        .service(llm_service())
        .write();
    let out = std::process::Command::new(reclaimd_tests::reclaimd_bin())
        .args(["run", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.listen") && err.contains("TLS"), "{err}");
}

#[test]
fn health_and_reflection_answer_a_generic_client() {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu).start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/generic_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(Daemon::api_socket(&gpu))
        .output()
        .expect("python3 (cargo xtask setup installs grpcio)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["health"], "SERVING");
    assert_eq!(v["api_health"], "SERVING");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(services.contains(&"reclaimd.v1.Reclaimd"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    assert_eq!(
        v["methods"],
        serde_json::json!([
            "GetStatus",
            "ListSessions",
            "ListHolders",
            "ListReclaims",
            "WatchEvents",
            "Reclaim"
        ])
    );
    // A call built from reflection alone reaches the daemon.
    assert_eq!(v["status"]["policyMode"], "report");
    assert_eq!(v["status"]["devices"][0]["uuid"], "GPU-api");
    d.stop();
}

/// A CA, a server certificate for localhost and a client certificate, as PEM files in `dir`.
fn certificates(dir: &std::path::Path) -> [std::path::PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, usage| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        leaf(vec!["operator".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let files = [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ];
    files.map(|(name, text)| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_a_client_certificate_and_is_read_only() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let gpu = FakeGpu::new(DEVICE);
    let [ca, server_cert, server_key, client_cert, client_key] = certificates(gpu.dir.path());
    let port = reclaimd_tests::free_port();
    let d = Daemon::builder(&gpu)
        .set("api", "listen", format!("127.0.0.1:{port}"))
        .set("api", "tls_cert", server_cert.to_str().unwrap())
        .set("api", "tls_key", server_key.to_str().unwrap())
        .set("api", "client_ca", ca.to_str().unwrap())
        .service(llm_service())
        .start();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let endpoint = |tls: ClientTlsConfig| {
        Endpoint::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
    };
    let trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ca)))
        .domain_name("localhost");

    // Without a client certificate: no channel, or no answer.
    let anonymous = match endpoint(trust.clone()).connect().await {
        Err(_) => None,
        Ok(ch) => Some(
            pb::reclaimd_client::ReclaimdClient::new(ch)
                .get_status(pb::GetStatusRequest {})
                .await,
        ),
    };
    assert!(
        !matches!(anonymous, Some(Ok(_))),
        "a client without a certificate was served"
    );

    let ch = endpoint(trust.identity(Identity::from_pem(read(&client_cert), read(&client_key))))
        .connect()
        .await
        .expect("TLS with a client certificate");
    let mut c = pb::reclaimd_client::ReclaimdClient::new(ch);
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (st.version.as_str(), st.policy_mode.as_str()),
        (env!("CARGO_PKG_VERSION"), "report")
    );
    let denied = c
        .reclaim(pb::ReclaimRequest {
            pid: std::process::id(),
            reason: "over TCP".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("Unix socket"), "{denied:?}");
    d.stop();
}
