//! Harness for the kernel integration tests: run `reclaimd trace --json`, trigger something
//! real in the kernel, expect the event (the trigger → expect pattern of Exein's pulsar).
//!
//! The programs see the whole machine, so tests pick out their own processes by pid. They
//! need root and run one at a time (`--test-threads=1`, as `cargo xtask test` does).
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use serde_json::Value;

/// A file built into this test's target dir (`target/<profile>/NAME`), or `env` when set.
fn built(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> → target/<profile>/NAME
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo xtask test` (or `cargo build` first)",
        path.display()
    );
    path
}

/// The daemon binary under test: `RECLAIMD_BIN`, else the one beside this test's target dir.
pub fn reclaimd_bin() -> PathBuf {
    built("RECLAIMD_BIN", "reclaimd")
}

/// The client binary: `RECLAIMCTL_BIN`, else beside the daemon.
pub fn reclaimctl_bin() -> PathBuf {
    built("RECLAIMCTL_BIN", "reclaimctl")
}

/// The fake NVML library as cargo built it: `FAKE_NVML_LIB`, else beside the test.
pub fn fake_nvml_lib() -> PathBuf {
    built("FAKE_NVML_LIB", "libnvidia_ml.so")
}

/// The workload binary: `WORKLOAD_BIN` when set (test binaries carried to another machine),
/// else where cargo built it (`env!("CARGO_BIN_EXE_workload")` of the calling test).
pub fn workload_bin(built_at: &str) -> String {
    std::env::var("WORKLOAD_BIN").unwrap_or_else(|_| built_at.to_owned())
}

/// The workload binary beside the running binary (the bench and the soak, built together).
pub fn workload_beside_exe() -> String {
    let exe = std::env::current_exe().expect("current_exe");
    workload_bin(exe.with_file_name("workload").to_str().expect("utf-8 path"))
}

/// `FLAG N` among a binary's arguments, else `default`.
pub fn flag_or<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag} takes a number"))
        })
        .unwrap_or(default)
}

/// A numeric field of `/proc/PID/status` (`VmRSS:` in KiB, `Threads:`…); 0 when unreadable.
pub fn status_field(pid: u32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether an NVIDIA driver is loaded on this machine.
pub fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// A directory of a test's own under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "reclaimd-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private copy of the fake NVML library with its state file beside it, so tests in one
/// process never share state; and fake device files `nvidia<N>` in the same directory.
pub struct FakeGpu {
    pub dir: TempDir,
    pub lib: PathBuf,
}

impl FakeGpu {
    pub fn new(state: &str) -> Self {
        let dir = TempDir::new("fake-gpu");
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_nvml_lib(), &lib).expect("copy fake NVML");
        let gpu = Self { dir, lib };
        gpu.set_state(state);
        gpu
    }

    /// Replaces the state atomically (write, then rename), as the library re-reads it on
    /// every call.
    pub fn set_state(&self, state: &str) {
        let tmp = self.dir.path().join("state.tmp");
        std::fs::write(&tmp, state).expect("write state");
        let mut target = self.lib.clone().into_os_string();
        target.push(".state");
        std::fs::rename(&tmp, target).expect("rename state");
    }

    /// Creates (if needed) and returns the fake device file `nvidia<minor>`.
    pub fn device_file(&self, minor: u32) -> PathBuf {
        let p = self.dir.path().join(format!("nvidia{minor}"));
        if !p.exists() {
            std::fs::write(&p, b"").expect("create device file");
        }
        p
    }

    pub fn device_glob(&self) -> String {
        format!("{}/nvidia*", self.dir.path().display())
    }
}

/// Lines of a child's stdout, read on a thread so the child never blocks on a full pipe.
fn line_reader(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `reclaimd trace --json`.
pub struct Tracer {
    child: Child,
    lines: Receiver<String>,
    /// The ready line: what is attached (`capabilities`) and what this kernel lacks
    /// (`missing`), each capability by name with a detail or a reason.
    pub ready: Value,
    /// Every event received so far, in order.
    pub seen: Vec<Value>,
}

/// What a stopped tracer saw.
pub struct Trace {
    pub events: Vec<Value>,
    pub summary: Value,
    pub stderr: String,
}

impl Tracer {
    /// Starts the tracer with extra `args` and waits until its programs are attached.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(reclaimd_bin())
            .arg("trace")
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reclaimd trace");
        let lines = line_reader(&mut child);
        let ready = match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line).expect("JSON line");
                assert_eq!(v["kind"], "ready", "first line is the ready line: {line}");
                v
            }
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "reclaimd trace did not become ready: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        Self {
            child,
            lines,
            ready,
            seen: Vec::new(),
        }
    }

    /// How capability `name` runs (its detail), or `None` when this kernel lacks it.
    pub fn capability(&self, name: &str) -> Option<&str> {
        self.ready["capabilities"][name].as_str()
    }

    /// The skip helper of tests that need a capability this kernel may lack: `true` (and a
    /// line saying why) when it is missing.
    pub fn skip_without(&self, name: &str) -> bool {
        if self.capability(name).is_some() {
            return false;
        }
        eprintln!(
            "skipped: this kernel lacks {name}: {}",
            self.ready["missing"][name]
        );
        true
    }

    fn take(&mut self, line: &str) -> Value {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("reclaimd printed a non-JSON line {line:?}: {e}"));
        self.seen.push(v.clone());
        v
    }

    /// Returns the first event, already seen or arriving within `timeout`, that matches.
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v = self.take(&line);
                    if pred(&v) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {what} event within {timeout:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("tracer exited before {what}"),
            }
        }
    }

    /// Reads whatever arrives within `quiet`, to let late events in before asserting absence.
    pub fn settle(&mut self, quiet: Duration) {
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            self.take(&line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then everything the tracer printed up to its summary.
    pub fn stop(self) -> Trace {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` (SIGINT or SIGTERM), then everything the tracer printed up to its
    /// summary; the tracer must exit 0.
    pub fn stop_with(mut self, signal: i32) -> Trace {
        // SAFETY: signalling our own child, whose pid we hold and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let summary = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v = self.take(&line);
                    if v["kind"] == "summary" {
                        self.seen.pop();
                        break v;
                    }
                }
                Err(e) => panic!("tracer gave no summary after SIGTERM: {e:?}"),
            }
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            use std::io::Read as _;
            let _ = pipe.read_to_string(&mut stderr);
        }
        let status = self.child.wait().expect("wait for tracer");
        assert!(status.success(), "tracer exit status {status:?}: {stderr}");
        Trace {
            events: std::mem::take(&mut self.seen),
            summary,
            stderr,
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running test workload (the `workload` binary of this crate).
pub struct Workload {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Workload {
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn workload");
        let stdin = child.stdin.take();
        let lines = line_reader(&mut child);
        Self {
            child,
            stdin,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next output line, which must start with `prefix`; returns the rest.
    pub fn line(&self, prefix: &str) -> String {
        self.line_within(prefix, Duration::from_secs(30))
    }

    /// As [`Workload::line`], waiting at most `limit`: for what takes long on a loaded
    /// machine (tens of thousands of connects, each refused SYN retried after a second).
    pub fn line_within(&self, prefix: &str, limit: Duration) -> String {
        let line = self
            .lines
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("workload said nothing (waiting for {prefix}): {e:?}"));
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
            .trim()
            .to_owned()
    }

    /// The next output line, whatever it says.
    pub fn any_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("workload said nothing: {e:?}"))
    }

    /// Writes `line` to the workload's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to workload");
        stdin.flush().expect("flush to workload");
    }

    /// Every remaining output line, after the workload exits.
    pub fn finish(mut self) -> (Vec<String>, std::process::ExitStatus) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let status = self.child.wait().expect("wait for workload");
        (self.lines.iter().collect(), status)
    }
}

