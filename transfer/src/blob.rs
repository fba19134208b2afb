//! The content-addressed blob store, with BLAKE3 verified streaming.
//!
//! Layout, under the store's directory (created 0700):
//!
//! * `<hash>.data` and `<hash>.obao`: a complete blob and its pre-order outboard (the bao tree's
//!   parent hashes, `BaoTree::outboard_size` bytes);
//! * `partial/<hash>.data`, `partial/<hash>.obao`: a blob being received. The data file has the
//!   blob's full size from the start; the outboard is filled in as parent hashes arrive. Only
//!   verified bytes are ever written, so whatever [`BlobStore::missing`] finds valid there is.
//!
//! Everything here is blocking file IO: call it from a blocking task.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt as _, FileExt};
use std::path::{Path, PathBuf};

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{
    CreateOutboard as _, DecodeResponseIter, OutboardMut as _, encode_ranges,
    encode_ranges_validated, valid_ranges,
};
use bao_tree::io::{BaoContentItem, Leaf, Parent};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges, blake3};

/// Chunk groups of 16 KiB (2⁴ BLAKE3 chunks of 1 KiB): the unit that is verified, and that is
/// sent again when it arrives corrupt. The outboard costs 64 bytes per group (0.4 %).
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);

/// A blob's BLAKE3 hash: its name everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    fn blake3(&self) -> blake3::Hash {
        blake3::Hash::from_bytes(self.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Hash, Error> {
        let bad = || Error::BadHash(s.chars().take(80).collect());
        let bytes = hex::decode(s).map_err(|_| bad())?;
        Ok(Hash(bytes.try_into().map_err(|_| bad())?))
    }
}

/// What can go wrong with a blob.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the store failed.
    #[error("blob store: {0}")]
    Io(#[from] io::Error),
    /// Not a BLAKE3 hash in hex.
    #[error("`{0}` is not a blob hash (64 hexadecimal characters)")]
    BadHash(String),
    /// The store does not hold this blob (or not the ranges asked for).
    #[error("this node does not hold blob {0} (or not the part asked for)")]
    Missing(Hash),
    /// The stream did not verify against the hash: nothing from the bad chunk group on was
    /// written. Ask again for what [`BlobStore::missing`] reports.
    #[error(
        "blob {hash}: the stream does not verify against its hash ({reason}); the bad part was not written, ask for it again"
    )]
    Corrupt {
        /// The blob.
        hash: Hash,
        /// What did not verify.
        reason: String,
    },
}

/// How far a stored blob must have reached before it counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On the disk (fsynced): what a user uploads.
    Synced,
    /// Written, to reach the disk with the page cache: survives the process, not the machine.
    /// A task's value, as durable as the task's record (written unsynced too).
    Written,
}

/// The blob store of one node.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

/// The chunk ranges covering bytes `start..end` of a blob, in whole chunk groups (the unit
/// that is verified and stored).
pub fn byte_ranges(start: u64, end: u64) -> ChunkRanges {
    groups(ChunkRanges::from(
        ChunkNum(start / 1024)..ChunkNum(end.div_ceil(1024)),
    ))
}

/// `ranges` widened to whole chunk groups: a receiver keeps only groups it could verify whole.
fn groups(ranges: ChunkRanges) -> ChunkRanges {
    bao_tree::io::round_up_to_chunks_groups(ranges, BLOCK_SIZE)
}

