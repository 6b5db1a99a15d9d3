//! The deployment files in deploy/, checked offline: the Kubernetes manifests against the
//! API's schemas (kubernetes-validate, strict), the kustomizations' resource lists, both
//! config.toml files through the daemon's own parser and `reclaimd run --check`, the
//! systemd unit through `systemd-analyze`, and the two deployments against each other.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use reclaimd::config::{Config, Mode};
use reclaimd_tests::TempDir;
use serde_json::Value;

/// kubernetes-validate's version (pinned in xtask's PYTHON_PACKAGES too) and the Kubernetes
/// versions whose schemas the manifests must satisfy: the oldest they support (1.30: the
/// container-level `appArmorProfile`) and the newest that version of the tool knows.
const KUBERNETES_VALIDATE: &str = "1.37.0";
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Every resource the kustomizations under deploy/kubernetes apply: (kind, name).
const EXPECTED_RESOURCES: [(&str, &str); 7] = [
    ("Namespace", "reclaimd"),
    ("ServiceAccount", "reclaimd"),
    ("ConfigMap", "reclaimd-config"),
    ("DaemonSet", "reclaimd"),
    ("ConfigMap", "reclaimd-otel-collector"),
    ("Deployment", "reclaimd-otel-collector"),
    ("Service", "reclaimd-otel-collector"),
];

fn deploy_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

fn unit_path() -> PathBuf {
    deploy_dir().join("systemd/reclaimd.service")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// What tests/py/k8s_manifests.py reads from the kustomizations: their resources, the
/// missing ones, every YAML document of the listed files, and manifests nobody lists.
fn manifests() -> Value {
    let out = run(Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/k8s_manifests.py"))
        .arg(kubernetes_dir()));
    assert!(
        out.status.success(),
        "k8s_manifests.py failed (PyYAML comes with kubernetes-validate: `cargo xtask setup`): {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("k8s_manifests.py prints JSON")
}

fn documents(m: &Value) -> &Vec<Value> {
    m["documents"].as_array().unwrap()
}

/// The one document of this kind and name.
fn resource<'a>(m: &'a Value, kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = documents(m)
        .iter()
        .map(|d| &d["doc"])
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind}/{name} once in the manifests");
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not a list"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The values of `Key=` lines in the unit, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

fn unit_capabilities(unit: &str, key: &str) -> BTreeSet<String> {
    let lines = unit_values(unit, key);
    assert_eq!(lines.len(), 1, "one {key}= line");
    lines[0]
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{key}: {c} is not a CAP_ name"))
                .to_owned()
        })
        .collect()
}

