//! The soak, run by `cargo xtask soak` (root): an hour (by default) of churn with reclaims
//! against one release daemon in enforce mode. Process sessions (a service server killed,
//! its GPU worker reclaimed) and connection sessions (a client closes, the worker serving it
//! is reclaimed) come and go all the time, beside holders outside every service that must
//! never be touched. Every 30 s the daemon's RSS, open fds and threads are sampled. Fails
//! on any wrong kill, any orphan left, or growth of RSS or fds; writes a Markdown report and
//! the samples as CSV under target/soak/.
use std::{
    collections::HashSet,
    fmt::Write as _,
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use reclaimd::ledger::{Action, Outcome};
use reclaimd_tests::{
    Daemon, FakeGpu, Workload, alive, connection_service, flag_or, free_port, kill, ledger_records,
    llm_service, next_worker, spawn_conn_server, spawn_server, status_field, workload_beside_exe,
};

const DEVICE: &str = "device 0 GPU-soak 81920 Fake H100";
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How long an orphan may take to be reclaimed before the soak calls it left behind.
const RECLAIM_LIMIT: Duration = Duration::from_secs(30);

struct Sample {
    at_s: u64,
    rss_kib: u64,
    fds: usize,
    threads: u64,
    reclaimed: usize,
}

fn sample(pid: u32, started: Instant, reclaimed: usize) -> Sample {
    Sample {
        at_s: started.elapsed().as_secs(),
        rss_kib: status_field(pid, "VmRSS:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
        threads: status_field(pid, "Threads:"),
        reclaimed,
    }
}

/// The workers the fake GPU lists, rewritten whenever they change.
struct Listed {
    bystanders: Vec<u32>,
    workers: HashSet<u32>,
}

impl Listed {
    fn write(&mut self, gpu: &FakeGpu) {
        self.workers.retain(|w| alive(*w));
        let mut s = format!("{DEVICE}\n");
        for p in self.bystanders.iter().chain(self.workers.iter()) {
            let _ = writeln!(s, "proc 0 {p} 256 compute");
        }
        gpu.set_state(&s);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let minutes = flag_or(&args, "--minutes", 60u64);
    let per_second = flag_or(&args, "--rate", 2u64).max(1);
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/soak"));
    let run_for = Duration::from_secs(minutes * 60);

    let gpu = FakeGpu::new(DEVICE);
    let port = free_port();
    let mut d = Daemon::builder(&gpu)
        .policy("sweep", "1s")
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .policy("term_grace", "1s")
        .policy("max_reclaims_per_minute", 100_000)
        .service(llm_service())
        .service(connection_service("api", "api-server", &[port]))
        .rust_log("warn,reclaimd::runtime=info,reclaimd::engine=info")
        .start();
    let ledger = d.ledger.clone();
    let device = gpu.device_file(0);
    let device_str = device.to_str().expect("utf-8 path");

    // Outside every service: must outlive the soak.
    let bystanders: Vec<(Workload, u32)> = (0..3)
        .map(|_| spawn_server(&workload_beside_exe(), "trainer", device_str, &[]))
        .collect();
    let mut listed = Listed {
        bystanders: bystanders.iter().flat_map(|(s, w)| [s.pid(), *w]).collect(),
        workers: HashSet::new(),
    };
    let addr = format!("127.0.0.1:{port}");
    let conn_server = spawn_conn_server(&workload_beside_exe(), "api-server", &addr, &device);

    let started = Instant::now();
    let mut samples = vec![sample(d.pid(), started, 0)];
    let mut next_sample = started + SAMPLE_EVERY;
    let mut ours: HashSet<u32> = HashSet::new();
    let mut orphaned: Vec<(u32, Instant)> = Vec::new();
    let mut servers: Vec<(Workload, u32)> = Vec::new();
    // Killed servers, kept until their worker is gone: finishing one closes the worker's
    // stdin, and the worker would then exit by itself instead of being reclaimed.
    let mut killed: Vec<(Workload, u32)> = Vec::new();
    let mut open_conns: Vec<(TcpStream, u32)> = Vec::new();
    let period = Duration::from_millis(1000 / per_second);
    let mut i: u64 = 0;
    while started.elapsed() < run_for {
        let tick = Instant::now();
        // A process session: a server and its worker; the server dies a few ticks later.
        let (server, worker) = spawn_server(&workload_beside_exe(), "llm-server", device_str, &[]);
        ours.insert(worker);
        listed.workers.insert(worker);
        servers.push((server, worker));
        // A connection session: opened now, closed a few ticks later.
        if let Ok(c) = TcpStream::connect(&addr) {
            let w = next_worker(&conn_server);
            ours.insert(w);
            listed.workers.insert(w);
            open_conns.push((c, w));
        }
        listed.write(&gpu);
        if servers.len() > 3 {
            let (s, w) = servers.remove(0);
            kill(s.pid());
            killed.push((s, w));
            orphaned.push((w, Instant::now()));
        }
        let (gone, waiting): (Vec<_>, Vec<_>) = killed.drain(..).partition(|(_, w)| !alive(*w));
        killed = waiting;
        for (s, _) in gone {
            let _ = s.finish();
        }
        if open_conns.len() > 3 {
            let (c, w) = open_conns.remove(0);
            drop(c);
            orphaned.push((w, Instant::now()));
        }
        i += 1;
        if Instant::now() >= next_sample {
            let reclaimed = ledger_records(&ledger)
                .iter()
                .filter(|r| r.outcome == Outcome::Reclaimed)
                .count();
            let s = sample(d.pid(), started, reclaimed);
            eprintln!(
                "soak: {:>5}s rss {} KiB fds {} threads {} reclaimed {}",
                s.at_s, s.rss_kib, s.fds, s.threads, s.reclaimed
            );
            samples.push(s);
            next_sample += SAMPLE_EVERY;
            // Orphans must have gone by now.
            orphaned.retain(|(w, since)| {
                if !alive(*w) {
                    return false;
                }
                assert!(
                    since.elapsed() < RECLAIM_LIMIT,
                    "worker {w} of a closed connection still alive after {:?}",
                    since.elapsed()
                );
                true
            });
        }
        if let Some(left) = period.checked_sub(tick.elapsed()) {
            std::thread::sleep(left);
        }
    }
    // Wind down: every remaining session dies, every orphan must be reclaimed.
    for (s, w) in servers.drain(..) {
        kill(s.pid());
        killed.push((s, w));
        orphaned.push((w, Instant::now()));
    }
    for (c, w) in open_conns.drain(..) {
        drop(c);
        orphaned.push((w, Instant::now()));
    }
    let deadline = Instant::now() + RECLAIM_LIMIT;
    while ours.iter().any(|w| alive(*w)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<u32> = ours.iter().copied().filter(|w| alive(*w)).collect();
    if !left.is_empty() {
        let holders = reclaimd_tests::reclaimctl_json(&gpu, &["holders"]);
        for h in holders["holders"].as_array().into_iter().flatten() {
            if h["pid"]
                .as_u64()
                .is_some_and(|p| left.contains(&(p as u32)))
            {
                eprintln!("soak: left behind: {h}");
            }
        }
        for r in ledger_records(&ledger) {
            if left.contains(&r.decision.pid) {
                eprintln!("soak: its record: {r:?}");
            }
        }
        let status = reclaimd_tests::reclaimctl_json(&gpu, &["status"]);
        eprintln!("soak: status: {status}");
        d.drain_log();
        for l in d.log.iter().rev().take(60).rev() {
            eprintln!("soak: daemon: {l}");
        }
    }
    for (s, _) in killed {
        let _ = s.finish();
    }
    let records = ledger_records(&ledger);
    samples.push(sample(
        d.pid(),
        started,
        records
            .iter()
            .filter(|r| r.outcome == Outcome::Reclaimed)
            .count(),
    ));
    let wrong: Vec<String> = records
        .iter()
        .filter(|r| r.decision.action == Action::Reclaim && !ours.contains(&r.decision.pid))
        .map(|r| format!("{} ({})", r.decision.pid, r.decision.comm))
        .collect();
    let bystanders_alive = bystanders.iter().all(|(s, w)| alive(s.pid()) && alive(*w));
    let daemon_pid = d.pid();
    let daemon_alive = alive(daemon_pid);
    d.stop();
    kill(conn_server.pid());
    let _ = conn_server.finish();
    for (s, w) in bystanders {
        kill(w);
        kill(s.pid());
        let _ = s.finish();
    }

    let by_outcome = |o: Outcome| records.iter().filter(|r| r.outcome == o).count();
    let reclaimed_of = |service: &str| {
        records
            .iter()
            .filter(|r| r.outcome == Outcome::Reclaimed && r.decision.service == service)
            .count()
    };
    let warm = &samples[samples.len().min(3) - 1..];
    let half = warm.len() / 2;
    let (first, second) = warm.split_at(half.max(1));
    let max_rss = |s: &[Sample]| s.iter().map(|x| x.rss_kib).max().unwrap_or(0);
    let max_fds = |s: &[Sample]| s.iter().map(|x| x.fds).max().unwrap_or(0);
    // Flat: the second half of the run (after warm-up) peaks no higher than the first half,
    // give or take the allocator's noise.
    let rss_flat = max_rss(second) <= max_rss(first) + max_rss(first) / 10 + 2048;
    let fds_flat = max_fds(second) <= max_fds(first) + 2;

    let mut md = String::new();
    let _ = writeln!(md, "# reclaimd soak\n");
    let _ = writeln!(
        md,
        "{} min, {} process sessions and {} connection sessions per second ({} rounds); \
         enforce, grace 0, sweep 1 s; fake NVML.\n",
        minutes, per_second, per_second, i
    );
    let _ = writeln!(
        md,
        "| result | value |\n|---|---|\n| workers spawned | {} |\n| reclaimed | {} (process sessions {}, connections {}) |\n\
         | released | {} |\n| failed | {} |\n| skipped | {} |\n| orphans left alive | {} |\n\
         | wrong kills (reclaim of a pid we did not orphan) | {} |\n| bystanders alive | {} |\n\
         | daemon alive to the end | {} |\n| RSS flat (2nd half ≤ 1st half + 10 % + 2 MiB) | {} |\n\
         | open fds flat (± 2) | {} |\n",
        ours.len(),
        by_outcome(Outcome::Reclaimed),
        reclaimed_of("llm"),
        reclaimed_of("api"),
        by_outcome(Outcome::Released),
        by_outcome(Outcome::Failed),
        by_outcome(Outcome::Skipped),
        left.len(),
        wrong.len(),
        bystanders_alive,
        daemon_alive,
        rss_flat,
        fds_flat
    );
    let _ = writeln!(
        md,
        "| t (s) | RSS (MiB) | open fds | threads | reclaimed so far |\n|---|---|---|---|---|"
    );
    let mut csv = String::from("t_s,rss_kib,fds,threads,reclaimed\n");
    for s in &samples {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {} | {} | {} |",
            s.at_s,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.threads,
            s.reclaimed
        );
        let _ = writeln!(
            csv,
            "{},{},{},{},{}",
            s.at_s, s.rss_kib, s.fds, s.threads, s.reclaimed
        );
    }
    print!("{md}");
    write_out(&out_dir, &md, &csv);
    let ok = left.is_empty()
        && wrong.is_empty()
        && bystanders_alive
        && daemon_alive
        && rss_flat
        && fds_flat;
    if !ok {
        eprintln!("soak: FAILED (left: {left:?}, wrong: {wrong:?})");
        std::process::exit(1);
    }
}

fn write_out(dir: &Path, md: &str, csv: &str) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("soak: cannot create {}: {e}", dir.display());
        return;
    }
    for (name, text) in [("soak.md", md), ("soak.csv", csv)] {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            eprintln!("soak: cannot write {name}: {e}");
        }
    }
    eprintln!("soak: report in {}", dir.join("soak.md").display());
}
