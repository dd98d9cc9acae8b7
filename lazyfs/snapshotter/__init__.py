"""The containerd snapshotter: a proxy plugin serving containerd's Snapshots API.

    protos      generate gRPC stubs from containerd's own .proto files (build time)
    metadata    durable snapshot records (SQLite, one transaction per change)
    filesystem  the three-method mount/check/unmount interface and its lazyfs implementation
    service     the Snapshots service: overlay semantics plus remote (lazy) snapshots
    client      a small containerd client for ``lazyfs pull``
"""