impl BlobStore {
    /// The store in `dir` (created if need be, 0700).
    pub fn open(dir: impl AsRef<Path>) -> Result<BlobStore, Error> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("partial"))?;
        Ok(BlobStore { dir })
    }

    fn complete(&self, hash: &Hash) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{hash}.data")),
            self.dir.join(format!("{hash}.obao")),
        )
    }

    fn partial(&self, hash: &Hash) -> (PathBuf, PathBuf) {
        let dir = self.dir.join("partial");
        (
            dir.join(format!("{hash}.data")),
            dir.join(format!("{hash}.obao")),
        )
    }

    /// Stores everything `data` yields; returns its hash and size. A blob already held is not
    /// stored twice.
    pub fn import(&self, mut data: impl Read) -> Result<(Hash, u64), Error> {
        let mut file = tempfile::NamedTempFile::with_prefix_in(".import-", &self.dir)?;
        io::copy(&mut data, file.as_file_mut())?;
        self.adopt(file, Durability::Synced)
    }

    /// Stores the file `spool` (made in [`BlobStore::dir`], written whole) as a blob, moving
    /// it into place; returns its hash and size. A blob already held is not stored twice.
    pub fn adopt(
        &self,
        spool: tempfile::NamedTempFile,
        durability: Durability,
    ) -> Result<(Hash, u64), Error> {
        if durability == Durability::Synced {
            spool.as_file().sync_all()?;
        }
        let size = spool.as_file().metadata()?.len();
        let (hash, outboard) = outboard_of(spool.as_file(), size)?;
        let mut obao = tempfile::NamedTempFile::with_prefix_in(".import-", &self.dir)?;
        obao.write_all(&outboard)?;
        if durability == Durability::Synced {
            obao.as_file().sync_all()?;
        }
        let (data_path, obao_path) = self.complete(&hash);
        if !data_path.exists() {
            obao.persist(&obao_path).map_err(|e| e.error)?;
            spool.persist(&data_path).map_err(|e| e.error)?;
        } else {
            self.touch(&hash);
        }
        Ok((hash, size))
    }

    /// Removes a blob (held whole or in part); whether there was one.
    pub fn remove(&self, hash: &Hash) -> bool {
        let mut any = false;
        for (data, obao) in [self.complete(hash), self.partial(hash)] {
            // The outboard first: without it the blob no longer counts as held.
            any |= std::fs::remove_file(obao).is_ok();
            any |= std::fs::remove_file(data).is_ok();
        }
        any
    }

    /// The store's directory (a spool file made here renames into place).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Marks a blob as used now (what [`BlobStore::collect`] goes by).
    pub fn touch(&self, hash: &Hash) {
        let (data, _) = self.complete(hash);
        if let Ok(f) = OpenOptions::new().write(true).open(data) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Removes the blobs and partial blobs not used (imported, received, served or touched)
    /// for `unused`; returns how many blobs and bytes went.
    pub fn collect(&self, unused: std::time::Duration) -> Result<(usize, u64), Error> {
        let Some(cutoff) = std::time::SystemTime::now().checked_sub(unused) else {
            return Ok((0, 0));
        };
        let mut gone = (0usize, 0u64);
        for dir in [self.dir.clone(), self.dir.join("partial")] {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".data")) else {
                    continue;
                };
                if stem.parse::<Hash>().is_err() {
                    continue;
                }
                let meta = entry.metadata()?;
                if meta.modified()? >= cutoff {
                    continue;
                }
                // The outboard first: without it the blob no longer counts as held.
                let _ = std::fs::remove_file(dir.join(format!("{stem}.obao")));
                std::fs::remove_file(entry.path())?;
                gone.0 += 1;
                gone.1 += meta.len();
            }
        }
        Ok(gone)
    }

    /// The size of a complete blob this store holds.
    pub fn size(&self, hash: &Hash) -> Option<u64> {
        let (data, obao) = self.complete(hash);
        if !obao.exists() {
            return None;
        }
        std::fs::metadata(data).ok().map(|m| m.len())
    }

    /// The path of a complete blob's bytes (to read or copy out).
    pub fn path(&self, hash: &Hash) -> Result<PathBuf, Error> {
        self.size(hash).ok_or(Error::Missing(*hash))?;
        Ok(self.complete(hash).0)
    }

    fn outboard(&self, hash: &Hash, obao: &Path, size: u64) -> io::Result<PreOrderOutboard<File>> {
        Ok(PreOrderOutboard {
            root: hash.blake3(),
            tree: BaoTree::new(size, BLOCK_SIZE),
            data: OpenOptions::new().read(true).write(true).open(obao)?,
        })
    }

    /// Writes the verified stream of `ranges` of a complete blob to `out`: the chunk groups
    /// and the parent hashes that prove them. Every group is checked before it is sent, so a
    /// blob corrupted on this node's disk is never passed on.
    pub fn encode(&self, hash: &Hash, ranges: &ChunkRanges, out: impl Write) -> Result<(), Error> {
        self.encode_with(hash, ranges, true, out)
    }

    /// [`BlobStore::encode`] without hashing the groups again on the way out: the receiver
    /// checks every one against the root hash, and asks with a check
    /// ([`BlobStore::check`]) after a stream that did not verify. Checking every send cost
    /// a BLAKE3 pass over the data at the sender, on top of the receiver's.
    pub fn send(&self, hash: &Hash, ranges: &ChunkRanges, out: impl Write) -> Result<(), Error> {
        self.encode_with(hash, ranges, false, out)
    }

    fn encode_with(
        &self,
        hash: &Hash,
        ranges: &ChunkRanges,
        validate: bool,
        out: impl Write,
    ) -> Result<(), Error> {
        let size = self.size(hash).ok_or(Error::Missing(*hash))?;
        let (data, obao) = self.complete(hash);
        let outboard = self.outboard(hash, &obao, size)?;
        // Read ahead a mebibyte at a time: the encoder asks for one 16 KiB group and one
        // 64-byte parent at a time, in file order.
        let outboard = PreOrderOutboard {
            root: outboard.root,
            tree: outboard.tree,
            data: ReadAhead::new(outboard.data),
        };
        let data = ReadAhead::new(File::open(data)?);
        let ranges = groups(ranges.clone());
        let sent = if validate {
            encode_ranges_validated(data, outboard, &ranges, out)
        } else {
            encode_ranges(data, outboard, &ranges, out)
        };
        sent.map_err(|e| match e {
            bao_tree::io::EncodeError::Io(e) => Error::Io(e),
            other => Error::Corrupt {
                hash: *hash,
                reason: format!("this node's copy: {other}"),
            },
        })
    }

    /// Checks `ranges` of a complete blob against its root hash, reading and hashing them. A
    /// blob that fails is corrupt on this node's disk: it becomes a partial blob again (what
    /// still verifies is kept, [`BlobStore::missing`] names the rest), so that it is no longer
    /// served and the next fetch of it asks for what went bad.
    pub fn check(&self, hash: &Hash, ranges: &ChunkRanges) -> Result<(), Error> {
        let size = self.size(hash).ok_or(Error::Missing(*hash))?;
        let (data_path, obao_path) = self.complete(hash);
        let outboard = self.outboard(hash, &obao_path, size)?;
        let data = File::open(&data_path)?;
        let wanted = &groups(ranges.clone()) & &all_chunks(size);
        let mut valid = ChunkRanges::empty();
        for range in valid_ranges(&outboard, &data, &wanted) {
            valid |= ChunkRanges::from(range?);
        }
        let bad = &wanted - &valid;
        let Some(first) = bad.boundaries().first().copied() else {
            return Ok(());
        };
        // The outboard first: without it the blob no longer counts as complete.
        let (partial_data, partial_obao) = self.partial(hash);
        std::fs::rename(&obao_path, partial_obao)?;
        std::fs::rename(&data_path, partial_data)?;
        Err(Error::Corrupt {
            hash: *hash,
            reason: format!(
                "this node's copy does not verify from byte {} on; it is kept as a partial \
                 blob, to be fetched again",
                first.to_bytes()
            ),
        })
    }

    /// Receives the verified stream of `ranges` of blob `hash` of `size` bytes, as
    /// [`BlobStore::encode`] writes it, into the partial blob (made if need be). Returns how
    /// many bytes of data were written. A blob found complete afterwards becomes complete.
    ///
    /// On a group that does not verify, stops with [`Error::Corrupt`]: what came before it is
    /// kept, and [`BlobStore::missing`] tells what to ask for again.
    pub fn receive(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &ChunkRanges,
        encoded: impl Read,
    ) -> Result<u64, Error> {
        self.receive_known(hash, size, ranges, None, encoded)
    }

    /// Receives part of a blob into its partial blob without completing it: for several
    /// sources writing disjoint ranges at once. [`BlobStore::finish`] completes it.
    pub fn receive_part(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &ChunkRanges,
        encoded: impl Read,
    ) -> Result<u64, Error> {
        if self.size(hash).is_some() {
            return Ok(0);
        }
        self.open_partial(hash, size)?.receive(ranges, encoded)
    }

    /// Completes a partial blob if nothing is missing (hashing what it holds); returns what is
    /// still missing.
    pub fn finish(&self, hash: &Hash, size: u64) -> Result<ChunkRanges, Error> {
        if self.size(hash).is_some() {
            return Ok(ChunkRanges::empty());
        }
        let missing = self.open_partial(hash, size)?.missing()?;
        if missing.is_empty() {
            let (data_path, obao_path) = self.partial(hash);
            let (complete_data, complete_obao) = self.complete(hash);
            std::fs::rename(&obao_path, complete_obao)?;
            std::fs::rename(&data_path, complete_data)?;
        }
        Ok(missing)
    }

    /// Makes a partial blob complete without hashing it again: for a caller whose receives
    /// verified every chunk group the blob was missing. A blob already complete stays so.
    pub fn complete_verified(&self, hash: &Hash, size: u64) -> Result<(), Error> {
        if self.size(hash).is_some() {
            return Ok(());
        }
        // Made if need be: a blob of no bytes has nothing to receive.
        drop(self.open_partial(hash, size)?);
        let (data_path, obao_path) = self.partial(hash);
        let (complete_data, complete_obao) = self.complete(hash);
        std::fs::rename(&obao_path, complete_obao)?;
        std::fs::rename(&data_path, complete_data)?;
        Ok(())
    }

    /// [`BlobStore::receive`] when the caller knows what the partial blob is missing (it just
    /// asked [`BlobStore::missing`]): completeness is then known without hashing the blob again.
    pub fn receive_known(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &ChunkRanges,
        missing: Option<ChunkRanges>,
        encoded: impl Read,
    ) -> Result<u64, Error> {
        if self.size(hash).is_some() {
            return Ok(0);
        }
        let mut partial = self.open_partial(hash, size)?;
        partial.known = missing;
        let written = partial.receive(ranges, encoded)?;
        if partial.missing_known()?.is_empty() {
            let (data_path, obao_path) = self.partial(hash);
            let (complete_data, complete_obao) = self.complete(hash);
            std::fs::rename(&obao_path, complete_obao)?;
            std::fs::rename(&data_path, complete_data)?;
        }
        Ok(written)
    }

    fn open_partial(&self, hash: &Hash, size: u64) -> Result<Partial, Error> {
        let (data_path, obao_path) = self.partial(hash);
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(p)
        };
        Partial::open(*hash, size, open(&data_path)?, open(&obao_path)?)
    }

    /// The chunk ranges of blob `hash` (`size` bytes) this store does not hold verified: all of
    /// it for a blob never seen, none for a complete one. Rehashes what a partial blob holds
    /// (run it when resuming, not per group).
    pub fn missing(&self, hash: &Hash, size: u64) -> Result<ChunkRanges, Error> {
        if self.size(hash).is_some() {
            return Ok(ChunkRanges::empty());
        }
        let (data_path, obao_path) = self.partial(hash);
        if !data_path.exists() || !obao_path.exists() {
            return Ok(all_chunks(size));
        }
        self.open_partial(hash, size)?.missing()
    }

    /// Bytes `start..end` of a blob, verified, whether it is complete or partial (the range
    /// must be held).
    pub fn read_range(
        &self,
        hash: &Hash,
        size: u64,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, Error> {
        let end = end.min(size);
        if start >= end {
            return Ok(Vec::new());
        }
        let (data_path, obao_path) = match self.size(hash) {
            Some(_) => self.complete(hash),
            None => self.partial(hash),
        };
        let wanted = byte_ranges(start, end);
        if !(&self.missing(hash, size)? & &wanted).is_empty() {
            return Err(Error::Missing(*hash));
        }
        let _ = obao_path;
        let data = File::open(data_path)?;
        let mut buf = vec![0u8; (end - start) as usize];
        // Verified above; read plainly.
        data.read_exact_at(&mut buf, start)?;
        Ok(buf)
    }
}

