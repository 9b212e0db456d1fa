//! What a dataset is, without MPI: the tree under its source as a list of entries, the byte
//! stream its files make when read in that order, the rules that keep every path inside the
//! tree, and the checksum of it all.
//!
//! A dataset travels as one stream: the contents of its regular files, concatenated in manifest
//! order. Directories, permissions and links travel in the manifest only.

use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use dlaunch_core::spec::format_size;

pub type Checksum = [u8; 32];

/// One file, directory or link; `path` is relative to the directory that holds the source, so
/// its first component is the source's own name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `mode`: permission bits only (0o777); set-id and sticky bits are not staged.
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
    },
    /// A relative target that stays inside the tree.
    Link {
        target: String,
    },
}

/// A dataset's tree: parents before their children, siblings by name; `entries[0]` is the
/// source itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

/// A scanned source, on rank 0.
#[derive(Clone, Debug)]
pub struct Scan {
    /// The source, absolute and with links resolved.
    pub root: PathBuf,
    pub manifest: Manifest,
    /// Links left out because they point outside the tree: (link, target).
    pub skipped: Vec<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("{} is a {what}: only regular files, directories and symbolic links can be staged", path.display())]
    Special { path: PathBuf, what: &'static str },
    #[error("{}: the name is not valid UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{} has no name to stage it under", path.display())]
    NoName { path: PathBuf },
}

fn unreadable(path: &Path, source: std::io::Error) -> ScanError {
    ScanError::Unreadable { path: path.to_path_buf(), source }
}

/// Lists the tree under `source` and opens every file once, so that an unreadable file fails
/// the start of a run, with its name, rather than the transfer halfway.
pub fn scan(source: &Path) -> Result<Scan, ScanError> {
    let root = std::fs::canonicalize(source).map_err(|e| unreadable(source, e))?;
    let name = root.file_name().ok_or_else(|| ScanError::NoName { path: root.clone() })?;
    let name = utf8(name, &root)?.to_string();
    let meta = std::fs::metadata(&root).map_err(|e| unreadable(&root, e))?;
    let mut scan = Scan { root: root.clone(), manifest: Manifest::default(), skipped: Vec::new() };
    walk(&root, name, 0, &meta, &mut scan)?;
    Ok(scan)
}

fn utf8<'a>(name: &'a std::ffi::OsStr, path: &Path) -> Result<&'a str, ScanError> {
    name.to_str().ok_or_else(|| ScanError::NotUtf8 { path: path.to_path_buf() })
}

/// `depth`: how many directories `path` lies below the root.
fn walk(path: &Path, rel: String, depth: usize, meta: &Metadata, scan: &mut Scan) -> Result<(), ScanError> {
    let file_type = meta.file_type();
    let mode = meta.permissions().mode() & 0o777;
    if file_type.is_file() {
        File::open(path).map_err(|e| unreadable(path, e))?;
        scan.manifest.entries.push(Entry { path: rel, kind: Kind::File { mode, size: meta.len() } });
    } else if file_type.is_dir() {
        scan.manifest.entries.push(Entry { path: rel.clone(), kind: Kind::Dir { mode } });
        let mut names: Vec<OsString> = std::fs::read_dir(path)
            .and_then(|dir| dir.map(|entry| entry.map(|e| e.file_name())).collect())
            .map_err(|e| unreadable(path, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let child = path.join(&name);
            let child_rel = format!("{rel}/{}", utf8(&name, &child)?);
            let child_meta = std::fs::symlink_metadata(&child).map_err(|e| unreadable(&child, e))?;
            walk(&child, child_rel, depth + 1, &child_meta, scan)?;
        }
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| unreadable(path, e))?;
        let text = utf8(target.as_os_str(), path)?.to_string();
        if link_stays_inside(&target, depth.saturating_sub(1)) {
            scan.manifest.entries.push(Entry { path: rel, kind: Kind::Link { target: text } });
        } else {
            scan.skipped.push((path.to_path_buf(), target));
        }
    } else {
        let what = if file_type.is_fifo() {
            "named pipe"
        } else if file_type.is_socket() {
            "socket"
        } else {
            "device"
        };
        return Err(ScanError::Special { path: path.to_path_buf(), what });
    }
    Ok(())
}

