from .discriminator import DMMDDiscriminator

__all__ = ["DMMDDiscriminator"]
