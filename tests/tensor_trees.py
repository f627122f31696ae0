"""Shared test helpers for comparing nested results of training steps."""

from __future__ import annotations

import torch


def assert_tree_close(got, want, path: str = "", **tol) -> None:
    """Every tensor in nested dicts/lists/tuples close to its counterpart; the path names a miss."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            assert_tree_close(got[key], want[key], f"{path}.{key}", **tol)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_tree_close(g, w, f"{path}[{i}]", **tol)
    elif torch.is_tensor(want):
        torch.testing.assert_close(got.contiguous(), want.contiguous(), **tol, msg=lambda m: f"{path}: {m}")
