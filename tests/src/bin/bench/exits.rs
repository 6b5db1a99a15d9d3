//! Process exits: how soon each observer learns of them, and what it misses, at a given
//! rate; and the highest exit rate the daemon takes without losing events.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reclaimd_tests::{Daemon, FakeGpu, Workload, service};

use crate::{
    Opts,
    core::{DEVICE, daemon},
    report::{Report, Row, Stat, fmt, ratio},
    util::{
        Stamped, cpu_seconds, delta, histogram, mono_ns, pair, quantile, scrape, status, which,
    },
};

const LATENCY: &str = "reclaimd_kernel_event_latency_seconds";

/// What a generator run produced: each child's pid and its CLOCK_MONOTONIC just before it
/// exited, and the fork rate really achieved.
struct Generated {
    exits: HashMap<u32, Vec<u64>>,
    count: usize,
    achieved: f64,
}

/// `rate` exits per second for `secs`, split over two generators above 2000/s (one core
/// forks about 8000/s here); children live `life_ms`.
fn generate(rate: f64, secs: f64, life_ms: u64) -> Generated {
    let parts = if rate > 2000.0 { 2 } else { 1 };
    let gens: Vec<Workload> = (0..parts)
        .map(|_| {
            Workload::spawn(
                &crate::workload(),
                &[
                    "exit-gen",
                    &(rate / parts as f64).to_string(),
                    &secs.to_string(),
                    &life_ms.to_string(),
                ],
            )
        })
        .collect();
    let mut exits = HashMap::new();
    let mut count = 0;
    let (mut forks, mut took) = (0u64, 0u64);
    for g in gens {
        let (lines, _) = g.finish();
        for l in lines {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("done"), Some(n), Some(ns)) => {
                    forks += n.parse::<u64>().unwrap_or(0);
                    took = took.max(ns.parse().unwrap_or(0));
                }
                (Some(pid), Some(ts), None) => {
                    if let (Ok(pid), Ok(ts)) = (pid.parse(), ts.parse()) {
                        exits.entry(pid).or_insert_with(Vec::new).push(ts);
                        count += 1;
                    }
                }
                _ => {}
            }
        }
    }
    Generated {
        exits,
        count,
        achieved: forks as f64 / (took as f64 / 1e9).max(1e-9),
    }
}

/// Per-exit latencies (µs) of lines naming generated pids, and how many went unseen.
fn match_lines(g: &Generated, seen: &[(u32, u64)]) -> (Vec<f64>, usize) {
    pair(&g.exits, seen)
}

struct ToolRun {
    row: Row,
    csv: (String, Vec<f64>),
}

