"""transformers ``ViTForImageClassification`` safetensors <-> odyssey ViT (nets/vit.py).

Layouts that differ, and how each maps exactly:
  patch embedding  HF: Conv2d weight [E, C, p, p] on NCHW images; odyssey: a Dense on patches
                   flattened as (row, col, C), kernel [p·p·C, E].
  class token      HF adds position_embeddings[0] to the class token and [1:] to the patches;
                   odyssey adds positions to the patches only. Import folds the class token's
                   position into ``cls`` (the same float32 sum HF computes); export writes ``cls``
                   with a zero position row. Odyssey's fixed sincos2d positions export as the
                   learned table they equal.
  attention        HF: separate query/key/value/output Linears [out, in]; odyssey: fused qkv
                   kernel [E, 3, H, D] and output kernel [H, D, E] (heads are the major half of
                   HF's out dim, as its view(..., H, D)).
  layers           HF: vit.encoder.layer.{i}.*; odyssey: one tree stacked on a leading axis
                   (nn.scan).
Hugging Face's numerics need two odyssey fields: norm_eps (layer_norm_eps, 1e-12) and
gelu_approximate=False (hidden_act="gelu" is the exact erf GELU).
nets/convert/dit.py reuses the layout helpers defined here.
"""

import jax
import numpy as np

from nets import convert, layers, vit

WEIGHTS = "model.safetensors"
ARCHITECTURE = "ViTForImageClassification"
# hidden_act -> odyssey gelu_approximate ("gelu_new" is the same tanh formula as torch's tanh GELU)
_ACTS = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}


# --- Layout helpers (also used by nets/convert/dit.py) -----------------------------------------

def square(hf_config: dict, key: str) -> int:
  """An int or [n, n] config entry as n; a sentence for a non-square value."""
  value = hf_config[key]
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"config.json {key}={value} is not square; odyssey's vision models take "
                       "square images and patches.")
    value = value[0]
  return int(value)


def stored_dtype(hf_config: dict) -> str:
  """The dtype name the config says the weights are stored in: its ``dtype`` (transformers 5)
  or ``torch_dtype`` entry, float32 when it has neither."""
  name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
  name = name.removeprefix("torch.")
  convert.dtype(name)  # a sentence for a dtype odyssey does not load
  return name


def stack(layers: list[dict]) -> dict:
  """Per-layer param trees -> one tree with a leading layer axis (nn.scan's layout)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def layer(stacked: dict, i: int) -> dict:
  """Layer ``i`` of a tree stacked on a leading axis, as numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x)[i], stacked)


def cast(tree: dict, dtype_name: str) -> dict:
  """Every leaf as a numpy array of ``dtype_name`` (the tree Model.init builds has one dtype)."""
  target = convert.dtype(dtype_name)
  return jax.tree.map(lambda x: np.asarray(x).astype(target, copy=False), tree)


def patch_from_hf(w_ExCxPxP) -> np.ndarray:
  """Conv2d patch weight [E, C, p, p] -> Dense kernel [p·p·C, E] for (row, col, C) patches."""
  E, C, p, _ = w_ExCxPxP.shape
  return w_ExCxPxP.transpose(2, 3, 1, 0).reshape(p * p * C, E)


def patch_to_hf(kernel_PxE, p: int, channels: int) -> np.ndarray:
  E = kernel_PxE.shape[-1]
  return np.asarray(kernel_PxE).reshape(p, p, channels, E).transpose(3, 2, 0, 1)


def qkv_from_hf(w_q, b_q, w_k, b_k, w_v, b_v, num_heads: int) -> dict:
  """Three torch Linears ([out, in] weights) -> odyssey's fused {kernel [E, 3, H, D], bias}."""
  E = w_q.shape[1]
  D = w_q.shape[0] // num_heads
  kernel = np.stack([w.T.reshape(E, num_heads, D) for w in (w_q, w_k, w_v)], axis=1)
  bias = np.stack([b.reshape(num_heads, D) for b in (b_q, b_k, b_v)])
  return {"kernel": kernel, "bias": bias}


def qkv_to_hf(qkv: dict) -> list[tuple[np.ndarray, np.ndarray]]:
  """odyssey's fused qkv -> [(weight [H·D, E], bias [H·D]) for q, k, v]."""
  kernel, bias = np.asarray(qkv["kernel"]), np.asarray(qkv["bias"])
  E = kernel.shape[0]
  return [(kernel[:, j].reshape(E, -1).T, bias[j].reshape(-1)) for j in range(3)]


