//! Checks made before anything is loaded, so a host that cannot run reclaimd gets one clear
//! sentence instead of a syscall error from deep inside the loader.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use reclaimd_common::{KernelOffsets, exit_filter, layout};

use super::{
    ProbeError,
    btf::Btf,
    capability::{Capability, ExitFilter},
};

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

/// What this kernel offers each capability: the structure offsets for the programs, and per
/// capability either how it will run (a detail, often empty) or why it cannot.
#[derive(Debug)]
pub struct Plan {
    pub offsets: KernelOffsets,
    pub ready: Vec<(Capability, String)>,
    pub missing: Vec<(Capability, String)>,
}

/// Checks, capability by capability, the tracepoints, record layouts and structure members
/// its programs use. Nothing is loaded here; a capability that fails a check is left out.
pub fn plan(tracefs: &Path, btf: &Btf, filter: ExitFilter) -> Plan {
    let mut offsets = KernelOffsets::zeroed();
    offsets.valid = 1;
    let mut plan = Plan {
        offsets,
        ready: Vec::new(),
        missing: Vec::new(),
    };
    for cap in Capability::ALL {
        let checked = match cap {
            Capability::Exit => exit(tracefs, btf, filter, &mut plan.offsets),
            Capability::Fork => fork(btf, &mut plan.offsets),
            Capability::Tcp => tcp(tracefs, btf, &mut plan.offsets),
            Capability::OwnerAccept => {
                after_tcp(&plan).and_then(|()| accept(tracefs, btf, &mut plan.offsets))
            }
            Capability::OwnerIo => {
                after_tcp(&plan).and_then(|()| io(tracefs, btf, &mut plan.offsets))
            }
        };
        match checked {
            Ok(detail) => plan.ready.push((cap, detail)),
            Err(why) => plan.missing.push((cap, why)),
        }
    }
    plan
}

