//! The kernel matrix: Debian's own kernels that GPU hosts run, booted in VMs (QEMU through
//! virtme-ng, with this machine's file system as the guest's root), each running the kernel
//! tests that load reclaimd's programs, as aya's `integration-test vm` and kunai's CI do.
//!
//! Kernels come from Debian's archive as packages (through an apt state of our own under
//! target/vm/apt, so the host's apt configuration is left alone), unpacked under
//! target/vm/kernels/NAME, where virtme-ng finds their modules beside the image.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Totals, apt_install, output, pip_install, run_cmd, step};

/// One kernel of the matrix: the Debian suite that carries it and the metapackage that
/// names its current build (the archive keeps only the newest of each series).
pub struct Kernel {
    pub name: &'static str,
    suite: &'static str,
    meta: &'static str,
}

/// Debian 11's 5.10, Debian 12's 6.1, and 6.12 (Debian 12's newer series, as Debian 13
/// ships): the span of Ubuntu 22.04/24.04 and RHEL 9 (5.14–6.8) lies within.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        suite: "bullseye",
        meta: "linux-image-amd64",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        meta: "linux-image-amd64",
    },
    Kernel {
        name: "6.12",
        suite: "bookworm",
        meta: "linux-image-6.12-amd64",
    },
];

/// The test binaries run in each VM: the kernel events, the reclaim end to end, the
/// thread-group liveness tests (eBPF and fallback), and the heartbeat (the socket error
/// read at CLOSE through BTF offsets, keepalive in each kernel's TCP stack).
pub const TESTS: [&str; 4] = ["kernel_events", "reclaim_e2e", "thread_group", "heartbeat"];

/// What booting a Debian kernel with the host's file system needs: QEMU, busybox for the
/// guest's initramfs, depmod for the unpacked modules, udev (without it virtme-ng's init
/// cannot find its console ports and the guest's output is lost), `file` to read a kernel
/// image's version, and Debian's archive keys for the suites we fetch from.
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "udev",
    "file",
    "debian-archive-keyring",
];
const VIRTME_NG: &str = "virtme-ng==1.42";

/// How long one kernel's tests may take under TCG before the VM is stopped.
const VM_LIMIT: Duration = Duration::from_secs(25 * 60);

pub fn kernel(name: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.name == name)
}

/// Installs what the VMs need (a no-op once there).
pub fn setup() -> Result<()> {
    apt_install(VM_PACKAGES)?;
    let have = Command::new("python3")
        .args(["-c", "import virtme_ng.run"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        pip_install(&[VIRTME_NG])?;
    }
    Ok(())
}

/// The kernel image of `k`, fetched and unpacked the first time.
pub fn image(root: &Path, k: &Kernel) -> Result<PathBuf> {
    let dir = root.join("target/vm/kernels").join(k.name);
    if let Some(found) = vmlinuz_in(&dir) {
        return Ok(found);
    }
    let apt = Apt::new(root, k.suite)?;
    apt.update()?;
    let package = apt.depends(k.meta)?;
    step(&format!("downloading {package} ({})", k.suite));
    let deb = apt.download(&package)?;
    let unpacking = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&unpacking);
    std::fs::create_dir_all(&unpacking)?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&unpacking, &dir)?;
    let _ = std::fs::remove_file(&deb);
    vmlinuz_in(&dir).with_context(|| format!("{package} has no boot/vmlinuz-*"))
}

