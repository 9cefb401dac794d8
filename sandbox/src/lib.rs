//! fleetmap's sandbox: the one place where user code is started.
//!
//! [`spawn_worker`] is the only function in fleetmap that starts a process
//! running user code; every slot's worker goes through it, so whatever
//! isolation a slot gets (its own process group, a parent-death signal, and
//! its slot's cgroup, `no_new_privs`) is applied in one place, in the child,
//! before `exec`. [`cgroup`] makes the slots' cgroups.
//!
//! `unsafe` code and raw system calls live here and nowhere else in
//! fleetmap. System calls go through `nix` where it wraps them safely; the
//! few left to `libc` (`dup2` onto a fixed descriptor, `fstat` of a number
//! not yet known to be open, the `FIONREAD` ioctl, `bpf`) are in `unsafe`
//! blocks that each say why they are sound. This crate must not depend on
//! the network, the protocol or pyo3.
// The one crate where unsafe lives (the workspace denies it elsewhere):
// fork/exec set-up, raw descriptors, ioctl and bpf.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cgroup;
pub mod image_root;
#[cfg(test)]
mod test_host;

use std::{
    ffi::OsString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
    process::Stdio,
};

use nix::{
    fcntl::{fcntl, FcntlArg, FdFlag},
    mount::{mount, MsFlags},
    sched::{sched_getaffinity, sched_setaffinity, unshare, CloneFlags, CpuSet},
    sys::{
        prctl,
        signal::{killpg, Signal},
    },
    unistd::{self, Gid, Pid, Uid, User},
};

/// The descriptor on which a worker finds its channel to the node daemon.
pub const WORKER_CHANNEL_FD: i32 = 3;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    #[error("could not create the worker channel: {0}")]
    Channel(#[source] std::io::Error),
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no user {0:?} in the user database (files, LDAP, SSSD, ...: what getpwnam sees); give an existing user or UID:GID")]
    NoSuchUser(String),
    #[error("could not look up user {name:?}: {source}")]
    UserLookup {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("could not pin a worker to its cores: {0}")]
    Affinity(String),
    #[error("descriptor {fd} is not a socket inherited from the node daemon: {reason}")]
    NotAChannel { fd: i32, reason: String },
}

/// What to run in a slot.
#[derive(Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The worker's whole environment: nothing of the daemon's own is
    /// inherited (its join token, its credentials).
    pub env: Vec<(OsString, OsString)>,
    /// `cgroup.procs` files of the slot's cgroup, opened for writing
    /// ([`cgroup::SlotCgroup::procs_files`]): the worker writes `"0"` into
    /// each before `exec`, so it runs inside its cgroup from its first
    /// instruction. Empty: the worker stays in the daemon's cgroups.
    pub cgroup_procs: Vec<std::fs::File>,
    /// The cores the worker may run on (`sched_setaffinity` before `exec`).
    /// This pins a slot to its cores even where the daemon may not manage
    /// cgroups. Empty: no change.
    pub cpu_affinity: Vec<u32>,
    /// Run as this `(uid, gid)` rather than the daemon's user (no
    /// supplementary groups). The cgroup is joined first, as the daemon.
    pub run_as: Option<(u32, u32)>,
    /// Give the worker its own mount namespace with empty tmpfs on `/tmp`
    /// and `/dev/shm`, so calls of different jobs never see each other's
    /// files; a worker that runs as another user (`run_as`) also gets a
    /// `/proc` showing only its user's processes (`hidepid=2`).
    pub private_tmp: bool,
    /// Run in this image's file system, made the worker's `/` in a mount
    /// namespace of its own (with a private `/tmp` whatever `private_tmp`
    /// says). `program` is a path inside the image.
    pub image: Option<image_root::ImageRoot>,
    /// Confine the worker further, as a fleet node's calls are (needs
    /// root): PID and cgroup namespaces of its own (it sees only its own
    /// processes, cannot name the daemon's, and its cgroup is its `/`), a
    /// fresh `/proc`, `/sys` (the cgroup tree included) read-only, and its
    /// private `/tmp` (or, without one, `/`) as its working directory.
    ///
    /// The worker is then three processes: a keeper in the daemon's PID
    /// namespace (the [`Worker::pid`] the daemon knows, which exits as the
    /// interpreter does), the new namespace's init (PID 1, which reaps
    /// whatever the call orphans), and the interpreter (PID 2).
    pub own_namespaces: bool,
}

