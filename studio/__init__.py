"""diffusion-studio: restoration, inversion and personalization with diffusion models (see README.md).

Nothing is downloaded at run time: models load from registered names, folders or the local Hugging Face
cache. ``HF_HUB_OFFLINE`` is set here, before any module imports huggingface_hub (which reads it once, at
import); export ``HF_HUB_OFFLINE=0`` to allow downloads of hub ids.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
