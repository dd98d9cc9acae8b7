"""The ``lazyfs`` command line.

Each command is a small function from parsed arguments to an exit code. Errors a user
can fix print one line (``lazyfs: error: ...``) and exit with a code from
``lazyfs.errors``; a bug prints its traceback to the log and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from cache.private import PRIVATE_UMASK, claim

from .errors import ExitCode, MountError, UserError, exit_code_for
from .process import hide_in_cmdline, read_ready, reap_child, wait_gone

# Commands import what they use (the packages below lazyfs, trio, httpx, pyfuse3) inside
# themselves, for start-up time: `lazyfs --help` and a small command load none of it.

log = logging.getLogger("lazyfs")

DEFAULT_CACHE = Path(os.environ.get("LAZYFS_CACHE", "/var/cache/lazyfs"))
DEFAULT_TIMEOUT = 30.0
"""Seconds a read (or one registry request) may wait on the network: ``--timeout``."""
MOUNT_READY_TIMEOUT = 300.0


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "kmg" else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1M, 512K)") from None


def _chunk_size(text: str) -> int:
    from blockindex.format import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

    n = _size(text)
    if not MIN_CHUNK_SIZE <= n <= MAX_CHUNK_SIZE or n & (n - 1):
        raise argparse.ArgumentTypeError(f"chunk size must be a power of two from 4K to 64M, not {text}")
    return n


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _listen_addresses(args: argparse.Namespace) -> None:
    """``--listen`` and ``--metrics`` as ``(host, port)``, checked here rather than by
    argparse so that a mistake is one line (port 0: any free port)."""
    from fetcher.address import split_host_port

    for name in ("listen", "metrics"):
        text = getattr(args, name, None)
        if isinstance(text, str):
            try:
                host, port = split_host_port(text, port_required=True, listen=True)
            except ValueError as exc:
                raise UserError(f"--{name} {text!r}: {exc}", ExitCode.USAGE) from None
            assert port is not None
            setattr(args, name, (host, port))


# -- convert / serve ---------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    for ref in (args.source, args.dest):
        if ref.startswith("docker://"):
            _image_ref(ref.removeprefix("docker://"))
    from blockindex.errors import PrefetchListError

    first = _path_list(args.prefetch_files) if args.prefetch_files else None
    started = time.monotonic()
    try:
        result = convert(args.source, args.dest, chunk_size=args.chunk_size,
                         registry=_registry_options(args), platform=args.platform, prefetch_files=first,
                         max_entries=args.max_entries)
    except PrefetchListError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from None
    took = time.monotonic() - started
    print(f"converted {args.source} -> {args.dest} in {took:.1f}s: {result.files} files, "
          f"{_human(result.image_bytes)} in {result.chunks} chunks, "
          f"{_human(result.stored_bytes)} stored in {result.blobs} blobs")
    if result.pushed is not None:
        p = result.pushed
        print(f"pushed: {p.uploaded} blobs uploaded ({_human(p.uploaded_bytes)}), "
              f"{p.mounted} mounted from the source repository, {p.present} already there")
    print(f"manifest {result.manifest_digest}")
    return 0


def _path_list(path: str) -> list[bytes]:
    """The paths of a ``--prefetch-files`` file: one a line, ``#`` comments, blanks skipped."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read prefetch list {path}: {exc.strerror}", ExitCode.USAGE) from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(b"#")]


# -- images ------------------------------------------------------------------------------

def cmd_images(args: argparse.Namespace) -> int:
    import trio

    ref = _image_ref(args.ref)
    info = trio.run(_describe_image, ref, _registry_options(args), args.platform)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"{info['ref']}")
    print(f"  manifest  {info['digest']} ({info['media_type']})")
    if info["lazy"]:
        print(f"  lazy      yes (lazyfs format {info['format']}, chunk size {_human(info['chunk_size'])})")
        print(f"  files     {info['files']} files, {_human(info['file_bytes'])}")
        print(f"  chunks    {info['chunks']} in {info['blobs']} blobs, {_human(info['stored_bytes'])} stored")
        print(f"  index     {info['index']} ({_human(info['index_size'])})")
    else:
        print(f"  lazy      no (an ordinary image: {info['layers']} layers, {_human(info['stored_bytes'])}; "
              f"convert it with lazyfs convert docker://{args.ref} docker://REPO:TAG)")
    return 0


