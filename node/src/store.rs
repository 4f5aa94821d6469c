//! The node's copy of the cluster record in SQLite: VM records, applied commands, the
//! Lamport clock and the local event log.
//!
//! Replication (see `replica.rs` and the README) is last-writer-wins per VM record on a
//! total order of versions (Lamport clock, then node name): a write on either node
//! takes `clock = max(every clock seen) + 1`, so a change made after seeing another
//! always wins over it, and two changes made without seeing each other (the peer away)
//! are ordered the same way on both nodes. Applied commands are immutable and merged
//! by id. Deletes are tombstones, so the node that was away learns of them.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{NodeName, NodeRecord, Version, VmRecord};

/// Commands remembered for exactly-once (older ones are pruned): a client retrying a
/// command within this many later commands gets the first outcome back.
pub const MAX_COMMANDS: i64 = 4096;
/// Tombstones kept (the oldest go first): a node away for more deletes than this may
/// bring a deleted VM's record back.
pub const MAX_TOMBSTONES: i64 = 1024;
/// Events kept in the local log.
pub const MAX_EVENTS: i64 = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database record does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("database schema version {found} is newer than this daemon's ({SCHEMA_VERSION})")]
    Schema { found: i64 },
}

const SCHEMA_VERSION: i64 = 1;

/// A command the cluster has run, with the answer it gave (replicated, immutable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandRecord {
    pub id: String,
    pub vm: String,
    pub op: String,
    /// The HTTP status and JSON body first answered.
    pub status: u16,
    pub body: serde_json::Value,
    pub node: NodeName,
    pub clock: u64,
}

