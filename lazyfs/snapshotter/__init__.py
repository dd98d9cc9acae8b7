"""The containerd snapshotter: a proxy plugin serving containerd's Snapshots API.

    protos      generate gRPC stubs from containerd's own .proto files (build time)
    labels      the remote-snapshot labels containerd (CRI) and ``lazyfs pull`` pass
    metadata    durable snapshot records (SQLite, one transaction per change)
    filesystem  the three-method mount/check/unmount interface and its lazyfs implementation
    usage       what a lazy image's layers take in the node cache (``Usage``)
    service     the Snapshots service: overlay semantics plus remote (lazy) snapshots
    client      a small containerd client for ``lazyfs pull``
"""
