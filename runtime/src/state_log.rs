//! The node's durable protocol state in an mmd-local append-only log with
//! group fsync, instead of a PostgreSQL row per transaction.
//!
//! Why a file: `mm.tx_state` cost two or three upserts per transaction on
//! every node (a backend round trip each, WAL that all six walsenders then
//! decode) — about a tenth of the machine's CPU under the seed workload.
//! Here one driver round (the ops of many transactions) is one `write` and
//! one `fdatasync`, with no SQL and nothing for logical decoding to read.
//!
//! Layout of the directory:
//! - `log`: records `[len u32 LE][crc32 u32 LE][postcard Vec<DurableOp>]`,
//!   appended and made durable (`fdatasync`) before [`StateLog::append`]
//!   returns. A record cut short by a crash (or failing its CRC) ends the
//!   log: it is cut off on open, since its batch was never acknowledged.
//! - `snapshot`: one record of the same framing holding a postcard
//!   [`Partial`]; written to `snapshot.tmp`, synced and renamed over the old
//!   one, then the log is emptied. Replaying an old log over a newer
//!   snapshot (a crash between the rename and the truncation) gives the same
//!   state: every op sets or maximises a field, and the snapshot is the state
//!   after the whole log.

use crate::storage::StorageError;
use mm_core::{DurableOp, DurableState, Generation, Gid, TxRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const LOG: &str = "log";
const SNAPSHOT: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// The log is folded into the snapshot past this size: restart reads at most
/// this much log, and a snapshot costs one write of the state.
const COMPACT_AFTER_BYTES: u64 = 64 << 20;
/// Larger than any batch the driver writes; a length beyond it is garbage.
const MAX_RECORD: usize = 1 << 30;

/// The state as the ops left it, with the node fields unset until their
/// first op: a node whose bootstrap ops are not all durable is still fresh
/// (the driver writes them before the node says anything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partial {
    boot: Option<u32>,
    promised_gen: Option<u64>,
    gen: Option<Generation>,
    last_online_gen: Option<u64>,
    txs: BTreeMap<Gid, TxRecord>,
}

impl Partial {
    pub fn apply(&mut self, op: &DurableOp) {
        match op {
            DurableOp::Boot(b) => self.boot = Some(*b),
            DurableOp::PromiseGen(n) => {
                self.promised_gen = Some(self.promised_gen.unwrap_or(0).max(*n))
            }
            DurableOp::AdoptGen(g) => {
                self.promised_gen = Some(self.promised_gen.unwrap_or(0).max(g.num));
                self.gen = Some(*g);
            }
            DurableOp::LastOnline(n) => {
                self.last_online_gen = Some(self.last_online_gen.unwrap_or(0).max(*n))
            }
            DurableOp::Tx(gid, rec) => {
                self.txs.insert(*gid, *rec);
            }
        }
    }

    /// The state, once every node field has been written.
    pub fn complete(&self) -> Option<DurableState> {
        Some(DurableState {
            boot: self.boot?,
            promised_gen: self.promised_gen?,
            gen: self.gen?,
            last_online_gen: self.last_online_gen?,
            txs: self.txs.clone(),
        })
    }

    fn of(state: &DurableState) -> Partial {
        Partial {
            boot: Some(state.boot),
            promised_gen: Some(state.promised_gen),
            gen: Some(state.gen),
            last_online_gen: Some(state.last_online_gen),
            txs: state.txs.clone(),
        }
    }
}

