//! Processes the kernel tests observe: each subcommand makes the kernel do one known thing.
//! Output lines are facts the test needs (pids, readiness), one per line, flushed.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    time::Duration,
};

/// Runs the calling thread on CPU `cpu` only, where the machine has it (else as before).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn set_comm(name: &str) {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of up to 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
}

/// Ends the calling thread only, as a main thread's `pthread_exit` does: the raw exit
/// syscall (pthread_exit would unwind through Rust's main and abort). The process lives on
/// while another thread does.
fn exit_this_thread() -> ! {
    // SAFETY: nothing on this thread is used afterwards.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned");
}

fn wait_for_stdin() {
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// Just enough of the CUDA driver API to hold device memory, loaded at run time so the
/// workload builds and runs where there is no driver.
mod cuda {
    use std::ffi::{CStr, c_int, c_void};

    type CuInit = unsafe extern "C" fn(u32) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuCtxCreate = unsafe extern "C" fn(*mut *mut c_void, u32, c_int) -> c_int;
    type CuMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;

    unsafe fn sym<T>(lib: *mut c_void, name: &CStr) -> T {
        // SAFETY: caller names a symbol of type T.
        let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
        assert!(!p.is_null(), "libcuda has no {name:?}");
        // SAFETY: a function pointer of the named symbol's type.
        unsafe { std::mem::transmute_copy(&p) }
    }

    /// Allocates `bytes` on GPU 0; the context and memory live until the process exits.
    pub fn hold(bytes: usize) {
        // SAFETY: dlopen/dlsym with valid strings; the CUDA calls follow the driver API.
        unsafe {
            let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW);
            assert!(!lib.is_null(), "cannot load libcuda.so.1");
            let init: CuInit = sym(lib, c"cuInit");
            let device_get: CuDeviceGet = sym(lib, c"cuDeviceGet");
            let ctx_create: CuCtxCreate = sym(lib, c"cuCtxCreate_v2");
            let mem_alloc: CuMemAlloc = sym(lib, c"cuMemAlloc_v2");
            assert_eq!(init(0), 0, "cuInit");
            let mut dev = 0;
            assert_eq!(device_get(&mut dev, 0), 0, "cuDeviceGet");
            let mut ctx = std::ptr::null_mut();
            assert_eq!(ctx_create(&mut ctx, 0, dev), 0, "cuCtxCreate");
            let mut ptr = 0u64;
            assert_eq!(mem_alloc(&mut ptr, bytes), 0, "cuMemAlloc");
        }
    }
}

/// The demo's synthetic service (see `demo-service`).
mod demo {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::set_comm;

    /// xorshift64: enough randomness for a demo, no dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Rewrites the state atomically: the device, live listed workers, and `new` ones.
    fn write_state(state: &str, device_line: &str, new: &[(i32, u64)]) {
        let old = std::fs::read_to_string(state).unwrap_or_default();
        let mut text = format!("{device_line}\n");
        for line in old.lines().filter(|l| l.starts_with("proc ")) {
            let pid: u32 = line
                .split_whitespace()
                .nth(2)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if reclaimd_tests::alive(pid) {
                text.push_str(line);
                text.push('\n');
            }
        }
        for (pid, mib) in new {
            text.push_str(&format!("proc 0 {pid} {mib} compute\n"));
        }
        let tmp = format!("{state}.tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, state);
        }
    }

