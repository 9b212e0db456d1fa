//! Reading a job file from disk; the core parses and validates what is read.

use std::path::Path;

use dlaunch_core::spec::{self, Job, PathKind, Probe, SpecError, SpecErrors};

/// Job files beyond this size are refused before parsing: nobody writes 16 MiB of TOML by hand.
const MAX_FILE_SIZE: u64 = 16 << 20;

/// Answers the core's questions about paths from this machine's filesystem.
pub struct FsProbe;

impl Probe for FsProbe {
    fn kind(&self, path: &Path) -> Result<PathKind, String> {
        std::fs::metadata(path).map(|m| PathKind::of(m.is_file(), m.is_dir())).map_err(|e| e.to_string())
    }
}

/// Reads, parses and validates a job file.
pub fn load(path: &Path) -> Result<Job, SpecErrors> {
    let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let meta =
        std::fs::metadata(&file).map_err(|e| SpecError::whole_file(&file, format!("cannot read the job file: {e}")))?;
    if meta.is_dir() {
        return Err(SpecError::whole_file(&file, "is a directory, expected a job file (TOML)").into());
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(
            SpecError::whole_file(&file, format!("is {} bytes; job files are limited to 16 MiB", meta.len())).into()
        );
    }
    let bytes =
        std::fs::read(&file).map_err(|e| SpecError::whole_file(&file, format!("cannot read the job file: {e}")))?;
    spec::parse(&file, &bytes, &FsProbe)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn directories_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = &load(dir.path()).unwrap_err().0[0];
        assert!(e.message.contains("is a directory"), "{e}");
        let e = &load(&dir.path().join("absent.toml")).unwrap_err().0[0];
        assert!(e.message.contains("cannot read"), "{e}");
    }

    #[test]
    fn relative_job_file_paths_become_absolute() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("job.toml"),
            "[job]\nname = \"j\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n",
        )
        .unwrap();
        let cwd = std::env::current_dir().unwrap();
        // `dir` relative to `cwd`, by climbing to the root.
        let ups = cwd.components().count().saturating_sub(1);
        let mut relative: PathBuf = std::iter::repeat_n("..", ups).collect();
        relative.push(dir.path().strip_prefix("/").unwrap());
        let job = load(&relative.join("job.toml")).unwrap();
        assert!(job.file.is_absolute());
        assert!(job.output_dir.is_absolute());
    }
}
