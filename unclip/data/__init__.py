"""The data stages' pure code (no Prefect): inputs, download, filters, CLIP embedding, PCA."""