/// The size of the outboard of a blob of `size` bytes (0 for one chunk group).
pub fn outboard_size(size: u64) -> u64 {
    BaoTree::new(size, BLOCK_SIZE).outboard_size()
}

fn all_chunks(size: u64) -> ChunkRanges {
    ChunkRanges::from(ChunkNum(0)..BaoTree::new(size, BLOCK_SIZE).chunks())
}

/// A blob being received into a data file of its full size and an outboard file: only
/// verified bytes are ever written to either, so whatever [`Partial::missing`] finds valid is.
/// The blob store keeps its partial blobs this way; a file copy keeps one next to its
/// destination.
#[derive(Debug)]
pub struct Partial {
    hash: Hash,
    size: u64,
    data: File,
    outboard: PreOrderOutboard<File>,
    /// What is missing, when known without hashing again (after [`Partial::missing`], kept up
    /// to date by every receive that verified).
    known: Option<ChunkRanges>,
    /// Start writing the data to the disk as it is written ([`Partial::write_behind`]).
    behind: bool,
}

impl Partial {
    /// A partial blob in `data` and `obao` (both opened read-write; resized if need be, their
    /// verified contents kept).
    pub fn open(hash: Hash, size: u64, data: File, obao: File) -> Result<Partial, Error> {
        let tree = BaoTree::new(size, BLOCK_SIZE);
        if data.metadata()?.len() != size {
            data.set_len(size)?;
        }
        if obao.metadata()?.len() != tree.outboard_size() {
            obao.set_len(tree.outboard_size())?;
        }
        Ok(Partial {
            hash,
            size,
            data,
            outboard: PreOrderOutboard {
                root: hash.blake3(),
                tree,
                data: obao,
            },
            known: None,
            behind: false,
        })
    }