/// Snapshots until `pred` holds (NVML retries back off), failing after `limit`.
pub fn snapshot_until(
    inv: &mut reclaimd::gpu::GpuInventory,
    limit: Duration,
    pred: impl Fn(&reclaimd::gpu::Inventory) -> bool,
) -> reclaimd::gpu::Inventory {
    let deadline = Instant::now() + limit;
    loop {
        let s = inv.snapshot();
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met; last snapshot {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The metrics port of a daemon whose files are in `dir`: a free port, chosen once per
/// directory (kept in `dir/metrics.port`).
fn metrics_port_in(dir: &Path) -> u16 {
    let file = dir.join("metrics.port");
    if let Some(p) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
    {
        return p;
    }
    let port = free_port();
    std::fs::write(&file, port.to_string()).expect("write metrics.port");
    port
}

/// A `[[service]]` table: `name`, matching the processes whose comm is `comm`.
pub fn service(name: &str, comm: &str) -> toml::Table {
    let mut matcher = toml::Table::new();
    matcher.insert("comm".into(), vec![comm].into());
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("match".into(), matcher.into());
    t
}

/// As `service`, with `scope = "connection"` on `ports`.
pub fn connection_service(name: &str, comm: &str, ports: &[u16]) -> toml::Table {
    let mut t = service(name, comm);
    let ports: Vec<i64> = ports.iter().copied().map(i64::from).collect();
    t.insert("ports".into(), ports.into());
    t.insert("scope".into(), "connection".into());
    t
}

/// The service most tests run: `llm`, the processes named `llm-server`.
pub fn llm_service() -> toml::Table {
    service("llm", "llm-server")
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// How to run a `reclaimd run` under test: its config, a TOML table built from values and
/// written to `config.toml` in the test's directory, and how its process is started.
///
/// The defaults: `[policy] sweep = "200ms"` (`unset` it for the daemon's own 5 s), the
/// ledger at `ledger.db`, metrics on `Daemon::metrics_port`, the API on `Daemon::api_socket`,
/// `RUST_LOG=info`. Clone it to start a second daemon on the same config and ledger.
#[derive(Clone, Debug)]
#[must_use]
pub struct DaemonBuilder {
    dir: PathBuf,
    config: toml::Table,
    ledger: PathBuf,
    rust_log: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    wrapper: Vec<String>,
}

impl DaemonBuilder {
    /// Sets `key` of the `[policy]` table.
    pub fn policy(self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.set("policy", key, value)
    }

    /// Sets `key` of the table `[table]` (created if needed), replacing any value it had.
    pub fn set(mut self, table: &str, key: &str, value: impl Into<toml::Value>) -> Self {
        let t = self
            .config
            .entry(table)
            .or_insert_with(|| toml::Table::new().into())
            .as_table_mut()
            .unwrap_or_else(|| panic!("[{table}] is not a table"));
        t.insert(key.to_owned(), value.into());
        self
    }

    /// Removes `key` from `[table]`: the daemon's default applies.
    pub fn unset(mut self, table: &str, key: &str) -> Self {
        if let Some(t) = self.config.get_mut(table).and_then(|t| t.as_table_mut()) {
            t.remove(key);
        }
        self
    }

    /// Adds a `[[service]]` table (see `service`, `connection_service`).
    pub fn service(mut self, service: toml::Table) -> Self {
        self.config
            .entry("service")
            .or_insert_with(|| toml::Value::Array(Vec::new()))
            .as_array_mut()
            .expect("service is an array of tables")
            .push(service.into());
        self
    }

    /// The ledger at `path` instead of the test directory's `ledger.db`.
    pub fn ledger(mut self, path: &Path) -> Self {
        self.ledger = path.to_owned();
        self.set("ledger", "path", utf8(path))
    }

    /// `RUST_LOG` for the daemon (default `info`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.rust_log);
        self
    }

    /// One more environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// One more argument after `reclaimd run --config CONFIG`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Runs `wrapper… reclaimd run …` (a wrapper such as setpriv or unshare).
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|&w| w.to_owned()).collect();
        self
    }

    /// Writes the config (`config.toml` in the test's directory) without starting anything;
    /// returns the config's and the ledger's paths.
    pub fn write(&self) -> (PathBuf, PathBuf) {
        let config = self.dir.join("config.toml");
        let text = toml::to_string(&self.config).expect("config as TOML");
        std::fs::write(&config, text).expect("write config");
        (config, self.ledger.clone())
    }

    /// Writes the config and starts the daemon on it; returns once it runs.
    pub fn start(self) -> Daemon {
        let (config, ledger) = self.write();
        let bin = reclaimd_bin();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&config)
            .args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reclaimd run");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            lines,
            config,
            ledger,
            log: Vec::new(),
        };
        d.wait_log("reclaimd running", Duration::from_secs(60));
        d
    }
}

