"""Host differences the tests themselves meet, each detected by feature (never by version).

The pack's own host knowledge lives in ``nodes/compat.py``; this is the test side's, so that a test
reads the same on every host. The harness's other adaptations live where they act: the runner
(``PromptExecutor`` cache arguments, async output caches), the fixtures (new required model
parameters) and the host boot (the server object nodes register on while they load).
"""
from __future__ import annotations


def force_split_cond_batches(monkeypatch) -> None:
    """Make the host's ``_calc_cond_batch`` run cond and uncond as separate model calls.

    It batches them only when ``memory_required * 1.5`` is below the free memory it reads: older hosts
    through ``comfy.samplers.model_management.get_free_memory``, newer ones through the running
    patcher's ``get_free_memory``. Whichever this host has reads 0 here.
    """
    import comfy.model_management
    import comfy.samplers

    if hasattr(comfy.samplers, "model_management"):
        class _NoRoomForBatching:
            """comfy.samplers' view of model_management, with no free memory."""

            def __getattr__(self, name):
                return getattr(comfy.model_management, name)

            @staticmethod
            def get_free_memory(*args, **kwargs):
                return 0

        monkeypatch.setattr(comfy.samplers, "model_management", _NoRoomForBatching())
        return
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        raise RuntimeError("this host's sampler reads free memory from neither comfy.samplers.model_management "
                           "nor ModelPatcher.get_free_memory: teach force_split_cond_batches where it looks now")
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, *a, **k: 0)