    /// Starts the disk writing every mebibyte of data as it is written, rather than leaving it
    /// all to the sync that ends a file copy: the disk then works while the stream arrives.
    pub fn write_behind(&mut self) {
        self.behind = true;
    }

    /// The blob's hash.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The data file.
    pub fn data(&self) -> &File {
        &self.data
    }

    /// Receives the verified stream of `ranges` (as [`encode_file`] writes it); returns the
    /// bytes of data written. Stops at the first group that does not verify, with
    /// [`Error::Corrupt`], keeping everything before it.
    pub fn receive(&mut self, ranges: &ChunkRanges, encoded: impl Read) -> Result<u64, Error> {
        let mut written = 0u64;
        let mut outcome = Ok(());
        let ranges = groups(ranges.clone());
        let tree = self.outboard.tree;
        // The stream brings groups and parent hashes in file order: gathered, they cost a write
        // per mebibyte rather than one per 16 KiB group and one per 64-byte parent.
        let mut data = Gathered::new(&self.data);
        data.behind = self.behind;
        let mut outboard = PreOrderOutboard {
            root: self.outboard.root,
            tree,
            data: Gathered::new(&self.outboard.data),
        };
        for item in DecodeResponseIter::new(self.hash.blake3(), tree, encoded, &ranges) {
            match item {
                Ok(BaoContentItem::Parent(Parent { node, pair })) => {
                    if let Err(e) = outboard.save(node, &pair) {
                        outcome = Err(Error::Io(e));
                        break;
                    }
                }
                Ok(BaoContentItem::Leaf(Leaf {
                    offset,
                    data: bytes,
                })) => {
                    if let Err(e) = data.put(offset, &bytes) {
                        outcome = Err(Error::Io(e));
                        break;
                    }
                    written += bytes.len() as u64;
                }
                Err(bao_tree::io::DecodeError::Io(e)) => {
                    outcome = Err(Error::Io(e));
                    break;
                }
                Err(e) => {
                    outcome = Err(Error::Corrupt {
                        hash: self.hash,
                        reason: e.to_string(),
                    });
                    break;
                }
            }
        }
        // Everything gathered verified, whatever stopped the stream: the data first, then the
        // hashes that vouch for it. No fsync here: whatever a crash loses is found missing by
        // the rehash on resume and asked for again, and a file is synced once, when it is put
        // in place.
        let flushed = data.flush().and_then(|()| outboard.data.flush());
        if let (Ok(()), Err(e)) = (&outcome, flushed) {
            outcome = Err(Error::Io(e));
        }
        match &outcome {
            // Every group asked for verified and is written.
            Ok(()) => self.known = self.known.take().map(|m| &m - &ranges),
            Err(_) => self.known = None,
        }
        outcome.map(|()| written)
    }

