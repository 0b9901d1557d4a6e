"""Hugging Face ``LlamaForCausalLM`` <-> nets/llama.py (the converter interface: nets/convert).

The numerics agree without any permutation: both use rotate-half RoPE on the same head layout,
scale attention by D**-0.5, repeat each KV head for H/K consecutive query heads, and compute RMSNorm
in float32. Only the weight layouts differ: a torch Linear stores [out, in], odyssey's ``Proj``
kernels are [in..., out...] and its layers are stacked on a leading L axis by nn.scan:

  model.embed_tokens.weight                [V, E]     embed/embedding            [V, E]
  model.layers.{i}.input_layernorm.weight  [E]        layers/attn_norm/scale     [L, E]
  model.layers.{i}.self_attn.q_proj.weight [H*D, E]   layers/q/kernel            [L, E, H, D]
  model.layers.{i}.self_attn.k_proj.weight [K*D, E]   layers/k/kernel            [L, E, K, D]
  model.layers.{i}.self_attn.v_proj.weight [K*D, E]   layers/v/kernel            [L, E, K, D]
  model.layers.{i}.self_attn.o_proj.weight [E, H*D]   layers/o/kernel            [L, H, D, E]
  model.layers.{i}.post_attention_layernorm.weight    layers/mlp_norm/scale      [L, E]
  model.layers.{i}.mlp.gate_proj.weight    [M, E]     layers/gate/kernel         [L, E, M]
  model.layers.{i}.mlp.up_proj.weight      [M, E]     layers/up/kernel           [L, E, M]
  model.layers.{i}.mlp.down_proj.weight    [E, M]     layers/down/kernel         [L, M, E]
  model.norm.weight                        [E]        final_norm/scale           [E]
  lm_head.weight                           [V, E]     lm_head/kernel             [E, V] (untied)
"""

import jax.numpy as jnp
import numpy as np

from nets import llama

WEIGHTS = "model.safetensors"
# transformers' LlamaConfig default when a config.json names no rope_theta.
_DEFAULT_THETA = 10000.0


def _rope_theta(hf: dict) -> float:
  """rope_theta from either config.json layout, refusing RoPE variants odyssey does not compute.

  transformers < 5 writes ``rope_theta`` at the top level and scaling under ``rope_scaling``;
  transformers 5 writes both under ``rope_parameters`` (``rope_type`` "default" when unscaled).
  """
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"this Llama checkpoint uses RoPE scaling type {rope_type!r}, but odyssey's "
                     "Llama implements only plain RoPE (rope_type 'default'), so its outputs "
                     "would differ; convert an unscaled checkpoint instead.")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"this Llama checkpoint rotates only a fraction partial_rotary_factor="
                     f"{partial} of each head, but odyssey's Llama rotates whole heads.")
  return float(rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA)))


def model_fields(hf: dict) -> dict:
  """odyssey ``config.model`` fields for a transformers LlamaConfig dict (``name`` included)."""
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size") if k not in hf]
  if missing:
    raise ValueError(f"this Llama config.json lacks {missing}, which give the model's sizes.")
  if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
    raise ValueError("this Llama checkpoint has attention_bias or mlp_bias set, but odyssey's "
                     "Llama projections have no biases.")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):  # transformers maps both names to the same SiLU
    raise ValueError(f"this Llama checkpoint uses hidden_act={act!r}, but odyssey's Llama MLP is "
                     "SwiGLU (silu).")
  d_model, num_heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or 0
  if head_dim and d_model % num_heads == 0 and head_dim == d_model // num_heads:
    head_dim = 0  # odyssey's default: d_model // num_heads
  # transformers 5 writes "dtype", earlier versions "torch_dtype"; both name the stored weights.
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  dtype = str(dtype).removeprefix("torch.")
  return dict(
      name="llama",
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      mlp_dim=hf["intermediate_size"],
      max_len=hf.get("max_position_embeddings", 2048),
      head_dim=head_dim,
      rope_theta=_rope_theta(hf),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)),
      dtype=dtype,
      param_dtype=dtype,
  )


def _refuse_moe(cfg: llama.Config) -> None:
  if cfg.moe.enabled:
    raise ValueError(f"model.moe.num_experts={cfg.moe.num_experts}: a Llama with MoE layers has "
                     "no LlamaForCausalLM layout; only dense Llama models convert.")


def hf_config(cfg: llama.Config) -> dict:
  """The ``config.json`` of a LlamaForCausalLM with ``cfg``'s architecture."""
  _refuse_moe(cfg)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_size,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": cfg.norm_eps,
      # Both layouts, so transformers 4 (top-level rope_theta) and 5 (rope_parameters) read it.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "attention_dropout": 0.0,
      "initializer_range": cfg.init_std,
      "dtype": cfg.param_dtype,
      # odyssey's vocabularies are not Llama's; the HF defaults (bos=1, eos=2) would be wrong.
      "bos_token_id": None,
      "eos_token_id": None,
      "pad_token_id": None,
      "use_cache": True,
  }


