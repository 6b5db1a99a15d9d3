//! What /proc says about processes and the GPU device files they hold open.
use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};

use super::inventory::DeviceFd;

/// Facts from `/proc/<pid>/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    /// `R`, `S`, `D`, `Z`, …
    pub state: char,
    pub ppid: u32,
    /// Clock ticks since boot.
    pub start_time: u64,
}

impl ProcStat {
    pub fn read(proc_root: &Path, pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
        Self::parse(&text)
    }

    /// `pid (comm) state ppid …`; comm may hold spaces and parentheses, so it ends at the
    /// last `)`.
    pub fn parse(text: &str) -> Option<Self> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let pid = text[..open].trim().parse().ok()?;
        let comm = text.get(open + 1..close)?.to_owned();
        let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
        // rest[0] is field 3 (state); field 22 (starttime) is rest[19].
        Some(Self {
            pid,
            comm,
            state: rest.first()?.chars().next()?,
            ppid: rest.get(1)?.parse().ok()?,
            start_time: rest.get(19)?.parse().ok()?,
        })
    }

    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// A process at least one thread of which still runs (invariant 9: a process is dead when
/// its last thread is), as /proc shows it.
///
/// A thread-group leader that exits before its other threads stays in /proc as `Z`, and the
/// kernel has already dropped its files, memory and namespaces: its own `fd`, `exe` and
/// `net` are empty or missing. Those are read through a thread that still runs instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveProc {
    /// The leader's `stat`: the process's pid, name, parent and start time. Its state is
    /// `Z` when the leader exited before the other threads.
    pub stat: ProcStat,
    /// Where the process's own files are: `/proc/<pid>`, or `/proc/<pid>/task/<tid>` of a
    /// running thread once the leader has exited.
    pub dir: PathBuf,
}

impl LiveProc {
    /// The process `pid`, unless it is gone or every thread of it has exited.
    pub fn find(proc_root: &Path, pid: u32) -> Option<Self> {
        let stat = ProcStat::read(proc_root, pid)?;
        let dir = proc_root.join(pid.to_string());
        if !stat.is_zombie() {
            return Some(Self { stat, dir });
        }
        let tid = running_thread(&dir, pid)?;
        Some(Self {
            stat,
            dir: dir.join("task").join(tid.to_string()),
        })
    }

    /// Whether the leader exited while other threads run on.
    pub fn leader_exited(&self) -> bool {
        self.stat.is_zombie()
    }
}

/// Whether any thread of process `pid` still runs.
pub fn process_alive(proc_root: &Path, pid: u32) -> bool {
    LiveProc::find(proc_root, pid).is_some()
}

/// A thread of the process in `dir` other than its exited leader that has not exited.
fn running_thread(dir: &Path, leader: u32) -> Option<u32> {
    let tasks = dir.join("task");
    std::fs::read_dir(&tasks)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&tid| tid != leader)
        .find(|tid| {
            std::fs::read_to_string(tasks.join(tid.to_string()).join("stat"))
                .ok()
                .and_then(|t| ProcStat::parse(&t))
                .is_some_and(|s| !s.is_zombie())
        })
}

/// The pids in /proc (every process, none of their threads).
pub fn pids(proc_root: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The open files of process `pid` (fd number, link target). An empty `fd` directory may be
/// that of a leader that exited before its threads: then they are read through a thread that
/// still runs.
pub fn fd_links(proc_root: &Path, pid: u32) -> Vec<(u32, PathBuf)> {
    let links = links_in(&proc_root.join(pid.to_string()).join("fd"));
    if !links.is_empty() {
        return links;
    }
    match LiveProc::find(proc_root, pid) {
        Some(p) if p.leader_exited() => links_in(&p.dir.join("fd")),
        _ => links,
    }
}

/// Each link is read relative to the opened `fd` directory (`readlinkat`): one path
/// component looked up per link instead of four from the root, which was half the kernel
/// time of a walk over 200k open files.
fn links_in(fd_dir: &Path) -> Vec<(u32, PathBuf)> {
    use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _};

    use rustix::fs::{Dir, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(dir) = rustix::fs::open(fd_dir, flags, Mode::empty()) else {
        return Vec::new();
    };
    let Ok(entries) = Dir::read_from(&dir) else {
        return Vec::new();
    };
    let mut buf = [0u8; 4096];
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let fd: u32 = name.to_str().ok()?.parse().ok()?;
            // A file closed since the listing is gone: skipped, as before.
            let n = rustix::fs::readlinkat_raw(&dir, name, &mut buf[..]).ok()?;
            let target = buf.get(..n)?;
            Some((fd, PathBuf::from(OsStr::from_bytes(target))))
        })
        .collect()
}

