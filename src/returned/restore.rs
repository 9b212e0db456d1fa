//! Rank 0's side of checkpoints: the files a task's last attempt returned go back to the node
//! that runs its next attempt before its `Launch`. They are read a few pieces a turn, and a
//! rank gets its next pieces only once it took the last ones: a checkpoint of many GiB costs
//! rank 0 a few hundred KiB, and no MPI message grows past what its count can say.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use dlaunch_core::returned::CHUNK;
use dlaunch_core::wire::{Order, Restore};

/// Pieces a rank is sent in one turn (one message): 512 KiB.
const PIECES_PER_TURN: usize = 8;

/// A returned file on its way back to a node.
pub struct Source {
    task_id: String,
    /// Relative to `DLAUNCH_TASK_DIR`.
    path: String,
    file: File,
    offset: u64,
    size: u64,
}

impl Source {
    /// The file `relative` beneath the output directory `root`, opened through no link: a
    /// node that sees the output directory (`auto` mode) cannot swap a checkpoint for a link
    /// to a file only rank 0's host has.
    pub fn open(task_id: &str, path: &str, root: &OwnedFd, relative: &Path) -> std::io::Result<Self> {
        let file = crate::beneath::open_read(root, relative)?;
        let size = file.metadata()?.len();
        Ok(Source { task_id: task_id.to_string(), path: path.to_string(), file, offset: 0, size })
    }

    /// The next piece, and whether it was the last. A file that cannot be read to its end
    /// (it shrank, an I/O error) is sent again as empty: the task finds it empty rather than
    /// cut short at a point nobody chose.
    fn next_piece(&mut self) -> Restore {
        let len = (self.size - self.offset).min(CHUNK);
        let mut bytes = vec![0; len as usize];
        let piece = |offset, bytes, last| Restore {
            task_id: self.task_id.clone(),
            path: self.path.clone(),
            offset,
            bytes,
            last,
        };
        match self.file.read_exact(&mut bytes) {
            Ok(()) => {
                let offset = self.offset;
                self.offset += len;
                piece(offset, bytes, self.offset == self.size)
            }
            Err(e) => {
                log::warn!("cannot read back {} of {} ({e}): restored empty", self.path, self.task_id);
                self.offset = self.size;
                piece(0, Vec::new(), true)
            }
        }
    }
}

enum Item {
    File(Source),
    Order(Order),
}

/// Per rank, what is still to be sent behind a checkpoint: its files, then the `Launch` that
/// needs them and every later order, so that MPI's order between two ranks keeps theirs.
#[derive(Default)]
pub struct Restores {
    by_rank: BTreeMap<u32, VecDeque<Item>>,
}

impl Restores {
    pub fn is_empty(&self) -> bool {
        self.by_rank.is_empty()
    }

    /// True while orders to `rank` must queue here.
    pub fn busy(&self, rank: u32) -> bool {
        self.by_rank.contains_key(&rank)
    }

    /// Queues `files`, then `order`, behind what `rank` is still being sent.
    pub fn queue(&mut self, rank: u32, files: Vec<Source>, order: Order) {
        let queue = self.by_rank.entry(rank).or_default();
        queue.extend(files.into_iter().map(Item::File));
        queue.push_back(Item::Order(order));
    }

    /// A lost rank is sent nothing more.
    pub fn forget(&mut self, rank: u32) {
        self.by_rank.remove(&rank);
    }

