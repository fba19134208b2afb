//! Endpoint data roots: the one directory of an endpoint that members may read and write, and
//! nothing outside it.
//!
//! A path from a peer is a [`RelPath`]: relative, `/`-separated, no `.` or `..` component, no
//! NUL, bounded in length. That check is only the first wall. Every operation then resolves the
//! path *inside the kernel*, relative to the root's directory descriptor, with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: a symlink is followed only while it stays below
//! the root, and there is no separate check that a swapped-in symlink could race, because the
//! check and the use are one system call. Operations that create, rename or remove act on one
//! name inside a parent directory opened that way (`mkdirat`, `renameat`, `unlinkat` never follow
//! a last component that is a symlink). Where `openat2` is missing (Linux before 5.6, or a
//! seccomp profile that hides it) resolution falls back to one `openat(O_NOFOLLOW)` per
//! component, which refuses every symlink.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// Longest path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest path component, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Prefix of the names of files being received; listings and walks leave them out.
pub const PART_PREFIX: &str = ".funcmesh-part.";

/// Why a path or an operation on a data root was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path starts with `/`.
    #[error("`{0}` is absolute: paths are relative to the endpoint's data root")]
    Absolute(String),
    /// A `..` component.
    #[error("`{0}` contains `..`: paths cannot leave the endpoint's data root")]
    DotDot(String),
    /// Something a path cannot hold.
    #[error("`{path}` is not a valid path: {why}")]
    Invalid {
        /// The path (shortened).
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Resolving it would leave the root (a symlink pointing outside, or swapped in).
    #[error(
        "`{0}` leads outside the endpoint's data root (through a symlink): refused; copy the \
         data inside the root instead of linking to it"
    )]
    Escapes(String),
    /// Nothing there.
    #[error("`{0}` does not exist in the endpoint's data root")]
    NotFound(String),
    /// Something is there already.
    #[error("`{0}` already exists")]
    Exists(String),
    /// A directory was needed.
    #[error("`{0}` is not a directory")]
    NotDir(String),
    /// A regular file was needed.
    #[error("`{0}` is not a regular file")]
    NotFile(String),
    /// A directory with entries, removed without `recursive`.
    #[error("`{0}` is a directory that is not empty: remove it with --recursive")]
    NotEmpty(String),
    /// Any other failure of the file system.
    #[error("`{path}`: {error}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        error: String,
    },
}

fn short(s: &str) -> String {
    if s.len() <= 200 {
        s.to_owned()
    } else {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// A path inside a data root: normalised (no empty or `.` components, no trailing `/`), never
/// absolute, never with `..`. The empty path is the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(String);

impl RelPath {
    /// The root itself.
    pub fn root() -> RelPath {
        RelPath(String::new())
    }

    /// Checks and normalises a path from a user or a peer.
    pub fn parse(s: &str) -> Result<RelPath, PathError> {
        if s.len() > MAX_PATH {
            return Err(PathError::Invalid {
                path: short(s),
                why: format!("longer than {MAX_PATH} bytes"),
            });
        }
        if s.contains('\0') {
            return Err(PathError::Invalid {
                path: short(&s.replace('\0', "\\0")),
                why: "it contains a NUL byte".into(),
            });
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(short(s)));
        }
        let mut parts = Vec::new();
        for part in s.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(PathError::DotDot(short(s))),
                p if p.len() > MAX_NAME => {
                    return Err(PathError::Invalid {
                        path: short(s),
                        why: format!("a component is longer than {MAX_NAME} bytes"),
                    });
                }
                p => parts.push(p),
            }
        }
        Ok(RelPath(parts.join("/")))
    }

    /// The path as text (empty for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name` (`name` one component, already valid).
    pub fn join(&self, name: &str) -> RelPath {
        if self.0.is_empty() {
            RelPath(name.to_owned())
        } else {
            RelPath(format!("{}/{name}", self.0))
        }
    }

    /// `self/rel`.
    pub fn join_rel(&self, rel: &RelPath) -> RelPath {
        match (self.is_root(), rel.is_root()) {
            (true, _) => rel.clone(),
            (_, true) => self.clone(),
            _ => RelPath(format!("{}/{}", self.0, rel.0)),
        }
    }

    /// The parent and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((parent, name)) => (RelPath(parent.to_owned()), name),
            None => (RelPath::root(), self.0.as_str()),
        })
    }

    /// Whether `self` is `prefix` or below it.
    pub fn starts_with(&self, prefix: &RelPath) -> bool {
        prefix.is_root()
            || self.0 == prefix.0
            || (self.0.starts_with(&prefix.0)
                && self.0.as_bytes().get(prefix.0.len()) == Some(&b'/'))
    }

    /// What `openat` gets: the root is `.`.
    fn os(&self) -> &OsStr {
        if self.0.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::new(&self.0)
        }
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed by listings and walks).
    Symlink,
    /// Anything else (device, socket, fifo): never read or written.
    Other,
}