/// Whether a link whose directory lies `parent_depth` levels below the root resolves inside the
/// tree. Only leading `..` are allowed, and no more than there are levels to climb: a `..` after
/// a name could climb out of whatever that name resolves to (`l/..` with `l -> .` is the
/// root's parent), and an absolute target means something else on every other node.
pub fn link_stays_inside(target: &Path, parent_depth: usize) -> bool {
    let mut ups = 0;
    let mut names = 0;
    for component in target.components() {
        match component {
            Component::ParentDir if names == 0 => ups += 1,
            Component::Normal(_) => names += 1,
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    !target.as_os_str().is_empty() && ups <= parent_depth
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsafe entry {path:?} in the manifest: {why}")]
pub struct UnsafeEntry {
    pub path: String,
    pub why: &'static str,
}

impl Manifest {
    pub fn root_name(&self) -> &str {
        self.entries.first().map_or("", |e| e.path.as_str())
    }

    pub fn total_bytes(&self) -> u64 {
        self.files().map(|(_, size)| size).sum()
    }

    /// Regular files in stream order: (path, size).
    pub fn files(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries.iter().filter_map(|e| match e.kind {
            Kind::File { size, .. } => Some((e.path.as_str(), size)),
            _ => None,
        })
    }

    /// "3 files in 2 directories, 1 link, 4.0 MiB"
    pub fn describe(&self) -> String {
        let count = |f: fn(&Kind) -> bool| self.entries.iter().filter(|e| f(&e.kind)).count();
        let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let mut text = plural(count(|k| matches!(k, Kind::File { .. })), "file", "files");
        let dirs = count(|k| matches!(k, Kind::Dir { .. }));
        if dirs > 0 {
            text.push_str(&format!(" in {}", plural(dirs, "directory", "directories")));
        }
        let links = count(|k| matches!(k, Kind::Link { .. }));
        if links > 0 {
            text.push_str(&format!(", {}", plural(links, "link", "links")));
        }
        format!("{text}, {}", format_size(self.total_bytes()))
    }

    /// A hasher that has seen the tree's shape (names, kinds, modes, sizes, link targets): the
    /// checksum covers the structure as well as the bytes.
    pub fn hasher(&self) -> blake3::Hasher {
        let mut hasher = blake3::Hasher::new();
        let shape = serde_json::to_vec(&self.entries).unwrap_or_default();
        hasher.update(&(shape.len() as u64).to_le_bytes());
        hasher.update(&shape);
        hasher
    }

    /// Checks what a node is about to create, whoever built the manifest: one root, relative
    /// plain names, every parent a directory listed before (so nothing is written through a
    /// link), no duplicates, links that stay inside.
    pub fn check(&self) -> Result<(), UnsafeEntry> {
        let mut dirs = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let bad = |why| Err(UnsafeEntry { path: entry.path.clone(), why });
            let parts: Vec<&str> = entry.path.split('/').collect();
            if parts.iter().any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0')) {
                return bad("not a plain relative path");
            }
            match entry.path.rsplit_once('/') {
                None if i > 0 => return bad("a second root"),
                Some(_) if i == 0 => return bad("the root is not a single name"),
                Some((parent, _)) if !dirs.contains(parent) => {
                    return bad("its parent is not a directory listed before");
                }
                _ => {}
            }
            if !seen.insert(entry.path.as_str()) {
                return bad("listed twice");
            }
            match &entry.kind {
                Kind::Dir { mode } | Kind::File { mode, .. } if *mode > 0o777 => return bad("mode out of range"),
                Kind::Dir { .. } => {
                    dirs.insert(entry.path.as_str());
                }
                Kind::Link { target } if !link_stays_inside(Path::new(target), parts.len().saturating_sub(2)) => {
                    return bad("the link points outside the tree");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A regular file with bytes in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFile {
    pub path: String,
    pub size: u64,
    pub mode: u32,
}

/// Where the stream stands: which file, how far into it. Reading and writing walk the stream
/// the same way, so both use this.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// Non-empty files in stream order.
    files: Vec<StreamFile>,
    index: usize,
    offset: u64,
}

/// A run of stream bytes that lies in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub file: usize,
    /// Where in the file it starts; 0 means the file begins here.
    pub offset: u64,
    pub len: usize,
    /// The file ends with this piece.
    pub last: bool,
}

impl Cursor {
    pub fn new(manifest: &Manifest) -> Self {
        let files = manifest
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                Kind::File { mode, size } if size > 0 => Some(StreamFile { path: e.path.clone(), size, mode }),
                _ => None,
            })
            .collect();
        Cursor { files, index: 0, offset: 0 }
    }

    pub fn file(&self, index: usize) -> &StreamFile {
        &self.files[index]
    }

    pub fn at_end(&self) -> bool {
        self.index >= self.files.len()
    }

    /// The next piece of at most `max` bytes; `None` at the end of the stream.
    pub fn next_piece(&mut self, max: usize) -> Option<Piece> {
        let size = self.files.get(self.index)?.size;
        let len = (size - self.offset).min(max as u64) as usize;
        let piece = Piece { file: self.index, offset: self.offset, len, last: self.offset + len as u64 == size };
        self.offset += len as u64;
        if piece.last {
            self.index += 1;
            self.offset = 0;
        }
        Some(piece)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} changed while it was being staged (it had {expected} bytes)", path.display())]
    Changed { path: PathBuf, expected: u64 },
    #[error("the dataset ended {missing} bytes early")]
    Short { missing: u64 },
}

/// Reads a dataset's stream from the tree under `base` (the directory that holds its root).
pub struct StreamReader {
    base: PathBuf,
    cursor: Cursor,
    open: Option<File>,
}

impl StreamReader {
    pub fn new(base: &Path, manifest: &Manifest) -> Self {
        StreamReader { base: base.to_path_buf(), cursor: Cursor::new(manifest), open: None }
    }

    /// Fills `buf` from the stream; returns how many bytes there were (less only at its end).
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(piece) = self.cursor.next_piece(buf.len() - filled) else { break };
            let StreamFile { path, size: expected, .. } = self.cursor.file(piece.file);
            let (path, expected) = (self.base.join(path), *expected);
            let io = |source| ReadError::Io { path: path.clone(), source };
            let file = match self.open.take() {
                Some(file) if piece.offset > 0 => file,
                _ => std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io)?,
            };
            let target = &mut buf[filled..filled + piece.len];
            let mut file = file;
            file.read_exact(target).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ReadError::Changed { path: path.clone(), expected },
                _ => io(e),
            })?;
            if piece.last {
                let now = file.metadata().map_err(io)?.len();
                if now != expected {
                    return Err(ReadError::Changed { path, expected });
                }
            } else {
                self.open = Some(file);
            }
            filled += piece.len;
        }
        Ok(filled)
    }
}

