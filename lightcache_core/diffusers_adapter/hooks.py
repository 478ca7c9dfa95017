"""diffusers' hook framework, imported lazily: our ``ModelHook`` classes, their cache context, and
registering / removing them on a model."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .config import HOOK_PREFIX, LightCacheDiffusersError

if TYPE_CHECKING:
    from .dit import _DitSession
    from .unet import _DeepCacheSession


# ----------------------------------------------------------------------------- diffusers, lazily


_HOOK_TYPES: dict[str, type] = {}


def _diffusers_hooks():
    """diffusers' hook framework (imported on first use, never at module import)."""
    try:
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import StateManager
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LightCacheDiffusersError("the diffusers adapter needs diffusers with its hook framework "
                                       "(diffusers >= 0.35). Fix: pip install 'lightcache[diffusers]'.") from exc
    return HookRegistry, ModelHook, StateManager


def _hook_types() -> dict[str, type]:
    """The five thin ``ModelHook`` classes; each delegates to the session that installed it."""
    if _HOOK_TYPES:
        return _HOOK_TYPES
    _, ModelHook, _ = _diffusers_hooks()

    class LightCacheDenoiserHook(ModelHook):
        """Per denoiser call: the engine's decision (step / cfg / block / compute)."""

        _is_stateful = True  # diffusers resets it after every pipeline call and hands it the cache context

        def __init__(self, session: _DitSession, state_manager) -> None:
            super().__init__()
            self.session = session
            self.state_manager = state_manager  # receives the CacheContext of cache_context(...)

        def new_forward(self, module, *args, **kwargs):
            return self.session.call(self.fn_ref.original_forward, args, kwargs, _context_of(self.state_manager))

        def reset_state(self, module):
            self.session.end_run()
            return module

    class LightCacheBlockHook(ModelHook):
        """One transformer block: the engine's block-reuse points, and the skipped range."""

        def __init__(self, session: _DitSession, index: int) -> None:
            super().__init__()
            self.session = session
            self.index = index

        def new_forward(self, module, *args, **kwargs):
            return self.session.block(self.index, self.fn_ref.original_forward, args, kwargs)

    class DeepCacheStepHook(ModelHook):
        """Per UNet call: full step or cache step, from the DeepCache schedule."""

        _is_stateful = True

        def __init__(self, session: _DeepCacheSession, state_manager) -> None:
            super().__init__()
            self.session = session
            self.state_manager = state_manager

        def new_forward(self, module, *args, **kwargs):
            return self.session.call(self.fn_ref.original_forward, args, kwargs, _context_of(self.state_manager))

        def reset_state(self, module):
            self.session.end_run()
            return module

    class DeepCacheSkipHook(ModelHook):
        """A down / mid / up block that cache steps skip."""

        def __init__(self, session: _DeepCacheSession, kind: str, index: int) -> None:
            super().__init__()
            self.session, self.kind, self.index = session, kind, index

        def new_forward(self, module, *args, **kwargs):
            return self.session.skip(self.kind, self.index, self.fn_ref.original_forward, args, kwargs)

    class DeepCacheEntryHook(ModelHook):
        """The first recomputed up block: stores, or puts back, the hidden state entering it."""

        def __init__(self, session: _DeepCacheSession) -> None:
            super().__init__()
            self.session = session

        def new_forward(self, module, *args, **kwargs):
            return self.session.entry(self.fn_ref.original_forward, args, kwargs)

    for cls in (LightCacheDenoiserHook, LightCacheBlockHook, DeepCacheStepHook, DeepCacheSkipHook, DeepCacheEntryHook):
        _HOOK_TYPES[cls.__name__] = cls
    return _HOOK_TYPES


class _NoState:
    """The per-context state of our ``StateManager``s: we only read their context; state lives in the engine."""

    def reset(self, *args, **kwargs) -> None:
        pass


def _context_of(state_manager) -> tuple[str | None, Any]:
    """(name, context) of the ``cache_context`` in force, ``(None, None)`` outside one (any diffusers version)."""
    ctx = getattr(state_manager, "_context", None)
    if ctx is None:
        ctx = getattr(state_manager, "_current_context", None)  # older diffusers keep the name only
    if ctx is None:
        return None, None
    if isinstance(ctx, str):
        return ctx, None
    return getattr(ctx, "name", None), ctx


# ----------------------------------------------------------------------------- registering hooks


class _Installed:
    """The hooks one session registered: where, under which name, and what the module had before."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.nn.Module, str, bool, bool]] = []  # module, name, had registry, had forward

    def register(self, module: torch.nn.Module, hook, name: str) -> None:
        HookRegistry, _, _ = _diffusers_hooks()
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self.entries.append((module, name, had_registry, had_forward))

    def refresh(self) -> None:
        """Registries cache their children's registries; hooks added below a registry stale that list."""
        for module in {id(m): m for m, *_ in self.entries}.values():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
                registry.invalidate_child_registries_cache()

    def remove(self) -> None:
        for module, name, had_registry, had_forward in reversed(self.entries):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                forward = module.__dict__.get("forward")
                if not had_forward and getattr(forward, "__self__", None) is module and \
                        getattr(forward, "__func__", None) is getattr(type(module), "forward", None):
                    del module.forward  # the class's forward again, as before we came
                if not had_registry:
                    del module._diffusers_hook
        self.refresh()
        self.entries.clear()


def _state_manager():
    _, _, StateManager = _diffusers_hooks()
    return StateManager(_NoState, (), {})


def _check_free(model: torch.nn.Module) -> None:
    if getattr(model, "_cache_config", None) is not None:
        raise LightCacheDiffusersError(
            f"{type(model).__name__} already has a diffusers cache enabled ({type(model._cache_config).__name__}); "
            f"two caches on one model would each reuse the other's outputs. Fix: model.disable_cache() first.")
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(n.startswith(HOOK_PREFIX) for n in registry.hooks):
            raise LightCacheDiffusersError(f"LightCache is already applied to {type(model).__name__}. "
                                           f"Fix: remove the first handle (handle.remove()) before applying again.")
