//! The mounts containerd gets for a snapshot: a bind mount of a lone directory, else overlayfs
//! over the parents' directories (top first), as containerd's overlay snapshotter gives them.
//!
//! Lower paths are `ROOT/snapshotter/snapshots/ID/fs`: short, so that an image of many layers
//! fits the one page of options mount(2) takes (containerd also shortens them by changing to
//! their common parent). A lazy layer's `fs` is a link to the layer's lower directory in the
//! store (its directory, or its FUSE mount while lazy in FUSE mode), resolved by the kernel at
//! mount time.

use std::path::PathBuf;

use crate::api::Mount;
use crate::metadata::Kind;

/// The overlay options when a lower is a lazy layer: metacopy, so that a chown or chmod in
/// the container does not fetch a file's data (redirect_dir is what metacopy needs); no
/// index, so that a writable layer can be mounted again over a layer that has detached from
/// its FUSE mount since; xino for stable inode numbers.
pub const LAZY_OVERLAY_OPTIONS: [&str; 4] =
    ["index=off", "metacopy=on", "redirect_dir=on", "xino=auto"];

/// What a snapshot's mounts are made of.
#[derive(Clone, Debug)]
pub struct MountPlan {
    /// The snapshot's kind.
    pub kind: Kind,
    /// Its own directory (`ID/fs`).
    pub fs: PathBuf,
    /// overlayfs's work directory (`ID/work`, for an active snapshot).
    pub work: PathBuf,
    /// Its ancestors' directories, the parent first.
    pub parents: Vec<PathBuf>,
    /// Whether any ancestor is a lazy layer.
    pub lazy_below: bool,
}

/// The mounts for `plan`.
pub fn mounts(plan: &MountPlan) -> Vec<Mount> {
    let bind = |source: &PathBuf, rw: bool| Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
    };
    let mut lowers: Vec<&PathBuf> = Vec::new();
    match plan.kind {
        Kind::Active if plan.parents.is_empty() => return vec![bind(&plan.fs, true)],
        Kind::Active => lowers.extend(&plan.parents),
        // A view or a committed snapshot shows its own directory over its parents'; a view's
        // own directory is empty.
        Kind::View => lowers.extend(&plan.parents),
        Kind::Committed => {
            lowers.push(&plan.fs);
            lowers.extend(&plan.parents);
        }
    }
    if plan.kind != Kind::Active {
        match lowers.as_slice() {
            [] => return vec![bind(&plan.fs, false)],
            [only] => return vec![bind(only, false)],
            _ => {}
        }
    }
    let mut options = Vec::new();
    if plan.lazy_below {
        options.extend(LAZY_OVERLAY_OPTIONS.iter().map(|o| o.to_string()));
    }
    if plan.kind == Kind::Active {
        options.push(format!("workdir={}", plan.work.display()));
        options.push(format!("upperdir={}", plan.fs.display()));
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    options.push(format!("lowerdir={}", lowerdir.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: Kind, parents: &[&str], lazy_below: bool) -> MountPlan {
        MountPlan {
            kind,
            fs: "/s/9/fs".into(),
            work: "/s/9/work".into(),
            parents: parents.iter().map(PathBuf::from).collect(),
            lazy_below,
        }
    }

    #[test]
    fn a_lone_directory_is_bind_mounted() {
        let m = mounts(&plan(Kind::Active, &[], false));
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/s/9/fs")
        );
        assert_eq!(m[0].options, ["rw", "rbind"]);
        let m = mounts(&plan(Kind::View, &["/s/1/fs"], true));
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/s/1/fs")
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn active_snapshots_over_layers_are_overlays_top_first() {
        let m = mounts(&plan(Kind::Active, &["/s/2/fs", "/s/1/fs"], false));
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            [
                "workdir=/s/9/work",
                "upperdir=/s/9/fs",
                "lowerdir=/s/2/fs:/s/1/fs"
            ]
        );
        let m = mounts(&plan(Kind::Active, &["/s/1/fs"], true));
        assert!(m[0].options.iter().any(|o| o == "metacopy=on"));
        let m = mounts(&plan(Kind::View, &["/s/2/fs", "/s/1/fs"], false));
        assert_eq!(m[0].options, ["lowerdir=/s/2/fs:/s/1/fs"]);
    }
}
