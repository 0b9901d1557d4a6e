"""diffusers ``DiTTransformer2DModel`` safetensors <-> odyssey DiT (nets/dit.py).

Layouts that differ, and how each maps exactly:
  conditioning     diffusers keeps a timestep + label embedder in every block
                   (transformer_blocks.{i}.norm1.emb) and feeds block 0's to the final layer;
                   odyssey shares one, as the facebookresearch/DiT reference. Import requires all
                   blocks' copies to be equal (a sentence otherwise); export writes one per block.
  label table      diffusers always has num_classes + 1 rows (its null "CFG" row); an odyssey model
                   with class_dropout_prob=0 has no null row and exports a zero one.
  positions        diffusers' pos_embed.pos_embed is a fixed, unsaved sin-cos buffer equal to
                   nets.layers.sincos_2d; when a checkpoint does carry it, import checks that.
  final layer      proj_out_1 (shift, scale) and proj_out_2 are odyssey's final_layer adaLN and
                   linear; the unpatchify order (row, col, C) is the same.
  patch embedding, attention, layers: as nets/convert/vit.py.
diffusers' numerics need two odyssey fields: timestep_freq_shift=1 (its Timesteps use
downscale_freq_shift=1, the reference 0) and mlp_norm_eps (its norm3 takes config norm_eps, 1e-5
by default; the reference uses 1e-6). The MLP's tanh GELU ("gelu-approximate") is odyssey's.
"""

import numpy as np

from nets import conditioning, convert, dit, layers
from nets.convert.vit import (cast, layer, linear_from_hf, linear_to_hf, out_from_hf, out_to_hf,
                              patch_from_hf, patch_to_hf, qkv_from_hf, qkv_to_hf, square, stack,
                              stored_dtype)

WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "DiTTransformer2DModel"
DIFFUSERS_VERSION = "0.42.1"  # the version the parity tests load exports with
# diffusers' LabelEmbedding default inside DiT: the table gets its null row (dropout_prob > 0).
CLASS_DROPOUT_PROB = 0.1
TIMESTEP_FREQ_SHIFT = 1.0
# The older diffusers class that DiT checkpoints on the Hub (facebook/DiT-XL-2-256) name: the same
# weights and forward when its config describes a patched ada_norm_zero model without text.
_LEGACY_CLASS = "Transformer2DModel"
_EMBEDDER = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
             "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
             "class_embedder.embedding_table.weight")


def model_fields(hf_config: dict) -> dict:
  """odyssey ``config.model`` fields for a diffusers DiT config.json, or one sentence."""
  class_name = hf_config.get("_class_name", CLASS_NAME)
  if class_name not in (CLASS_NAME, _LEGACY_CLASS):
    raise ValueError(f"config.json _class_name={class_name!r} is not {CLASS_NAME}.")
  # Transformer2DModel defaults to a plain layer_norm block, so there it must be stated.
  if class_name == _LEGACY_CLASS and "norm_type" not in hf_config:
    raise ValueError(f"config.json of a {_LEGACY_CLASS} has no norm_type; only its DiT form "
                     "(norm_type='ada_norm_zero') converts.")
  for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                    ("norm_elementwise_affine", False), ("attention_bias", True),
                    ("cross_attention_dim", None), ("num_vector_embeds", None),
                    ("only_cross_attention", False), ("double_self_attention", False)):
    if hf_config.get(key, want) != want:
      raise ValueError(f"config.json {key}={hf_config[key]!r} has no odyssey DiT equivalent "
                       f"(it needs {want!r}).")
  if hf_config.get("patch_size") is None:
    raise ValueError("config.json has no patch_size; odyssey's DiT is the patched (latent) model.")
  if hf_config.get("num_embeds_ada_norm") is None:
    raise ValueError("config.json num_embeds_ada_norm is null; odyssey's DiT is class-conditional.")
  if hf_config.get("dropout", 0.0):
    raise ValueError(f"config.json dropout={hf_config['dropout']} has no odyssey DiT equivalent "
                     "(it has no dropout); set it to 0 to import.")
  heads, head_dim = int(hf_config["num_attention_heads"]), int(hf_config["attention_head_dim"])
  in_channels = int(hf_config.get("in_channels", 4))
  out_channels = hf_config.get("out_channels") or in_channels
  if out_channels not in (in_channels, 2 * in_channels):
    raise ValueError(f"config.json out_channels={out_channels} is neither in_channels="
                     f"{in_channels} nor twice it (learn_sigma), the outputs odyssey's DiT has.")
  return dict(
      name="dit", variant="", input_size=square(hf_config, "sample_size"),
      in_channels=in_channels, num_classes=int(hf_config["num_embeds_ada_norm"]),
      patch_size=int(hf_config["patch_size"]), hidden_size=heads * head_dim,
      depth=int(hf_config["num_layers"]), num_heads=heads, mlp_ratio=4.0,
      class_dropout_prob=CLASS_DROPOUT_PROB, learn_sigma=out_channels == 2 * in_channels,
      timestep_freq_shift=TIMESTEP_FREQ_SHIFT,
      mlp_norm_eps=float(hf_config.get("norm_eps", 1e-5)), dtype=stored_dtype(hf_config),
      param_dtype=stored_dtype(hf_config))


