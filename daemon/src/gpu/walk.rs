//! Which processes' open files a snapshot reads.
//!
//! Reading every process's fds costs one `readlink` per open file on the host: at 100k live
//! connections, 200k links per snapshot, most of the daemon's time at rest. Between full
//! reads (each resync) only the processes whose device files can have changed are read:
//! those NVML lists, those that held device files at the last read (to see them let go), and
//! those that appeared since (a child that inherited a holder's files is new). What that
//! leaves to the next full read: a process already read that opens a device file later
//! without NVML listing it (handles, no memory), or a pid reused between two reads.
use std::collections::{HashMap, HashSet};

use super::{DeviceFd, DeviceFiles};

#[derive(Debug, Default)]
pub struct FdWalk {
    /// Every process in /proc at the last read.
    known: HashSet<u32>,
    /// Those of them holding device files then.
    holding: HashSet<u32>,
}

impl FdWalk {
    /// The device files of every process but `skip` (`full`), or of those that can have
    /// changed since the last read (see the module's comment); `listed`: NVML's pids.
    pub fn read(
        &mut self,
        files: &DeviceFiles,
        full: bool,
        listed: impl IntoIterator<Item = u32>,
        skip: u32,
    ) -> HashMap<u32, Vec<DeviceFd>> {
        let present = super::procfs::pids(files.proc_root());
        let wanted = self.plan(full, present, listed);
        let found: HashMap<u32, Vec<DeviceFd>> = wanted
            .into_iter()
            .filter(|&pid| pid != skip)
            .filter_map(|pid| {
                let fds = files.of_pid(pid);
                (!fds.is_empty()).then_some((pid, fds))
            })
            .collect();
        self.holding = found.keys().copied().collect();
        found
    }

    /// Which of the `present` processes to read, remembering them as known.
    fn plan(
        &mut self,
        full: bool,
        present: Vec<u32>,
        listed: impl IntoIterator<Item = u32>,
    ) -> Vec<u32> {
        let wanted: Vec<u32> = if full {
            present.clone()
        } else {
            let mut wanted: HashSet<u32> = present
                .iter()
                .copied()
                .filter(|pid| !self.known.contains(pid))
                .collect();
            wanted.extend(listed);
            wanted.extend(self.holding.iter().copied());
            wanted.into_iter().collect()
        };
        self.known = present.into_iter().collect();
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn between_full_reads_only_new_listed_and_holding_processes_are_read() {
        let mut w = FdWalk::default();
        assert_eq!(
            sorted(w.plan(false, vec![1, 2, 3], [])),
            [1, 2, 3],
            "all new"
        );
        w.holding = HashSet::from([2]);
        assert_eq!(sorted(w.plan(false, vec![1, 2, 3, 4], [3])), [2, 3, 4]);
        assert_eq!(sorted(w.plan(false, vec![1, 2, 3, 4], [])), [2]);
        assert_eq!(sorted(w.plan(true, vec![1, 2, 3, 4], [])), [1, 2, 3, 4]);
    }

    /// The test's own process, read through real /proc: once known, a device file it opens
    /// later is seen only when NVML lists it or at the next full read.
    #[test]
    fn a_known_process_that_opens_a_device_later_is_found_by_the_full_read() {
        let dir = std::env::temp_dir().join(format!("reclaimd-walk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = DeviceFiles::new(&format!("{}/nvidia*", dir.display())).unwrap();
        let me = std::process::id();
        let mut w = FdWalk::default();
        assert!(!w.read(&files, false, [], 0).contains_key(&me), "none yet");
        let device = std::fs::File::create(dir.join("nvidia3")).unwrap();
        let quiet = w.read(&files, false, [], 0);
        let listed = w.read(&files, false, [me], 0);
        let full = w.read(&files, true, [], 0);
        let held = w.read(&files, false, [], 0);
        drop(device);
        let let_go = w.read(&files, false, [], 0);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!quiet.contains_key(&me), "known, not listed: {quiet:?}");
        assert_eq!(listed.get(&me).map(Vec::len), Some(1), "{listed:?}");
        assert_eq!(full.get(&me).map(Vec::len), Some(1), "{full:?}");
        assert_eq!(
            held.get(&me).map(Vec::len),
            Some(1),
            "still holding: {held:?}"
        );
        assert!(!let_go.contains_key(&me), "let go: {let_go:?}");
        assert!(!w.read(&files, true, [], me).contains_key(&me), "skipped");
    }
}