async def _describe_image(ref: Any, options: Any, platform: str | None) -> dict[str, Any]:
    import tempfile

    from blockindex import format as fmt
    from blockindex.convert import CHUNK_SIZE_ANNOTATION
    from blockindex.reader import IndexReader
    from fetcher.manifests import resolve_image_manifest

    async with options.client(ref) as client:
        manifest = await resolve_image_manifest(client, ref, platform)
        doc = manifest.json()
        layers = [d for d in doc.get("layers") or [] if isinstance(d, dict)]
        annotations = doc.get("annotations") or {}
        info: dict[str, Any] = {
            "ref": str(ref), "digest": manifest.digest, "media_type": manifest.media_type,
            "lazy": fmt.ARTIFACT_ANNOTATION in annotations, "layers": len(layers),
            "stored_bytes": sum(int(d.get("size", 0)) for d in layers),
        }
        config_desc = doc.get("config") or {}
        if isinstance(config_desc.get("digest"), str):
            try:
                info["config"] = json.loads(await client.read_blob(config_desc["digest"], max_size=4 << 20))
            except ValueError:
                info["config"] = None
        if not info["lazy"]:
            return info
        index_desc = next((d for d in layers if d.get("mediaType") in fmt.INDEX_MEDIA_TYPES), None)
        if index_desc is None:
            raise UserError(f"{ref}: lazyfs image manifest has no index layer", ExitCode.IMAGE)
        size = index_desc.get("size")
        if type(size) is not int or not 0 < size <= 1 << 30:
            raise UserError(f"{ref}: index size {size!r} is out of range", ExitCode.IMAGE)
        with tempfile.TemporaryDirectory() as tmp:  # never more than its declared size
            path = Path(tmp) / "index.sqlite"
            await client.download_blob(index_desc["digest"], str(path), size=size)
            reader = IndexReader(path)
            try:
                totals = reader.totals()
            finally:
                reader.close()
    info.update(
        format=annotations.get(fmt.ARTIFACT_ANNOTATION),
        chunk_size=int(annotations.get(CHUNK_SIZE_ANNOTATION, 0)),
        files=totals["files"], file_bytes=totals["file_bytes"], chunks=totals["chunks"],
        blobs=len(layers) - 1, index=index_desc["digest"], index_size=size,
        stored_bytes=sum(int(d.get("size", 0)) for d in layers if d is not index_desc),
    )
    return info


# -- registry options (shared by convert, mount, images) -----------------------------------

CONFIG_FILE = Path("/etc/lazyfs/config.toml")
CREDS_ENV = "LAZYFS_CREDS"


def _image_ref(text: str) -> Any:
    from fetcher.imageref import ImageRef

    try:
        return ImageRef.parse(text)
    except ValueError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from None


def _load_config(path: Path | None) -> dict[str, Any]:
    """The ``[registry]`` settings of the config file (``--config``, else
    /etc/lazyfs/config.toml if it exists)."""
    import tomllib

    explicit = path is not None
    path = path or CONFIG_FILE
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UserError(f"config file {path} does not exist", ExitCode.USAGE) from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config file {path}: {exc}", ExitCode.USAGE) from None
    section = doc.get("registry", {})
    known = {"mirrors", "proxy", "insecure_registries", "ca_file", "creds_file", "timeout"}
    if not isinstance(section, dict) or set(section) - known:
        raise UserError(f"config file {path}: [registry] takes only {', '.join(sorted(known))}",
                        ExitCode.USAGE)
    return section