/// The checksum of the tree under `base` as `manifest` describes it.
pub fn checksum_tree(base: &Path, manifest: &Manifest) -> Result<Checksum, ReadError> {
    let mut hasher = manifest.hasher();
    let mut reader = StreamReader::new(base, manifest);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.fill(&mut buf)?;
        hasher.update(&buf[..n]);
        if n < buf.len() {
            return Ok(*hasher.finalize().as_bytes());
        }
    }
}

pub fn hex(checksum: &Checksum) -> String {
    checksum.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a stream of `total` bytes is cut for sending: full chunks, then the rest. There is
/// always at least one chunk, so that an empty dataset still carries its trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    pub total: u64,
    pub chunk: usize,
}

impl ChunkPlan {
    pub fn count(&self) -> u64 {
        self.total.div_ceil(self.chunk as u64).max(1)
    }

    pub fn len(&self, index: u64) -> usize {
        let start = index * self.chunk as u64;
        self.total.saturating_sub(start).min(self.chunk as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::testing::tree;

    #[test]
    fn scan_lists_the_tree_in_order_and_leaves_out_escaping_links() {
        let dir = tree();
        let scan = scan(&dir.path().join("data")).unwrap();
        let paths: Vec<&str> = scan.manifest.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "data",
                "data/a.bin",
                "data/b.txt",
                "data/sub",
                "data/sub/deeper",
                "data/sub/deeper/empty",
                "data/sub/run.sh",
                "data/sub/to_b"
            ]
        );
        assert_eq!(scan.manifest.entries[6].kind, Kind::File { mode: 0o755, size: 10 });
        assert_eq!(scan.manifest.entries[7].kind, Kind::Link { target: "../b.txt".into() });
        let skipped: Vec<String> =
            scan.skipped.iter().map(|(l, _)| l.file_name().unwrap().to_string_lossy().into()).collect();
        assert_eq!(skipped, ["absolute", "climbs_out"]);
        assert_eq!(scan.manifest.total_bytes(), 5013);
        assert_eq!(scan.manifest.describe(), "4 files in 3 directories, 1 link, 4.9 KiB");
        assert_eq!(scan.manifest.check(), Ok(()));
        assert_eq!(scan.root, std::fs::canonicalize(dir.path().join("data")).unwrap());
    }

