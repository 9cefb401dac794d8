//! A worker's root file system when its job runs in an OCI image: the
//! image's unpacked root, shared read-only by every slot, under a writable
//! layer of the worker's own, made `/` with `pivot_root` in a mount
//! namespace of the worker's own.
//!
//! [`ImageRoot`] says what the worker sees; [`RootSteps`] is the same as a
//! list of system calls with every path already a C string, made before
//! `fork`, so that the child only walks the list (no allocation between
//! `fork` and `exec`). Everything mounted lives in the worker's namespace
//! and goes away with its last process: nothing is left on the host.

use std::{
    ffi::{CStr, CString},
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag, AT_FDCWD},
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{unshare, CloneFlags},
    sys::stat::Mode,
    unistd::{chdir, mkdir, pivot_root, symlinkat},
};

/// Where fleetmap's own files (its runtime, the job's sources, the host's
/// GPU driver libraries) appear inside an image, read-only.
pub const RUNTIME_MOUNT: &str = "/opt/fleetmap";

/// The pseudo-devices every program expects; a slot's GPUs come on top.
pub const BASIC_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What a worker running in an image sees.
#[derive(Debug, Clone)]
pub struct ImageRoot {
    /// The image's unpacked root file system (never written: each worker
    /// writes into a layer of its own on top).
    pub rootfs: PathBuf,
    /// An empty directory of the host's, where the worker mounts the
    /// memory-backed file system that holds its writable layer: the mount
    /// is in the worker's own namespace, so every worker of the image uses
    /// the same directory without seeing another's.
    pub scratch: PathBuf,
    /// Host files and directories bound read-only into the image, by their
    /// path inside it (under [`RUNTIME_MOUNT`], which fleetmap makes).
    pub binds: Vec<Bind>,
    /// Host device nodes (`/dev/nvidia0`, ...) bound at the same path in
    /// the image's `/dev`, besides [`BASIC_DEVICES`]. The slot's device
    /// rules still decide which may be opened.
    pub devices: Vec<PathBuf>,
    /// The working directory inside the image (`/` if it is missing).
    pub workdir: PathBuf,
    /// The daemon is not root: the worker gets a user namespace of its own
    /// (its user mapped to itself), in which it may mount; `/proc` and
    /// `/sys` are then the host's (bound, as a fresh `/proc` needs a PID
    /// namespace), and read-only remounts the kernel refuses there are
    /// skipped.
    pub rootless: bool,
}

/// A host path bound read-only into the image.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    /// An absolute path under [`RUNTIME_MOUNT`].
    pub target: PathBuf,
}

/// One system call of the root's set-up.
enum Step {
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
        /// A failure is ignored (a read-only remount a user namespace may
        /// refuse).
        optional: bool,
    },
    /// An overlay of `lower` with an upper layer in the scratch tmpfs; a
    /// read-only bind of `lower` where the kernel refuses the overlay (an
    /// overlay within an overlay on some kernels).
    Layer {
        lower: CString,
        target: CString,
        options: Option<CString>,
        rootless: bool,
    },
    Mkdir(CString),
    /// An empty file, for a bind mount of a file to land on.
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// `pivot_root` into the directory, then the old root detached, then
    /// `chdir` to the working directory (else `/`).
    Enter {
        root: CString,
        workdir: CString,
    },
}

/// [`ImageRoot`] as system calls, made before `fork`.
pub(crate) struct RootSteps {
    /// For a rootless worker: `(file, content)` of `/proc/self/setgroups`,
    /// `uid_map` and `gid_map`, written after `unshare(CLONE_NEWUSER)`.
    user_maps: Option<[(CString, CString); 3]>,
    steps: Vec<Step>,
}

fn c(path: impl AsRef<Path>) -> io::Result<CString> {
    CString::new(path.as_ref().as_os_str().as_bytes()).map_err(|_| io::Error::other("a path holds a NUL byte"))
}

/// `inside` (an absolute path in the image) under `root`.
fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