fn exitsnoop(bin: &str, rate: f64, secs: f64) -> ToolRun {
    // Its stdout is a pipe here: line-buffered, as an operator piping it would set it.
    let mut t = Stamped::spawn("stdbuf", &["-oL", bin]);
    t.wait_for("PCOMM", Duration::from_secs(30));
    let g = generate(rate, secs, 0);
    std::thread::sleep(Duration::from_millis(500));
    let (lines, err) = t.stop(libc::SIGINT);
    let seen: Vec<(u32, u64)> = lines
        .iter()
        .filter_map(|(at, l)| Some((l.split_whitespace().nth(1)?.parse().ok()?, *at)))
        .collect();
    let (lat, missed) = match_lines(&g, &seen);
    let lost: u64 = err
        .lines()
        .filter(|l| l.to_lowercase().contains("lost"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
        .sum();
    ToolRun {
        row: Row::new(
            "exitsnoop (libbpf-tools)",
            Stat::of(&lat),
            "µs",
            format!(
                "{} exits at {}/s achieved; missed {missed}; lost (stderr) {lost}",
                g.count,
                fmt(g.achieved)
            ),
        ),
        csv: (format!("exit_latency_us exitsnoop {rate}/s"), lat),
    }
}

/// `reclaimd trace --json`: the daemon's own programs and ring buffer, one JSON line per
/// event, so per exit: (child's stamp → bench reads the line) and (kernel stamp → receipt).
fn trace(rate: f64, secs: f64) -> (ToolRun, ToolRun) {
    let bin = reclaimd_tests::reclaimd_bin();
    let mut t = Stamped::spawn(bin.to_str().expect("utf-8"), &["trace", "--json"]);
    t.wait_for("\"ready\"", Duration::from_secs(60));
    let g = generate(rate, secs, 0);
    std::thread::sleep(Duration::from_millis(500));
    let (lines, _) = t.stop(libc::SIGTERM);
    let mut seen = Vec::new();
    let mut kernel_us = Vec::new();
    let mut dropped = 0;
    for (at, l) in &lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("exit") => {
                let pid = v["pid"].as_u64().unwrap_or(0) as u32;
                if g.exits.contains_key(&pid) {
                    seen.push((pid, *at));
                    let (ts, recv) = (v["ts_ns"].as_u64(), v["recv_ns"].as_u64());
                    if let (Some(ts), Some(recv)) = (ts, recv) {
                        kernel_us.push(recv.saturating_sub(ts) as f64 / 1e3);
                    }
                }
            }
            Some("summary") => dropped = v["dropped"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    let (lat, missed) = match_lines(&g, &seen);
    let note = format!(
        "{} exits at {}/s achieved; missed {missed}; ring drops {dropped}",
        g.count,
        fmt(g.achieved)
    );
    (
        ToolRun {
            row: Row::new("reclaimd trace --json", Stat::of(&lat), "µs", note.clone()),
            csv: (format!("exit_latency_us reclaimd-trace {rate}/s"), lat),
        },
        ToolRun {
            row: Row::new(
                "reclaimd probe: kernel stamp → user space (same run)",
                Stat::of(&kernel_us),
                "µs",
                note,
            ),
            csv: (
                format!("exit_kernel_to_user_us reclaimd-trace {rate}/s"),
                kernel_us,
            ),
        },
    )
}

/// The daemon itself: its event-latency histogram (kernel stamp → receipt, by kind), its
/// drop counter and its CPU over the run.
struct DaemonRun {
    achieved: f64,
    exits: usize,
    hist: Vec<(f64, u64)>,
    dropped: u64,
    cpu: f64,
    wall: f64,
}

fn with_daemon(rate: f64, secs: f64, ring: Option<u32>) -> DaemonRun {
    let gpu = FakeGpu::new(DEVICE);
    let port = Daemon::metrics_port(&gpu);
    // The generators are a service: each child is a member, as a server's workers are.
    let mut reclaimd = daemon(&gpu).service(service("gen", "exitgen"));
    if let Some(r) = ring {
        reclaimd = reclaimd.set("probe", "ring_bytes", r);
    }
    let d = reclaimd.start();
    let socket = Daemon::api_socket(&gpu);
    let before = histogram(&scrape(port), LATENCY, "exit");
    let (_, drops0) = status(&socket);
    let (cpu0, t0) = (cpu_seconds(d.pid()), mono_ns());
    let g = generate(rate, secs, 0);
    std::thread::sleep(Duration::from_millis(500));
    let (cpu1, t1) = (cpu_seconds(d.pid()), mono_ns());
    // The drop counter is read on the daemon's sweep (5 s).
    std::thread::sleep(Duration::from_millis(5500));
    let (_, drops1) = status(&socket);
    let after = histogram(&scrape(port), LATENCY, "exit");
    d.stop();
    DaemonRun {
        achieved: g.achieved,
        exits: g.count,
        hist: delta(&after, &before),
        dropped: drops1 - drops0,
        cpu: cpu1 - cpu0,
        wall: (t1 - t0) as f64 / 1e9,
    }
}

/// The 1 s /proc poller: a pid it saw with the generator's comm and no longer sees has
/// exited; detected at that scan. Children live `life_ms` so that it can see them at all.
fn poller(rate: f64, secs: f64, life_ms: u64) -> ToolRun {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let scans = std::thread::spawn(move || {
        let mut prev: HashSet<u32> = HashSet::new();
        let mut gone = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let tick = std::time::Instant::now();
            let now: HashSet<u32> = std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                        .filter(|pid| {
                            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                                .is_ok_and(|c| c.trim() == "exitgen")
                        })
                        .collect()
                })
                .unwrap_or_default();
            let at = mono_ns();
            gone.extend(prev.difference(&now).map(|&p| (p, at)));
            prev = now;
            std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
        }
        gone
    });
    let g = generate(rate, secs, life_ms);
    std::thread::sleep(Duration::from_millis(2100));
    stop.store(true, Ordering::Relaxed);
    let gone = scans.join().expect("poller thread");
    let (lat, missed) = match_lines(&g, &gone);
    let lat_us: Vec<f64> = lat;
    ToolRun {
        row: Row::new(
            "1 s /proc poller",
            Stat::of(&lat_us),
            "µs",
            format!(
                "{} exits at {}/s achieved, children live {life_ms} ms; missed {missed}",
                g.count,
                fmt(g.achieved)
            ),
        ),
        csv: (format!("exit_latency_us poller {rate}/s"), lat_us),
    }
}

