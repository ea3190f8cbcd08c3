//! What containers/storage uses, kept across restarts in `ROOT/layerstore/uses.json` (mode
//! 0600): for each layer path it looked up (image reference and layer digest), the pulled
//! image the layer was served from and the count of uses containers/storage signalled
//! (`use` created: +1, the layer directory removed: -1).
//!
//! containers/storage keeps no counts of its own and records the path of each layer it took
//! for the life of that layer, so both must outlive this process: the path must resolve to the
//! same layer after a restart even if its tag has moved, and `podman rmi` after a restart must
//! still bring the count to zero. An image with uses is held in the store (`lazylayer rmi`
//! refuses it, `gc` keeps it); at zero the hold ends, and an image this store pulled itself is
//! forgotten so that `lazylayer gc` can remove its layers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lazylayer_source::Digest;
use serde::{Deserialize, Serialize};

/// One layer path containers/storage knows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct PathUse {
    /// The image reference of the path (as containers/storage wrote it).
    reference: String,
    /// The layer's digest.
    layer: Digest,
    /// The manifest digest of the pulled image the layer was served from.
    manifest: Digest,
    /// Uses signalled and not released.
    uses: u64,
}

/// The file's contents.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    paths: Vec<PathUse>,
    /// Images this store pulled (forgotten when their last use ends).
    owned: Vec<Digest>,
}

/// The use counts, persisted.
#[derive(Debug)]
pub struct Uses {
    file: PathBuf,
    state: Mutex<State>,
}

/// What a released use leaves.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// The path was not known, or its count was already zero (a release after this store lost
    /// count, or one containers/storage sends for a layer it never used): nothing changes.
    Unknown,
    /// The image still has uses.
    StillUsed,
    /// The image's last use ended: its hold ends; `owned` if this store pulled it.
    Unused {
        /// The image's manifest digest.
        manifest: Digest,
        /// Whether this store pulled it (and may forget it).
        owned: bool,
    },
}

