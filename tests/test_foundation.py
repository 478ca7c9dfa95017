"""The pack loads into a real ComfyUI, and every tiny fixture family loads, is detected and samples.

Loader paths, per family (see harness/fixtures.py for why):
* Wan 2.1 T2V / I2V and HunyuanVideo: ``UNETLoader`` with ComfyUI's model detection.
* SD1.5 UNet (width 32) and SVD VideoUNet (width 64): detection matches only at model_channels 320,
  so the test-only ``LightCacheTestUNetLoader`` builds them from ComfyUI's
  ``detect_unet_config`` + ``supported_models`` classes.
* Wan 2.1 VAE (dim 16) and SD VAE (full size, the smallest detectable): ``VAELoader``.
"""
from __future__ import annotations

import pytest

from harness import fixtures, graphs
from harness.graphs import Graph, out

PACK_NODES = {"LightCacheSampler": "LightCache Sampler", "LightCacheModelPatch": "LightCache Model Patch",
              "ChunkedModelPatch": "Chunked Model Patch", "SlicedVAEDecode": "Sliced VAE Decode"}


def test_pack_loads_through_comfyui_loader_without_warnings(comfy_host):
    assert comfy_host.custom_node_warnings == []
    nodes = comfy_host.nodes
    for node_id, display in PACK_NODES.items():
        assert node_id in nodes.NODE_CLASS_MAPPINGS, f"{node_id} not registered"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id) == display
        assert nodes.NODE_CLASS_MAPPINGS[node_id].RELATIVE_PYTHON_MODULE == "custom_nodes.lightcache"
    assert "lightcache" in nodes.EXTENSION_WEB_DIRS or any("lightcache" in k for k in nodes.EXTENSION_WEB_DIRS)


def test_every_pack_input_has_a_tooltip(comfy_host):
    nodes = comfy_host.nodes
    for node_id in PACK_NODES:
        info = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


DIT_FAMILIES = [
    (fixtures.WAN_T2V, "wan", "EmptyHunyuanLatentVideo"),
    (fixtures.WAN_I2V, "wan_i2v", "EmptyHunyuanLatentVideo"),
    (fixtures.HUNYUAN, "hunyuan_video", "EmptyHunyuanLatentVideo"),
]


@pytest.mark.parametrize("fixture,family,latent", DIT_FAMILIES, ids=lambda v: getattr(v, "family", None) or "")
def test_dit_fixture_detected_and_samples(runner, fixture, family, latent):
    g = Graph()
    model = g.add("UNETLoader", unet_name=fixture.name, weight_dtype="default")
    cond = g.add("LightCacheTestConditioning", family=family, seed=1, prompt_index=0, width=64, height=64, length=5)
    lat = g.add(latent, width=64, height=64, length=5, batch_size=1)
    ks = g.add("KSampler", model=out(model), positive=out(cond, 0), negative=out(cond, 1), latent_image=out(lat), **{**graphs.KSAMPLER_DEFAULTS, "steps": 1})
    res = runner.run(g.prompt())
    patcher = res.output(model)
    assert type(patcher.model.model_config).__name__ == fixture.family
    samples = res.output(ks)["samples"]
    assert samples.shape == (1, 16, 2, 8, 8)
    assert samples.isfinite().all()


UNET_FAMILIES = [(fixtures.SD15_UNET, "SD15", "sd15"), (fixtures.SVD_UNET, "SVD_img2vid", "svd")]


@pytest.mark.parametrize("fixture,cls,family", UNET_FAMILIES, ids=["sd15", "svd"])
def test_unet_fixture_builds_from_supported_models_and_samples(runner, fixture, cls, family):
    g = Graph()
    model = g.add("LightCacheTestUNetLoader", unet_name=fixture.name, family=cls)
    cond = g.add("LightCacheTestConditioning", family=family, seed=1, prompt_index=0, width=64, height=64, length=4)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    ks = g.add("KSampler", model=out(model), positive=out(cond, 0), negative=out(cond, 1), latent_image=out(lat), **{**graphs.KSAMPLER_DEFAULTS, "steps": 1})
    res = runner.run(g.prompt())
    patcher = res.output(model)
    assert type(patcher.model.model_config).__name__ == cls
    unet = patcher.model.diffusion_model
    # ComfyUI's SVD "VideoUNet" is openaimodel.UNetModel with temporal resblocks.
    assert type(unet).__name__ == "UNetModel"
    assert unet.use_temporal_resblocks == (cls == "SVD_img2vid")
    samples = res.output(ks)["samples"]
    assert samples.shape == (4, 4, 8, 8) and samples.isfinite().all()


@pytest.mark.parametrize("fixture,first_stage", [(fixtures.WAN_VAE, "WanVAE"), (fixtures.SD_VAE, "AutoencoderKL")], ids=["wan_vae", "sd_vae"])
def test_vae_fixture_detected(runner, fixture, first_stage):
    g = Graph()
    vae = g.add("VAELoader", vae_name=fixture.name)
    res = runner.run(g.prompt())
    assert type(res.output(vae).first_stage_model).__name__ == first_stage


def test_baseline_wan_t2v_graph_end_to_end(runner):
    prompt, ids = graphs.wan_t2v(width=64, height=48, length=9, steps=3)
    res = runner.run(prompt)
    latent = res.output(ids["sampler"])["samples"]
    images = res.output(ids["decode"])
    assert latent.shape == (1, 16, 3, 6, 8)  # [B, C, (9-1)//4+1, 48/8, 64/8]
    assert images.shape == (9, 48, 64, 3)  # VAEDecode flattens video to [frames, H, W, C]
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert set(res.node_seconds) == set(prompt)