    /// What is missing: as known from the receives since the last [`Partial::missing`], or
    /// found by hashing again.
    pub fn missing_known(&mut self) -> Result<ChunkRanges, Error> {
        match &self.known {
            Some(m) => Ok(m.clone()),
            None => self.missing(),
        }
    }

    /// The chunk ranges not held verified (rehashes what is held: once when a receive
    /// resumes).
    pub fn missing(&mut self) -> Result<ChunkRanges, Error> {
        let all = all_chunks(self.size);
        let outboard = PreOrderOutboard {
            root: self.hash.blake3(),
            tree: self.outboard.tree,
            data: &self.outboard.data,
        };
        let mut valid = ChunkRanges::empty();
        for range in valid_ranges(outboard, &self.data, &all) {
            valid |= ChunkRanges::from(range?);
        }
        let missing = &all - &valid;
        self.known = Some(missing.clone());
        Ok(missing)
    }

    /// Another handle on the same files, for a second stream receiving other ranges at the
    /// same time (what it knows is missing starts unknown). [`Partial::received`] tells this one
    /// what the others brought.
    pub fn another(&self) -> Result<Partial, Error> {
        Ok(Partial {
            hash: self.hash,
            size: self.size,
            data: self.data.try_clone()?,
            outboard: PreOrderOutboard {
                root: self.outboard.root,
                tree: self.outboard.tree,
                data: self.outboard.data.try_clone()?,
            },
            known: None,
            behind: self.behind,
        })
    }

