//! The node-local side: where a node keeps its copies, writing a received stream into a
//! temporary tree, checking it and moving it under its final name, and finding a verified copy
//! that an earlier run left.
//!
//! ```text
//! <stage root>/<node key>/<dataset>/<source name>   the verified copy that tasks read
//! <stage root>/<node key>/.<dataset>.partial/        being written; renamed once verified
//! ```

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::manifest::{self, Checksum, Cursor, Kind, Manifest, StreamFile, hex};
use crate::host::MissingTempDir;
use dlaunch_core::spec::{Dataset, Job};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("{} is not safe to stage into: {why}", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "the data received differs from what rank 0 sent (checksum {}, expected {}): not kept",
        short(got),
        short(expected)
    )]
    Mismatch { got: Checksum, expected: Checksum },
    #[error("the stream does not match the manifest ({0})")]
    Stream(&'static str),
    #[error("cannot move {} to {}: {source}", from.display(), to.display())]
    Rename { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("cannot remove {}: {source}", path.display())]
    Remove { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    TempDir(#[from] MissingTempDir),
}

fn short(checksum: &Checksum) -> String {
    hex(checksum)[..16].to_string()
}

/// Where jobs stage without a `stage_dir`: a per-site node-local directory (`$SLURM_TMPDIR`,
/// set by sites and SLURM plugins that give each job one) or `$TMPDIR`, else /tmp. It must
/// exist: dlaunch creates only its own directory in it.
pub fn node_tmp() -> Result<PathBuf, MissingTempDir> {
    let Some((var, dir)) = ["SLURM_TMPDIR", "TMPDIR"]
        .into_iter()
        .find_map(|var| Some((var, PathBuf::from(std::env::var_os(var).filter(|v| !v.is_empty())?))))
    else {
        return Ok(PathBuf::from("/tmp"));
    };
    if dir.is_dir() { Ok(dir) } else { Err(MissingTempDir { var, path: dir }) }
}

/// `<tmp>/dlaunch-<uid>/<job>-<hash of the output directory>`: the same directory for every run
/// of one job (so a resumed run finds its copies), a different one for another job of the
/// same name.
pub fn default_root(tmp: &Path, job: &Job) -> PathBuf {
    let tag = hex(blake3::hash(job.output_dir.as_os_str().as_encoded_bytes()).as_bytes());
    tmp.join(format!("dlaunch-{}", nix::unistd::geteuid())).join(format!("{}-{}", job.name, &tag[..8]))
}

/// Prepares this node's directory for `dataset` under the dataset's, the job's or the default
/// stage root, and returns it.
pub fn node_dir(job: &Job, dataset: &Dataset, key: &str) -> Result<PathBuf, StoreError> {
    let root = match dataset.stage_dir.as_ref().or(job.stage_dir.as_ref()) {
        // Like SLURM with --chdir and --output, dlaunch does not make the parents of a
        // directory it is given: a mistyped or unmounted path fails instead of filling `/`.
        Some(dir) => match DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => dir.clone(),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => dir.clone(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let source = std::io::Error::new(e.kind(), "its parent directory does not exist (stage_dir)");
                return Err(StoreError::Create { path: dir.clone(), source });
            }
            Err(source) => return Err(StoreError::Create { path: dir.clone(), source }),
        },
        None => {
            let root = default_root(&node_tmp()?, job);
            // Under a shared /tmp, another user could have made these first, or put links there.
            if let Some(user_dir) = root.parent() {
                ensure_private_dir(user_dir)?;
            }
            ensure_private_dir(&root)?;
            root
        }
    };
    let dir = root.join(key);
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (0700) unless it exists, then checks that it is a real directory of ours that
/// nobody else can write to.
pub fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(StoreError::Create { path: dir.to_path_buf(), source: e });
        }
        _ => {}
    }
    let unsafe_because = |why: String| StoreError::Unsafe { path: dir.to_path_buf(), why };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| unsafe_because(e.to_string()))?;
    if !meta.is_dir() {
        return Err(unsafe_because("it is not a directory (a link?)".into()));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(unsafe_because(format!("it belongs to user {}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_because(format!("others can write to it (mode {:o})", meta.mode() & 0o777)));
    }
    Ok(())
}

/// Names the directory each node's leader writes in: its host name, made safe for a path.
/// Leaders that share a host name (two nodes named alike, or `DLAUNCH_STAGE_RANK_IS_NODE`) add
/// `@<world rank>`, which no host name has, so that no two leaders ever write the same path,
/// even when their stage directories lie on one shared filesystem.
pub fn node_keys(leaders: &[(u32, String)]) -> Vec<String> {
    let safe = |host: &str| -> String {
        let key: String = host
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
            .collect();
        if key.is_empty() || key.starts_with('.') { format!("node{key}") } else { key }
    };
    let keys: Vec<String> = leaders.iter().map(|(_, host)| safe(host)).collect();
    keys.iter()
        .zip(leaders)
        .map(
            |(key, (rank, _))| {
                if keys.iter().filter(|k| *k == key).count() > 1 { format!("{key}@{rank}") } else { key.clone() }
            },
        )
        .collect()
}

/// A copy of this exact tree that an earlier run verified and moved into place; `checksum`:
/// computed again now from what is on disk (`None` when the dataset is not verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub checksum: Option<Checksum>,
}

/// Looks for `dataset`'s copy in `node_dir`. The copy is checksummed again from disk, not
/// trusted from a record: tasks may have changed files in it since.
pub fn existing_copy(node_dir: &Path, dataset: &str, manifest: &Manifest, verify: bool) -> Option<Existing> {
    let target = node_dir.join(dataset);
    let root = target.join(manifest.root_name());
    let meta = std::fs::symlink_metadata(&root).ok()?;
    if meta.is_symlink() {
        return None;
    }
    let scan = match manifest::scan(&root) {
        Ok(scan) => scan,
        Err(e) => {
            log::info!("dataset {dataset}: the copy in {} is unusable ({e}): staging again", target.display());
            return None;
        }
    };
    if scan.manifest != *manifest || !scan.skipped.is_empty() {
        log::info!("dataset {dataset}: the copy in {} differs from the source: staging again", target.display());
        return None;
    }
    if !verify {
        return Some(Existing { checksum: None });
    }
    match manifest::checksum_tree(&target, manifest) {
        Ok(checksum) => Some(Existing { checksum: Some(checksum) }),
        Err(e) => {
            log::info!("dataset {dataset}: cannot read the copy in {} ({e}): staging again", target.display());
            None
        }
    }
}

/// Rank 0's checksum of the stream, and the one a node computed from what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sums {
    pub sent: Checksum,
    pub got: Checksum,
}

