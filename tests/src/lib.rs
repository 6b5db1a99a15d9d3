//! Harness for the kernel integration tests: run `reclaimd trace --json`, trigger something
//! real in the kernel, expect the event (the trigger → expect pattern of Exein's pulsar).
//!
//! The programs see the whole machine, so tests pick out their own processes by pid. They
//! need root and run one at a time (`--test-threads=1`, as `cargo xtask test` does).
use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The daemon binary under test: `RECLAIMD_BIN`, else the one beside this test's target dir.
pub fn reclaimd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RECLAIMD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/reclaimd
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("reclaimd"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not built: run `cargo xtask test` (or `cargo build -p reclaimd` first)",
        bin.display()
    );
    bin
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
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line).expect("JSON line");
                assert_eq!(v["kind"], "ready", "first line is the ready line: {line}");
            }
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "reclaimd trace did not become ready: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
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
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("workload said nothing (waiting for {prefix}): {e:?}"));
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
            .trim()
            .to_owned()
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
