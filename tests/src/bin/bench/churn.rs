//! Connection churn: socket close → observer on a watched port (reclaimd vs tcplife), the
//! daemon's CPU with churn on a watched and on an unwatched port, and its memory before and
//! after many connection sessions came and went.
use std::{collections::HashMap, time::Duration};

use reclaimd_tests::{Daemon, FakeGpu, Workload, connection_service};

use crate::{
    Opts,
    core::{DEVICE, daemon},
    kstats,
    report::{Report, Row, Stat, fmt, ratio},
    util::{
        Stamped, cpu_seconds, delta, histogram, mono_ns, pair, quantile, rss_kib, scrape, status,
        which,
    },
};

const LATENCY: &str = "reclaimd_kernel_event_latency_seconds";

/// Each client port → the CLOCK_MONOTONIC after each close from it, in order (ports come
/// back within a run); the rate achieved.
struct Churned {
    closes: HashMap<u16, Vec<u64>>,
    count: usize,
    made: u64,
    failed: u64,
    achieved: f64,
}

/// `rate` connections per second to `port` for `secs`, from `clients` processes.
fn churn(port: u16, rate: f64, secs: f64, clients: usize) -> Churned {
    let addr = format!("127.0.0.1:{port}");
    let procs: Vec<Workload> = (0..clients)
        .map(|_| {
            Workload::spawn(
                &crate::workload(),
                &[
                    "churn",
                    &addr,
                    &(rate / clients as f64).to_string(),
                    &secs.to_string(),
                ],
            )
        })
        .collect();
    let mut out = Churned {
        closes: HashMap::new(),
        count: 0,
        made: 0,
        failed: 0,
        achieved: 0.0,
    };
    let mut took = 0u64;
    for p in procs {
        let (lines, _) = p.finish();
        for l in lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["done", n, ns, failed] => {
                    out.made += n.parse::<u64>().unwrap_or(0);
                    out.failed += failed.parse::<u64>().unwrap_or(0);
                    took = took.max(ns.parse().unwrap_or(0));
                }
                [port, ts] => {
                    if let (Ok(p), Ok(t)) = (port.parse(), ts.parse()) {
                        out.closes.entry(p).or_default().push(t);
                        out.count += 1;
                    }
                }
                _ => {}
            }
        }
    }
    out.achieved = (out.made - out.failed) as f64 / (took as f64 / 1e9).max(1e-9);
    out
}

fn sink(name: &str) -> (Workload, u16) {
    let port = reclaimd_tests::free_port();
    let w = Workload::spawn(
        &crate::workload(),
        &["sink", name, &format!("127.0.0.1:{port}")],
    );
    w.line("listening");
    (w, port)
}

fn services(port: u16) -> toml::Table {
    connection_service("churn", "churn-sink", &[port])
}

fn matched(c: &Churned, seen: &[(u16, u64)]) -> (Vec<f64>, usize) {
    pair(&c.closes, seen)
}

