//! What every measurement uses: the clock, time-stamped output of peer tools, the daemon's
//! CPU, memory, metrics and status.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, channel},
    time::{Duration, Instant},
};

use reclaimd::api::pb;

/// CLOCK_MONOTONIC in ns: the clock of the kernel's event timestamps and of the workloads'.
pub use reclaimd::clock::monotonic_ns as mono_ns;

/// A peer tool whose stdout lines are stamped (CLOCK_MONOTONIC) the moment they are read.
pub struct Stamped {
    child: Child,
    lines: Receiver<(u64, String)>,
    stderr: Receiver<String>,
    pub got: Vec<(u64, String)>,
}

impl Stamped {
    pub fn spawn(program: &str, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((mono_ns(), line)).is_err() {
                    break;
                }
            }
        });
        let mut pipe = child.stderr.take().expect("piped stderr");
        let (tx, stderr) = channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        Self {
            child,
            lines,
            stderr,
            got: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line that contains `needle` (the tool's ready sign).
    pub fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    let done = line.contains(needle);
                    self.got.push((at, line));
                    if done {
                        return;
                    }
                }
                Err(e) => panic!("no line with {needle:?} from the peer tool: {e:?}"),
            }
        }
    }

    /// Stops the tool with `signal` and returns every line it printed and its stderr.
    pub fn stop(mut self, signal: i32) -> (Vec<(u64, String)>, String) {
        // Lines printed before the signal were stamped as they came.
        while let Ok(l) = self.lines.try_recv() {
            self.got.push(l);
        }
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let _ = self.child.wait();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.got.push(l);
        }
        let err = self
            .stderr
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default();
        (std::mem::take(&mut self.got), err)
    }
}

impl Drop for Stamped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's clock ticks per second, the unit of `/proc`'s CPU times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory arguments.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(11) + tick(12)) as f64 / ticks_per_second()
}

/// VmRSS and VmHWM of `pid`, KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let field = |name: &str| reclaimd_tests::status_field(pid, name);
    (field("VmRSS:"), field("VmHWM:"))
}

/// The daemon's Prometheus text.
pub fn scrape(port: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default()
}

/// A histogram's cumulative buckets (upper bound, count) for one `kind`.
pub type Buckets = Vec<(f64, u64)>;

pub fn histogram(text: &str, name: &str, kind: &str) -> Buckets {
    let prefix = format!("{name}_bucket{{");
    let label = format!("kind=\"{kind}\"");
    let mut out: Buckets = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, n))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `after - before`, bucket by bucket.
pub fn delta(after: &Buckets, before: &Buckets) -> Buckets {
    let old: HashMap<u64, u64> = before.iter().map(|(le, n)| (le.to_bits(), *n)).collect();
    after
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - old.get(&le.to_bits()).copied().unwrap_or(0).min(*n),
            )
        })
        .collect()
}

/// A quantile of a cumulative histogram: linear within the bucket it falls in; with the
/// bucket's upper bound (infinite past the last bound).
pub fn quantile(b: &Buckets, q: f64) -> Option<(f64, f64)> {
    let total = b.last()?.1;
    if total == 0 {
        return None;
    }
    let want = q * total as f64;
    let (mut lo, mut below) = (0.0, 0u64);
    for &(le, n) in b {
        if n as f64 >= want {
            if le.is_infinite() {
                return Some((lo, le));
            }
            let frac = (want - below as f64) / (n - below).max(1) as f64;
            return Some((lo + (le - lo) * frac, le));
        }
        lo = le;
        below = n;
    }
    None
}

/// GetStatus's (events_seen, events_dropped).
pub fn status(socket: &Path) -> (u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = reclaimd::api::client::connect(socket)
            .await
            .expect("connect to the API socket");
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("GetStatus")
            .into_inner();
        (s.events_seen, s.events_dropped)
    })
}

/// Reclaims as WatchEvents announces them: (pid, outcome, when the bench got it).
pub fn watch_reclaims(socket: &Path) -> Receiver<(u32, String, u64)> {
    let (tx, rx) = channel();
    let socket = socket.to_owned();
    let (ready_tx, ready) = channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut c = reclaimd::api::client::connect(&socket)
                .await
                .expect("connect to the API socket");
            let mut events = c
                .watch_events(pb::WatchEventsRequest {})
                .await
                .expect("WatchEvents")
                .into_inner();
            let _ = ready_tx.send(());
            while let Ok(Some(e)) = events.message().await {
                let at = mono_ns();
                if let Some(pb::event::Kind::Reclaim(done)) = e.kind
                    && let Some(r) = done.record
                    && tx.send((r.pid, r.outcome, at)).is_err()
                {
                    break;
                }
            }
        });
    });
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("WatchEvents stream open");
    rx
}

/// One line from `uname -r`-like sources: kernel, CPU model, cores, date.
pub fn machine() -> Vec<(&'static str, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M:%S UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let load = read("/proc/loadavg");
    vec![
        (
            "kernel",
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
        ("CPU", cpu),
        ("cores (nproc)", cores.to_string()),
        ("memory", mem),
        ("date", date),
        (
            "load average at start (1/5/15 min)",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ]
}

/// The version line of a Debian package, or "not installed".
pub fn package_version(name: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", name])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "not installed".into())
}

/// Where a peer tool is installed, if it is.
pub fn which(candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| (*p).to_owned())
}

/// Pairs each observation (key, when seen) with the stamp of the event it reports: the
/// latest not yet paired stamp of that key up to 1 ms after the observation (the observer
/// may read an event before its source's own stamp is taken). Pids and ports come back
/// within a run, so a key has several stamps. Returns the latencies (µs, negative ones as
/// 0) and how many stamps nothing paired.
pub fn pair<K: std::hash::Hash + Eq + Copy>(
    stamps: &HashMap<K, Vec<u64>>,
    seen: &[(K, u64)],
) -> (Vec<f64>, usize) {
    const SLACK: u64 = 1_000_000;
    let mut sorted: HashMap<K, (Vec<u64>, Vec<bool>)> = stamps
        .iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            v.sort_unstable();
            let n = v.len();
            (*k, (v, vec![false; n]))
        })
        .collect();
    let mut seen = seen.to_vec();
    seen.sort_by_key(|s| s.1);
    let mut lat = Vec::new();
    for (k, at) in seen {
        let Some((ts, used)) = sorted.get_mut(&k) else {
            continue;
        };
        let upto = ts.partition_point(|&t| t <= at + SLACK);
        if let Some(i) = (0..upto).rev().find(|&i| !used[i]) {
            used[i] = true;
            lat.push(at.saturating_sub(ts[i]) as f64 / 1e3);
        }
    }
    let total: usize = stamps.values().map(Vec::len).sum();
    let n = lat.len();
    (lat, total - n)
}
