//! The container itself, in a helper process of its own (single-threaded, so that `unshare`
//! and `fork` are safe): new mount, pid, uts and ipc namespaces; the image mounted with
//! overlayfs inside the new mount namespace (so nothing stays mounted when the container is
//! gone, even if it is killed); `/proc`, a minimal `/dev` and a read-only `/sys`; `pivot_root`;
//! then a small init (pid 1) that forwards signals to the workload and reaps orphans, and the
//! workload with the image's user, environment and working directory.
//!
//! This is the syscall boundary of the crate: every `unsafe` block is here.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::spec::ContainerSpec;
use crate::users::{Credentials, resolve};

/// The process signals are forwarded to.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The signals passed on to the workload.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Holds the forwarded signals back (they stay pending) until [`release_signals`]: blocked
/// across a fork, a signal that arrives before the parent forwards it is delivered once it
/// does, not lost. Lost, it would be ignored by the container's pid 1, which has no default
/// action for it. Returns the mask to restore.
fn hold_signals() -> libc::sigset_t {
    // SAFETY: both sets are initialised by sigemptyset before use; sigprocmask only reads and
    // writes them.
    unsafe {
        let mut held: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut held);
        for signal in FORWARDED {
            libc::sigaddset(&mut held, signal);
        }
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut previous);
        libc::sigprocmask(libc::SIG_BLOCK, &held, &mut previous);
        previous
    }
}

/// Restores the mask [`hold_signals`] returned: pending signals are delivered now.
fn release_signals(previous: &libc::sigset_t) {
    // SAFETY: `previous` is a mask sigprocmask filled in.
    unsafe {
        libc::sigprocmask(libc::SIG_SETMASK, previous, std::ptr::null_mut());
    }
}

/// Every signal back to its default action, and none blocked.
fn default_signals() {
    for signal in 1..libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting a signal's disposition to SIG_DFL has no memory-safety
        // preconditions; numbers the kernel refuses return an error that is ignored.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
    // SAFETY: the set is initialised by sigemptyset before sigprocmask reads it.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Forwards the usual termination signals to `pid` from now on.
fn forward_signals_to(pid: i32) {
    FORWARD_TO.store(pid, Ordering::SeqCst);
    for signal in FORWARDED {
        // SAFETY: the handler only loads an atomic and calls kill, both async-signal-safe; the
        // sigaction struct is zeroed and then filled in.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn check(result: libc::c_int, what: &str) -> Result<(), String> {
    if result < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in paths")
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let (source_c, fstype_c, data_c) = (
        CString::new(source).expect("no NUL"),
        CString::new(fstype).expect("no NUL"),
        CString::new(data).expect("no NUL"),
    );
    let target_c = cstring(target);
    // SAFETY: every pointer is a NUL-terminated string alive for the call.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    check(
        result,
        &format!("mounting {fstype} at {}", target.display()),
    )
}

/// Exit status of a waited-for process, shell style (128 + signal for a signalled one).
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Waits for `pid`, reaping any other child on the way; returns its exit code.
fn wait_for(pid: i32) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a valid int.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            return exit_code(status);
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}

/// Runs the container described by `spec`; returns the workload's exit code. Call it from a
/// fresh single-threaded process.
pub fn run(spec: &ContainerSpec) -> i32 {
    match start(spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazylayer run: {e}");
            125
        }
    }
}

fn start(spec: &ContainerSpec) -> Result<i32, String> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID;
    // SAFETY: unshare has no memory preconditions; the process is single-threaded.
    check(unsafe { libc::unshare(flags) }, "unshare")?;
    // Nothing mounted from here on propagates back to the host.
    mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )?;
    std::fs::create_dir_all(&spec.rootfs)
        .map_err(|e| format!("creating {}: {e}", spec.rootfs.display()))?;
    lazylayer_overlay::mount(
        &lazylayer_overlay::OverlaySpec {
            lowers: spec.lowers.clone(),
            upper: spec.upper.clone(),
            work: spec.work.clone(),
        },
        &spec.rootfs,
    )
    .map_err(|e| e.to_string())?;
    let credentials = resolve(&spec.rootfs, &spec.user)?;
    let mask = hold_signals();
    // SAFETY: the process is single-threaded, so the child may run arbitrary code after fork.
    let child = unsafe { libc::fork() };
    match child {
        -1 => {
            release_signals(&mask);
            Err(format!("fork: {}", std::io::Error::last_os_error()))
        }
        0 => {
            // Held until pid 1 forwards them, after its own fork of the workload.
            let code = match init(spec, &credentials, &mask) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("lazylayer run: {e}");
                    125
                }
            };
            // SAFETY: _exit ends the process without running the parent's destructors twice.
            unsafe { libc::_exit(code) }
        }
        pid => {
            forward_signals_to(pid);
            release_signals(&mask);
            Ok(wait_for(pid))
        }
    }
}

