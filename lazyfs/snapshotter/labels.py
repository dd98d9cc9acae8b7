"""The snapshot labels of containerd's remote-snapshot protocol, shared by the service and
``lazyfs pull`` (which must not import the service's dependencies just for these)."""

LABEL_TARGET = "containerd.io/snapshot.ref"
"""The chain id containerd wants the prepared layer committed as."""
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER = "containerd.io/snapshot/cri.layer-digest"
"""Set by CRI (``disable_snapshot_annotations = false``) and by ``lazyfs pull``; despite the
names, containerd documents them for any client that wants remote snapshots."""
LABEL_DEFER = "containerd.io/snapshot/lazyfs.defer-mount"
"""Set by ``lazyfs pull`` on its Prepares: the image is known to be a lazyfs image, so the
snapshotter records its snapshots at once and brings the mount up in the background; a
container's snapshot over it waits for the mount (and reports one that failed). Under
``containerd.io/snapshot/``: containerd passes a snapshotter no other labels."""