def _check_exportable(cfg: dit.Config):
  """Raises one sentence for a DiT that diffusers' DiTTransformer2DModel cannot compute."""
  if cfg.moe.enabled:
    raise ValueError(f"model.moe.num_experts={cfg.moe.num_experts}: {CLASS_NAME} has no mixture "
                     "of experts, so a DiT-MoE does not export.")
  if int(cfg.hidden_size * cfg.mlp_ratio) != 4 * cfg.hidden_size:
    raise ValueError(f"model.mlp_ratio={cfg.mlp_ratio} does not export: {CLASS_NAME}'s MLP is "
                     "always 4 x hidden_size wide.")
  if cfg.timestep_freq_shift != TIMESTEP_FREQ_SHIFT:
    raise ValueError(f"model.timestep_freq_shift={cfg.timestep_freq_shift} does not export: "
                     f"{CLASS_NAME} fixes its timestep frequencies at downscale_freq_shift=1 "
                     "(train with model.timestep_freq_shift=1.0 to export exactly).")


def hf_config(cfg: dit.Config) -> dict:
  """The diffusers config.json for ``cfg`` (DiTTransformer2DModel)."""
  _check_exportable(cfg)
  return {
      "_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION,
      "num_attention_heads": cfg.num_heads,
      "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels, "num_layers": cfg.depth, "dropout": 0.0,
      "norm_num_groups": 32, "attention_bias": True, "sample_size": cfg.input_size,
      "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate",
      "num_embeds_ada_norm": cfg.num_classes, "upcast_attention": False,
      "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
      "norm_eps": cfg.mlp_norm_eps,
  }


def from_hf(tensors: convert.Tensors, cfg: dit.Config) -> dict:
  """The odyssey DiT params tree from DiTTransformer2DModel tensors."""
  if cfg.moe.enabled:
    raise ValueError(f"{CLASS_NAME} has no mixture of experts; import with model.moe.num_experts"
                     "=0 (model_fields leaves it unset).")
  E, H, K = cfg.hidden_size, cfg.num_heads, cfg.num_classes
  M = int(E * cfg.mlp_ratio)
  p, C, g = cfg.patch_size, cfg.in_channels, cfg.input_size // cfg.patch_size
  if "pos_embed.pos_embed" in tensors:  # older exports saved the fixed buffer
    pos = tensors.take("pos_embed.pos_embed", (1, g * g, E))[0].astype(np.float32)
    if not np.allclose(pos, layers.sincos_2d(g, g, E), atol=1e-5):
      raise ValueError(f"{tensors.source} pos_embed.pos_embed is not the 2-D sin-cos table "
                       "odyssey's DiT adds (nets.layers.sincos_2d); this checkpoint's positions "
                       "cannot be represented.")
  params = {
      "x_embedder": {"kernel": patch_from_hf(tensors.take("pos_embed.proj.weight", (E, C, p, p))),
                     "bias": tensors.take("pos_embed.proj.bias", (E,))},
  }
  shapes = ((E, conditioning.FREQUENCY_EMBEDDING_SIZE), (E,), (E, E), (E,), (K + 1, E))
  emb = None
  for i in range(cfg.depth):
    here = [tensors.take(f"transformer_blocks.{i}.norm1.emb.{n}", s)
            for n, s in zip(_EMBEDDER, shapes)]
    if emb is None:
      emb = here
      continue
    for n, a, b in zip(_EMBEDDER, emb, here):
      if not np.array_equal(a, b):
        raise ValueError(f"transformer_blocks.{i}.norm1.emb.{n} in {tensors.source} differs from "
                         "transformer_blocks.0's, but odyssey's DiT shares one timestep and label "
                         "embedder across blocks (as the facebookresearch/DiT reference).")
  w1, b1, w2, b2, table = emb
  params["t_embedder"] = {"fc1": {"kernel": w1.T, "bias": b1}, "fc2": {"kernel": w2.T, "bias": b2}}
  # Without label dropout odyssey's table has no null row (see LabelEmbedder).
  params["y_embedder"] = {"embedding": table[:K + (cfg.class_dropout_prob > 0)]}

  layers = []
  for i in range(cfg.depth):
    pre = f"transformer_blocks.{i}."
    qkv = [tensors.take(f"{pre}attn1.to_{n}.{w}", (E, E) if w == "weight" else (E,))
           for n in "qkv" for w in ("weight", "bias")]
    layers.append({
        "adaLN": {"linear": _ada_from_hf(tensors, pre + "norm1.linear", E, 6)},
        "attn": {"qkv": qkv_from_hf(*qkv, H),
                 "out": out_from_hf(tensors.take(pre + "attn1.to_out.0.weight", (E, E)),
                                    tensors.take(pre + "attn1.to_out.0.bias", (E,)), H)},
        "mlp": {"fc1": linear_from_hf(tensors, pre + "ff.net.0.proj", E, M),
                "fc2": linear_from_hf(tensors, pre + "ff.net.2", M, E)},
    })
  params["layers"] = stack(layers)
  params["final_layer"] = {
      "adaLN": {"linear": _ada_from_hf(tensors, "proj_out_1", E, 2)},
      "linear": linear_from_hf(tensors, "proj_out_2", E, p * p * cfg.out_channels)}
  tensors.check_all_used()
  return cast(params, cfg.param_dtype)


