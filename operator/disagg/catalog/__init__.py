"""Catalogues: accelerators (resources, node labels, specs, prices) and engines (flags, metrics)."""
