//! Measurements of reclaimd, run by `cargo xtask bench` (root), side by side with the tools
//! people use instead: time-to-reclaim vs a polling reaper, exit detection vs exitsnoop and
//! /proc polling, overhead on a served workload (wrk), socket-close detection vs tcplife,
//! the daemon's CPU and memory under churn, and the exit rate it takes without drops. Real
//! kernel, real processes, the fake NVML. Prints a Markdown report and writes it, with the
//! raw samples as CSV, under target/bench/.
//!
//! Flags: --runs N (reclaimd time-to-reclaim runs, 300), --peer-runs N (reaper runs, 30),
//! --sessions N (live sessions for the memory table, 10000), --cycles N (connection
//! sessions churned for the memory-after-churn row, 1000000), --quick (a short smoke
//! version), --skip-peers (reclaimd only), --only SECTION[,SECTION] (core, rest, burst,
//! exits, serve, churn, cost, drops), --out DIR.
use std::path::{Path, PathBuf};

use reclaimd_tests::alive;

mod burst;
mod churn;
mod core;
mod exits;
mod kstats;
mod report;
mod serve;
mod syscalls;
mod util;

pub struct Opts {
    pub runs: usize,
    pub peer_runs: usize,
    pub sessions: usize,
    pub cycles: usize,
    pub quick: bool,
    pub skip_peers: bool,
}

/// A measurement: its `--only` name, what it is, and the function that runs it and returns
/// how many of its runs failed.
type Section = fn(&Opts, &mut report::Report) -> usize;

const SECTIONS: &[(&str, &str, Section)] = &[
    ("core", "time to reclaim, memory", core::run),
    ("rest", "at rest with many live sessions", core::rest),
    ("burst", "burst of orphans", burst::run),
    ("exits", "exit detection", |o, r| {
        exits::run(o, r);
        0
    }),
    ("serve", "served workload", |o, r| {
        serve::run(o, r);
        0
    }),
    ("churn", "connection churn", |o, r| {
        churn::run(o, r);
        0
    }),
    ("cost", "cost per watched connection", |o, r| {
        churn::cost(o, r);
        0
    }),
    ("drops", "event drops", |o, r| {
        exits::drops(o, r);
        0
    }),
];

pub fn workload() -> String {
    reclaimd_tests::workload_beside_exe()
}

fn arg_or(args: &[String], flag: &str, default: usize) -> usize {
    reclaimd_tests::flag_or(args, flag, default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let opts = Opts {
        runs: arg_or(&args, "--runs", if quick { 20 } else { 300 }),
        peer_runs: arg_or(&args, "--peer-runs", if quick { 5 } else { 30 }),
        sessions: arg_or(&args, "--sessions", if quick { 1000 } else { 10_000 }),
        cycles: arg_or(&args, "--cycles", if quick { 20_000 } else { 1_000_000 }),
        quick,
        skip_peers: args.iter().any(|a| a == "--skip-peers"),
    };
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    assert!(alive(std::process::id()));
    // Many sockets and processes at once: lift the open-file limit as far as allowed.
    raise_nofile();

    let mut rep = report::Report::default();
    rep.csv.push_str("kind,value\n");
    rep.line("# reclaimd core measurements\n");
    rep.heading("Machine");
    rep.line("| | |\n|---|---|");
    for (k, v) in util::machine() {
        rep.line(&format!("| {k} | {v} |"));
    }
    rep.line(&format!(
        "| peers | libbpf-tools {}, wrk {} |",
        util::package_version("libbpf-tools"),
        util::package_version("wrk")
    ));
    rep.line(&format!(
        "| run | runs {}, peer runs {}, sessions {}, cycles {}{}{} |\n",
        opts.runs,
        opts.peer_runs,
        opts.sessions,
        opts.cycles,
        if quick { ", --quick" } else { "" },
        if opts.skip_peers {
            ", --skip-peers"
        } else {
            ""
        }
    ));
    rep.line(
        "Every number below was measured in this run on this machine; anything else running \
         on it (a compiler, say) shows up as noise, mostly in the tails.\n",
    );

    // --only SECTION[,SECTION]: a developer's shortcut to one measurement.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_owned).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let mut failures = 0;
    for (name, what, section) in SECTIONS {
        if wanted(name) {
            step(what);
            failures += section(&opts, &mut rep);
        }
    }

    print!("{}", rep.md);
    write_out(&out_dir, &rep);
    if failures > 0 {
        std::process::exit(1);
    }
}

fn step(what: &str) {
    eprintln!("bench: {what}");
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn write_out(dir: &Path, rep: &report::Report) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("bench: cannot create {}: {e}", dir.display());
        return;
    }
    for (name, text) in [("core.md", &rep.md), ("core.csv", &rep.csv)] {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            eprintln!("bench: cannot write {name}: {e}");
        }
    }
    eprintln!("bench: report in {}", dir.join("core.md").display());
}
