//! The optional per-service hook, run before signalling with the session's facts in its
//! environment (e.g. to drain a worker or tell a scheduler). Its failure is recorded, and
//! the reclaim goes on: the hook informs, the policy decides.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Runs `hook` with `env`, waiting at most `timeout`. Returns a line for the ledger.
pub fn run(hook: &Path, env: &[(&str, String)], timeout: Duration) -> String {
    let mut cmd = Command::new(hook);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return format!("hook {} failed to start: {e}", hook.display()),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return "hook ok".to_owned(),
            Ok(Some(status)) => return format!("hook exited {status}"),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return format!("hook killed after {timeout:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return format!("hook wait failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_env_and_reports_status_and_timeout() {
        let dir = std::env::temp_dir().join(format!("reclaimd-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = dir.join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$RECLAIMD_PID\" > {}\nexit 3\n",
                out.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = run(
            &script,
            &[("RECLAIMD_PID", "42".into())],
            Duration::from_secs(5),
        );
        assert!(r.contains("exited"), "{r}");
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "42");

        std::fs::write(&script, "#!/bin/sh\nsleep 5\n").unwrap();
        let r = run(&script, &[], Duration::from_millis(100));
        assert!(r.contains("killed"), "{r}");
        let r = run(&dir.join("missing"), &[], Duration::from_millis(100));
        assert!(r.contains("failed to start"), "{r}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