pub fn run(opts: &Opts, rep: &mut Report) {
    let secs = if opts.quick { 2.0 } else { 5.0 };
    let (_watched_sink, watched) = sink("churn-sink");
    let (_other_sink, unwatched) = sink("other-sink");
    let gpu = FakeGpu::new(DEVICE);
    let metrics_port = Daemon::metrics_port(&gpu);

    rep.heading("Socket close → observer, under connection churn (watched port)");
    rep.line(
        "Clients (`workload churn`) connect to a server that closes each connection at once \
         (`workload sink`, a `scope = \"connection\"` service on a watched port); the client \
         reads the EOF, closes, and stamps CLOCK_MONOTONIC. The server's socket reaches \
         CLOSE (via TIME_WAIT) when the client's FIN arrives. Definitions: `reclaimd trace \
         --json --port P` and tcplife (`-L P`, `stdbuf -oL`): client's stamp → the bench \
         reads the line for that connection's server socket (matched by the client's port; \
         for reclaimd the `new_state: CLOSE` event); reclaimd probe: kernel stamp → user \
         space, per event (every state change on the port); daemon: its \
         `reclaimd_kernel_event_latency_seconds{kind=\"tcp\"}` histogram over the run \
         (bucket-interpolated; one sample per read of the ring buffer, that read's longest \
         wait, so n counts reads). Each observer alone on its own churn run.\n",
    );
    let tcplife = which(&["/usr/sbin/tcplife", "/usr/bin/tcplife"]);
    let rates: &[f64] = if opts.quick {
        &[1000.0, 5000.0]
    } else {
        &[1000.0, 5000.0, 20_000.0]
    };
    for &rate in rates {
        rep.line(&format!("### Target {} connections/s\n", fmt(rate)));
        let clients = if rate > 2000.0 { 2 } else { 1 };
        let mut rows = Vec::new();

        // reclaimd trace
        let bin = reclaimd_tests::reclaimd_bin();
        let mut t = Stamped::spawn(
            bin.to_str().expect("utf-8"),
            &["trace", "--json", "--port", &watched.to_string()],
        );
        t.wait_for("\"ready\"", Duration::from_secs(60));
        let c = churn(watched, rate, secs, clients);
        std::thread::sleep(Duration::from_millis(500));
        let (lines, _) = t.stop(libc::SIGTERM);
        let mut seen = Vec::new();
        let mut kernel_us = Vec::new();
        for (at, l) in &lines {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            if v["kind"] != "tcp" {
                continue;
            }
            if let (Some(ts), Some(recv)) = (v["ts_ns"].as_u64(), v["recv_ns"].as_u64()) {
                kernel_us.push(recv.saturating_sub(ts) as f64 / 1e3);
            }
            if v["new_state"] == "CLOSE"
                && let Some(p) = v["dport"].as_u64()
            {
                seen.push((p as u16, *at));
            }
        }
        let (lat, missed) = matched(&c, &seen);
        let note = format!(
            "{} connections at {}/s achieved; missed {missed}",
            c.count,
            fmt(c.achieved)
        );
        let ours = Stat::of(&lat);
        rows.push(Row::new("reclaimd trace --json", ours, "µs", note.clone()));
        rep.values(&format!("close_latency_us reclaimd-trace {rate}/s"), lat);
        rows.push(Row::new(
            "reclaimd probe: kernel stamp → user space (same run)",
            Stat::of(&kernel_us),
            "µs",
            format!("{} tcp events", kernel_us.len()),
        ));

        // the daemon
        let d = daemon(&gpu).service(services(watched)).start();
        let before = histogram(&scrape(metrics_port), LATENCY, "tcp");
        let (cpu0, t0) = (cpu_seconds(d.pid()), mono_ns());
        let c = churn(watched, rate, secs, clients);
        let (cpu1, t1) = (cpu_seconds(d.pid()), mono_ns());
        std::thread::sleep(Duration::from_millis(500));
        let h = delta(&histogram(&scrape(metrics_port), LATENCY, "tcp"), &before);
        d.stop();
        let q = |p: f64| {
            quantile(&h, p)
                .map(|(v, hi)| {
                    if hi.is_infinite() {
                        format!("> {} µs", fmt(v * 1e6))
                    } else {
                        format!("{} µs (≤ {} µs)", fmt(v * 1e6), fmt(hi * 1e6))
                    }
                })
                .unwrap_or_else(|| "–".into())
        };
        rows.push(Row {
            tool: "reclaimd daemon: kernel stamp → daemon (histogram)".into(),
            median: q(0.5),
            p99: q(0.99),
            n: h.last().map(|b| b.1).unwrap_or(0).to_string(),
            note: format!(
                "{} connections at {}/s achieved; daemon CPU {:.1}%",
                c.count,
                fmt(c.achieved),
                100.0 * (cpu1 - cpu0) / ((t1 - t0) as f64 / 1e9)
            ),
        });

        // tcplife
        if let (Some(bin), false) = (&tcplife, opts.skip_peers) {
            let mut t = Stamped::spawn("stdbuf", &["-oL", bin, "-L", &watched.to_string()]);
            t.wait_for("PID", Duration::from_secs(30));
            let c = churn(watched, rate, secs, clients);
            std::thread::sleep(Duration::from_millis(500));
            let (lines, err) = t.stop(libc::SIGINT);
            // PID COMM LADDR LPORT RADDR RPORT TX_KB RX_KB MS
            let seen: Vec<(u16, u64)> = lines
                .iter()
                .filter_map(|(at, l)| Some((l.split_whitespace().nth(5)?.parse().ok()?, *at)))
                .collect();
            let (lat, missed) = matched(&c, &seen);
            let lost: u64 = err
                .lines()
                .filter(|l| l.to_lowercase().contains("lost"))
                .filter_map(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
                .sum();
            let theirs = Stat::of(&lat);
            rows.push(Row::new(
                "tcplife (libbpf-tools)",
                theirs,
                "µs",
                format!(
                    "{} connections at {}/s achieved; missed {missed}; lost (stderr) {lost}",
                    c.count,
                    fmt(c.achieved)
                ),
            ));
            rep.values(&format!("close_latency_us tcplife {rate}/s"), lat);
            rep.table(&rows);
            if let (Some(a), Some(b)) = (theirs, ours) {
                rep.line(&format!(
                    "Ratio tcplife / reclaimd trace (same definition): median {}, p99 {}.\n",
                    ratio(a.median, b.median),
                    ratio(a.p99, b.p99)
                ));
            }
        } else {
            rep.table(&rows);
        }
    }

    // CPU: unwatched vs watched port, same churn.
    rep.heading("Daemon CPU under connection churn: unwatched vs watched port");
    let cpu_rate = 50_000.0;
    rep.line(&format!(
        "The daemon watches port {watched} only. Two clients churn flat out (target {} \
         connections/s) for {secs} s against a sink on an unwatched port, then on the \
         watched one; before both, as long with no churn (after the daemon's start-up, which \
         is not counted). CPU = the daemon's utime + stime delta (/proc/PID/stat) over the \
         run's wall time (100% = one core).\n",
        fmt(cpu_rate)
    ));
    rep.line("| port | connections/s achieved | connections | daemon CPU |\n|---|---|---|---|");
    let d = daemon(&gpu).service(services(watched)).start();
    // Start-up (BTF, program load, the first full scan) is not churn's cost.
    std::thread::sleep(Duration::from_secs(3));
    let (cpu0, t0) = (cpu_seconds(d.pid()), mono_ns());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let idle = 100.0 * (cpu_seconds(d.pid()) - cpu0) / ((mono_ns() - t0) as f64 / 1e9);
    rep.line(&format!("| none (idle) | 0 | 0 | {idle:.1}% |"));
    rep.value("daemon_cpu_pct churn idle", idle);
    let mut cpu = Vec::new();
    for (label, port) in [("unwatched", unwatched), ("watched", watched)] {
        let (cpu0, t0) = (cpu_seconds(d.pid()), mono_ns());
        let c = churn(port, cpu_rate, secs, 2);
        let (cpu1, t1) = (cpu_seconds(d.pid()), mono_ns());
        let pct = 100.0 * (cpu1 - cpu0) / ((t1 - t0) as f64 / 1e9);
        rep.line(&format!(
            "| {label} | {} | {} | {pct:.1}% |",
            fmt(c.achieved),
            c.made - c.failed
        ));
        rep.value(&format!("daemon_cpu_pct churn {label}"), pct);
        cpu.push(pct);
        std::thread::sleep(Duration::from_millis(500));
    }
    rep.line("");

    // Memory before and after many connection sessions.
    rep.heading("Daemon memory across connection-session churn");
    let (rss0, hwm0) = rss_kib(d.pid());
    let (seen0, drop0) = status(&Daemon::api_socket(&gpu));
    let t0 = mono_ns();
    let c = churn(watched, 1e9, opts.cycles as f64 / 1e9, 2);
    let took = (mono_ns() - t0) as f64 / 1e9;
    std::thread::sleep(Duration::from_secs(6));
    let (rss1, hwm1) = rss_kib(d.pid());
    let (seen1, drop1) = status(&Daemon::api_socket(&gpu));
    d.stop();
    rep.line(&format!(
        "{} connection sessions opened and closed on the watched port, flat out from two \
         clients ({} s, {}/s); RSS after the next sweep. Events seen {}, dropped {}.\n",
        c.made - c.failed,
        fmt(took),
        fmt(c.achieved),
        seen1 - seen0,
        drop1 - drop0
    ));
    rep.line("| when | RSS | peak RSS |\n|---|---|---|");
    rep.line(&format!(
        "| before | {:.1} MiB | {:.1} MiB |",
        rss0 as f64 / 1024.0,
        hwm0 as f64 / 1024.0
    ));
    rep.line(&format!(
        "| after {} cycles | {:.1} MiB | {:.1} MiB |\n",
        c.made - c.failed,
        rss1 as f64 / 1024.0,
        hwm1 as f64 / 1024.0
    ));
    rep.value("rss_kib before churn", rss0 as f64);
    rep.value(
        &format!("rss_kib after {} cycles", c.made - c.failed),
        rss1 as f64,
    );
    at_rest_among_time_wait(opts, rep, &gpu);
}

/// The `cost` section: per watched connection, the daemon's CPU and its programs' kernel
/// time, beside tcplife's; and what it adds to any system call.
pub fn cost(opts: &Opts, rep: &mut Report) {
    let (_watched_sink, watched) = sink("churn-sink");
    let gpu = FakeGpu::new(DEVICE);
    let tcplife = which(&["/usr/sbin/tcplife", "/usr/bin/tcplife"]).filter(|_| !opts.skip_peers);
    per_connection(opts, rep, watched, &gpu, tcplife.as_deref());
    crate::syscalls::run(opts, rep, &gpu, services(watched));
}

/// The host's TIME_WAIT sockets (`/proc/net/sockstat`, `tw`).
fn time_wait_sockets() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(2)
                .find(|p| p[0] == "tw")
                .and_then(|p| p[1].parse().ok())
        })
        .unwrap_or(0)
}