fn vmlinuz_in(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// apt with a state of its own for one suite: sources, lists and cache under target/vm/apt.
struct Apt {
    dir: PathBuf,
    options: Vec<String>,
}

impl Apt {
    fn new(root: &Path, suite: &str) -> Result<Self> {
        let dir = root.join("target/vm/apt").join(suite);
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let keys = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
        std::fs::write(
            dir.join("sources.list"),
            format!(
                "deb [{keys}] http://deb.debian.org/debian {suite} main\n\
                 deb [{keys}] http://deb.debian.org/debian-security {suite}-security main\n"
            ),
        )?;
        let d = dir.display();
        let options = [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/nonexistent".to_owned(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::State::Status=/dev/null".to_owned(),
            "Debug::NoLocking=1".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect();
        Ok(Self { dir, options })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(&self.options);
        c
    }

    fn update(&self) -> Result<()> {
        run_cmd(self.command("apt-get").args(["update", "-q"]))
    }

    /// The package a metapackage depends on (`linux-image-amd64` → `linux-image-6.1.0-N-amd64`).
    fn depends(&self, meta: &str) -> Result<String> {
        let text = output(self.command("apt-cache").args(["depends", meta]))?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
            .with_context(|| format!("apt-cache depends {meta} names no kernel image:\n{text}"))
    }

    fn download(&self, package: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        run_cmd(
            self.command("apt-get")
                .args(["download", "-q", package])
                .current_dir(&debs),
        )?;
        std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }
}

/// The paths of the test binaries named in [`TESTS`], built for the host (they run in the
/// guest from the same file system).
///
/// The build is the host run's own (`cargo test`, every default member), so after it nothing
/// is compiled again: `-p reclaimd-tests` alone would unify dependency features differently and
/// rebuild the daemon and every binary of the tests package. The compiler's messages go to
/// stderr rendered, so a failed build says why (JSON on stdout would hide them).
pub fn test_binaries() -> Result<Vec<PathBuf>> {
    let mut c = crate::cargo();
    c.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    c.stderr(std::process::Stdio::inherit());
    let text = output(&mut c)?;
    let mut found = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default();
        let integration_test = v["target"]["kind"][0] == "test";
        if v["reason"] == "compiler-artifact"
            && integration_test
            && TESTS.contains(&name)
            && let Some(exe) = v["executable"].as_str()
        {
            found.push(PathBuf::from(exe));
        }
    }
    if found.len() != TESTS.len() {
        bail!("cargo built {found:?}, expected the test binaries {TESTS:?}");
    }
    Ok(found)
}

/// What one kernel's run gave.
pub struct Outcome {
    pub totals: Totals,
    pub ok: bool,
    pub took: Duration,
}

/// Boots `image` and runs `binaries` in it, one test at a time, as root; its output streams
/// through. `kvm`: hardware virtualisation instead of TCG.
pub fn run(
    root: &Path,
    k: &Kernel,
    image: &Path,
    binaries: &[PathBuf],
    kvm: bool,
) -> Result<Outcome> {
    let out = root.join("target/vm/run").join(k.name);
    std::fs::create_dir_all(&out)?;
    let script = out.join("guest.sh");
    std::fs::write(
        &script,
        guest_script(&root.join("target/debug/reclaimd"), binaries),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    step(&format!(
        "kernel {} in a VM ({}): {}",
        k.name,
        if kvm { "KVM" } else { "TCG, no KVM" },
        image.display()
    ));
    let started = Instant::now();
    let mut vm = boot(root, k, image, &script, kvm, false)?;
    if !vm.booted {
        // The guest died before its script began (seen once in a few dozen TCG boots, with
        // no word on the hidden console): not a test result. Once more, console shown.
        eprintln!(
            "xtask: kernel {}: the VM ended ({}) before its script started; booting it again \
             with its console shown",
            k.name, vm.status
        );
        vm = boot(root, k, image, &script, kvm, true)?;
    }
    let took = started.elapsed();
    Ok(Outcome {
        ok: vm.status.success() && vm.totals.failed == 0 && vm.totals.passed > 0,
        totals: vm.totals,
        took,
    })
}

/// One boot of the guest running `script`.
struct Boot {
    totals: Totals,
    status: std::process::ExitStatus,
    /// Whether the guest's script said it started.
    booted: bool,
}

/// The line the guest's script starts with.
const GUEST_STARTED: &str = "xtask: guest kernel";

fn boot(
    root: &Path,
    k: &Kernel,
    image: &Path,
    script: &Path,
    kvm: bool,
    console: bool,
) -> Result<Boot> {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import sys; sys.argv[0] = 'vng'; from virtme_ng.run import main; sys.exit(main())",
    ]);
    if !kvm {
        c.arg("--disable-kvm");
    }
    if console {
        c.arg("--verbose");
    }
    c.args(["--user", "root", "--cpus", "2", "--memory", "2G"])
        .arg("--cwd")
        .arg(root)
        .arg("-r")
        .arg(image)
        .arg("--")
        .arg(script)
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A group of its own, so a VM that hangs goes with QEMU and everything it started.
    use std::os::unix::process::CommandExt as _;
    c.process_group(0);
    let mut child = c.spawn().context("starting virtme-ng (vng)")?;
    let stdout = child.stdout.take().context("vng stdout")?;
    let stderr = child.stderr.take().context("vng stderr")?;
    let name = k.name;
    let errors = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if let Some(line) = printable(&line) {
                eprintln!("[{name}] {line}");
            }
        }
    });
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(VM_LIMIT).is_err() {
            eprintln!("xtask: the VM ran past {VM_LIMIT:?}: stopped");
            // SAFETY: a signal to the process group we created, which is not reaped yet
            // (the main thread waits for this thread before it reaps), so not reused.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    });
    let mut totals = Totals::default();
    let mut booted = false;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let Some(line) = printable(&line?) else {
            continue;
        };
        println!("[{}] {line}", k.name);
        booted |= line.starts_with(GUEST_STARTED);
        totals.add(&line);
    }
    let _ = done.send(());
    let _ = watchdog.join();
    let _ = errors.join();
    Ok(Boot {
        totals,
        status: child.wait()?,
        booted,
    })
}

/// A line of the guest's console without the NULs and control bytes QEMU's serial ports
/// pad it with; `None` when nothing is left.
fn printable(line: &str) -> Option<String> {
    let kept: String = line
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect();
    (!kept.trim().is_empty()).then_some(kept)
}

/// The guest's script: a tmpfs for the tests' files (SQLite's WAL cannot map its index on
/// the guest's 9p root), the capabilities `reclaimd trace` finds (its ready line), then each
/// test binary, one test at a time.
fn guest_script(reclaimd: &Path, binaries: &[PathBuf]) -> String {
    let mut s = format!(
        "#!/bin/sh\n\
         # Written by cargo xtask test: runs inside the VM.\n\
         set -u\n\
         echo \"{GUEST_STARTED} $(uname -r)\"\n\
         mkdir -p /run/reclaimd-tests\n\
         mount -t tmpfs -o size=1g reclaimd-tests /run/reclaimd-tests || exit 2\n\
         export TMPDIR=/run/reclaimd-tests\n\
         rc=0\n",
    );
    s.push_str(&format!(
        "echo \"xtask: capabilities $(timeout -s INT 20 {} trace --json 2>/dev/null | head -n 1)\"\n",
        reclaimd.display()
    ));
    for b in binaries {
        s.push_str(&format!(
            "echo \"xtask: {b}\"\n{b} --test-threads=1 --show-output || rc=1\n",
            b = b.display()
        ));
    }
    s.push_str("exit $rc\n");
    s
}
