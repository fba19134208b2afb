//! The node's durable store: one RocksDB database in the node's data dir.
//!
//! Every column family funcmesh uses is declared in [`cf`], with what it holds and its key layout,
//! so that the on-disk format is read in one place. Writes are synced before they return: the
//! brief's rule is "written before acknowledged". RocksDB calls block; async callers use
//! [`Store::blocking`] so that they never stall a tokio worker by accident.
//!
//! ```no_run
//! let store = store::Store::open(std::path::Path::new("/tmp/node/db"))?;
//! store.put(store::cf::META, b"hello", b"world")?;
//! assert_eq!(store.get(store::cf::META, b"hello")?.as_deref(), Some(&b"world"[..]));
//! # Ok::<(), store::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteOptions,
};

/// Column families and their key layouts. Adding one here is all it takes to have it created.
pub mod cf {
    /// Node metadata: `schema_version` → u32 (big-endian).
    pub const META: &str = "meta";
    /// Known mesh peers, re-dialed after a restart: peer id (UTF-8) → JSON `KnownPeer` (mesh).
    pub const PEERS: &str = "peers";

    /// The registry document (crdt-registry): `doc` → the compacted document (Automerge save);
    /// `chg/<change hash hex>` → one change applied since that save. Loading reads both;
    /// compaction writes a new `doc` and deletes the changes it includes, in one batch.
    pub const REGISTRY: &str = "registry";
    /// Registry sync state per peer: peer id (UTF-8) → encoded Automerge `sync::State`.
    pub const REGISTRY_SYNC: &str = "registry_sync";

    /// Tasks an endpoint of this node accepted (compute): `s/<endpoint>/<task id>` → JSON of the
    /// submission with its submitter and receipt time, from receipt until the submitter
    /// acknowledges the result (a finished task with an `s/` entry is in the outbox);
    /// `r/<endpoint>/<task id>` → JSON `compute::Record`, from the moment the task runs.
    pub const TASKS: &str = "tasks";
    /// Tasks this node submitted (compute::submit): `<task id>` → JSON `compute::submit::Submitted`.
    pub const SUBMITTED: &str = "submitted";

    /// Capability tokens this node holds (`funcmesh cap add`): the token's last revocation id
    /// (hex) → the token's text form.
    pub const CAPABILITIES: &str = "capabilities";
    /// The functions stored tasks run (compute endpoints and mesh dispatch), each once: function
    /// content id → JSON `FunctionRecord`. Tasks in `tasks` and `submitted` name their function
    /// by id; its record is written here in the same batch as the first task that names it.
    pub const FUNCTIONS: &str = "functions";

    /// Transfer jobs this node runs (transfer::copy): job id → JSON `transfer::copy::Job`;
    /// `fwd/<job id>` → the peer id of the node this node asked to run a copy;
    /// `share/<endpoint>/<share id>` → JSON `node::transfers::Share`, a share of a data root.
    pub const TRANSFERS: &str = "transfers";

    /// Flow runs this node hosts (flows::engine): `run/<run id>` → JSON `flows::engine::Run`
    /// (the run's summary, rewritten with each transition); `ev/<run id>/<seq, 16 hex digits>` →
    /// JSON `flows::engine::Event`, the run's log, appended before each effect.
    pub const FLOWS: &str = "flows";

    /// The Globus Compute–compatible API (node::globus_compute): `g/<group id>/<task id>` →
    /// empty, a task group's tasks; `t/<task id>` → its group's id; `q/<task id>` → the queue
    /// its result message goes to, until it is published.
    pub const GLOBUS_COMPUTE: &str = "globus_compute";

    /// All column families, in creation order.
    pub const ALL: &[&str] = &[
        META,
        PEERS,
        REGISTRY,
        REGISTRY_SYNC,
        TASKS,
        SUBMITTED,
        CAPABILITIES,
        FUNCTIONS,
        TRANSFERS,
        FLOWS,
        GLOBUS_COMPUTE,
    ];
}

