"""Planted failure: a plugin whose import fails (a missing dependency); the rest must still run."""

import cebench_no_such_dependency  # noqa: F401

import cebench

cebench.register(name="never_registered", family="logits")(lambda logits, targets, **kw: None)
