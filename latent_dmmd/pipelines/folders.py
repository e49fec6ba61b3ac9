"""A pipeline folder's loading helpers: what a Hub snapshot fetches, local paths told from Hub ids, and the loader
shim that lets plain diffusers load a folder."""

from __future__ import annotations

import os

# Files a pipeline folder needs; anything else in a Hub repo (pickles, training state) is not fetched.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.png", "pipeline.py"]  # never pickles


def looks_like_local_path(name: str) -> bool:
    """A name meant as a folder rather than a Hub id: starts like a path, has more than one ``/``,
    exists as a file, or its first component is a folder here (``models/fashion-mnist-dmm``)."""
    if (
        name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or os.path.exists(name)
        or os.sep != "/"
        and os.sep in name
    ):
        return True
    return os.path.isdir(name.split("/")[0])


SHIM = '''"""Loader shim: lets plain diffusers load this folder with `custom_pipeline` and
`trust_remote_code=True`. It only imports the installed `latent_dmmd` package."""
from latent_dmmd import DMMDPipeline  # noqa: F401
'''


def write_loader_shim(folder: str | os.PathLike) -> str:
    """Write ``pipeline.py`` (the one-line shim) into a saved pipeline folder."""
    path = os.path.join(folder, "pipeline.py")
    with open(path, "w") as f:
        f.write(SHIM)
    return path
