"""Small shared utilities (atomic output, seeding)."""

from diffkg_fast.utils.io import atomic_write
from diffkg_fast.utils.seed import seed_everything

__all__ = ["atomic_write", "seed_everything"]
