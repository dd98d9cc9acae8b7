"""Errors of the image format.

    IndexFormatError            the index file is not one lazyfs can read
      └── LayerMismatchError    a side index does not match the layers it reads
    ImageError                  an input image is missing, unreadable or not an image
      ├── UnsafeImageError      an entry would escape the tree or lies about itself
      ├── UnsupportedImageError a valid image that uses something lazyfs does not handle
      ├── NoPlatformError       an image index holds no image for the platform asked for
      └── PrefetchListError     a path of ``--prefetch-files`` is not a file of the image
"""

from __future__ import annotations


class IndexFormatError(Exception):
    """The index is corrupt, truncated or of an unknown format version."""


class ImageError(Exception):
    """An input image is missing, unreadable, or not an image at all."""


class UnsafeImageError(ImageError):
    """An image entry climbs out of the tree, links outside it, or lies about its size."""


class UnsupportedImageError(ImageError):
    """A well-formed image that uses a feature lazyfs does not support."""


class NoPlatformError(ImageError):
    """An image index lists no image for the platform asked for (``--platform``, or this
    machine's)."""


class PrefetchListError(ImageError):
    """A path given to prefetch first does not name a regular file of the image."""


class LayerMismatchError(IndexFormatError):
    """A side index does not match the image's own layers: a chunk it places in a layer is
    not the bytes its digest names, or it lists a blob the image manifest does not."""