/// The daemon at rest (one watched port, no session) on a host with many unrelated
/// TIME_WAIT sockets: its sweeps must not pay for them.
fn at_rest_among_time_wait(opts: &Opts, rep: &mut Report, gpu: &FakeGpu) {
    const IDLE: Duration = Duration::from_secs(20);
    let per_sink = if opts.quick { 2_500 } else { 25_000 };
    // One sink per 25k: a client's ephemeral ports to one server port run out near 28k.
    let sinks: Vec<(Workload, u16)> = (0..4).map(|_| sink("other-sink")).collect();
    for (_, port) in &sinks {
        churn(*port, 1e9, per_sink as f64 / 1e9, 2);
    }
    let tw = time_wait_sockets();
    let watched = reclaimd_tests::free_port();
    let d = daemon(gpu).service(services(watched)).start();
    std::thread::sleep(Duration::from_secs(3));
    let (cpu0, t0) = (cpu_seconds(d.pid()), mono_ns());
    std::thread::sleep(IDLE);
    let pct = 100.0 * (cpu_seconds(d.pid()) - cpu0) / ((mono_ns() - t0) as f64 / 1e9);
    d.stop();
    rep.heading("Daemon at rest among unrelated TIME_WAIT sockets");
    rep.line(&format!(
        "{tw} TIME_WAIT sockets on the host (`/proc/net/sockstat`), left by churn on four \
         unwatched ports; the daemon watches another port, with no session, default 5 s \
         sweep, over {} s.\n",
        IDLE.as_secs()
    ));
    rep.line(&format!(
        "| TIME_WAIT sockets | daemon CPU |\n|---|---|\n| {tw} | {pct:.2} % |\n"
    ));
    rep.value(&format!("daemon_cpu_pct at rest among {tw} TIME_WAIT"), pct);
}