def from_hf(tensors, cfg: llama.Config) -> dict:
  """The ``nets.llama.Model(cfg)`` params tree from a LlamaForCausalLM checkpoint."""
  _refuse_moe(cfg)
  E, H, K, D, M, V, L = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.mlp_dim,
                         cfg.vocab_size, cfg.num_layers)
  param_dtype = jnp.dtype(cfg.param_dtype)

  def stacked(name, hf_shape, to_odyssey):
    """[L, ...] of every layer's ``model.layers.{i}.name``, each mapped by ``to_odyssey``."""
    return np.stack([to_odyssey(tensors.take(f"model.layers.{i}.{name}", hf_shape))
                     for i in range(L)]).astype(param_dtype)

  def linear(out_shape):
    """A torch Linear weight [out, in] -> a Proj kernel [in, *out_shape]."""
    return lambda w: w.T.reshape(w.shape[1], *out_shape)

  embedding_VxE = tensors.take("model.embed_tokens.weight", (V, E)).astype(param_dtype)
  layers = {
      "attn_norm": {"scale": stacked("input_layernorm.weight", (E,), np.asarray)},
      "q": {"kernel": stacked("self_attn.q_proj.weight", (H * D, E), linear((H, D)))},
      "k": {"kernel": stacked("self_attn.k_proj.weight", (K * D, E), linear((K, D)))},
      "v": {"kernel": stacked("self_attn.v_proj.weight", (K * D, E), linear((K, D)))},
      # o contracts the two trailing dims of [B, S, H, D]: [E, H*D] -> [H, D, E]
      "o": {"kernel": stacked("self_attn.o_proj.weight", (E, H * D),
                              lambda w: w.T.reshape(H, D, E))},
      "mlp_norm": {"scale": stacked("post_attention_layernorm.weight", (E,), np.asarray)},
      "gate": {"kernel": stacked("mlp.gate_proj.weight", (M, E), np.transpose)},
      "up": {"kernel": stacked("mlp.up_proj.weight", (M, E), np.transpose)},
      "down": {"kernel": stacked("mlp.down_proj.weight", (E, M), np.transpose)},
  }
  params = {
      "embed": {"embedding": embedding_VxE},
      "layers": layers,
      "final_norm": {"scale": tensors.take("model.norm.weight", (E,)).astype(param_dtype)},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(
        tensors.take("lm_head.weight", (V, E)).T).astype(param_dtype)}
  elif "lm_head.weight" in tensors:
    # Some tied checkpoints still store the shared matrix twice; accept only an exact copy.
    lm_head_VxE = tensors.take("lm_head.weight", (V, E)).astype(param_dtype)
    if not np.array_equal(lm_head_VxE, embedding_VxE):
      raise ValueError(f"{tensors.source} has tie_word_embeddings set but an lm_head.weight that "
                       "differs from model.embed_tokens.weight; set tie_word_embeddings to false "
                       "in its config.json.")
  tensors.check_all_used(ignore=("rotary_emb.inv_freq",))
  return params


def to_hf(params: dict, cfg: llama.Config) -> dict:
  """{LlamaForCausalLM tensor name: array} for ``params``, layer by layer, in the params' dtype."""
  _refuse_moe(cfg)
  layers = params["layers"]
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"])}

  def weight(kernel, n_in):
    """A Proj kernel [in..., out...] -> a torch Linear weight [out, in]."""
    w = np.asarray(kernel)
    n_out = int(np.prod(w.shape[n_in:]))
    return np.ascontiguousarray(w.reshape(-1, n_out).T)

  for i in range(cfg.num_layers):
    prefix = f"model.layers.{i}."
    out[prefix + "input_layernorm.weight"] = np.asarray(layers["attn_norm"]["scale"][i])
    out[prefix + "self_attn.q_proj.weight"] = weight(layers["q"]["kernel"][i], 1)
    out[prefix + "self_attn.k_proj.weight"] = weight(layers["k"]["kernel"][i], 1)
    out[prefix + "self_attn.v_proj.weight"] = weight(layers["v"]["kernel"][i], 1)
    out[prefix + "self_attn.o_proj.weight"] = weight(layers["o"]["kernel"][i], 2)
    out[prefix + "post_attention_layernorm.weight"] = np.asarray(layers["mlp_norm"]["scale"][i])
    out[prefix + "mlp.gate_proj.weight"] = weight(layers["gate"]["kernel"][i], 1)
    out[prefix + "mlp.up_proj.weight"] = weight(layers["up"]["kernel"][i], 1)
    out[prefix + "mlp.down_proj.weight"] = weight(layers["down"]["kernel"][i], 1)
  out["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = weight(params["lm_head"]["kernel"], 1)
  return out
