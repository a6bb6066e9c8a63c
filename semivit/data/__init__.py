"""Image discovery, robust decoding, data layouts, folds, datasets and the bundled demo data."""