impl RootSteps {
    pub(crate) fn new(image: &ImageRoot) -> io::Result<Self> {
        let mut steps = vec![];
        let scratch = &image.scratch;
        let root = scratch.join("root");
        let tmpfs = |target: &Path, mode: &str, flags: MsFlags| -> io::Result<Step> {
            Ok(Step::Mount {
                source: Some(c("tmpfs")?),
                target: c(target)?,
                fstype: Some(c("tmpfs")?),
                flags: flags | MsFlags::MS_NOSUID,
                data: Some(c(format!("mode={mode}"))?),
                optional: false,
            })
        };
        let rootless = image.rootless;
        let read_only_again = |target: &Path, extra: MsFlags| -> io::Result<Step> {
            Ok(Step::Mount {
                source: None,
                target: c(target)?,
                fstype: None,
                flags: MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | extra,
                data: None,
                optional: rootless,
            })
        };
        let bind_with = |source: &Path, target: &Path, flags: MsFlags| -> io::Result<Step> {
            Ok(Step::Mount {
                source: Some(c(source)?),
                target: c(target)?,
                fstype: None,
                flags: MsFlags::MS_BIND | flags,
                data: None,
                optional: false,
            })
        };
        let bind = |source: &Path, target: &Path| bind_with(source, target, MsFlags::empty());
        // The writable layer: a tmpfs (charged to the slot's memory limit)
        // holding the overlay's upper and work directories.
        steps.push(tmpfs(scratch, "0755", MsFlags::MS_NODEV)?);
        for dir in ["upper", "work", "root"] {
            steps.push(Step::Mkdir(c(scratch.join(dir))?));
        }
        // Overlay options are comma- and colon-separated: a path holding
        // either gets the read-only bind instead.
        let plain = |p: &Path| !p.as_os_str().as_bytes().iter().any(|b| b",:\\".contains(b));
        let options = (plain(&image.rootfs) && plain(scratch)).then(|| {
            format!(
                "lowerdir={},upperdir={},workdir={}",
                image.rootfs.display(),
                scratch.join("upper").display(),
                scratch.join("work").display()
            )
        });
        steps.push(Step::Layer {
            lower: c(&image.rootfs)?,
            target: c(&root)?,
            options: options.map(c).transpose()?,
            rootless,
        });
        // The image's root holds these directories (the node makes them
        // when it unpacks an image).
        steps.push(tmpfs(&root.join("tmp"), "1777", MsFlags::MS_NODEV)?);
        if rootless {
            // A fresh /proc needs a PID namespace; the host's, as a user
            // namespace may bind it (with what is mounted below it).
            steps.push(bind_with(Path::new("/proc"), &root.join("proc"), MsFlags::MS_REC)?);
        } else {
            steps.push(Step::Mount {
                source: Some(c("proc")?),
                target: c(root.join("proc"))?,
                fstype: Some(c("proc")?),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                data: None,
                optional: false,
            });
        }
        // /sys without what is mounted below it (the cgroup tree), read-only
        // (a user namespace may only bind it whole).
        let sys = root.join("sys");
        let below = if rootless { MsFlags::MS_REC } else { MsFlags::empty() };
        steps.push(bind_with(Path::new("/sys"), &sys, below)?);
        steps.push(read_only_again(
            &sys,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )?);
        // A minimal /dev: the basic pseudo-devices and the slot's own.
        let dev = root.join("dev");
        steps.push(tmpfs(&dev, "0755", MsFlags::empty())?);
        let devices = BASIC_DEVICES
            .iter()
            .map(|name| Path::new("/dev").join(name))
            .chain(image.devices.iter().cloned());
        for device in devices {
            let Ok(name) = device.strip_prefix("/dev") else {
                continue;
            };
            let target = dev.join(name);
            steps.push(Step::Touch(c(&target)?));
            steps.push(bind(&device, &target)?);
        }
        steps.push(Step::Mkdir(c(dev.join("shm"))?));
        steps.push(tmpfs(&dev.join("shm"), "1777", MsFlags::MS_NODEV)?);
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            steps.push(Step::Symlink {
                target: c(target)?,
                link: c(dev.join(link))?,
            });
        }
        // fleetmap's files: a tmpfs made read-only once they are bound in.
        let runtime = under(&root, Path::new(RUNTIME_MOUNT));
        steps.push(tmpfs(&runtime, "0755", MsFlags::MS_NODEV)?);
        for b in &image.binds {
            let target = under(&root, &b.target);
            let escapes = b
                .target
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
            if escapes || target == runtime || !target.starts_with(&runtime) {
                return Err(io::Error::other(format!(
                    "{} is not under {RUNTIME_MOUNT}",
                    b.target.display()
                )));
            }
            let mut parents: Vec<&Path> = target.ancestors().skip(1).take_while(|p| *p != runtime).collect();
            parents.reverse();
            for parent in parents {
                steps.push(Step::Mkdir(c(parent)?));
            }
            steps.push(if b.source.is_dir() {
                Step::Mkdir(c(&target)?)
            } else {
                Step::Touch(c(&target)?)
            });
            steps.push(bind(&b.source, &target)?);
            steps.push(read_only_again(&target, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?);
        }
        steps.push(Step::Mount {
            source: None,
            target: c(&runtime)?,
            fstype: None,
            flags: MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: None,
            optional: rootless,
        });
        steps.push(Step::Enter {
            root: c(&root)?,
            workdir: c(&image.workdir)?,
        });
        let user_maps = if rootless {
            let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
            Some([
                (c("/proc/self/setgroups")?, c("deny")?),
                (c("/proc/self/uid_map")?, c(format!("{uid} {uid} 1"))?),
                (c("/proc/self/gid_map")?, c(format!("{gid} {gid} 1"))?),
            ])
        } else {
            None
        };
        Ok(Self { user_maps, steps })
    }