/// How many processes a worker started with `own_namespaces` is made of
/// while it runs nothing else: its keeper, its namespace's init and its
/// interpreter.
pub const CONFINED_WORKER_PROCESSES: usize = 3;

/// A running worker. Dropping it kills the worker's whole process group.
pub struct Worker {
    pub child: tokio::process::Child,
    /// The daemon's end of the worker channel, and the worker's output
    /// pipes: `Option`s so the daemon can take them (the worker itself stays
    /// owned, so that dropping it still kills the process group).
    pub channel: Option<tokio::net::UnixStream>,
    pub stdout: Option<tokio::process::ChildStdout>,
    pub stderr: Option<tokio::process::ChildStderr>,
    pub pid: u32,
}

impl Worker {
    /// Kills every process of the worker (it leads its own process group).
    pub fn kill(&self) {
        kill_group(self.pid);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The worker leads its own process group (`process_group(0)` at spawn), so
/// its pid names exactly the worker and its descendants; the group id cannot
/// be reused while the worker is our unreaped child or zombie.
fn kill_group(pid: u32) {
    // killpg(0) would signal the daemon's own group: a pid of 0 (a worker
    // whose pid was never known) names no worker.
    let Ok(pgid) = i32::try_from(pid) else {
        return;
    };
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Starts a worker process with its channel on [`WORKER_CHANNEL_FD`], in its
/// own process group, killed if the daemon thread that spawned it dies.
///
/// Must be called from a thread that lives as long as the worker (a tokio
/// worker thread, not a blocking-pool thread): the parent-death signal fires
/// when the spawning thread exits.
pub fn spawn_worker(cmd: &WorkerCommand) -> Result<Worker, SandboxError> {
    let (ours, theirs) = UnixStream::pair().map_err(SandboxError::Channel)?;
    let spawn_error = |source| SandboxError::Spawn {
        // The child reports only an errno: say which steps can have failed
        // (joining the cgroup, changing user).
        program: match (&cmd.image, cmd.cgroup_procs.is_empty()) {
            (Some(image), _) if image.rootless => format!(
                "{} in its image {} (as a user other than root, which needs unprivileged user namespaces: \
                 sysctl user.max_user_namespaces > 0, and kernel.unprivileged_userns_clone=1 or \
                 kernel.apparmor_restrict_unprivileged_userns=0 where those exist)",
                cmd.program.display(),
                image.rootfs.display()
            ),
            (Some(image), _) => format!("{} in its image {}", cmd.program.display(), image.rootfs.display()),
            (None, true) => cmd.program.display().to_string(),
            (None, false) => format!("{} in its slot's cgroup", cmd.program.display()),
        } + &match cmd.run_as {
            Some((uid, gid)) => format!(" as uid {uid}:{gid} (which must be able to read and run it)"),
            None => String::new(),
        },
        source,
    };
    let setup = ChildSetup {
        // Copies the closure below owns, so that they are open in the child
        // whatever happens to `cmd`; they close with `command`.
        cgroup_procs: cmd
            .cgroup_procs
            .iter()
            .map(File::try_clone)
            .collect::<io::Result<_>>()
            .map_err(spawn_error)?,
        channel: Some(theirs.into()),
        affinity: cpu_set(&cmd.cpu_affinity),
        run_as: cmd.run_as.map(|(uid, gid)| (Uid::from_raw(uid), Gid::from_raw(gid))),
        private_tmp: cmd.private_tmp,
        own_namespaces: cmd.own_namespaces,
        root: cmd
            .image
            .as_ref()
            .map(image_root::RootSteps::new)
            .transpose()
            .map_err(spawn_error)?,
        last_capability: last_capability(),
    };
    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed. `ChildSetup::enter` makes only
    // system calls (write, sched_setaffinity, dup2, fcntl, unshare, mount,
    // mkdir, open, symlinkat, chdir, pivot_root, umount2, setgroups, setgid,
    // setuid, prctl), on values made before fork, and
    // allocates nothing: errors are errno values. Every descriptor it uses
    // is owned by `setup`, which the closure owns, so each is open in the
    // child.
    unsafe {
        command.pre_exec(move || setup.enter());
    }
    let spawned = command.spawn();
    // The daemon's copies of the worker's end of the channel and of the
    // cgroup files are in the closure: close them now, so that the channel
    // reports the worker's end when the worker closes it.
    drop(command);
    let mut child = spawned.map_err(spawn_error)?;
    let pid = child.id().unwrap_or(0);
    // The pipes were requested above, so they are present.
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    ours.set_nonblocking(true).map_err(SandboxError::Channel)?;
    let channel = tokio::net::UnixStream::from_std(ours).map_err(SandboxError::Channel)?;
    Ok(Worker {
        child,
        channel: Some(channel),
        stdout: Some(stdout),
        stderr: Some(stderr),
        pid,
    })
}

/// What the child does between `fork` and `exec`, with everything it needs
/// made before `fork`.
struct ChildSetup {
    /// The slot's `cgroup.procs` files.
    cgroup_procs: Vec<File>,
    /// The worker's end of its channel, to become [`WORKER_CHANNEL_FD`]
    /// (`None` for a helper process, which has no channel).
    channel: Option<OwnedFd>,
    affinity: Option<CpuSet>,
    run_as: Option<(Uid, Gid)>,
    private_tmp: bool,
    own_namespaces: bool,
    /// The image root to enter, as system calls made before fork.
    root: Option<image_root::RootSteps>,
    /// The highest capability number the kernel knows, read before fork.
    last_capability: i32,
}

impl ChildSetup {
    /// Runs in the child between `fork` and `exec`: one system call per
    /// step, no allocation (the strings for mount(2) are literals).
    fn enter(&self) -> io::Result<()> {
        // Join the slot's cgroup first, so that nothing the child does, the
        // exec included, is outside it. "0" names the writer.
        for file in &self.cgroup_procs {
            unistd::write(file, b"0")?;
        }
        if let Some(set) = &self.affinity {
            sched_setaffinity(Pid::from_raw(0), set)?;
        }
        if let Some(channel) = &self.channel {
            Self::place_channel(channel)?;
        }
        if self.own_namespaces {
            // Returns only in the process that goes on to exec.
            Self::enter_pid_namespace()?;
        }
        if let Some(root) = &self.root {
            root.enter()?;
        } else if self.private_tmp || self.own_namespaces {
            unshare(CloneFlags::CLONE_NEWNS)?;
            // Keep the new /tmp (and everything else) from propagating back
            // to the daemon's namespace.
            mount(
                None::<&std::ffi::CStr>,
                c"/",
                None::<&std::ffi::CStr>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&std::ffi::CStr>,
            )?;
            if self.private_tmp {
                mount(
                    Some(c"tmpfs"),
                    c"/tmp",
                    Some(c"tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(c"mode=1777"),
                )?;
                // POSIX shared memory too: nothing a call leaves there
                // reaches another.
                mount(
                    Some(c"tmpfs"),
                    c"/dev/shm",
                    Some(c"tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(c"mode=1777"),
                )?;
            }
            if self.run_as.is_some() || self.own_namespaces {
                // A /proc of its own, of its PID namespace where it has one,
                // that shows only the processes of the call's own user: not
                // the daemon's, not another slot's (with per-slot uids), nor
                // their command lines.
                mount(
                    Some(c"proc"),
                    c"/proc",
                    Some(c"proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    Some(c"hidepid=2"),
                )?;
            }
            if self.own_namespaces {
                Self::read_only_recursive(c"/sys")?;
                // Never the daemon's own directory: its private /tmp, or
                // else the root (where it can write nothing).
                unistd::chdir(if self.private_tmp { c"/tmp" } else { c"/" })?;
            }
        }
        if let Some((uid, gid)) = self.run_as {
            // Every capability out of the bounding and ambient sets while
            // still privileged, so that nothing the worker runs can gain one
            // back; setuid then clears the permitted and effective sets.
            Self::drop_capabilities(self.last_capability)?;
            // No supplementary groups, then the group, then the user (after
            // which the others are no longer permitted).
            unistd::setgroups(&[])?;
            unistd::setgid(gid)?;
            unistd::setuid(uid)?;
        }
        // After setuid, which clears it.
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        // No setuid or file-capability binary can raise the worker's
        // privileges, whatever it execs.
        prctl::set_no_new_privs()?;
        Ok(())
    }
    /// Moves the rest of the worker into new PID and cgroup namespaces
    /// (the cgroup joined above becomes its `/`). This process stays behind
    /// as the keeper, in the daemon's namespace; its child becomes the new
    /// namespace's init, and the init's child returns from here, as PID 2,
    /// to exec the interpreter. Keeper and init never return: they wait,
    /// and exit as the interpreter did.
    fn enter_pid_namespace() -> io::Result<()> {
        // The keeper dies with the daemon's spawning thread, the init with
        // the keeper; the interpreter's own parent-death signal is set
        // after it changes user. When the init dies, the kernel kills every
        // process of its namespace.
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWCGROUP)?;
        // SAFETY: this process is already the single-threaded child of a
        // fork; both sides of this fork go on with async-signal-safe system
        // calls only (the keeper and the init: close_range, waitpid,
        // prctl, sigaction, kill, _exit; the other: what `enter` does).
        if let unistd::ForkResult::Parent { child } = unsafe { unistd::fork() }? {
            Self::keep(child, false);
        }
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        // SAFETY: as above.
        if let unistd::ForkResult::Parent { child } = unsafe { unistd::fork() }? {
            Self::keep(child, true);
        }
        Ok(())
    }

    /// Waits for `child` and exits as it did; never returns. It holds no
    /// descriptor meanwhile, so that the worker's channel and pipes report
    /// the interpreter's end when it ends. As `init` it also reaps every
    /// process the call orphans, and reports a death by signal N as status
    /// 128 + N (PID 1 cannot raise a signal on itself); the keeper turns
    /// that back into the signal, so that the daemon sees how the
    /// interpreter died.
    fn keep(child: Pid, init: bool) -> ! {
        use nix::sys::wait::{waitpid, WaitStatus};
        close_every_descriptor();
        let signal_death = |signal: Signal| -> ! {
            // Raised again only where its default action ends the process
            // (not a stop or an ignored signal, which would leave the
            // keeper behind).
            let ends = !matches!(
                signal,
                Signal::SIGSTOP
                    | Signal::SIGTSTP
                    | Signal::SIGTTIN
                    | Signal::SIGTTOU
                    | Signal::SIGCONT
                    | Signal::SIGCHLD
                    | Signal::SIGURG
                    | Signal::SIGWINCH
            );
            if !init && ends {
                // No core file of this copy of the daemon's memory.
                let _ = prctl::set_dumpable(false);
                // SAFETY: resetting a disposition to the default touches no
                // memory of ours and installs no handler.
                let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) };
                let _ = nix::sys::signal::raise(signal);
            }
            exit_now(128 + signal as i32)
        };
        loop {
            match waitpid(if init { None } else { Some(child) }, None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                    if !init && code > 128 {
                        if let Ok(signal) = Signal::try_from(code - 128) {
                            signal_death(signal);
                        }
                    }
                    exit_now(code)
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => signal_death(signal),
                // An orphan reaped, a stop, or an interrupted wait.
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => exit_now(1),
            }
        }
    }

    /// Makes the mount at `path` and every mount below it read-only (the
    /// cgroup hierarchies under `/sys/fs/cgroup` included).
    fn read_only_recursive(path: &std::ffi::CStr) -> io::Result<()> {
        /// `struct mount_attr` of mount_setattr(2).
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        const MOUNT_ATTR_RDONLY: u64 = 1;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // nix 0.32 does not wrap mount_setattr (Linux 5.12).
        // SAFETY: the kernel reads `path` (a NUL-terminated string we
        // borrow) and `size_of::<MountAttr>()` bytes of `attr`, which we
        // own; it writes nothing of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
        // Before Linux 5.12: the mount itself and the cgroup tree's top,
        // read-only one by one (the hierarchies under it stay as they are,
        // where root's file modes still keep an unprivileged call out).
        for target in [path, c"/sys/fs/cgroup"] {
            mount(
                None::<&std::ffi::CStr>,
                target,
                None::<&std::ffi::CStr>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                None::<&std::ffi::CStr>,
            )?;
        }
        Ok(())
    }

    /// Empties the capability bounding set (capabilities `0..=last`) and the
    /// ambient set.
    fn drop_capabilities(last: i32) -> io::Result<()> {
        for cap in 0..=last {
            // nix 0.32 wraps neither PR_CAPBSET_DROP nor PR_CAP_AMBIENT.
            // SAFETY: prctl with integer arguments touches no memory of
            // ours; an unknown capability number is reported as EINVAL.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } == -1 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINVAL) {
                    return Err(err);
                }
            }
        }
        // SAFETY: as above: integer arguments only.
        if unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        } == -1
        {
            let err = io::Error::last_os_error();
            // Kernels before 4.3 have no ambient set.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Puts the worker's channel on [`WORKER_CHANNEL_FD`], open across exec.
    fn place_channel(channel: &OwnedFd) -> io::Result<()> {
        if channel.as_raw_fd() == WORKER_CHANNEL_FD {
            // dup2 onto itself keeps FD_CLOEXEC: clear it by hand.
            fcntl(channel, FcntlArg::F_SETFD(FdFlag::empty()))?;
            return Ok(());
        }
        // nix's safe dup2 wants an OwnedFd for the target, and its dup2_raw
        // (0.32) wraps a failed call's -1 in an OwnedFd, so this one stays
        // libc.
        // SAFETY: dup2 takes two integers and touches no memory. The channel
        // is open (owned by the caller's `ChildSetup`); whatever the target
        // number held in the child is closed by dup2, and no owner of it runs
        // again here: the child only execs or exits.
        if unsafe { libc::dup2(channel.as_raw_fd(), WORKER_CHANNEL_FD) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Ends the calling process at once, running nothing of the parent's
/// (no atexit handler, no buffer flush): all a forked child may do.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and touches no memory of ours.
    unsafe { libc::_exit(code) }
}

/// Closes every descriptor of the calling process (close_range, Linux 5.9,
/// or one by one up to the descriptor limit where it is missing).
fn close_every_descriptor() {
    // SAFETY: close_range takes integers and touches no memory; closing
    // descriptors is sound here as no owner of them runs again in this
    // process (it only waits and exits).
    if unsafe { libc::syscall(libc::SYS_close_range, 0, libc::c_uint::MAX, 0) } == 0 {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which we own.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as libc::c_int
    } else {
        1024
    };
    for fd in 0..max {
        // SAFETY: as for close_range above.
        unsafe { libc::close(fd) };
    }
}

/// Makes `command` start the way a worker does, for a helper process such
/// as an environment build: inside the cgroup whose `cgroup.procs` files are
/// given (from its first instruction), as `run_as` if set, with
/// no_new_privs, killed if the spawning thread dies. It gets no channel and
/// keeps the node's /tmp.
pub fn confine(command: &mut tokio::process::Command, cgroup_procs: Vec<File>, run_as: Option<(u32, u32)>) {
    let setup = ChildSetup {
        cgroup_procs,
        channel: None,
        affinity: None,
        run_as: run_as.map(|(uid, gid)| (Uid::from_raw(uid), Gid::from_raw(gid))),
        private_tmp: false,
        own_namespaces: false,
        root: None,
        last_capability: last_capability(),
    };
    // SAFETY: as in `spawn_worker`: `ChildSetup::enter` makes only system
    // calls on values made before fork and allocates nothing; the closure
    // owns every descriptor it uses.
    unsafe {
        command.pre_exec(move || setup.enter());
    }
}

/// The `(uid, gid)` of a user, by name as the system's user database knows
/// it (getpwnam: `/etc/passwd`, LDAP, SSSD, whatever NSS is configured
/// with), or given as `UID:GID`.
pub fn lookup_user(name: &str) -> Result<(u32, u32), SandboxError> {
    if let Some((uid, gid)) = name.split_once(':') {
        if let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) {
            return Ok((uid, gid));
        }
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok((user.uid.as_raw(), user.gid.as_raw())),
        Ok(None) => Err(SandboxError::NoSuchUser(name.to_string())),
        Err(errno) => Err(SandboxError::UserLookup {
            name: name.to_string(),
            source: errno.into(),
        }),
    }
}

/// The highest capability number this kernel knows
/// (`/proc/sys/kernel/cap_last_cap`; 63, past any kernel's, if unreadable:
/// the numbers it does not know are refused with EINVAL and skipped).
fn last_capability() -> i32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// A CPU set of `cpus`, built before fork so the child only passes it on.
/// CPUs beyond what a `cpu_set_t` can name are left out.
fn cpu_set(cpus: &[u32]) -> Option<CpuSet> {
    if cpus.is_empty() {
        return None;
    }
    let mut set = CpuSet::new();
    for &cpu in cpus.iter().filter(|&&c| (c as usize) < CpuSet::count()) {
        // Below CpuSet::count() (filtered above), which is all `set` refuses.
        let _ = set.set(cpu as usize);
    }
    Some(set)
}

/// The worker's side: takes ownership of the channel the daemon handed over
/// on `fd`, after checking that it is a Unix stream socket.
pub fn inherited_channel(fd: i32) -> Result<UnixStream, SandboxError> {
    let not = |reason: String| SandboxError::NotAChannel { fd, reason };
    // libc, not nix: nix's fstat takes a BorrowedFd, and borrowing a number
    // not yet known to be open is what this check is for.
    // SAFETY: `libc::stat` is plain integers, for which all zeroes is a
    // valid value; fstat writes only into it, and reports an fd that is not
    // open through its return value.
    let (r, stat) = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut stat), stat)
    };
    if r == -1 {
        return Err(not(io::Error::last_os_error().to_string()));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(not("not a socket".into()));
    }
    // SAFETY: the fd is open (fstat succeeded) and is a socket; the daemon
    // handed it to this process to own, and nothing else in the worker uses
    // it, so taking ownership cannot double-close.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixStream::from(owned))
}

