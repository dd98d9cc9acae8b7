"""The lazyfs image format: a block index plus content-addressed chunk blobs.

Building (`blockindex.build`) turns an image into chunk blobs and one index file;
reading (`blockindex.reader.IndexReader`) answers filesystem questions from the index
alone, synchronously and without any network.
"""
