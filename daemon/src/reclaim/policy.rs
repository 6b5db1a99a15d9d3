//! Who may never be signalled (invariant 1), and what the policy says about the rest.
use std::collections::HashSet;

use crate::{
    config::{Config, Mode},
    gpu::Holder,
};

/// Why a holder is not reclaimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `mode = "report"`: decided and recorded, not acted on.
    Report,
    /// On the protect list.
    Protected(String),
    /// Never signalled whatever the configuration: pid 1, kernel threads, reclaimd and its
    /// ancestors, anything outside a service.
    Unsafe(String),
}

impl Refusal {
    pub fn reason(&self) -> String {
        match self {
            Self::Report => "report mode".to_owned(),
            Self::Protected(what) => format!("protected ({what})"),
            Self::Unsafe(what) => format!("refused: {what}"),
        }
    }
}

/// Processes reclaimd never signals regardless of configuration.
#[derive(Debug, Clone)]
pub struct Untouchable {
    /// reclaimd and its ancestors.
    pub pids: HashSet<u32>,
}

/// Screens a holder before any action. `service` is the service it is bound to, if any;
/// `suspect` says the holder is outside every service but a suspect (its original parent
/// died), which `[policy] suspects` decides about.
pub fn screen(
    holder: &Holder,
    exe: Option<&std::path::Path>,
    service: Option<&str>,
    suspect: bool,
    cfg: &Config,
    never: &Untouchable,
) -> Result<(), Refusal> {
    let pid = holder.pid;
    if pid <= 1 {
        return Err(Refusal::Unsafe(format!("pid {pid}")));
    }
    // Kernel threads are children of kthreadd (pid 2) and have no executable.
    if pid == 2 || holder.ppid == Some(2) {
        return Err(Refusal::Unsafe("kernel thread".to_owned()));
    }
    if never.pids.contains(&pid) {
        return Err(Refusal::Unsafe("reclaimd or its ancestor".to_owned()));
    }
    let mode = match service.and_then(|s| cfg.service(s)) {
        Some(service) => cfg.mode_of(service),
        None if suspect => cfg.policy.suspects,
        None => return Err(Refusal::Unsafe("outside every service".to_owned())),
    };
    let comm = holder.comm.as_deref().unwrap_or("");
    for entry in &cfg.policy.protect {
        let hit = if entry.contains('/') {
            exe.is_some_and(|e| glob::Pattern::new(entry).is_ok_and(|p| p.matches_path(e)))
        } else {
            entry == comm
        };
        if hit {
            return Err(Refusal::Protected(entry.clone()));
        }
    }
    if mode == Mode::Report {
        return Err(Refusal::Report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::HolderStatus;

    fn cfg(mode: &str) -> Config {
        Config::parse(
            &format!(
                "[policy]\nmode = \"{mode}\"\nprotect = [\"sshd\", \"/usr/bin/keep-*\"]\n\
                 [[service]]\nname = \"llm\"\nmatch = {{ comm = [\"server\"] }}\n\
                 [[service]]\nname = \"nb\"\nmatch = {{ comm = [\"jupyter\"] }}\nmode = \"report\"\n"
            ),
            "t",
        )
        .unwrap()
    }

    fn holder(pid: u32, ppid: u32, comm: &str) -> Holder {
        Holder {
            pid,
            comm: Some(comm.to_owned()),
            ppid: Some(ppid),
            start_time: Some(1),
            memory: Vec::new(),
            fds: Vec::new(),
            status: HolderStatus::Live,
        }
    }

    #[test]
    fn never_signals_the_untouchable() {
        let c = cfg("enforce");
        let never = Untouchable {
            pids: [4242u32].into_iter().collect(),
        };
        let s = Some("llm");
        let cases = [
            (holder(1, 0, "init"), s, "pid 1"),
            (holder(99, 2, "kworker"), s, "kernel thread"),
            (holder(4242, 1, "reclaimd"), s, "reclaimd itself"),
            (holder(500, 1, "w"), None, "outside any service"),
            (holder(500, 1, "w"), Some("unknown"), "unknown service"),
        ];
        for (h, service, what) in &cases {
            assert!(
                matches!(
                    screen(h, None, *service, false, &c, &never),
                    Err(Refusal::Unsafe(_))
                ),
                "{what}"
            );
        }
        assert_eq!(
            screen(&holder(500, 1, "sshd"), None, s, false, &c, &never),
            Err(Refusal::Protected("sshd".into()))
        );
        let exe = std::path::Path::new("/usr/bin/keep-me");
        assert_eq!(
            screen(&holder(500, 1, "w"), Some(exe), s, false, &c, &never),
            Err(Refusal::Protected("/usr/bin/keep-*".into()))
        );
        assert_eq!(
            screen(&holder(500, 1, "w"), None, s, false, &c, &never),
            Ok(())
        );
        assert_eq!(
            screen(&holder(500, 1, "w"), None, Some("nb"), false, &c, &never),
            Err(Refusal::Report),
            "per-service mode override"
        );
    }

    #[test]
    fn report_is_the_default() {
        let c = Config::parse(
            "[[service]]\nname = \"llm\"\nmatch = { comm = [\"server\"] }\n",
            "t",
        )
        .unwrap();
        let never = Untouchable {
            pids: HashSet::new(),
        };
        assert_eq!(
            screen(&holder(500, 1, "w"), None, Some("llm"), false, &c, &never),
            Err(Refusal::Report)
        );
    }

    #[test]
    fn a_suspect_is_acted_on_only_when_suspects_are_enforced() {
        let never = Untouchable {
            pids: HashSet::new(),
        };
        let suspects = |mode: &str| {
            Config::parse(
                &format!("[policy]\nsuspects = \"{mode}\"\nprotect = [\"sshd\"]\n"),
                "t",
            )
            .unwrap()
        };
        let w = holder(500, 1, "python3");
        let report = suspects("report");
        let enforce = suspects("enforce");
        assert_eq!(
            screen(&w, None, None, true, &report, &never),
            Err(Refusal::Report)
        );
        assert_eq!(screen(&w, None, None, true, &enforce, &never), Ok(()));
        assert!(matches!(
            screen(&w, None, None, false, &enforce, &never),
            Err(Refusal::Unsafe(_))
        ));
        let sshd = holder(501, 1, "sshd");
        assert!(matches!(
            screen(&sshd, None, None, true, &enforce, &never),
            Err(Refusal::Protected(_))
        ));
        assert!(matches!(
            screen(&holder(1, 0, "init"), None, None, true, &enforce, &never),
            Err(Refusal::Unsafe(_))
        ));
    }
}
