"""Loader shim: lets plain diffusers load this folder with `custom_pipeline` and
`trust_remote_code=True`. It only imports the installed `latent_dmmd` package."""
from latent_dmmd import DMMDPipeline  # noqa: F401
