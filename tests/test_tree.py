"""The merge model on its own: whiteouts, opaque directories, replacement, hard links."""

from __future__ import annotations

import stat

import pytest

from blockindex.errors import UnsafeImageError, UnsupportedImageError
from blockindex.tree import Node, Tree, new_dir, split_path


def f(content: str = "") -> Node:
    return Node(mode=stat.S_IFREG | 0o644, size=len(content), chunks=((0, content.encode()),))  # type: ignore[arg-type]


def names(tree: Tree, *parts: bytes) -> list[bytes]:
    node = tree.get(parts)
    assert node is not None and node.children is not None
    return sorted(node.children)


def test_split_path_normalises_and_refuses_climbing_out() -> None:
    assert split_path(b"./a/./b/../c/") == (b"a", b"c")
    assert split_path(b"/etc/passwd") == (b"etc", b"passwd")
    assert split_path(b".") == ()
    with pytest.raises(UnsafeImageError, match="climbs out"):
        split_path(b"../etc/passwd")
    with pytest.raises(UnsafeImageError):
        split_path(b"a/../../x")
    assert split_path(b"x" * 255) == (b"x" * 255,)
    with pytest.raises(UnsupportedImageError, match="255"):
        split_path(b"x" * 256)


def test_whiteout_hides_lower_layers_only() -> None:
    t = Tree()
    t.add((b"etc", b"a"), f("lower"))
    t.begin_layer(1)
    t.add((b"etc", b"b"), f("same layer"))
    t.whiteout((b"etc", b".wh.a"))
    t.whiteout((b"etc", b".wh.b"))  # same layer: not hidden (OCI image-spec)
    t.whiteout((b"nope", b".wh.x"))  # nothing there: ignored
    assert names(t, b"etc") == [b"b"]


def test_opaque_dir_drops_lower_children_at_every_depth() -> None:
    t = Tree()
    t.add((b"d", b"old"), f())
    t.add((b"d", b"sub", b"deep"), f())
    t.begin_layer(1)
    t.add((b"d", b"new"), f())
    t.add((b"d", b"sub"), new_dir(stat.S_IFDIR | 0o700))
    t.add((b"d", b"sub", b"fresh"), f())
    t.whiteout((b"d", b".wh..wh..opq"))
    assert names(t, b"d") == [b"new", b"sub"]
    assert names(t, b"d", b"sub") == [b"fresh"]


def test_dir_over_dir_keeps_children_and_takes_new_metadata() -> None:
    t = Tree()
    t.add((b"d",), new_dir(stat.S_IFDIR | 0o755))
    t.add((b"d", b"x"), f())
    t.begin_layer(1)
    t.add((b"d",), new_dir(stat.S_IFDIR | 0o700, uid=5))
    d = t.get((b"d",))
    assert d is not None and d.mode == stat.S_IFDIR | 0o700 and d.uid == 5
    assert names(t, b"d") == [b"x"]


def test_file_replaces_dir_and_dir_replaces_file() -> None:
    t = Tree()
    t.add((b"d", b"x"), f())
    t.add((b"g",), f())
    t.begin_layer(1)
    t.add((b"d",), f("now a file"))
    t.add((b"g",), new_dir())
    assert t.get((b"d",)).is_reg  # type: ignore[union-attr]
    assert t.get((b"g",)).is_dir  # type: ignore[union-attr]


def test_hard_link_keeps_content_when_target_goes() -> None:
    t = Tree()
    original = f("data")
    t.add((b"a",), original)
    t.link((b"b",), (b"a",))
    assert t.get((b"b",)) is original
    t.begin_layer(1)
    t.whiteout((b".wh.a",))
    t.add((b"c",), f("other"))
    t.link((b"a",), (b"c",))  # the name reused for something else
    assert t.get((b"b",)) is original
    assert t.get((b"a",)) is t.get((b"c",))


def test_hard_link_to_missing_or_directory_is_refused() -> None:
    t = Tree()
    t.add((b"d",), new_dir())
    with pytest.raises(UnsafeImageError, match="not in the image"):
        t.link((b"x",), (b"missing",))
    with pytest.raises(UnsafeImageError, match="directory"):
        t.link((b"x",), (b"d",))


def test_entry_under_a_non_directory_is_refused() -> None:
    t = Tree()
    t.add((b"link",), Node(mode=stat.S_IFLNK | 0o777, target=b"/etc"))
    with pytest.raises(UnsafeImageError, match="non-directory"):
        t.add((b"link", b"passwd"), f())
