//! The tree comparison must see what it is used to check, or equal-tree assertions prove nothing.

use std::os::unix::fs::PermissionsExt;

use lazylayer_testkit::tree_diff::diff_trees;

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/f"), b"content").unwrap();
    std::os::unix::fs::symlink("f", dir.path().join("d/l")).unwrap();
    dir
}

#[test]
fn differences_are_found() {
    let (a, b) = (tree(), tree());
    let same_times = |path: &str| {
        for root in [a.path(), b.path()] {
            let time = rustix::fs::Timespec {
                tv_sec: 1000,
                tv_nsec: 5,
            };
            let times = rustix::fs::Timestamps {
                last_access: time,
                last_modification: time,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                root.join(path),
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
    };
    same_times("d/f");
    same_times("d/l");
    assert!(
        diff_trees(a.path(), b.path(), false).is_empty(),
        "equal trees"
    );
    std::fs::set_permissions(
        b.path().join("d/f"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    assert_eq!(diff_trees(a.path(), b.path(), false).len(), 1, "mode");
    std::fs::set_permissions(b.path().join("d/f"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(b.path().join("d/f"), b"CONTENT").unwrap();
    same_times("d/f");
    assert!(diff_trees(a.path(), b.path(), false)[0].contains("content differs"));
    std::fs::write(b.path().join("d/f"), b"content").unwrap();
    same_times("d/f");
    rustix::fs::setxattr(
        b.path().join("d/f"),
        "user.x",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    assert_eq!(diff_trees(a.path(), b.path(), false).len(), 1, "xattr");
    std::fs::remove_file(b.path().join("d/l")).unwrap();
    std::os::unix::fs::symlink("g", b.path().join("d/l")).unwrap();
    same_times("d/l");
    assert_eq!(
        diff_trees(a.path(), b.path(), false).len(),
        2,
        "xattr and symlink target"
    );
    std::fs::write(b.path().join("d/extra"), b"").unwrap();
    assert!(
        diff_trees(a.path(), b.path(), false)
            .iter()
            .any(|d| d.contains("unexpected"))
    );
}
