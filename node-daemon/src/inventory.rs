//! The node's cores and GPUs, handed out to slots. Two running slots never
//! share a core or a GPU: the coordinator places no more slots than the
//! node advertised, and every slot takes its own from here.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
};

use fleetmap_protocol::Gpu;
use fleetmap_sandbox::cgroup::parse_cpu_list;

#[derive(Debug)]
struct Free {
    cpus: BTreeSet<u32>,
    gpus: Vec<Gpu>,
}

/// The cores and GPUs not held by a slot.
#[derive(Debug, Clone)]
pub struct Inventory {
    free: Arc<Mutex<Free>>,
}

/// The cores and GPUs of one slot; they go back to the inventory on drop.
#[derive(Debug)]
pub struct Placement {
    pub cpus: Vec<u32>,
    pub gpus: Vec<Gpu>,
    free: Arc<Mutex<Free>>,
}

impl Inventory {
    pub fn new(cpus: impl IntoIterator<Item = u32>, gpus: Vec<Gpu>) -> Self {
        Self {
            free: Arc::new(Mutex::new(Free {
                cpus: cpus.into_iter().collect(),
                gpus,
            })),
        }
    }

    /// Takes `cores` cores and `gpus` GPUs, or nothing if either is short.
    /// GPUs go lowest minor first; cores on the first GPU's NUMA node are
    /// preferred when it is known (`cpus_of_numa` lists each node's cores).
    pub fn take(&self, cores: u32, gpus: u32, cpus_of_numa: impl Fn(u32) -> Vec<u32>) -> Option<Placement> {
        // The lock only guards plain collections; a panic while holding it
        // would be a bug in this module.
        let mut free = self.free.lock().expect("inventory lock poisoned");
        if free.cpus.len() < cores as usize || free.gpus.len() < gpus as usize {
            return None;
        }
        free.gpus.sort_by_key(|g| g.minor);
        let taken_gpus: Vec<Gpu> = free.gpus.drain(..gpus as usize).collect();
        let mut preferred: Vec<u32> = taken_gpus
            .first()
            .and_then(|g| g.numa_node)
            .map(|numa| {
                cpus_of_numa(numa)
                    .into_iter()
                    .filter(|c| free.cpus.contains(c))
                    .collect()
            })
            .unwrap_or_default();
        preferred.truncate(cores as usize);
        let rest: Vec<u32> = free
            .cpus
            .iter()
            .copied()
            .filter(|c| !preferred.contains(c))
            .take(cores as usize - preferred.len())
            .collect();
        let mut cpus = preferred;
        cpus.extend(rest);
        cpus.sort_unstable();
        for c in &cpus {
            free.cpus.remove(c);
        }
        Some(Placement {
            cpus,
            gpus: taken_gpus,
            free: self.free.clone(),
        })
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Ok(mut free) = self.free.lock() {
            free.cpus.extend(self.cpus.iter().copied());
            free.gpus.append(&mut self.gpus);
        }
    }
}

/// The cores of NUMA node `numa` (from sysfs; empty where unknown).
pub fn cpus_of_numa(numa: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/sys/devices/system/node/node{numa}/cpulist"))
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()).ok())
        .unwrap_or_default()
}

/// The NVIDIA GPUs the driver reports, from `/proc/driver/nvidia/gpus/*/information`
/// (device minor and UUID) and the PCI device's NUMA node in sysfs. Empty
/// where there is no NVIDIA driver.
pub fn detect_gpus(proc_root: &Path) -> Vec<Gpu> {
    let Ok(entries) = std::fs::read_dir(proc_root.join("driver/nvidia/gpus")) else {
        return vec![];
    };
    let mut gpus = Vec::new();
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path().join("information")) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_string())
        };
        let Some(minor) = field("Device Minor").and_then(|m| m.parse().ok()) else {
            continue;
        };
        let pci = entry.file_name().to_string_lossy().to_lowercase();
        let numa_node = std::fs::read_to_string(format!("/sys/bus/pci/devices/{pci}/numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        gpus.push(Gpu {
            minor,
            uuid: field("GPU UUID").unwrap_or_default(),
            numa_node,
        });
    }
    gpus.sort_by_key(|g| g.minor);
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(minor: u32, numa: Option<u32>) -> Gpu {
        Gpu {
            minor,
            uuid: format!("GPU-{minor}"),
            numa_node: numa,
        }
    }

    #[test]
    fn slots_never_share_cores_or_gpus_and_give_them_back() {
        let inv = Inventory::new(0..4, vec![gpu(1, None), gpu(0, None)]);
        let a = inv.take(2, 1, |_| vec![]).unwrap();
        let b = inv.take(2, 1, |_| vec![]).unwrap();
        assert_eq!((a.cpus.clone(), a.gpus[0].minor), (vec![0, 1], 0));
        assert_eq!((b.cpus.clone(), b.gpus[0].minor), (vec![2, 3], 1));
        assert!(inv.take(1, 0, |_| vec![]).is_none(), "no core left");
        drop(a);
        let c = inv.take(1, 1, |_| vec![]).unwrap();
        assert_eq!((c.cpus.clone(), c.gpus[0].minor), (vec![0], 0));
    }

    #[test]
    fn a_gpu_slot_prefers_cores_on_its_numa_node() {
        let inv = Inventory::new(0..8, vec![gpu(0, Some(1))]);
        let p = inv
            .take(2, 1, |numa| if numa == 1 { vec![4, 5, 6, 7] } else { vec![] })
            .unwrap();
        assert_eq!(p.cpus, vec![4, 5]);
    }

    #[test]
    fn gpus_are_read_from_the_driver_inventory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let dir = root.join("driver/nvidia/gpus/0000:3b:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("information"),
            "Model: \t\t NVIDIA H100\nIRQ:   \t\t 42\nGPU UUID: \t GPU-abc-123\nDevice Minor: \t 3\n",
        )
        .unwrap();
        let gpus = detect_gpus(&root);
        assert_eq!(gpus.len(), 1);
        assert_eq!((gpus[0].minor, gpus[0].uuid.as_str()), (3, "GPU-abc-123"));
        assert!(detect_gpus(Path::new("/nonexistent")).is_empty());
    }
}
