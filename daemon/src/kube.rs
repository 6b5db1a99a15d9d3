//! Which Kubernetes pod and container a process runs in, without the API server: the
//! container id is the last part of the process's cgroup path (systemd or cgroupfs driver,
//! any CRI runtime), and the kubelet names each container's log
//! `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`. Pod, namespace and container
//! names cannot contain `_`, so the name splits unambiguously.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// The container id of a process in a Kubernetes pod, from its `/proc/PID/cgroup` text
/// (every hierarchy is looked at: cgroup v1 hosts keep the pod path in the controllers').
pub fn container_id(cgroup_file: &str) -> Option<&str> {
    cgroup_file.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        if !path.contains("kubepods") {
            return None;
        }
        let last = path.rsplit('/').next()?;
        let id = last.strip_suffix(".scope").unwrap_or(last);
        // cri-containerd-<id>, crio-<id>, docker-<id>, or a bare id (cgroupfs driver).
        let id = id.rsplit('-').next()?;
        is_container_id(id).then_some(id)
    })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<pod>_<namespace>_<container>-<id>.log` → (id, pod ref).
fn parse_log_name(name: &str) -> Option<(String, PodRef)> {
    let stem = name.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    let mut parts = rest.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    if pod.is_empty() || namespace.is_empty() || container.is_empty() || container.contains('_') {
        return None;
    }
    Some((
        id.to_owned(),
        PodRef {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: container.to_owned(),
        },
    ))
}

/// Resolves container ids through the kubelet's log directory, re-reading it at most once
/// per `REFRESH` when an id is unknown (a container newer than the last read).
pub struct Resolver {
    dir: Option<PathBuf>,
    known: HashMap<String, PodRef>,
    read_at: Option<Instant>,
}

const REFRESH: Duration = Duration::from_secs(1);

impl Resolver {
    /// `dir`: the kubelet's `/var/log/containers`; `None` turns attribution off.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            known: HashMap::new(),
            read_at: None,
        }
    }

    /// The pod of process `pid`, when it runs in one this node's kubelet knows.
    pub fn pod_of(&mut self, proc_root: &Path, pid: u32) -> Option<PodRef> {
        self.dir.as_ref()?;
        let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        let id = container_id(&text)?.to_owned();
        self.resolve(&id)
    }

    fn resolve(&mut self, id: &str) -> Option<PodRef> {
        if let Some(p) = self.known.get(id) {
            return Some(p.clone());
        }
        if self.read_at.is_some_and(|t| t.elapsed() < REFRESH) {
            return None;
        }
        self.read_at = Some(Instant::now());
        let dir = self.dir.as_ref()?;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(error) => {
                tracing::debug!(%error, dir = %dir.display(), "cannot list container logs");
                return None;
            }
        };
        // Rebuilt, not extended: containers that are gone leave the map.
        self.known = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| parse_log_name(e.file_name().to_str()?))
            .collect();
        self.known.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0f3c2b1a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b";

    #[test]
    fn container_ids_from_every_cgroup_layout() {
        for text in [
            // cgroup v2, systemd driver, containerd
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d1c_44.slice/cri-containerd-{ID}.scope\n"
            ),
            // CRI-O
            format!("0::/kubepods.slice/kubepods-pod7d1c.slice/crio-{ID}.scope\n"),
            // cgroup v1, cgroupfs driver: the unified line is "/", a controller has the path
            format!("12:memory:/kubepods/besteffort/pod7d1c-44/{ID}\n0::/\n"),
            // docker shim
            format!("0::/kubepods/burstable/pod7d1c/docker-{ID}.scope\n"),
        ] {
            assert_eq!(container_id(&text), Some(ID), "{text}");
        }
        for text in [
            "0::/system.slice/ssh.service\n".to_owned(),
            format!("0::/system.slice/docker-{ID}.scope\n"), // a container, not a pod
            "0::/kubepods.slice/kubepods-pod7d1c.slice\n".to_owned(), // the pod, no container
            String::new(),
        ] {
            assert_eq!(container_id(&text), None, "{text}");
        }
    }

    #[test]
    fn log_names_split_into_pod_namespace_container() {
        let (id, p) = parse_log_name(&format!("vllm-7d9f-x2k_team-a_server-{ID}.log")).unwrap();
        assert_eq!(id, ID);
        assert_eq!(
            p,
            PodRef {
                namespace: "team-a".into(),
                pod: "vllm-7d9f-x2k".into(),
                container: "server".into()
            }
        );
        for bad in [
            format!("vllm_team-a_server-{ID}"),
            format!("vllm_team-a-server-{ID}.log"),
            "vllm_team-a_server-abc.log".to_owned(),
            format!("_team-a_server-{ID}.log"),
        ] {
            assert_eq!(parse_log_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves_through_the_log_directory_and_sees_new_containers() {
        let dir = std::env::temp_dir().join(format!("reclaimd-kube-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Resolver::new(Some(dir.clone()));
        assert_eq!(r.resolve(ID), None);
        std::fs::write(dir.join(format!("p_ns_c-{ID}.log")), "").unwrap();
        // Within the refresh interval a miss does not re-read the directory.
        assert_eq!(r.resolve(ID), None);
        r.read_at = None;
        assert_eq!(r.resolve(ID).map(|p| p.pod), Some("p".to_owned()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(Resolver::new(None).pod_of(Path::new("/proc"), 1), None);
    }
}
