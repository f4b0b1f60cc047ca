//! Writing outputs so that a crash never leaves a half-written file or folder: everything goes
//! to a temporary name beside the target and is renamed into place.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// What to do when the target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Replace it (the old one stays intact until the new one is complete).
    Replace,
    /// Refuse, naming it.
    Refuse,
}

fn sibling(target: &Path, tag: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no file name", target.display())))?
        .to_string_lossy();
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.{tag}-{}", std::process::id())))
}

/// Fill a temporary folder with `fill`, then rename it to `dir`.
pub fn write_dir_atomically(dir: &Path, mode: WriteMode, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.exists() && mode == WriteMode::Refuse {
        return Err(Error::InvalidArgument(format!("{} already exists (use --force to replace it)", dir.display())));
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = sibling(dir, "old")?;
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Write `bytes` to a temporary file beside `path`, then rename it over `path`.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = sibling(path, "tmp")?;
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
