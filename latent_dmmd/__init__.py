"""latent_dmmd: the diffusion MMD gradient flow (DMMD) as diffusers components.

    from latent_dmmd import DMMDPipeline
    images = DMMDPipeline.from_pretrained("path/or/hub-id")(num_images=8).images
"""

from .models import DMMDDiscriminator
from .pipelines import DMMDPipeline
from .schedulers import DMMDScheduler

__version__ = "0.1.0"
__all__ = ["DMMDDiscriminator", "DMMDPipeline", "DMMDScheduler", "__version__"]
