//! Data roots: paths never leave the root, whatever a peer sends or a local user links.

use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use proptest::prelude::*;
use transfer::root::{DataRoot, Kind, PathError, RelPath};

fn root_with_secret() -> (tempfile::TempDir, DataRoot, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"not yours").unwrap();
    std::fs::write(root.join("data/ok.txt"), b"fine").unwrap();
    let r = DataRoot::open(&root).unwrap();
    (dir, r, outside)
}

fn p(s: &str) -> RelPath {
    RelPath::parse(s).unwrap()
}

#[test]
fn a_path_with_dot_dot_is_refused_before_anything_is_opened() {
    let err = RelPath::parse("data/../../outside/secret").unwrap_err();
    assert!(matches!(err, PathError::DotDot(_)), "{err:?}");
    assert!(err.to_string().contains("cannot leave"), "{err}");
}

#[test]
fn an_absolute_path_is_refused() {
    let err = RelPath::parse("/etc/passwd").unwrap_err();
    assert!(matches!(err, PathError::Absolute(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("relative to the endpoint's data root")
    );
}

#[test]
fn a_symlink_inside_the_root_that_points_outside_is_refused() {
    let (_d, root, outside) = root_with_secret();
    symlink(&outside, root.path().join("data/exit")).unwrap();
    symlink(outside.join("secret"), root.path().join("data/secret-link")).unwrap();
    for path in ["data/exit/secret", "data/secret-link"] {
        let err = root.open_file(&p(path)).unwrap_err();
        assert!(matches!(err, PathError::Escapes(_)), "{path}: {err:?}");
        assert!(err.to_string().contains("outside the endpoint's data root"));
    }
    assert!(matches!(
        root.list(&p("data/exit")),
        Err(PathError::Escapes(_))
    ));
    // Writing through it is refused the same way.
    assert!(matches!(
        root.mkdir(&p("data/exit/new"), true),
        Err(PathError::Escapes(_))
    ));
    assert!(!outside.join("new").exists());
    // A listing shows the link as a link; removing it removes the link, not its target.
    let listed = root.list(&p("data")).unwrap();
    assert!(
        listed
            .iter()
            .any(|e| e.path == "exit" && e.kind == Kind::Symlink)
    );
    root.remove(&p("data/exit"), true).unwrap();
    assert!(outside.join("secret").exists());
    // A link that stays inside is followed.
    symlink("ok.txt", root.path().join("data/inner")).unwrap();
    let mut s = String::new();
    std::io::Read::read_to_string(&mut root.open_file(&p("data/inner")).unwrap(), &mut s).unwrap();
    assert_eq!(s, "fine");
}

#[test]
fn a_symlink_swapped_in_after_the_check_is_refused() {
    let (_d, root, outside) = root_with_secret();
    // The check: `data` is a plain directory inside the root.
    assert_eq!(root.stat(&p("data")).unwrap().kind, Kind::Dir);
    // Between check and use, someone swaps a symlink to the outside in.
    std::fs::rename(root.path().join("data"), root.path().join("data.old")).unwrap();
    symlink(&outside, root.path().join("data")).unwrap();
    std::fs::copy(outside.join("secret"), outside.join("ok.txt")).unwrap();
    let err = root.open_file(&p("data/ok.txt")).unwrap_err();
    assert!(matches!(err, PathError::Escapes(_)), "{err:?}");
}

#[test]
fn a_symlink_raced_in_and_out_never_lets_a_read_through() {
    // One thread keeps swapping `data` between a directory and a link to the outside while
    // another reads `data/ok.txt`: every read sees the root's file or is refused.
    let (_d, root, outside) = root_with_secret();
    std::fs::write(outside.join("ok.txt"), b"not yours").unwrap();
    let base = root.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let base = base.clone();
        let outside = outside.clone();
        std::thread::spawn(move || {
            std::fs::rename(base.join("data"), base.join("real")).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::remove_file(base.join("data"));
                symlink(&outside, base.join("data")).unwrap();
                let _ = std::fs::remove_file(base.join("data"));
                symlink("real", base.join("data")).unwrap();
            }
        })
    };
    let mut outcomes = (0, 0);
    // At least 5,000 reads, and on until the race has gone both ways (the swapper may be
    // slow to be scheduled on a busy machine), for at most 30 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while outcomes.0 + outcomes.1 < 5000
        || ((outcomes.0 == 0 || outcomes.1 == 0) && std::time::Instant::now() < deadline)
    {
        match root.open_file(&p("data/ok.txt")) {
            Ok(mut f) => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut f, &mut s).unwrap();
                assert_eq!(s, "fine", "a read escaped the root");
                outcomes.0 += 1;
            }
            Err(_) => outcomes.1 += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        outcomes.1 > 0,
        "the race never hit the outside link: {outcomes:?}"
    );
}

#[test]
fn mkdir_rm_and_walk_stay_inside_and_say_what_went_wrong() {
    let (_d, root, _) = root_with_secret();
    root.mkdir(&p("a/b/c"), true).unwrap();
    std::fs::write(root.path().join("a/b/c/f"), b"x").unwrap();
    assert!(matches!(
        root.mkdir(&p("a"), false),
        Err(PathError::Exists(_))
    ));
    let walked: Vec<String> = root
        .walk(&p("a"), 100)
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(walked, ["b", "b/c", "b/c/f"]);
    let err = root.remove(&p("a"), false).unwrap_err();
    assert!(err.to_string().contains("--recursive"), "{err}");
    root.remove(&p("a"), true).unwrap();
    assert!(matches!(root.stat(&p("a")), Err(PathError::NotFound(_))));
    assert!(root.remove(&RelPath::root(), true).is_err());
    assert!(
        root.walk(&p("data"), 0)
            .unwrap_err()
            .to_string()
            .contains("more than 0 entries")
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any string a peer sends: parsing never panics, and what it accepts has no `..`, no
    /// leading `/`, no NUL, no empty component.
    #[test]
    fn path_parsing_never_accepts_an_escape(s in "[a-z./\\\\\0]{0,40}|\\PC{0,60}") {
        if let Ok(rel) = RelPath::parse(&s) {
            let t = rel.as_str();
            prop_assert!(!t.starts_with('/'));
            prop_assert!(!t.contains('\0'));
            prop_assert!(t.split('/').all(|c| c != ".." && c != "." ) );
            prop_assert!(rel.is_root() || t.split('/').all(|c| !c.is_empty()));
        }
    }

    /// Resolving any accepted path in a root next to a secret never reaches the secret.
    #[test]
    fn resolving_any_path_never_reads_outside(parts in proptest::collection::vec(
        prop_oneof![Just(".."), Just("."), Just("data"), Just("exit"), Just("secret"), Just(""), Just("ok.txt")], 0..6)) {
        let (_d, root, outside) = root_with_secret();
        symlink(&outside, root.path().join("exit")).unwrap();
        let s = parts.join("/");
        if let Ok(rel) = RelPath::parse(&s) {
            if let Ok(mut f) = root.open_file(&rel) {
                let mut got = String::new();
                std::io::Read::read_to_string(&mut f, &mut got).unwrap();
                prop_assert_ne!(got, "not yours");
            }
        }
    }
}
