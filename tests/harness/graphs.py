"""API-format prompt graphs used by the tests, the demo and the benchmarks.

A graph is the dict ``POST /prompt`` accepts: ``{id: {"class_type", "inputs"}}``
with links written ``[source_id, output_index]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import fixtures


@dataclass
class Graph:
    """A tiny builder with stable string ids ("1", "2", ...)."""

    nodes: dict = field(default_factory=dict)

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def prompt(self) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


KSAMPLER_DEFAULTS = dict(seed=0, steps=4, cfg=5.0, sampler_name="euler", scheduler="simple", denoise=1.0)


def wan_t2v(*, model: str = fixtures.WAN_T2V.name, family: str = "wan", width: int = 64, height: int = 64, length: int = 9,
            sampler: str = "KSampler", sampler_inputs: dict | None = None, decode: str | None = "VAEDecode",
            decode_inputs: dict | None = None, prompt_index: int = 0, cond_seed: int = 0, model_patches: list | None = None,
            batch_size: int = 1, **ksampler) -> tuple[dict, dict[str, str]]:
    """A Wan text-to-video graph: UNETLoader → [patches] → sampler → [decode].

    ``sampler`` is the sampler node's class (KSampler or LightCacheSampler);
    ``sampler_inputs`` adds its extra inputs. ``model_patches`` is a list of
    ``(class_type, inputs)`` MODEL→MODEL nodes chained before the sampler.
    Returns the prompt and the ids of its main nodes.
    """
    g = Graph()
    ids = {}
    ids["model"] = g.add("UNETLoader", unet_name=model, weight_dtype="default")
    model_out = out(ids["model"])
    for class_type, inputs in model_patches or []:
        pid = g.add(class_type, model=model_out, **inputs)
        ids.setdefault("patches", []).append(pid)
        model_out = out(pid)
    ids["cond"] = g.add("LightCacheTestConditioning", family=family, seed=cond_seed, prompt_index=prompt_index,
                        width=width, height=height, length=length)
    ids["latent"] = g.add("EmptyHunyuanLatentVideo", width=width, height=height, length=length, batch_size=batch_size)
    params = {**KSAMPLER_DEFAULTS, **ksampler, **(sampler_inputs or {})}
    ids["sampler"] = g.add(sampler, model=model_out, positive=out(ids["cond"], 0), negative=out(ids["cond"], 1),
                           latent_image=out(ids["latent"]), **params)
    if decode:
        ids["vae"] = g.add("VAELoader", vae_name=fixtures.WAN_VAE.name)
        ids["decode"] = g.add(decode, samples=out(ids["sampler"]), vae=out(ids["vae"]), **(decode_inputs or {}))
    return g.prompt(), ids


def trained_wan(**kwargs) -> tuple[dict, dict[str, str]]:
    """The trained tiny Wan fixture: [16, 5, 16, 16] latents (128×128 px, 17 frames), no VAE."""
    kwargs.setdefault("steps", 30)
    return wan_t2v(model=fixtures.TRAINED_WAN_LINK.name, family="trained_wan", width=128, height=128, length=17, decode=None, **kwargs)