pub fn run(opts: &Opts, rep: &mut Report) {
    let secs = if opts.quick { 2.0 } else { 5.0 };
    rep.heading("Exit detection: process exit → observer");
    rep.line(&format!(
        "A generator (`workload exit-gen`, two processes above 2000/s) forks children that \
         stamp CLOCK_MONOTONIC just before `_exit`, at a target rate for {secs} s; each \
         observer runs alone on its own generator run. \"missed\" counts generated exits the \
         observer never reported. Definitions:\n\n\
         - exitsnoop and `reclaimd trace`: child's stamp → the bench reads the line naming \
         that pid (exitsnoop run under `stdbuf -oL`, its stdout being a pipe).\n\
         - reclaimd probe (same `trace` run): the exit tracepoint's kernel stamp → the \
         tracer read it from the ring buffer (`ts_ns` → `recv_ns`, per event).\n\
         - reclaimd daemon (`reclaimd run`, generator a configured service): its \
         `{LATENCY}{{kind=\"exit\"}}` histogram, kernel stamp → the daemon read it, over \
         the run, one sample per read of the ring buffer (that read's longest wait, so n \
         counts reads); quantiles interpolated within buckets (bounds 10, 50, 100, 250, \
         500 µs, 1, 5, 10, 50, 100 ms), so they are estimates; it covers every exit on the \
         machine in that time, not only the generator's. Drops: GetStatus `events_dropped` delta.\n\
         - 1 s /proc poller: child's stamp → the first 1 s scan of /proc that no longer \
         lists the pid; its children live 1.1 s so that every one is alive at some scan.\n"
    ));
    let exitsnoop_bin = which(&["/usr/sbin/exitsnoop", "/usr/bin/exitsnoop"]);
    for rate in [1000.0, 20_000.0] {
        rep.line(&format!("### Target {} exits/s\n", fmt(rate)));
        let mut rows = Vec::new();
        let (ours, kernel) = trace(rate, secs);
        let d = with_daemon(rate, secs, None);
        let dstat = quantile(&d.hist, 0.5).zip(quantile(&d.hist, 0.99));
        let n = d.hist.last().map(|b| b.1).unwrap_or(0);
        let fmt_q = |(v, hi): (f64, f64)| {
            if hi.is_infinite() {
                format!("> {} µs", fmt(v * 1e6))
            } else {
                format!("{} µs (≤ {} µs)", fmt(v * 1e6), fmt(hi * 1e6))
            }
        };
        let daemon_note = format!(
            "{} exits at {}/s achieved; events_dropped {}; daemon CPU {:.1}%",
            d.exits,
            fmt(d.achieved),
            d.dropped,
            100.0 * d.cpu / d.wall
        );
        let daemon_row = match dstat {
            Some((m, p)) => Row {
                tool: "reclaimd daemon: kernel stamp → daemon (histogram)".into(),
                median: fmt_q(m),
                p99: fmt_q(p),
                n: n.to_string(),
                note: daemon_note,
            },
            None => Row::new(
                "reclaimd daemon: kernel stamp → daemon (histogram)",
                None,
                "µs",
                daemon_note,
            ),
        };
        let ours_stat = Stat::of(&ours.csv.1);
        rows.push(ours.row);
        rep.values(&ours.csv.0, ours.csv.1);
        rows.push(kernel.row);
        rep.values(&kernel.csv.0, kernel.csv.1);
        rows.push(daemon_row);
        rep.value(&format!("daemon events_dropped {rate}/s"), d.dropped as f64);
        let mut peers = Vec::new();
        if !opts.skip_peers {
            match &exitsnoop_bin {
                Some(bin) => {
                    let e = exitsnoop(bin, rate, secs);
                    peers.push(("exitsnoop", Stat::of(&e.csv.1)));
                    rows.push(e.row);
                    rep.values(&e.csv.0, e.csv.1);
                }
                None => rep.line("exitsnoop not found (apt-get install libbpf-tools).\n"),
            }
            let p = poller(rate, secs, 1100);
            peers.push(("1 s poller", Stat::of(&p.csv.1)));
            rows.push(p.row);
            rep.values(&p.csv.0, p.csv.1);
        }
        rep.table(&rows);
        for (name, s) in peers {
            if let (Some(a), Some(b)) = (s, ours_stat) {
                rep.line(&format!(
                    "Ratio {name} / reclaimd trace (same definition): median {}, p99 {}.\n",
                    ratio(a.median, b.median),
                    ratio(a.p99, b.p99)
                ));
            }
        }
    }
}

