//! Finding a pulled image in the store by the reference the user types.

use lazylayer_source::ImageReference;
use lazylayer_store::{ImageRecord, Store};

use crate::{Error, Result};

/// The stored image that `image` names: by reference (normalised as for pulling), or by a
/// prefix of its manifest digest.
pub fn find(store: &Store, image: &str) -> Result<ImageRecord> {
    let images = store.images()?;
    let wanted = image
        .parse::<ImageReference>()
        .map(|r| canonical_reference(&r))
        .unwrap_or_else(|_| image.to_string());
    let matches: Vec<&ImageRecord> = images
        .iter()
        .filter(|i| {
            i.reference == wanted
                || i.manifest.to_string().starts_with(image)
                || i.manifest.hex().starts_with(image)
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::Refused(format!(
            "{image} is not in the store {} (pull it first; pulled: {})",
            store.root().display(),
            if images.is_empty() {
                "none".to_string()
            } else {
                images
                    .iter()
                    .map(|i| i.reference.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))),
        _ => Err(Error::Refused(format!(
            "{image} names more than one pulled image; use its manifest digest"
        ))),
    }
}

/// The reference as stored: registries as normalised, layouts with an absolute directory.
pub fn canonical_reference(reference: &ImageReference) -> String {
    match reference {
        ImageReference::Layout(layout) => {
            let mut layout = layout.clone();
            if let Ok(dir) = layout.dir.canonicalize() {
                layout.dir = dir;
            }
            layout.to_string()
        }
        other => other.to_string(),
    }
}
