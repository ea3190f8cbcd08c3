//! Command-line options: the global ones every command shares, and the subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::commands::demo::DemoArgs;
use crate::commands::detach::DetachArgs;
use crate::commands::gc::{GcArgs, RmiArgs};
use crate::commands::index::IndexArgs;
use crate::commands::inspect::InspectArgs;
use crate::commands::layerstore::LayerStoreArgs;
use crate::commands::mount::{MountArgs, UmountArgs};
use crate::commands::pull::PullArgs;
use crate::commands::run::RunArgs;
use crate::commands::serve::ServeArgs;
use crate::commands::snapshotter::SnapshotterArgs;
use crate::commands::status::StatusArgs;
use crate::commands::verify::VerifyArgs;

/// lazylayer makes a container image's layers usable before they are downloaded.
#[derive(Parser, Debug)]
#[command(
    name = "lazylayer",
    version,
    about = "Start containers before their images are downloaded",
    long_about = "lazylayer makes a container image's layers available at once from a small \
        index, fetches the data a workload touches first with ranged reads from the registry, \
        verifies every byte against a digest, and populates a real local filesystem in the \
        background until each layer is an ordinary directory.\n\n\
        IMAGE is [docker://]HOST[:PORT]/NAME[:TAG|@DIGEST] (Docker Hub names such as `debian` \
        are accepted) or oci:DIR[:TAG] for an OCI image layout on disk. Registries on \
        localhost/127.0.0.1 are reached over plain HTTP, others over HTTPS.\n\n\
        Credentials are read from $REGISTRY_AUTH_FILE, the containers auth.json and \
        ~/.docker/config.json (including credential helpers), as podman and docker write them.",
    after_help = "Examples:\n  \
        lazylayer inspect debian:bookworm\n  \
        lazylayer index --push registry.example.com/app:1.0\n  \
        lazylayer pull registry.example.com/app:1.0\n  \
        lazylayer mount registry.example.com/app:1.0 /mnt/app\n  \
        lazylayer status\n\n\
        Environment:\n  \
        LAZYLAYER_ROOT     state directory (same as --root)\n  \
        LAZYLAYER_LOG      log filter, e.g. debug or lazylayer_source=trace\n  \
        REGISTRY_AUTH_FILE registry credentials file (containers auth.json format)"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Directory holding lazylayer's layer store and state.
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_ROOT",
        default_value = "/var/lib/lazylayer",
        value_name = "DIR"
    )]
    pub root: PathBuf,

    /// Reach this registry (HOST or HOST:PORT) over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure_registries: Vec<String>,

    /// containerd's registry hosts directory: DIR/HOST[:PORT]/hosts.toml (or
    /// DIR/_default/hosts.toml) names mirrors tried first and the registry's real server, as
    /// for containerd on this node. "none" reads none.
    #[arg(
        long,
        global = true,
        env = "LAZYLAYER_HOSTS_DIR",
        default_value = "/etc/containerd/certs.d",
        value_name = "DIR"
    )]
    pub hosts_dir: PathBuf,

    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl GlobalArgs {
    /// The hosts directory, unless `--hosts-dir none`.
    pub fn hosts_dir(&self) -> Option<PathBuf> {
        (self.hosts_dir.as_os_str() != "none").then(|| self.hosts_dir.clone())
    }
}

