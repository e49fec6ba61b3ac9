from .discriminator import DMMDDiscriminator
from .generator import DMMDGenerator

__all__ = ["DMMDDiscriminator", "DMMDGenerator"]
