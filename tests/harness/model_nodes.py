"""Test-only MODEL -> MODEL nodes: the legacy node boilerplate in one place.

Tests subclass ``ModelPatchNode``, write ``patch(self, model, **inputs)``, list any inputs besides
``model`` in ``EXTRA_INPUTS`` and register the class in the host's ``NODE_CLASS_MAPPINGS`` for the
test. Never shipped.
"""
from __future__ import annotations


class ModelPatchNode:
    CATEGORY = "_for_testing/lightcache"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    EXTRA_INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "model"}), **cls.EXTRA_INPUTS}}

    def patch(self, model, **inputs):
        raise NotImplementedError

