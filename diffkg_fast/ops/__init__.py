"""Compute-heavy ops of DiffKG behind one interface each (``backend="auto" | "reference" | …``)."""