/// The commented `# [[service]]` example at the end of a config, uncommented and appended,
/// so that the example stays valid too.
fn with_example_service(config: &str) -> String {
    let start = config
        .find("# [[service]]")
        .expect("a commented [[service]] example");
    let example: String = config[start..]
        .lines()
        .map(|l| {
            let l = l.trim_start();
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or(l)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{config}\n{example}")
}

fn check_config(text: &str, origin: &str) -> Config {
    let cfg = Config::parse(text, origin).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.policy.mode, Mode::Report, "{origin}: safe as shipped");
    assert!(
        cfg.services.is_empty(),
        "{origin}: no service until one is configured"
    );
    let example = Config::parse(&with_example_service(text), origin)
        .unwrap_or_else(|e| panic!("{origin}, its [[service]] example uncommented: {e}"));
    assert_eq!(
        example.services.len(),
        1,
        "{origin}: the example is one service"
    );
    cfg
}

/// `reclaimd ARGS --check` with the built binary: the flags a deployment passes exist and
/// the config it names is accepted.
fn reclaimd_check(args: &[String], config_in_args: &str, config: &Path) {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a == config_in_args {
                config.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    assert!(
        args.iter().any(|a| a == &config.display().to_string()),
        "{args:?} name {config_in_args}"
    );
    let out = run(Command::new(reclaimd_tests::reclaimd_bin())
        .args(&args)
        .arg("--check"));
    assert!(
        out.status.success(),
        "reclaimd {args:?} --check: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("ok: mode Report"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn kustomizations_list_existing_files_and_every_manifest() {
    let m = manifests();
    let ks = m["kustomizations"].as_array().unwrap();
    let paths: Vec<&str> = ks.iter().map(|k| k["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        ["kustomization.yaml", "otel-collector/kustomization.yaml"],
        "the base and the optional collector"
    );
    for k in ks {
        assert_eq!(k["kind"], "Kustomization", "{}", k["path"]);
        assert_eq!(k["namespace"], "reclaimd", "{}", k["path"]);
        assert!(
            !k["resources"].as_array().unwrap().is_empty(),
            "{} lists resources",
            k["path"]
        );
        assert_eq!(
            k["missing"],
            Value::Array(vec![]),
            "{}: resources that do not exist",
            k["path"]
        );
    }
    assert_eq!(
        m["unlisted"],
        Value::Array(vec![]),
        "manifests under deploy/kubernetes that no kustomization applies"
    );
    let found: Vec<(String, String)> = documents(&m)
        .iter()
        .map(|d| {
            (
                d["doc"]["kind"].as_str().unwrap().to_owned(),
                d["doc"]["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = EXPECTED_RESOURCES
        .iter()
        .map(|(k, n)| (k.to_string(), n.to_string()))
        .collect();
    assert_eq!(found, expected);
    for d in documents(&m) {
        assert_eq!(
            d["doc"]["metadata"]["namespace"]
                .as_str()
                .unwrap_or("reclaimd"),
            "reclaimd",
            "{}: everything lives in the reclaimd namespace",
            d["file"]
        );
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let m = manifests();
    let files = strings(&m["files"]);
    let docs = documents(&m).len();
    assert_eq!(docs, EXPECTED_RESOURCES.len());

    let version = run(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]));
    assert!(
        version.status.success(),
        "kubernetes-validate is missing: `cargo xtask setup` installs it \
         (pip install kubernetes-validate=={KUBERNETES_VALIDATE}): {}",
        text(&version.stderr)
    );
    assert_eq!(
        text(&version.stdout).trim(),
        KUBERNETES_VALIDATE,
        "the kubernetes-validate this test was written against"
    );

    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate", "--strict"])
        .current_dir(kubernetes_dir());
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    cmd.args(&files);
    let out = run(&mut cmd);
    let report = text(&out.stdout) + &text(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{report}"
    );
    // It passes over kinds it has no schema for with a warning and exit 0: every document
    // must have been validated, against every version, and nothing skipped.
    let passed = report
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    assert_eq!(
        passed,
        docs * KUBERNETES_VERSIONS.len(),
        "documents validated:\n{report}"
    );
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "{report}"
    );
    for v in KUBERNETES_VERSIONS {
        let minor = &v[..v.rfind('.').unwrap()];
        assert!(
            report.contains(&format!("against version {minor}")),
            "validated against {minor}:\n{report}"
        );
    }
}

#[test]
fn configs_parse_and_are_in_report_mode() {
    // The default /etc/reclaimd/config.toml.
    let path = deploy_dir().join("config.toml");
    let host = check_config(
        &std::fs::read_to_string(&path).unwrap(),
        "deploy/config.toml",
    );
    assert_eq!(host.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(host.api.socket, Path::new("/run/reclaimd/reclaimd.sock"));
    assert_eq!(host.ledger_path, Path::new("/var/lib/reclaimd/ledger.db"));

    // The ConfigMap's.
    let m = manifests();
    let cm = resource(&m, "ConfigMap", "reclaimd-config");
    let text = cm["data"]["config.toml"]
        .as_str()
        .expect("data.config.toml");
    let k8s = check_config(text, "configmap.yaml");
    assert_eq!(
        k8s.metrics_listen,
        Some("0.0.0.0:9464".parse().unwrap()),
        "Prometheus and the kubelet's probes reach it on the pod's address"
    );
    assert_eq!(k8s.api.socket, Path::new("/run/reclaimd/reclaimd.sock"));
    assert_eq!(k8s.ledger_path, Path::new("/var/lib/reclaimd/ledger.db"));
    assert_eq!(
        k8s.telemetry.otlp_endpoint, None,
        "the DaemonSet's env decides"
    );
    assert_eq!(
        k8s.containers_dir.as_deref(),
        Some(Path::new("/var/log/containers")),
        "pod attribution"
    );
}

#[test]
fn daemonset_mounts_and_ports_match_its_config() {
    let m = manifests();
    let ds = resource(&m, "DaemonSet", "reclaimd");
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true, "NVML's pids are the host's");
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));

    let config: Config = Config::parse(
        resource(&m, "ConfigMap", "reclaimd-config")["data"]["config.toml"]
            .as_str()
            .unwrap(),
        "configmap.yaml",
    )
    .unwrap();

    // Metrics: the config's port is the container's "metrics" port, the probes' and the
    // scrape annotation's.
    let port = config.metrics_listen.unwrap().port();
    let ports = c["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == port),
        "{ports:?}"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        port.to_string()
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/metrics", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // Every path the daemon writes or reads on the node is a hostPath mounted where the
    // config says, and only the state and socket directories are writable.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volumes = spec["volumes"].as_array().unwrap();
    let host_path_at = |mount_path: &Path| -> (String, bool) {
        let mount = mounts
            .iter()
            .find(|v| Path::new(v["mountPath"].as_str().unwrap()) == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted at {}", mount_path.display()));
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        (
            volume["hostPath"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{} is not a hostPath", mount["name"]))
                .to_owned(),
            mount["readOnly"].as_bool().unwrap_or(false),
        )
    };
    let ledger_dir = config.ledger_path.parent().unwrap();
    let socket_dir = config.api.socket.parent().unwrap();
    assert_eq!(
        host_path_at(ledger_dir),
        (ledger_dir.display().to_string(), false)
    );
    assert_eq!(
        host_path_at(socket_dir),
        (socket_dir.display().to_string(), false)
    );
    let btf_dir = config.probe.btf.parent().unwrap();
    assert_eq!(host_path_at(btf_dir), (btf_dir.display().to_string(), true));
    let containers_dir = config
        .containers_dir
        .as_deref()
        .expect("pod attribution on");
    for dir in [
        Path::new("/sys/kernel/tracing"),
        Path::new("/var/log/pods"),
        containers_dir,
    ] {
        assert_eq!(
            host_path_at(dir),
            (dir.display().to_string(), true),
            "{}",
            dir.display()
        );
    }
    for m in mounts {
        let path = m["mountPath"].as_str().unwrap();
        if Path::new(path) != ledger_dir && Path::new(path) != socket_dir {
            assert_eq!(m["readOnly"], true, "{path} read-only");
        }
    }

    // The config is the ConfigMap, where the command line says.
    let args: Vec<String> = strings(&c["command"])
        .into_iter()
        .chain(strings(&c["args"]))
        .collect();
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let config_file = Path::new(&args[at + 1]);
    let config_mount = mounts
        .iter()
        .find(|v| Path::new(v["mountPath"].as_str().unwrap()) == config_file.parent().unwrap())
        .expect("the config's directory is mounted");
    let config_volume = volumes
        .iter()
        .find(|v| v["name"] == config_mount["name"])
        .unwrap();
    assert_eq!(config_volume["configMap"]["name"], "reclaimd-config");
    assert!(
        resource(&m, "ConfigMap", "reclaimd-config")["data"]
            .get(config_file.file_name().unwrap().to_str().unwrap())
            .is_some(),
        "the ConfigMap has {}",
        config_file.display()
    );

    // OTLP goes to the optional collector's Service, on its gRPC port.
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("env {name}"))
            .to_owned()
    };
    assert_eq!(var("NVIDIA_VISIBLE_DEVICES"), "all");
    assert_eq!(var("NVIDIA_DRIVER_CAPABILITIES"), "utility");
    let svc = resource(&m, "Service", "reclaimd-otel-collector");
    let grpc = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "otlp-grpc")
        .expect("the collector's OTLP gRPC port");
    assert_eq!(
        var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        format!(
            "http://{}.{}.svc:{}",
            svc["metadata"]["name"].as_str().unwrap(),
            svc["metadata"]["namespace"].as_str().unwrap(),
            grpc["port"]
        )
    );
}

#[test]
fn daemonset_and_unit_grant_the_same_capabilities() {
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    let bounding = unit_capabilities(&unit, "CapabilityBoundingSet");
    let ambient = unit_capabilities(&unit, "AmbientCapabilities");
    assert_eq!(bounding, ambient, "the unit's bounding and ambient sets");
    let m = manifests();
    let ds = resource(&m, "DaemonSet", "reclaimd");
    let added: BTreeSet<String> = strings(
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"],
    )
    .into_iter()
    .collect();
    assert_eq!(
        added, bounding,
        "the DaemonSet's capabilities and the unit's"
    );
    // What the daemon's preflight needs for the eBPF programs, without CAP_SYS_ADMIN.
    for cap in ["BPF", "PERFMON"] {
        assert!(bounding.contains(cap), "{cap}");
    }
    assert!(!bounding.contains("SYS_ADMIN"), "BPF + PERFMON instead");
}

#[test]
fn systemd_unit_verifies_and_its_command_line_runs() {
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart=");
    let argv: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert_eq!(argv[0], "/usr/local/bin/reclaimd");
    for (key, value) in [
        ("Type", "simple"),
        ("Restart", "on-failure"),
        ("RuntimeDirectory", "reclaimd"),
        ("StateDirectory", "reclaimd"),
        ("ConfigurationDirectory", "reclaimd"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(unit_values(&unit, key), [value], "{key}=");
    }
    for absent in ["PrivateDevices", "ProtectProc"] {
        assert!(
            unit_values(&unit, absent).is_empty(),
            "{absent}= would hide what reclaimd must see"
        );
    }

    // systemd-analyze verify wants ExecStart's binary to exist: a copy of the unit runs the
    // binary under test instead. It reports unknown keys and bad values but still exits 0,
    // so any output at all fails the test.
    let bin = reclaimd_tests::reclaimd_bin();
    let dir = TempDir::new("deploy-unit");
    let copy = dir.path().join("reclaimd.service");
    let rewritten = unit.replace(
        "ExecStart=/usr/local/bin/reclaimd ",
        &format!("ExecStart={} ", bin.display()),
    );
    assert_ne!(rewritten, unit);
    std::fs::write(&copy, rewritten).unwrap();
    let analyze = || {
        let mut c = Command::new("systemd-analyze");
        c.env("SYSTEMD_LOG_COLOR", "0");
        c
    };
    let out = run(analyze().arg("verify").arg(&copy));
    let report = text(&out.stdout) + &text(&out.stderr);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify:\n{report}"
    );

    // The sandbox's exposure score (0 = fully sandboxed, 10 = none; 3.6 now) stays under
    // 4.0 (`--threshold` counts in tenths); dropping hardening lines raises it past that.
    let out = run(analyze()
        .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
        .arg(&copy));
    let report = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "systemd-analyze security:\n{report}");
    assert!(report.contains("Overall exposure level"), "{report}");

    // The command line itself, with --check, on the default config.
    reclaimd_check(
        &argv[1..],
        "/etc/reclaimd/config.toml",
        &deploy_dir().join("config.toml"),
    );
}

#[test]
fn daemonset_command_line_runs_with_its_configmap() {
    let m = manifests();
    let c = &resource(&m, "DaemonSet", "reclaimd")["spec"]["template"]["spec"]["containers"][0];
    let command = strings(&c["command"]);
    assert_eq!(command, ["/usr/local/bin/reclaimd"]);
    let dir = TempDir::new("deploy-configmap");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        resource(&m, "ConfigMap", "reclaimd-config")["data"]["config.toml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    reclaimd_check(&strings(&c["args"]), "/etc/reclaimd/config.toml", &config);
}

/// `reclaimd run` without `--config` on a host where nothing is installed: the defaults,
/// which signal nothing (report mode, no service).
#[test]
fn run_without_a_config_uses_the_safe_defaults() {
    if Path::new("/etc/reclaimd/config.toml").exists() {
        println!("skipped: /etc/reclaimd/config.toml is installed here, and is what it reads");
        return;
    }
    let out = run(Command::new(reclaimd_tests::reclaimd_bin()).args(["run", "--check"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "the defaults: ok: mode Report, probe Auto, 0 service(s), ledger \
         /var/lib/reclaimd/ledger.db"
    );
}
