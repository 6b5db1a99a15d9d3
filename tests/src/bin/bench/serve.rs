//! Overhead on a served workload: a loopback HTTP server under wrk, daemon off and on.
use std::{process::Command, time::Duration};

use reclaimd_tests::{FakeGpu, Workload, connection_service};

use crate::{
    Opts,
    core::{DEVICE, daemon},
    kstats,
    report::{Report, fmt, ratio},
    util::{Stamped, cpu_seconds, ticks_per_second, which},
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

/// Who watches the server during a round.
#[derive(Clone, Copy, PartialEq)]
enum Observer {
    Nobody,
    Daemon,
    Tcplife,
}

impl Observer {
    fn name(self) -> &'static str {
        match self {
            Self::Nobody => "off",
            Self::Daemon => "on",
            Self::Tcplife => "tcplife",
        }
    }
}

/// A running observer: the daemon, or tcplife under stdbuf.
enum Watching {
    Daemon(reclaimd_tests::Daemon),
    Tcplife(Stamped),
}

impl Watching {
    fn pid(&self) -> u32 {
        match self {
            Self::Daemon(d) => d.pid(),
            Self::Tcplife(t) => t.pid(),
        }
    }

    fn stop(self) {
        match self {
            Self::Daemon(d) => {
                let _ = d.stop();
            }
            Self::Tcplife(t) => {
                let _ = t.stop(libc::SIGINT);
            }
        }
    }
}

/// What an observer cost over one round: its CPU seconds, and the requests served while it
/// watched.
struct Cost {
    observer: Observer,
    cpu: f64,
    requests: f64,
}

/// An observer's programs over one round with the kernel's BPF statistics on: name, run
/// time (ns) and runs of each, and the requests served meanwhile.
struct Programs {
    observer: Observer,
    programs: Vec<(String, u64, u64)>,
    requests: f64,
}

/// The whole machine over one round: CPU busy and idle (core-seconds), and requests served.
struct Machine {
    observer: Observer,
    busy: f64,
    idle: f64,
    requests: f64,
}

/// Busy and idle core-seconds of the whole machine so far (`/proc/stat`'s `cpu` line: busy
/// is user, nice, system, irq and softirq; idle is idle and iowait).
fn machine_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let hz = ticks_per_second();
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    (busy as f64 / hz, (at(3) + at(4)) as f64 / hz)
}

/// One measured round: its alternation, who watched, and wrk's requests/s, p50 and p99.
struct Round {
    alternation: usize,
    observer: Observer,
    wrk: (f64, f64, f64),
}

/// The rounds of one request kind: wrk's results, what each observer cost, and the
/// machine's CPU.
#[derive(Default)]
struct Rounds {
    results: Vec<Round>,
    cost: Vec<Cost>,
    machine: Vec<Machine>,
    /// The alternation with the kernel's BPF statistics on: its programs' run time only.
    kernel: Vec<Programs>,
}

impl Rounds {
    fn of(&self, o: Observer) -> Vec<(f64, f64, f64)> {
        self.results
            .iter()
            .filter(|r| r.observer == o)
            .map(|r| r.wrk)
            .collect()
    }

    /// The observer's requests/s over nobody's, per alternation that has both: each round
    /// against the off round next to it, so that the machine's drift over minutes (off
    /// rounds alone wander by ±10 % here) cancels instead of adding to the difference.
    fn paired(&self, o: Observer) -> Vec<f64> {
        let rps = |alternation: usize, o: Observer| {
            self.results
                .iter()
                .find(|r| r.alternation == alternation && r.observer == o)
                .map(|r| r.wrk.0)
        };
        let mut alternations: Vec<usize> = self.results.iter().map(|r| r.alternation).collect();
        alternations.dedup();
        alternations
            .into_iter()
            .filter_map(|a| Some(rps(a, o)? / rps(a, Observer::Nobody)?))
            .collect()
    }

