"""Generate Python gRPC stubs from containerd's API definitions, at build time.

    python3 -m lazyfs.snapshotter.protos [--src DIR]

Debian's ``golang-github-containerd-containerd-dev`` ships containerd's .proto files. They
carry gogoproto options (Go code generation hints) that protoc cannot resolve, so the few
files we need are copied into a temporary tree, the gogoproto import and options are
stripped, import paths are moved under ``lazyfs/snapshotter/_gen/``, and grpc_tools.protoc
writes the modules into ``lazyfs/snapshotter/_gen/`` (gitignored). Proto package names are
untouched, so the wire protocol is containerd's. Nothing is regenerated when the stubs are
newer than this script; ``--force`` regenerates.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

DEBIAN_SRC = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
UPSTREAM_PREFIX = "github.com/containerd/containerd/api/"
GEN_PACKAGE = "lazyfs/snapshotter/_gen"
PROTOS = (
    "services/snapshots/v1/snapshots.proto",
    "services/content/v1/content.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "types/mount.proto",
    "types/descriptor.proto",
)
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
GEN_DIR = REPO_ROOT / GEN_PACKAGE
STAMP = GEN_DIR / ".generated"

_GOGO_IMPORT = re.compile(r'^\s*import\s+(weak\s+)?"gogoproto/gogo\.proto";\s*$', re.M)
_GOGO_OPTION_LINE = re.compile(r"^\s*option\s+\(gogoproto\.[^)]*\)\s*=\s*[^;]*;\s*$", re.M)
_GOGO_FIELD_OPTION = re.compile(r'\(gogoproto\.[a-z_]+\)\s*=\s*("[^"]*"|[A-Za-z0-9_.]+)')
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def strip_gogo(text: str) -> str:
    """The proto text without gogoproto's import and options; other options stay."""
    text = _GOGO_IMPORT.sub("", text)
    text = _GOGO_OPTION_LINE.sub("", text)
    text = _GOGO_FIELD_OPTION.sub("", text)

    def tidy(m: re.Match[str]) -> str:
        parts = [p.strip() for p in m.group(1).split(",") if p.strip()]
        return f"[{', '.join(parts)}]" if parts else ""

    text = _BRACKETS.sub(tidy, text)
    return re.sub(r"\s+;", ";", text)


def rewrite_imports(text: str) -> str:
    return text.replace(f'import "{UPSTREAM_PREFIX}', f'import "{GEN_PACKAGE}/containerd/')


def up_to_date() -> bool:
    return STAMP.exists() and STAMP.stat().st_mtime >= Path(__file__).stat().st_mtime


def generate(src: Path = DEBIAN_SRC, force: bool = False) -> Path:
    """Write the stubs into ``GEN_DIR``; return it. FileNotFoundError without the sources."""
    if not force and up_to_date():
        return GEN_DIR
    from grpc_tools import protoc  # build-time dependency

    missing = [p for p in PROTOS if not (src / p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"containerd's .proto files are not under {src} (missing {missing[0]}); "
            "install golang-github-containerd-containerd-dev")
    with tempfile.TemporaryDirectory(prefix="lazyfs-protos-") as tmp:
        tree = Path(tmp)
        names = []
        for rel in PROTOS:
            out = tree / GEN_PACKAGE / "containerd" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(rewrite_imports(strip_gogo((src / rel).read_text())))
            names.append(str(out.relative_to(tree)))
        well_known = Path(protoc.__file__).parent / "_proto"
        argv = ["protoc", f"-I{tree}", f"-I{well_known}", f"--python_out={REPO_ROOT}",
                f"--pyi_out={REPO_ROOT}", f"--grpc_python_out={REPO_ROOT}", *names]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {names}")
    for d in [GEN_DIR, *(p for p in GEN_DIR.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    STAMP.touch()
    return GEN_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEBIAN_SRC, help=f"containerd's api dir ({DEBIAN_SRC})")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    try:
        out = generate(args.src, force=args.force)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return 3
    print(f"containerd API stubs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