fn io_err(what: impl std::fmt::Display, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Db(format!("{what} {}: {e}", path.display()))
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payloads of the whole records at the start of `bytes`, and the
/// length they span (where a torn or corrupt tail begins).
fn unframe(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || bytes.len() - at - 8 < len {
            break;
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        records.push(payload);
        at += 8 + len;
    }
    (records, at)
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing the directory", dir, e))
}

/// The open log. Blocking file I/O: [`StateLog::append`] runs it on
/// tokio's blocking pool so that the rest of mmd goes on (and gathers the
/// next batch) while a sync is in flight.
pub struct StateLog {
    inner: Option<Inner>,
    dir: PathBuf,
}

struct Inner {
    dir: PathBuf,
    file: File,
    state: Partial,
    log_bytes: u64,
}

impl StateLog {
    /// Whether `dir` holds a state log (a log or a snapshot).
    pub fn exists(dir: &Path) -> bool {
        dir.join(LOG).exists() || dir.join(SNAPSHOT).exists()
    }

    /// Opens the log in `dir`, creating the directory and an empty log if
    /// missing, and returns what the node finds in it (without prepared
    /// gids: those are the database's).
    pub fn open(dir: &Path) -> Result<(StateLog, Option<DurableState>), StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let mut state = Partial::default();
        let snap = dir.join(SNAPSHOT);
        if snap.exists() {
            let bytes = std::fs::read(&snap).map_err(|e| io_err("reading", &snap, e))?;
            let (records, used) = unframe(&bytes);
            // Written whole and renamed into place: a bad snapshot is damage, not a crash.
            if records.len() != 1 || used != bytes.len() {
                return Err(StorageError::Db(format!(
                    "the state snapshot {} is damaged (restore it or resync this node)",
                    snap.display()
                )));
            }
            state = postcard::from_bytes(records[0]).map_err(|e| {
                StorageError::Db(format!(
                    "undecodable state snapshot {}: {e}",
                    snap.display()
                ))
            })?;
        }
        let path = dir.join(LOG);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_err("reading", &path, e))?;
        let (records, used) = unframe(&bytes);
        for payload in records {
            let ops: Vec<DurableOp> = postcard::from_bytes(payload).map_err(|e| {
                StorageError::Db(format!("undecodable record in {}: {e}", path.display()))
            })?;
            for op in &ops {
                state.apply(op);
            }
        }
        if used != bytes.len() {
            tracing::warn!(
                log = %path.display(),
                kept = used,
                dropped = bytes.len() - used,
                "the state log ends in a torn record (a crash during a write): cutting it off"
            );
            file.set_len(used as u64)
                .and_then(|_| file.sync_all())
                .map_err(|e| io_err("truncating", &path, e))?;
        }
        if created {
            file.sync_all().map_err(|e| io_err("syncing", &path, e))?;
            sync_dir(dir)?;
        }
        let complete = state.complete();
        let inner = Inner {
            dir: dir.to_path_buf(),
            file,
            state,
            log_bytes: used as u64,
        };
        Ok((
            StateLog {
                inner: Some(inner),
                dir: dir.to_path_buf(),
            },
            complete,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the whole state with `state` (a one-time import), durably.
    pub async fn import(&mut self, state: &DurableState) -> Result<(), StorageError> {
        let state = Partial::of(state);
        self.blocking(move |inner| {
            inner.state = state;
            inner.compact()
        })
        .await
    }

    /// Makes `ops` durable, in order, as one record and one sync.
    pub async fn append(&mut self, ops: &[DurableOp]) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let payload = postcard::to_allocvec(ops)
            .map_err(|e| StorageError::Db(format!("encoding a state batch: {e}")))?;
        let ops = ops.to_vec();
        self.blocking(move |inner| inner.append(&frame(&payload), &ops))
            .await
    }

    async fn blocking(
        &mut self,
        f: impl FnOnce(&mut Inner) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        let Some(mut inner) = self.inner.take() else {
            return Err(StorageError::Db(format!(
                "the state log {} failed earlier and is closed",
                self.dir.display()
            )));
        };
        let (inner, res) = tokio::task::spawn_blocking(move || {
            let res = f(&mut inner);
            (inner, res)
        })
        .await
        .map_err(|e| StorageError::Db(format!("the state log writer stopped: {e}")))?;
        // After a failed write the file's end is unknown: refuse further writes.
        if res.is_ok() {
            self.inner = Some(inner);
        }
        res
    }
}

impl Inner {
    fn append(&mut self, record: &[u8], ops: &[DurableOp]) -> Result<(), StorageError> {
        let path = self.dir.join(LOG);
        self.file
            .write_all(record)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io_err("appending to", &path, e))?;
        self.log_bytes += record.len() as u64;
        for op in ops {
            self.state.apply(op);
        }
        if self.log_bytes > COMPACT_AFTER_BYTES {
            self.compact()?;
        }
        Ok(())
    }

    /// Writes the state as the snapshot, then empties the log.
    fn compact(&mut self) -> Result<(), StorageError> {
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let payload = postcard::to_allocvec(&self.state)
            .map_err(|e| StorageError::Db(format!("encoding the state snapshot: {e}")))?;
        let mut f = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
        f.write_all(&frame(&payload))
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err("writing", &tmp, e))?;
        let snap = self.dir.join(SNAPSHOT);
        std::fs::rename(&tmp, &snap).map_err(|e| io_err("renaming", &tmp, e))?;
        sync_dir(&self.dir)?;
        let log = self.dir.join(LOG);
        self.file
            .set_len(0)
            .and_then(|_| self.file.sync_all())
            .map_err(|e| io_err("emptying", &log, e))?;
        self.log_bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_core::{Ballot, NodeSet};

    fn gid(seq: u32) -> Gid {
        Gid {
            origin: 1,
            boot: 0,
            seq,
            gen: 1,
        }
    }

    fn bootstrap() -> Vec<DurableOp> {
        let g = Generation {
            num: 1,
            members: NodeSet(0b111),
            donors: NodeSet(0b111),
        };
        vec![
            DurableOp::Boot(0),
            DurableOp::AdoptGen(g),
            DurableOp::PromiseGen(1),
            DurableOp::LastOnline(1),
        ]
    }

    fn accepted(seq: u32) -> DurableOp {
        let b = Ballot { round: 0, node: 1 };
        DurableOp::Tx(
            gid(seq),
            TxRecord {
                promised: Some(b),
                accepted: Some((b, true)),
                decided: None,
            },
        )
    }

    fn expected(ops: &[DurableOp]) -> DurableState {
        let mut p = Partial::default();
        ops.iter().for_each(|op| p.apply(op));
        p.complete().expect("complete")
    }

    #[tokio::test]
    async fn reopens_what_it_appended() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, state) = StateLog::open(dir.path()).unwrap();
        assert_eq!(state, None, "a new log is a fresh node");
        let mut all = bootstrap();
        log.append(&all).await.unwrap();
        for s in 1..=3 {
            log.append(&[accepted(s)]).await.unwrap();
            all.push(accepted(s));
        }
        drop(log);
        let (_, state) = StateLog::open(dir.path()).unwrap();
        assert_eq!(state, Some(expected(&all)));
    }

    #[tokio::test]
    async fn half_a_bootstrap_is_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StateLog::open(dir.path()).unwrap();
        log.append(&bootstrap()[..2]).await.unwrap();
        drop(log);
        assert_eq!(StateLog::open(dir.path()).unwrap().1, None);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StateLog::open(dir.path()).unwrap();
        let mut all = bootstrap();
        log.append(&all).await.unwrap();
        log.append(&[accepted(1)]).await.unwrap();
        all.push(accepted(1));
        drop(log);
        // A crash in the middle of the next record's write.
        let path = dir.path().join(LOG);
        let whole = std::fs::metadata(&path).unwrap().len();
        let torn = frame(&postcard::to_allocvec(&[accepted(2)].to_vec()).unwrap());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        let (mut log, state) = StateLog::open(dir.path()).unwrap();
        assert_eq!(
            state,
            Some(expected(&all)),
            "the torn batch was never acknowledged"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        log.append(&[accepted(3)]).await.unwrap();
        all.push(accepted(3));
        drop(log);
        assert_eq!(StateLog::open(dir.path()).unwrap().1, Some(expected(&all)));
    }

    #[tokio::test]
    async fn a_corrupt_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StateLog::open(dir.path()).unwrap();
        let all = bootstrap();
        log.append(&all).await.unwrap();
        log.append(&[accepted(1)]).await.unwrap();
        drop(log);
        let path = dir.path().join(LOG);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(StateLog::open(dir.path()).unwrap().1, Some(expected(&all)));
    }

    #[tokio::test]
    async fn compaction_keeps_the_state_and_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StateLog::open(dir.path()).unwrap();
        let mut all = bootstrap();
        log.append(&all).await.unwrap();
        log.append(&[accepted(1)]).await.unwrap();
        all.push(accepted(1));
        log.blocking(|inner| inner.compact()).await.unwrap();
        assert_eq!(std::fs::metadata(dir.path().join(LOG)).unwrap().len(), 0);
        log.append(&[accepted(2)]).await.unwrap();
        all.push(accepted(2));
        drop(log);
        assert_eq!(StateLog::open(dir.path()).unwrap().1, Some(expected(&all)));
    }

    #[tokio::test]
    async fn an_old_log_over_a_new_snapshot_gives_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StateLog::open(dir.path()).unwrap();
        let mut all = bootstrap();
        log.append(&all).await.unwrap();
        log.append(&[accepted(1)]).await.unwrap();
        all.push(accepted(1));
        let log_bytes = std::fs::read(dir.path().join(LOG)).unwrap();
        log.blocking(|inner| inner.compact()).await.unwrap();
        drop(log);
        // A crash after the snapshot's rename, before the log was emptied.
        std::fs::write(dir.path().join(LOG), log_bytes).unwrap();
        assert_eq!(StateLog::open(dir.path()).unwrap().1, Some(expected(&all)));
    }

    #[tokio::test]
    async fn a_damaged_snapshot_is_an_error_not_a_fresh_node() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StateLog::open(dir.path()).unwrap();
        log.append(&bootstrap()).await.unwrap();
        log.blocking(|inner| inner.compact()).await.unwrap();
        drop(log);
        let snap = dir.path().join(SNAPSHOT);
        let mut bytes = std::fs::read(&snap).unwrap();
        bytes[9] ^= 0xff;
        std::fs::write(&snap, bytes).unwrap();
        let err = StateLog::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
