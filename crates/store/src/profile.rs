//! Prefetch profiles: the files a workload opened (that were not local yet), in the order it
//! opened them, recorded by `lazylayer run --record` and kept beside the image as
//! `ROOT/profiles/<manifest hex>.json`. Later pulls fill these files first, before the
//! background's stream order. A profile is a plain file: copy it to another store to use it
//! there.

use std::collections::HashSet;
use std::path::Path;

use lazylayer_source::Digest;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One file of a profile.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProfileEntry {
    /// The layer holding the file.
    pub layer: Digest,
    /// Its path in the layer.
    pub path: String,
}

/// The files to fetch first for an image, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The image's manifest digest.
    pub manifest: Option<Digest>,
    /// The files.
    pub files: Vec<ProfileEntry>,
}

impl Profile {
    /// The profile at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<Profile>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// This profile followed by the files of `recorded` it does not list yet: a profile that
    /// grows with every recorded run (a run with a profile waits only for what it lacks).
    pub fn merged(mut self, recorded: Vec<ProfileEntry>) -> Profile {
        let mut listed: HashSet<ProfileEntry> = self.files.iter().cloned().collect();
        for file in recorded {
            if listed.insert(file.clone()) {
                self.files.push(file);
            }
        }
        self
    }

    /// Writes the profile to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        lazylayer_durable::write(
            path,
            &serde_json::to_vec_pretty(self).expect("profile serialises"),
        )
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}
