//! A small tmpfs mounted for one test, to fill a disk on purpose (the tests run as root, as
//! `.ci/run` does). Unmounted when dropped, even when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    /// Keeps the mount point's parent alive (and removes it) after the unmount.
    _dir: tempfile::TempDir,
    path: PathBuf,
    filler: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: "2m", "512k") on a fresh
    /// directory. Panics with a clear message when mounting is not possible (not root).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (these tests run as root, as .ci/run does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let filler = path.join(".filler");
        Tmpfs { _dir: dir, path, filler }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills the filesystem to the last byte (a file of its own, removed by [`Tmpfs::free`]).
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        // The last partial page: byte by byte.
        while f.write(&[0u8]).is_ok_and(|n| n == 1) {}
        let _ = f.sync_all();
    }

    /// Frees what [`Tmpfs::fill`] took.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }

    /// Bytes still free on the filesystem.
    pub fn available(&self) -> u64 {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&self.path).output().expect("run df");
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
    }
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy unmount: a process the test started may still hold a file open there.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_tmpfs_can_be_filled_and_freed() {
    let fs = Tmpfs::mount("256k");
    fs.fill();
    assert_eq!(fs.available(), 0);
    let err = std::fs::write(fs.path().join("x"), vec![1u8; 8192]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_enospc()), "{err}");
    fs.free();
    assert!(fs.available() > 0);
    std::fs::write(fs.path().join("x"), vec![1u8; 8192]).unwrap();
}
