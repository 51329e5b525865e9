"""diffkg-fast: fast, trustworthy DiffKG for (medication) recommendation."""

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError

__version__ = "0.1.0"
__all__ = ["DataError", "KGDataset", "__version__"]
