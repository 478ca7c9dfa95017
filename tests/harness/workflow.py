"""UI-format workflows (what the frontend saves and loads) <-> API-format prompts.

The frontend stores widget values as a positional list (``widgets_values``)
in the order of the node's ``INPUT_TYPES``, with one extra value after every
seed that has ``control_after_generate``. Both directions below use the live
node definitions of the booted host, so a converted workflow always matches
the nodes that will execute it.

``adapt_for_fixtures`` rewrites a real-model prompt (Wan 1.3B, SVD-XT, ...)
into one that runs on the tiny test fixtures: model files are swapped, text
and image encoders are replaced by the test-only conditioning node, and sizes
and step counts shrink.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from . import fixtures, motion_modules

FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"


# Nodes of other packs that a bundled workflow uses (AnimateDiff-Evolved). Their
# definitions are written down here so a workflow can be generated and read
# without that pack installed. Tests load the real pack from ../shared/third_party
# (harness/third_party.py) and skip the runs that need it only when it is absent.
EXTERNAL_NODES = {
    "ADE_LoadAnimateDiffModel": {"inputs": [("model_name", (["animatediff_lightning_8step_comfyui.safetensors"], {}))],
                                 "outputs": [("MOTION_MODEL", "MOTION_MODEL_ADE")]},
    "ADE_ApplyAnimateDiffModelSimple": {"inputs": [("motion_model", ("MOTION_MODEL_ADE", {}))], "outputs": [("M_MODELS", "M_MODELS")]},
    "ADE_UseEvolvedSampling": {"inputs": [("model", ("MODEL", {})), ("beta_schedule", (["autoselect", "sqrt_linear (AnimateDiff)", "lcm >> sqrt_linear"], {"default": "autoselect"})),
                                          ("m_models", ("M_MODELS", {}))], "outputs": [("MODEL", "MODEL")]},
}
EXTERNAL_PACKS = {"ADE_": "ComfyUI-AnimateDiff-Evolved"}


def _node_classes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def missing_pack(class_type: str) -> str | None:
    """The name of the pack a node type needs when that pack is not installed, else None."""
    if class_type in _node_classes():
        return None
    return next((pack for prefix, pack in EXTERNAL_PACKS.items() if class_type.startswith(prefix)), None)


def ordered_inputs(class_type: str) -> list[tuple[str, tuple]]:
    """``(name, spec)`` of every input of ``class_type``, required first, in declaration order."""
    if class_type not in _node_classes() and class_type in EXTERNAL_NODES:
        return list(EXTERNAL_NODES[class_type]["inputs"])
    info = _node_classes()[class_type].INPUT_TYPES()
    return [(n, s) for section in ("required", "optional") for n, s in info.get(section, {}).items()]


def is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return bool(options.get("control_after_generate")) or (name in ("seed", "noise_seed") and spec[0] == "INT")


def _outputs(class_type: str) -> list[tuple[str, str]]:
    if class_type not in _node_classes() and class_type in EXTERNAL_NODES:
        return list(EXTERNAL_NODES[class_type]["outputs"])
    cls = _node_classes()[class_type]
    types = list(getattr(cls, "RETURN_TYPES", ()))
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return [(n, t if isinstance(t, str) else "COMBO") for n, t in zip(names, types)]


def ui_to_api(workflow: dict) -> dict:
    """Convert a UI-format workflow to the API prompt ``POST /prompt`` accepts.

    Frontend-only nodes (notes, reroutes) and muted nodes (mode 2) are dropped.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        class_type = node["type"]
        if class_type in FRONTEND_ONLY_NODES or node.get("mode", 0) == 2:
            continue
        linked = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                linked[slot["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in ordered_inputs(class_type):
            if is_widget(spec):
                value = values.pop(0) if values else None
                if has_control_widget(name, spec) and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                    values.pop(0)
                if name in linked:
                    inputs[name] = linked[name]
                elif value is not None:
                    inputs[name] = value
            elif name in linked:
                inputs[name] = linked[name]
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt


def api_to_ui(prompt: dict, *, positions: dict | None = None, titles: dict | None = None, notes: list[dict] | None = None,
              extra: dict | None = None) -> dict:
    """Build a UI-format workflow from an API prompt (used to generate workflows/).

    ``notes`` are ``{"text", "pos", "size"}`` dicts added as Note nodes.
    """
    positions = positions or {}
    ui_nodes, ui_links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id = len(ui_links) + 1
                src_type = _outputs(prompt[value[0]]["class_type"])[value[1]][1]
                ui_links.append([link_id, int(value[0]), value[1], int(node_id), None, src_type, name])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
    for order, (node_id, node) in enumerate(prompt.items()):
        class_type = node["class_type"]
        inputs, widgets = [], []
        for name, spec in ordered_inputs(class_type):
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_widget(spec):
                default = spec[1].get("default") if len(spec) > 1 else None
                if default is None and isinstance(spec[0], list):
                    default = spec[0][0] if spec[0] else None
                widgets.append(default if linked or value is None else value)
                if has_control_widget(name, spec):
                    widgets.append("fixed")
            if linked:
                link_id = next(lk[0] for lk in ui_links if lk[3] == int(node_id) and lk[6] == name)
                slot = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link_id}
                if is_widget(spec):
                    slot["widget"] = {"name": name}
                inputs.append(slot)
        for index, slot in enumerate(inputs):
            for lk in ui_links:
                if lk[0] == slot["link"]:
                    lk[4] = index
        outputs = [{"name": n, "type": t, "links": out_links.get((node_id, i), []), "slot_index": i} for i, (n, t) in enumerate(_outputs(class_type))]
        entry = {"id": int(node_id), "type": class_type, "pos": list(positions.get(node_id, (60 + 320 * (order % 5), 80 + 260 * (order // 5)))),
                 "size": [300, 120], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                 "properties": {"Node name for S&R": class_type}, "widgets_values": widgets}
        if titles and node_id in titles:
            entry["title"] = titles[node_id]
        ui_nodes.append(entry)
    next_id = max(int(k) for k in prompt) + 1
    for note in notes or []:
        ui_nodes.append({"id": next_id, "type": "Note", "pos": list(note.get("pos", (60, -220))), "size": list(note.get("size", (620, 200))),
                         "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                         "widgets_values": [note["text"]], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    return {"last_node_id": next_id - 1, "last_link_id": len(ui_links), "nodes": ui_nodes,
            "links": [lk[:6] for lk in ui_links], "groups": [], "config": {}, "extra": extra or {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / name).read_text())


# ------------------------------------------------------------------ tiny-fixture adaptation

TEXT_ENCODE = {"CLIPTextEncode"}
DROP = {"CLIPLoader", "DualCLIPLoader", "CLIPVisionLoader", "CLIPVisionEncode", "LoadImage", "VAELoader"}
REPLACED = {"ImageOnlyCheckpointLoader", "SVD_img2vid_Conditioning", "Wan22ImageToVideoLatent", "CheckpointLoaderSimple"}
MODEL_FILES = {
    "wan": fixtures.WAN_T2V.name, "wan_i2v": fixtures.WAN_I2V.name, "hunyuan_video": fixtures.HUNYUAN.name,
    "trained_wan": fixtures.TRAINED_WAN_LINK.name,
}
# Two-expert runs (Wan 2.2 A14B): the UNETLoaders, in node order, get two *different* fixtures.
TWO_EXPERTS = {
    "wan_two_stage": ((fixtures.WAN_T2V_LARGE.name, fixtures.WAN_T2V.name), "wan"),
    "trained_wan_two_stage": ((fixtures.WAN_T2V_LARGE.name, fixtures.TRAINED_WAN_LINK.name), "trained_wan"),
}
# AnimateDiff on SD1.5 (needs ComfyUI-AnimateDiff-Evolved): family -> (SD1.5 UNet, its motion module, the
# conditioning family, beta schedule). "animatediff" keeps the workflow's AnimateDiff schedule; the trained
# fixture was trained with SD1.5's own schedule, so "trained_animatediff" uses that ("use existing").
ANIMATEDIFF = {
    "animatediff": (fixtures.SD15_UNET.name, motion_modules.MOTION.name, "sd15", None),
    "trained_animatediff": (fixtures.TRAINED_SD15_LINK.name, motion_modules.MOTION_TRAINED.name, "trained_sd15", "use existing"),
}


def _rewire(prompt: dict, old_id: str, mapping: dict[int, list]) -> None:
    """Point every link to output ``i`` of ``old_id`` at ``mapping[i]``."""
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == old_id and value[1] in mapping:
                node["inputs"][name] = list(mapping[value[1]])


def adapt_for_fixtures(prompt: dict, family: str, *, width: int = 64, height: int = 64, length: int = 9, steps: int = 4,
                       vae: str | None = None, prompt_index: int = 0) -> dict:
    """Rewrite a real-model API prompt so it runs on the tiny fixtures of ``family``.

    * UNETLoader -> the family's tiny file; VAELoader -> the family's tiny VAE;
    * every CLIPTextEncode -> LightCacheTestConditioning (one per encoder, each
      with its own seed; encoders feeding a ``negative`` input use its output 1);
    * SVD's checkpoint loader and image conditioning -> the test UNet loader,
      the SD VAE, the test conditioning and an empty latent of ``length`` frames;
    * Wan 2.2's image-to-video latent -> an empty Wan latent;
    * two-expert runs (``wan_two_stage``/``trained_wan_two_stage``): the UNETLoaders, in node order, get two
      different fixtures (``TWO_EXPERTS``);
    * AnimateDiff (``animatediff``/``trained_animatediff``): the SD1.5 checkpoint loader -> the test
      UNet loader (tiny SD1.5 UNet) and the SD VAE; ``ADE_LoadAnimateDiffModel`` -> the test-only
      ``LightCacheTestMotionModelLoader`` with the UNet's tiny motion module (AnimateDiff-Evolved's
      loader builds SD1.5-sized modules only; see tests/harness/ade_testing_pack); the latent batch
      (the frames) -> ``length``;
    * text/vision encoder loaders and image loaders are removed once unused;
    * latent sizes, lengths and step counts shrink.
    """
    prompt = copy.deepcopy(prompt)
    animatediff = ANIMATEDIFF.get(family)
    experts = list(TWO_EXPERTS[family][0]) if family in TWO_EXPERTS else None
    if experts:
        family = TWO_EXPERTS[family][1]
    vae = vae or (fixtures.SD_VAE.name if family == "svd" or animatediff else fixtures.WAN_VAE.name)
    cond_family = animatediff[2] if animatediff else family
    next_id = max(int(k) for k in prompt) + 1

    def add(class_type: str, **inputs) -> str:
        nonlocal next_id
        node_id, next_id = str(next_id), next_id + 1
        prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    for index, (node_id, node) in enumerate(sorted(prompt.items())):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs.update(unet_name=experts.pop(0) if experts else MODEL_FILES[family], weight_dtype="default")
        elif ct == "VAELoader":
            inputs["vae_name"] = vae
        elif ct in TEXT_ENCODE:
            prompt[node_id] = {"class_type": "LightCacheTestConditioning",
                               "inputs": {"family": cond_family, "seed": index, "prompt_index": prompt_index, "width": width, "height": height, "length": length}}
        elif ct == "EmptyLatentImage" and animatediff:  # AnimateDiff: the batch is the frames
            inputs.update(width=width, height=height, batch_size=length)
        elif ct in ("EmptyHunyuanLatentVideo", "EmptyLatentImage", "EmptyWanLatentVideo"):
            inputs.update({k: v for k, v in dict(width=width, height=height, length=length).items() if k in inputs})
        elif ct == "Wan22ImageToVideoLatent":
            _rewire(prompt, node_id, {0: [add("EmptyHunyuanLatentVideo", width=width, height=height, length=length, batch_size=1), 0]})
        elif ct == "ImageOnlyCheckpointLoader":
            unet = add("LightCacheTestUNetLoader", unet_name=fixtures.SVD_UNET.name, family="SVD_img2vid")
            _rewire(prompt, node_id, {0: [unet, 0], 2: [add("VAELoader", vae_name=vae), 0]})
        elif ct == "CheckpointLoaderSimple" and animatediff:
            unet = add("LightCacheTestUNetLoader", unet_name=animatediff[0], family="SD15")
            _rewire(prompt, node_id, {0: [unet, 0], 2: [add("VAELoader", vae_name=vae), 0]})
        elif ct == "ADE_LoadAnimateDiffModel" and animatediff:
            prompt[node_id] = {"class_type": "LightCacheTestMotionModelLoader", "inputs": {"model_name": animatediff[1]}}
        elif ct == "ADE_UseEvolvedSampling" and animatediff and animatediff[3]:
            inputs["beta_schedule"] = animatediff[3]
        elif ct == "SVD_img2vid_Conditioning":
            cond = add("LightCacheTestConditioning", family="svd", seed=index, prompt_index=0, width=width, height=height, length=length)
            latent = add("EmptyLatentImage", width=width, height=height, batch_size=length)
            _rewire(prompt, node_id, {0: [cond, 0], 1: [cond, 1], 2: [latent, 0]})
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            for key in ("start_at_step", "end_at_step"):  # stage boundaries keep their place in the shorter run
                if isinstance(inputs.get(key), int) and inputs[key] < inputs["steps"]:
                    inputs[key] = round(inputs[key] * steps / inputs["steps"])
            inputs["steps"] = steps
    # The test node's output 1 is the family's negative (the empty prompt for
    # the trained fixtures): wire it wherever an encoder fed a "negative" input.
    replaced = {k for k, n in prompt.items() if n["class_type"] == "LightCacheTestConditioning"}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if name == "negative" and isinstance(value, list) and len(value) == 2 and str(value[0]) in replaced and value[1] == 0:
                node["inputs"][name] = [str(value[0]), 1]
    # Drop everything no longer feeding anything (encoders, loaders, replaced nodes), repeatedly.
    while True:
        used = {str(v[0]) for n in prompt.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2}
        dead = [k for k, n in prompt.items() if k not in used and (n["class_type"] in DROP or n["class_type"] in REPLACED)]
        if not dead:
            return prompt
        for node_id in dead:
            del prompt[node_id]


def to_baseline(prompt: dict) -> dict:
    """The same prompt with ComfyUI's own nodes: KSampler, VAEDecode, no chunk patch.

    LightCache Sampler keeps every KSampler input under the same name, so the
    swap keeps exactly the KSampler inputs; Chunked Model Patch is bypassed.
    """
    prompt = copy.deepcopy(prompt)
    ksampler_inputs = {name for name, _ in ordered_inputs("KSampler")}
    vae_inputs = {name for name, _ in ordered_inputs("VAEDecode")}
    bypass = {k: n["inputs"]["model"] for k, n in prompt.items() if n["class_type"] in ("ChunkedModelPatch", "LightCacheModelPatch")}
    for node_id in bypass:
        del prompt[node_id]
    for node in prompt.values():
        for name, value in list(node["inputs"].items()):
            while isinstance(value, list) and len(value) == 2 and str(value[0]) in bypass:
                value = bypass[str(value[0])]
            node["inputs"][name] = value
        if node["class_type"] == "LightCacheSampler":
            node["class_type"] = "KSampler"
            node["inputs"] = {k: v for k, v in node["inputs"].items() if k in ksampler_inputs}
        elif node["class_type"] == "SlicedVAEDecode":
            node["class_type"] = "VAEDecode"
            node["inputs"] = {k: v for k, v in node["inputs"].items() if k in vae_inputs}
    return prompt