def out_from_hf(w_ExHD, b_E, num_heads: int) -> dict:
  E = w_ExHD.shape[0]
  return {"kernel": w_ExHD.T.reshape(num_heads, -1, E), "bias": b_E}


def out_to_hf(out: dict) -> tuple[np.ndarray, np.ndarray]:
  kernel = np.asarray(out["kernel"])
  return kernel.reshape(-1, kernel.shape[-1]).T, np.asarray(out["bias"])


def linear_from_hf(tensors: convert.Tensors, name: str, n_in: int, n_out: int) -> dict:
  """A torch Linear ``name`` ([out, in] weight + bias) as odyssey Dense {kernel [in, out], bias}."""
  return {"kernel": tensors.take(f"{name}.weight", (n_out, n_in)).T,
          "bias": tensors.take(f"{name}.bias", (n_out,))}


def linear_to_hf(dense: dict) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(dense["kernel"]).T, np.asarray(dense["bias"])


# --- ViT ---------------------------------------------------------------------------------------

def model_fields(hf_config: dict) -> dict:
  """odyssey ``config.model`` fields for a transformers ViT config.json, or one sentence."""
  model_type = hf_config.get("model_type", "vit")
  if model_type != "vit":
    raise ValueError(f"config.json model_type={model_type!r} is not 'vit'; only plain ViT "
                     "converts (DeiT's distillation token has no odyssey equivalent).")
  archs = hf_config.get("architectures") or [ARCHITECTURE]
  if ARCHITECTURE not in archs:
    raise ValueError(f"config.json architectures={archs} has no {ARCHITECTURE}; odyssey's ViT is "
                     "a classifier and needs its classifier head.")
  act = hf_config.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise ValueError(f"config.json hidden_act={act!r} is not one of {sorted(_ACTS)}, the GELUs "
                     "odyssey's ViT MLP computes.")
  if not hf_config.get("qkv_bias", True):
    raise ValueError("config.json qkv_bias=false has no odyssey equivalent: odyssey's ViT "
                     "attention always has query/key/value biases.")
  if hf_config.get("attention_probs_dropout_prob", 0.0):
    raise ValueError(f"config.json attention_probs_dropout_prob="
                     f"{hf_config['attention_probs_dropout_prob']} has no odyssey equivalent "
                     "(odyssey drops out residual branches only); set it to 0 to import.")
  width, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
  head_dim = hf_config.get("head_dim")
  if head_dim is not None and head_dim * heads != width:
    raise ValueError(f"config.json head_dim={head_dim} times num_attention_heads={heads} is not "
                     f"hidden_size={width}; odyssey's ViT splits the width evenly over heads.")
  if "id2label" in hf_config:
    num_classes = len(hf_config["id2label"])
  else:
    num_classes = int(hf_config.get("num_labels", 0))
  if num_classes < 1:
    raise ValueError("config.json has no labels (id2label / num_labels); odyssey's ViT needs a "
                     "classifier head.")
  return dict(
      name="vit", variant="", image_size=square(hf_config, "image_size"),
      channels=int(hf_config.get("num_channels", 3)), num_classes=num_classes,
      patch_size=square(hf_config, "patch_size"), width=width,
      depth=int(hf_config["num_hidden_layers"]), mlp_dim=int(hf_config["intermediate_size"]),
      num_heads=heads, posemb="learn", pool="token",
      dropout=float(hf_config.get("hidden_dropout_prob", 0.0)),
      norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)), gelu_approximate=_ACTS[act],
      dtype=stored_dtype(hf_config), param_dtype=stored_dtype(hf_config))


def _check_exportable(cfg: vit.Config):
  if cfg.pool != "token":
    raise ValueError(f"model.pool={cfg.pool!r} has no {ARCHITECTURE} equivalent: its classifier "
                     "reads the class token (pool='token').")


def hf_config(cfg: vit.Config) -> dict:
  """The transformers config.json for ``cfg`` (ViTForImageClassification)."""
  _check_exportable(cfg)
  labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
  return {
      "architectures": [ARCHITECTURE], "model_type": "vit",
      "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
      "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim,
      "hidden_act": "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu",
      "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps,
      "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels,
      "qkv_bias": True, "encoder_stride": cfg.patch_size, "pooler_act": "tanh",
      "pooler_output_size": cfg.width, "id2label": labels,
      "label2id": {v: int(k) for k, v in labels.items()}, "dtype": cfg.param_dtype,
  }