/// On-disk schema version, bumped on any incompatible layout change.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB refused to open the database.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// Database directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rocksdb::Error,
    },
    /// The database was written by an incompatible version of funcmesh.
    #[error("the store at {path} has schema version {found}, this funcmesh reads {expected}")]
    Schema {
        /// Database directory.
        path: PathBuf,
        /// What is on disk.
        found: u32,
        /// What this code reads.
        expected: u32,
    },
    /// A read or write failed.
    #[error("store {op} in column family {cf} failed: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Column family.
        cf: &'static str,
        /// Cause.
        #[source]
        source: rocksdb::Error,
    },
    /// A blocking task was cancelled or panicked.
    #[error("store task failed: {0}")]
    Join(String),
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One write of a batch: column family, key, and the value to put (`None` deletes).
pub type Op = (&'static str, Vec<u8>, Option<Vec<u8>>);

/// A cheap-clone handle to the open database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Options of every column family, tuned for the task path: most point lookups there are for ids
/// that are not stored (a new task's duplicate check), and most values are deleted soon after
/// they are written (pending submissions, outbox entries).
fn cf_options() -> Options {
    let mut o = Options::default();
    // A miss is answered by a bloom filter, in the memtable and in each table file, instead of a
    // skip-list search and block reads.
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&table);
    o.set_memtable_prefix_bloom_ratio(0.05);
    o.set_memtable_whole_key_filtering(true);
    // Flushes (L0) and the first compaction (L1) write uncompressed: short-lived data is not worth
    // LZ4's CPU; deeper levels, where data lives long, are compressed.
    use DBCompressionType::{Lz4, None as Plain};
    o.set_compression_per_level(&[Plain, Plain, Lz4, Lz4, Lz4, Lz4, Lz4]);
    o
}

