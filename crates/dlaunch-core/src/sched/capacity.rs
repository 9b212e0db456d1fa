//! What a worker can hold, counted: slots, CPUs, GPUs, memory.

use serde::{Deserialize, Serialize};

use crate::spec::Resources;

/// A worker's capacity, or what is free of it. Exact placement on cores and GPUs is the
/// worker's business; the coordinator only counts, which is enough to never over-commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Processes at once; `u32::MAX` when only resources limit it.
    pub slots: u32,
    pub cpus: u32,
    pub gpus: u32,
    pub memory: u64,
}

impl Capacity {
    pub const EMPTY: Capacity = Capacity { slots: 0, cpus: 0, gpus: 0, memory: 0 };

    /// What one process needing `need` takes: a slot and its resources.
    pub(crate) fn of_one(need: &Resources) -> Capacity {
        Capacity { slots: 1, cpus: need.cpus, gpus: need.gpus, memory: need.memory }
    }

    /// Of each, the smaller.
    pub(crate) fn least(&self, other: &Capacity) -> Capacity {
        Capacity {
            slots: self.slots.min(other.slots),
            cpus: self.cpus.min(other.cpus),
            gpus: self.gpus.min(other.gpus),
            memory: self.memory.min(other.memory),
        }
    }

    /// Of each, the sum.
    pub(crate) fn more(&self, other: &Capacity) -> Capacity {
        Capacity {
            slots: self.slots.saturating_add(other.slots),
            cpus: self.cpus.saturating_add(other.cpus),
            gpus: self.gpus.saturating_add(other.gpus),
            memory: self.memory.saturating_add(other.memory),
        }
    }

    /// Of each, what is left after `other` (none below zero).
    pub(crate) fn less(&self, other: &Capacity) -> Capacity {
        Capacity {
            slots: self.slots.saturating_sub(other.slots),
            cpus: self.cpus.saturating_sub(other.cpus),
            gpus: self.gpus.saturating_sub(other.gpus),
            memory: self.memory.saturating_sub(other.memory),
        }
    }

    /// How many processes needing `need` fit.
    pub(crate) fn room_for(&self, need: &Resources) -> u32 {
        let by = |free: u64, want: u64| free.checked_div(want).unwrap_or(u64::MAX);
        let n = [
            u64::from(self.slots),
            by(u64::from(self.cpus), u64::from(need.cpus)),
            by(u64::from(self.gpus), u64::from(need.gpus)),
            by(self.memory, need.memory),
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        n.min(u64::from(u32::MAX)) as u32
    }

    pub fn take(&mut self, need: &Resources) {
        self.slots = self.slots.saturating_sub(1);
        self.cpus = self.cpus.saturating_sub(need.cpus);
        self.gpus = self.gpus.saturating_sub(need.gpus);
        self.memory = self.memory.saturating_sub(need.memory);
    }

    /// Gives back what `take` took, never beyond `limit` (the worker's full capacity).
    pub fn give(&mut self, need: &Resources, limit: &Capacity) {
        self.slots = self.slots.saturating_add(1).min(limit.slots);
        self.cpus = self.cpus.saturating_add(need.cpus).min(limit.cpus);
        self.gpus = self.gpus.saturating_add(need.gpus).min(limit.gpus);
        self.memory = self.memory.saturating_add(need.memory).min(limit.memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_limited_by_the_scarcest_resource() {
        let free = Capacity { slots: 8, cpus: 16, gpus: 2, memory: 64 << 30 };
        assert_eq!(free.room_for(&Resources { cpus: 4, gpus: 0, memory: 0 }), 4);
        assert_eq!(free.room_for(&Resources { cpus: 1, gpus: 1, memory: 0 }), 2);
        assert_eq!(free.room_for(&Resources { cpus: 1, gpus: 0, memory: 48 << 30 }), 1);
        assert_eq!(free.room_for(&Resources { cpus: 0, gpus: 0, memory: 0 }), 8);
        let unlimited = Capacity { slots: u32::MAX, ..free };
        assert_eq!(unlimited.room_for(&Resources { cpus: 0, gpus: 0, memory: 0 }), u32::MAX);
    }

    #[test]
    fn take_and_give_round_trip() {
        let full = Capacity { slots: 2, cpus: 4, gpus: 1, memory: 100 };
        let need = Resources { cpus: 3, gpus: 1, memory: 60 };
        let mut free = full;
        free.take(&need);
        assert_eq!(free, Capacity { slots: 1, cpus: 1, gpus: 0, memory: 40 });
        free.give(&need, &full);
        free.give(&need, &full);
        assert_eq!(free, full);
    }
}
