//! Uploading blobs (monolithic POST + PUT) so that lazylayer can attach its indexes to images
//! and tests can build images in a registry.

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, LOCATION};

use super::Repository;
use super::auth::Access;
use super::retry::Attempts;
use super::transport::{Body, Request};
use crate::manifest::BlobDescriptor;
use crate::{Error, Result};

impl Repository {
    /// Uploads a blob unless the repository already has it; returns whether it was uploaded.
    /// The registry checks the digest of what it receives.
    pub async fn push_blob(&self, descriptor: &BlobDescriptor, body: Body) -> Result<bool> {
        if self.blob_size(&descriptor.digest).await? == Some(descriptor.size) {
            return Ok(false);
        }
        let what = format!(
            "upload blob {} to {}/{}",
            descriptor.digest, self.registry, self.name
        );
        let mut attempts = Attempts::new(self.client.retry_policy());
        let start_url = self
            .base
            .join(&format!("{}/blobs/uploads/", self.name))
            .map_err(|e| Error::malformed(&what, e))?;
        let start = Request::new(Method::POST, start_url, Access::Push, what.clone())
            .header(reqwest::header::CONTENT_LENGTH, "0");
        let response = self.send(&start, &mut attempts).await?;
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Protocol {
                request: what.clone(),
                detail: "the upload answer has no Location".to_string(),
            })?;
        let mut upload_url = response
            .url()
            .join(location)
            .map_err(|e| Error::malformed(&what, e))?;
        upload_url
            .query_pairs_mut()
            .append_pair("digest", &descriptor.digest.to_string());
        let mut finish = Request::new(Method::PUT, upload_url, Access::Push, what)
            .header(CONTENT_TYPE, "application/octet-stream");
        finish.body = Some(body);
        self.send(&finish, &mut attempts).await?;
        Ok(true)
    }
}
