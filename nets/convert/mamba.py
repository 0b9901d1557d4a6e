"""Hugging Face ``MambaForCausalLM`` (transformers' MambaConfig, model_type "mamba") <-> nets.mamba.

The two compute the same function (tests/convert/test_mamba_hf.py checks logits both ways and
odyssey's step-by-step decode); only layouts differ. torch ``nn.Linear`` stores [out, in], odyssey
kernels are [in, out]; in_proj's 2I outputs are (x, z) halves, odyssey's kernel [E, 2, I]; the
depthwise conv1d weight is [I, 1, C] (cross-correlation over a left-padded window, so tap k meets
u_{t-C+1+k}, as odyssey's conv_kernel [C, I] does); x_proj's outputs are (Δ rank R, B, C) in that
order in both; A_log and D are stored as they are used (A = -exp(A_log), y += D ⊙ u in both).
Odyssey has no in_proj/out_proj biases and always a conv bias, so checkpoints with use_bias=True
or use_conv_bias=False are refused with a sentence rather than imported approximately.
"""

import math

import jax.numpy as jnp
import numpy as np

from nets.convert import dtype_name

WEIGHTS = "model.safetensors"


def model_fields(hf_config: dict) -> dict:
  """odyssey ``config.model`` fields for a transformers MambaConfig dict."""
  if hf_config.get("model_type", "mamba") != "mamba":
    raise ValueError(f"config.json has model_type={hf_config.get('model_type')!r}; this converter "
                     "reads Mamba (model_type 'mamba'), not Mamba-2 or hybrids.")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if k not in hf_config]
  if missing:  # e.g. the original state-spaces repos (d_model, n_layer), not the "-hf" ones
    raise ValueError(f"config.json lacks {missing}; it is not a transformers MambaConfig (use the "
                     "'-hf' conversion of a state-spaces/mamba checkpoint).")
  if hf_config.get("use_bias", False):
    raise ValueError("config.json has use_bias=true (biases on in_proj/out_proj), which odyssey's "
                     "Mamba does not have.")
  if not hf_config.get("use_conv_bias", True):
    raise ValueError("config.json has use_conv_bias=false, but odyssey's Mamba always has a conv "
                     "bias.")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json has hidden_act={hf_config['hidden_act']!r}; odyssey's Mamba "
                     "uses silu.")
  d_model = int(hf_config["hidden_size"])
  expand = hf_config.get("expand", 2)
  if int(expand) != expand:
    raise ValueError(f"config.json has expand={expand}; odyssey's Mamba needs an integer expand.")
  rank = hf_config.get("time_step_rank", "auto")
  # "auto" is HF's ceil(hidden_size / 16), odyssey's dt_rank=0; an explicit rank is kept as given.
  dt_rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
  dtype = dtype_name(hf_config)
  return dict(
      name="mamba", vocab_size=int(hf_config["vocab_size"]),
      num_layers=int(hf_config["num_hidden_layers"]), d_model=d_model,
      d_state=int(hf_config.get("state_size", 16)), d_conv=int(hf_config.get("conv_kernel", 4)),
      expand=int(expand), dt_rank=dt_rank,
      dt_min=float(hf_config.get("time_step_min", 1e-3)),
      dt_max=float(hf_config.get("time_step_max", 1e-1)),
      norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
      residual_in_fp32=bool(hf_config.get("residual_in_fp32", True)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
      # transformers computes in the weights' dtype; so does the imported model.
      dtype=dtype, param_dtype=dtype)


def hf_config(cfg) -> dict:
  """The config.json of ``MambaForCausalLM`` for a ``nets.mamba.Config``."""
  return {
      "architectures": ["MambaForCausalLM"], "model_type": "mamba",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "state_size": cfg.d_state,
      "conv_kernel": cfg.d_conv, "expand": cfg.expand, "intermediate_size": cfg.inner_dim,
      "time_step_rank": cfg.rank, "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max,
      "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
      "tie_word_embeddings": cfg.tie_embeddings, "use_bias": False, "use_conv_bias": True,
      "hidden_act": "silu", "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
  }


def _layer_shapes(cfg) -> dict:
  """HF tensor name suffix (after ``backbone.layers.{i}.``) -> its shape."""
  E, I, N, R, C = cfg.d_model, cfg.inner_dim, cfg.d_state, cfg.rank, cfg.d_conv
  return {"norm.weight": (E,), "mixer.A_log": (I, N), "mixer.D": (I,),
          "mixer.conv1d.weight": (I, 1, C), "mixer.conv1d.bias": (I,),
          "mixer.in_proj.weight": (2 * I, E), "mixer.x_proj.weight": (R + 2 * N, I),
          "mixer.dt_proj.weight": (I, R), "mixer.dt_proj.bias": (I,),
          "mixer.out_proj.weight": (E, I)}


def from_hf(tensors, cfg) -> dict:
  """The odyssey params tree (as ``nets.mamba.Model(cfg).init`` makes it, unboxed, in
  ``cfg.param_dtype``) from a MambaForCausalLM checkpoint."""
  E, I, V = cfg.d_model, cfg.inner_dim, cfg.vocab_size
  pdt = jnp.dtype(cfg.param_dtype)
  shapes = _layer_shapes(cfg)
  layers = []
  for i in range(cfg.num_layers):
    t = {k: tensors.take(f"backbone.layers.{i}.{k}", s) for k, s in shapes.items()}
    layers.append({
        "norm": {"scale": t["norm.weight"]},
        "in_proj": {"kernel": t["mixer.in_proj.weight"].T.reshape(E, 2, I)},  # halves (x, z)
        "conv_kernel": t["mixer.conv1d.weight"][:, 0, :].T,
        "conv_bias": t["mixer.conv1d.bias"],
        "x_proj": {"kernel": t["mixer.x_proj.weight"].T},
        "dt_kernel": t["mixer.dt_proj.weight"].T,
        "dt_bias": t["mixer.dt_proj.bias"],
        "A_log": t["mixer.A_log"],
        "D": t["mixer.D"],
        "out_proj": {"kernel": t["mixer.out_proj.weight"].T},
    })
  stack = lambda *xs: np.stack(xs).astype(pdt)
  params = {
      # Checkpoints older than transformers' rename call the table "embedding" (its load hook).
      "embed": {"embedding": tensors.take(
          "backbone.embedding.weight" if ("backbone.embedding.weight" in tensors and
                                          "backbone.embeddings.weight" not in tensors)
          else "backbone.embeddings.weight", (V, E)).astype(pdt)},
      "layers": _tree_map(stack, layers),
      "final_norm": {"scale": tensors.take("backbone.norm_f.weight", (E,)).astype(pdt)},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": tensors.take("lm_head.weight", (V, E)).T.astype(pdt)}
  elif "lm_head.weight" in tensors:  # a tied checkpoint saved with its (identical) head
    head = tensors.take("lm_head.weight", (V, E))
    if not np.array_equal(head.astype(pdt), params["embed"]["embedding"]):
      raise ValueError(f"{tensors.source} has an lm_head.weight that differs from the embedding, "
                       "but config.json ties them (tie_word_embeddings); set it to false.")
  tensors.check_all_used()
  return params


def _tree_map(fn, trees: list) -> dict:
  """``fn`` over the leaves of same-structured nested dicts (one per layer), leaf by leaf."""
  return {k: (_tree_map(fn, [t[k] for t in trees]) if isinstance(trees[0][k], dict)
              else fn(*[t[k] for t in trees])) for k in trees[0]}


def to_hf(params, cfg) -> dict:
  """{HF tensor name: numpy array} of MambaForCausalLM, layer by layer, in the params' dtype."""
  E, I = cfg.d_model, cfg.inner_dim
  a = np.asarray
  lp = _tree_map(a, [params["layers"]])  # one host copy per stacked leaf, then views per layer
  out = {"backbone.embeddings.weight": a(params["embed"]["embedding"])}
  for i in range(cfg.num_layers):
    p = f"backbone.layers.{i}."
    out[p + "norm.weight"] = lp["norm"]["scale"][i]
    out[p + "mixer.A_log"] = lp["A_log"][i]
    out[p + "mixer.D"] = lp["D"][i]
    out[p + "mixer.conv1d.weight"] = lp["conv_kernel"][i].T[:, None, :]
    out[p + "mixer.conv1d.bias"] = lp["conv_bias"][i]
    out[p + "mixer.in_proj.weight"] = lp["in_proj"]["kernel"][i].reshape(E, 2 * I).T
    out[p + "mixer.x_proj.weight"] = lp["x_proj"]["kernel"][i].T
    out[p + "mixer.dt_proj.weight"] = lp["dt_kernel"][i].T
    out[p + "mixer.dt_proj.bias"] = lp["dt_bias"][i]
    out[p + "mixer.out_proj.weight"] = lp["out_proj"]["kernel"][i].T
  out["backbone.norm_f.weight"] = a(params["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
  return out