/// What one observer cost during one churn run: its own CPU, and the kernel time of its
/// programs, per connection.
struct Cost {
    connections: u64,
    achieved: f64,
    cpu_us: f64,
    programs: Vec<(String, u64, u64)>,
}

impl Cost {
    fn kernel_us(&self) -> f64 {
        self.programs.iter().map(|p| p.1).sum::<u64>() as f64 / 1e3 / self.connections.max(1) as f64
    }
}

/// Churns `port` at `rate` for `secs` while measuring process `pid`.
fn measure(pid: u32, port: u16, rate: f64, secs: f64) -> Cost {
    let (cpu0, k0) = (cpu_seconds(pid), kstats::sample(pid));
    let c = churn(port, rate, secs, 2);
    // The last batch of events (read at most 50 ms late) and the observer's output.
    std::thread::sleep(Duration::from_millis(300));
    let (cpu1, k1) = (cpu_seconds(pid), kstats::sample(pid));
    let connections = c.made - c.failed;
    Cost {
        connections,
        achieved: c.achieved,
        cpu_us: (cpu1 - cpu0) * 1e6 / connections.max(1) as f64,
        programs: kstats::delta(&k0, &k1),
    }
}

/// The daemon and tcplife, each alone on the same churn of a watched port: user-space CPU
/// and the kernel's run time of their programs (BPF statistics), per connection.
fn per_connection(
    opts: &Opts,
    rep: &mut Report,
    watched: u16,
    gpu: &FakeGpu,
    tcplife: Option<&str>,
) {
    let (rate, secs) = (10_000.0, if opts.quick { 2.0 } else { 5.0 });
    rep.heading("Cost per watched connection: reclaimd vs tcplife");
    rep.line(&format!(
        "Two clients churn the watched port (target {} connections/s, {secs} s) with one \
         observer at a time: the daemon (a `scope = \"connection\"` service on the port, \
         no GPU holder: nothing to act on) or tcplife (`-L PORT`, its output read by the \
         bench). CPU: the observer's utime + stime; kernel: the run time of its programs \
         from the kernel's BPF statistics (on only for this section), charged to whichever \
         process the tracepoint fired in.\n",
        fmt(rate)
    ));
    let Some(_stats) = kstats::enable() else {
        rep.line("BPF statistics unavailable: skipped.\n");
        return;
    };
    let d = daemon(gpu).service(services(watched)).start();
    std::thread::sleep(Duration::from_secs(3));
    let ours = measure(d.pid(), watched, rate, secs);
    d.stop();
    let theirs = match (tcplife, opts.skip_peers) {
        (Some(bin), false) => {
            let mut t = Stamped::spawn("stdbuf", &["-oL", bin, "-L", &watched.to_string()]);
            t.wait_for("PID", Duration::from_secs(30));
            let cost = measure(t.pid(), watched, rate, secs);
            let _ = t.stop(libc::SIGINT);
            Some(cost)
        }
        _ => None,
    };
    rep.line("| observer | connections/s | CPU per connection | kernel per connection | total |");
    rep.line("|---|---|---|---|---|");
    for (name, c) in [
        ("reclaimd daemon", Some(&ours)),
        ("tcplife", theirs.as_ref()),
    ] {
        let Some(c) = c else { continue };
        rep.line(&format!(
            "| {name} | {} | {} µs | {} µs | {} µs |",
            fmt(c.achieved),
            fmt(c.cpu_us),
            fmt(c.kernel_us()),
            fmt(c.cpu_us + c.kernel_us())
        ));
        rep.value(&format!("cpu_us_per_connection {name}"), c.cpu_us);
        rep.value(&format!("kernel_us_per_connection {name}"), c.kernel_us());
    }
    if let Some(t) = &theirs {
        rep.line(&format!(
            "\nRatio reclaimd / tcplife per connection: CPU {}, kernel {}, total {}.\n",
            ratio(ours.cpu_us, t.cpu_us),
            ratio(ours.kernel_us(), t.kernel_us()),
            ratio(ours.cpu_us + ours.kernel_us(), t.cpu_us + t.kernel_us())
        ));
    }
    rep.line("| observer | program | runs per connection | ns per run |\n|---|---|---|---|");
    for (name, c) in [("reclaimd", Some(&ours)), ("tcplife", theirs.as_ref())] {
        let Some(c) = c else { continue };
        for (prog, ns, runs) in &c.programs {
            rep.line(&format!(
                "| {name} | {prog} | {} | {} |",
                fmt(*runs as f64 / c.connections.max(1) as f64),
                fmt(*ns as f64 / (*runs).max(1) as f64)
            ));
            rep.value(
                &format!("kernel_ns_per_run {name} {prog}"),
                *ns as f64 / (*runs).max(1) as f64,
            );
        }
    }
    rep.line("");
}
