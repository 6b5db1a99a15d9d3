//! Processes the kernel tests observe: each subcommand makes the kernel do one known thing.
//! Output lines are facts the test needs (pids, readiness), one per line, flushed.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    time::Duration,
};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn arg(args: &[String], i: usize, what: &str) -> String {
    args.get(i)
        .cloned()
        .unwrap_or_else(|| panic!("missing argument: {what}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match arg(&args, 1, "subcommand").as_str() {
        // exit CODE
        "exit" => std::process::exit(arg(&args, 2, "code").parse().expect("code")),
        // threads N: N threads come and go; then the leader exits first and the last thread
        // ends the process, so the process dies in a thread that is not its leader.
        "threads" => {
            let n: usize = arg(&args, 2, "count").parse().expect("count");
            let mut tids = Vec::new();
            for _ in 0..n {
                let h = std::thread::spawn(|| {
                    // SAFETY: gettid cannot fail.
                    unsafe { libc::gettid() }
                });
                tids.push(h.join().expect("thread"));
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let last = std::thread::spawn(move || {
                // SAFETY: gettid cannot fail.
                let _ = tx.send(unsafe { libc::gettid() });
                std::thread::sleep(Duration::from_millis(300));
            });
            say(&format!("last {}", rx.recv().expect("last thread id")));
            for t in tids {
                say(&format!("thread {t}"));
            }
            drop(last); // detached: the process ends when it returns
            // The raw exit syscall ends only this thread (pthread_exit would unwind through
            // Rust's main and abort); the detached thread keeps the process alive.
            // SAFETY: nothing on this thread is used afterwards.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unreachable!("SYS_exit returned");
        }
        // flood N: N children that exit at once; prints each child's pid.
        "flood" => {
            let n: usize = arg(&args, 2, "count").parse().expect("count");
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for _ in 0..n {
                // SAFETY: this process is single-threaded; the child only calls _exit.
                let pid = unsafe { libc::fork() };
                match pid {
                    0 => unsafe { libc::_exit(0) },
                    p if p > 0 => {
                        let _ = writeln!(out, "{p}");
                        // Reap as we go so the pid space never fills.
                        let mut status = 0;
                        // SAFETY: valid pointer.
                        unsafe { libc::waitpid(p, &mut status, 0) };
                    }
                    _ => panic!("fork: {}", std::io::Error::last_os_error()),
                }
            }
            let _ = out.flush();
        }
        // serve ADDR peer|self: accept one connection; `peer` waits for the client to close
        // first, `self` closes first and then waits for the client's close.
        "serve" => {
            let addr: SocketAddr = arg(&args, 2, "address").parse().expect("address");
            let who = arg(&args, 3, "who closes");
            let listener = TcpListener::bind(addr).expect("bind");
            say(&format!(
                "listening {}",
                listener.local_addr().expect("addr")
            ));
            let (mut conn, peer) = listener.accept().expect("accept");
            say(&format!("accepted {peer}"));
            match who.as_str() {
                "peer" => {
                    let mut buf = [0u8; 64];
                    while conn.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                    drop(conn);
                }
                "self" => drop(conn),
                other => panic!("who closes: peer or self, not {other}"),
            }
            say("closed");
            // Stay until told, so the exit does not race the close in the test's view.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        other => panic!("unknown subcommand {other}"),
    }
}