/// Writes a dataset's stream into `.<dataset>.partial` and, once verified, renames it to
/// `<dataset>`: the final name never holds a partial or unverified copy.
pub struct Writer {
    partial: PathBuf,
    target: PathBuf,
    manifest: Arc<Manifest>,
    cursor: Cursor,
    open: Option<File>,
    error: Option<StoreError>,
}

impl Writer {
    /// Clears leftovers of an interrupted run and creates the tree's directories, links and
    /// empty files.
    pub fn begin(node_dir: &Path, dataset: &str, manifest: Arc<Manifest>) -> Result<Writer, StoreError> {
        let partial = node_dir.join(format!(".{dataset}.partial"));
        remove_tree(&partial)?;
        let writer = Writer {
            target: node_dir.join(dataset),
            cursor: Cursor::new(&manifest),
            open: None,
            error: None,
            partial,
            manifest,
        };
        let created = writer.create_skeleton();
        if let Err(e) = created {
            writer.abandon();
            return Err(e);
        }
        Ok(writer)
    }

    fn create_skeleton(&self) -> Result<(), StoreError> {
        let create = |path: &Path, source| StoreError::Create { path: path.to_path_buf(), source };
        // Owner-only while incomplete; directories get their modes in `finish`.
        DirBuilder::new().mode(0o700).create(&self.partial).map_err(|e| create(&self.partial, e))?;
        for entry in &self.manifest.entries {
            let path = self.partial.join(&entry.path);
            match &entry.kind {
                Kind::Dir { .. } => DirBuilder::new().mode(0o700).create(&path).map_err(|e| create(&path, e))?,
                Kind::Link { target } => std::os::unix::fs::symlink(target, &path).map_err(|e| create(&path, e))?,
                Kind::File { mode, size: 0 } => {
                    new_file(&path, *mode)?;
                }
                Kind::File { .. } => {}
            }
        }
        Ok(())
    }