/// A file's metadata, as listings, walks and copies carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Its path: relative to the root for `stat`, to the listed or walked directory otherwise.
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Bytes (0 for anything but files).
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

fn kind_of(t: FileType) -> Kind {
    match t {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn entry_of(path: String, st: &rustix::fs::Stat) -> Entry {
    let kind = kind_of(FileType::from_raw_mode(st.st_mode));
    Entry {
        path,
        kind,
        size: if kind == Kind::File {
            st.st_size.max(0) as u64
        } else {
            0
        },
        mode: st.st_mode & 0o7777,
        mtime_ns: st.st_mtime.saturating_mul(1_000_000_000) + st.st_mtime_nsec as i64,
    }
}

/// One endpoint's data root, held open.
#[derive(Debug)]
pub struct DataRoot {
    dir: OwnedFd,
    path: PathBuf,
}

/// Set once `openat2` turned out to be unavailable: resolve component by component.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

impl DataRoot {
    /// Opens the directory `path` as a data root.
    pub fn open(path: impl AsRef<Path>) -> Result<DataRoot, PathError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let dir = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => PathError::NotFound(shown.clone()),
            Errno::NOTDIR => PathError::NotDir(shown.clone()),
            e => PathError::Io {
                path: shown.clone(),
                error: e.to_string(),
            },
        })?;
        Ok(DataRoot { dir, path })
    }

    /// The root's directory on this host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(rel: &RelPath, e: Errno) -> PathError {
        let p = rel.to_string();
        match e {
            Errno::XDEV | Errno::LOOP => PathError::Escapes(p),
            Errno::NOENT => PathError::NotFound(p),
            Errno::EXIST => PathError::Exists(p),
            Errno::NOTDIR => PathError::NotDir(p),
            Errno::ISDIR => PathError::NotFile(p),
            Errno::NOTEMPTY => PathError::NotEmpty(p),
            e => PathError::Io {
                path: p,
                error: e.to_string(),
            },
        }
    }

    /// Opens `rel` below the root; symlinks are followed only while they stay below it.
    fn resolve(&self, rel: &RelPath, flags: OFlags, mode: Mode) -> Result<OwnedFd, PathError> {
        let flags = flags | OFlags::CLOEXEC;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(
                &self.dir,
                rel.os(),
                flags,
                mode,
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(Errno::NOSYS) | Err(Errno::PERM) if !flags.contains(OFlags::CREATE) => {
                    // ENOSYS: an old kernel; EPERM: a seccomp profile that refuses openat2.
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(Errno::AGAIN) => {
                    // A rename raced the lookup: the kernel asks us to try once more.
                    return rustix::fs::openat2(
                        &self.dir,
                        rel.os(),
                        flags,
                        mode,
                        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
                    )
                    .map_err(|e| Self::error(rel, e));
                }
                other => return other.map_err(|e| Self::error(rel, e)),
            }
        }
        self.resolve_by_components(rel, flags, mode)
    }

    /// The fallback: one `openat(O_NOFOLLOW)` per component; any symlink is refused.
    fn resolve_by_components(
        &self,
        rel: &RelPath,
        flags: OFlags,
        mode: Mode,
    ) -> Result<OwnedFd, PathError> {
        let Some((parent, name)) = rel.split_last() else {
            return rustix::fs::openat(&self.dir, ".", flags, mode)
                .map_err(|e| Self::error(rel, e));
        };
        let mut dir: Option<OwnedFd> = None;
        for part in parent.as_str().split('/').filter(|p| !p.is_empty()) {
            let at: BorrowedFd<'_> = dir.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
            let next = rustix::fs::openat(
                at,
                part,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Self::error(rel, e))?;
            dir = Some(next);
        }
        let at: BorrowedFd<'_> = dir.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
        rustix::fs::openat(at, name, flags | OFlags::NOFOLLOW, mode)
            .map_err(|e| Self::error(rel, e))
    }

    /// The parent directory of `rel`, opened below the root, and `rel`'s last component.
    fn parent<'a>(&self, rel: &'a RelPath) -> Result<(OwnedFd, &'a str), PathError> {
        let (parent, name) = rel.split_last().ok_or_else(|| PathError::Invalid {
            path: ".".into(),
            why: "the data root itself cannot be created, replaced or removed".into(),
        })?;
        let fd = self.resolve(&parent, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        Ok((fd, name))
    }

    /// Metadata of `rel` (of a symlink itself, not of what it points to).
    pub fn stat(&self, rel: &RelPath) -> Result<Entry, PathError> {
        let st = match rel.split_last() {
            None => rustix::fs::fstat(&self.dir).map_err(|e| Self::error(rel, e))?,
            Some(_) => {
                let (dir, name) = self.parent(rel)?;
                rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Self::error(rel, e))?
            }
        };
        Ok(entry_of(rel.as_str().to_owned(), &st))
    }

    /// The entries of the directory `rel`, sorted by name (files being received left out).
    pub fn list(&self, rel: &RelPath) -> Result<Vec<Entry>, PathError> {
        let dir = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        let mut out = Vec::new();
        let mut reader = rustix::fs::Dir::read_from(&dir).map_err(|e| Self::error(rel, e))?;
        while let Some(item) = reader.read() {
            let item = item.map_err(|e| Self::error(rel, e))?;
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." || name.starts_with(PART_PREFIX.as_bytes()) {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                // Paths travel as UTF-8: a name that is not cannot be named by a peer.
                continue;
            };
            match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => out.push(entry_of(name.to_owned(), &st)),
                Err(Errno::NOENT) => {} // removed meanwhile
                Err(e) => return Err(Self::error(&rel.join(name), e)),
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Every entry below the directory `rel`, depth first, paths relative to `rel`, sorted;
    /// symlinks are listed, not followed. At most `limit` entries: more is an error that says
    /// so.
    pub fn walk(&self, rel: &RelPath, limit: usize) -> Result<Vec<Entry>, PathError> {
        let mut out = Vec::new();
        let mut stack = vec![RelPath::root()];
        while let Some(sub) = stack.pop() {
            for mut e in self.list(&rel.join_rel(&sub))? {
                let path = sub.join(&e.path);
                if e.kind == Kind::Dir {
                    stack.push(path.clone());
                }
                e.path = path.0;
                out.push(e);
                if out.len() > limit {
                    return Err(PathError::Invalid {
                        path: rel.to_string(),
                        why: format!(
                            "it holds more than {limit} entries: copy its subdirectories one by one"
                        ),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Opens the regular file `rel` for reading.
    pub fn open_file(&self, rel: &RelPath) -> Result<File, PathError> {
        let fd = self.resolve(rel, OFlags::RDONLY, Mode::empty())?;
        let file = File::from(fd);
        let st = rustix::fs::fstat(&file).map_err(|e| Self::error(rel, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(PathError::NotFile(rel.to_string()));
        }
        Ok(file)
    }

    /// Makes the directory `rel` (and its missing parents with `parents`); an existing
    /// directory is fine with `parents`.
    pub fn mkdir(&self, rel: &RelPath, parents: bool) -> Result<(), PathError> {
        if rel.is_root() {
            return Ok(());
        }
        if parents {
            let mut at = RelPath::root();
            for part in rel.as_str().split('/') {
                at = at.join(part);
                match self.mkdir_one(&at) {
                    Ok(()) | Err(PathError::Exists(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // The last one must be a directory now.
            let e = self.stat(rel)?;
            if e.kind != Kind::Dir {
                return Err(PathError::NotDir(rel.to_string()));
            }
            Ok(())
        } else {
            self.mkdir_one(rel)
        }
    }

    fn mkdir_one(&self, rel: &RelPath) -> Result<(), PathError> {
        let (dir, name) = self.parent(rel)?;
        rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)).map_err(|e| Self::error(rel, e))
    }

    /// Removes the file, symlink or empty directory `rel`; with `recursive`, a directory and
    /// everything below it (symlinks inside are removed, never followed).
    pub fn remove(&self, rel: &RelPath, recursive: bool) -> Result<(), PathError> {
        let (dir, name) = self.parent(rel)?;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Self::error(rel, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return rustix::fs::unlinkat(&dir, name, AtFlags::empty())
                .map_err(|e| Self::error(rel, e));
        }
        if recursive {
            let sub = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Self::error(rel, e))?;
            remove_contents(&sub, rel)?;
        }
        rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| Self::error(rel, e))
    }

    /// A file being received for `rel`: `.funcmesh-part.<tag>` next to where it will go (so that
    /// the final rename stays on one file system), created if need be, kept otherwise (to
    /// resume). The parent directories are made.
    pub fn part_file(
        &self,
        rel: &RelPath,
        tag: &str,
    ) -> Result<(File, OwnedFd, String), PathError> {
        let (parent, name) = rel.split_last().ok_or_else(|| PathError::Invalid {
            path: ".".into(),
            why: "a file cannot replace the data root".into(),
        })?;
        let _ = name;
        // The parent exists in a tree copy (its directories are made first); make it only if
        // it does not.
        let (dir, _) = match self.parent(rel) {
            Err(PathError::NotFound(_)) => {
                self.mkdir(&parent, true)?;
                self.parent(rel)?
            }
            other => other?,
        };
        let part = format!("{PART_PREFIX}{tag}");
        let fd = rustix::fs::openat(
            &dir,
            part.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Self::error(rel, e))?;
        Ok((File::from(fd), dir, part))
    }

    /// Puts a received file in place: sets its mode and modification time, then renames the
    /// part file over `rel` (replacing a file, never a directory). Not synced: a copy calls
    /// [`DataRoot::sync`] once before it counts as done (one `syncfs` instead of an fsync per
    /// file), and a copy resumed after a power loss checks every file's size and hash again.
    pub fn commit(
        &self,
        file: &File,
        dir: &OwnedFd,
        part: &str,
        rel: &RelPath,
        mode: u32,
        mtime_ns: i64,
    ) -> Result<(), PathError> {
        let name = rel.split_last().map(|(_, n)| n).unwrap_or(".");
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777))
            .map_err(|e| Self::error(rel, e))?;
        let ts = rustix::fs::Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        };
        rustix::fs::futimens(
            file,
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
        )
        .map_err(|e| Self::error(rel, e))?;
        if let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                return Err(PathError::NotFile(rel.to_string()));
            }
        }
        rustix::fs::renameat(dir, part, dir, name).map_err(|e| Self::error(rel, e))
    }

    /// Flushes the file system of the root to disk (`syncfs`).
    pub fn sync(&self) -> Result<(), PathError> {
        rustix::fs::syncfs(&self.dir).map_err(|e| Self::error(&RelPath::root(), e))
    }

    /// Removes a part file left by an abandoned receive.
    pub fn remove_part(&self, dir: &OwnedFd, part: &str) {
        let _ = rustix::fs::unlinkat(dir, part, AtFlags::empty());
    }
}

fn remove_contents(dir: &OwnedFd, rel: &RelPath) -> Result<(), PathError> {
    let mut names = Vec::new();
    let mut reader = rustix::fs::Dir::read_from(dir).map_err(|e| DataRoot::error(rel, e))?;
    while let Some(item) = reader.read() {
        let item = item.map_err(|e| DataRoot::error(rel, e))?;
        let name = item.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    for name in names {
        let os = OsStr::from_bytes(&name);
        let shown = rel.join(&String::from_utf8_lossy(&name));
        let st = match rustix::fs::statat(dir, os, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(DataRoot::error(&shown, e)),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let sub = rustix::fs::openat(
                dir,
                os,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| DataRoot::error(&shown, e))?;
            remove_contents(&sub, &shown)?;
            rustix::fs::unlinkat(dir, os, AtFlags::REMOVEDIR)
                .map_err(|e| DataRoot::error(&shown, e))?;
        } else {
            rustix::fs::unlinkat(dir, os, AtFlags::empty())
                .map_err(|e| DataRoot::error(&shown, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_never_absolute_or_upward() {
        assert_eq!(RelPath::parse("a//b/./c/").unwrap().as_str(), "a/b/c");
        assert!(RelPath::parse("").unwrap().is_root());
        assert!(RelPath::parse("./").unwrap().is_root());
        assert!(matches!(
            RelPath::parse("/etc"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            RelPath::parse("a/../b"),
            Err(PathError::DotDot(_))
        ));
        assert!(matches!(
            RelPath::parse("a\0b"),
            Err(PathError::Invalid { .. })
        ));
        let p = RelPath::parse("data/run1").unwrap();
        assert!(p.starts_with(&RelPath::parse("data").unwrap()));
        assert!(
            !RelPath::parse("database")
                .unwrap()
                .starts_with(&RelPath::parse("data").unwrap())
        );
        assert!(p.starts_with(&RelPath::root()));
    }
}
