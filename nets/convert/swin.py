"""transformers ``SwinForImageClassification`` safetensors <-> odyssey Swin (nets/swin.py).

Layouts that differ, and how each maps exactly:
  patch embedding  HF: Conv2d weight [E, C, p, p] on NCHW images; odyssey: a Dense on patches
                   flattened as (row, col, C) (nets/convert/vit.py's helpers).
  attention        HF (the Hub's checkpoint names, which transformers 5 maps to its q_proj/...
                   modules when loading and back when saving): attention.self.query/key/value
                   and attention.output.dense Linears [out, in]; odyssey: fused qkv kernel
                   [c, 3, heads, D] and proj kernel [heads, D, c].
  bias table       the same [(2M−1)², heads] table. Older checkpoints also store the
                   relative_position_index buffer: import checks it equals the index odyssey
                   computes; export does not write it (transformers 5 does not either).
  MLP              intermediate.dense / output.dense -> mlp.fc1 / mlp.fc2.
  patch merging    the same concatenation order and a bias-free [4c -> 2c] Linear.
  blocks           HF: swin.encoder.layers.{stage}.blocks.{block}.*; odyssey: stage{i}_block{j}
                   (unrolled, not stacked), stage{i}_merge for HF's layers.{i}.downsample.
Hugging Face's Swin pools by averaging the final map, as odyssey's does; its hidden_act="gelu"
is the exact erf GELU (gelu_approximate=False).
"""

import numpy as np

from nets import convert, swin
from nets.convert.vit import (cast, linear_from_hf, linear_to_hf, out_from_hf, out_to_hf,
                              patch_from_hf, patch_to_hf, qkv_from_hf, qkv_to_hf, square,
                              stored_dtype)

WEIGHTS = "model.safetensors"
ARCHITECTURE = "SwinForImageClassification"
_ACTS = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}


def model_fields(hf_config: dict) -> dict:
  """odyssey ``config.model`` fields for a transformers Swin config.json, or one sentence."""
  model_type = hf_config.get("model_type", "swin")
  if model_type != "swin":
    raise ValueError(f"config.json model_type={model_type!r} is not 'swin' (Swin V2's scaled "
                     "cosine attention and log-spaced position MLP have no odyssey equivalent).")
  archs = hf_config.get("architectures") or [ARCHITECTURE]
  if ARCHITECTURE not in archs:
    raise ValueError(f"config.json architectures={archs} has no {ARCHITECTURE}; odyssey's Swin is "
                     "a classifier and needs its classifier head.")
  act = hf_config.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise ValueError(f"config.json hidden_act={act!r} is not one of {sorted(_ACTS)}, the GELUs "
                     "odyssey's Swin MLP computes.")
  if not hf_config.get("qkv_bias", True):
    raise ValueError("config.json qkv_bias=false has no odyssey equivalent: odyssey's Swin "
                     "attention always has query/key/value biases.")
  if hf_config.get("use_absolute_embeddings", False):
    raise ValueError("config.json use_absolute_embeddings=true has no odyssey equivalent (the "
                     "paper's Swin uses the relative position bias only).")
  ratio = float(hf_config.get("mlp_ratio", 4.0))
  if ratio != int(ratio):
    raise ValueError(f"config.json mlp_ratio={ratio} is not a whole number, which odyssey's Swin "
                     "needs.")
  labels = hf_config.get("id2label")
  num_classes = len(labels) if labels else int(hf_config.get("num_labels", 0))
  if num_classes < 1:
    raise ValueError("config.json has no labels (id2label / num_labels); odyssey's Swin needs a "
                     "classifier head.")
  return dict(
      name="swin", variant="", image_size=square(hf_config, "image_size"),
      channels=int(hf_config.get("num_channels", 3)), num_classes=num_classes,
      patch_size=square(hf_config, "patch_size"), window_size=int(hf_config["window_size"]),
      embed_dim=int(hf_config["embed_dim"]), depths=tuple(int(d) for d in hf_config["depths"]),
      num_heads=tuple(int(h) for h in hf_config["num_heads"]), mlp_ratio=int(ratio),
      norm_eps=float(hf_config.get("layer_norm_eps", 1e-5)), gelu_approximate=_ACTS[act],
      dtype=stored_dtype(hf_config), param_dtype=stored_dtype(hf_config))


def hf_config(cfg: swin.Config) -> dict:
  """The transformers config.json for ``cfg`` (SwinForImageClassification)."""
  labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
  n = len(cfg.depths)
  return {
      "architectures": [ARCHITECTURE], "model_type": "swin",
      "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels,
      "embed_dim": cfg.embed_dim, "depths": list(cfg.depths), "num_heads": list(cfg.num_heads),
      "window_size": cfg.window_size, "mlp_ratio": float(cfg.mlp_ratio), "qkv_bias": True,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
      "hidden_act": "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu",
      "use_absolute_embeddings": False, "initializer_range": 0.02,
      "layer_norm_eps": cfg.norm_eps, "encoder_stride": cfg.patch_size * 2 ** (n - 1),
      "stage_names": ["stem"] + [f"stage{i + 1}" for i in range(n)],
      "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
      "dtype": cfg.param_dtype,
  }