    pub fn run(state: &str, device_line: &str, device: &str) {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let mut rng = Rng(seed);
        loop {
            let workers = 1 + rng.below(3);
            let life = Duration::from_millis(2000 + rng.below(4000));
            let plan: Vec<(u64, Option<Duration>)> = (0..workers)
                .map(|_| {
                    let mib = 512 * (1 + rng.below(8));
                    // One in five lets go by itself, a little after its server dies.
                    let quits = (rng.below(5) == 0).then(|| life + Duration::from_millis(500));
                    (mib, quits)
                })
                .collect();
            // SAFETY: single-threaded; the children only fork, open a file and sleep.
            let server = unsafe { libc::fork() };
            if server == 0 {
                set_comm("demo-llm");
                let mut pids = Vec::new();
                for (mib, quits) in &plan {
                    // SAFETY: as above.
                    let w = unsafe { libc::fork() };
                    if w == 0 {
                        set_comm("demo-worker");
                        let _f = std::fs::File::open(device);
                        std::thread::sleep(quits.unwrap_or(Duration::from_secs(3600)));
                        // SAFETY: end the child without the parent's exit handlers.
                        unsafe { libc::_exit(0) };
                    }
                    pids.push((w, *mib));
                }
                write_state(state, device_line, &pids);
                std::thread::sleep(life);
                // A crash: the workers stay, holding their GPU memory.
                // SAFETY: signalling ourselves.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            let mut status = 0;
            // SAFETY: our child.
            unsafe { libc::waitpid(server, &mut status, 0) };
            std::thread::sleep(Duration::from_millis(1000 + rng.below(2000)));
        }
    }
}

/// What a burst worker says on SIGTERM, made before the handler is installed: the handler
/// may only make async-signal-safe calls (waitpid, write, _exit).
static TERM_LINES: std::sync::OnceLock<(i32, Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();

extern "C" fn burst_on_term(_: libc::c_int) {
    if let Some((leaf, gone, alive)) = TERM_LINES.get() {
        let mut status = 0;
        // SAFETY: waitpid, write and _exit are async-signal-safe; the buffers live for ever.
        unsafe {
            let reaped = libc::waitpid(*leaf, &mut status, libc::WNOHANG) == *leaf;
            let line = if reaped { gone } else { alive };
            libc::write(1, line.as_ptr().cast(), line.len());
            libc::_exit(0);
        }
    }
}

/// Forks one burst worker (and its leaf, with `with_leaf`, ignoring SIGTERM if `slow`);
/// returns once they hold `device`.
fn burst_worker(device: &str, with_leaf: bool, slow: bool) {
    let (ready_r, ready_w) = std::io::pipe().expect("pipe");
    // SAFETY: the parent is single-threaded; each child only opens files, forks and waits.
    match unsafe { libc::fork() } {
        0 => {
            drop(ready_r);
            set_comm("gpu-worker");
            let _file =
                std::fs::File::open(device).unwrap_or_else(|e| panic!("open {device}: {e}"));
            let me = std::process::id();
            if with_leaf {
                // SAFETY: as above.
                let leaf = match unsafe { libc::fork() } {
                    0 => {
                        set_comm("gpu-leaf");
                        if slow {
                            // SIGKILL after the term grace: a worker signalled before its
                            // leaf was done would find it still there.
                            // SAFETY: ignoring a signal is always sound.
                            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
                        }
                        let _leaf_file = std::fs::File::open(device)
                            .unwrap_or_else(|e| panic!("open {device}: {e}"));
                        say(&format!("leaf {} {me}", std::process::id()));
                        drop(ready_w);
                        wait_for_stdin();
                        // SAFETY: end the child without the parent's exit handlers.
                        unsafe { libc::_exit(0) };
                    }
                    leaf if leaf > 0 => leaf,
                    _ => panic!("fork: {}", std::io::Error::last_os_error()),
                };
                let lines = (
                    leaf,
                    format!("term {me} leaf-gone\n").into_bytes(),
                    format!("term {me} leaf-alive\n").into_bytes(),
                );
                let _ = TERM_LINES.set(lines);
                // SAFETY: the handler only makes async-signal-safe calls.
                unsafe {
                    libc::signal(
                        libc::SIGTERM,
                        burst_on_term as *const () as libc::sighandler_t,
                    )
                };
            }
            say(&format!("worker {me}"));
            drop(ready_w);
            wait_for_stdin();
            // SAFETY: end the child without the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        child if child > 0 => {
            drop(ready_w);
            // EOF once the worker and its leaf have both said they hold the device.
            let mut r = ready_r;
            let _ = r.read_to_end(&mut Vec::new());
        }
        _ => panic!("fork: {}", std::io::Error::last_os_error()),
    }
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
            exit_this_thread();
        }
        // idle-threads N: N threads besides the main one, all blocked; prints "threads N" once
        // they run, then waits for stdin (or a signal).
        "idle-threads" => {
            let n: usize = arg(&args, 2, "count").parse().expect("count");
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..n {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(());
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                });
            }
            let started = rx.iter().take(n).count();
            say(&format!("threads {started}"));
            wait_for_stdin();
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
        // serve ADDR peer|self|handoff: accept one connection; `peer` waits for the client to
        // close first, `self` closes first and then waits for the client's close, `handoff`
        // lets a child write on it between two reads (below).
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
                // The connection changes hands and back: the server reads a byte, a forked
                // child writes one on the inherited socket and exits, the server reads a
                // second byte, then waits for the peer to close.
                // The server stays on the first CPU and the child runs on the second (where
                // there is one), so that the hand-over happens across CPUs.
                "handoff" => {
                    pin_to_cpu(0);
                    let mut byte = [0u8; 1];
                    conn.read_exact(&mut byte).expect("first byte");
                    // SAFETY: single-threaded; the child writes a byte and ends.
                    match unsafe { libc::fork() } {
                        0 => {
                            pin_to_cpu(1);
                            let ok = conn.write_all(b"b").is_ok();
                            // SAFETY: end the child without running the parent's exit handlers.
                            unsafe { libc::_exit(i32::from(!ok)) };
                        }
                        child if child > 0 => {
                            let mut status = 0;
                            // SAFETY: waits for our own child.
                            unsafe { libc::waitpid(child, &mut status, 0) };
                            say(&format!("child {child} wrote"));
                        }
                        _ => panic!("fork: {}", std::io::Error::last_os_error()),
                    }
                    conn.read_exact(&mut byte).expect("second byte");
                    say("read again");
                    let mut buf = [0u8; 64];
                    while conn.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                    drop(conn);
                }
                other => panic!("who closes: peer, self or handoff, not {other}"),
            }
            say("closed");
            // Stay until told, so the exit does not race the close in the test's view.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        // hold PATH...: open each file (a GPU device file, in tests a file of their own) and
        // keep it open until stdin closes.
        "hold" => {
            let files: Vec<std::fs::File> = args[2..]
                .iter()
                .map(|p| std::fs::File::open(p).unwrap_or_else(|e| panic!("open {p}: {e}")))
                .collect();
            say(&format!("holding {}", files.len()));
            wait_for_stdin();
        }
        // hold-release PATH: open PATH, and close it (staying alive) at the first stdin line;
        // prints "released" then, and exits at stdin EOF.
        "hold-release" => {
            let path = arg(&args, 2, "path");
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            say("holding 1");
            wait_for_stdin();
            drop(file);
            say("released");
            wait_for_stdin();
        }
        // hold-fork PATH: open the file, fork a child that inherits it and keeps it open
        // until stdin closes, then exit: the creator dies, its child holds the handle.
        "hold-fork" => {
            let path = arg(&args, 2, "path");
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: single-threaded; the child only reads stdin and exits.
            match unsafe { libc::fork() } {
                0 => {
                    wait_for_stdin();
                    drop(file);
                    // SAFETY: end the child without running the parent's exit handlers.
                    unsafe { libc::_exit(0) };
                }
                child if child > 0 => say(&format!("child {child}")),
                _ => panic!("fork: {}", std::io::Error::last_os_error()),
            }
        }
        // server NAME DEVICE [ignore-term]: a service process named NAME (its comm) that
        // forks a worker (comm "gpu-worker") holding DEVICE open (or, with DEVICE cuda:MIB,
        // that much GPU memory through CUDA); prints the worker's pid.
        // Both stay until stdin closes; the worker ignores SIGTERM if asked.
        // With `rename=TITLE` the server renames itself to TITLE once its worker has started
        // (as setproctitle does, long after exec) and prints "renamed".
        "server" => {
            let name = arg(&args, 2, "name");
            let device = arg(&args, 3, "device");
            let ignore_term = args.iter().any(|a| a == "ignore-term");
            // inherit: the server opens the device and the worker only inherits the fd.
            let inherited = args.iter().any(|a| a == "inherit").then(|| {
                std::fs::File::open(&device).unwrap_or_else(|e| panic!("open {device}: {e}"))
            });
            set_comm(&name);
            // SAFETY: single-threaded; the child only opens a file, sets signals and waits.
            match unsafe { libc::fork() } {
                0 => {
                    set_comm("gpu-worker");
                    if ignore_term {
                        // SAFETY: ignoring a signal is always sound.
                        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
                    }
                    // cuda:MIB: real GPU memory through the driver instead of a file.
                    let cuda_mib = device
                        .strip_prefix("cuda:")
                        .map(|m| m.parse::<usize>().expect("MiB"));
                    let _file = match (inherited, cuda_mib) {
                        (_, Some(mib)) => {
                            cuda::hold(mib << 20);
                            None
                        }
                        (Some(f), None) => Some(f),
                        (None, None) => Some(
                            std::fs::File::open(&device)
                                .unwrap_or_else(|e| panic!("open {device}: {e}")),
                        ),
                    };
                    // Said by the worker once it holds the device, so the line means ready.
                    say(&format!("worker {}", std::process::id()));
                    wait_for_stdin();
                    // SAFETY: end the child without the parent's exit handlers.
                    unsafe { libc::_exit(0) };
                }
                child if child > 0 => {}
                _ => panic!("fork: {}", std::io::Error::last_os_error()),
            }
            if let Some(title) = args.iter().find_map(|a| a.strip_prefix("rename=")) {
                std::thread::sleep(Duration::from_millis(300));
                set_comm(title);
                say("renamed");
            }
            wait_for_stdin();
        }
        // burst-server NAME DEVICE N: a service process named NAME that forks N workers
        // (comm "gpu-worker") holding DEVICE; every second one forks a leaf of its own (comm
        // "gpu-leaf") holding DEVICE too. Prints "worker <pid>" and "leaf <pid> <worker>"
        // as each holds it, then "ready". A worker with a leaf, on SIGTERM, prints
        // "term <pid> leaf-gone" if its leaf had already exited (else "leaf-alive") and
        // exits: what a reclaim that goes leaves first must make it say. All stay until
        // stdin closes.
        "burst-server" => {
            let name = arg(&args, 2, "name");
            let device = arg(&args, 3, "device");
            let n: usize = arg(&args, 4, "count").parse().expect("count");
            let slow = args.iter().any(|a| a == "slow-leaves");
            set_comm(&name);
            for i in 0..n {
                burst_worker(&device, i % 2 == 1, slow);
            }
            say("ready");
            wait_for_stdin();
        }
        // leader-exit-server NAME DEVICE [worker-too]: a service process named NAME that forks
        // a worker (comm "gpu-worker") holding DEVICE, which prints "worker <pid>". At its
        // first stdin line the server's main thread exits on its own (it shows as `Z` in
        // /proc) while another thread keeps serving: the process lives on; it prints
        // "leader exited" just before. With `worker-too`, the worker's main thread exits the
        // same way at once, another of its threads holding DEVICE. Both live until killed.
        "leader-exit-server" => {
            let name = arg(&args, 2, "name");
            let device = arg(&args, 3, "device");
            let worker_too = args.iter().any(|a| a == "worker-too");
            set_comm(&name);
            // SAFETY: single-threaded here; the child only opens a file, starts a thread and
            // sleeps.
            match unsafe { libc::fork() } {
                0 => {
                    set_comm("gpu-worker");
                    let file = std::fs::File::open(&device)
                        .unwrap_or_else(|e| panic!("open {device}: {e}"));
                    let holder = std::thread::spawn(move || {
                        let _held = file;
                        loop {
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                    });
                    say(&format!("worker {}", std::process::id()));
                    if worker_too {
                        exit_this_thread();
                    }
                    let _ = holder.join();
                }
                child if child > 0 => {}
                _ => panic!("fork: {}", std::io::Error::last_os_error()),
            }
            let _serving = std::thread::spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            });
            wait_for_stdin();
            say("leader exited");
            exit_this_thread();
        }
        // conn-server NAME ADDR DEVICE: a service named NAME that accepts connections and
        // forks a worker per connection holding the connection and DEVICE; prints
        // "worker <pid> <peer port>" per connection. Never reads the sockets.
        "conn-server" => {
            let name = arg(&args, 2, "name");
            let addr: SocketAddr = arg(&args, 3, "address").parse().expect("address");
            let device = arg(&args, 4, "device");
            set_comm(&name);
            let listener = TcpListener::bind(addr).expect("bind");
            say(&format!(
                "listening {}",
                listener.local_addr().expect("addr")
            ));
            loop {
                let (conn, peer) = listener.accept().expect("accept");
                // SAFETY: single-threaded; the child opens a file and waits.
                match unsafe { libc::fork() } {
                    0 => {
                        set_comm("gpu-worker");
                        drop(listener);
                        let _file = std::fs::File::open(&device)
                            .unwrap_or_else(|e| panic!("open {device}: {e}"));
                        let _conn = conn;
                        say(&format!("worker {} {}", std::process::id(), peer.port()));
                        std::thread::sleep(Duration::from_secs(600));
                        // SAFETY: end the child without the parent's exit handlers.
                        unsafe { libc::_exit(0) };
                    }
                    child if child > 0 => drop(conn),
                    _ => panic!("fork: {}", std::io::Error::last_os_error()),
                }
            }
        }
        // keep-conns NAME ADDR N: a service process named NAME that accepts N connections and
        // keeps them all open, never reading; prints "accepted N", then waits for stdin.
        "keep-conns" => {
            let name = arg(&args, 2, "name");
            let addr: SocketAddr = arg(&args, 3, "address").parse().expect("address");
            let n: usize = arg(&args, 4, "count").parse().expect("count");
            set_comm(&name);
            let listener = TcpListener::bind(addr).expect("bind");
            say("listening");
            let conns: Vec<_> = (0..n)
                .map(|_| listener.accept().expect("accept").0)
                .collect();
            say(&format!("accepted {}", conns.len()));
            wait_for_stdin();
        }
        // clients ADDR N: opens N connections to ADDR and keeps them, never writing; prints
        // "connected N", then waits for stdin.
        "clients" => {
            let addr: SocketAddr = arg(&args, 2, "address").parse().expect("address");
            let n: usize = arg(&args, 3, "count").parse().expect("count");
            let conns: Vec<std::net::TcpStream> = (0..n)
                .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                .collect();
            say(&format!("connected {}", conns.len()));
            wait_for_stdin();
        }
        // roots NAME N: N processes named NAME (each a service root of its own), which live
        // until stdin closes; prints "roots N" once all are named.
        "roots" => {
            let name = arg(&args, 2, "name");
            let n: usize = arg(&args, 3, "count").parse().expect("count");
            let mut pipe = [0i32; 2];
            // SAFETY: a valid array of two fds.
            assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0, "pipe");
            let mut children = Vec::with_capacity(n);
            for _ in 0..n {
                // SAFETY: single-threaded; the child renames itself and blocks on the pipe.
                match unsafe { libc::fork() } {
                    0 => {
                        set_comm(&name);
                        let mut b = [0u8; 1];
                        // SAFETY: closing our copy of the write end, then a blocking read
                        // that returns at EOF, when the parent exits.
                        unsafe {
                            libc::close(pipe[1]);
                            libc::read(pipe[0], b.as_mut_ptr().cast(), 1);
                            libc::_exit(0);
                        }
                    }
                    p if p > 0 => children.push(p),
                    _ => panic!("fork: {}", std::io::Error::last_os_error()),
                }
            }
            say(&format!("roots {}", children.len()));
            wait_for_stdin();
            // SAFETY: closing the write end wakes every child.
            unsafe { libc::close(pipe[1]) };
            for p in children {
                let mut status = 0;
                // SAFETY: valid pointer; our own children.
                unsafe { libc::waitpid(p, &mut status, 0) };
            }
        }
        // api-as-nobody SOCKET PID [dry-run]: as uid/gid 65534, ask the API for its status and
        // to reclaim PID; prints "status <code>" and "reclaim <code>" (gRPC code names).
        "api-as-nobody" => {
            let socket = arg(&args, 2, "socket");
            let pid: u32 = arg(&args, 3, "pid").parse().expect("pid");
            let dry_run = args.get(4).is_some_and(|a| a == "dry-run");
            // SAFETY: dropping privileges in a single-threaded process, group first.
            unsafe {
                assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
                assert_eq!(libc::setgid(65534), 0, "setgid");
                assert_eq!(libc::setuid(65534), 0, "setuid");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use reclaimd::api::pb;
                let mut c = reclaimd::api::client::connect(std::path::Path::new(&socket))
                    .await
                    .expect("connect as nobody");
                let code = |r: Result<(), tonic::Status>| match r {
                    Ok(()) => "Ok".to_owned(),
                    Err(s) => format!("{:?}", s.code()),
                };
                let status = c.get_status(pb::GetStatusRequest {}).await.map(|_| ());
                say(&format!("status {}", code(status)));
                let reclaim = c
                    .reclaim(pb::ReclaimRequest {
                        pid,
                        dry_run,
                        reason: "test: asked as nobody".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ());
                say(&format!("reclaim {}", code(reclaim)));
            });
        }
        // demo-service STATE DEVICE_LINE DEVICE_FILE: the demo's synthetic GPU service, until
        // killed. Over and over: a server (comm demo-llm) forks 1-3 workers (demo-worker)
        // that hold DEVICE_FILE and 0.5-4 GiB in the fake NVML STATE, then crashes after a
        // few seconds, leaving them orphaned; now and then a worker lets go by itself.
        "demo-service" => {
            let state = arg(&args, 2, "state file");
            let device_line = arg(&args, 3, "device line");
            let device = arg(&args, 4, "device file");
            demo::run(&state, &device_line, &device);
        }
        // cuda-hold MIB: allocate MIB of GPU memory through the CUDA driver API (libcuda,
        // shipped with the driver) and keep it until stdin closes.
        "cuda-hold" => {
            let mib: usize = arg(&args, 2, "MiB").parse().expect("MiB");
            cuda::hold(mib << 20);
            say(&format!("holding {mib}"));
            wait_for_stdin();
        }
        // exit-gen RATE SECONDS LIFE_MS: forks children (comm "exitgen") at RATE per second
        // for SECONDS; each lives LIFE_MS, then writes "PID MONO_NS" (CLOCK_MONOTONIC just
        // before it exits) to stdout in one write, and exits. Ends with "done FORKS NS" (the
        // forks made and the time the fork loop took) once every child is gone.
        "exit-gen" => {
            let rate: f64 = arg(&args, 2, "rate").parse().expect("rate");
            let secs: f64 = arg(&args, 3, "seconds").parse().expect("seconds");
            let life: u64 = arg(&args, 4, "life ms").parse().expect("life ms");
            bench::exit_gen(rate, secs, Duration::from_millis(life));
        }
        // poll-reaper NVML_LIB SERVICE_COMM INTERVAL_MS: the usual cron-and-nvidia-smi
        // reaper, as a loop. Every INTERVAL_MS: list NVML's compute processes; SIGKILL each
        // whose parent is gone (re-parented) or is not SERVICE_COMM; then poll NVML until it
        // no longer lists them, and print "reclaimed PID MONO_NS". Until stdin closes.
        "poll-reaper" => {
            let lib = arg(&args, 2, "NVML library");
            let comm = arg(&args, 3, "service comm");
            let every: u64 = arg(&args, 4, "interval ms").parse().expect("interval ms");
            bench::poll_reaper(&lib, &comm, Duration::from_millis(every));
        }
        // http NAME ADDR: a minimal HTTP/1.1 responder named NAME (keep-alive, a thread per
        // connection, "ok" to every request); prints "listening ADDR". Until stdin closes.
        "http" => {
            let name = arg(&args, 2, "name");
            let addr: SocketAddr = arg(&args, 3, "address").parse().expect("address");
            set_comm(&name);
            bench::http(addr);
        }
        // sink NAME ADDR: a service named NAME that accepts connections and closes each at
        // once; prints "listening ADDR". Until stdin closes.
        "sink" => {
            let name = arg(&args, 2, "name");
            let addr: SocketAddr = arg(&args, 3, "address").parse().expect("address");
            set_comm(&name);
            bench::sink(addr);
        }
        // churn ADDR RATE SECONDS: connects to ADDR at RATE per second for SECONDS; each
        // connection waits for the server's close, then closes and prints "PORT MONO_NS"
        // (its local port, CLOCK_MONOTONIC after the close). Ends with "done N NS".
        "churn" => {
            let addr: SocketAddr = arg(&args, 2, "address").parse().expect("address");
            let rate: f64 = arg(&args, 3, "rate").parse().expect("rate");
            let secs: f64 = arg(&args, 4, "seconds").parse().expect("seconds");
            bench::churn(addr, rate, secs);
        }
        other => panic!("unknown subcommand {other}"),
    }
}

