//! Which devices a slot with GPUs may open. The list is the same on both
//! hierarchies; v1 writes it as `devices.allow` lines (through
//! [`DeviceRule`]'s `Display`), v2 compiles it into a BPF program
//! (`device_filter`).

use super::GpuAccess;

/// A device a slot may use, with read, write and mknod access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DeviceRule {
    /// Character devices only: the slot needs no block device.
    pub(super) major: u32,
    /// `None`: every minor.
    pub(super) minor: Option<u32>,
}

impl std::fmt::Display for DeviceRule {
    /// The rule as a v1 `devices.allow` line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.minor {
            Some(minor) => write!(f, "c {}:{minor} rwm", self.major),
            None => write!(f, "c {}:* rwm", self.major),
        }
    }
}

/// Major of `/dev/nvidia*`, `/dev/nvidiactl` and `/dev/nvidia-modeset`.
const NVIDIA_MAJOR: u32 = 195;

/// What a slot with GPUs may open: the pseudo-devices every program expects
/// (null, zero, full, random, urandom, tty, ptmx, the pty slaves), its own
/// GPUs, the control devices every CUDA process opens, and the unified
/// memory devices, whose major is assigned when the driver loads.
pub(super) fn device_rules(gpus: &GpuAccess, proc_devices: &str) -> Vec<DeviceRule> {
    let dev = |major, minor| DeviceRule {
        major,
        minor: Some(minor),
    };
    let mut rules = vec![
        dev(1, 3),
        dev(1, 5),
        dev(1, 7),
        dev(1, 8),
        dev(1, 9),
        dev(5, 0),
        dev(5, 2),
        DeviceRule {
            major: 136,
            minor: None,
        },
    ];
    rules.extend(gpus.allowed_minors.iter().map(|&minor| dev(NVIDIA_MAJOR, minor)));
    rules.push(dev(NVIDIA_MAJOR, 255));
    rules.push(dev(NVIDIA_MAJOR, 254));
    // If the driver is loaded only after the slot was set up, these majors
    // are missing and CUDA's unified memory fails in this slot: load it at
    // boot (nvidia-persistenced or nvidia-modprobe -u).
    rules.extend(
        char_device_majors(proc_devices, &["nvidia-uvm", "nvidia-uvm-tools"])
            .into_iter()
            .map(|major| DeviceRule { major, minor: None }),
    );
    rules
}

/// The majors of the named character devices in `/proc/devices`.
pub(super) fn char_device_majors(proc_devices: &str, names: &[&str]) -> Vec<u32> {
    let mut in_char = false;
    let mut majors = Vec::new();
    for line in proc_devices.lines() {
        match line.trim() {
            "Character devices:" => in_char = true,
            "Block devices:" => in_char = false,
            entry if in_char => {
                let mut parts = entry.split_whitespace();
                if let (Some(major), Some(name)) = (parts.next(), parts.next()) {
                    if names.contains(&name) {
                        if let Ok(major) = major.parse() {
                            majors.push(major);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    majors
}