/// Matches open files against the configured device glob (`[gpu] device_glob`).
#[derive(Debug, Clone)]
pub struct DeviceFiles {
    pattern: Pattern,
    proc_root: PathBuf,
}

const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl DeviceFiles {
    pub fn new(glob: &str) -> Result<Self, glob::PatternError> {
        Ok(Self {
            pattern: Pattern::new(glob)?,
            proc_root: PathBuf::from("/proc"),
        })
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    pub fn matches(&self, path: &Path) -> bool {
        self.pattern.matches_path_with(path, MATCH)
    }

    /// Device fds of one process; empty when it holds none or is gone.
    pub fn of_pid(&self, pid: u32) -> Vec<DeviceFd> {
        let mut fds: Vec<DeviceFd> = fd_links(&self.proc_root, pid)
            .into_iter()
            .filter(|(_, target)| self.matches(target))
            .map(|(fd, target)| DeviceFd {
                fd,
                minor: minor_of(&target),
                path: target,
            })
            .collect();
        fds.sort_by_key(|f| f.fd);
        fds
    }
}

/// `N` of a file named `nvidiaN`.
fn minor_of(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("nvidia")?
        .parse()
        .ok()
}

/// Whether this process sees the host's pid namespace, where NVML's pids are meaningful.
/// `None` when it cannot tell.
pub fn in_host_pid_namespace() -> Option<bool> {
    // The initial pid namespace has a fixed inode number (PROC_PID_INIT_INO).
    const INIT_PID_NS: &str = "pid:[4026531836]";
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(link.to_str()? == INIT_PID_NS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "4242 (my (weird) prog) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 \
                    1 0 987654 1000000 100 18446744073709551615";
        let s = ProcStat::parse(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "my (weird) prog");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 17);
        assert_eq!(s.start_time, 987654);
        assert!(!s.is_zombie());
        assert!(ProcStat::parse("garbage").is_none());
        assert!(ProcStat::parse("1 (x) S").is_none());
    }

    #[test]
    fn reads_own_stat() {
        let me = std::process::id();
        let s = ProcStat::read(Path::new("/proc"), me).unwrap();
        assert_eq!(s.pid, me);
        assert!(s.start_time > 0);
    }

    #[test]
    fn minors_and_glob() {
        assert_eq!(minor_of(Path::new("/dev/nvidia3")), Some(3));
        assert_eq!(minor_of(Path::new("/dev/nvidiactl")), None);
        assert_eq!(minor_of(Path::new("/dev/nvidia-uvm")), None);
        let d = DeviceFiles::new("/dev/nvidia*").unwrap();
        assert!(d.matches(Path::new("/dev/nvidia0")));
        assert!(d.matches(Path::new("/dev/nvidiactl")));
        assert!(!d.matches(Path::new("/dev/nvidia-caps/nvidia-cap1")));
        assert!(!d.matches(Path::new("/dev/null")));
    }

    #[test]
    fn finds_own_open_file() {
        let dir = std::env::temp_dir().join(format!("reclaimd-procfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nvidia7");
        let file = std::fs::File::create(&path).unwrap();
        let d = DeviceFiles::new(&format!("{}/nvidia*", dir.display())).unwrap();
        let fds = d.of_pid(std::process::id());
        drop(file);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(fds.len(), 1, "{fds:?}");
        assert_eq!(fds[0].minor, Some(7));
        assert_eq!(fds[0].path, path);
    }
}
