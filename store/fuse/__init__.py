"""The FUSE front: a thin translation of kernel requests onto the store's namespace."""