    /// This turn's pieces and orders, for each rank that `ready` says took what it was sent.
    pub fn next(&mut self, ready: impl Fn(u32) -> bool) -> Vec<(u32, Vec<Order>)> {
        let mut out = Vec::new();
        for (&rank, queue) in self.by_rank.iter_mut().filter(|(rank, _)| ready(**rank)) {
            let mut orders = Vec::new();
            let mut pieces = 0;
            while pieces < PIECES_PER_TURN {
                match queue.front_mut() {
                    Some(Item::File(source)) => {
                        let piece = source.next_piece();
                        if piece.last {
                            queue.pop_front();
                        }
                        orders.push(Order::Restore(piece));
                        pieces += 1;
                    }
                    Some(Item::Order(_)) => {
                        if let Some(Item::Order(order)) = queue.pop_front() {
                            orders.push(order);
                        }
                    }
                    None => break,
                }
            }
            out.push((rank, orders));
        }
        self.by_rank.retain(|_, queue| !queue.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(orders: &[Order]) -> Vec<(u64, usize, bool)> {
        orders
            .iter()
            .filter_map(|o| match o {
                Order::Restore(r) => Some((r.offset, r.bytes.len(), r.last)),
                _ => None,
            })
            .collect()
    }

    fn root(dir: &tempfile::TempDir) -> OwnedFd {
        crate::beneath::open_root(dir.path()).unwrap()
    }

    #[test]
    fn a_checkpoint_that_became_a_link_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"only rank 0's host has this").unwrap();
        std::fs::create_dir(dir.path().join("outputs")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), dir.path().join("outputs/model.pt")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outputs"), dir.path().join("linked")).unwrap();
        assert!(Source::open("t", "model.pt", &root(&dir), Path::new("outputs/model.pt")).is_err());
        std::fs::write(dir.path().join("outputs/real"), b"x").unwrap();
        assert!(
            Source::open("t", "real", &root(&dir), Path::new("linked/real")).is_err(),
            "nor through a linked directory"
        );
        assert!(Source::open("t", "real", &root(&dir), Path::new("outputs/real")).is_ok());
    }

    #[test]
    fn a_big_file_goes_a_few_pieces_a_turn_and_only_to_a_rank_that_took_the_last_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.pt");
        let size = CHUNK * 10 + 5;
        std::fs::write(&path, vec![7u8; size as usize]).unwrap();
        let mut restores = Restores::default();
        let source = Source::open("t", "model.pt", &root(&dir), Path::new("model.pt")).unwrap();
        restores.queue(1, vec![source], Order::Heartbeat);
        assert!(restores.busy(1));
        assert!(restores.next(|_| false).is_empty(), "nothing while the last send is in flight");
        let first = restores.next(|_| true);
        assert_eq!(first.len(), 1);
        assert_eq!(pieces(&first[0].1).len(), PIECES_PER_TURN);
        assert!(!first[0].1.iter().any(|o| matches!(o, Order::Heartbeat)), "the order waits for its files");
        restores.queue(1, Vec::new(), Order::Stop { key: dlaunch_core::events::AttemptKey { task: 0, attempt: 0 } });
        let second = restores.next(|_| true);
        let rest = pieces(&second[0].1);
        assert_eq!(
            rest,
            [(CHUNK * 8, CHUNK as usize, false), (CHUNK * 9, CHUNK as usize, false), (CHUNK * 10, 5, true)]
        );
        assert!(matches!(second[0].1[3], Order::Heartbeat), "then the order behind the files");
        assert!(matches!(second[0].1[4], Order::Stop { .. }), "then what came after it");
        assert!(!restores.busy(1) && restores.is_empty());
    }

    #[test]
    fn an_empty_file_is_one_empty_last_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        let mut restores = Restores::default();
        restores.queue(2, vec![Source::open("t", "empty", &root(&dir), Path::new("empty")).unwrap()], Order::Heartbeat);
        let sent = restores.next(|_| true);
        assert_eq!(pieces(&sent[0].1), [(0, 0, true)]);
    }

    #[test]
    fn a_lost_rank_is_sent_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let mut restores = Restores::default();
        restores.queue(3, vec![Source::open("t", "f", &root(&dir), Path::new("f")).unwrap()], Order::Heartbeat);
        restores.forget(3);
        assert!(restores.is_empty() && restores.next(|_| true).is_empty());
    }
}