/// Pid 1 of the container: the filesystem view, then the workload, then reaping.
fn init(
    spec: &ContainerSpec,
    credentials: &Credentials,
    mask: &libc::sigset_t,
) -> Result<i32, String> {
    // If the helper dies (its own parent, `lazylayer run`, was killed), so does the container:
    // pid 1 going takes every process of the namespace with it, and the mount namespace with
    // the image's overlay goes too.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let hostname = CString::new(spec.hostname.clone()).expect("no NUL");
    // SAFETY: the pointer and length describe a live string.
    let named = unsafe { libc::sethostname(hostname.as_ptr(), spec.hostname.len()) };
    check(named, "sethostname")?;
    let root = &spec.rootfs;
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for dir in ["proc", "dev", "sys"] {
        let _ = std::fs::create_dir_all(root.join(dir));
    }
    mount("proc", &root.join("proc"), "proc", nosuid_nodev_noexec, "")?;
    mount(
        "tmpfs",
        &root.join("dev"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = cstring(&root.join("dev").join(name));
        // SAFETY: the path is a NUL-terminated string alive for the call.
        let made = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        check(made, &format!("mknod /dev/{name}"))?;
        // mknod is subject to the umask; make the mode what containers expect.
        // SAFETY: as above.
        unsafe {
            libc::chmod(path.as_ptr(), 0o666);
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, root.join("dev").join(link))
            .map_err(|e| format!("/dev/{link}: {e}"))?;
    }
    for dir in ["pts", "shm"] {
        std::fs::create_dir(root.join("dev").join(dir)).map_err(|e| format!("/dev/{dir}: {e}"))?;
    }
    mount(
        "devpts",
        &root.join("dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount(
        "shm",
        &root.join("dev/shm"),
        "tmpfs",
        nosuid_nodev_noexec,
        "mode=1777,size=65536k",
    )?;
    mount(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        nosuid_nodev_noexec | libc::MS_RDONLY,
        "",
    )?;
    // pivot_root(".", "."): the old root ends up on top of the new one and is then detached.
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: both arguments are NUL-terminated strings alive for the call.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(pivoted as libc::c_int, "pivot_root")?;
    // SAFETY: as above.
    let detached = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(detached, "detaching the old root")?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    // The forwarded signals are still held (since the helper's fork): one sent meanwhile
    // reaches the workload once it exists.
    // SAFETY: the process is single-threaded, so the child may run arbitrary code after fork.
    let workload = unsafe { libc::fork() };
    match workload {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            // The workload starts as a container's process does: every signal at its default
            // and none blocked, whatever the caller of `lazylayer run` ignored (a `nohup`, a
            // background job of a script: an ignored SIGINT would survive exec and the
            // forwarded Ctrl-C would do nothing).
            default_signals();
            let error = exec(spec, credentials);
            eprintln!("lazylayer run: {error}");
            // SAFETY: _exit ends the child without running destructors.
            unsafe {
                libc::_exit(if error.contains("not found") {
                    127
                } else {
                    126
                })
            }
        }
        pid => {
            forward_signals_to(pid);
            release_signals(mask);
            Ok(wait_for(pid))
        }
    }
}

/// Becomes the workload; returns only with the reason it could not.
fn exec(spec: &ContainerSpec, credentials: &Credentials) -> String {
    let groups: Vec<libc::gid_t> = credentials.groups.clone();
    // SAFETY: the pointer and length describe a live vector; ids are plain integers.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) < 0
            || libc::setgid(credentials.gid) < 0
            || libc::setuid(credentials.uid) < 0
        {
            return format!(
                "switching to user {:?}: {}",
                spec.user,
                std::io::Error::last_os_error()
            );
        }
    }
    if let Err(e) = std::env::set_current_dir(&spec.cwd) {
        return format!("working directory {}: {e}", spec.cwd);
    }
    let Some(program) = spec.args.first() else {
        return "no command to run (the image has no Entrypoint or Cmd; give one after --)".into();
    };
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let resolved = if program.contains('/') {
        Some(std::path::PathBuf::from(program))
    } else {
        path.split(':')
            .map(|dir| Path::new(dir).join(program))
            .find(|candidate| std::fs::metadata(candidate).is_ok_and(|m| m.is_file()))
    };
    let Some(resolved) = resolved else {
        return format!("{program}: command not found");
    };
    let mut env = spec.env.clone();
    if let Some(home) = &credentials.home {
        env.retain(|e| !e.starts_with("HOME="));
        env.push(format!("HOME={home}"));
    }
    let file = cstring(&resolved);
    let args: Vec<CString> = spec
        .args
        .iter()
        .map(|a| CString::new(a.as_str()).unwrap_or_default())
        .collect();
    let env: Vec<CString> = env
        .iter()
        .map(|e| CString::new(e.as_str()).unwrap_or_default())
        .collect();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // Default signal dispositions for the workload (the init's handlers do not survive exec,
    // but ignored signals would).
    // SAFETY: argv and envp are NULL-terminated arrays of NUL-terminated strings that outlive
    // the call (which does not return on success).
    unsafe {
        libc::execve(file.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    format!(
        "{}: {}",
        resolved.display(),
        std::io::Error::last_os_error()
    )
}
