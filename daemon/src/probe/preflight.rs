//! Checks made before anything is loaded, so a host that cannot run reclaimd gets one clear
//! sentence instead of a syscall error from deep inside the loader.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use reclaimd_common::KernelOffsets;

use super::{ProbeError, btf::Btf};

/// Capability bits from `linux/capability.h`.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails unless the process may load tracing programs.
pub fn check_privileges() -> Result<(), ProbeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    Err(ProbeError::NotPermitted { uid })
}

/// The tracefs root (the directory holding `events/`), mounting tracefs where it is missing.
/// aya looks in the same two places.
pub fn tracefs_root() -> Result<PathBuf, ProbeError> {
    const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    if let Some(found) = CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
    {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(CANDIDATES[0]);
    mount_tracefs(target).map_err(|e| ProbeError::NoTracefs {
        reason: e.to_string(),
    })?;
    tracing::info!(path = %target.display(), "mounted tracefs");
    Ok(target.to_path_buf())
}

fn mount_tracefs(target: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let c = |s: &str| CString::new(s).map_err(std::io::Error::other);
    let target = c(&target.to_string_lossy())?;
    let (src, fstype) = (c("nodev")?, c("tracefs")?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Field offsets of one tracepoint record, from its `format` file.
pub struct Format(HashMap<String, u32>);

impl Format {
    pub fn read(
        tracefs: &Path,
        category: &'static str,
        name: &'static str,
        why: &'static str,
    ) -> Result<Self, ProbeError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = std::fs::read_to_string(&path).map_err(|_| ProbeError::MissingTracepoint {
            category,
            name,
            tracefs: tracefs.display().to_string(),
            why,
        })?;
        Ok(Self::parse(&text))
    }

    /// Lines look like `\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`.
    pub fn parse(text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let mut offset = None;
            for part in line.split(';').map(str::trim) {
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse::<u32>().ok();
                }
            }
            if let (Some(decl), Some(offset)) = (decl, offset) {
                // The name is the last identifier, before any array suffix.
                let name = decl
                    .rsplit(|c: char| c.is_whitespace() || c == '*')
                    .next()
                    .unwrap_or("")
                    .split('[')
                    .next()
                    .unwrap_or("");
                fields.insert(name.to_owned(), offset);
            }
        }
        Self(fields)
    }

    pub fn offset(&self, field: &str) -> Option<u32> {
        self.0.get(field).copied()
    }

    /// Fails unless `field` sits where the programs read it.
    pub fn expect(
        &self,
        tracepoint: &'static str,
        field: &'static str,
        expected: u32,
    ) -> Result<(), ProbeError> {
        let found = self.offset(field);
        if found == Some(expected) {
            Ok(())
        } else {
            Err(ProbeError::TracepointLayout {
                tracepoint,
                field,
                expected,
                found,
            })
        }
    }
}

/// Checks the records the programs read at fixed offsets, and returns what varies by kernel.
pub fn check_formats(tracefs: &Path) -> Result<u32, ProbeError> {
    let set_state = Format::read(
        tracefs,
        "sock",
        "inet_sock_set_state",
        "TCP session tracking",
    )?;
    for (field, off) in [
        ("skaddr", 8),
        ("oldstate", 16),
        ("newstate", 20),
        ("sport", 24),
        ("dport", 26),
        ("family", 28),
        ("protocol", 30),
        ("saddr", 32),
        ("daddr", 36),
        ("saddr_v6", 40),
        ("daddr_v6", 56),
    ] {
        set_state.expect("sock/inet_sock_set_state", field, off)?;
    }
    for name in ["sock_send_length", "sock_recv_length"] {
        Format::read(tracefs, "sock", name, "learning socket owners")?.expect(
            "sock/sock_{send,recv}_length",
            "sk",
            8,
        )?;
    }
    for name in ["sys_exit_accept4", "sys_exit_accept"] {
        Format::read(tracefs, "syscalls", name, "learning socket owners")?.expect(
            "syscalls/sys_exit_accept*",
            "ret",
            16,
        )?;
    }
    let exit = Format::read(tracefs, "sched", "sched_process_exit", "process deaths")?;
    // Linux < 6.16 has no group_dead: 0 tells the program to count leader exits instead.
    Ok(exit.offset("group_dead").unwrap_or(0))
}

/// Kernel structure offsets for the programs, from the kernel's BTF.
pub fn kernel_offsets(btf: &Btf, exit_group_dead: u32) -> Result<KernelOffsets, ProbeError> {
    Ok(KernelOffsets {
        valid: 1,
        task_pid: btf.member_offset("task_struct", "pid")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        task_exit_code: btf.member_offset("task_struct", "exit_code")?,
        task_real_parent: btf.member_offset("task_struct", "real_parent")?,
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdtable_max_fds: btf.member_offset("fdtable", "max_fds")?,
        fdtable_fd: btf.member_offset("fdtable", "fd")?,
        file_private_data: btf.member_offset("file", "private_data")?,
        socket_sk: btf.member_offset("socket", "sk")?,
        exit_group_dead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_format_fields() {
        let text = "name: inet_sock_set_state\nID: 1\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
            \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
            \nprint fmt: \"x\"\n";
        let f = Format::parse(text);
        assert_eq!(f.offset("skaddr"), Some(8));
        assert_eq!(f.offset("saddr_v6"), Some(40));
        assert_eq!(f.offset("parent_comm"), Some(8));
        assert_eq!(f.offset("common_type"), Some(0));
        assert_eq!(f.offset("print"), None);
        assert!(f.expect("t", "skaddr", 8).is_ok());
        assert!(matches!(
            f.expect("t", "skaddr", 16),
            Err(ProbeError::TracepointLayout { found: Some(8), .. })
        ));
    }
}