/// A running `reclaimd run` with its own config, fake GPU and ledger.
pub struct Daemon {
    child: Child,
    lines: Receiver<String>,
    pub config: PathBuf,
    pub ledger: PathBuf,
    pub log: Vec<String>,
}

impl Daemon {
    /// A daemon for `gpu` (its library and device files), everything else in its directory.
    pub fn builder(gpu: &FakeGpu) -> DaemonBuilder {
        Self::builder_in(gpu.dir.path())
            .set("gpu", "nvml_library", utf8(&gpu.lib))
            .set("gpu", "device_glob", gpu.device_glob())
    }

    /// A daemon whose files are in `dir`, on the NVML the system has (no `[gpu]` table).
    pub fn builder_in(dir: &Path) -> DaemonBuilder {
        let ledger = dir.join("ledger.db");
        DaemonBuilder {
            dir: dir.to_owned(),
            config: toml::Table::new(),
            ledger: ledger.clone(),
            rust_log: "info".to_owned(),
            env: Vec::new(),
            args: Vec::new(),
            wrapper: Vec::new(),
        }
        .policy("sweep", "200ms")
        .ledger(&ledger)
        .set(
            "metrics",
            "listen",
            format!("127.0.0.1:{}", metrics_port_in(dir)),
        )
        .set("api", "socket", utf8(&dir.join("api.sock")))
    }

