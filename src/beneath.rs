//! Creating directories and files beneath a directory without following symbolic links.
//!
//! Everything dlaunch writes under the output directory goes through here: each component is
//! opened relative to its parent's descriptor with `O_NOFOLLOW`, so a link that a task, a
//! mistake or another job left there cannot send dlaunch's writes elsewhere. The path to the
//! output directory itself may contain links: that is the user's choice.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, openat};
use nix::sys::stat::{Mode, mkdirat};

/// How a directory beneath the root is opened: never through a link.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Opens `path` as a directory, following links on the way (the root is the user's choice).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(openat(AT_FDCWD, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?)
}

/// Opens the directory `relative` beneath `root`, creating missing components with `mode`.
/// With `new_leaf`, the last component must not exist yet: it is created here, so nothing
/// earlier written there is ever reused.
pub fn make_dirs(root: &OwnedFd, relative: &Path, mode: u32, new_leaf: bool) -> io::Result<OwnedFd> {
    let names = normal_components(relative)?;
    let mut dir: Option<OwnedFd> = None;
    for (i, name) in names.iter().enumerate() {
        let parent = dir.as_ref().unwrap_or(root);
        let leaf = i + 1 == names.len();
        match mkdirat(parent, *name, Mode::from_bits_truncate(mode)) {
            Ok(()) => {}
            Err(Errno::EEXIST) if new_leaf && leaf => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists already: dlaunch never writes into an earlier directory", relative.display()),
                ));
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
        let opened = openat(parent, *name, dir_flags(), Mode::empty());
        dir = Some(opened.map_err(|e| not_followed(e, relative, name))?);
    }
    dir.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an empty path"))
}

/// Makes sure the directory `relative` exists beneath `root`, like `make_dirs` without keeping
/// it open: a leaf made here is a directory by construction, so only one found there already
/// is opened (through no link) to be sure of it. One `mkdirat` for a new task directory.
/// True when the leaf was made here. A leaf that is a link or a file is `AlreadyExists`: the
/// name is taken by something else than a directory dlaunch may use. Errors name the path as
/// `root_shown` joined with `relative` (built only then: this runs once per task).
pub fn ensure_dirs(root: &OwnedFd, relative: &Path, mode: u32, root_shown: &Path) -> io::Result<bool> {
    let names = normal_components(relative)?;
    let Some((leaf, parents)) = names.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty path"));
    };
    let parent = match parents {
        [] => None,
        parents => Some(make_dirs(root, &parents.iter().collect::<std::path::PathBuf>(), mode, false)?),
    };
    let parent = parent.as_ref().unwrap_or(root);
    match mkdirat(parent, *leaf, Mode::from_bits_truncate(mode)) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => match openat(parent, *leaf, dir_flags(), Mode::empty()) {
            Ok(_) => Ok(false),
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                let taken = not_followed(e, &root_shown.join(relative), leaf);
                Err(io::Error::new(io::ErrorKind::AlreadyExists, taken.to_string()))
            }
            Err(e) => Err(io::Error::from(e)),
        },
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Creates the file `name` in `dir`; it must not exist (not even as a link).
pub fn create_new(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<File> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(mode))?;
    Ok(File::from(fd))
}

/// Opens the existing file `relative` beneath `root` for reading, through no link: what a
/// task left as a link to a file elsewhere is not read in its place.
pub fn open_read(root: &OwnedFd, relative: &Path) -> io::Result<File> {
    let names = normal_components(relative)?;
    let Some((leaf, dirs)) = names.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty path"));
    };
    let mut dir: Option<OwnedFd> = None;
    for name in dirs {
        let opened = openat(dir.as_ref().unwrap_or(root), *name, dir_flags(), Mode::empty());
        dir = Some(opened.map_err(|e| not_followed(e, relative, name))?);
    }
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    Ok(File::from(openat(dir.as_ref().unwrap_or(root), *leaf, flags, Mode::empty())?))
}

/// The components of a relative path of plain names (no `..`, no root).
fn normal_components(relative: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    relative
        .components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: only plain names are allowed beneath the output directory", relative.display()),
            )),
        })
        .collect()
}

/// ELOOP (or ENOTDIR) from `O_NOFOLLOW | O_DIRECTORY`: the component is a link, or a file.
fn not_followed(error: Errno, path: &Path, name: &std::ffi::OsStr) -> io::Error {
    match error {
        Errno::ELOOP | Errno::ENOTDIR => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} (in {}) is a symbolic link or not a directory: dlaunch does not follow links in the output directory",
                name.to_string_lossy(),
                path.display()
            ),
        ),
        e => io::Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn directories_and_files_are_made_beneath_the_root_with_their_modes() {
        let root_dir = tempfile::tempdir().unwrap();
        let root = open_root(root_dir.path()).unwrap();
        let dir = make_dirs(&root, Path::new("tasks/t/attempt-0"), 0o750, true).unwrap();
        create_new(&dir, "stdout", 0o640).unwrap().write_all(b"x").unwrap();
        let file = root_dir.path().join("tasks/t/attempt-0/stdout");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The test runs under some umask; the bits asked for are the most it can get.
        assert_eq!(mode(&file) & !0o640, 0);
        assert_eq!(mode(&root_dir.path().join("tasks/t")) & !0o750, 0);
        let again = create_new(&dir, "stdout", 0o600).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        let reused = make_dirs(&root, Path::new("tasks/t/attempt-0"), 0o700, true).unwrap_err();
        assert_eq!(reused.kind(), io::ErrorKind::AlreadyExists);
        assert!(make_dirs(&root, Path::new("tasks/t/attempt-0"), 0o700, false).is_ok(), "shared by a gang's ranks");
    }

    #[test]
    fn ensured_directories_are_made_or_found_and_never_through_a_link() {
        let root_dir = tempfile::tempdir().unwrap();
        let root = open_root(root_dir.path()).unwrap();
        let ensure = |path: &str| ensure_dirs(&root, Path::new(path), 0o700, Path::new(""));
        assert!(ensure("a/b").unwrap(), "made");
        assert!(root_dir.path().join("a/b").is_dir());
        assert!(!ensure("a/b").unwrap(), "found: a second attempt's");
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root_dir.path().join("a/link")).unwrap();
        let error = ensure("a/link").unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists, "the name is taken: {error}");
        std::fs::write(root_dir.path().join("a/file"), "").unwrap();
        assert_eq!(ensure("a/file").unwrap_err().kind(), io::ErrorKind::AlreadyExists, "a file is no directory");
        assert!(ensure("../x").is_err());
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn links_are_not_followed_and_dot_dot_is_refused() {
        let root_dir = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(victim.path(), root_dir.path().join("tasks")).unwrap();
        std::fs::create_dir(root_dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink(victim.path().join("f"), root_dir.path().join("d/stdout")).unwrap();
        let root = open_root(root_dir.path()).unwrap();
        let error = make_dirs(&root, Path::new("tasks/t/attempt-0"), 0o700, true).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        let d = make_dirs(&root, Path::new("d"), 0o700, false).unwrap();
        assert!(create_new(&d, "stdout", 0o600).is_err());
        assert!(make_dirs(&root, Path::new("../escape"), 0o700, false).is_err());
        assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 0, "nothing was written through the links");
    }
}
