//! Holders attributed to their Kubernetes pod: a worker moved into a cgroup laid out the way
//! the kubelet's systemd driver and containerd lay it out, and a kubelet-style container log
//! directory. The reclaim's span carries namespace, pod and container; the reclaim metrics
//! carry namespace and container (bounded); ListHolders shows all three.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use reclaimd::ledger::Outcome;
use reclaimd_tests::{
    Daemon, FakeGpu, kill, llm_service, reclaimctl_json, spawn_server, start_receiver,
    wait_for_record,
};
use serde_json::Value;

const DEVICE: &str = "device 0 GPU-k8s 16384 Fake H100";
const CONTAINER_ID: &str = "5e0c6d4f3b2a19087f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a2f1e0";
const WAIT: Duration = Duration::from_secs(20);

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

/// A pod's container cgroup in the host's cgroup v2 hierarchy, removed on drop.
struct PodCgroup {
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn create(pod_uid: &str) -> Self {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists())
            .expect("a cgroup v2 hierarchy");
        let slice = root.join("kubepods.slice");
        let qos = slice.join("kubepods-besteffort.slice");
        let pod = qos.join(format!(
            "kubepods-besteffort-pod{}.slice",
            pod_uid.replace('-', "_")
        ));
        let scope = pod.join(format!("cri-containerd-{CONTAINER_ID}.scope"));
        std::fs::create_dir_all(&scope).expect("create the pod's cgroup");
        Self {
            dirs: vec![scope, pod, qos, slice],
        }
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.dirs[0].join("cgroup.procs"), pid.to_string())
            .expect("move the worker into the pod's cgroup");
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Empty by now (the worker was reclaimed); the deepest goes first.
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn a_reclaimed_pod_container_is_named_in_span_metrics_and_api() {
    let (port, mut receiver, spans) = start_receiver("grpc");
    let gpu = FakeGpu::new(DEVICE);
    let logs = gpu.dir.path().join("containers");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(
        logs.join(format!("vllm-7d9f-x2k_team-a_server-{CONTAINER_ID}.log")),
        "",
    )
    .unwrap();
    // Another pod's container: never confused with ours.
    std::fs::write(
        logs.join(format!("other_team-b_sidecar-{}.log", "ab".repeat(32))),
        "",
    )
    .unwrap();
    let d = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(llm_service())
        .set("kubernetes", "containers_dir", logs.to_str().unwrap())
        .set(
            "telemetry",
            "otlp_endpoint",
            format!("http://127.0.0.1:{port}"),
        )
        .start();
    let cgroup = PodCgroup::create("7d1c0b3e-44aa-4c1e-9d8f-0123456789ab");

    let device = gpu.device_file(0);
    let (server, worker) = spawn_server(&workload(), "llm-server", device.to_str().unwrap(), &[]);
    cgroup.enter(worker);
    gpu.set_state(&format!("{DEVICE}\nproc 0 {worker} 1024 compute\n"));

    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let h = reclaimctl_json(&gpu, &["holders"]);
        if let Some(mine) = h["holders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["pid"] == worker)
            .cloned()
        {
            break mine;
        }
        assert!(Instant::now() < deadline, "worker never listed: {h}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["k8s_namespace"], "team-a", "{listed}");
    assert_eq!(listed["k8s_pod"], "vllm-7d9f-x2k");
    assert_eq!(listed["k8s_container"], "server");

    kill(server.pid());
    let r = wait_for_record(&d.ledger, worker, WAIT);
    let _ = server.finish();
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(
        r.decision.cgroup.contains(CONTAINER_ID),
        "{}",
        r.decision.cgroup
    );

    let url = format!("http://127.0.0.1:{}/metrics", Daemon::metrics_port(&gpu));
    let text = ureq::get(&url).call().unwrap().into_string().unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(
            "reclaimd_reclaims_total{k8s_container=\"server\",k8s_namespace=\"team-a\",\
             outcome=\"reclaimed\",service=\"llm\"} 1"
        )),
        "{text}"
    );
    assert!(
        !text.contains("vllm-7d9f-x2k"),
        "pod names stay out of metrics"
    );

    d.stop();
    let deadline = Instant::now() + WAIT;
    let span = loop {
        let line = spans
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the reclaim span");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["name"] == "reclaim" && v["attributes"]["process.pid"] == worker {
            break v;
        }
    };
    let _ = receiver.kill();
    let _ = receiver.wait();
    let a = &span["attributes"];
    assert_eq!(a["k8s.namespace.name"], "team-a", "{span:#}");
    assert_eq!(a["k8s.pod.name"], "vllm-7d9f-x2k");
    assert_eq!(a["k8s.container.name"], "server");
    drop(cgroup);
}