/// The owner programs only act on sockets the TCP program tracks.
fn after_tcp(plan: &Plan) -> Result<(), String> {
    if plan.ready.iter().any(|(c, _)| *c == Capability::Tcp) {
        Ok(())
    } else {
        Err("needs the tcp capability".to_owned())
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn exit(
    tracefs: &Path,
    btf: &Btf,
    filter: ExitFilter,
    o: &mut KernelOffsets,
) -> Result<String, String> {
    let format =
        Format::read(tracefs, "sched", "sched_process_exit", "process deaths").map_err(text)?;
    o.task_exit_code = btf
        .member_offset("task_struct", "exit_code")
        .map_err(text)?;
    let group_dead = format.offset("group_dead");
    match (filter, group_dead) {
        (ExitFilter::Auto | ExitFilter::GroupDead, Some(at)) => {
            o.exit_filter = exit_filter::GROUP_DEAD;
            o.exit_group_dead = at;
            Ok("group_dead".to_owned())
        }
        (ExitFilter::GroupDead, None) => {
            Err("sched/sched_process_exit has no group_dead field (added in Linux 6.16)".to_owned())
        }
        (ExitFilter::Auto | ExitFilter::SignalLive, _) => {
            o.task_signal = btf.member_offset("task_struct", "signal").map_err(text)?;
            o.signal_live = btf.member_offset("signal_struct", "live").map_err(text)?;
            o.task_group_leader = btf
                .member_offset("task_struct", "group_leader")
                .map_err(text)?;
            o.task_start_time = btf
                .member_offset("task_struct", "start_time")
                .map_err(text)?;
            o.exit_filter = exit_filter::SIGNAL_LIVE;
            Ok("signal->live".to_owned())
        }
    }
}

fn fork(btf: &Btf, o: &mut KernelOffsets) -> Result<String, String> {
    o.task_pid = btf.member_offset("task_struct", "pid").map_err(text)?;
    o.task_tgid = btf.member_offset("task_struct", "tgid").map_err(text)?;
    o.task_real_parent = btf
        .member_offset("task_struct", "real_parent")
        .map_err(text)?;
    // The parent's start in the fork record: optional (named start_boottime since Linux
    // 5.5); without it, a parent killed before user space reads /proc loses its name.
    o.task_group_leader = btf
        .member_offset("task_struct", "group_leader")
        .map_err(text)?;
    Ok(optional_offset(
        btf,
        ("task_struct", "start_boottime"),
        &mut o.task_start_boottime,
        |e| format!("without the parent's start time ({e})"),
    ))
}

/// An offset a capability works without: filled in when this kernel's BTF has the member,
/// else left 0, and the capability's detail is what `without` makes of the error.
fn optional_offset(
    btf: &Btf,
    (ty, member): (&str, &str),
    slot: &mut u32,
    without: impl FnOnce(String) -> String,
) -> String {
    optional(btf.member_offset(ty, member).map_err(text), slot, without)
}

/// As [`optional_offset`], for an offset already looked up (or summed from several).
fn optional(
    found: Result<u32, String>,
    slot: &mut u32,
    without: impl FnOnce(String) -> String,
) -> String {
    match found {
        Ok(at) => {
            *slot = at;
            String::new()
        }
        Err(e) => without(e),
    }
}

fn tcp(tracefs: &Path, btf: &Btf, o: &mut KernelOffsets) -> Result<String, String> {
    let f = Format::read(
        tracefs,
        "sock",
        "inet_sock_set_state",
        "TCP session tracking",
    )
    .map_err(text)?;
    for (field, off) in layout::set_state::FIELDS {
        f.expect("sock/inet_sock_set_state", field, off)
            .map_err(text)?;
    }
    // Without it the capability still works; heartbeat timeouts then read as closes.
    Ok(optional_offset(
        btf,
        ("sock", "sk_err"),
        &mut o.sock_sk_err,
        |e| format!("no close errors ({e}): timeouts read as closes"),
    ))
}

fn accept(tracefs: &Path, btf: &Btf, o: &mut KernelOffsets) -> Result<String, String> {
    for name in ["sys_exit_accept4", "sys_exit_accept"] {
        Format::read(
            tracefs,
            "syscalls",
            name,
            "learning socket owners at accept",
        )
        .and_then(|f| f.expect("syscalls/sys_exit_accept*", "ret", layout::SYS_EXIT_RET))
        .map_err(text)?;
    }
    o.task_files = btf.member_offset("task_struct", "files").map_err(text)?;
    o.files_fdt = btf.member_offset("files_struct", "fdt").map_err(text)?;
    o.fdtable_max_fds = btf.member_offset("fdtable", "max_fds").map_err(text)?;
    o.fdtable_fd = btf.member_offset("fdtable", "fd").map_err(text)?;
    o.file_private_data = btf.member_offset("file", "private_data").map_err(text)?;
    o.socket_sk = btf.member_offset("socket", "sk").map_err(text)?;
    Ok(String::new())
}

fn io(tracefs: &Path, btf: &Btf, o: &mut KernelOffsets) -> Result<String, String> {
    for name in ["sock_send_length", "sock_recv_length"] {
        Format::read(
            tracefs,
            "sock",
            name,
            "learning socket owners from their I/O (added in Linux 6.3)",
        )
        .and_then(|f| {
            f.expect("sock/sock_{send,recv}_length", "sk", layout::SOCK_LENGTH_SK)?;
            f.expect(
                "sock/sock_{send,recv}_length",
                "protocol",
                layout::SOCK_LENGTH_PROTOCOL,
            )
        })
        .map_err(text)?;
    }
    // The local port, so that the host's other sockets' I/O skips the map lookup; without
    // it the capability still works, at a lookup per send and receive.
    let num = btf
        .member_offset("sock", "__sk_common")
        .and_then(|common| Ok(common + btf.member_offset("sock_common", "skc_num")?));
    Ok(optional(num.map_err(text), &mut o.sock_num, |e| {
        format!("every TCP send and receive looked up ({e})")
    }))
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

    #[test]
    fn this_kernels_plan_gives_the_io_programs_the_local_port() {
        // The kernel's socket: `skc_num` follows `skc_dport` in `skc_portpair`, and struct
        // sock begins with its `sock_common`.
        let btf = Btf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let Ok(tracefs) = tracefs_root() else {
            eprintln!("skipped: no tracefs");
            return;
        };
        let plan = plan(&tracefs, &btf, ExitFilter::Auto);
        let dport = btf.member_offset("sock_common", "skc_dport").unwrap();
        let io = plan.ready.iter().find(|(c, _)| *c == Capability::OwnerIo);
        match io {
            Some((_, detail)) => {
                assert_eq!(detail, "", "{plan:?}");
                assert_eq!(plan.offsets.sock_num, dport + 2, "{plan:?}");
            }
            // Before Linux 6.3 the I/O tracepoints do not exist.
            None => assert_eq!(plan.offsets.sock_num, 0),
        }
    }
}
