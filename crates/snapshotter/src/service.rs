//! The gRPC face: containerd's `containerd.services.snapshots.v1.Snapshots` service on a unix
//! socket, answering root peers only, mapped onto [`Snapshotter`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use crate::api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind as WireKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use crate::metadata::{Kind, Record};
use crate::snapshotter::{Error, Snapshotter};

/// How many snapshots one List message carries (as containerd's own services batch them).
const LIST_BATCH: usize = 100;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::NotFound(_) => Status::not_found(message),
            Error::AlreadyExists(_) => Status::already_exists(message),
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Internal(_) => Status::internal(message),
        }
    }
}

/// The snapshot record as containerd's `Info`.
fn info(name: String, record: Record) -> Info {
    let time = |nanos: u64| prost_types::Timestamp {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    };
    Info {
        name,
        parent: record.parent,
        kind: match record.kind {
            Kind::View => WireKind::View,
            Kind::Active => WireKind::Active,
            Kind::Committed => WireKind::Committed,
        } as i32,
        created_at: Some(time(record.created)),
        updated_at: Some(time(record.updated)),
        labels: record.labels.into_iter().collect(),
    }
}

/// The service: each call logged at debug level, each error at warn.
struct Service {
    snapshotter: Arc<Snapshotter>,
}

fn logged<T>(call: &str, key: &str, result: Result<T, Error>) -> Result<Response<T>, Status> {
    match result {
        Ok(value) => Ok(Response::new(value)),
        // The answer that makes containerd skip a layer: not a failure.
        Err(e @ Error::AlreadyExists(_)) => {
            tracing::debug!("{call} {key}: {e}");
            Err(e.into())
        }
        Err(e) => {
            tracing::warn!("{call} {key}: {e}");
            Err(e.into())
        }
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!("prepare {} on {:?} labels {:?}", r.key, r.parent, r.labels);
        let result = self.snapshotter.prepare(&r.key, &r.parent, r.labels).await;
        logged(
            "prepare",
            &r.key,
            result.map(|mounts| PrepareSnapshotResponse { mounts }),
        )
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!("view {} on {:?}", r.key, r.parent);
        let result = self.snapshotter.view(&r.key, &r.parent, r.labels).await;
        logged(
            "view",
            &r.key,
            result.map(|mounts| ViewSnapshotResponse { mounts }),
        )
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = request.into_inner();
        let result = self.snapshotter.mounts(&r.key).await;
        logged(
            "mounts",
            &r.key,
            result.map(|mounts| MountsResponse { mounts }),
        )
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!("commit {} as {}", r.key, r.name);
        logged(
            "commit",
            &r.key,
            self.snapshotter.commit(&r.name, &r.key, r.labels),
        )
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!("remove {}", r.key);
        logged("remove", &r.key, self.snapshotter.remove(&r.key).await)
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = self
            .snapshotter
            .stat(&r.key)
            .map(|record| StatSnapshotResponse {
                info: Some(info(r.key.clone(), record)),
            });
        match result {
            // Asked for often to learn whether a layer is there yet: not worth a warning.
            Err(e @ Error::NotFound(_)) => Err(e.into()),
            result => logged("stat", &r.key, result),
        }
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(given) = r.info else {
            return Err(Status::failed_precondition(
                "an update needs the snapshot's info",
            ));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let result = self
            .snapshotter
            .update(&given.name, given.labels, &paths)
            .map(|record| UpdateSnapshotResponse {
                info: Some(info(given.name.clone(), record)),
            });
        logged("update", &given.name, result)
    }

    type ListStream = tokio_stream::Iter<std::vec::IntoIter<Result<ListSnapshotsResponse, Status>>>;

    /// Every snapshot: containerd filters by itself (its metadata layer checks each answer), so
    /// the request's filters are not applied here.
    async fn list(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let all = self.snapshotter.list().map_err(Status::from)?;
        let infos: Vec<Info> = all.into_iter().map(|(n, r)| info(n, r)).collect();
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|chunk| {
                Ok(ListSnapshotsResponse {
                    info: chunk.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let r = request.into_inner();
        let result = self.snapshotter.usage(&r.key).await;
        logged(
            "usage",
            &r.key,
            result.map(|(size, inodes)| UsageResponse {
                size: size as i64,
                inodes: inodes as i64,
            }),
        )
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        logged("cleanup", "", self.snapshotter.cleanup().await)
    }
}

/// Where and how the service listens.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The unix socket containerd's `proxy_plugins` entry names.
    pub address: PathBuf,
}

/// Serves `snapshotter` on `options.address` until the process is stopped. A socket file
/// left by a killed snapshotter is replaced. Only root (and this process's own user) may
/// connect.
pub async fn serve(snapshotter: Arc<Snapshotter>, options: &ServeOptions) -> Result<(), String> {
    let listener = bind(&options.address)?;
    let guardian = lazylayer_engine::guardian::spawn(snapshotter.engine().clone());
    let own = rustix::process::geteuid().as_raw();
    let incoming =
        tokio_stream::wrappers::UnixListenerStream::new(listener).filter(move |connection| {
            match connection {
                Ok(stream) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == 0 || cred.uid() == own => true,
                    Ok(cred) => {
                        tracing::warn!("refused a connection from uid {}", cred.uid());
                        false
                    }
                    Err(e) => {
                        tracing::warn!("refused a connection whose peer is unknown: {e}");
                        false
                    }
                },
                Err(_) => true,
            }
        });
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service { snapshotter }))
        .serve_with_incoming(incoming)
        .await;
    guardian.abort();
    result.map_err(|e| format!("serving on {}: {e}", options.address.display()))
}

/// Listens on `path` (mode 0600 whatever the umask; its directory created 0711).
fn bind(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("setting the mode of {}: {e}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{} is in use: another snapshotter serves there",
                    path.display()
                ));
            }
            // Left by a snapshotter that was killed.
            std::fs::remove_file(path)
                .map_err(|e| format!("removing the stale {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket: choose another --address",
                path.display()
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("listening on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("setting the mode of {}: {e}", path.display()))?;
    Ok(listener)
}
