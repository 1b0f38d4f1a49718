//! Which work a table unlocks as the copy goes: its index builds once its last part has
//! landed, its VACUUM ANALYZE once its last index is built. Kept apart from the workers so the
//! bookkeeping is plain data that unit tests can drive.

use std::collections::HashMap;

use crate::pg::catalog::{IndexRow, PartRow};

/// What a worker should do after a part landed.
#[derive(Debug)]
pub enum Next {
    /// Queue these index builds (the table's last part landed).
    BuildIndexes(Vec<IndexRow>),
    /// The table is complete and has no index left to build: vacuum it now.
    Vacuum,
    /// Other parts of the table are still copying.
    Wait,
}

/// Per-table counters of parts still to land and indexes still to build.
#[derive(Default)]
pub struct Schedule {
    parts_left: HashMap<u32, usize>,
    indexes_waiting: HashMap<u32, Vec<IndexRow>>,
    indexes_left: HashMap<u32, usize>,
}

impl Schedule {
    /// Built from what is not done yet (on resume, part of the work may be).
    pub fn new(parts: &[PartRow], indexes: &[IndexRow]) -> Self {
        let mut s = Schedule::default();
        for p in parts.iter().filter(|p| p.status != "done") {
            *s.parts_left.entry(p.table_oid).or_default() += 1;
        }
        for i in indexes.iter().filter(|i| i.status != "done") {
            *s.indexes_left.entry(i.table_oid).or_default() += 1;
            s.indexes_waiting
                .entry(i.table_oid)
                .or_default()
                .push(i.clone());
        }
        s
    }

    /// Index builds of tables that have nothing left to copy (resumed, or data excluded).
    pub fn ready_at_start(&mut self) -> Vec<IndexRow> {
        let ready: Vec<u32> = self
            .indexes_waiting
            .keys()
            .filter(|oid| !self.parts_left.contains_key(oid))
            .copied()
            .collect();
        ready
            .into_iter()
            .flat_map(|oid| self.indexes_waiting.remove(&oid).unwrap_or_default())
            .collect()
    }

    pub fn part_landed(&mut self, table_oid: u32) -> Next {
        let left = self.parts_left.entry(table_oid).or_insert(1);
        *left = left.saturating_sub(1);
        if *left > 0 {
            return Next::Wait;
        }
        self.parts_left.remove(&table_oid);
        match self.indexes_waiting.remove(&table_oid) {
            Some(indexes) if !indexes.is_empty() => Next::BuildIndexes(indexes),
            _ => Next::Vacuum,
        }
    }

    /// Returns true when this was the table's last index: vacuum it now.
    pub fn index_built(&mut self, table_oid: u32) -> bool {
        let left = self.indexes_left.entry(table_oid).or_insert(1);
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.indexes_left.remove(&table_oid);
            return !self.parts_left.contains_key(&table_oid);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(table_oid: u32, part: i64, status: &str) -> PartRow {
        PartRow {
            table_oid,
            part,
            nparts: 2,
            first_page: 0,
            end_page: None,
            status: status.into(),
        }
    }

    fn index(oid: u32, table_oid: u32, status: &str) -> IndexRow {
        IndexRow {
            oid,
            table_oid,
            schema: "s".into(),
            name: format!("i{oid}"),
            definition: String::new(),
            constraint: None,
            replica_identity: false,
            status: status.into(),
        }
    }

    #[test]
    fn indexes_wait_for_the_last_part_and_vacuum_for_the_last_index() {
        let mut s = Schedule::new(
            &[
                part(1, 0, "pending"),
                part(1, 1, "pending"),
                part(2, 0, "pending"),
            ],
            &[index(10, 1, "pending"), index(11, 1, "pending")],
        );
        assert!(s.ready_at_start().is_empty());
        assert!(matches!(s.part_landed(1), Next::Wait));
        match s.part_landed(1) {
            Next::BuildIndexes(v) => assert_eq!(v.len(), 2),
            other => panic!("expected index builds, got {other:?}"),
        }
        assert!(matches!(s.part_landed(2), Next::Vacuum));
        assert!(!s.index_built(1));
        assert!(s.index_built(1));
    }

    #[test]
    fn resumed_tables_start_their_remaining_indexes_at_once() {
        let mut s = Schedule::new(
            &[part(1, 0, "done"), part(2, 0, "pending")],
            &[
                index(10, 1, "done"),
                index(11, 1, "pending"),
                index(12, 2, "pending"),
            ],
        );
        let ready = s.ready_at_start();
        assert_eq!(ready.iter().map(|i| i.oid).collect::<Vec<_>>(), vec![11]);
        assert!(s.index_built(1));
    }
}