def _norm_from_hf(tensors, name, c):
  return {"scale": tensors.take(f"{name}.weight", (c,)), "bias": tensors.take(f"{name}.bias", (c,))}


def _norm_to_hf(norm):
  return np.asarray(norm["scale"]), np.asarray(norm["bias"])


def from_hf(tensors: convert.Tensors, cfg: swin.Config) -> dict:
  """The odyssey Swin params tree from SwinForImageClassification tensors."""
  E, p, C = cfg.embed_dim, cfg.patch_size, cfg.channels
  emb = "swin.embeddings."
  params = {
      "patch_embed": {"kernel": patch_from_hf(tensors.take(
          emb + "patch_embeddings.projection.weight", (E, C, p, p))),
          "bias": tensors.take(emb + "patch_embeddings.projection.bias", (E,))},
      "patch_norm": _norm_from_hf(tensors, emb + "norm", E)}
  for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
    c, _, M, _ = cfg.stage(i)
    m = cfg.mlp_ratio * c
    for j in range(depth):
      pre = f"swin.encoder.layers.{i}.blocks.{j}."
      att = pre + "attention."
      qkv = [tensors.take(f"{att}self.{n}.{w}", (c, c) if w == "weight" else (c,))
             for n in ("query", "key", "value") for w in ("weight", "bias")]
      params[f"stage{i}_block{j}"] = {
          "norm1": _norm_from_hf(tensors, pre + "layernorm_before", c),
          "qkv": qkv_from_hf(*qkv, heads),
          "relative_position_bias_table": tensors.take(
              att + "self.relative_position_bias_table", ((2 * M - 1) ** 2, heads)),
          "proj": out_from_hf(tensors.take(att + "output.dense.weight", (c, c)),
                              tensors.take(att + "output.dense.bias", (c,)), heads),
          "norm2": _norm_from_hf(tensors, pre + "layernorm_after", c),
          "mlp": {"fc1": linear_from_hf(tensors, pre + "intermediate.dense", c, m),
                  "fc2": linear_from_hf(tensors, pre + "output.dense", m, c)}}
      index = att + "self.relative_position_index"
      if index in tensors and not np.array_equal(
          tensors.take(index, (M * M, M * M), weight=False), swin.relative_position_index(M)):
        raise ValueError(f"{tensors.source}: {index} is not the relative position index of a "
                         f"{M} x {M} window, which odyssey computes; the checkpoint does not "
                         "match its config.json window_size.")
    if i < len(cfg.depths) - 1:
      pre = f"swin.encoder.layers.{i}.downsample."
      params[f"stage{i}_merge"] = {
          "norm": _norm_from_hf(tensors, pre + "norm", 4 * c),
          "reduction": {"kernel": tensors.take(pre + "reduction.weight", (2 * c, 4 * c)).T}}
  c = cfg.stage(len(cfg.depths) - 1)[0]
  params["norm"] = _norm_from_hf(tensors, "swin.layernorm", c)
  params["head"] = linear_from_hf(tensors, "classifier", c, cfg.num_classes)
  tensors.check_all_used()
  return cast(params, cfg.param_dtype)


def to_hf(params: dict, cfg: swin.Config) -> dict:
  """{transformers tensor name: array} for SwinForImageClassification, in the params' dtype."""
  emb = "swin.embeddings."
  out = {emb + "patch_embeddings.projection.weight":
         patch_to_hf(params["patch_embed"]["kernel"], cfg.patch_size, cfg.channels),
         emb + "patch_embeddings.projection.bias": np.asarray(params["patch_embed"]["bias"])}
  out[emb + "norm.weight"], out[emb + "norm.bias"] = _norm_to_hf(params["patch_norm"])
  for i, depth in enumerate(cfg.depths):
    for j in range(depth):
      bp, pre = params[f"stage{i}_block{j}"], f"swin.encoder.layers.{i}.blocks.{j}."
      att = pre + "attention."
      for n, (w, b) in zip(("query", "key", "value"), qkv_to_hf(bp["qkv"])):
        out[f"{att}self.{n}.weight"], out[f"{att}self.{n}.bias"] = w, b
      out[att + "self.relative_position_bias_table"] = np.asarray(
          bp["relative_position_bias_table"])
      for name, (w, b) in ((att + "output.dense", out_to_hf(bp["proj"])),
                           (pre + "intermediate.dense", linear_to_hf(bp["mlp"]["fc1"])),
                           (pre + "output.dense", linear_to_hf(bp["mlp"]["fc2"])),
                           (pre + "layernorm_before", _norm_to_hf(bp["norm1"])),
                           (pre + "layernorm_after", _norm_to_hf(bp["norm2"]))):
        out[name + ".weight"], out[name + ".bias"] = w, b
    if i < len(cfg.depths) - 1:
      mp, pre = params[f"stage{i}_merge"], f"swin.encoder.layers.{i}.downsample."
      out[pre + "norm.weight"], out[pre + "norm.bias"] = _norm_to_hf(mp["norm"])
      out[pre + "reduction.weight"] = np.asarray(mp["reduction"]["kernel"]).T
  out["swin.layernorm.weight"], out["swin.layernorm.bias"] = _norm_to_hf(params["norm"])
  out["classifier.weight"], out["classifier.bias"] = linear_to_hf(params["head"])
  return out