impl Store {
    /// Opens (creating if needed) the database at `path` with every column family of [`cf`].
    pub fn open(path: &Path) -> Result<Store, Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Small nodes: keep the footprint modest; RocksDB's defaults assume a server.
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        opts.set_max_total_wal_size(64 << 20);
        // Writers here are a handful of actors, each writing one batch at a time: the leader of
        // a write group inserting every batch is cheaper than concurrent (CAS) skip-list inserts.
        opts.set_allow_concurrent_memtable_write(false);
        let cfs = cf::ALL
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        };
        match store.get(cf::META, SCHEMA_KEY)? {
            None => store.put(cf::META, SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?,
            Some(v) => {
                let found = v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(Error::Schema {
                        path: path.to_path_buf(),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
        }
        Ok(store)
    }

    fn handle(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family in cf::ALL is created on open")
    }

    /// Reads one value.
    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.db
            .get_cf(self.handle(cf), key)
            .map_err(|source| Error::Io {
                op: "get",
                cf,
                source,
            })
    }

    /// Whether `key` may be stored, answered without touching the disk: from the memtables, the
    /// bloom filters and the block cache (RocksDB's `KeyMayExist` at the block-cache tier).
    /// `false` means surely absent; `true` means read it to know. It never does I/O and never
    /// waits for a write, so unlike every other method here it may run on an async task's
    /// thread: the task path checks ids it has not seen (almost always absent) this way, and
    /// takes only the rest through [`Store::blocking`].
    pub fn may_hold(&self, cf: &'static str, key: &[u8]) -> bool {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_read_tier(rocksdb::ReadTier::BlockCache);
        self.db.key_may_exist_cf_opt(self.handle(cf), key, &ro)
    }

    /// Writes one value, synced to disk before returning.
    pub fn put(&self, cf: &'static str, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.handle(cf), key, value, &wo)
            .map_err(|source| Error::Io {
                op: "put",
                cf,
                source,
            })
    }

    /// Deletes one value, synced.
    pub fn delete(&self, cf: &'static str, key: &[u8]) -> Result<(), Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .delete_cf_opt(self.handle(cf), key, &wo)
            .map_err(|source| Error::Io {
                op: "delete",
                cf,
                source,
            })
    }

    /// Applies puts (`Some(value)`) and deletes (`None`) atomically, synced.
    pub fn batch(&self, ops: &[Op]) -> Result<(), Error> {
        self.write_batch(ops, true)
    }

    /// Applies puts and deletes atomically, written to the operating system but not synced: the
    /// write survives the process being killed (`kill -9`), not the machine losing power. The
    /// task path uses it, where an fsync per task would cost more than the task.
    pub fn batch_unsynced(&self, ops: &[Op]) -> Result<(), Error> {
        self.write_batch(ops, false)
    }

    fn write_batch(&self, ops: &[Op], sync: bool) -> Result<(), Error> {
        // Sized up front (a 12-byte header, then per op a tag, the column family and two
        // lengths as varints, the key and the value): growing it copies every byte again.
        let bytes = 12
            + ops
                .iter()
                .map(|(_, k, v)| 16 + k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        let mut batch = rocksdb::WriteBatch::with_capacity_bytes(bytes);
        for (cf, key, value) in ops {
            match value {
                Some(v) => batch.put_cf(self.handle(cf), key, v),
                None => batch.delete_cf(self.handle(cf), key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(|source| Error::Io {
            op: "batch",
            cf: ops.first().map_or("none", |o| o.0),
            source,
        })
    }

    /// Every entry with `from <= key < until`, in key order.
    pub fn scan_range(
        &self,
        cf: &'static str,
        from: &[u8],
        until: &[u8],
    ) -> Result<Vec<Entry>, Error> {
        self.scan_while(cf, from, |k| k < until, |k, v| (k.to_vec(), v.to_vec()))
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, cf: &'static str, prefix: &[u8]) -> Result<Vec<Entry>, Error> {
        self.scan_with(cf, prefix, |k, v| (k.to_vec(), v.to_vec()))
    }

    /// The keys starting with `prefix`, in order, without copying their values.
    pub fn scan_keys(&self, cf: &'static str, prefix: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        self.scan_with(cf, prefix, |k, _| k.to_vec())
    }

    /// Visits the keys starting with `prefix`, in order, until `visit` returns `false`: for
    /// scans that stop early, without reading the rest of the range.
    pub fn visit_keys(
        &self,
        cf: &'static str,
        prefix: &[u8],
        visit: impl FnMut(&[u8]) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        self.visit_keys_from(cf, prefix, prefix, visit)
    }

    /// As [`Store::visit_keys`], starting at `from` (a key under `prefix`, or `prefix`).
    pub fn visit_keys_from(
        &self,
        cf: &'static str,
        prefix: &[u8],
        from: &[u8],
        mut visit: impl FnMut(&[u8]) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let from = if from < prefix { prefix } else { from };
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        for r in self.db.iterator_cf(self.handle(cf), mode) {
            let (k, _) = r.map_err(|source| Error::Io {
                op: "scan",
                cf,
                source,
            })?;
            if !k.starts_with(prefix) || !visit(&k)? {
                break;
            }
        }
        Ok(())
    }

    fn scan_with<T>(
        &self,
        cf: &'static str,
        prefix: &[u8],
        take: impl Fn(&[u8], &[u8]) -> T,
    ) -> Result<Vec<T>, Error> {
        self.scan_while(cf, prefix, |k| k.starts_with(prefix), take)
    }

    /// From `from` on, in key order, while `keep` holds for the key.
    fn scan_while<T>(
        &self,
        cf: &'static str,
        from: &[u8],
        keep: impl Fn(&[u8]) -> bool,
        take: impl Fn(&[u8], &[u8]) -> T,
    ) -> Result<Vec<T>, Error> {
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for r in self.db.iterator_cf(self.handle(cf), mode) {
            let (k, v) = r.map_err(|source| Error::Io {
                op: "scan",
                cf,
                source,
            })?;
            if !keep(&k) {
                break;
            }
            out.push(take(&k, &v));
        }
        Ok(out)
    }

    /// Every entry of a column family, in key order. Meant for small families.
    pub fn scan(&self, cf: &'static str) -> Result<Vec<Entry>, Error> {
        self.db
            .iterator_cf(self.handle(cf), rocksdb::IteratorMode::Start)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|source| Error::Io {
                        op: "scan",
                        cf,
                        source,
                    })
            })
            .collect()
    }

    /// Flushes memtables and the WAL, for shutdown.
    pub fn flush(&self) -> Result<(), Error> {
        for name in cf::ALL {
            self.db
                .flush_cf(self.handle(name))
                .map_err(|source| Error::Io {
                    op: "flush",
                    cf: name,
                    source,
                })?;
        }
        self.db.flush_wal(true).map_err(|source| Error::Io {
            op: "flush",
            cf: "wal",
            source,
        })
    }

    /// Runs `f` on tokio's blocking pool, so that RocksDB never stalls an async worker.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&Store) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Join(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(cf::PEERS, b"a", b"1").unwrap();
            s.put(cf::PEERS, b"b", b"2").unwrap();
            s.delete(cf::PEERS, b"a").unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.scan(cf::PEERS).unwrap(),
            vec![(b"b".to_vec(), b"2".to_vec())]
        );
    }

    #[test]
    fn may_hold_never_misses_a_stored_key_and_rules_out_most_absent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let stored: Vec<String> = (0..2000).map(|i| format!("s/e/{i:08}")).collect();
        let absent: Vec<String> = (0..2000).map(|i| format!("s/e/x{i:07}")).collect();
        let check = |s: &Store, when: &str, expect_filtered: bool| {
            for k in &stored {
                assert!(s.may_hold(cf::TASKS, k.as_bytes()), "{when}: {k} is stored");
            }
            let maybe = absent
                .iter()
                .filter(|k| s.may_hold(cf::TASKS, k.as_bytes()))
                .count();
            if expect_filtered {
                // Bloom filters of 10 bits per key: about 1 % false positives.
                assert!(
                    maybe < 100,
                    "{when}: {maybe} of 2000 absent keys may be held"
                );
            }
        };
        {
            let s = Store::open(dir.path()).unwrap();
            let ops: Vec<Op> = stored
                .iter()
                .map(|k| (cf::TASKS, k.as_bytes().to_vec(), Some(b"v".to_vec())))
                .collect();
            s.batch_unsynced(&ops).unwrap();
            check(&s, "in the memtable", true);
            s.flush().unwrap();
            check(&s, "in a table file", true);
        }
        // After a restart the table files may not be open yet: `true` (read it) is the answer.
        let s = Store::open(dir.path()).unwrap();
        check(&s, "after a restart", false);
    }

    #[test]
    fn a_key_visit_stays_in_its_prefix_and_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            s.put(cf::PEERS, k.as_bytes(), b"v").unwrap();
        }
        let mut seen = Vec::new();
        s.visit_keys(cf::PEERS, b"a/", |k| {
            seen.push(String::from_utf8(k.to_vec()).unwrap());
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, ["a/1", "a/2", "a/3"]);
        seen.clear();
        s.visit_keys(cf::PEERS, b"a/", |k| {
            seen.push(String::from_utf8(k.to_vec()).unwrap());
            Ok(seen.len() < 2)
        })
        .unwrap();
        assert_eq!(seen, ["a/1", "a/2"]);
    }

    #[test]
    fn a_range_scan_stops_before_its_upper_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            s.put(cf::PEERS, k.as_bytes(), b"v").unwrap();
        }
        let keys = |rows: Vec<Entry>| -> Vec<String> {
            rows.into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect()
        };
        assert_eq!(
            keys(s.scan_range(cf::PEERS, b"a/", b"a/3").unwrap()),
            ["a/1", "a/2"]
        );
        assert_eq!(
            keys(s.scan_range(cf::PEERS, b"a/2", b"z").unwrap()),
            ["a/2", "a/3", "b/1"]
        );
        assert!(s.scan_range(cf::PEERS, b"a/", b"a/").unwrap().is_empty());
    }

    #[test]
    fn a_second_open_of_a_live_store_fails_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("cannot open the store"), "{err}");
    }

    #[test]
    fn a_foreign_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(cf::META, SCHEMA_KEY, &99u32.to_be_bytes()).unwrap();
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(Error::Schema { found: 99, .. })
        ));
    }
}