    /// Other handles ([`Partial::another`]) received these ranges, every group verified
    /// (`Some`), or did not all verify (`None`: what is missing is found by hashing again).
    pub fn received(&mut self, ranges: Option<&ChunkRanges>) {
        self.known = match (ranges, self.known.take()) {
            (Some(r), Some(m)) => Some(&m - &groups(r.clone())),
            _ => None,
        };
    }

    /// The data file, once complete.
    pub fn into_data(self) -> File {
        self.data
    }
}

/// How many bytes [`Gathered`] holds before it writes them.
const GATHER: usize = 1 << 20;

/// Positioned writes to a file, gathered while each follows the one before: a verified
/// stream's groups (and its parent hashes) arrive in file order.
struct Gathered<'f> {
    file: &'f File,
    /// Where `buf` goes in the file.
    at: u64,
    buf: Vec<u8>,
    /// Start writeback of each write at once.
    behind: bool,
}

impl<'f> Gathered<'f> {
    fn new(file: &'f File) -> Gathered<'f> {
        Gathered {
            file,
            at: 0,
            buf: Vec::new(),
            behind: false,
        }
    }

    /// `bytes` at `offset`: written with what came before when they follow it, else after it.
    fn put(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let follows = offset == self.at + self.buf.len() as u64;
        if !self.buf.is_empty() && (!follows || self.buf.len() + bytes.len() > GATHER) {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.at = offset;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.at)?;
            if self.behind {
                start_writeback(self.file, self.at, self.buf.len() as u64)?;
            }
            self.buf.clear();
        }
        Ok(())
    }
}