    /// Takes the next bytes of the stream. After a failure it drops them: the caller keeps
    /// receiving in step with the other nodes and reports the failure at the end.
    pub fn write(&mut self, data: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.write_pieces(data) {
            self.open = None;
            self.error = Some(e);
        }
    }

    fn write_pieces(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let piece = self.cursor.next_piece(data.len()).ok_or(StoreError::Stream("more bytes than files"))?;
            let StreamFile { path, mode, .. } = self.cursor.file(piece.file);
            let path = self.partial.join(path);
            let mut file = match self.open.take() {
                Some(file) if piece.offset > 0 => file,
                _ => new_file(&path, *mode)?,
            };
            file.write_all(&data[..piece.len]).map_err(|source| StoreError::Write { path, source })?;
            if !piece.last {
                self.open = Some(file);
            }
            data = &data[piece.len..];
        }
        Ok(())
    }

    /// Checks the copy's checksum against rank 0's (when verified), gives the directories
    /// their modes and moves the copy into place, replacing an older one. Returns the path
    /// tasks get.
    pub fn finish(mut self, sums: Option<Sums>) -> Result<PathBuf, StoreError> {
        let result = self.complete(sums);
        if result.is_err() {
            self.abandon();
        }
        result
    }

    fn complete(&mut self, sums: Option<Sums>) -> Result<PathBuf, StoreError> {
        self.open = None;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.cursor.at_end() {
            return Err(StoreError::Stream("the stream ended early"));
        }
        if let Some(Sums { sent, got }) = sums
            && sent != got
        {
            return Err(StoreError::Mismatch { got, expected: sent });
        }
        // Deepest first: a directory without write permission would refuse changes inside.
        for entry in self.manifest.entries.iter().rev() {
            if let Kind::Dir { mode } = entry.kind {
                let path = self.partial.join(&entry.path);
                std::fs::set_permissions(&path, PermissionsExt::from_mode(mode))
                    .map_err(|source| StoreError::Write { path, source })?;
            }
        }
        remove_tree(&self.target)?;
        std::fs::rename(&self.partial, &self.target).map_err(|source| StoreError::Rename {
            from: self.partial.clone(),
            to: self.target.clone(),
            source,
        })?;
        Ok(self.target.join(self.manifest.root_name()))
    }

    /// Removes the partial copy; nothing is left under either name.
    pub fn abandon(mut self) {
        self.open = None;
        if let Err(e) = remove_tree(&self.partial) {
            log::warn!("{e}");
        }
    }
}

/// Creates a file for writing with exactly `mode`, whatever the umask.
fn new_file(path: &Path, mode: u32) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| StoreError::Create { path: path.to_path_buf(), source })?;
    file.set_permissions(PermissionsExt::from_mode(mode))
        .map_err(|source| StoreError::Write { path: path.to_path_buf(), source })?;
    Ok(file)
}

/// Removes a file or tree if it exists, without following links, including directories a
/// staged dataset made read-only.
pub fn remove_tree(path: &Path) -> Result<(), StoreError> {
    let removed = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if !meta.is_dir() => std::fs::remove_file(path),
        Ok(_) => std::fs::remove_dir_all(path).or_else(|_| {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }),
    };
    removed.map_err(|source| StoreError::Remove { path: path.to_path_buf(), source })
}

