//! Dataset staging: rank 0 reads each dataset once and broadcasts it to one leader rank per
//! node, which writes a node-local copy for the tasks of its node (docs/staging.md).

pub mod manifest;
pub mod store;

#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// `data/` with files of several sizes, an executable, an empty file in a subdirectory, a
    /// link inside the tree and two that leave it.
    pub fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("b.txt"), b"bee").unwrap();
        std::fs::write(root.join("a.bin"), vec![7u8; 5000]).unwrap();
        std::fs::write(root.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("sub/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("sub/deeper/empty"), b"").unwrap();
        symlink("../b.txt", root.join("sub/to_b")).unwrap();
        symlink("/etc/passwd", root.join("sub/absolute")).unwrap();
        symlink("../../outside", root.join("sub/climbs_out")).unwrap();
        dir
    }
}
