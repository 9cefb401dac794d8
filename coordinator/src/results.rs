//! The outputs of detached jobs, kept by the coordinator until their owner
//! reads them: one file per job in the results directory (`STATE/results`),
//! records appended as chunks finish (a little-endian `u32` length, then the
//! postcard of the `OutputChunk`), read back a page at a time. The kernel's
//! page cache holds what fits in memory; the rest is on disk. A job's
//! outputs may take at most `max_bytes`; a job's file goes when its listing
//! leaves the coordinator's recent jobs, and every file when the
//! coordinator starts (the jobs they belonged to are gone with it).

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{BufReader, Read, Seek, SeekFrom, Write},
    path::PathBuf,
    sync::Mutex,
};

use fleetmap_protocol::{JobId, OutputChunk};

/// The most bytes of records one page holds (a record larger than this
/// makes a page of its own).
pub const PAGE_BYTES: u64 = 8 << 20;

/// What the coordinator keeps for detached jobs.
#[derive(Debug)]
pub struct ResultStore {
    dir: PathBuf,
    max_bytes: u64,
    jobs: Mutex<HashMap<JobId, Kept>>,
}

#[derive(Debug)]
struct Kept {
    principal: String,
    path: PathBuf,
    bytes: u64,
    file: Option<File>,
}

impl ResultStore {
    /// A store in `dir` (created, and emptied of what an earlier run left),
    /// holding at most `max_bytes` of outputs per job.
    pub fn open(dir: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".outputs") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir,
            max_bytes,
            jobs: Mutex::default(),
        })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Kept>> {
        self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts keeping the outputs of detached job `job` of `principal`.
    pub fn begin(&self, job: JobId, principal: &str) {
        let path = self.dir.join(format!("{}-{job}.outputs", std::process::id()));
        let _ = fs::remove_file(&path);
        self.jobs().insert(
            job,
            Kept {
                principal: principal.into(),
                path,
                bytes: 0,
                file: None,
            },
        );
    }

    /// Appends an output of `job`; the reason the job must fail where it
    /// does not fit (over the cap, or the disk refused it).
    pub fn append(&self, job: JobId, output: &OutputChunk) -> Result<(), String> {
        let record = postcard::to_stdvec(output).map_err(|e| format!("cannot encode an output: {e}"))?;
        let mut jobs = self.jobs();
        let Some(kept) = jobs.get_mut(&job) else {
            return Ok(()); // Forgotten meanwhile.
        };
        let size = 4 + record.len() as u64;
        if kept.bytes + size > self.max_bytes {
            return Err(format!(
                "its outputs take more than the {} MiB the coordinator keeps for a detached job; run it attached, \
                 or ask the operator to raise max-results-gib",
                self.max_bytes >> 20
            ));
        }
        if kept.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&kept.path)
                .map_err(|e| {
                    format!(
                        "the coordinator cannot keep its outputs in {}: {e}",
                        kept.path.display()
                    )
                })?;
            kept.file = Some(file);
        }
        let file = kept.file.as_mut().expect("opened above");
        let len = u32::try_from(record.len()).map_err(|_| "an output over 4 GiB".to_string())?;
        file.write_all(&len.to_le_bytes())
            .and_then(|()| file.write_all(&record))
            .map_err(|e| {
                format!(
                    "the coordinator cannot keep its outputs in {}: {e}",
                    kept.path.display()
                )
            })?;
        kept.bytes += size;
        Ok(())
    }

    /// A page of `job`'s outputs from byte `offset`, for `principal`: the
    /// outputs and where the next page starts (`None`: none kept yet).
    pub fn read(&self, job: JobId, principal: &str, offset: u64) -> Result<(Vec<OutputChunk>, Option<u64>), String> {
        let (path, end) = {
            let jobs = self.jobs();
            match jobs.get(&job) {
                Some(kept) if kept.principal == principal => (kept.path.clone(), kept.bytes),
                _ => {
                    return Err(format!(
                        "the coordinator keeps no outputs of a job {job} of {principal}: only detached jobs' are \
                         kept, until they leave the list of recent jobs or the coordinator restarts"
                    ))
                }
            }
        };
        if offset >= end {
            return Ok((vec![], None));
        }
        let file = File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut reader = BufReader::new(file);
        reader
            .seek(SeekFrom::Start(offset))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (mut outputs, mut at) = (Vec::new(), offset);
        while at < end && (outputs.is_empty() || at - offset < PAGE_BYTES) {
            let mut len = [0u8; 4];
            reader
                .read_exact(&mut len)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut record = vec![0u8; u32::from_le_bytes(len) as usize];
            reader
                .read_exact(&mut record)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            outputs.push(postcard::from_bytes(&record).map_err(|e| format!("{} is damaged: {e}", path.display()))?);
            at += 4 + record.len() as u64;
        }
        Ok((outputs, (at < end).then_some(at)))
    }

    /// Stops keeping `job`'s outputs and removes them.
    pub fn forget(&self, job: JobId) {
        if let Some(kept) = self.jobs().remove(&job) {
            let _ = fs::remove_file(kept.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetmap_protocol::{ChunkId, InputIndex};

    use super::*;

    fn output(i: u64, bytes: usize) -> OutputChunk {
        OutputChunk {
            chunk: ChunkId(i),
            first_input: InputIndex(i * 10),
            count: 10,
            failed: 0,
            node: "n".into(),
            payload: vec![i as u8; bytes],
        }
    }

    #[test]
    fn outputs_are_kept_read_in_pages_for_their_owner_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("9-1.outputs"), b"left by an earlier run").unwrap();
        let store = ResultStore::open(dir.path().into(), 20 << 20).unwrap();
        assert!(!dir.path().join("9-1.outputs").exists());
        store.begin(JobId(1), "alice");
        for i in 0..3 {
            store.append(JobId(1), &output(i, 5 << 20)).unwrap();
        }
        // Two pages: 8 MiB is reached after two records.
        let (first, next) = store.read(JobId(1), "alice", 0).unwrap();
        assert_eq!(first.len(), 2);
        let (second, last) = store.read(JobId(1), "alice", next.unwrap()).unwrap();
        assert_eq!((second.len(), last), (1, None));
        assert_eq!(second[0], output(2, 5 << 20));
        assert!(
            store.read(JobId(1), "bob", 0).is_err(),
            "another principal reads nothing"
        );
        // Over the cap: refused with what to do.
        let e = store.append(JobId(1), &output(3, 6 << 20)).unwrap_err();
        assert!(e.contains("20 MiB") && e.contains("max-results-gib"), "{e}");
        store.forget(JobId(1));
        assert!(store.read(JobId(1), "alice", 0).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
