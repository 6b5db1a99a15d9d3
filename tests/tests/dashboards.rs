//! The Grafana dashboards in dashboards/: their structure, and every PromQL expression in
//! them evaluated by a real Prometheus scraping a daemon that has just reclaimed memory.
use std::{collections::HashSet, path::PathBuf};

use reclaimd_tests::{Daemon, FakeGpu, prometheus};
use serde_json::Value;

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const DEVICE: &str = "device 0 GPU-dash 16384 Fake H100";

fn dashboards_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards"))
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dashboards_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    assert!(out.len() >= 2, "an overview and a drill-down");
    out
}

/// Datasource uids the provisioning defines (`uid: X` lines of its YAML).
fn provisioned_uids() -> HashSet<String> {
    let dir = dashboards_dir().join("provisioning/datasources");
    let mut uids = HashSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        uids.extend(
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("uid:"))
                .map(|u| u.trim().trim_matches('"').to_owned()),
        );
    }
    uids
}

/// Every datasource uid a dashboard names, anywhere in it.
fn datasource_uids(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(ds)) = m.get("datasource")
                && let Some(Value::String(uid)) = ds.get("uid")
            {
                out.push(uid.clone());
            }
            m.values().for_each(|x| datasource_uids(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| datasource_uids(x, out)),
        _ => {}
    }
}

fn exprs(d: &Value) -> Vec<(String, String)> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_owned();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_owned()))
        })
        .collect()
}

#[test]
fn dashboards_are_well_formed_and_use_provisioned_datasources() {
    let uids = provisioned_uids();
    assert!(uids.contains("reclaimd-prometheus"), "{uids:?}");
    let provider =
        std::fs::read_to_string(dashboards_dir().join("provisioning/dashboards/reclaimd.yml"))
            .unwrap();
    assert!(provider.contains("type: file") && provider.contains("path:"));
    let mut dashboard_uids = HashSet::new();
    for (name, d) in dashboards() {
        assert!(
            dashboard_uids.insert(d["uid"].as_str().unwrap().to_owned()),
            "{name}: duplicate dashboard uid"
        );
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{name}");
        let panels = d["panels"].as_array().unwrap();
        let mut ids = HashSet::new();
        for p in panels {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: a panel without id"));
            assert!(ids.insert(id), "{name}: panel id {id} twice");
            for k in ["x", "y", "w", "h"] {
                assert!(p["gridPos"][k].is_u64(), "{name} panel {id}: gridPos.{k}");
            }
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{name} panel {id}: no query");
            let mut refs = HashSet::new();
            for t in targets {
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
                assert!(refs.insert(t["refId"].as_str().unwrap().to_owned()));
            }
        }
        let mut used = Vec::new();
        datasource_uids(&d, &mut used);
        assert!(!used.is_empty(), "{name}: names no datasource");
        for uid in used {
            assert!(
                uids.contains(&uid),
                "{name}: datasource {uid} is not provisioned"
            );
        }
        for (title, e) in exprs(&d) {
            assert!(e.contains("reclaimd_"), "{name} / {title}: {e}");
        }
    }
}

/// Grafana's variables, as Prometheus alone would see them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$service", ".*")
        .replace("$device", ".*")
}

#[test]
fn every_dashboard_query_parses_and_returns_data_after_a_reclaim() {
    let gpu = FakeGpu::new(DEVICE);
    let d = reclaimd_tests::daemon_after_a_reclaim(&gpu, &workload(), DEVICE);
    let p = prometheus(&format!("127.0.0.1:{}", Daemon::metrics_port(&gpu)));
    p.query_until("up", |r| !r.is_empty());
    let mut checked = 0;
    for (name, dash) in dashboards() {
        for (title, expr) in exprs(&dash) {
            let q = substitute(&expr);
            // query_until asserts Prometheus's status is success (it parsed), and waits
            // for data (rates need two scrapes).
            let r = p.query_until(&q, |r| !r.is_empty());
            assert!(!r.is_empty(), "{name} / {title}: {q}");
            checked += 1;
        }
        for v in dash["templating"]["list"].as_array().unwrap() {
            // label_values(metric, label): the metric must exist with that label.
            let def = v["definition"].as_str().unwrap();
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{name}: unexpected variable query {def}"));
            let (metric, label) = inner.split_once(',').unwrap();
            let q = format!("count by ({}) ({})", label.trim(), metric.trim());
            let r = p.query_until(&q, |r| !r.is_empty());
            assert!(
                r.iter().any(|s| s["metric"][label.trim()].is_string()),
                "{q}"
            );
        }
    }
    assert!(checked >= 15, "only {checked} queries");
    d.stop();
}