def from_hf(tensors: convert.Tensors, cfg: vit.Config) -> dict:
  """The odyssey ViT params tree from ViTForImageClassification tensors."""
  E, H, M, K = cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.num_classes
  p, C, S = cfg.patch_size, cfg.channels, cfg.num_patches
  if cfg.posemb != "learn" or cfg.pool != "token":
    raise ValueError("a Hugging Face ViT imports as posemb='learn', pool='token' (model_fields "
                     f"sets both), not posemb={cfg.posemb!r}, pool={cfg.pool!r}.")
  emb = "vit.embeddings."
  cls = tensors.take(emb + "cls_token", (1, 1, E))[0, 0]
  pos = tensors.take(emb + "position_embeddings", (1, S + 1, E))[0]
  params = {
      "embed": {"kernel": patch_from_hf(tensors.take(emb + "patch_embeddings.projection.weight",
                                                     (E, C, p, p))),
                "bias": tensors.take(emb + "patch_embeddings.projection.bias", (E,))},
      # The class token's position folded in, summed in float32 as HF's forward does.
      "cls": cls.astype(np.float32) + pos[0].astype(np.float32),
      "pos_embedding": pos[1:],
  }
  layers = []
  for i in range(cfg.depth):
    pre = f"vit.encoder.layer.{i}."
    att = pre + "attention.attention."
    qkv = [tensors.take(f"{att}{n}.{w}", (E, E) if w == "weight" else (E,))
           for n in ("query", "key", "value") for w in ("weight", "bias")]
    layers.append({
        "norm1": _norm_from_hf(tensors, pre + "layernorm_before", E),
        "attn": {"qkv": qkv_from_hf(*qkv, H),
                 "out": out_from_hf(tensors.take(pre + "attention.output.dense.weight", (E, E)),
                                    tensors.take(pre + "attention.output.dense.bias", (E,)), H)},
        "norm2": _norm_from_hf(tensors, pre + "layernorm_after", E),
        "mlp": {"fc1": linear_from_hf(tensors, pre + "intermediate.dense", E, M),
                "fc2": linear_from_hf(tensors, pre + "output.dense", M, E)},
    })
  params["layers"] = stack(layers)
  params["norm"] = _norm_from_hf(tensors, "vit.layernorm", E)
  params["head"] = linear_from_hf(tensors, "classifier", E, K)
  tensors.check_all_used()
  return cast(params, cfg.param_dtype)


def _norm_from_hf(tensors: convert.Tensors, name: str, E: int) -> dict:
  return {"scale": tensors.take(f"{name}.weight", (E,)), "bias": tensors.take(f"{name}.bias", (E,))}


def to_hf(params: dict, cfg: vit.Config) -> dict:
  """{transformers tensor name: array} for ViTForImageClassification, in the params' dtype."""
  _check_exportable(cfg)
  cls = np.asarray(params["cls"])
  if cfg.posemb == "learn":
    pos = np.asarray(params["pos_embedding"])
  else:  # the fixed positions become the learned table they equal
    g = cfg.image_size // cfg.patch_size
    pos = layers.sincos_2d(g, g, cfg.width).astype(cls.dtype)
  emb = "vit.embeddings."
  out = {
      emb + "cls_token": cls[None, None],
      emb + "position_embeddings": np.concatenate([np.zeros_like(pos[:1]), pos])[None],
      emb + "patch_embeddings.projection.weight":
          patch_to_hf(params["embed"]["kernel"], cfg.patch_size, cfg.channels),
      emb + "patch_embeddings.projection.bias": np.asarray(params["embed"]["bias"]),
  }
  for i in range(cfg.depth):
    lp, pre = layer(params["layers"], i), f"vit.encoder.layer.{i}."
    for n, (w, b) in zip(("query", "key", "value"), qkv_to_hf(lp["attn"]["qkv"])):
      out[f"{pre}attention.attention.{n}.weight"], out[f"{pre}attention.attention.{n}.bias"] = w, b
    for name, (w, b) in ((pre + "attention.output.dense", out_to_hf(lp["attn"]["out"])),
                         (pre + "intermediate.dense", linear_to_hf(lp["mlp"]["fc1"])),
                         (pre + "output.dense", linear_to_hf(lp["mlp"]["fc2"])),
                         (pre + "layernorm_before", _norm_to_hf(lp["norm1"])),
                         (pre + "layernorm_after", _norm_to_hf(lp["norm2"]))):
      out[name + ".weight"], out[name + ".bias"] = w, b
  out["vit.layernorm.weight"], out["vit.layernorm.bias"] = _norm_to_hf(params["norm"])
  out["classifier.weight"], out["classifier.bias"] = linear_to_hf(params["head"])
  return out


def _norm_to_hf(norm: dict) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(norm["scale"]), np.asarray(norm["bias"])