    /// % of a core and µs per request, over the observer's rounds.
    fn cost_of(&self, o: Observer, secs: u64) -> Option<(f64, f64)> {
        let mine: Vec<_> = self.cost.iter().filter(|c| c.observer == o).collect();
        if mine.is_empty() {
            return None;
        }
        let cpu: f64 = mine.iter().map(|c| c.cpu).sum();
        let requests: f64 = mine.iter().map(|c| c.requests).sum();
        let busy = 100.0 * cpu / (mine.len() as f64 * secs as f64);
        Some((busy, 1e6 * cpu / requests.max(1.0)))
    }

    /// The machine's busy CPU per request (µs) and its idle share (%), over the rounds of `o`.
    fn machine_of(&self, o: Observer) -> (f64, f64) {
        let mine: Vec<_> = self.machine.iter().filter(|m| m.observer == o).collect();
        let busy: f64 = mine.iter().map(|m| m.busy).sum();
        let idle: f64 = mine.iter().map(|m| m.idle).sum();
        let requests: f64 = mine.iter().map(|m| m.requests).sum();
        (
            1e6 * busy / requests.max(1.0),
            100.0 * idle / (busy + idle).max(1e-9),
        )
    }

    /// Per program of the observer's: runs and kernel ns per request, over its round with
    /// the statistics on.
    fn kernel_of(&self, o: Observer) -> Vec<(String, f64, f64)> {
        let mine: Vec<_> = self.kernel.iter().filter(|c| c.observer == o).collect();
        let requests: f64 = mine.iter().map(|c| c.requests).sum::<f64>().max(1.0);
        let mut sums: Vec<(String, u64, u64)> = Vec::new();
        for (prog, ns, runs) in mine.iter().flat_map(|c| &c.programs) {
            match sums.iter_mut().find(|s| &s.0 == prog) {
                Some(s) => (s.1, s.2) = (s.1 + ns, s.2 + runs),
                None => sums.push((prog.clone(), *ns, *runs)),
            }
        }
        sums.sort_by_key(|s| std::cmp::Reverse(s.1));
        sums.into_iter()
            .map(|(prog, ns, runs)| (prog, runs as f64 / requests, ns as f64 / requests))
            .collect()
    }
}