def _registry_options(args: argparse.Namespace) -> Any:
    from fetcher.address import split_host_port
    from fetcher.credentials import parse_creds
    from fetcher.options import RegistryOptions

    conf = _load_config(Path(args.config) if args.config else None)
    creds_text = args.creds or os.environ.get(CREDS_ENV)
    creds = None
    if creds_text:
        try:
            creds = parse_creds(creds_text)
        except ValueError as exc:
            raise UserError(str(exc), ExitCode.USAGE) from None
    mirrors = tuple(_server_url("mirror", m) for m in (args.mirror or _strings(conf, "mirrors")))
    proxy = args.proxy or _string(conf, "proxy")
    if proxy is not None:
        _server_url("proxy", proxy, userinfo=True)  # httpx gets it as written: user:password@ too
    insecure = [*(args.insecure_registry or []), *_strings(conf, "insecure_registries")]
    for host in insecure:
        try:
            split_host_port(host)
        except ValueError as exc:
            raise UserError(f"insecure registry {host!r}: {exc} (expected HOST[:PORT])",
                            ExitCode.USAGE) from None
    timeout = getattr(args, "timeout", None)
    if timeout is None:
        timeout = conf.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise UserError(f"config file: timeout must be a positive number of seconds, not {timeout!r}",
                            ExitCode.USAGE)
    return RegistryOptions(
        timeout=float(timeout),
        insecure_hosts=frozenset(insecure),
        ca_file=args.ca_file or _string(conf, "ca_file"),
        credentials=creds,
        creds_file=args.creds_file or _string(conf, "creds_file"),
        mirrors=mirrors,
        proxy=proxy,
    )


def _server_url(what: str, text: str, *, userinfo: bool = False) -> str:
    """``text`` as ``scheme://host[:port]`` (a mirror serves the registry's paths at its root)."""
    from fetcher.address import parse_url

    try:
        return str(parse_url(text, schemes=("http", "https"), userinfo=userinfo))
    except ValueError as exc:
        raise UserError(f"{what}: {exc}", ExitCode.USAGE) from None


def _string(conf: dict[str, Any], key: str) -> str | None:
    value = conf.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"config file: {key} must be a string, not {value!r}", ExitCode.USAGE)
    return value


def _strings(conf: dict[str, Any], key: str) -> list[str]:
    value = conf.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"config file: {key} must be a list of strings, not {value!r}", ExitCode.USAGE)
    return value