def _ada_from_hf(tensors: convert.Tensors, name: str, E: int, n: int) -> dict:
  """A Linear to n·E modulation values ([n·E, E]; chunk j is rows j·E...) as odyssey's AdaLN
  kernel [E, n, E] and bias [n, E]."""
  return {"kernel": tensors.take(f"{name}.weight", (n * E, E)).T.reshape(E, n, E),
          "bias": tensors.take(f"{name}.bias", (n * E,)).reshape(n, E)}


def _ada_to_hf(dense: dict) -> tuple[np.ndarray, np.ndarray]:
  kernel = np.asarray(dense["kernel"])
  return kernel.reshape(kernel.shape[0], -1).T, np.asarray(dense["bias"]).reshape(-1)


def to_hf(params: dict, cfg: dit.Config) -> dict:
  """{diffusers tensor name: array} for DiTTransformer2DModel, in the params' dtype."""
  _check_exportable(cfg)
  table = np.asarray(params["y_embedder"]["embedding"])
  if cfg.class_dropout_prob == 0:  # diffusers' table always has the null row; it is never read
    table = np.concatenate([table, np.zeros_like(table[:1])])
  t = params["t_embedder"]
  emb = (np.asarray(t["fc1"]["kernel"]).T, np.asarray(t["fc1"]["bias"]),
         np.asarray(t["fc2"]["kernel"]).T, np.asarray(t["fc2"]["bias"]), table)
  out = {"pos_embed.proj.weight": patch_to_hf(params["x_embedder"]["kernel"], cfg.patch_size,
                                              cfg.in_channels),
         "pos_embed.proj.bias": np.asarray(params["x_embedder"]["bias"])}
  for i in range(cfg.depth):
    lp, pre = layer(params["layers"], i), f"transformer_blocks.{i}."
    for n, a in zip(_EMBEDDER, emb):  # diffusers keeps a copy of the shared embedder per block
      out[f"{pre}norm1.emb.{n}"] = a
    out[pre + "norm1.linear.weight"], out[pre + "norm1.linear.bias"] = _ada_to_hf(
        lp["adaLN"]["linear"])
    for n, (w, b) in zip("qkv", qkv_to_hf(lp["attn"]["qkv"])):
      out[f"{pre}attn1.to_{n}.weight"], out[f"{pre}attn1.to_{n}.bias"] = w, b
    for name, (w, b) in ((pre + "attn1.to_out.0", out_to_hf(lp["attn"]["out"])),
                         (pre + "ff.net.0.proj", linear_to_hf(lp["mlp"]["fc1"])),
                         (pre + "ff.net.2", linear_to_hf(lp["mlp"]["fc2"]))):
      out[name + ".weight"], out[name + ".bias"] = w, b
  final = params["final_layer"]
  out["proj_out_1.weight"], out["proj_out_1.bias"] = _ada_to_hf(final["adaLN"]["linear"])
  out["proj_out_2.weight"], out["proj_out_2.bias"] = linear_to_hf(final["linear"])
  return out
