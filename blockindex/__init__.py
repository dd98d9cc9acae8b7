"""The lazyfs image format: a block index plus content-addressed chunk blobs.

Building (`blockindex.convert.convert`) turns an image into chunk blobs and one index
file: `sources` opens the input's layers, `ingest` feeds their entries into the merge
model of `tree`, and `build` chunks, packs and writes the index;
reading (`blockindex.reader.IndexReader`) answers filesystem questions from the index
alone, synchronously and without any network.
"""
