//! `[service.heartbeat]`: a client that vanishes without FIN or RST (its network cut) is found
//! dead by the kernel keepalive reclaimd sets on the server's socket, and its worker is
//! reclaimed; a live idle client of the same service is not. Root only: the test makes a
//! network namespace and a veth link of its own, and cuts the link.
use std::{
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use reclaimd::ledger::Outcome;
use reclaimd_tests::{
    Daemon, FakeGpu, Workload, alive, connection_service, free_port, kill, next_worker,
    spawn_conn_server, wait_for_record, wait_until_bound,
};

const DEVICE: &str = "device 0 GPU-hb 16384 Fake H100";
const WAIT: Duration = Duration::from_secs(20);

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth link: 10.213.N.1 here, .2 there.
struct Netns {
    name: String,
    host_if: String,
    peer_if: String,
    net: u32,
}

impl Netns {
    fn new() -> Self {
        let id = std::process::id();
        let net = id % 250 + 1;
        let ns = Self {
            name: format!("rcd-hb-{id}"),
            host_if: format!("rcdh{id}"),
            peer_if: format!("rcdn{id}"),
            net,
        };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.peer_if,
        ]);
        ip(&["link", "set", &ns.peer_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.here()),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = format!("10.213.{net}.2/30");
        ip(&["-n", &ns.name, "addr", "add", &inside, "dev", &ns.peer_if]);
        ip(&["-n", &ns.name, "link", "set", &ns.peer_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn here(&self) -> String {
        format!("10.213.{}.1", self.net)
    }

    /// A client inside the namespace connected to `port` here; it prints "connected".
    fn client(&self, port: u16) -> Workload {
        let script = "import socket, sys\n\
                      s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n\
                      print('connected', flush=True)\n\
                      sys.stdin.read()\n";
        let c = Workload::spawn(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "python3",
                "-c",
                script,
                &self.here(),
                &port.to_string(),
            ],
        );
        c.line("connected");
        c
    }

    /// The client's side goes down: no FIN, no RST, nothing answers any more.
    fn cut(&self) {
        ip(&["-n", &self.name, "link", "set", &self.peer_if, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_client_whose_link_is_cut_is_found_by_the_heartbeat_and_its_worker_reclaimed() {
    let gpu = FakeGpu::new(DEVICE);
    let port = free_port();
    let ns = Netns::new();
    let (idle, interval, count): (u64, u64, u64) = (1, 1, 2);
    let mut svc = connection_service("api", "api-server", &[port]);
    let mut beat = toml::Table::new();
    beat.insert("idle".into(), format!("{idle}s").into());
    beat.insert("interval".into(), format!("{interval}s").into());
    beat.insert("count".into(), (count as i64).into());
    svc.insert("heartbeat".into(), beat.into());
    let mut d = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .service(svc)
        .start();
    let server = spawn_conn_server(
        &workload(),
        "api-server",
        &format!("0.0.0.0:{port}"),
        &gpu.device_file(0),
    );
    let cut = ns.client(port);
    let w_cut = next_worker(&server);
    let stay = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let w_stay = next_worker(&server);
    gpu.set_state(&format!(
        "{DEVICE}\nproc 0 {w_cut} 300 compute\nproc 0 {w_stay} 100 compute\n"
    ));
    wait_until_bound(&gpu, &[w_cut, w_stay]);
    let armed = d.wait_log(&format!("conn={}:{port}->10.213.", ns.here()), WAIT);
    assert!(armed.contains("heartbeat armed"), "{armed}");
    assert!(armed.contains("how=Set"), "{armed}");
    let local = stay.local_addr().expect("addr");
    let armed = d.wait_log(&format!("conn=127.0.0.1:{port}->{local}"), WAIT);
    assert!(armed.contains("heartbeat armed"), "{armed}");

    ns.cut();
    let cut_at = Instant::now();
    let r = wait_for_record(&d.ledger, w_cut, Duration::from_secs(30));
    let took = cut_at.elapsed();
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert_eq!(r.decision.session_kind, "connection");
    assert!(
        r.decision.death_cause.starts_with("heartbeat"),
        "{:?}",
        r.decision.death_cause
    );
    // idle + count × interval + grace (0), with room for sweeps and this machine's noise.
    let bound = Duration::from_secs(idle + count * interval + 10);
    assert!(
        took < bound,
        "reclaimed {took:?} after the cut (bound {bound:?})"
    );
    assert!(!alive(w_cut));

    // The idle client's kernel answers the probes: its worker stays.
    std::thread::sleep(Duration::from_secs(idle + count * interval + 1));
    assert!(alive(w_stay), "a live idle client's worker was reclaimed");
    drop(stay);
    d.stop();
    drop(cut);
    kill(w_stay);
    kill(server.pid());
    let _ = server.finish();
}