def _add_registry_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry access")
    g.add_argument("--creds", metavar="USER:PASS",
                   help=f"credentials for the registry (or ${CREDS_ENV}); default: docker's config.json")
    g.add_argument("--creds-file", metavar="FILE",
                   help="a docker config.json to take credentials from (for daemons)")
    g.add_argument("--ca-file", metavar="PEM", help="trust these CAs too (TLS)")
    g.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]",
                   help="reach this registry over plain HTTP (repeatable; loopback always is)")
    g.add_argument("--mirror", action="append", metavar="URL",
                   help="read blobs from this mirror first, the registry after it (repeatable)")
    g.add_argument("--proxy", metavar="URL", help="send registry requests through this HTTP proxy")
    g.add_argument("--config", metavar="FILE", help=f"config file (default {CONFIG_FILE} if present)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve_forever

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory", ExitCode.USAGE)
    host, port = args.listen
    serve_forever(root, host, port, metrics=args.metrics)
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    import trio

    from .peer import read_token, run_peer

    token = read_token(Path(args.token_file))
    host, port = args.listen
    advertise = _advertise(args.advertise)
    trio.run(lambda: run_peer(Path(args.cache).absolute(), host, port, token, fetch_timeout=args.timeout,
                              insecure=True if args.insecure else None, cache_size=args.cache_size,
                              metrics=args.metrics, advertise=advertise))
    return 0


# -- mount / umount / status -------------------------------------------------------------

def _advertise(url: str | None) -> str | None:
    from fetcher.peers import normalize_url

    if url is None:
        return None
    try:
        return normalize_url(url)
    except ValueError as exc:
        raise UserError(f"--advertise: {exc}", ExitCode.USAGE) from None


def _peer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The mount's peer options, checked here so that a mistake is one line at once."""
    peers = _checked_peers(args, listen=args.listen)
    return peers and {**peers, "listen": args.listen, "hedge_delay": args.hedge_delay}


def _checked_peers(args: argparse.Namespace, *, listen: tuple[str, int] | None,
                   can_listen: bool = True) -> dict[str, Any]:
    """``--peers-file``, ``--token-file`` and ``--advertise`` of a mount (``listen`` its
    ``--listen``) or of the snapshotter (``can_listen=False``: its mounts never listen),
    checked: {} without peers, else ``peers_file`` (None when only listening),
    ``token_file`` and ``advertise``, the files' paths absolute."""
    from .peer import read_token

    if args.peers_file is None and listen is None:
        if args.advertise is not None:
            raise UserError("--advertise needs --peers-file (it names this node there)", ExitCode.USAGE)
        if args.token_file is not None:
            raise UserError("--token-file needs --peers-file" + (" or --listen" if can_listen else ""),
                            ExitCode.USAGE)
        return {}
    if args.token_file is None:
        raise UserError(("--peers-file and --listen need" if can_listen else "--peers-file needs")
                        + " --token-file (the cluster token)", ExitCode.USAGE)
    if args.advertise is not None and args.peers_file is None:
        raise UserError("--advertise needs --peers-file (it names this node there)", ExitCode.USAGE)
    read_token(Path(args.token_file))
    advertise = _advertise(args.advertise)
    if args.peers_file is not None:
        _check_peers_file(Path(args.peers_file))
    return {
        "peers_file": Path(args.peers_file).absolute() if args.peers_file else None,
        "token_file": Path(args.token_file).absolute(),
        "advertise": advertise,
    }


def _check_peers_file(path: Path) -> None:
    """A peers file to start with is there and every line of it is a peer URL (later
    changes are checked as they are read: a bad one keeps the last good list)."""
    from fetcher.peers import read_peers_file

    if not path.is_file():
        raise UserError(f"peers file {path} does not exist", ExitCode.USAGE)
    try:
        read_peers_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read peers file {path}: {exc}", ExitCode.USAGE) from None
    except ValueError as exc:
        raise UserError(f"peers file {exc}", ExitCode.USAGE) from None


def _mount_options(args: argparse.Namespace) -> Any:
    from .mount import MountOptions

    if not 0 <= args.record_window < math.inf:  # NaN fails this too
        raise UserError("--record-window must be 0 (off) or more seconds", ExitCode.USAGE)
    if not 0 <= args.refresh_trace_after < math.inf:
        raise UserError("--refresh-trace-after must be 0 (never) or more seconds", ExitCode.USAGE)
    if args.amplify is not None and args.amplify < 0:
        raise UserError("--amplify must be 0 (off) or more bytes", ExitCode.USAGE)
    registry = _registry_options(args)
    return MountOptions(
        **_peer_options(args),
        ref=args.ref,
        mountpoint=Path(args.mountpoint).absolute(),
        cache_dir=Path(args.cache).absolute(),
        prefetch=not args.no_prefetch,
        offline=args.offline,
        allow_other=args.allow_other,
        insecure=True if args.insecure else None,
        timeout=registry.timeout,
        registry=registry,
        cache_size=args.cache_size,
        metrics=args.metrics,
        record_window=None if args.record else args.record_window,
        lead_only=args.prefetch == "trace",
        refresh_trace_after=args.refresh_trace_after,
        amplify=args.amplify,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    if args.foreground:
        return _mount_foreground(args)
    return _mount_background(args)


def _mount_foreground(args: argparse.Namespace) -> int:
    import trio

    from .mount import serve
    from .mountinfo import check_mountpoint

    ready_fd = args.ready_fd

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        opts = _mount_options(args)
        check_mountpoint(opts.mountpoint)
        trio.run(serve, opts, ready)
    except BaseException as exc:
        code = exit_code_for(exc)
        if code is None and isinstance(exc, BaseExceptionGroup):
            code = next((c for e in _leaves(exc) if (c := exit_code_for(e)) is not None), None)
            exc = next((e for e in _leaves(exc) if exit_code_for(e) is not None), exc)
        if ready_fd is not None:
            message = str(exc) if code is not None else f"internal error: {exc!r}"
            try:
                os.write(ready_fd, f"error {int(code or 1)} {message}\n".encode())
            except OSError:
                pass
        raise
    return 0


def _mount_background(args: argparse.Namespace) -> int:
    """Fork the mount into a session of its own and wait until it says the rootfs is
    there (or why not). The child is this process, its imports done: no second
    interpreter starts, which saves a fifth to a third of a second on every mount. The
    child does all the work, option checks included, and reports errors through a pipe."""
    from .mountinfo import check_mountpoint

    mountpoint = Path(args.mountpoint).absolute()
    cache_dir = Path(args.cache).absolute()
    check_mountpoint(mountpoint)
    log_file = Path(args.log_file) if args.log_file else (
        cache_dir / "logs" / (str(mountpoint).strip("/").replace("/", "_") + ".log"))
    claim(cache_dir)  # before CACHE/logs: an open cache is tightened or refused first
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logf = open(log_file, "ab")
    except OSError as exc:
        raise UserError(f"cannot write log file {log_file}: {exc.strerror}", ExitCode.CACHE) from exc
    import trio  # noqa: F401 - imported once, here, for the child

    from . import mount  # noqa: F401
    args.mountpoint, args.cache, args.log_file = str(mountpoint), str(cache_dir), str(log_file)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its work is tested through the parent
        _mount_child(args, logf, r, w)
    os.close(w)
    logf.close()
    text = read_ready(r, MOUNT_READY_TIMEOUT)
    if text == "ok":
        print(f"mounted {args.ref} at {mountpoint} (pid {pid}, log {log_file})", flush=True)
        # Done: tearing down an interpreter with trio and httpx loaded would add about a
        # tenth of a second to every mount, and nothing here needs cleaning up.
        logging.shutdown()
        os._exit(0)
    if text.startswith("error "):
        _, code, msg = text.split(" ", 2)
        reap_child(pid, 30)
        raise UserError(msg, ExitCode(int(code)))
    status = reap_child(pid, 0)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        reap_child(pid, 10)
        raise MountError(f"mount did not become ready in {MOUNT_READY_TIMEOUT:g}s; see {log_file}")
    raise UserError(f"mount process exited with status {status}; see {log_file}")


def _mount_child(args: argparse.Namespace, logf: Any, r: int, w: int) -> NoReturn:
    """The forked mount: a session of its own, stdin from /dev/null, output to the log,
    no descriptor of the caller's but the ready pipe; then ``mount --foreground``."""
    code = 1
    try:
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(logf.fileno(), 1)
        os.dup2(logf.fileno(), 2)
        os.close(null)
        logf.close()
        os.closerange(3, w)  # what the caller left open (a subprocess pipe, a shell's fds)
        os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
        args.foreground, args.ready_fd = True, w
        _setup_logging(args, force=True)
        code = _run(args)
    finally:
        logging.shutdown()
        os._exit(code)


def _read_status(mountpoint: Path, timeout: float | None = None) -> dict[str, Any]:
    from .mountinfo import STATUS_TIMEOUT, read_status

    return read_status(mountpoint, STATUS_TIMEOUT if timeout is None else timeout)


def cmd_status(args: argparse.Namespace) -> int:
    status = _read_status(Path(args.mountpoint).absolute(), args.timeout)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    p = status["prefetch"]
    total = p["total_bytes"] or 1
    frac = p["cached_bytes"] / total if p["total_bytes"] else 1.0
    bar = "#" * int(frac * 30)
    print(f"{status['ref']}  at {status['mountpoint']}  (pid {status['pid']})")
    print(f"  image     {status['image']['files']} files, {_human(status['image']['file_bytes'])}, "
          f"{status['image']['chunks']} chunks")
    print(f"  cached    [{bar:<30}] {frac:6.1%}  {_human(p['cached_bytes'])} / {_human(p['total_bytes'])}")
    print(f"  prefetch  {p['state']}" + ("  (cached counts only chunks this mount has read)"
                                          if p["state"] == "off" else ""))
    sources = ", ".join(f"{k} {_human(v)}" for k, v in status["bytes_by_source"].items())
    print(f"  fetched   {sources}")
    peers = status.get("peers")
    if peers:
        bad = peers["bad_peers"]
        print(f"  peers     {len(peers['peers'])}, this node {peers['self'] or '(not in the list)'}"
              + (f", sent wrong bytes (avoided): {' '.join(bad)}" if bad else ""))
    r = status["reads"]
    print(f"  reads     {r['reads']} ({_human(r['bytes_read'])}), chunk hits: memory "
          f"{r['chunk_hits_memory']}, cache {r['chunk_hits_cache']}, misses {r['chunk_misses']}, "
          f"failed reads {r['failed_reads']}")
    c = status.get("cache_state") or {}
    if c.get("limit") is not None:
        over = (f"; OVER the limit: mounted images need {_human(c['pinned_bytes'])}"
                if c.get("over_limit") else "")
        print(f"  cache     {_human(c['size'])} of a {_human(c['limit'])} limit, "
              f"{c['evicted_entries']} entries evicted{over}")
    if c.get("full"):
        print(f"  cache     FULL ({c['dir']}): {c['served_uncached']} chunks served without caching; "
              "the prefetch waits for space")
    from .tracecmd import print_slow, print_trace

    print_trace(status)
    if args.slow:
        print_slow(status)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from . import mountinfo

    mountpoint = Path(args.mountpoint).absolute()
    stuck = False
    try:
        pid: int | None = int(_read_status(mountpoint)["pid"])
    except MountError as exc:
        entry = mountinfo.find(mountpoint, resolved=True)
        if entry is None or entry.fstype != mountinfo.FSTYPE:
            raise
        # a lazyfs mount whose process has died, or is stuck: detach what is left
        pid, stuck = None, isinstance(exc, mountinfo.NotAnsweringError)
    cmd = ["fusermount3", "-u", *(["-z"] if args.lazy or pid is None else []), str(mountpoint)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise MountError(f"cannot unmount {mountpoint}: {reason} (--lazy detaches it anyway)")
    if pid is not None and not wait_gone(pid, 30):
        raise MountError(f"unmounted {mountpoint}, but mount process {pid} is still running")
    if stuck:
        print(f"detached {mountpoint}: its process did not answer within {mountinfo.STATUS_TIMEOUT:g}s "
              "and is still running (find it with: pgrep -af 'lazyfs')")
    else:
        print(f"unmounted {mountpoint}" + (" (its process had died)" if pid is None else ""))
    return 0


# -- containerd: snapshotter / pull ---------------------------------------------------------

def cmd_snapshotter(args: argparse.Namespace) -> int:
    from .snapshotter.filesystem import LazyFileSystem, PeerOptions
    from .snapshotter.server import serve
    from .snapshotter.service import SnapshotService

    checked = _checked_peers(args, listen=None, can_listen=False)
    peers = PeerOptions(**checked) if checked else None
    if peers is not None and peers.advertise is None:
        log.warning("--peers-file without --advertise: the image mounts cannot tell which peer is "
                    "this node, so they ask this node's `lazyfs peer` for the chunks it owns")
    root = Path(args.root).absolute()
    # 0700 as containerd's own snapshotters; what is inside (snapshots' contents) keeps its modes
    claim(root, holds="snapshots", what="snapshotter root", inner=False)
    for option, value in (("--address", args.address), ("--cri-keychain", args.cri_keychain)):
        if value is not None:  # before anything starts: a bad path is a usage error
            try:
                Path(value).absolute().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{option} {value}: cannot make its directory ({exc.strerror})",
                                ExitCode.USAGE) from None
    proxy = None
    keychain = None
    if args.cri_keychain is not None:
        from .snapshotter.keychain import ImageServiceProxy, Keychain

        keychain = Keychain()
        proxy = ImageServiceProxy(keychain, Path(args.cri_keychain).absolute(), args.containerd)
    fs = LazyFileSystem(root, timeout=args.timeout, prefetch=not args.no_prefetch,
                        cache_size=args.cache_size, peers=peers, spare=not args.no_spare,
                        keychain=keychain)
    service = SnapshotService(root, fs)
    service.restore()
    if proxy is not None:
        try:
            proxy.start()
        except (RuntimeError, OSError) as exc:  # grpcio: the socket cannot be bound
            raise UserError(f"cannot serve the CRI image service on {args.cri_keychain}: {exc}",
                            ExitCode.USAGE) from None
    fs.start_spare()
    if args.metrics is not None:
        from .metrics import Metrics, snapshotter_samples

        metrics = Metrics()
        metrics.add_source(snapshotter_samples(service))
        metrics.serve(*args.metrics)
    try:
        serve(service, Path(args.address).absolute())
    finally:
        if proxy is not None:
            proxy.stop()
        fs.close()
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .snapshotter.client import pull

    started = time.monotonic()
    result = pull(args.ref, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter)
    print(f"pulled {result.name} ({result.digest}) lazily into containerd: {result.layers} layers as "
          f"remote snapshots of {args.snapshotter} in {time.monotonic() - started:.1f}s")
    return 0


# -- plumbing ----------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)")


def _add_cache_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-size", type=_size, metavar="SIZE",
                   help="limit the node cache to SIZE (e.g. 10G, 500M): least recently used chunks "
                        "of images no mount needs are evicted past it (default: no limit)")


def build_parser() -> argparse.ArgumentParser:
    from blockindex.format import DEFAULT_CHUNK_SIZE
    from blockindex.tree import MAX_ENTRIES

    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Mount container images lazily: fetch on read, verify, cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an image into a lazyfs image (OCI layout)")
    p.add_argument("source", help="docker-archive:TAR, oci:DIR[:TAG], dir:ROOTFS, tar:ROOTFS.tar "
                                  "or docker://HOST/REPO[:TAG]")
    p.add_argument("dest", help="oci:DIR[:TAG] or docker://HOST/REPO:TAG")
    p.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size (default 1M; 4K..64M)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform source (default: this machine's)")
    p.add_argument("--timeout", type=_seconds,
                   help="seconds one registry request may take (default: the config file's, else 30)")
    p.add_argument("--prefetch-files", metavar="FILE",
                   help="paths in the image (one a line) whose chunks mounts fetch first")
    p.add_argument("--max-entries", type=_positive_int, default=MAX_ENTRIES, metavar="N",
                   help="refuse an image with more files, directories and links than this "
                        "(default 1000000; convert holds them in memory, about 1.5 KiB each)")
    _add_registry_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="serve OCI layouts under DIR over the OCI distribution API")
    p.add_argument("root", metavar="DIR")
    p.add_argument("--listen", default="127.0.0.1:5000", metavar="HOST:PORT")
    _add_metrics(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mount", help="mount an image lazily")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("mountpoint")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help=f"node cache directory (default {DEFAULT_CACHE}, or $LAZYFS_CACHE)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    p.add_argument("--no-prefetch", action="store_true", help="fetch only what is read")
    p.add_argument("--offline", action="store_true", help="use the cache alone, no network")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a non-loopback registry")
    p.add_argument("--timeout", type=_seconds,
                   help="seconds a read may wait on the network before it fails with EIO "
                        "(default: the config file's, else 30)")
    p.add_argument("--log-file", help="where a background mount logs (default in the cache dir)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peers-file", help="ask these peers (one http://HOST:PORT a line; re-read on change)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also serve this node's cache to peers here")
    p.add_argument("--token-file", help="the cluster token peers present (needed with either option)")
    _add_cache_size(p)
    _add_metrics(p)
    p.add_argument("--hedge-delay", type=float, default=0.08,
                   help="seconds to wait for a peer before asking the origin too (default 0.08; "
                        "raised to 3x the peers' observed latency)")
    p.add_argument("--advertise", metavar="URL",
                   help="this node's URL in the peers file (default http://LISTEN; needed with "
                        "--listen 0.0.0.0, or when a `lazyfs peer` serves this node's cache)")
    p.add_argument("--record", action="store_true",
                   help="record the order of first reads until unmounted (default: --record-window)")
    p.add_argument("--record-window", type=float, default=30.0, metavar="SECONDS",
                   help="record first reads this long after mounting, into the image's trace (0: never)")
    p.add_argument("--refresh-trace-after", type=float, default=10.0, metavar="SECONDS",
                   help="with a trace of its own, ask the registry and peers for newer runs this long "
                        "after mounting, for the next mount (default 10; 0: never)")
    p.add_argument("--prefetch", choices=("all", "trace"), default="all",
                   help="all: the learned order first, then the whole image (default); "
                        "trace: the learned order only")
    p.add_argument("--amplify", type=_size, metavar="BYTES",
                   help="a read that misses fetches the chunks after it in its blob, up to this "
                        "size in one request (default 1M; 0: off)")
    _add_registry_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("images", help="describe an image in a registry: lazy or not, size, chunks, files")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="which image of an index")
    p.add_argument("--timeout", type=_seconds,
                   help="seconds one registry request may take (default: the config file's, else 30)")
    _add_registry_arguments(p)
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("peer", help="serve a node cache's chunks to the other nodes")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help=f"node cache directory (default {DEFAULT_CACHE})")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--advertise", metavar="URL",
                   help="this node's URL in the peers file (default http://LISTEN); logged, and "
                        "what this node's mounts pass as their --advertise")
    p.add_argument("--token-file", required=True, help="file holding the cluster token")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to non-loopback registries")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                   help="seconds fetching a missing chunk from its registry may take (default 30)")
    _add_cache_size(p)
    _add_metrics(p)
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("umount", help="unmount a lazyfs mount and stop its process")
    p.add_argument("mountpoint")
    p.add_argument("--lazy", "-z", action="store_true", help="detach even if busy")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("status", help="what a mount has cached and fetched")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--slow", action="store_true", help="also the reads that waited longest on the network")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="how long to wait for the mount to answer (default 10): a stuck one answers nothing")
    p.set_defaults(func=cmd_status)

    from .tracecmd import register as register_trace

    register_trace(sub, DEFAULT_CACHE, _add_registry_arguments)

    p = sub.add_parser("snapshotter", help="serve containerd's Snapshots API (a proxy plugin)")
    p.add_argument("--address", default="/run/lazyfs/snapshotter.sock", help="unix socket to serve on")
    p.add_argument("--root", default="/var/lib/lazyfs",
                   help="snapshots, metadata, mounts and the node cache (default /var/lib/lazyfs)")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                   help="network deadline of the image mounts (default 30)")
    p.add_argument("--no-prefetch", action="store_true", help="image mounts fetch only what is read")
    p.add_argument("--no-spare", action="store_true",
                   help="start each image's mount process when it is needed, rather than keeping one "
                        "started ahead (Python and lazyfs loaded: about 40 MB, saves ~0.3 s a mount)")
    p.add_argument("--peers-file", help="image mounts ask these peers for chunks and traces "
                                        "(one http://HOST:PORT a line; re-read on change)")
    p.add_argument("--token-file", help="the cluster token the image mounts present to peers")
    p.add_argument("--advertise", metavar="URL",
                   help="this node's URL in the peers file: where its `lazyfs peer` serves ROOT/cache")
    p.add_argument("--cri-keychain", metavar="SOCKET",
                   help="serve the CRI image service on SOCKET (kubelet's --image-service-endpoint), "
                        "forwarding to containerd's and keeping each pull's credentials for the "
                        "image's lazy mount (pods' imagePullSecrets)")
    p.add_argument("--containerd", metavar="SOCKET", default="/run/containerd/containerd.sock",
                   help="containerd's socket, where --cri-keychain forwards (default %(default)s)")
    _add_cache_size(p)
    _add_metrics(p)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_snapshotter)

    p = sub.add_parser("pull", help="pull a lazyfs image into containerd lazily (no layer download)")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--address", "-a", help="containerd's socket ($CONTAINERD_ADDRESS)",
                   default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"))
    p.add_argument("--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
                   help="containerd namespace ($CONTAINERD_NAMESPACE, default 'default')")
    p.add_argument("--snapshotter", default="lazyfs", help="the proxy plugin's name in containerd's config")
    p.set_defaults(func=cmd_pull)

    from . import cachecmd
    cachecmd.register(sub)
    return parser


