//! `cargo xtask`: set-up, build, run and test reclaimd, from a fresh machine on.
//!
//! Everything a test or build needs that cargo does not fetch by itself (toolchain
//! components, bpf-linker, Debian packages) is installed by `setup`, which every other
//! command runs first, and which is a fast no-op once all is there.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod vm;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, run and test reclaimd")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: rust-src, clippy, rustfmt, bpf-linker 0.13 linked
    /// against this toolchain's LLVM, and the Debian packages the build and tests use.
    Setup,
    /// Build the eBPF programs and the daemon (setup first).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `reclaimd` as root (through sudo when not root). Without ARGS it runs
    /// `reclaimd trace`, which streams the kernel events it sees.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for reclaimd, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Setup, lint (rustfmt, clippy), build, then every test: unit tests and the root-only
    /// kernel integration tests, which load the real programs into this kernel; then the
    /// kernel matrix: Debian's 5.10, 6.1 and 6.12 kernels booted in VMs (QEMU, virtme-ng),
    /// each running the kernel-event, reclaim end-to-end, thread-group and heartbeat tests.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// The kernels to test on, comma-separated: `host` (this machine's kernel: every
        /// test) and any of 5.10, 6.1, 6.12 (in a VM: the kernel tests). For example
        /// `--kernels 6.1` runs the 6.1 VM alone.
        #[arg(long, value_delimiter = ',', default_value = "host,5.10,6.1,6.12",
              value_parser = ["host", "5.10", "6.1", "6.12"])]
        kernels: Vec<String>,
        /// Run the VMs with KVM instead of TCG (software emulation, the default: nested KVM
        /// is unusable on many CI machines).
        #[arg(long)]
        kvm: bool,
    },
    /// rustfmt check and clippy with warnings denied, the eBPF crate included.
    Lint,
    /// Build, then run reclaimd (enforce) with the fake NVML and a synthetic GPU service that
    /// crashes and leaks workers at random, so anyone without a GPU can watch it work.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Build (release), then measure as root, side by side with peer tools (a polling
    /// reaper, libbpf-tools exitsnoop and tcplife, wrk): time-to-reclaim, exit and
    /// socket-close detection, overhead on a served workload, CPU, memory and drops.
    /// Report (Markdown) and raw samples (CSV) under target/bench/.
    Bench {
        /// End-to-end reclaims to time (default 300; 20 with --quick).
        #[arg(long)]
        runs: Option<usize>,
        /// Runs of the polling reaper, about 1 s each (default 30; 5 with --quick).
        #[arg(long)]
        peer_runs: Option<usize>,
        /// Live sessions (connections, then processes) for the memory measurement
        /// (default 10000; 1000 with --quick).
        #[arg(long)]
        sessions: Option<usize>,
        /// Connection sessions churned for the memory-after-churn measurement
        /// (default 1000000; 20000 with --quick).
        #[arg(long)]
        cycles: Option<usize>,
        /// A short smoke version of every measurement.
        #[arg(long)]
        quick: bool,
        /// Measure reclaimd only, no peer tools.
        #[arg(long)]
        skip_peers: bool,
        /// Only these sections, comma-separated: core, rest, burst, exits, serve, churn, cost, drops.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Build (release), then soak as root: churn of process and connection sessions with
    /// reclaims (enforce, grace 0) beside holders that must never be touched; samples the
    /// daemon's RSS, open fds and threads every 30 s. Fails on any wrong kill, any orphan
    /// left, or growth of RSS or fds. Report and samples under target/soak/.
    Soak {
        /// How long to churn.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// Process sessions and connection sessions started (and ended) per second, each.
        #[arg(long, default_value_t = 2)]
        rate: u64,
    },
}