impl Uses {
    /// The counts kept in `file` (none yet if it does not exist).
    pub fn open(file: &Path) -> Result<Uses, String> {
        let state = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is damaged: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        };
        Ok(Uses {
            file: file.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    fn save(&self, state: &State) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(state).expect("use counts serialise");
        lazylayer_durable::write(&self.file, &bytes)
            .map_err(|e| format!("writing {}: {e}", self.file.display()))
    }

    /// The image the layer path was served from before, if it was.
    pub fn served_from(&self, reference: &str, layer: &Digest) -> Option<Digest> {
        let state = self.state.lock().expect("use counts");
        state
            .paths
            .iter()
            .find(|p| p.reference == reference && p.layer == *layer)
            .map(|p| p.manifest.clone())
    }

    /// Records that the layer path is served from the image `manifest` (which a restart
    /// must find again). A path with uses stays with the image it was counted under.
    pub fn record(&self, reference: &str, layer: &Digest, manifest: &Digest) -> Result<(), String> {
        self.change(|state| {
            match state
                .paths
                .iter_mut()
                .find(|p| p.reference == reference && p.layer == *layer)
            {
                Some(path) if path.manifest == *manifest || path.uses > 0 => return false,
                Some(path) => path.manifest = manifest.clone(),
                None => state.paths.push(PathUse {
                    reference: reference.to_string(),
                    layer: layer.clone(),
                    manifest: manifest.clone(),
                    uses: 0,
                }),
            }
            true
        })
    }

    /// The image a use of the layer path is counted under: the one its uses already are, else
    /// `served_from`.
    pub fn image_to_count(&self, reference: &str, layer: &Digest, served_from: &Digest) -> Digest {
        let state = self.state.lock().expect("use counts");
        state
            .paths
            .iter()
            .find(|p| p.reference == reference && p.layer == *layer && p.uses > 0)
            .map_or_else(|| served_from.clone(), |p| p.manifest.clone())
    }

    /// Applies `change` to the state, saved before it takes effect (a failed save changes
    /// nothing); `change` says whether it changed anything.
    fn change(&self, change: impl FnOnce(&mut State) -> bool) -> Result<(), String> {
        let mut state = self.state.lock().expect("use counts");
        let mut next = state.clone();
        if change(&mut next) {
            self.save(&next)?;
            *state = next;
        }
        Ok(())
    }

    /// Counts a use of the layer path under the image `manifest` (see
    /// [`image_to_count`](Self::image_to_count)).
    pub fn add_use(
        &self,
        reference: &str,
        layer: &Digest,
        manifest: &Digest,
    ) -> Result<(), String> {
        self.change(|state| {
            match state
                .paths
                .iter_mut()
                .find(|p| p.reference == reference && p.layer == *layer)
            {
                Some(path) => {
                    path.manifest = manifest.clone();
                    path.uses += 1;
                }
                None => state.paths.push(PathUse {
                    reference: reference.to_string(),
                    layer: layer.clone(),
                    manifest: manifest.clone(),
                    uses: 1,
                }),
            }
            true
        })
    }

    /// Ends a use of the layer path.
    pub fn release(&self, reference: &str, layer: &Digest) -> Result<Released, String> {
        let mut released = Released::Unknown;
        self.change(|state| {
            let Some(path) = state
                .paths
                .iter_mut()
                .find(|p| p.reference == reference && p.layer == *layer && p.uses > 0)
            else {
                return false;
            };
            path.uses -= 1;
            let manifest = path.manifest.clone();
            let still_used = state
                .paths
                .iter()
                .any(|p| p.manifest == manifest && p.uses > 0);
            released = if still_used {
                Released::StillUsed
            } else {
                // The paths of an unused image are forgotten with it: a later lookup resolves
                // them afresh (pulling again if the image is gone).
                state.paths.retain(|p| p.manifest != manifest);
                let owned = state.owned.contains(&manifest);
                state.owned.retain(|m| *m != manifest);
                Released::Unused { manifest, owned }
            };
            true
        })?;
        Ok(released)
    }

    /// Records that this store pulled the image `manifest`.
    pub fn mark_owned(&self, manifest: &Digest) -> Result<(), String> {
        self.change(|state| {
            if state.owned.contains(manifest) {
                return false;
            }
            state.owned.push(manifest.clone());
            true
        })
    }

    /// Whether any layer path served from the image `manifest` has uses.
    pub fn in_use(&self, manifest: &Digest) -> bool {
        let state = self.state.lock().expect("use counts");
        state
            .paths
            .iter()
            .any(|p| p.manifest == *manifest && p.uses > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn digest(name: &str) -> Digest {
        Digest::sha256(name.as_bytes())
    }

    #[test]
    fn counts_follow_use_and_release_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("uses.json");
        let uses = Uses::open(&file).unwrap();
        let (a, base, top) = (digest("a"), digest("base"), digest("top"));
        uses.mark_owned(&a).unwrap();
        // One pull: lookup +1, store +1, end of pull -1, for each layer.
        for layer in [&base, &top] {
            uses.add_use("r/a:1", layer, &a).unwrap();
            uses.add_use("r/a:1", layer, &a).unwrap();
            assert_eq!(uses.release("r/a:1", layer).unwrap(), Released::StillUsed);
        }
        assert!(uses.in_use(&a));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(uses);
        let uses = Uses::open(&file).unwrap();
        assert_eq!(uses.served_from("r/a:1", &top), Some(a.clone()));
        assert_eq!(uses.served_from("r/a:2", &top), None);
        // podman rmi: one release per layer.
        assert_eq!(uses.release("r/a:1", &top).unwrap(), Released::StillUsed);
        assert_eq!(
            uses.release("r/a:1", &base).unwrap(),
            Released::Unused {
                manifest: a.clone(),
                owned: true
            }
        );
        assert!(!uses.in_use(&a));
        assert_eq!(uses.served_from("r/a:1", &base), None);
        // A release nobody counted changes nothing.
        assert_eq!(uses.release("r/a:1", &base).unwrap(), Released::Unknown);
    }

    #[test]
    fn an_image_not_pulled_here_is_released_but_not_owned() {
        let dir = tempfile::tempdir().unwrap();
        let uses = Uses::open(&dir.path().join("uses.json")).unwrap();
        let (b, layer) = (digest("b"), digest("layer"));
        uses.record("r/b:1", &layer, &b).unwrap();
        assert!(!uses.in_use(&b));
        uses.add_use("r/b:1", &layer, &b).unwrap();
        assert_eq!(
            uses.release("r/b:1", &layer).unwrap(),
            Released::Unused {
                manifest: b,
                owned: false
            }
        );
    }

    #[test]
    fn a_counted_path_stays_with_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let uses = Uses::open(&dir.path().join("uses.json")).unwrap();
        let (old, new, layer) = (digest("old"), digest("new"), digest("layer"));
        uses.add_use("r/a:1", &layer, &old).unwrap();
        // Resolved again later (e.g. the old record was rebuilt): the count stays with `old`.
        uses.record("r/a:1", &layer, &new).unwrap();
        assert_eq!(uses.served_from("r/a:1", &layer), Some(old.clone()));
        assert_eq!(uses.image_to_count("r/a:1", &layer, &new), old);
        assert_eq!(
            uses.release("r/a:1", &layer).unwrap(),
            Released::Unused {
                manifest: old,
                owned: false
            }
        );
    }

    #[test]
    fn a_failed_save_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/uses.json");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let uses = Uses::open(&file).unwrap();
        let (m, layer) = (digest("m"), digest("layer"));
        uses.add_use("r/a:1", &layer, &m).unwrap();
        // The directory goes: the next save fails.
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
        assert!(uses.release("r/a:1", &layer).is_err());
        assert!(uses.in_use(&m), "a release that was not saved took effect");
    }

    #[test]
    fn a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("uses.json");
        std::fs::write(&file, b"{not json").unwrap();
        let error = Uses::open(&file).unwrap_err();
        assert!(error.contains("damaged"), "{error}");
    }
}