/// Asks the kernel to start writing bytes `at..at + len` of `file` to the disk, without waiting
/// for it (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`; not a durability guarantee: the
/// caller syncs later).
#[allow(unsafe_code)]
fn start_writeback(file: &File, at: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: the descriptor is borrowed from a live `File` for the length of the call, and
    // the call reads no memory of this process.
    let r =
        unsafe { libc::sync_file_range(file.as_raw_fd(), at, len, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        // A file system or file that cannot (a pipe, /dev/null): the final sync does it all.
        e if matches!(
            e.raw_os_error(),
            Some(libc::ESPIPE | libc::EINVAL | libc::ENOSYS)
        ) =>
        {
            Ok(())
        }
        e => Err(e),
    }
}

impl bao_tree::io::sync::WriteAt for Gathered<'_> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        self.put(pos, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Gathered::flush(self)
    }
}

/// Positioned reads of a file through a window of [`GATHER`] bytes, refilled where a read
/// falls outside it: for readers that go through a file in order, a little at a time.
struct ReadAhead<F> {
    file: F,
    /// Where the window starts in the file, and what it holds.
    window: std::cell::RefCell<(u64, Vec<u8>)>,
}

impl<F: std::borrow::Borrow<File>> ReadAhead<F> {
    fn new(file: F) -> ReadAhead<F> {
        ReadAhead {
            file,
            window: std::cell::RefCell::new((0, Vec::new())),
        }
    }
}

impl<F: std::borrow::Borrow<File>> bao_tree::io::sync::ReadAt for ReadAhead<F> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() >= GATHER {
            return FileExt::read_at(self.file.borrow(), buf, pos);
        }
        let mut window = self.window.borrow_mut();
        let (at, held) = &mut *window;
        let inside = pos >= *at && pos + buf.len() as u64 <= *at + held.len() as u64;
        if !inside {
            held.resize(GATHER, 0);
            let mut filled = 0;
            while filled < GATHER {
                match FileExt::read_at(self.file.borrow(), &mut held[filled..], pos + filled as u64)
                {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        held.clear();
                        return Err(e);
                    }
                }
            }
            held.truncate(filled);
            *at = pos;
        }
        let from = (pos - *at) as usize;
        let n = buf.len().min(held.len() - from);
        buf[..n].copy_from_slice(&held[from..from + n]);
        Ok(n)
    }
}

impl<F: std::borrow::Borrow<File>> bao_tree::io::sync::Size for ReadAhead<F> {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.borrow().metadata()?.len()))
    }
}

/// A file's BLAKE3 hash and its outboard (64 bytes per 16 KiB group; empty for a file of one
/// group) of its first `size` bytes: one pass over the file, on up to one thread per core (at
/// most eight) from 4 MiB on.
pub fn outboard_of(data: &File, size: u64) -> Result<(Hash, Vec<u8>), Error> {
    if size >= crate::outboard::PARALLEL_FROM {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (root, outboard) = crate::outboard::parallel(data, size, cores.min(8), BLOCK_SIZE)?;
        return Ok((Hash(*root.as_bytes()), outboard));
    }
    // Read whole, from the start whatever the file's cursor: a buffer of the file's size, not
    // a mebibyte per file zeroed for a reader (which cost the checksum pass over 10,000 small
    // files a third of its time).
    let mut bytes = vec![0u8; size as usize];
    data.read_exact_at(&mut bytes, 0)?;
    let outboard = PreOrderOutboard::<Vec<u8>>::create_sized(&bytes[..], size, BLOCK_SIZE)?;
    Ok((Hash(*outboard.root.as_bytes()), outboard.data))
}