    /// The metrics port of a daemon from `Daemon::builder(gpu)`: a free port, chosen once per
    /// test directory.
    pub fn metrics_port(gpu: &FakeGpu) -> u16 {
        metrics_port_in(gpu.dir.path())
    }

    /// The API socket of a daemon from `Daemon::builder(gpu)`.
    pub fn api_socket(gpu: &FakeGpu) -> PathBuf {
        gpu.dir.path().join("api.sock")
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> String {
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    pub fn drain_log(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM; the daemon must stop cleanly.
    pub fn stop(mut self) -> Vec<String> {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for daemon");
        self.drain_log();
        assert!(
            status.success(),
            "daemon exit {status:?}:\n{}",
            self.log.join("\n")
        );
        std::mem::take(&mut self.log)
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the ledger holds a settled record for `pid` (anything but pending).
pub fn wait_for_record(
    ledger: &std::path::Path,
    pid: u32,
    limit: Duration,
) -> reclaimd::ledger::Record {
    settled_record(ledger, pid, limit)
        .unwrap_or_else(|| panic!("no settled ledger record for pid {pid}"))
}

/// The settled record of `pid` (anything but pending), once the ledger has one, within
/// `limit`.
pub fn settled_record(
    ledger: &std::path::Path,
    pid: u32,
    limit: Duration,
) -> Option<reclaimd::ledger::Record> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(l) = reclaimd::ledger::Ledger::open(ledger)
            && let Ok(rows) = l.query(&reclaimd::ledger::Query {
                pid: Some(pid),
                ..Default::default()
            })
            && let Some(r) = rows
                .into_iter()
                .find(|r| r.outcome != reclaimd::ledger::Outcome::Pending)
        {
            return Some(r);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every ledger record.
pub fn ledger_records(ledger: &std::path::Path) -> Vec<reclaimd::ledger::Record> {
    let l = reclaimd::ledger::Ledger::open(ledger).expect("open ledger");
    // Every record, newest first, a page at a time (a query returns at most ~1000).
    let mut all: Vec<reclaimd::ledger::Record> = Vec::new();
    loop {
        let page = l
            .query(&reclaimd::ledger::Query {
                before_id: all.last().map(|r| r.id),
                limit: Some(1000),
                ..Default::default()
            })
            .expect("read ledger");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Whether process `pid` is alive: any thread of it runs (not a zombie, nor a leader that
/// exited with its last thread).
pub fn alive(pid: u32) -> bool {
    reclaimd::gpu::process_alive(std::path::Path::new("/proc"), pid)
}

/// SIGKILL to a process the test started.
pub fn kill(pid: u32) {
    // SAFETY: kill has no memory arguments; callers name their own processes.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// A `workload server NAME DEVICE EXTRA...`: a service process and its one worker, which
/// holds DEVICE (a file, or `cuda:MIB`) by the time this returns; with the worker's pid.
pub fn spawn_server(workload: &str, name: &str, device: &str, extra: &[&str]) -> (Workload, u32) {
    let mut args = vec!["server", name, device];
    args.extend_from_slice(extra);
    let server = Workload::spawn(workload, &args);
    let worker = server.line("worker").parse().expect("worker pid");
    (server, worker)
}

/// A `workload burst-server llm-server DEVICE N EXTRA...`: one service process (the `llm`
/// service's), N workers holding the device, every second one with a leaf of its own
/// holding it too; the fake NVML lists them all with 16 MiB each.
pub struct Burst {
    pub server: Workload,
    pub workers: Vec<u32>,
    /// (leaf, its worker)
    pub leaves: Vec<(u32, u32)>,
}

impl Burst {
    pub fn start(gpu: &FakeGpu, device: &str, workload: &str, n: usize, extra: &[&str]) -> Self {
        let dev = gpu.device_file(0);
        let n = n.to_string();
        let mut args = vec![
            "burst-server",
            "llm-server",
            dev.to_str().expect("utf-8 path"),
            &n,
        ];
        args.extend_from_slice(extra);
        let server = Workload::spawn(workload, &args);
        let (mut workers, mut leaves) = (Vec::new(), Vec::new());
        loop {
            let line = server.any_line();
            let words: Vec<&str> = line.split(' ').collect();
            let pid = |i: usize| -> u32 { words[i].parse().expect("pid") };
            match words[0] {
                "worker" => workers.push(pid(1)),
                "leaf" => leaves.push((pid(1), pid(2))),
                "ready" => break,
                _ => panic!("burst-server said {line:?}"),
            }
        }
        let listed: String = workers
            .iter()
            .chain(leaves.iter().map(|(l, _)| l))
            .map(|p| format!("proc 0 {p} 16 compute\n"))
            .collect();
        gpu.set_state(&format!("{device}\n{listed}"));
        Self {
            server,
            workers,
            leaves,
        }
    }

    /// Every holder: workers and leaves.
    pub fn holders(&self) -> Vec<u32> {
        let mut all = self.workers.clone();
        all.extend(self.leaves.iter().map(|(l, _)| *l));
        all
    }
}

/// A `workload conn-server NAME ADDR DEVICE`: a service listening on ADDR that starts one
/// worker (holding DEVICE) per accepted connection; returns once it listens.
pub fn spawn_conn_server(workload: &str, name: &str, addr: &str, device: &Path) -> Workload {
    let server = Workload::spawn(
        workload,
        &[
            "conn-server",
            name,
            addr,
            device.to_str().expect("utf-8 path"),
        ],
    );
    server.line("listening");
    server
}

/// A conn-server with two connections open, each served by a worker holding GPU memory
/// (100 MiB for `stay`, 200 MiB for `leave`, on device 0 of `device`, the fake's device line).
pub struct TwoConnections {
    pub server: Workload,
    pub stay: std::net::TcpStream,
    pub w_stay: u32,
    pub leave: std::net::TcpStream,
    pub w_leave: u32,
}

impl TwoConnections {
    pub fn open(gpu: &FakeGpu, device: &str, workload: &str, name: &str, addr: &str) -> Self {
        let server = spawn_conn_server(workload, name, addr, &gpu.device_file(0));
        let stay = std::net::TcpStream::connect(addr).expect("connect");
        let w_stay = next_worker(&server);
        let leave = std::net::TcpStream::connect(addr).expect("connect");
        let w_leave = next_worker(&server);
        gpu.set_state(&format!(
            "{device}\nproc 0 {w_stay} 100 compute\nproc 0 {w_leave} 200 compute\n"
        ));
        Self {
            server,
            stay,
            w_stay,
            leave,
            w_leave,
        }
    }
}

/// `reclaimctl --json ARGS` against the daemon of `gpu`'s config; it must succeed.
pub fn reclaimctl_json(gpu: &FakeGpu, args: &[&str]) -> Value {
    let out = Command::new(reclaimctl_bin())
        .arg("--socket")
        .arg(Daemon::api_socket(gpu))
        .arg("--json")
        .args(args)
        .output()
        .expect("run reclaimctl");
    assert!(
        out.status.success(),
        "reclaimctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// What `reclaimctl holders` says of `pid`, if it lists it.
pub fn holder_listed(gpu: &FakeGpu, pid: u32) -> Option<serde_json::Value> {
    let listed = reclaimctl_json(gpu, &["holders"]);
    listed["holders"]
        .as_array()?
        .iter()
        .find(|h| h["pid"] == pid)
        .cloned()
}

/// Waits until the daemon of `gpu`'s config lists every one of `pids` as a holder bound to a
/// service (and so has remembered its lineage in the ledger).
pub fn wait_until_bound(gpu: &FakeGpu, pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = reclaimctl_json(gpu, &["holders"]);
        let bound = |pid: u32| {
            listed["holders"].as_array().is_some_and(|hs| {
                hs.iter().any(|h| {
                    h["pid"] == pid && h["service"].as_str().is_some_and(|s| !s.is_empty())
                })
            })
        };
        if pids.iter().all(|p| bound(*p)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never all bound: {pids:?} in {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the next worker a conn-server reports.
pub fn next_worker(server: &Workload) -> u32 {
    server
        .line("worker")
        .split(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("worker pid")
}

/// The OTLP receiver (`tests/py/otlp_receiver.py`, "grpc" or "http") on a free port, ready:
/// its port, process, and output lines (one JSON object per span or metric).
pub fn start_receiver(mode: &str) -> (u16, Child, Receiver<String>) {
    let port = free_port();
    let mut receiver = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/otlp_receiver.py"))
        .args([mode, &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs opentelemetry-proto)");
    let (tx, rx) = channel::<String>();
    let out = receiver.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30))
            .expect("receiver ready"),
        "ready"
    );
    (port, receiver, rx)
}

/// Percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

// ---- Prometheus -------------------------------------------------------------------------

const PROMETHEUS_WAIT: Duration = Duration::from_secs(30);

/// A real Prometheus (Debian's package), stopped on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus scraping `target` every second.
pub fn prometheus(target: &str) -> Prometheus {
    let dir = TempDir::new("prometheus");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: reclaimd\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (cargo xtask setup installs Debian's package)");
    Prometheus {
        child,
        port,
        _dir: dir,
    }
}

impl Prometheus {
    /// An instant query's result vector, retried until `pred` holds.
    pub fn query_until(&self, promql: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            let r = ureq::get(&format!("http://127.0.0.1:{}/api/v1/query", self.port))
                .query("query", promql)
                .timeout(Duration::from_secs(5))
                .call();
            match r {
                Ok(resp) => {
                    let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
                    assert_eq!(v["status"], "success", "{promql}: {v}");
                    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
                    if pred(&result) {
                        return result;
                    }
                }
                // Prometheus answers 400 to a query it cannot parse: no point retrying.
                Err(ureq::Error::Status(400, resp)) => {
                    panic!("{promql}: {}", resp.into_string().unwrap_or_default())
                }
                Err(_) => {} // not up yet
            }
            assert!(Instant::now() < deadline, "{promql}: never as expected");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A daemon (enforce, grace 0, the `llm` service) that has reclaimed one 1 GiB worker of an
/// `llm-server` on device 0 (`device` is the fake's device line), with Prometheus-ready
/// metrics on `Daemon::metrics_port`.
pub fn daemon_after_a_reclaim(gpu: &FakeGpu, workload: &str, device: &str) -> Daemon {
    let daemon = Daemon::builder(gpu).service(llm_service());
    daemon_after_a_reclaim_with(gpu, workload, device, daemon).0
}

/// As `daemon_after_a_reclaim`, for a daemon configured by `daemon` (its services, e.g. a
/// `[telemetry]` table), set to enforce with grace 0; also returns the server's and the
/// worker's pids.
pub fn daemon_after_a_reclaim_with(
    gpu: &FakeGpu,
    workload: &str,
    device: &str,
    daemon: DaemonBuilder,
) -> (Daemon, u32, u32) {
    gpu.set_state(device);
    let d = daemon
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .start();
    let device_file = gpu.device_file(0);
    let (server, worker) = spawn_server(
        workload,
        "llm-server",
        device_file.to_str().expect("utf-8"),
        &[],
    );
    gpu.set_state(&format!("{device}\nproc 0 {worker} 1024 compute\n"));
    wait_until_bound(gpu, &[worker]);
    kill(server.pid());
    let r = wait_for_record(&d.ledger, worker, PROMETHEUS_WAIT);
    assert_eq!(r.outcome, reclaimd::ledger::Outcome::Reclaimed, "{r:#?}");
    let server_pid = server.pid();
    let _ = server.finish();
    (d, server_pid, worker)
}
