"""transformers' T5EncoderModel (T5, T5 v1.1, Flan-T5, mT5, ByT5 encoders) <-> nets.t5 params.

Not a ``train.convert`` family: the encoder has no task of its own, so an imported one is never a
workdir; a text-conditioned model reads the Hugging Face folder directly (``load_pretrained``,
train/text_encoders.py). A full T5ForConditionalGeneration folder (e.g. google/byt5-small) loads
too: its decoder and lm_head are ignored, as T5EncoderModel.from_pretrained ignores them.
"""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from nets import convert, t5

WEIGHTS = "model.safetensors"
# model_type values whose encoder is this architecture (mT5 is T5 v1.1 with another vocabulary;
# UMT5 gives every layer its own relative bias table, which nets.t5 does not have).
MODEL_TYPES = ("t5", "mt5")
# T5Config's defaults, for keys an (old) config.json leaves out.
_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 layer_norm_epsilon=1e-6, feed_forward_proj="relu")
# What transformers derives from feed_forward_proj: (is_gated_act, dense_act_fn).
_DERIVED = {"relu": (False, "relu"), "gated-gelu": (True, "gelu_new")}
# Tensors of a full encoder-decoder checkpoint that the encoder has no use for.
_NOT_ENCODER = ("decoder.", "lm_head.")


def config_from_hf(hf: dict, source: str = "config.json") -> t5.Config:
  """The nets.t5 Config of a T5 config.json dict; a sentence naming ``source`` (the file) for what
  nets.t5 does not compute."""
  model_type = hf.get("model_type", "t5")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source} has model_type={model_type!r}; the T5 encoder converter reads "
                     f"{list(MODEL_TYPES)}.")
  proj = hf.get("feed_forward_proj", _DEFAULTS["feed_forward_proj"])
  if proj not in _DERIVED:
    raise ValueError(f"{source} has feed_forward_proj={proj!r}; the T5 encoder supports "
                     f"{list(_DERIVED)} (T5 v1.0 and v1.1 / Flan-T5 / ByT5).")
  gated, act = _DERIVED[proj]
  if "is_gated_act" in hf and hf["is_gated_act"] != gated:
    raise ValueError(f"{source} has is_gated_act={hf['is_gated_act']!r}, which contradicts "
                     f"feed_forward_proj={proj!r}.")
  if "dense_act_fn" in hf and hf["dense_act_fn"] != act:
    raise ValueError(f"{source} has dense_act_fn={hf['dense_act_fn']!r}, but "
                     f"feed_forward_proj={proj!r} computes {act!r}; only that pairing is "
                     "supported.")
  if hf.get("is_decoder"):
    raise ValueError(f"{source} describes a T5 decoder (is_decoder=true), not an encoder.")
  fields = {k: hf.get(k, v) for k, v in _DEFAULTS.items()}
  try:
    dtype = convert.dtype_name(hf)
    return t5.Config.from_config({**fields, "dtype": dtype, "param_dtype": dtype})
  except ValueError as e:
    raise ValueError(f"{source} describes a T5 encoder that cannot be built: {e}") from None


def hf_config(cfg: t5.Config) -> dict:
  """The config.json of a transformers T5EncoderModel with ``cfg``'s weights."""
  gated, act = _DERIVED[cfg.feed_forward_proj]
  return {
      "architectures": ["T5EncoderModel"], "model_type": "t5",
      "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
      "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_layers,
      "num_heads": cfg.num_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "feed_forward_proj": cfg.feed_forward_proj, "is_gated_act": gated, "dense_act_fn": act,
      "layer_norm_epsilon": cfg.layer_norm_epsilon, "dropout_rate": 0.0,
      "is_encoder_decoder": False, "is_decoder": False, "use_cache": False,
      "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
      "dtype": cfg.param_dtype,
  }


def _ff_names(cfg: t5.Config) -> tuple[str, ...]:
  return ("wi_0", "wi_1") if cfg.feed_forward_proj == "gated-gelu" else ("wi",)


