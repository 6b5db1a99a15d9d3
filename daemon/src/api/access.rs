//! Who may do what: peers are known by their socket credentials (SO_PEERCRED), never by
//! anything they say. Reads for any peer that can open the socket; `Reclaim` for uid 0 and
//! members of `[api] admin_group` (primary or supplementary group of the calling process).
use tokio::net::unix::UCred;

#[derive(Debug, Clone)]
pub struct Access {
    /// The admin group's gid; `None`: root only.
    pub admin_gid: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: Option<u32>,
    pub admin: bool,
}

impl Access {
    pub fn peer(&self, cred: Option<UCred>) -> Peer {
        let Some(cred) = cred else {
            return Peer {
                uid: None,
                admin: false,
            };
        };
        let uid = cred.uid();
        let admin = uid == 0
            || self.admin_gid.is_some_and(|gid| {
                cred.gid() == gid
                    || cred
                        .pid()
                        .and_then(|pid| supplementary_groups(pid as u32))
                        .is_some_and(|groups| groups.contains(&gid))
            });
        Peer {
            uid: Some(uid),
            admin,
        }
    }
}

/// The `Groups:` of /proc/<pid>/status: the groups the calling process really has.
fn supplementary_groups(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// A group's gid by name.
pub fn gid_of(group: &str) -> Option<u32> {
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}