/// The helpers of `cargo xtask bench`: load generators and the peers it compares with.
mod bench {
    use std::{
        ffi::OsStr,
        io::{BufWriter, Read, Write},
        net::{SocketAddr, TcpListener, TcpStream},
        time::{Duration, Instant},
    };

    use super::{say, set_comm, wait_for_stdin};

    fn mono_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Calls `one` `rate * secs` times, spread evenly from now on (catching up flat out
    /// when behind); returns the count and the time it took.
    fn pace(rate: f64, secs: f64, mut one: impl FnMut()) -> (u64, Duration) {
        let total = (rate * secs).round() as u64;
        let start = Instant::now();
        let mut n = 0;
        while n < total {
            let elapsed = start.elapsed().as_secs_f64();
            let due = ((elapsed * rate) as u64 + 1).min(total);
            if n < due {
                while n < due {
                    one();
                    n += 1;
                }
            } else {
                let ahead = n as f64 / rate - elapsed;
                std::thread::sleep(Duration::from_secs_f64(ahead.clamp(0.0, 0.001)));
            }
        }
        (n, start.elapsed())
    }

    pub fn exit_gen(rate: f64, secs: f64, life: Duration) {
        set_comm("exitgen");
        // Children are reaped by the kernel: no zombies, however fast they come.
        // SAFETY: ignoring SIGCHLD is always sound.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
        let (n, took) = pace(rate, secs, || {
            loop {
                // SAFETY: single-threaded; the child sleeps, writes one line and exits.
                match unsafe { libc::fork() } {
                    0 => child(life),
                    p if p > 0 => return,
                    // EAGAIN: too many processes for now.
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        // With SIGCHLD ignored, wait returns only once every child is gone.
        // SAFETY: a null status pointer is allowed.
        while unsafe { libc::wait(std::ptr::null_mut()) } > 0
            || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        say(&format!("done {n} {}", took.as_nanos()));
    }

    fn child(life: Duration) -> ! {
        if !life.is_zero() {
            std::thread::sleep(life);
        }
        let line = format!("{} {}\n", std::process::id(), mono_ns());
        // SAFETY: one write of a buffer we own (atomic on a pipe below PIPE_BUF), then an
        // exit without the parent's handlers.
        unsafe {
            libc::write(1, line.as_ptr().cast(), line.len());
            libc::_exit(0)
        }
    }

    fn compute_pids(dev: &nvml_wrapper::Device) -> Option<Vec<u32>> {
        dev.running_compute_processes()
            .or_else(|_| dev.running_compute_processes_v2())
            .ok()
            .map(|v| v.into_iter().map(|p| p.pid).collect())
    }

    /// The reaper's test: the holder's parent is init, or not the service any more.
    fn orphaned(pid: u32, service_comm: &str) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            return false;
        };
        ppid == 1
            || std::fs::read_to_string(format!("/proc/{ppid}/comm"))
                .map(|c| c.trim() != service_comm)
                .unwrap_or(true)
    }

    pub fn poll_reaper(lib: &str, service_comm: &str, every: Duration) {
        let nvml = nvml_wrapper::Nvml::builder()
            .lib_path(OsStr::new(lib))
            .init()
            .expect("NVML init");
        std::thread::spawn(|| {
            wait_for_stdin();
            std::process::exit(0);
        });
        say("ready");
        loop {
            let tick = Instant::now();
            let mut killed = Vec::new();
            for i in 0..nvml.device_count().unwrap_or(0) {
                let Ok(dev) = nvml.device_by_index(i) else {
                    continue;
                };
                for pid in compute_pids(&dev).unwrap_or_default() {
                    if orphaned(pid, service_comm) {
                        // SAFETY: kill has no memory arguments.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        killed.push((i, pid));
                    }
                }
            }
            for (i, pid) in killed {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let listed = nvml
                        .device_by_index(i)
                        .ok()
                        .and_then(|d| compute_pids(&d))
                        .is_some_and(|p| p.contains(&pid));
                    if !listed {
                        say(&format!("reclaimed {pid} {}", mono_ns()));
                        break;
                    }
                    if Instant::now() > deadline {
                        say(&format!("stuck {pid}"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            std::thread::sleep(every.saturating_sub(tick.elapsed()));
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

    pub fn http(addr: SocketAddr) {
        let listener = TcpListener::bind(addr).expect("bind");
        say(&format!(
            "listening {}",
            listener.local_addr().expect("addr")
        ));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || serve_http(conn));
            }
        });
        wait_for_stdin();
    }

    fn serve_http(mut conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let mut buf = vec![0u8; 16 * 1024];
        let mut have = 0;
        loop {
            match conn.read(&mut buf[have..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
            let mut start = 0;
            while let Some(end) = buf[start..have].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[start..start + end]).to_lowercase();
                if conn.write_all(OK).is_err() || head.contains("connection: close") {
                    return;
                }
                start += end + 4;
            }
            buf.copy_within(start..have, 0);
            have -= start;
            if have == buf.len() {
                return; // a request head larger than the buffer
            }
        }
    }

    pub fn sink(addr: SocketAddr) {
        let listener = TcpListener::bind(addr).expect("bind");
        say(&format!(
            "listening {}",
            listener.local_addr().expect("addr")
        ));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        wait_for_stdin();
    }

    pub fn churn(addr: SocketAddr, rate: f64, secs: f64) {
        let mut out = BufWriter::new(std::io::stdout().lock());
        let mut failed = 0u64;
        let (n, took) = pace(rate, secs, || match TcpStream::connect(addr) {
            Ok(mut c) => {
                let port = c.local_addr().map(|a| a.port()).unwrap_or(0);
                let mut b = [0u8; 16];
                while c.read(&mut b).is_ok_and(|n| n > 0) {}
                drop(c);
                let _ = writeln!(out, "{port} {}", mono_ns());
            }
            Err(_) => failed += 1,
        });
        let _ = writeln!(out, "done {n} {} {failed}", took.as_nanos());
        let _ = out.flush();
    }
}