/// The processes in the process group `pgid` (a worker leads its own), as
/// `/proc` lists them now.
pub fn process_group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut members: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            // The fields after the command name: state, ppid, pgrp, ...
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.to_string()))
                .and_then(|rest| rest.split_whitespace().nth(2).and_then(|g| g.parse::<u32>().ok()))
                == Some(pgid)
        })
        .collect();
    members.sort_unstable();
    members
}

/// Whether the main thread of process `pid` may run on exactly `cpus`
/// (in any order): a warm worker whose cores did not change keeps its
/// pinning, unless its calls changed it.
pub fn pinned_to(pid: u32, cpus: &[u32]) -> bool {
    let Ok(set) = sched_getaffinity(Pid::from_raw(pid as i32)) else {
        return false;
    };
    let on = (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .count();
    on == cpus.len() && cpus.iter().all(|&cpu| set.is_set(cpu as usize).unwrap_or(false))
}

/// Pins every thread of the running process `pid` to `cpus`: a warm worker
/// taken by a job on other cores, where no cpuset cgroup moves it. Threads
/// that start after this inherit the mask of the thread that starts them.
pub fn pin_process(pid: u32, cpus: &[u32]) -> Result<(), SandboxError> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize)
            .map_err(|e| SandboxError::Affinity(e.to_string()))?;
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| SandboxError::Affinity(e.to_string()))?;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
            continue;
        };
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            // A thread that ended since the listing.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(SandboxError::Affinity(e.to_string())),
        }
    }
    Ok(())
}