pub fn run(opts: &Opts, rep: &mut Report) {
    // Many short alternations rather than a few long ones: on this 2-core machine the
    // nobody-watching rounds wander by ±10 % over minutes (as much in 6 s rounds as in 2 s
    // ones), more than the effect measured; each alternation's ratio cancels that drift,
    // and twelve of them give the mean a 95 % interval of about ±2 %.
    let (rounds, secs) = if opts.quick { (1, 3) } else { (12, 4) };
    rep.heading("Overhead on a served workload (HTTP under wrk)");
    if Command::new("wrk").arg("--version").output().is_err() {
        rep.line("wrk not found (apt-get install wrk): skipped.\n");
        return;
    }
    let tcplife = which(&["/usr/sbin/tcplife", "/usr/bin/tcplife"]).filter(|_| !opts.skip_peers);
    let mut observers = vec![Observer::Nobody, Observer::Daemon];
    if tcplife.is_some() {
        observers.push(Observer::Tcplife);
    }
    let gpu = FakeGpu::new(DEVICE);
    let port = reclaimd_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Workload::spawn(&crate::workload(), &["http", "api-http", &addr]);
    server.line("listening");
    let url = format!("http://{addr}/");
    let reclaimd = daemon(&gpu).service(connection_service("api", "api-http", &[port]));
    let watch = |o: Observer| match (o, &tcplife) {
        (Observer::Daemon, _) => Some(Watching::Daemon(reclaimd.clone().start())),
        (Observer::Tcplife, Some(bin)) => {
            let mut t = Stamped::spawn("stdbuf", &["-oL", bin, "-L", &port.to_string()]);
            t.wait_for("PID", Duration::from_secs(30));
            Some(Watching::Tcplife(t))
        }
        _ => None,
    };
    let mut table = Vec::new();
    for (label, extra) in [
        ("keep-alive", &[][..]),
        ("Connection: close", &["-H", "Connection: close"][..]),
    ] {
        // Unmeasured: in two runs the first keep-alive round was the slowest of all (off:
        // 67k and 71k requests/s, against 84k-93k after it), and it always fell to "off".
        let _ = wrk(&url, 3, extra);
        let mut r = Rounds::default();
        // One more alternation, unmeasured for req/s, with the kernel's BPF statistics on
        // for the programs' run time: collecting them slows every run (two clock reads),
        // more for the observer with more runs per request.
        for round in 0..=rounds {
            let stats_round = round == rounds;
            let _stats = stats_round.then(kstats::enable).flatten();
            // The order turns each alternation, so no observer always follows the same one.
            let mut order = observers.clone();
            order.rotate_left(round % observers.len());
            for &o in &order {
                let w = watch(o);
                std::thread::sleep(Duration::from_millis(500));
                let cpu0 = w.as_ref().map(|w| cpu_seconds(w.pid()));
                let k0 = w
                    .as_ref()
                    .filter(|_| stats_round)
                    .map(|w| kstats::sample(w.pid()));
                let (busy0, idle0) = machine_seconds();
                let got = wrk(&url, secs, extra);
                let (busy1, idle1) = machine_seconds();
                if stats_round {
                    if let Some(w) = w {
                        if let (Some(k0), Some(got)) = (&k0, &got) {
                            r.kernel.push(Programs {
                                observer: o,
                                programs: kstats::delta(k0, &kstats::sample(w.pid())),
                                requests: got.0 * secs as f64,
                            });
                        }
                        w.stop();
                    }
                    continue;
                }
                if let Some(got) = &got {
                    r.machine.push(Machine {
                        observer: o,
                        busy: busy1 - busy0,
                        idle: idle1 - idle0,
                        requests: got.0 * secs as f64,
                    });
                }
                if let (Some(w), Some(cpu0)) = (w, cpu0) {
                    if let Some(got) = &got {
                        r.cost.push(Cost {
                            observer: o,
                            cpu: cpu_seconds(w.pid()) - cpu0,
                            requests: got.0 * secs as f64,
                        });
                    }
                    w.stop();
                }
                let Some(got) = got else {
                    rep.line("wrk gave no result.\n");
                    continue;
                };
                eprintln!("bench: http {label} {}: {:.0} req/s", o.name(), got.0);
                rep.value(&format!("http_rps {label} {}", o.name()), got.0);
                r.results.push(Round {
                    alternation: round,
                    observer: o,
                    wrk: got,
                });
            }
        }
        table.push((label, r));
    }
    let _ = server.finish();
    rep.line(&format!(
        "A minimal HTTP/1.1 responder (`workload http`, a thread per connection) on loopback; \
         `wrk -t2 -c32 -d{secs}s`, {rounds} alternation(s) of: nobody watching (off), the \
         daemon (on: the server is a `scope = \"connection\"` service on its port, so its \
         sockets pass the in-kernel port filter), and tcplife on the port where installed \
         (`-L PORT`, the peer that also sees every connection), the order turned by one each \
         alternation, after an unmeasured 3 s warm-up round. Mean of the rounds; latency \
         is wrk's, mean of its per-round percentiles. wrk, the server and the observer share \
         the machine's cores. The ratio is the mean over the alternations of each round's \
         requests/s against the off round of the same alternation, with its 95 % interval \
         (Student's t); the ratio of the means is beside it.\n"
    ));
    rep.line("| requests | observer | req/s | latency p50 | latency p99 | rounds |\n|---|---|---|---|---|---|");
    let mean = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    let mut ratios = Vec::new();
    let mut costs = Vec::new();
    for (label, r) in &table {
        for &o in &observers {
            let v = r.of(o);
            rep.line(&format!(
                "| {label} | {} | {} | {} ms | {} ms | {} |",
                o.name(),
                fmt(mean(&v, |r| r.0)),
                fmt(mean(&v, |r| r.1)),
                fmt(mean(&v, |r| r.2)),
                v.len()
            ));
        }
        let off = mean(&r.of(Observer::Nobody), |r| r.0);
        for &o in observers.iter().skip(1) {
            let paired = r.paired(o);
            let (m, half) = mean_interval(&paired);
            ratios.push(format!(
                "{label}: {}/off req/s {}× ± {} ({} alternations; ratio of the means {})",
                o.name(),
                fmt(m),
                fmt(half),
                paired.len(),
                ratio(mean(&r.of(o), |r| r.0), off)
            ));
            rep.value(&format!("http_ratio {label} {}", o.name()), m);
            rep.value(&format!("http_ratio_interval {label} {}", o.name()), half);
            if let Some((busy, per_request)) = r.cost_of(o, secs) {
                costs.push(format!(
                    "{label}, {}: {busy:.1} % of a core, {per_request:.1} µs per request",
                    o.name()
                ));
                rep.value(
                    &format!("http_observer_cpu_percent {label} {}", o.name()),
                    busy,
                );
                rep.value(
                    &format!("http_observer_us_per_request {label} {}", o.name()),
                    per_request,
                );
            }
        }
    }
    rep.line(&format!("\nRatio {}.\n", ratios.join("; ")));
    rep.line(&format!(
        "The observer's own CPU in user space and system calls (its programs' kernel time is \
         charged to the processes the tracepoints fire in) over its rounds: {}.\n",
        costs.join("; ")
    ));
    machine_table(rep, &table, &observers);
    kernel_table(rep, &table, &observers);
}

