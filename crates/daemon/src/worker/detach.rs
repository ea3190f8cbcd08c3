//! Detaching a complete layer: every file holds its data, so the whole blob is checked against
//! its digest (and the index rebuilt from it against the one served), the last marks go, the
//! layer is recorded `detached`, and its span cache is dropped.

use std::time::Duration;

use lazylayer_index::Verification;
use lazylayer_store::Phase;

use crate::error::LayerError;
use crate::worker::Worker;
use crate::worker::lifecycle::Managed;

impl Worker {
    /// Verifies and detaches the complete layer of `managed`; a fetch that fails is retried
    /// with a growing pause, a layer that does not match is an error. `early`: the check
    /// started with population, which has followed the spans as they arrived.
    pub(super) async fn detach(
        &self,
        managed: &Managed,
        early: Option<Verification>,
    ) -> Result<(), LayerError> {
        let layer = &managed.layer;
        let store_error = |cause| LayerError::Store {
            layer: layer.digest.clone(),
            cause,
        };
        layer.persist().map_err(store_error)?;
        let verify_error = |cause| LayerError::Verify {
            layer: layer.digest.clone(),
            cause,
        };
        let mut backoff = Duration::from_millis(500);
        let every_span = 0..=layer.index.spans.len() - 1;
        loop {
            // The spans no file needed (headers only) have not been fetched yet.
            match layer.reader().ensure(every_span.clone()).await {
                Ok(()) => break,
                Err(lazylayer_index::Error::Source(e)) => {
                    tracing::warn!(
                        "layer {}: fetching the rest of the blob: {e}; retrying",
                        layer.digest
                    );
                    managed.set_error(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(cause) => return Err(verify_error(cause)),
            }
        }
        let passed = match early {
            Some(check) => match check.finish().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("layer {}: early check: {e}; checking again", layer.digest);
                    false
                }
            },
            None => false,
        };
        if !passed {
            // Checked (again) from the start before the layer is called wrong: the early check
            // may have read a span the cache has since found torn and fetched again.
            layer
                .reader()
                .verify_complete()
                .await
                .map_err(verify_error)?;
        }
        managed.clear_error();
        self.demand.detach(layer);
        layer.set_phase(Phase::Detached).map_err(store_error)?;
        self.store.drop_spans(&layer.digest);
        self.layers.lock().expect("layers").remove(&layer.digest);
        tracing::info!("layer {} detached", layer.digest);
        self.changed.notify_waiters();
        Ok(())
    }
}