def _setup_logging(args: argparse.Namespace, force: bool = False) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    log_file = getattr(args, "log_file", None)
    if getattr(args, "foreground", False) and log_file:
        logging.basicConfig(level=level, format=fmt, filename=log_file, force=force)
    else:
        logging.basicConfig(level=level if args.verbose else logging.WARNING, format=fmt, force=force)
        if getattr(args, "foreground", False) or args.command in ("serve", "snapshotter", "peer"):
            logging.getLogger().setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "convert":  # its output layout is the user's, made as the user's umask says
        os.umask(PRIVATE_UMASK)  # caches and state: 0700 and 0600 (see cache/private.py)
    _setup_logging(args)
    if getattr(args, "creds", None) and not hide_in_cmdline(args.creds):
        log.warning("--creds stays visible in this process's command line; $%s or --creds-file "
                    "keep credentials out of it", CREDS_ENV)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the command; every error becomes one line and its exit code."""
    try:
        _listen_addresses(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lazyfs status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        code = exit_code_for(exc)
        if code is None and isinstance(exc, BaseExceptionGroup):
            inner = [e for e in _leaves(exc) if exit_code_for(e) is not None]
            if inner:
                exc, code = inner[0], exit_code_for(inner[0])
        if code is None:
            if isinstance(exc, SystemExit):
                raise
            log.exception("internal error")
            print(f"lazyfs: internal error: {exc!r} (a bug; please report it)", file=sys.stderr)
            return ExitCode.FAILURE
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return int(code)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