def params_from_hf(state_dict, cfg: t5.Config) -> dict:
  """The ``nets.t5.Encoder(cfg)`` params tree from T5 tensors: a {name: array} state dict or a
  nets.convert.Tensors (which names the file in its sentences)."""
  tensors = (state_dict if isinstance(state_dict, convert.Tensors)
             else convert.Tensors({k: np.asarray(v) for k, v in state_dict.items()},
                                  "the T5 state dict"))
  E, H, D, M, V, L = (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size,
                      cfg.num_layers)
  param_dtype = jnp.dtype(cfg.param_dtype)

  def stacked(name, hf_shape, to_odyssey):
    """[L, ...] of every layer's ``encoder.block.{i}.name``, each mapped by ``to_odyssey``."""
    return np.stack([to_odyssey(tensors.take(f"encoder.block.{i}.{name}", hf_shape))
                     for i in range(L)]).astype(param_dtype)

  heads_in = lambda w: w.T.reshape(E, H, D)  # torch Linear [H*D, E] -> Proj kernel [E, H, D]
  attention = "layer.0.SelfAttention."
  layers = {
      "attn_norm": {"scale": stacked("layer.0.layer_norm.weight", (E,), np.asarray)},
      **{n: {"kernel": stacked(f"{attention}{n}.weight", (H * D, E), heads_in)}
         for n in ("q", "k", "v")},
      "o": {"kernel": stacked(f"{attention}o.weight", (E, H * D),
                              lambda w: w.T.reshape(H, D, E))},
      "ff_norm": {"scale": stacked("layer.1.layer_norm.weight", (E,), np.asarray)},
      **{n: {"kernel": stacked(f"layer.1.DenseReluDense.{n}.weight", (M, E), np.transpose)}
         for n in _ff_names(cfg)},
      "wo": {"kernel": stacked("layer.1.DenseReluDense.wo.weight", (E, M), np.transpose)},
  }
  # transformers ties encoder.embed_tokens to shared; a checkpoint may hold either or both.
  if "shared.weight" in tensors:
    embedding_VxE = tensors.take("shared.weight", (V, E))
    if "encoder.embed_tokens.weight" in tensors and not np.array_equal(
        tensors.take("encoder.embed_tokens.weight", (V, E)), embedding_VxE):
      raise ValueError(f"{tensors.source} has an encoder.embed_tokens.weight that differs from "
                       "shared.weight; T5 ties the two.")
  else:
    embedding_VxE = tensors.take("encoder.embed_tokens.weight", (V, E))
  params = {
      "embed": {"embedding": embedding_VxE.astype(param_dtype)},
      "rel_bias": tensors.take(f"encoder.block.0.{attention}relative_attention_bias.weight",
                               (cfg.relative_attention_num_buckets, H)).astype(param_dtype),
      "layers": layers,
      "final_norm": {"scale": tensors.take("encoder.final_layer_norm.weight",
                                           (E,)).astype(param_dtype)},
  }
  tensors.check_all_used(ignore_prefixes=_NOT_ENCODER)
  return params


def hf_from_params(params: dict, cfg: t5.Config) -> dict:
  """{T5EncoderModel tensor name: array} for ``params``, as save_pretrained writes them (the tied
  embedding once, as shared.weight), in the params' dtype."""
  layers = params["layers"]

  def weight(kernel, n_in):
    """A Proj kernel [in..., out...] -> a torch Linear weight [out, in]."""
    w = np.asarray(kernel)
    n_out = int(np.prod(w.shape[n_in:]))
    return np.ascontiguousarray(w.reshape(-1, n_out).T)

  out = {"shared.weight": np.asarray(params["embed"]["embedding"])}
  for i in range(cfg.num_layers):
    attention = f"encoder.block.{i}.layer.0.SelfAttention."
    out[f"encoder.block.{i}.layer.0.layer_norm.weight"] = np.asarray(
        layers["attn_norm"]["scale"][i])
    for n in ("q", "k", "v"):
      out[f"{attention}{n}.weight"] = weight(layers[n]["kernel"][i], 1)
    out[f"{attention}o.weight"] = weight(layers["o"]["kernel"][i], 2)
    if i == 0:
      out[f"{attention}relative_attention_bias.weight"] = np.asarray(params["rel_bias"])
    ff = f"encoder.block.{i}.layer.1."
    out[ff + "layer_norm.weight"] = np.asarray(layers["ff_norm"]["scale"][i])
    for n in (*_ff_names(cfg), "wo"):
      out[f"{ff}DenseReluDense.{n}.weight"] = weight(layers[n]["kernel"][i], 1)
  out["encoder.final_layer_norm.weight"] = np.asarray(params["final_norm"]["scale"])
  return out


def load_pretrained(folder: str, dtype_name: str | None = None) -> tuple[t5.Config, dict]:
  """(Config, numpy params) of a Hugging Face T5 folder (config.json + model.safetensors, or
  shards with an index); every missing, malformed or unsupported file is one sentence naming it.
  ``dtype_name`` converts every weight (float32 | bfloat16 | float16); None keeps the stored one."""
  hf, tensors = convert.read_hf(folder, WEIGHTS, dtype_name)
  cfg = config_from_hf(hf, os.path.join(folder, "config.json"))
  stored = dtype_name or tensors.stored_dtype()
  cfg = dataclasses.replace(cfg, dtype=stored, param_dtype=stored)
  return cfg, params_from_hf(tensors, cfg)
