//! A file's BLAKE3 hash and pre-order outboard, hashed on several threads.
//!
//! A copy cannot send a byte of a file before it knows the file's root hash (the receiver checks
//! every chunk group against it), so a large file's first copy waits for one pass over it. That
//! pass is split: each thread hashes a contiguous run of chunk groups into their chaining values
//! (`blake3::hazmat`, each group at its offset), then the parents above the groups are merged in
//! one thread, in the pre-order the outboard stores them (`bao-tree`'s `PreOrderOutboard`
//! layout: 64 bytes, the left and right child, per parent). The result is the same bytes
//! `bao-tree` computes in one thread (`tests::equals_bao_tree`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use bao_tree::BlockSize;
use bao_tree::blake3;
use bao_tree::blake3::hazmat::{ChainingValue, HasherExt as _, Mode};

/// Files below this are hashed in one thread: threads would cost more than they save.
pub(crate) const PARALLEL_FROM: u64 = 4 << 20;
/// Bytes each thread reads at a time.
const READ: u64 = 1 << 20;

/// The root hash and pre-order outboard, with chunk groups of `block`, of the first `size`
/// bytes of `file`, read with positioned reads on up to `threads` threads. `size` must be more
/// than one chunk group.
pub(crate) fn parallel(
    file: &File,
    size: u64,
    threads: usize,
    block: BlockSize,
) -> io::Result<(blake3::Hash, Vec<u8>)> {
    let group = block.bytes() as u64;
    debug_assert!(size > group);
    let groups = size.div_ceil(group) as usize;
    let mut cvs = vec![[0u8; 32]; groups];
    let per_thread = groups.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let runs: Vec<_> = cvs
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(i, run)| {
                let first = (i * per_thread) as u64;
                s.spawn(move || hash_groups(file, size, group, first, run))
            })
            .collect();
        runs.into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    let mut outboard = Vec::with_capacity((groups - 1) * 64);
    let tree = Tree { cvs: &cvs, group };
    let (left, right) = tree.parents(0, size, &mut outboard);
    let root = blake3::hazmat::merge_subtrees_root(&left, &right, Mode::Hash);
    Ok((root, outboard))
}

/// Chaining values of the groups of `group` bytes from group `first` on, one per entry of
/// `out`.
fn hash_groups(
    file: &File,
    size: u64,
    group: u64,
    first: u64,
    out: &mut [ChainingValue],
) -> io::Result<()> {
    let per_read = (READ / group).max(1);
    let mut buf = vec![0u8; (per_read * group) as usize];
    for (n, cvs) in out.chunks_mut(per_read as usize).enumerate() {
        let at = (first + n as u64 * per_read) * group;
        let len = (cvs.len() as u64 * group).min(size - at) as usize;
        file.read_exact_at(&mut buf[..len], at)?;
        for (i, (cv, bytes)) in cvs
            .iter_mut()
            .zip(buf[..len].chunks(group as usize))
            .enumerate()
        {
            *cv = blake3::Hasher::new()
                .set_input_offset(at + i as u64 * group)
                .update(bytes)
                .finalize_non_root();
        }
    }
    Ok(())
}

/// The groups' chaining values, to merge into parents.
struct Tree<'a> {
    cvs: &'a [ChainingValue],
    group: u64,
}

impl Tree<'_> {
    /// The node over bytes `start..start + len` (more than one group): appends its parents to
    /// `out` in pre-order and returns its children's chaining values.
    fn parents(&self, start: u64, len: u64, out: &mut Vec<u8>) -> (ChainingValue, ChainingValue) {
        let left_len = blake3::hazmat::left_subtree_len(len);
        let at = out.len();
        out.extend_from_slice(&[0u8; 64]);
        let left = self.subtree(start, left_len, out);
        let right = self.subtree(start + left_len, len - left_len, out);
        out[at..at + 32].copy_from_slice(&left);
        out[at + 32..at + 64].copy_from_slice(&right);
        (left, right)
    }

    /// The chaining value of the subtree over bytes `start..start + len`.
    fn subtree(&self, start: u64, len: u64, out: &mut Vec<u8>) -> ChainingValue {
        if len <= self.group {
            return self.cvs[(start / self.group) as usize];
        }
        let (left, right) = self.parents(start, len, out);
        blake3::hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bao_tree::io::outboard::PreOrderOutboard;
    use bao_tree::io::sync::CreateOutboard as _;
    use proptest::prelude::*;
    use std::io::Write as _;

    /// The blob store's chunk groups: 16 chunks of 1 KiB.
    const BLOCK: BlockSize = BlockSize::from_chunk_log(4);
    const GROUP: u64 = BLOCK.bytes() as u64;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The hash and every outboard byte equal what `bao-tree` computes in one thread, for
        /// any size above one group (group boundaries, a last group of one byte, uneven runs
        /// per thread) and any number of threads.
        #[test]
        fn equals_bao_tree(
            size in prop_oneof![
                (GROUP + 1)..(3 << 20),
                (1u64..40).prop_map(|g| g * GROUP),
                (1u64..40).prop_map(|g| g * GROUP + 1),
            ],
            threads in 1usize..6,
            seed in any::<u8>(),
        ) {
            prop_assume!(size > GROUP);
            let mut file = tempfile::tempfile().unwrap();
            let bytes: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            file.write_all(&bytes).unwrap();
            let (hash, outboard) = parallel(&file, size, threads, BLOCK).unwrap();
            let expected =
                PreOrderOutboard::<Vec<u8>>::create_sized(&bytes[..], size, BLOCK).unwrap();
            prop_assert_eq!(hash, expected.root);
            prop_assert_eq!(hash, blake3::hash(&bytes));
            prop_assert_eq!(outboard, expected.data);
        }
    }

    /// A file shorter than the size asked for is an error, not a wrong hash.
    #[test]
    fn a_short_file_is_an_error() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 100_000]).unwrap();
        let err = parallel(&file, 200_000, 2, BLOCK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