/// How many bytes are waiting to be read from a pipe or socket, so that a
/// reader can take exactly what a peer wrote before some event.
pub fn readable_bytes(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // libc, not nix: nix has FIONREAD only through its ioctl macros, which
    // generate `unsafe fn`s, so the unsafe block would stay all the same.
    // SAFETY: FIONREAD writes one c_int into `n`, which we own; the fd is
    // borrowed from a live owner, so it is open for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Describes how a worker ended, for error messages.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL: killed, often by the out-of-memory killer)",
            libc::SIGSEGV => " (SIGSEGV: segmentation fault)",
            libc::SIGABRT => " (SIGABRT: aborted)",
            libc::SIGBUS => " (SIGBUS: bus error)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        };
        format!("was killed by signal {sig}{name}")
    } else {
        format!("exited with status {}", status.code().unwrap_or(-1))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_worker_gets_its_channel_on_fd_3_and_dies_with_its_group() {
        // The child echoes one line from fd 3 back on fd 3, then starts a
        // grandchild that would outlive it unless the group is killed.
        let cmd = WorkerCommand {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "read line <&3; echo \"got $line\" >&3; sleep 60 & wait".into(),
            ],
            env: vec![],
            cgroup_procs: vec![],
            cpu_affinity: vec![],
            run_as: None,
            private_tmp: false,
            image: None,
            own_namespaces: false,
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut channel = worker.channel.take().unwrap();
        channel.write_all(b"hello\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = channel.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"got hello\n");
        let pgid = Pid::from_raw(i32::try_from(worker.pid).unwrap());
        worker.kill();
        let status = worker.child.wait().await.unwrap();
        assert!(describe_exit(status).contains("signal 9"), "{status:?}");
        // The grandchild is reparented and reaped by init; give it a moment.
        let mut alive = true;
        for _ in 0..200 {
            // No signal: only whether the process group exists.
            alive = killpg(pgid, None).is_ok();
            if !alive {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!alive, "the worker's process group is gone");
    }

    #[tokio::test]
    async fn the_worker_cannot_gain_privileges() {
        let cmd = WorkerCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "grep NoNewPrivs /proc/self/status".into()],
            env: vec![],
            cgroup_procs: vec![],
            cpu_affinity: vec![],
            run_as: None,
            private_tmp: false,
            image: None,
            own_namespaces: false,
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut out = String::new();
        worker.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "NoNewPrivs:\t1\n");
    }

    #[tokio::test]
    async fn the_worker_sees_only_the_environment_it_is_given() {
        let cmd = WorkerCommand {
            program: "/usr/bin/env".into(),
            args: vec![],
            env: vec![("ONLY_THIS".into(), "1".into())],
            cgroup_procs: vec![],
            cpu_affinity: vec![],
            run_as: None,
            private_tmp: false,
            image: None,
            own_namespaces: false,
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut out = String::new();
        worker.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "ONLY_THIS=1\n");
    }

    #[tokio::test]
    async fn the_worker_runs_on_exactly_its_cores() {
        let cmd = WorkerCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "grep Cpus_allowed_list /proc/self/status >&3".into()],
            env: vec![],
            cgroup_procs: vec![],
            cpu_affinity: vec![0],
            run_as: None,
            private_tmp: false,
            image: None,
            own_namespaces: false,
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut channel = worker.channel.take().unwrap();
        let mut out = String::new();
        channel.read_to_string(&mut out).await.unwrap();
        assert_eq!(out.split_whitespace().last(), Some("0"), "{out}");
    }

    /// As root: a worker can run as another user, with no_new_privs, and
    /// with a /tmp of its own.
    #[tokio::test]
    async fn the_worker_can_run_unprivileged_with_a_private_tmp() {
        if !unistd::geteuid().is_root() {
            return test_host::cannot_run(
                "the_worker_can_run_unprivileged_with_a_private_tmp",
                test_host::Missing::Capability(
                    "not root: switching users and mounting a private /tmp need root".into(),
                ),
            );
        }
        let marker = format!("/tmp/fleetmap-private-tmp-{}", std::process::id());
        let cmd = WorkerCommand {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!("touch {marker}; echo $(id -u) $(grep NoNewPrivs /proc/self/status | cut -f2) $(ls -A /tmp | wc -l) >&3").into(),
            ],
            env: vec![],
            cgroup_procs: vec![],
            cpu_affinity: vec![],
            run_as: Some(lookup_user("nobody").unwrap()),
            private_tmp: true,
            image: None,
            own_namespaces: false,
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut channel = worker.channel.take().unwrap();
        let mut out = String::new();
        channel.read_to_string(&mut out).await.unwrap();
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(
            fields,
            vec!["65534", "1", "1"],
            "uid, no_new_privs, files in its /tmp: {out}"
        );
        assert!(
            !std::path::Path::new(&marker).exists(),
            "the worker's /tmp is not the daemon's"
        );
    }

    /// As root: a confined worker is PID 2 of a namespace of its own (the
    /// daemon is not in it), its cgroup is its `/`, `/sys` and the cgroup
    /// tree are read-only, it works in its private /tmp, what it leaves
    /// running dies with it, and the daemon sees how it died.
    #[tokio::test]
    async fn a_confined_worker_has_namespaces_of_its_own() {
        if !unistd::geteuid().is_root() {
            return test_host::cannot_run(
                "a_confined_worker_has_namespaces_of_its_own",
                test_host::Missing::Capability("not root: PID and cgroup namespaces need root".into()),
            );
        }
        let probe = "/sys/fs/cgroup/fleetmap-read-only-probe";
        let script = format!(
            "sleep 1000 & \
             echo $$ $(cut -d: -f3 /proc/self/cgroup | sort -u) $(pwd) \
             $([ -e /proc/{daemon} ] && echo daemon-visible || echo daemon-hidden) \
             $(mkdir {probe} 2>&1 | grep -c 'Read-only') >&3; \
             kill -KILL $$",
            daemon = std::process::id()
        );
        let cmd = WorkerCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            cgroup_procs: vec![],
            cpu_affinity: vec![],
            run_as: None,
            private_tmp: true,
            image: None,
            own_namespaces: true,
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut channel = worker.channel.take().unwrap();
        let mut out = String::new();
        // The background sleep holds the channel too: it reaches its end
        // only once the namespace is gone.
        channel.read_to_string(&mut out).await.unwrap();
        let status = worker.child.wait().await.unwrap();
        let _ = std::fs::remove_dir(probe);
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            vec!["2", "/", "/tmp", "daemon-hidden", "1"],
            "pid, cgroup, working directory, the daemon's pid, a read-only cgroup tree: {out}"
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert_eq!(process_group_members(worker.pid), Vec::<u32>::new());
    }

    #[test]
    fn users_are_looked_up_by_name_or_number() {
        assert_eq!(lookup_user("root").unwrap(), (0, 0));
        assert_eq!(lookup_user("1000:1001").unwrap(), (1000, 1001));
        assert!(lookup_user("no-such-user-here")
            .unwrap_err()
            .to_string()
            .contains("no-such-user-here"));
    }

    #[test]
    fn readable_bytes_counts_what_is_waiting() {
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(readable_bytes(&b).unwrap(), 0);
        std::io::Write::write_all(&mut &a, b"12345").unwrap();
        assert_eq!(readable_bytes(&b).unwrap(), 5);
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let cmd = WorkerCommand {
            program: "/nonexistent/python".into(),
            args: vec![],
            env: vec![],
            cgroup_procs: vec![],
            cpu_affinity: vec![],
            run_as: None,
            private_tmp: false,
            image: None,
            own_namespaces: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async { spawn_worker(&cmd).err().unwrap() });
        assert!(err.to_string().contains("/nonexistent/python"), "{err}");
    }

    #[test]
    fn only_sockets_are_accepted_as_channels() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = inherited_channel(file.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("not a socket"));
    }
}