/// Debian packages the build and tests need: a C toolchain (linking, -sys crates), a real
/// Prometheus for the metrics tests, systemd for `systemd-analyze` (the unit's offline
/// checks), util-linux (unshare, setpriv) and iproute2 for the network-namespace tests.
const DEBIAN_PACKAGES: &[&str] = &[
    "gcc",
    "libc6-dev",
    "prometheus",
    "systemd",
    "util-linux",
    "iproute2",
];
/// The Debian packages only `cargo xtask bench` needs, the peers it compares with:
/// exitsnoop and tcplife (libbpf-tools), and wrk for the served-workload overhead.
const BENCH_PACKAGES: &[&str] = &["libbpf-tools", "wrk"];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup(&root),
        Cmd::Build { release } => {
            setup(&root)?;
            build(&root, release)
        }
        Cmd::Run { release, args } => {
            setup(&root)?;
            build(&root, release)?;
            run(&root, release, args)
        }
        Cmd::Test {
            no_lint,
            kernels,
            kvm,
        } => {
            setup(&root)?;
            let vms: Vec<&vm::Kernel> = kernels.iter().filter_map(|k| vm::kernel(k)).collect();
            if !vms.is_empty() {
                vm::setup()?;
            }
            if !no_lint {
                lint(&root)?;
            }
            build(&root, false)?;
            let host = if kernels.iter().any(|k| k == "host") {
                Some(test())
            } else {
                None
            };
            let matrix = matrix(&root, &vms, kvm);
            if let Some(host) = host {
                host?;
            }
            matrix
        }
        Cmd::Lint => {
            setup(&root)?;
            lint(&root)
        }
        Cmd::Soak { minutes, rate } => {
            setup(&root)?;
            build(&root, true)?;
            step("soak");
            run_cmd(
                as_root(&root.join("target/release/soak"))
                    .args(["--minutes", &minutes.to_string()])
                    .args(["--rate", &rate.to_string()])
                    .args(["--out".as_ref(), root.join("target/soak").as_os_str()])
                    .env("FAKE_NVML_LIB", root.join("target/release/libnvidia_ml.so")),
            )
        }
        Cmd::Demo { seconds } => {
            setup(&root)?;
            build(&root, false)?;
            demo(&root, seconds)
        }
        Cmd::Bench {
            runs,
            peer_runs,
            sessions,
            cycles,
            quick,
            skip_peers,
            only,
        } => {
            setup(&root)?;
            bench_packages()?;
            build(&root, true)?;
            step("bench");
            let mut c = as_root(&root.join("target/release/bench"));
            for (flag, value) in [
                ("--runs", runs),
                ("--peer-runs", peer_runs),
                ("--sessions", sessions),
                ("--cycles", cycles),
            ] {
                if let Some(v) = value {
                    c.args([flag, &v.to_string()]);
                }
            }
            if quick {
                c.arg("--quick");
            }
            if skip_peers {
                c.arg("--skip-peers");
            }
            if !only.is_empty() {
                c.args(["--only", &only.join(",")]);
            }
            run_cmd(
                c.args(["--out".as_ref(), root.join("target/bench").as_os_str()])
                    .env("FAKE_NVML_LIB", root.join("target/release/libnvidia_ml.so")),
            )
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// Runs `cmd`, failing with its command line when it fails.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as root: as is when root, else through `sudo -E`.
fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(program);
        c
    }
}

// ---- setup -------------------------------------------------------------------------------

fn setup(root: &Path) -> Result<()> {
    rust_components()?;
    bpf_linker(root)?;
    debian_packages()?;
    python_packages()?;
    Ok(())
}

/// The generic gRPC client the API tests use and the OTLP receiver the trace tests use
/// (grpcio and opentelemetry-proto: not our code, so they prove interoperability).
const PYTHON_PACKAGES: &[&str] = &[
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "opentelemetry-proto",
    "kubernetes-validate==1.37.0",
];

fn python_packages() -> Result<()> {
    let have = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_health.v1, grpc_reflection.v1alpha, \
             opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc, kubernetes_validate",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    if !Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        step("apt-get install python3 python3-pip");
        let apt = Path::new("apt-get");
        run_cmd(as_root(apt).arg("update").arg("-q"))?;
        run_cmd(
            as_root(apt)
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(["python3", "python3-pip"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    pip_install(PYTHON_PACKAGES)
}

fn pip_install(packages: &[&str]) -> Result<()> {
    step(&format!("pip install {}", packages.join(" ")));
    run_cmd(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            // Debian's own python refuses global installs unless told; pyenv's ignores this.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(packages),
    )
}

fn rust_components() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    let missing: Vec<&str> = ["rust-src", "clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if !missing.is_empty() {
        step(&format!("rustup component add {}", missing.join(" ")));
        run_cmd(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&missing),
        )?;
    }
    Ok(())
}

fn sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(
        output(Command::new("rustc").args(["--print", "sysroot"]))?.trim(),
    ))
}

/// bpf-linker must use the LLVM of the toolchain that emits the bitcode; no Debian package
/// has LLVM 22, so it links against the toolchain's own libLLVM.
fn bpf_linker(root: &Path) -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    let sysroot = sysroot()?;
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    let prefix = root.join("target/xtask/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against {}",
        llvm.display()
    ));
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
            )
            // Outside the workspace, so its config and lockfile play no part.
            .current_dir(std::env::temp_dir()),
    )
}

fn bench_packages() -> Result<()> {
    apt_install(BENCH_PACKAGES)
}

fn debian_packages() -> Result<()> {
    apt_install(DEBIAN_PACKAGES)
}

