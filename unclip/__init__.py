"""unclip-pipeline: image-text URL lists to trained and evaluated unCLIP models, on Prefect."""

__version__ = "0.1.0"
