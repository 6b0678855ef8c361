//! Safe output. On Linux the output is an anonymous file (`O_TMPFILE`) in the destination's directory: it has
//! no name until it is complete and fsynced, so a crash, a kill or a full disk leaves nothing behind. It is then
//! linked into place (failing if the destination appeared meanwhile) or, with `replace`, linked under a
//! temporary name and renamed over the destination. Where `O_TMPFILE` is unsupported, a named temporary file
//! is used instead (removed on error, but not on SIGKILL). An output that is one of the inputs is never written.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, CWD};

use crate::error::{NzError, Result};

enum Temp {
    /// An unnamed file; it vanishes if the process dies before `commit`.
    Anonymous(File),
    /// Fallback: a hidden named file, deleted on drop.
    Named(tempfile::NamedTempFile),
}

/// An output file under construction. Dropping it without `commit` leaves no file.
pub struct OutputFile {
    temp: Temp,
    dir: PathBuf,
    dest: PathBuf,
    replace: bool,
}

impl OutputFile {
    /// Starts writing `dest`. Fails if `dest` exists (unless `replace`), if it is one of `inputs`, or if its
    /// directory does not exist.
    pub fn create(dest: &Path, replace: bool, inputs: &[&Path]) -> Result<OutputFile> {
        for input in inputs {
            if same_file(dest, input) {
                return Err(NzError::OutputIsInput {
                    path: dest.to_path_buf(),
                });
            }
        }
        if dest.exists() && !replace {
            return Err(NzError::OutputExists {
                path: dest.to_path_buf(),
            });
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
        let temp = match rustix::fs::openat(CWD, &dir, flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => Temp::Anonymous(File::from(fd)),
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => {
                return Err(NzError::io(
                    &dir,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "output directory does not exist",
                    ),
                ))
            }
            Err(_) => Temp::Named(named_temp(&dir, dest)?),
        };
        Ok(OutputFile {
            temp,
            dir,
            dest: dest.to_path_buf(),
            replace,
        })
    }

    pub fn file(&mut self) -> &mut File {
        match &mut self.temp {
            Temp::Anonymous(f) => f,
            Temp::Named(t) => t.as_file_mut(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// Flushes to disk and gives the file its name.
    pub fn commit(mut self) -> Result<()> {
        let dest = self.dest.clone();
        let io = |e: std::io::Error| NzError::io(&dest, e);
        self.file().sync_all().map_err(io)?;
        match self.temp {
            Temp::Anonymous(file) => {
                let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
                let link = |to: &Path| {
                    rustix::fs::linkat(CWD, proc_path.as_str(), CWD, to, AtFlags::SYMLINK_FOLLOW)
                };
                if self.replace {
                    let staged = staging_name(&self.dir, &dest);
                    link(&staged).map_err(|e| io(e.into()))?;
                    if let Err(e) = std::fs::rename(&staged, &dest) {
                        let _ = std::fs::remove_file(&staged);
                        return Err(io(e));
                    }
                } else {
                    link(&dest).map_err(|e| match e {
                        rustix::io::Errno::EXIST => NzError::OutputExists { path: dest.clone() },
                        other => io(other.into()),
                    })?;
                }
            }
            Temp::Named(temp) => {
                if self.replace {
                    temp.persist(&dest).map_err(|e| io(e.error))?;
                } else {
                    temp.persist_noclobber(&dest).map_err(|e| io(e.error))?;
                }
            }
        }
        // Make the new name itself durable.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Bytes written between two requests of `EarlyWriteback`.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// A `Write` to an output file that, every `WRITEBACK_BYTES`, asks a helper thread to flush what has been
/// written so far (`sync_data` on a second handle), so the disk writes overlap the work that produces the rest
/// and `OutputFile::commit`'s final sync finds little left to do. A write-back error is kept and returned by
/// `finish`: the system reports it once per open file, so `commit`'s own sync might not see it again.
pub struct EarlyWriteback<'f> {
    file: &'f mut File,
    since_request: u64,
    requests: Option<std::sync::mpsc::SyncSender<()>>,
    helper: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl<'f> EarlyWriteback<'f> {
    pub fn new(file: &'f mut File) -> std::io::Result<EarlyWriteback<'f>> {
        let handle = file.try_clone()?;
        // One pending request at most: while the helper syncs, later requests fold into the next sync.
        let (requests, pending) = std::sync::mpsc::sync_channel::<()>(1);
        let helper = std::thread::Builder::new()
            .name("neuzip-writeback".into())
            .spawn(move || {
                for () in pending {
                    handle.sync_data()?;
                }
                Ok(())
            })?;
        Ok(EarlyWriteback {
            file,
            since_request: 0,
            requests: Some(requests),
            helper: Some(helper),
        })
    }

    /// Stops the helper once its last flush is done; the first write-back error, if any.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> std::io::Result<()> {
        self.requests = None;
        match self.helper.take().map(|h| h.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(std::io::Error::other("the write-back thread panicked")),
            None => Ok(()),
        }
    }
}

impl std::io::Write for EarlyWriteback<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.file.write(buf)?;
        self.since_request += written as u64;
        if self.since_request >= WRITEBACK_BYTES {
            self.since_request = 0;
            if let Some(requests) = &self.requests {
                // Full: a sync is already pending. Disconnected: the helper stopped on an error that
                // `finish` reports.
                let _ = requests.try_send(());
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for EarlyWriteback<'_> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn named_temp(dir: &Path, dest: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name(dest)))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| NzError::io(dir, e))
}

fn file_name(dest: &Path) -> String {
    dest.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A name beside `dest` that does not exist yet, for the link-then-rename of a replacement.
fn staging_name(dir: &Path, dest: &Path) -> PathBuf {
    let base = file_name(dest);
    (0u32..)
        .map(|i| dir.join(format!(".{base}.{}.{i}.tmp", std::process::id())))
        .find(|p| !p.exists())
        .expect("some name is free")
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn early_writeback_writes_every_byte() {
        let mut file = tempfile::tempfile().unwrap();
        // Seeded bytes over several write-back requests, in uneven pieces.
        let mut s = 0x2545f4914f6cdd1du64;
        let data: Vec<u8> = (0..3 * WRITEBACK_BYTES as usize + 12_345)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let mut early = EarlyWriteback::new(&mut file).unwrap();
        for piece in data.chunks(1_000_003) {
            early.write_all(piece).unwrap();
        }
        early.flush().unwrap();
        early.finish().unwrap();
        let mut back = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }
}
