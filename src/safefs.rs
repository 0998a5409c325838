//! File-system safety shared by every command: inputs must be regular files (a FIFO or a device
//! given as a model or data file would block or never end), output folders are locked while a
//! run writes them, and allocations sized by user input are checked against the memory the
//! machine has before they are made.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Fail unless `path` is a regular file (following symlinks). A missing file is an `Error::Io`
/// naming the path; a folder, FIFO, socket or device is refused before it is opened, because
/// opening a FIFO for reading blocks until a writer appears.
pub fn regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(meta);
    }
    let what = if meta.is_dir() {
        "a folder"
    } else {
        "not a regular file (a FIFO, socket or device)"
    };
    Err(Error::msg(format!(
        "{}: is {what}; expected a regular file",
        path.display()
    )))
}

/// `std::fs::read_to_string` for regular files only (see [`regular_file`]).
pub fn read_to_string(path: &Path) -> Result<String> {
    regular_file(path)?;
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// `std::fs::read` for regular files only (see [`regular_file`]).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    regular_file(path)?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Available memory of this machine in bytes (`MemAvailable` of /proc/meminfo), when known.
pub fn host_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Refuse to allocate `need` bytes of host memory for `what` when the machine has less
/// available (or when the size overflowed, `None`). The error carries the estimate.
pub fn check_host_memory(need: Option<u64>, what: &str) -> Result<()> {
    let human = crate::model::memory::human_bytes;
    let Some(need) = need else {
        return Err(Error::msg(format!(
            "{what}: the size overflows 64-bit arithmetic; it cannot fit in memory"
        )));
    };
    if let Some(avail) = host_available() {
        if need > avail {
            return Err(Error::msg(format!(
                "{what}: needs about {} of host memory and {} are available",
                human(need),
                human(avail)
            )));
        }
    }
    Ok(())
}

/// Name of the lock file a run keeps in its output folder.
pub const LOCK_FILE: &str = ".tooln1.lock";

/// An exclusive claim on an output folder, held while a run writes into it: the file
/// `<dir>/.tooln1.lock` holds the owner's pid, host name and start time. A lock left by a
/// process that no longer exists on this host is taken over; one held by a live process (or by
/// another host, which cannot be checked) is an error naming the holder. Dropping the lock
/// removes the file.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether process `pid` exists on this host (true when that cannot be told).
pub fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        // No procfs: assume the holder is alive rather than take a lock that may be held.
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

impl RunLock {
    /// Take the lock of `dir` (created if missing).
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Self::acquire_at(&dir.join(LOCK_FILE), dir)
    }

    /// Take the lock file `path` guarding `what` (a folder or file named in the error).
    pub fn acquire_at(path: &Path, what: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let dir = what;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let host = host_name();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let body = serde_json::json!({
            "pid": std::process::id(),
            "host": host,
            "started_unix": started,
        })
        .to_string();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(body.as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let v: serde_json::Value =
                        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
                    let pid = v.get("pid").and_then(|p| p.as_u64()).map(|p| p as u32);
                    let holder_host = v.get("host").and_then(|h| h.as_str()).unwrap_or("?");
                    let since = v.get("started_unix").and_then(|s| s.as_u64()).unwrap_or(0);
                    let stale = match pid {
                        Some(p) => holder_host == host && !pid_alive(p),
                        // Unreadable or empty: written by a process killed while writing it.
                        None => text.trim().is_empty(),
                    };
                    if stale {
                        eprintln!(
                            "note: {}: taking over a stale lock (pid {} on {holder_host} is \
                             gone)",
                            path.display(),
                            pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                        );
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    return Err(Error::msg(format!(
                        "{}: in use by another run (pid {} on host {holder_host}, started at \
                         unix time {since}); wait for it, or choose another output folder. If \
                         that process no longer exists, delete {}",
                        dir.display(),
                        pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                        path.display()
                    )));
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::msg(format!(
            "{}: could not take the lock",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_names_the_holder_and_stale_locks_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("in use by another run"), "{e}");
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        // A lock of a process that is gone (pid beyond any real one) on this host.
        let stale = serde_json::json!({"pid": 4_000_000_000u32, "host": host_name(),
                                        "started_unix": 1});
        std::fs::write(dir.path().join(LOCK_FILE), stale.to_string()).unwrap();
        let again = RunLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_to_string(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let e = read_to_string(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        assert!(check_host_memory(None, "x").is_err());
        assert!(check_host_memory(Some(u64::MAX), "x").is_err() || host_available().is_none());
    }
}
