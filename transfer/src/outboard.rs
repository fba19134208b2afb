//! A file's BLAKE3 hash and pre-order outboard, hashed on several threads.
//!
//! A copy cannot send a byte of a file before it knows the file's root hash (the receiver checks
//! every chunk group against it), so a large file's first copy waits for one pass over it. That
//! pass is split: each thread hashes a contiguous run of 16 KiB chunk groups into their chaining
//! values (`blake3::hazmat`, each group at its offset), then the parents above the groups are
//! merged in one thread, in the pre-order the outboard stores them (`bao-tree`'s
//! `PreOrderOutboard` layout: 64 bytes, the left and right child, per parent). The result is the
//! same bytes `bao-tree` computes in one thread (`tests::equals_bao_tree`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use bao_tree::blake3;
use bao_tree::blake3::hazmat::{ChainingValue, HasherExt as _, Mode};

use crate::blob::{BLOCK_SIZE, Hash};

/// Bytes per chunk group (the unit the outboard stops at).
const GROUP: u64 = BLOCK_SIZE.bytes() as u64;
/// Files below this are hashed in one thread: threads would cost more than they save.
pub(crate) const PARALLEL_FROM: u64 = 4 << 20;
/// Bytes each thread reads at a time.
const READ: usize = 1 << 20;

/// The root hash and pre-order outboard of the first `size` bytes of `file`, read with
/// positioned reads on up to `threads` threads. `size` must be more than one chunk group.
pub(crate) fn parallel(file: &File, size: u64, threads: usize) -> io::Result<(Hash, Vec<u8>)> {
    debug_assert!(size > GROUP);
    let groups = size.div_ceil(GROUP) as usize;
    let mut cvs = vec![[0u8; 32]; groups];
    let per_thread = groups.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let runs: Vec<_> = cvs
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(i, run)| s.spawn(move || hash_groups(file, size, i * per_thread, run)))
            .collect();
        runs.into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    let mut outboard = Vec::with_capacity((groups - 1) * 64);
    let (left, right) = parents(&cvs, 0, size, &mut outboard);
    let root = blake3::hazmat::merge_subtrees_root(&left, &right, Mode::Hash);
    Ok((Hash(*root.as_bytes()), outboard))
}

/// Chaining values of the groups from `first` on, one per entry of `out`.
fn hash_groups(file: &File, size: u64, first: usize, out: &mut [ChainingValue]) -> io::Result<()> {
    let mut buf = vec![0u8; READ];
    let per_read = READ / GROUP as usize;
    for (n, cvs) in out.chunks_mut(per_read).enumerate() {
        let at = (first + n * per_read) as u64 * GROUP;
        let len = ((cvs.len() as u64 * GROUP).min(size - at)) as usize;
        file.read_exact_at(&mut buf[..len], at)?;
        for (i, (cv, bytes)) in cvs
            .iter_mut()
            .zip(buf[..len].chunks(GROUP as usize))
            .enumerate()
        {
            *cv = blake3::Hasher::new()
                .set_input_offset(at + i as u64 * GROUP)
                .update(bytes)
                .finalize_non_root();
        }
    }
    Ok(())
}

/// The node over bytes `start..start + len` (more than one group): appends its parents to
/// `out` in pre-order and returns its children's chaining values.
fn parents(
    cvs: &[ChainingValue],
    start: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> (ChainingValue, ChainingValue) {
    let left_len = blake3::hazmat::left_subtree_len(len);
    let at = out.len();
    out.extend_from_slice(&[0u8; 64]);
    let left = subtree(cvs, start, left_len, out);
    let right = subtree(cvs, start + left_len, len - left_len, out);
    out[at..at + 32].copy_from_slice(&left);
    out[at + 32..at + 64].copy_from_slice(&right);
    (left, right)
}

/// The chaining value of the subtree over bytes `start..start + len`.
fn subtree(cvs: &[ChainingValue], start: u64, len: u64, out: &mut Vec<u8>) -> ChainingValue {
    if len <= GROUP {
        return cvs[(start / GROUP) as usize];
    }
    let (left, right) = parents(cvs, start, len, out);
    blake3::hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bao_tree::io::outboard::PreOrderOutboard;
    use bao_tree::io::sync::CreateOutboard as _;
    use proptest::prelude::*;
    use std::io::Write as _;

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
            let (hash, outboard) = parallel(&file, size, threads).unwrap();
            let expected =
                PreOrderOutboard::<Vec<u8>>::create_sized(&bytes[..], size, BLOCK_SIZE).unwrap();
            prop_assert_eq!(hash, Hash(*expected.root.as_bytes()));
            prop_assert_eq!(hash, Hash::of(&bytes));
            prop_assert_eq!(outboard, expected.data);
        }
    }

    /// A file shorter than the size asked for is an error, not a wrong hash.
    #[test]
    fn a_short_file_is_an_error() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 100_000]).unwrap();
        let err = parallel(&file, 200_000, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