/// `apt-get install` of those of `packages` not installed yet (nothing when all are).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("apt-get install {}", missing.join(" ")));
    let apt = Path::new("apt-get");
    run_cmd(as_root(apt).arg("update").arg("-q"))?;
    run_cmd(
        as_root(apt)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

// ---- build, run, lint, test ----------------------------------------------------------------

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the default members: the daemon (whose build script builds the eBPF programs),
/// the test workloads and the fake NVML library, which is then put where a driver's would
/// be named: target/fake-nvml/libnvidia-ml.so.1.
fn build(root: &Path, release: bool) -> Result<()> {
    step("cargo build");
    let mut c = cargo();
    c.arg("build");
    if release {
        c.arg("--release");
    }
    run_cmd(&mut c)?;
    let profile = if release { "release" } else { "debug" };
    let built = root.join("target").join(profile).join("libnvidia_ml.so");
    let dir = root.join("target/fake-nvml");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&built, dir.join("libnvidia-ml.so.1"))
        .with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}

fn run(root: &Path, release: bool, args: Vec<OsString>) -> Result<()> {
    let profile = if release { "release" } else { "debug" };
    let bin = root.join("target").join(profile).join("reclaimd");
    let args = if args.is_empty() {
        daemon_args(root, profile)?
    } else {
        args
    };
    run_cmd(as_root(&bin).args(args))
}

/// `reclaimd run` as a newcomer wants it: the installed config when there is one, else the
/// shipped one (report mode: nothing is signalled) with its ledger and socket under
/// `target/run`, so nothing is written outside the checkout.
fn daemon_args(root: &Path, profile: &str) -> Result<Vec<OsString>> {
    if Path::new("/etc/reclaimd/config.toml").exists() {
        step("reclaimd run with /etc/reclaimd/config.toml");
        return Ok(vec!["run".into()]);
    }
    let dir = root.join("target/run");
    std::fs::create_dir_all(&dir)?;
    let ledger = dir.join("ledger.db");
    let socket = dir.join("reclaimd.sock");
    let mut text = std::fs::read_to_string(root.join("deploy/config.toml"))?;
    for (line, path) in [
        ("path = \"/var/lib/reclaimd/ledger.db\"", &ledger),
        ("socket = \"/run/reclaimd/reclaimd.sock\"", &socket),
    ] {
        anyhow::ensure!(
            text.contains(line),
            "deploy/config.toml no longer has the line {line}"
        );
        text = text.replace(
            line,
            &line.replacen(
                line.split('"').nth(1).unwrap_or_default(),
                &path.display().to_string(),
                1,
            ),
        );
    }
    let config = dir.join("config.toml");
    std::fs::write(&config, text)?;
    step(&format!(
        "reclaimd run (report mode: nothing is signalled) on deploy/config.toml, its ledger \
         and socket under {dir}; in another terminal:\n  \
         target/{profile}/reclaimctl --socket {sock} status\n  \
         target/{profile}/reclaimctl --socket {sock} holders\n\
         (cargo xtask run -- trace: the kernel events instead; Ctrl-C stops)",
        dir = dir.display(),
        sock = socket.display(),
    ));
    Ok(vec!["run".into(), "--config".into(), config.into()])
}

/// The demo: everything under target/demo, the daemon as root, the service as is.
fn demo(root: &Path, seconds: Option<u64>) -> Result<()> {
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dev"))?;
    let device_file = dir.join("dev/nvidia0");
    std::fs::write(&device_file, "")?;
    let device_line = "device 0 GPU-demo-0000 81920 Demo H100 80GB (fake)";
    let lib = root.join("target/fake-nvml/libnvidia-ml.so.1");
    // The fake reads `<library>.state`: a copy of the library beside the demo's state.
    let demo_lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(&lib, &demo_lib)?;
    let state = dir.join("libnvidia-ml.so.1.state");
    std::fs::write(&state, format!("{device_line}\n"))?;
    let socket = dir.join("reclaimd.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "# The demo's configuration (cargo xtask demo).\n\
             [policy]\nmode = \"enforce\"\ngrace = \"2s\"\nterm_grace = \"1s\"\nsweep = \"1s\"\n\n\
             [gpu]\nnvml_library = \"{}\"\ndevice_glob = \"{}/dev/nvidia*\"\n\n\
             [ledger]\npath = \"{}/ledger.db\"\n\n[api]\nsocket = \"{}\"\n\n\
             [[service]]\nname = \"demo-llm\"\nmatch = {{ comm = [\"demo-llm\"] }}\n",
            demo_lib.display(),
            dir.display(),
            dir.display(),
            socket.display()
        ),
    )?;
    let mut daemon = as_root(&root.join("target/debug/reclaimd"))
        .args(["run", "--config"])
        .arg(&config)
        .spawn()
        .context("starting reclaimd")?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut service = Command::new(root.join("target/debug/workload"))
        .arg("demo-service")
        .arg(&state)
        .arg(device_line)
        .arg(&device_file)
        .spawn()
        .context("starting the demo service")?;
    let ctl = root.join("target/debug/reclaimctl");
    eprintln!(
        "\nxtask: the demo runs. In another terminal:\n\
         \x20 sudo {ctl} --socket {sock} watch          # deaths, verdicts, reclaims as they happen\n\
         \x20 sudo {ctl} --socket {sock} holders\n\
         \x20 sudo {ctl} --socket {sock} reclaims\n\
         \x20 curl -s http://127.0.0.1:9464/metrics | grep ^reclaimd_\n\
         \x20 cd dashboards && docker compose up          # Grafana on http://localhost:3000\n",
        ctl = ctl.display(),
        sock = socket.display()
    );
    match seconds {
        Some(s) => std::thread::sleep(std::time::Duration::from_secs(s)),
        // Ctrl-C reaches the whole foreground group: the daemon and the service stop too.
        None => {
            let _ = daemon.wait();
        }
    }
    let _ = service.kill();
    let _ = service.wait();
    // SAFETY: signalling the daemon we started (through sudo when not root: sudo relays it).
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    Ok(())
}

