"""The networks of the unCLIP stack (CLIP architectures, priors, decoder, upsamplers).

This package imports torch and nothing of Prefect, I/O or distribution. ``clip_configs/`` holds the
project's open_clip architecture definitions as data (open_clip's own JSON format): a ``tiny``
CLIP with the paper's 1024-dim embedding that the demo and CI run on a CPU, and the paper's
ViT-H/16 at 256x256.
"""

import pathlib

CLIP_CONFIG_DIR = pathlib.Path(__file__).parent / "clip_configs"
