"""latent_dmmd: the diffusion MMD gradient flow (DMMD) as diffusers components.

    from latent_dmmd import DMMDPipeline
    images = DMMDPipeline.from_pretrained("path/or/hub-id")(num_images=8).images
"""

from .models import DMMDDiscriminator
from .pipelines import DMMDPipeline
from .schedulers import DMMDScheduler

__version__ = "0.1.0"
__all__ = ["DMMDDiscriminator", "DMMDPipeline", "DMMDScheduler", "__version__"]


def _register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained(folder)`` find ``DMMDPipeline`` once this package is
    imported: diffusers looks a folder's ``_class_name`` up on its own module."""
    import diffusers

    for cls in (DMMDPipeline, DMMDDiscriminator, DMMDScheduler):
        if not hasattr(diffusers, cls.__name__):
            setattr(diffusers, cls.__name__, cls)


_register_with_diffusers()
