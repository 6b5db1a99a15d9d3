//! Overhead on a served workload: a loopback HTTP server under wrk, daemon off and on.
use std::{process::Command, time::Duration};

use reclaimd_tests::{FakeGpu, Workload, connection_service};

use crate::{
    Opts,
    core::{DEVICE, daemon},
    report::{Report, fmt, ratio},
    util::cpu_seconds,
};

/// wrk's requests/s and its p50/p99 latency (ms).
fn wrk(url: &str, secs: u64, extra: &[&str]) -> Option<(f64, f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t2", "-c32", "--latency", "-d"])
        .arg(format!("{secs}s"))
        .args(extra)
        .arg(url)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(str::trim)
            .and_then(|v| {
                let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic())?);
                let n: f64 = num.parse().ok()?;
                Some(match unit {
                    "us" => n / 1e3,
                    "ms" => n,
                    "s" => n * 1e3,
                    _ => n,
                })
            })
            .unwrap_or(f64::NAN)
    };
    Some((rps, pct("50%"), pct("99%")))
}

pub fn run(opts: &Opts, rep: &mut Report) {
    let (rounds, secs) = if opts.quick { (1, 3) } else { (3, 10) };
    rep.heading("Overhead on a served workload (HTTP under wrk)");
    if Command::new("wrk").arg("--version").output().is_err() {
        rep.line("wrk not found (apt-get install wrk): skipped.\n");
        return;
    }
    let gpu = FakeGpu::new(DEVICE);
    let port = reclaimd_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Workload::spawn(&crate::workload(), &["http", "api-http", &addr]);
    server.line("listening");
    let url = format!("http://{addr}/");
    let reclaimd = daemon(&gpu).service(connection_service("api", "api-http", &[port]));
    let mut table = Vec::new();
    for (label, extra) in [
        ("keep-alive", &[][..]),
        ("Connection: close", &["-H", "Connection: close"][..]),
    ] {
        let mut off = Vec::new();
        let mut on = Vec::new();
        // The daemon's CPU seconds and the requests served, over its rounds.
        let mut cost = (0.0, 0.0);
        for _ in 0..rounds {
            for daemon_on in [false, true] {
                let d = daemon_on.then(|| reclaimd.clone().start());
                std::thread::sleep(Duration::from_millis(500));
                let cpu0 = d.as_ref().map(|d| cpu_seconds(d.pid()));
                let r = wrk(&url, secs, extra);
                if let (Some(d), Some(cpu0)) = (d, cpu0) {
                    let cpu = cpu_seconds(d.pid()) - cpu0;
                    if let Some(r) = &r {
                        cost.0 += cpu;
                        cost.1 += r.0 * secs as f64;
                    }
                    d.stop();
                }
                let Some(r) = r else {
                    rep.line("wrk gave no result.\n");
                    continue;
                };
                eprintln!(
                    "bench: http {label} daemon {}: {:.0} req/s",
                    if daemon_on { "on" } else { "off" },
                    r.0
                );
                rep.value(
                    &format!(
                        "http_rps {label} daemon_{}",
                        if daemon_on { "on" } else { "off" }
                    ),
                    r.0,
                );
                if daemon_on { &mut on } else { &mut off }.push(r);
            }
        }
        table.push((label, off, on, cost));
    }
    let _ = server.finish();
    rep.line(&format!(
        "A minimal HTTP/1.1 responder (`workload http`, a thread per connection) on loopback; \
         `wrk -t2 -c32 -d{secs}s`, {rounds} alternation(s) daemon off / on (on: the server \
         is a `scope = \"connection\"` service on its port, so its sockets pass the \
         in-kernel port filter and every state change reaches the daemon). Mean of the \
         rounds; latency is wrk's, mean of its per-round percentiles. wrk, the server and \
         the daemon share the machine's cores.\n"
    ));
    rep.line("| requests | daemon | req/s | latency p50 | latency p99 | rounds |\n|---|---|---|---|---|---|");
    let mean = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    let mut ratios = Vec::new();
    let mut costs = Vec::new();
    for (label, off, on, (cpu, requests)) in &table {
        for (state, v) in [("off", off), ("on", on)] {
            rep.line(&format!(
                "| {label} | {state} | {} | {} ms | {} ms | {} |",
                fmt(mean(v, |r| r.0)),
                fmt(mean(v, |r| r.1)),
                fmt(mean(v, |r| r.2)),
                v.len()
            ));
        }
        ratios.push(format!(
            "{label}: on/off req/s {}",
            ratio(mean(on, |r| r.0), mean(off, |r| r.0))
        ));
        let busy = 100.0 * cpu / (on.len().max(1) as f64 * secs as f64);
        let per_request = 1e6 * cpu / requests.max(1.0);
        costs.push(format!(
            "{label}: {busy:.1} % of a core, {per_request:.1} µs per request"
        ));
        rep.value(&format!("http_daemon_cpu_percent {label}"), busy);
        rep.value(&format!("http_daemon_us_per_request {label}"), per_request);
    }
    rep.line(&format!("\nRatio {}.\n", ratios.join("; ")));
    rep.line(&format!(
        "The daemon's own CPU (user + system) over its rounds: {}.\n",
        costs.join("; ")
    ));
}