    #[test]
    fn a_single_file_is_a_one_entry_manifest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("one.tar"), b"x").unwrap();
        let scan = scan(&dir.path().join("one.tar")).unwrap();
        assert_eq!(scan.manifest.root_name(), "one.tar");
        assert_eq!(scan.manifest.entries.len(), 1);
        assert!(matches!(scan.manifest.entries[0].kind, Kind::File { size: 1, .. }));
    }

    #[test]
    fn special_files_and_missing_sources_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("d/pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = scan(&dir.path().join("d")).unwrap_err().to_string();
        assert!(e.contains("d/pipe is a named pipe"), "{e}");
        let e = scan(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(e.starts_with("cannot read ") && e.contains("missing"), "{e}");
    }

    #[test]
    fn links_may_climb_only_as_far_as_the_root() {
        assert!(link_stays_inside(Path::new("b"), 0));
        assert!(link_stays_inside(Path::new("./sub/b"), 0));
        assert!(link_stays_inside(Path::new("../b"), 1));
        assert!(link_stays_inside(Path::new("../.."), 2));
        assert!(!link_stays_inside(Path::new("../b"), 0));
        assert!(!link_stays_inside(Path::new("/etc/passwd"), 5));
        assert!(!link_stays_inside(Path::new("sub/../../x"), 5), "`..` after a name can leave through a link");
        assert!(!link_stays_inside(Path::new(""), 0));
    }

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry { path: path.into(), kind }
    }

    #[test]
    fn unsafe_manifests_are_refused() {
        let dir = Kind::Dir { mode: 0o755 };
        let file = Kind::File { mode: 0o644, size: 1 };
        let check = |entries: Vec<Entry>| Manifest { entries }.check().map_err(|e| e.why);
        assert_eq!(check(vec![entry("d", dir.clone()), entry("d/f", file.clone())]), Ok(()));
        for bad in ["d/../f", "/d/f", "d//f", "d/./f", "e/f"] {
            assert!(check(vec![entry("d", dir.clone()), entry(bad, file.clone())]).is_err(), "{bad}");
        }
        assert_eq!(check(vec![entry("d/f", file.clone())]), Err("the root is not a single name"));
        assert_eq!(check(vec![entry("d", dir.clone()), entry("e", file.clone())]), Err("a second root"));
        let through_link = vec![
            entry("d", dir.clone()),
            entry("d/l", Kind::Link { target: ".".into() }),
            entry("d/l/f", file.clone()),
        ];
        assert_eq!(check(through_link), Err("its parent is not a directory listed before"));
        assert_eq!(
            check(vec![entry("d", dir.clone()), entry("d/l", Kind::Link { target: "../x".into() })]),
            Err("the link points outside the tree")
        );
        assert_eq!(
            check(vec![entry("d", dir.clone()), entry("d/f", file.clone()), entry("d/f", file)]),
            Err("listed twice")
        );
        assert_eq!(check(vec![entry("d", Kind::Dir { mode: 0o4755 })]), Err("mode out of range"));
    }

    #[test]
    fn chunk_plans_cover_the_stream_exactly() {
        let plan = |total, chunk| {
            let p = ChunkPlan { total, chunk };
            (0..p.count()).map(|i| p.len(i)).collect::<Vec<_>>()
        };
        assert_eq!(plan(0, 8), [0], "an empty dataset still sends one (empty) chunk");
        assert_eq!(plan(1, 8), [1]);
        assert_eq!(plan(8, 8), [8]);
        assert_eq!(plan(9, 8), [8, 1]);
        assert_eq!(plan(20, 8), [8, 8, 4]);
        let big = ChunkPlan { total: 5 << 30, chunk: 8 << 20 };
        assert_eq!(big.count(), 640, "5 GiB in 8 MiB chunks: every call stays far below 2 GiB");
    }

    #[test]
    fn the_cursor_walks_files_in_pieces_and_skips_empty_ones() {
        let manifest = Manifest {
            entries: vec![
                entry("d", Kind::Dir { mode: 0o755 }),
                entry("d/a", Kind::File { mode: 0o644, size: 5 }),
                entry("d/empty", Kind::File { mode: 0o644, size: 0 }),
                entry("d/b", Kind::File { mode: 0o644, size: 2 }),
            ],
        };
        let mut cursor = Cursor::new(&manifest);
        let mut pieces = Vec::new();
        while let Some(p) = cursor.next_piece(3) {
            pieces.push((cursor.file(p.file).path.clone(), p.offset, p.len, p.last));
        }
        let expect = [("d/a", 0, 3, false), ("d/a", 3, 2, true), ("d/b", 0, 2, true)];
        assert_eq!(pieces, expect.map(|(p, o, l, last)| (p.to_string(), o, l, last)));
    }

    #[test]
    fn the_stream_is_the_files_in_order_and_the_checksum_covers_the_shape() {
        let dir = tree();
        let scan = scan(&dir.path().join("data")).unwrap();
        let mut reader = StreamReader::new(dir.path(), &scan.manifest);
        let mut stream = Vec::new();
        let mut buf = vec![0u8; 1000];
        loop {
            let n = reader.fill(&mut buf).unwrap();
            stream.extend_from_slice(&buf[..n]);
            if n < buf.len() {
                break;
            }
        }
        let mut expect = vec![7u8; 5000];
        expect.extend_from_slice(b"bee#!/bin/sh\n");
        assert_eq!(stream, expect);
        let sum = checksum_tree(dir.path(), &scan.manifest).unwrap();
        let mut hasher = scan.manifest.hasher();
        hasher.update(&expect);
        assert_eq!(&sum, hasher.finalize().as_bytes());
        let mut other = scan.manifest.clone();
        other.entries[6].kind = Kind::File { mode: 0o644, size: 10 };
        assert_ne!(checksum_tree(dir.path(), &other).unwrap(), sum, "a mode change changes the checksum");
        assert_eq!(hex(&sum).len(), 64);
    }

    #[test]
    fn a_file_that_changes_size_is_caught() {
        let dir = tree();
        let scan = scan(&dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/b.txt"), b"be").unwrap();
        let e = checksum_tree(dir.path(), &scan.manifest).unwrap_err().to_string();
        assert!(e.contains("b.txt changed while it was being staged (it had 3 bytes)"), "{e}");
        std::fs::write(dir.path().join("data/b.txt"), b"beee").unwrap();
        assert!(checksum_tree(dir.path(), &scan.manifest).is_err(), "grown");
    }
}