    /// Runs in the child between `fork` and `exec`: system calls on the
    /// strings made in [`RootSteps::new`], nothing allocated.
    pub(crate) fn enter(&self) -> io::Result<()> {
        match &self.user_maps {
            Some(maps) => {
                // The worker's own user namespace, its user mapped to
                // itself: it may mount here, and loses that power at exec.
                unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
                for (file, content) in maps {
                    let fd = open(file.as_c_str(), OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
                    nix::unistd::write(&fd, content.as_bytes())?;
                }
            }
            None => unshare(CloneFlags::CLONE_NEWNS)?,
        }
        // Nothing mounted here propagates back to the host.
        mount(
            None::<&CStr>,
            c"/",
            None::<&CStr>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&CStr>,
        )?;
        for step in &self.steps {
            match step {
                Step::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                    optional,
                } => {
                    let done = mount(
                        source.as_deref(),
                        target.as_c_str(),
                        fstype.as_deref(),
                        *flags,
                        data.as_deref(),
                    );
                    if !optional {
                        done?;
                    }
                }
                Step::Layer {
                    lower,
                    target,
                    options,
                    rootless,
                } => {
                    let overlay = options.as_deref().map(|options| {
                        mount(
                            Some(c"overlay"),
                            target.as_c_str(),
                            Some(c"overlay"),
                            MsFlags::MS_NODEV,
                            Some(options),
                        )
                    });
                    if !matches!(overlay, Some(Ok(()))) {
                        mount(
                            Some(lower.as_c_str()),
                            target.as_c_str(),
                            None::<&CStr>,
                            MsFlags::MS_BIND | MsFlags::MS_REC,
                            None::<&CStr>,
                        )?;
                        let read_only = mount(
                            None::<&CStr>,
                            target.as_c_str(),
                            None::<&CStr>,
                            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                            None::<&CStr>,
                        );
                        if !rootless {
                            read_only?;
                        }
                    }
                }
                Step::Mkdir(path) => match mkdir(path.as_c_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                },
                Step::Touch(path) => {
                    // The descriptor closes when dropped.
                    open(
                        path.as_c_str(),
                        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                        Mode::from_bits_truncate(0o644),
                    )?;
                }
                Step::Symlink { target, link } => symlinkat(target.as_c_str(), AT_FDCWD, link.as_c_str())?,
                Step::Enter { root, workdir } => {
                    chdir(root.as_c_str())?;
                    // The old root is stacked under the new one at ".",
                    // then detached: nothing of the host's stays reachable.
                    pivot_root(c".", c".")?;
                    umount2(c".", MntFlags::MNT_DETACH)?;
                    if chdir(workdir.as_c_str()).is_err() {
                        chdir(c"/")?;
                    }
                }
            }
        }
        Ok(())
    }
}