/// The mean of `v` and the half-width of its 95 % interval (Student's t; 0 for one value).
fn mean_interval(v: &[f64]) -> (f64, f64) {
    // t(0.975, df) for df = 1..=30; the normal's 1.96 beyond.
    const T95: [f64; 30] = [
        12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T95.get(n - 2).copied().unwrap_or(1.96);
    (m, t * (var / n as f64).sqrt())
}

/// The whole machine's CPU per request and idle share under each observer: what a lower
/// req/s is made of (more CPU per request, or cores left idle: wrk and the server waiting).
fn machine_table(rep: &mut Report, table: &[(&str, Rounds)], observers: &[Observer]) {
    rep.line(
        "The whole machine over the same rounds (`/proc/stat`: busy is user, nice, system, \
         irq and softirq time; idle is idle and iowait), per request served:\n",
    );
    rep.line("| requests | observer | machine CPU per request | idle |\n|---|---|---|---|");
    for (label, r) in table {
        for &o in observers {
            let (per_request, idle) = r.machine_of(o);
            rep.line(&format!(
                "| {label} | {} | {} µs | {idle:.1} % |",
                o.name(),
                fmt(per_request)
            ));
            rep.value(
                &format!("http_machine_us_per_request {label} {}", o.name()),
                per_request,
            );
        }
    }
    rep.line("");
}

/// The observers' programs per request, from the kernel's BPF statistics: what the served
/// processes paid in the kernel for being watched (their CPU is charged for it, not the
/// observer's).
fn kernel_table(rep: &mut Report, table: &[(&str, Rounds)], observers: &[Observer]) {
    rep.line(
        "Their programs' kernel time per request (the kernel's BPF statistics, on only for \
         one more alternation whose requests/s are not counted above; not counted: the tracepoints' own dispatch and, for a `syscalls` \
         tracepoint, every system call's slower path while one is attached):\n",
    );
    rep.line("| requests | observer | program | runs per request | ns per request |\n|---|---|---|---|---|");
    for (label, r) in table {
        for &o in observers.iter().skip(1) {
            for (prog, runs, ns) in r.kernel_of(o) {
                rep.line(&format!(
                    "| {label} | {} | {prog} | {} | {} |",
                    o.name(),
                    fmt(runs),
                    fmt(ns)
                ));
                rep.value(
                    &format!("http_kernel_ns_per_request {label} {} {prog}", o.name()),
                    ns,
                );
            }
        }
    }
    rep.line("");
}

#[cfg(test)]
mod tests {
    use super::mean_interval;

    #[test]
    fn the_interval_is_students_for_a_few_alternations_and_none_for_one() {
        let (m, half) = mean_interval(&[0.9, 1.1]);
        assert!((m - 1.0).abs() < 1e-12);
        // sd 0.1414, n 2: 12.71 × 0.1414 / √2 = 1.271.
        assert!((half - 1.271).abs() < 1e-3, "{half}");
        assert_eq!(mean_interval(&[0.97]), (0.97, 0.0));
        assert!(mean_interval(&[]).0.is_nan());
    }
}
