"""What ``--data SPEC`` names: one function shared by ``train``, ``evaluate``, ``recommend`` and
the comparison script.

- ``synthetic``: the default synthetic cohort (built, seeded, in about a second);
- a ``.npz`` file written by ``diffkg-fast data build`` (or ``KGDataset.save``);
- a DiffKG dataset folder (``trnMat.pkl``, ``tstMat.pkl``, ``kg.txt``: HKUDS/DiffKG's layout);
- a KGAT dataset folder (``train.txt``, ``test.txt``, ``kg_final.txt``: KGAT's and SSLRec's);
- a DiffKG dataset name such as ``lastfm``, read from ``Datasets/NAME/`` as DiffKG's ``Main.py``
  does, so that a published DiffKG command runs with only its entry point changed.
"""

from __future__ import annotations

from pathlib import Path

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.data.errors import DataError

__all__ = ["SYNTHETIC", "open_dataset", "resolve_spec"]

SYNTHETIC = "synthetic"
# A folder's format, told by the file that only it has.
_FOLDER_FORMATS = (("diffkg", "trnMat.pkl"), ("kgat", "train.txt"))


def _folder_source(path: Path) -> str | None:
    for source, marker in _FOLDER_FORMATS:
        if (path / marker).is_file():
            return source
    return None


def resolve_spec(spec: str) -> str:
    """The canonical form of ``spec`` recorded in a run folder: ``synthetic`` or an absolute
    path (a ``NAME`` found under ``Datasets/`` becomes that folder's path)."""
    if spec == SYNTHETIC:
        return spec
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (Path("Datasets") / spec).is_dir():
        path = Path("Datasets") / spec
    return str(path.resolve())


def open_dataset(spec: str) -> KGDataset:
    """The dataset ``spec`` names (module docstring); a spec that names nothing loadable is a
    :class:`DataError` saying what was looked for."""
    if spec == SYNTHETIC:
        return build_dataset(SYNTHETIC)
    if not spec:  # `--data "$DATA"` with DATA unset must not mean the current folder
        raise DataError("empty: expected 'synthetic', a .npz file, a DiffKG or KGAT folder, or "
                        "a name under Datasets/", field="--data")
    path = Path(resolve_spec(spec))
    if path.is_dir():
        source = _folder_source(path)
        if source is None:
            wanted = " or ".join(marker for _, marker in _FOLDER_FORMATS)
            raise DataError(f"a dataset folder holds {wanted} (DiffKG's or KGAT's layout)",
                            path=path)
        return build_dataset(source, path)
    if not path.exists() and not Path(spec).suffix:
        raise DataError("no such dataset: expected 'synthetic', a .npz file, a DiffKG or KGAT "
                        "folder, or a name under Datasets/", path=spec)
    return KGDataset.load(path)
