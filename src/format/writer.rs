//! Safe output: write to a temporary file beside the destination, fsync, then rename into place. An output
//! that exists is replaced only when asked; an output that is one of the inputs is never written.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{NzError, Result};

/// An output file under construction. Dropping it without `commit` removes the temporary file.
pub struct OutputFile {
    temp: tempfile::NamedTempFile,
    dest: PathBuf,
    replace: bool,
}

impl OutputFile {
    /// Starts writing `dest`. Fails if `dest` exists (unless `replace`), if it is one of `inputs`,
    /// or if its directory does not exist.
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
        let file_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| NzError::io(&dir, e))?;
        Ok(OutputFile {
            temp,
            dest: dest.to_path_buf(),
            replace,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// Flushes to disk and renames into place.
    pub fn commit(self) -> Result<()> {
        self.temp
            .as_file()
            .sync_all()
            .map_err(|e| NzError::io(&self.dest, e))?;
        let dest = self.dest;
        if self.replace {
            self.temp
                .persist(&dest)
                .map_err(|e| NzError::io(&dest, e.error))?;
        } else {
            self.temp
                .persist_noclobber(&dest)
                .map_err(|e| NzError::io(&dest, e.error))?;
        }
        Ok(())
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