fn lint(root: &Path) -> Result<()> {
    step("cargo fmt --check");
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy");
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate only builds for the bpf target; for the host it is checked with the
    // panic strategy and the unstable-feature switch it has there (RUSTC_BOOTSTRAP, set by
    // the daemon's build script for `-Z build-std`: the programs use an atomic intrinsic),
    // in a target dir of its own so flags do not collide.
    step("cargo clippy (eBPF crate)");
    run_cmd(
        cargo()
            .args(["clippy", "-p", "reclaimd-ebpf", "--", "-D", "warnings"])
            .env("RUSTFLAGS", "-C panic=abort")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", root.join("target/clippy-ebpf")),
    )
}

/// Every test of the default members. The kernel tests share the kernel's state, so one
/// test thread; they need root, so a non-root user runs the test binaries through sudo.
/// Ends with one line totalling every test binary's result.
fn test() -> Result<()> {
    step("cargo test");
    let mut c = cargo();
    c.args(["test", "--no-fail-fast", "--", "--test-threads=1"]);
    // The real-driver GPU tests are ignored unless this machine has an NVIDIA driver.
    if Path::new("/proc/driver/nvidia/version").exists() {
        step("NVIDIA driver found: including the real-driver GPU tests");
        c.arg("--include-ignored");
    }
    if !is_root() {
        let host = output(Command::new("rustc").arg("-vV"))?
            .lines()
            .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
            .context("rustc -vV has no host line")?;
        let var = format!(
            "CARGO_TARGET_{}_RUNNER",
            host.to_uppercase().replace('-', "_")
        );
        c.env(var, "sudo -E");
    }
    c.stdout(std::process::Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("cannot start {c:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    println!("xtask: {} passed, {} failed", totals.passed, totals.failed);
    if !status.success() || totals.failed > 0 {
        bail!("tests failed ({status})");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Runs the kernel tests in a VM per kernel of `vms`, one after the other (TCG takes both
/// cores), and sums up; fails when any kernel failed.
fn matrix(root: &Path, vms: &[&vm::Kernel], kvm: bool) -> Result<()> {
    if vms.is_empty() {
        return Ok(());
    }
    let binaries = vm::test_binaries()?;
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for k in vms {
        let outcome = vm::image(root, k).and_then(|image| vm::run(root, k, &image, &binaries, kvm));
        match outcome {
            Ok(o) => {
                summary.push(format!(
                    "xtask: kernel {} ({}): {} passed, {} failed in {:.0} s",
                    k.name,
                    if kvm { "KVM" } else { "TCG" },
                    o.totals.passed,
                    o.totals.failed,
                    o.took.as_secs_f64()
                ));
                if !o.ok {
                    failed.push(k.name);
                }
            }
            Err(e) => {
                summary.push(format!("xtask: kernel {}: could not run: {e:#}", k.name));
                failed.push(k.name);
            }
        }
    }
    for line in &summary {
        println!("{line}");
    }
    if !failed.is_empty() {
        bail!("kernel tests failed on {}", failed.join(", "));
    }
    Ok(())
}

#[derive(Default, Debug, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    /// Adds a libtest closing line: `test result: ok. 10 passed; 0 failed; 0 ignored; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn totals_sum_libtest_closing_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 10 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("test result: FAILED. 12 passed; 1 failed; 0 ignored; 0 measured");
        t.add("test foo ... ok");
        t.add("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 22,
                failed: 1
            }
        );
    }
}