/// The commands. Only commands that work are listed.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// See it work: a workload run lazily and the usual way, side by side, on this machine alone.
    #[command(
        long_about = "Build (once, cached under --root/demo) a sample image from files already on \
        this machine, serve it from a registry embedded in this process behind a shaped link (100 Mbit/s \
        and 20 ms unless told otherwise), and run one workload twice, measured in the same run: pulling \
        the whole image, extracting it and running the workload, as is done today; and with lazylayer, \
        which runs it at once and fetches only what it reads. Then the layers are populated in the \
        background until they detach, and a last check shows nothing lazy is left. Needs root; no \
        internet, no registry."
    )]
    Demo(DemoArgs),

    /// Show an image's manifest, platform, config and layers.
    #[command(
        long_about = "Resolve IMAGE to one platform's manifest and print its digest, the index it \
            was chosen from (for multi-platform images), the platform, the config digest, and \
            each layer's digest, media type and compressed size. Nothing is downloaded but the \
            manifests and the config, each verified against its digest.",
        after_help = "Examples:\n  \
            lazylayer inspect 127.0.0.1:5000/test/debian:bookworm\n  \
            lazylayer inspect --json oci:/var/cache/images:bookworm | jq -r '.layers[].digest'"
    )]
    Inspect(InspectArgs),

    /// Build the lazy index of every layer of an image, and attach it to the image.
    #[command(
        long_about = "Stream each layer of IMAGE once (nothing of it is kept) and build its lazy \
            index: the file table with each file's offset in the uncompressed stream, \
            decompression checkpoints every --spacing compressed bytes (gzip: zran bit offset and \
            32 KiB window; zstd: frame boundaries; plain tar: anywhere), and a sha256 of each span \
            between checkpoints. The blob digest and the config's diff_id are checked while \
            building. Indexes are stored under --root/indexes; with --push they are also attached \
            to the image in its registry as an OCI artifact (found through the referrers API, or \
            the sha256-<digest> referrers tag on registries without it) and bound to it: the tag \
            is re-pointed at an OCI image index listing the unchanged manifest and the artifact, \
            so that the tag, or that index's digest, vouches for the indexes and other machines \
            load the image lazily without building anything. Each index blob is annotated with \
            the digest of its head (file table and span digests, a quarter of a gzip layer's \
            index), so that a pull fetches only the head and each checkpoint's window when a \
            read first needs it. An IMAGE named by digest cannot be bound (its indexes are then \
            used only with pull --index-trust referrer).",
        after_help = "Examples:\n  \
            lazylayer index --push registry.example.com/app:1.0\n  \
            lazylayer index --spacing 1M oci:./layout:latest\n  \
            lazylayer inspect --files registry.example.com/app:1.0"
    )]
    Index(IndexArgs),

    /// Make an image's layers available lazily; returns once the image can be mounted.
    #[command(
        long_about = "Resolve IMAGE, get each layer's lazy index (from --root, from the index \
        artifact bound to the image in its registry, or, for layers without one, by fetching the layer \
        once), create \
        each layer's directory under --root as placeholders with their final metadata, and have the \
        daemon (`lazylayer serve`, started on demand) mark the files whose data is not there yet. \
        Reading such a file blocks until its data is fetched and verified; the daemon also fills every \
        layer in the background and detaches it when complete. Layers shared between images are \
        stored once."
    )]
    Pull(PullArgs),

    /// Run a command in a container on an image, loading the image lazily.
    #[command(
        long_about = "Pull IMAGE lazily (see pull), mount it with a fresh writable upper, and run \
            COMMAND (default: the image's Entrypoint and Cmd) with the image's Env, WorkingDir and \
            User, in new mount, pid, uts and ipc namespaces with pivot_root, /proc, a minimal /dev \
            and a read-only /sys. Output streams live; the exit code is the command's; Ctrl-C and \
            termination signals reach the workload; the writable layer and the mount are removed \
            afterwards unless --keep. The network is the host's.",
        after_help = "Examples:\n  \
            lazylayer run registry.example.com/debian:bookworm -- /bin/sh -c 'cat /etc/os-release; id'\n  \
            lazylayer run --keep oci:./layout:app"
    )]
    Run(RunArgs),

    /// Mount a pulled image with overlayfs (fresh writable upper).
    #[command(
        long_about = "Mount a pulled image at TARGET: its layer directories as overlayfs lowers, a \
        fresh upper and work directory under --root/mounts, with metacopy=on, redirect_dir=on, index=on \
        and xino=auto (metadata-only copy-up; stable inode numbers)."
    )]
    Mount(MountArgs),

    /// Unmount an image mounted by `lazylayer mount` and remove its writable layer.
    Umount(UmountArgs),

    /// Show each layer's mode, state, files and bytes in place, and bytes fetched.
    #[command(
        long_about = "Show each layer's mode (fanotify | fuse), state, files and bytes in place, and \
        compressed bytes fetched.\n\nStates: creating (the placeholder tree is being made), lazy \
        (no daemon is filling it: data not yet local waits for one), populating (the daemon fills \
        it on access and in the background), detached (complete, verified end to end, nothing \
        lazy left), failed (its index proved wrong: never used again; `rmi` the image, `gc`, \
        and pull it again). Without a running daemon the figures are what the store persisted."
    )]
    Status(StatusArgs),

    /// Populate an image's layers now; with --wait, return once they are detached.
    Detach(DetachArgs),

    /// Check pulled layers against their indexes and content digests (non-zero exit on a difference).
    Verify(VerifyArgs),

    /// Forget pulled images, then remove the layers nothing else uses (see gc).
    #[command(
        long_about = "Forget each IMAGE (its record and prefetch profile), then collect garbage \
            as `lazylayer gc` does: layers that another image shares, or that a mount still uses, \
            stay. Every IMAGE is looked up first, so a name that matches nothing forgets nothing.",
        after_help = "Examples:\n  \
            lazylayer rmi registry.example.com/app:1.0\n  \
            lazylayer rmi --no-gc sha256:3f2a"
    )]
    Rmi(RmiArgs),

    /// Remove layers, indexes, span caches and writable layers that nothing references.
    #[command(
        long_about = "Remove from --root what no pulled image and no mount references: layer \
            directories (moved aside, then deleted, so an interrupted collection never leaves a \
            half-removed layer that looks whole), their lazy indexes and span caches, the span \
            caches of layers already detached, prefetch profiles of forgotten images, and the \
            writable layers of mounts and runs that are gone (after a reboot, say). A layer that \
            an overlay still uses, in any mount namespace, is kept even when its image was \
            forgotten; so is a layer the daemon is still filling. Pulls wait while a collection \
            runs, and a collection waits for running pulls.",
        after_help = "Examples:\n  \
            lazylayer gc --dry-run\n  \
            lazylayer rmi app:1.0 && lazylayer gc"
    )]
    Gc(GcArgs),

    /// Run the daemon in the foreground (other commands start it when needed).
    #[command(
        long_about = "The daemon behind lazy layers: fills files when they are opened or read and in \
        the background, and detaches each layer once complete and verified against its blob digest. \
        Commands talk to it over --root/lazylayer.sock and start it on demand (with \
        --exit-when-idle).\n\n\
        It is two processes. This one, the holder, keeps the fanotify group and relays its events, \
        and serves the FUSE mounts of layers in FUSE mode (relaying their fills the same way); \
        it starts a worker (shown as worker_pid in `status --json`) that fetches and fills. If the \
        worker crashes or is killed, readers of files not yet local keep waiting (never zeros) while \
        the holder starts a new worker, which takes over the unanswered events and resumes from the \
        persisted population state.\n\n\
        SIGTERM or SIGINT stops both. If a lazy layer is still mounted (in any mount namespace), \
        the daemon first fills the mounted lazy layers until they detach, since without it their \
        data not yet local would read as zeros; a second signal stops it at once anyway. Overlays \
        over FUSE-served layers lose their FUSE connection when the daemon stops."
    )]
    Serve(ServeArgs),

    /// Serve containerd as its remote snapshotter: lazily loaded images for containerd,
    /// nerdctl and Kubernetes.
    #[command(
        long_about = "containerd's snapshots service on a unix socket (--address), for containerd's \
        proxy plugin. When containerd prepares a layer whose labels name its image and layer \
        (ctr-remote image rpull, nerdctl, or CRI with disable_snapshot_annotations = false), the \
        image is pulled lazily as `lazylayer pull` does, and containerd is told the layer is \
        there: it downloads nothing for it, and containers start while the daemon fills the \
        layers on access and in the background. Images whose layers lack a lazy index bound to \
        the image (see `lazylayer index --push` and --index-trust) are downloaded and unpacked \
        by containerd as its overlayfs snapshotter does, as are layers a plain `ctr image pull` \
        unpacks; containers' writable layers are ordinary overlay upper directories.\n\n\
        State (snapshots and their parents, in a redb database) is kept under \
        --root/snapshotter and survives restarts of the snapshotter and of containerd. While a \
        layer is lazy the snapshotter keeps the daemon running and holds its fanotify group, so \
        that neither the daemon's death nor its own makes a reader see zeros. containerd's \
        garbage collection (removing the image, then its snapshots) releases the layers; the \
        snapshotter then removes them from the store as `lazylayer gc` does.",
        after_help = "Wire it into containerd (/etc/containerd/config.toml, version 2):\n  \
            [proxy_plugins.lazylayer]\n    \
              type = \"snapshot\"\n    \
              address = \"/run/lazylayer/snapshotter.sock\"\n  \
            # Kubernetes (CRI) in containerd 1.6:\n  \
            [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    \
              snapshotter = \"lazylayer\"\n    \
              disable_snapshot_annotations = false\n\n\
            Then:\n  \
            lazylayer snapshotter &            # or contrib/lazylayer-snapshotter.service\n  \
            ctr-remote image rpull --snapshotter lazylayer registry.example.com/app:1.0\n  \
            ctr run --rm --snapshotter lazylayer registry.example.com/app:1.0 demo /bin/true"
    )]
    Snapshotter(SnapshotterArgs),

    /// Serve podman and CRI-O as their additional layer store: lazily loaded layers for
    /// containers/storage.
    #[command(
        name = "layerstore",
        long_about = "A FUSE filesystem at MOUNTPOINT in the layout containers/storage (podman, \
        CRI-O, buildah) reads from an additional layer store. When podman pulls an image, it \
        first asks the store for each layer (MOUNTPOINT/<base64 of the image reference>/<layer \
        digest>/diff); that lookup pulls the image lazily as `lazylayer pull` does and answers \
        with the layer's directory, so podman downloads nothing for it and containers start \
        while the daemon fills the layers on access and in the background. Layers of images \
        without a lazy index bound to the image (see `lazylayer index --push` and \
        --index-trust), or of another platform, are answered \"not here\" and podman downloads \
        them as usual. The files of a layer directory are `diff` (a symlink to the layer's \
        directory: no file data passes through this filesystem), `info` (the layer record \
        podman stores) and `blob` (the compressed layer, fetched and verified span by span, \
        for `podman push` and `podman save`).\n\n\
        podman signals each use of a layer by creating `use` and its end (podman rmi) by \
        removing the layer directory; the counts are kept under --root/layerstore across \
        restarts. An image podman uses is held: `lazylayer rmi` refuses it and `lazylayer gc` \
        keeps it. When podman no longer uses any of its layers, an image this store pulled is \
        forgotten, and `lazylayer gc` removes its layers. While a layer is lazy the store keeps \
        the daemon running and holds its fanotify group. Stopping the store (SIGTERM) unmounts \
        it lazily; running containers are not affected.\n\n\
        Limits: the store must be mounted before podman starts (containers/storage checks the \
        directory), and only the first additionallayerstores entry is used by podman 4.x. \
        podman 4.x (containers/image before 5.31, as in Debian 12) asks for every layer; newer \
        podman asks an additional layer store only for zstd:chunked and eStargz layers, which \
        this store does not serve yet. Rootless podman cannot use it: the store is root's.",
        after_help = "Wire it into podman (/etc/containers/storage.conf):\n  \
            [storage.options]\n  \
            additionallayerstores = [\"/var/lib/lazylayer/layerstore:ref\"]\n\n\
            Then:\n  \
            lazylayer layerstore /var/lib/lazylayer/layerstore &   # or contrib/lazylayer-layerstore.service\n  \
            podman run --rm registry.example.com/app:1.0 /bin/true\n  \
            podman rmi registry.example.com/app:1.0 && lazylayer gc"
    )]
    LayerStore(LayerStoreArgs),
}