/// Writes the verified stream of `ranges` of `data` (`size` bytes, hash `hash`, outboard from
/// [`outboard_of`]). The groups are not hashed again on the way out (the caller hashed the file
/// when it looked up its outboard, by the file's version): the receiver checks every group
/// against the root hash, so a file that changed in the middle of a send is refused there, and
/// the next request finds the new version and refuses it by name. Hashing again here cost a
/// tenth of a loopback copy's time.
pub fn encode_file(
    data: &File,
    hash: &Hash,
    size: u64,
    outboard: &[u8],
    ranges: &ChunkRanges,
    out: impl Write,
) -> Result<(), Error> {
    let outboard = PreOrderOutboard {
        root: hash.blake3(),
        tree: BaoTree::new(size, BLOCK_SIZE),
        data: outboard,
    };
    let data = ReadAhead::new(data);
    encode_ranges(data, outboard, &groups(ranges.clone()), out).map_err(|e| match e {
        bao_tree::io::EncodeError::Io(e) => Error::Io(e),
        other => Error::Corrupt {
            hash: *hash,
            reason: format!("cannot encode the file: {other}"),
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bao_tree::io::sync::ReadAt as _;
    use proptest::prelude::*;

    fn rw(path: &Path) -> File {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    proptest! {
        /// Gathered writes leave a file as the same writes made one at a time do: runs that
        /// follow each other, jumps back and forth, writes larger than the gathering buffer;
        /// with the disk started on each write or not.
        #[test]
        fn gathered_writes_equal_writes_one_at_a_time(
            writes in proptest::collection::vec(
                (any::<bool>(), 0u64..3_000_000, 0usize..300_000, any::<u8>()),
                0..40,
            ),
            behind in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (gathered, direct) = (rw(&dir.path().join("g")), rw(&dir.path().join("d")));
            let mut g = Gathered::new(&gathered);
            g.behind = behind;
            let mut end = 0;
            for (follows, offset, len, fill) in writes {
                let offset = if follows { end } else { offset };
                let bytes = vec![fill; len];
                g.put(offset, &bytes).unwrap();
                direct.write_all_at(&bytes, offset).unwrap();
                end = offset + len as u64;
            }
            g.flush().unwrap();
            prop_assert_eq!(
                std::fs::read(dir.path().join("g")).unwrap(),
                std::fs::read(dir.path().join("d")).unwrap()
            );
        }

        /// Reads through the read-ahead window give what reads of the file give, wherever they
        /// fall: inside the window, across its end, past the end of the file.
        #[test]
        fn reads_ahead_equal_reads_of_the_file(
            size in 0usize..3_000_000,
            reads in proptest::collection::vec((any::<bool>(), 0u64..3_100_000, 0usize..40_000), 0..60),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let file = rw(&dir.path().join("f"));
            let content: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
            file.write_all_at(&content, 0).unwrap();
            let ahead = ReadAhead::new(&file);
            let mut next = 0;
            for (follows, pos, len) in reads {
                let pos = if follows { next } else { pos };
                let (mut a, mut b) = (vec![0; len], vec![0; len]);
                let through = ahead.read_exact_at(pos, &mut a).map(|()| a);
                let direct = FileExt::read_exact_at(&file, &mut b, pos).map(|()| b);
                prop_assert_eq!(through.ok(), direct.ok());
                next = pos + len as u64;
            }
        }
    }
}