fn make_writable(dir: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(dir)
        && meta.is_dir()
    {
        let _ = std::fs::set_permissions(dir, PermissionsExt::from_mode(meta.mode() | 0o700));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::manifest::{StreamReader, checksum_tree, scan};
    use crate::stage::testing::tree;

    /// Streams `source` into a writer in pieces of `piece` bytes, as the network would.
    fn stream_into(source: &manifest::Scan, writer: &mut Writer, piece: usize) {
        let base = source.root.parent().unwrap();
        let mut reader = StreamReader::new(base, &source.manifest);
        let mut buf = vec![0u8; piece];
        loop {
            let n = reader.fill(&mut buf).unwrap();
            writer.write(&buf[..n]);
            if n < piece {
                break;
            }
        }
    }

    fn staged(source: &manifest::Scan, node: &Path, name: &str) -> Result<PathBuf, StoreError> {
        let manifest = Arc::new(source.manifest.clone());
        let mut writer = Writer::begin(node, name, manifest)?;
        stream_into(source, &mut writer, 777);
        let sum = checksum_tree(source.root.parent().unwrap(), &source.manifest).unwrap();
        writer.finish(Some(Sums { sent: sum, got: sum }))
    }

    #[test]
    fn a_tree_is_written_verified_and_moved_into_place() {
        let src = tree();
        let source = scan(&src.path().join("data")).unwrap();
        let node = tempfile::tempdir().unwrap();
        let path = staged(&source, node.path(), "ds").unwrap();
        assert_eq!(path, node.path().join("ds/data"));
        let copy = scan(&path).unwrap();
        assert_eq!(copy.manifest, source.manifest, "same names, kinds, sizes, modes, link targets");
        assert_eq!(std::fs::read_link(path.join("sub/to_b")).unwrap(), Path::new("../b.txt"));
        assert_eq!(std::fs::read(path.join("sub/to_b")).unwrap(), b"bee", "the link resolves inside the copy");
        assert!(!node.path().join(".ds.partial").exists());
        let existing = existing_copy(node.path(), "ds", &source.manifest, true).unwrap();
        assert_eq!(existing.checksum, Some(checksum_tree(src.path(), &source.manifest).unwrap()));
    }

    #[test]
    fn a_single_file_and_an_empty_one_are_staged_too() {
        let src = tempfile::tempdir().unwrap();
        for (name, len) in [("empty.bin", 0usize), ("one.bin", 1), ("more.bin", 100_000)] {
            std::fs::write(src.path().join(name), vec![3u8; len]).unwrap();
            let source = scan(&src.path().join(name)).unwrap();
            let node = tempfile::tempdir().unwrap();
            let path = staged(&source, node.path(), "d").unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), vec![3u8; len], "{name}");
        }
    }

    #[test]
    fn a_checksum_mismatch_leaves_nothing_behind() {
        let src = tree();
        let source = scan(&src.path().join("data")).unwrap();
        let node = tempfile::tempdir().unwrap();
        let mut writer = Writer::begin(node.path(), "ds", Arc::new(source.manifest.clone())).unwrap();
        stream_into(&source, &mut writer, 4096);
        let e = writer.finish(Some(Sums { sent: [0u8; 32], got: [1u8; 32] })).unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("differs from what rank 0 sent"), "{e}");
        assert_eq!(std::fs::read_dir(node.path()).unwrap().count(), 0, "no partial copy, no final copy");
    }

    #[test]
    fn a_short_stream_is_not_kept() {
        let src = tree();
        let source = scan(&src.path().join("data")).unwrap();
        let node = tempfile::tempdir().unwrap();
        let mut writer = Writer::begin(node.path(), "ds", Arc::new(source.manifest.clone())).unwrap();
        writer.write(&[7u8; 100]);
        assert!(matches!(writer.finish(None), Err(StoreError::Stream(_))));
        assert_eq!(std::fs::read_dir(node.path()).unwrap().count(), 0);
    }

    #[test]
    fn write_errors_name_the_path() {
        let src = tree();
        let source = scan(&src.path().join("data")).unwrap();
        let node = tempfile::tempdir().unwrap();
        std::fs::write(node.path().join("file"), b"").unwrap();
        let e = Writer::begin(&node.path().join("file"), "ds", Arc::new(source.manifest)).err().unwrap();
        assert!(e.to_string().contains("file/.ds.partial"), "{e}");
    }

    #[test]
    fn an_older_copy_is_replaced_and_a_changed_copy_is_not_reused() {
        let src = tree();
        let source = scan(&src.path().join("data")).unwrap();
        let node = tempfile::tempdir().unwrap();
        staged(&source, node.path(), "ds").unwrap();
        let sum = checksum_tree(src.path(), &source.manifest).unwrap();
        std::fs::write(node.path().join("ds/data/b.txt"), b"BEE").unwrap();
        let changed = existing_copy(node.path(), "ds", &source.manifest, true).unwrap();
        assert_ne!(changed.checksum, Some(sum), "same size, other bytes: the checksum tells");
        assert_eq!(existing_copy(node.path(), "ds", &source.manifest, false), Some(Existing { checksum: None }));
        std::fs::remove_file(node.path().join("ds/data/a.bin")).unwrap();
        assert_eq!(existing_copy(node.path(), "ds", &source.manifest, true), None, "a file is missing");
        std::fs::set_permissions(node.path().join("ds/data/sub"), PermissionsExt::from_mode(0o500)).unwrap();
        staged(&source, node.path(), "ds").unwrap();
        assert_eq!(existing_copy(node.path(), "ds", &source.manifest, true).unwrap().checksum, Some(sum));
    }

    #[test]
    fn read_only_trees_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), b"x").unwrap();
        for d in ["a/b", "a", ""] {
            std::fs::set_permissions(tree.join(d), PermissionsExt::from_mode(0o500)).unwrap();
        }
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
    }

    #[test]
    fn private_dirs_are_created_owner_only_and_others_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("mine");
        ensure_private_dir(&mine).unwrap();
        assert_eq!(std::fs::metadata(&mine).unwrap().mode() & 0o777, 0o700);
        ensure_private_dir(&mine).unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
        assert!(ensure_private_dir(&open).unwrap_err().to_string().contains("others can write"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        assert!(ensure_private_dir(&link).unwrap_err().to_string().contains("not a directory"));
    }

    #[test]
    fn node_keys_are_host_names_unless_shared() {
        let keys =
            |hosts: &[(u32, &str)]| node_keys(&hosts.iter().map(|(r, h)| (*r, h.to_string())).collect::<Vec<_>>());
        assert_eq!(keys(&[(0, "node1"), (4, "node2"), (8, "node3")]), ["node1", "node2", "node3"]);
        assert_eq!(
            keys(&[(0, "vm"), (1, "vm"), (2, "other")]),
            ["vm@0", "vm@1", "other"],
            "several leaders on one name"
        );
        assert_eq!(keys(&[(0, "a/b c"), (1, ".hidden"), (2, "")]), ["a_b_c", "node.hidden", "node"]);
        let many: Vec<(u32, &str)> = (0..3).map(|r| (r, "n")).chain([(3, "n@1")]).collect();
        let many = keys(&many);
        let distinct: std::collections::BTreeSet<&String> = many.iter().collect();
        assert_eq!(distinct.len(), 4, "{many:?}");
    }

    #[test]
    fn the_default_root_is_per_user_and_per_job() {
        let mut job = dlaunch_core::spec::parse(
            Path::new("/jobs/job.toml"),
            b"[job]\nname = \"sweep\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n",
            &crate::jobfile::FsProbe,
        )
        .unwrap();
        let a = default_root(Path::new("/local"), &job);
        assert!(a.starts_with(format!("/local/dlaunch-{}", nix::unistd::geteuid())), "{}", a.display());
        assert!(a.file_name().unwrap().to_string_lossy().starts_with("sweep-"));
        assert_eq!(default_root(Path::new("/local"), &job), a, "stable across runs");
        job.output_dir = PathBuf::from("/elsewhere");
        assert_ne!(default_root(Path::new("/local"), &job), a, "another job of the same name");
    }
}