/// Steps the exit rate up (doubling) until the daemon drops events or the generators
/// cannot go faster; default ring size.
pub fn drops(opts: &Opts, rep: &mut Report) {
    let secs = if opts.quick { 2.0 } else { 5.0 };
    rep.heading("Event drops: exit rate vs the default ring buffer (1 MiB)");
    rep.line(
        "The daemon (`reclaimd run`, generator a configured service) under rising exit \
         rates; drops from GetStatus `events_dropped` (read on the daemon's 5 s sweep, \
         after the run).\n",
    );
    rep.line("| target exits/s | achieved exits/s | exits | events_dropped | daemon CPU |\n|---|---|---|---|---|");
    let mut best: Option<f64> = None;
    let mut rate = 5000.0;
    let mut prev_achieved = 0.0;
    loop {
        let d = with_daemon(rate, secs, None);
        rep.line(&format!(
            "| {} | {} | {} | {} | {:.1}% |",
            fmt(rate),
            fmt(d.achieved),
            d.exits,
            d.dropped,
            100.0 * d.cpu / d.wall
        ));
        rep.value(
            &format!("drops at {rate}/s achieved {}", d.achieved),
            d.dropped as f64,
        );
        if d.dropped > 0 {
            break;
        }
        best = Some(best.map_or(d.achieved, |b: f64| b.max(d.achieved)));
        // Saturated: the generators no longer go faster.
        if d.achieved < 0.8 * rate || d.achieved < 1.1 * prev_achieved || rate >= 160_000.0 {
            break;
        }
        prev_achieved = d.achieved;
        rate *= 2.0;
    }
    rep.line("");
    match best {
        Some(b) => rep.line(&format!(
            "Highest rate sustained with zero drops: {} exits/s (the last step shows whether \
             drops or the generators' fork rate on this machine ended the climb).\n",
            fmt(b)
        )),
        None => rep.line("Drops already at the first step.\n"),
    }
}
