//! fleetmap's sandbox: the one place where user code is started.
//!
//! [`spawn_worker`] is the only function in fleetmap that starts a process
//! running user code; every slot's worker goes through it, so whatever
//! isolation a slot gets (its own process group, a parent-death signal, and
//! the cgroup pinning that builds on it) is applied in one place, in the
//! child, before `exec`.
//!
//! `unsafe` code and raw system calls live here and nowhere else in
//! fleetmap; every `unsafe` block says why it is sound. This crate must not
//! depend on the network, the protocol or pyo3.
#![deny(unsafe_op_in_unsafe_fn)]

use std::{
    ffi::OsString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
    process::Stdio,
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
    #[error("descriptor {fd} is not a socket inherited from the node daemon: {reason}")]
    NotAChannel { fd: i32, reason: String },
}

/// What to run in a slot.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

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

fn kill_group(pid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory. The worker
    // leads its own process group (process_group(0) at spawn), so -pgid names
    // exactly the worker and its descendants. The group id cannot be reused
    // while the worker is our unreaped child or zombie.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
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
    let child_fd = theirs.as_raw_fd();
    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it calls dup2, fcntl and prctl and
    // touches no heap memory. `child_fd` stays open in the parent until after
    // spawn returns (`theirs` is dropped below), so it is valid in the child.
    unsafe {
        command.pre_exec(move || {
            if child_fd == WORKER_CHANNEL_FD {
                // dup2 onto itself keeps FD_CLOEXEC: clear it by hand.
                if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, WORKER_CHANNEL_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| SandboxError::Spawn {
        program: cmd.program.display().to_string(),
        source,
    })?;
    drop(theirs);
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

/// The worker's side: takes ownership of the channel the daemon handed over
/// on `fd`, after checking that it is a Unix stream socket.
pub fn inherited_channel(fd: i32) -> Result<UnixStream, SandboxError> {
    let not = |reason: String| SandboxError::NotAChannel { fd, reason };
    // SAFETY: fstat writes only into the zeroed `stat` we own; an invalid fd
    // is reported through the return value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } == -1 {
        return Err(not(std::io::Error::last_os_error().to_string()));
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

/// How many bytes are waiting to be read from a pipe or socket, so that a
/// reader can take exactly what a peer wrote before some event.
pub fn readable_bytes(fd: &impl AsRawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `n`, which we own; the fd is
    // borrowed from a live owner, so it is open for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } == -1 {
        return Err(std::io::Error::last_os_error());
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
        };
        let mut worker = spawn_worker(&cmd).unwrap();
        let mut channel = worker.channel.take().unwrap();
        channel.write_all(b"hello\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = channel.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"got hello\n");
        let pid = worker.pid as libc::pid_t;
        worker.kill();
        let status = worker.child.wait().await.unwrap();
        assert!(describe_exit(status).contains("signal 9"), "{status:?}");
        // The grandchild is reparented and reaped by init; give it a moment.
        let mut alive = true;
        for _ in 0..200 {
            // SAFETY: signal 0 only checks whether the process group exists.
            alive = unsafe { libc::kill(-pid, 0) } == 0;
            if !alive {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!alive, "the worker's process group is gone");
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