/// One line of the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: i64,
    /// Unix time in ms.
    pub at_ms: i64,
    pub vm: Option<String>,
    pub message: String,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::init(conn)
    }

    /// A private in-memory store (tests, simulation).
    pub fn memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        // WAL: readers (API) never block the writer; synchronous=FULL: an acknowledged
        // change survives a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS vms (
                 name TEXT PRIMARY KEY, record TEXT NOT NULL,
                 clock INTEGER NOT NULL, node TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS commands (
                 id TEXT PRIMARY KEY, record TEXT NOT NULL, clock INTEGER NOT NULL,
                 seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS done (vm TEXT PRIMARY KEY, done TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (
                 name TEXT PRIMARY KEY, record TEXT NOT NULL,
                 clock INTEGER NOT NULL, node TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
                 vm TEXT, message TEXT NOT NULL);",
        )?;
        let found: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match found {
            Some(v) if v > SCHEMA_VERSION => return Err(StoreError::Schema { found: v }),
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1), ('clock', 0)",
                    params![SCHEMA_VERSION],
                )?;
            }
        }
        Ok(Store { conn })
    }

    pub fn clock(&self) -> Result<u64, StoreError> {
        let c: i64 =
            self.conn
                .query_row("SELECT value FROM meta WHERE key = 'clock'", [], |r| {
                    r.get(0)
                })?;
        Ok(c as u64)
    }

    /// Raises the clock to at least `seen` (every version received goes through here).
    pub fn observe(&self, seen: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'clock'",
            params![seen as i64],
        )?;
        Ok(())
    }

    /// The version of a new local write: one past every clock seen.
    pub fn next_version(&self, node: &str) -> Result<Version, StoreError> {
        self.conn
            .execute("UPDATE meta SET value = value + 1 WHERE key = 'clock'", [])?;
        Ok(Version {
            clock: self.clock()?,
            node: node.to_string(),
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT record FROM vms WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(match text {
            Some(t) => Some(serde_json::from_str(&t)?),
            None => None,
        })
    }

    /// Every record, tombstones included, by name.
    pub fn all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut st = self.conn.prepare("SELECT record FROM vms ORDER BY name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for t in rows {
            out.push(serde_json::from_str(&t?)?);
        }
        Ok(out)
    }

    /// Name and version of every record: what a peer compares to find what it lacks.
    pub fn digest(&self) -> Result<Vec<(String, Version)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT name, clock, node FROM vms ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Version {
                    clock: r.get::<_, i64>(1)? as u64,
                    node: r.get(2)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes a record made on this node (its version from [`Self::next_version`]).
    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO vms (name, record, clock, node) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET record = ?2, clock = ?3, node = ?4",
            params![
                rec.spec.name,
                serde_json::to_string(rec)?,
                rec.version.clock as i64,
                rec.version.node
            ],
        )?;
        if rec.deleted {
            self.conn.execute(
                "DELETE FROM vms WHERE name IN (SELECT name FROM vms
                 WHERE json_extract(record, '$.deleted') = 1
                 ORDER BY clock DESC LIMIT -1 OFFSET ?1)",
                params![MAX_TOMBSTONES],
            )?;
        }
        Ok(())
    }

    /// Applies a record received from the peer if it is newer than ours; true if it was.
    pub fn merge(&self, rec: &VmRecord) -> Result<bool, StoreError> {
        self.observe(rec.version.clock)?;
        let newer = match self.get(&rec.spec.name)? {
            Some(mine) => crate::replica::wins(&rec.version, &mine.version),
            None => true,
        };
        if newer {
            self.put(rec)?;
        }
        Ok(newer)
    }

    /// Every node record (maintenance), by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT record FROM nodes ORDER BY name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for t in rows {
            out.push(serde_json::from_str(&t?)?);
        }
        Ok(out)
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self.nodes()?.into_iter().find(|n| n.name == name))
    }

    /// Writes a node record made here or received (see [`Self::merge_node`]).
    pub fn put_node(&self, rec: &NodeRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO nodes (name, record, clock, node) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET record = ?2, clock = ?3, node = ?4",
            params![
                rec.name,
                serde_json::to_string(rec)?,
                rec.version.clock as i64,
                rec.version.node
            ],
        )?;
        self.observe(rec.version.clock)
    }

    /// Applies a node record from the peer if it is newer than ours; true if it was.
    pub fn merge_node(&self, rec: &NodeRecord) -> Result<bool, StoreError> {
        self.observe(rec.version.clock)?;
        let newer = match self.node(&rec.name)? {
            Some(mine) => crate::replica::wins(&rec.version, &mine.version),
            None => true,
        };
        if newer {
            self.put_node(rec)?;
        }
        Ok(newer)
    }

    pub fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT record FROM commands WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(match text {
            Some(t) => Some(serde_json::from_str(&t)?),
            None => None,
        })
    }

    /// Records a command's outcome (first writer wins: a command id never changes
    /// meaning); true if it was new.
    pub fn put_command(&self, c: &CommandRecord) -> Result<bool, StoreError> {
        self.observe(c.clock)?;
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO commands (id, record, clock, seq)
             VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM commands))",
            params![c.id, serde_json::to_string(c)?, c.clock as i64],
        )?;
        if n > 0 {
            self.conn.execute(
                "DELETE FROM commands WHERE seq <= (SELECT MAX(seq) FROM commands) - ?1",
                params![MAX_COMMANDS],
            )?;
        }
        Ok(n > 0)
    }

    /// Commands with a clock above `clock` (what a returning peer may lack).
    pub fn commands_since(&self, clock: u64) -> Result<Vec<CommandRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT record FROM commands WHERE clock > ?1 ORDER BY seq")?;
        let rows = st.query_map([clock as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for t in rows {
            out.push(serde_json::from_str(&t?)?);
        }
        Ok(out)
    }

    /// Every command id held (the peer's digest of commands).
    pub fn command_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare("SELECT id FROM commands ORDER BY seq")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every command, oldest first.
    pub fn commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        self.commands_since(0)
    }

    /// How far this node got through each VM's one-shot counters (local, not
    /// replicated: each node performs each step once).
    pub fn done(
        &self,
    ) -> Result<std::collections::BTreeMap<String, crate::cluster::Done>, StoreError> {
        let mut st = self.conn.prepare("SELECT vm, done FROM done")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (vm, text) = row?;
            out.insert(vm, serde_json::from_str(&text)?);
        }
        Ok(out)
    }

    pub fn put_done(&self, vm: &str, done: &crate::cluster::Done) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO done (vm, done) VALUES (?1, ?2) ON CONFLICT(vm) DO UPDATE SET done = ?2",
            params![vm, serde_json::to_string(done)?],
        )?;
        Ok(())
    }

    pub fn log_event(&self, vm: Option<&str>, message: &str) -> Result<(), StoreError> {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.conn.execute(
            "INSERT INTO events (at_ms, vm, message) VALUES (?1, ?2, ?3)",
            params![at_ms, vm, message],
        )?;
        self.conn.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
            params![MAX_EVENTS],
        )?;
        Ok(())
    }

    /// The last `limit` events (of one VM, or all), oldest first.
    pub fn events(&self, vm: Option<&str>, limit: u32) -> Result<Vec<Event>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT seq, at_ms, vm, message FROM events
             WHERE ?1 IS NULL OR vm = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![vm, limit], |r| {
            Ok(Event {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                vm: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        let mut v: Vec<Event> = rows.collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Desired, Failback, PayloadSpec, Protection, VmSpec};

    pub(crate) fn record(name: &str, clock: u64, node: &str) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: name.into(),
                vcpus: 1,
                mem_mib: 64,
                disks: vec![],
                nics: vec![],
                payload: PayloadSpec::TestGuest {
                    elf: None,
                    workloads: vec!["counter".into()],
                    counter_rate: None,
                    kv_addr: None,
                },
                protection: Protection::Unprotected,
                preferred_node: None,
                autostart: false,
                failback: Failback::Manual,
            },
            desired: Desired::Stopped,
            owner: None,
            slot: 0,
            restart_seq: 0,
            failback_seq: 0,
            clear_seq: 0,
            deleted: false,
            stopped_because: None,
            migrate_to: None,
            created: Version::default(),
            version: Version {
                clock,
                node: node.into(),
            },
        }
    }

    #[test]
    fn clock_moves_past_everything_seen() {
        let s = Store::memory().unwrap();
        assert_eq!(s.next_version("pm1").unwrap().clock, 1);
        s.observe(10).unwrap();
        s.observe(3).unwrap();
        assert_eq!(s.next_version("pm1").unwrap().clock, 11);
    }

    #[test]
    fn merge_keeps_the_newer_record_whatever_the_order() {
        let a = record("vm", 5, "pm1");
        let mut b = record("vm", 5, "pm2");
        b.desired = Desired::Running;
        for order in [[&a, &b], [&b, &a]] {
            let s = Store::memory().unwrap();
            for r in order {
                s.merge(r).unwrap();
            }
            // Same clock: the higher node name wins on both nodes.
            assert_eq!(s.get("vm").unwrap().unwrap(), b);
            assert_eq!(s.clock().unwrap(), 5);
        }
    }

    #[test]
    fn commands_are_immutable_and_pruned_by_seq() {
        let s = Store::memory().unwrap();
        let c = CommandRecord {
            id: "c1".into(),
            vm: "vm".into(),
            op: "start".into(),
            status: 200,
            body: serde_json::json!({"ok": true}),
            node: "pm1".into(),
            clock: 3,
        };
        assert!(s.put_command(&c).unwrap());
        let mut again = c.clone();
        again.status = 500;
        assert!(!s.put_command(&again).unwrap());
        assert_eq!(s.command("c1").unwrap().unwrap().status, 200);
        assert_eq!(s.commands_since(2).unwrap().len(), 1);
        assert!(s.commands_since(3).unwrap().is_empty());
    }

    #[test]
    fn reopen_keeps_records_and_clock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.db");
        {
            let s = Store::open(&p).unwrap();
            let v = s.next_version("pm1").unwrap();
            s.put(&record("a", v.clock, "pm1")).unwrap();
            s.log_event(Some("a"), "created").unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.clock().unwrap(), 1);
        assert_eq!(s.all().unwrap().len(), 1);
        assert_eq!(s.digest().unwrap()[0].1.clock, 1);
        assert_eq!(s.events(Some("a"), 10).unwrap()[0].message, "created");
    }

    #[test]
    fn a_demotion_survives_a_reopen_and_old_rows_read_as_not_demoted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.db");
        let d = crate::cluster::Done {
            created: Version {
                clock: 1,
                node: "pm1".into(),
            },
            restart: 0,
            failback: 0,
            clear: 0,
            demoted: true,
        };
        {
            let s = Store::open(&p).unwrap();
            s.put_done("ft1", &d).unwrap();
            // A row written before the field existed.
            let mut old = serde_json::to_value(&d).unwrap();
            old.as_object_mut().unwrap().remove("demoted");
            s.conn
                .execute(
                    "INSERT INTO done (vm, done) VALUES ('ft2', ?1)",
                    params![old.to_string()],
                )
                .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let done = s.done().unwrap();
        assert_eq!(done["ft1"], d);
        assert!(!done["ft2"].demoted);
    }
}
