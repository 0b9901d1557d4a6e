"""Hugging Face ``Mamba2ForCausalLM`` and ``Qwen3NextForCausalLM`` <-> nets/linear_rnn.py.

One family, two architectures: import picks by config.json's ``model_type``, export by the
odyssey config (``architecture``):

  mamba2      Mamba2ForCausalLM: mixer "mamba2", no attention layers, no MLPs.
  qwen3_next  Qwen3NextForCausalLM with dense MLPs: mixer "gated_deltanet", a gated attention
              layer (q/k RMSNorm, sigmoid output gate, partial RoPE) every attention_every-th
              layer, SwiGLU after every layer.

GLA has no transformers class, a Mamba-2 with attention or MLPs no Mamba2ForCausalLM layout, and
Qwen3-Next's mixture-of-experts layers no counterpart here: each is refused with a sentence.

The numerics agree (tests/convert/test_linear_rnn_hf.py); only layouts differ. torch Linear
weights are [out, in], odyssey kernels [in, out...]; torch depthwise conv1d weights [channels,
1, C] are odyssey's per-projection conv kernels [C, heads, width] (the same tap order, tap C-1
on the current token). The fused projections split as:

  Mamba-2 in_proj rows        z [H·P] | x [H·P] | B [G·N] | C [G·N] | dt [H]
  Mamba-2 conv1d channels     x | B | C (with biases); norm.weight [H·P] = norm/scale [H, P]
  Qwen3-Next in_proj_qkvz     per key head j: q_j [K] | k_j [K] | v [r·V] | z [r·V] of its r
                              value heads j·r .. j·r+r-1 (r = value heads / key heads)
  Qwen3-Next in_proj_ba       per key head j: b [r] | a [r] of the same value heads
  Qwen3-Next conv1d channels  q (all key heads) | k | v (all value heads), no bias
  Qwen3-Next q_proj rows      per attention head: query [D] | output gate [D] -> q, o_gate

Qwen3-Next's RMSNorms (input, post-attention, final, q_norm, k_norm) compute x·(1 + w) and store
w (zero at init); odyssey's compute x·w: import adds one, export subtracts it (in float64, then
one rounding to the parameter dtype, so a bfloat16 import rounds 1 + w to 8 bits). The gated norm
inside Gated DeltaNet is a plain w in both. A Hugging Face layer i is, in a hybrid's stacked
parameters, unit i // k at position i % k (the attention block at k - 1).
"""

import jax.numpy as jnp
import numpy as np

from nets.convert import dtype_name

WEIGHTS = "model.safetensors"
ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}


def model_type(hf: dict) -> str:
  """"mamba2" or "qwen3_next": which architecture a config.json describes, or a sentence."""
  kind = hf.get("model_type")
  if kind not in ARCHITECTURES:
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; the linear_rnn "
                     "converter reads Mamba-2 ('mamba2', Mamba2ForCausalLM) and Qwen3-Next "
                     "('qwen3_next', Qwen3NextForCausalLM).")
  return kind


def _require(hf: dict, keys: tuple[str, ...], what: str) -> None:
  missing = [k for k in keys if k not in hf]
  if missing:
    raise ValueError(f"this {what} config.json lacks {missing}, which give the model's sizes.")


def _mamba2_fields(hf: dict) -> dict:
  _require(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim"),
           "Mamba-2")
  if hf.get("use_bias", False):
    raise ValueError("config.json has use_bias=true (biases on in_proj/out_proj), which "
                     "odyssey's Mamba-2 does not have.")
  if not hf.get("use_conv_bias", True):
    raise ValueError("config.json has use_conv_bias=false, but odyssey's Mamba-2 always has a "
                     "conv bias.")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; odyssey's Mamba-2 uses "
                     "silu.")
  # transformers 5 writes infinity as {"__float__": "Infinity"}, earlier versions as Infinity.
  limit = [float(v["__float__"]) if isinstance(v, dict) else float(v)
           for v in hf.get("time_step_limit", (0.0, float("inf")))]
  if limit != [0.0, float("inf")]:
    raise ValueError(f"config.json has time_step_limit={limit}, but odyssey's Mamba-2 does not "
                     "clamp the time step; only the default (0, inf) converts.")
  E, H, P = int(hf["hidden_size"]), int(hf["num_heads"]), int(hf["head_dim"])
  if E * hf.get("expand", 2) != H * P:
    raise ValueError(f"config.json has hidden_size={E} x expand={hf.get('expand', 2)} != "
                     f"num_heads={H} x head_dim={P}, which Mamba2ForCausalLM requires.")
  dtype = dtype_name(hf)
  return dict(
      name="linear_rnn", mixer="mamba2", vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]), d_model=E, linear_heads=H,
      linear_k_heads=int(hf.get("n_groups", 8)), linear_k_dim=int(hf.get("state_size", 128)),
      linear_v_dim=P, conv_size=int(hf.get("conv_kernel", 4)), mlp_dim=0,
      dt_min=float(hf.get("time_step_min", 1e-3)), dt_max=float(hf.get("time_step_max", 1e-1)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.1)), dtype=dtype, param_dtype=dtype)


def _attention_every(hf: dict, num_layers: int) -> int:
  """k such that layer i is full attention iff (i + 1) % k == 0, from ``layer_types`` or
  ``full_attention_interval`` (transformers' default 4), or a sentence."""
  types = hf.get("layer_types") or [
      "full_attention" if (i + 1) % hf.get("full_attention_interval", 4) == 0
      else "linear_attention" for i in range(num_layers)]
  k = types.index("full_attention") + 1 if "full_attention" in types else 0
  want = ["full_attention" if k and (i + 1) % k == 0 else "linear_attention"
          for i in range(num_layers)]
  if k < 2 or num_layers % k or list(types) != want:
    raise ValueError(f"this Qwen3-Next checkpoint's layer_types {list(types)} are not k - 1 "
                     "linear_attention layers then one full_attention layer, repeated (k >= 2), "
                     "the only interleaving odyssey's linear_rnn hybrid has.")
  return k


def _rope(hf: dict) -> tuple[float, float]:
  """(rope_theta, partial_rotary_factor) from either config.json layout; scaling is refused."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"this Qwen3-Next checkpoint uses RoPE scaling type {rope_type!r}, but "
                     "odyssey implements only plain RoPE (rope_type 'default').")
  return (float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
          float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))))


def _qwen3_next_fields(hf: dict) -> dict:
  _require(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "linear_num_value_heads"), "Qwen3-Next")
  L = int(hf["num_hidden_layers"])
  experts, step = int(hf.get("num_experts", 512)), int(hf.get("decoder_sparse_step", 1))
  sparse = [i for i in range(L) if experts > 0 and i not in (hf.get("mlp_only_layers") or [])
            and (i + 1) % step == 0]
  if sparse:
    raise ValueError(f"this Qwen3-Next checkpoint has mixture-of-experts MLPs (num_experts="
                     f"{experts}) in {len(sparse)} of its {L} layers, but odyssey's linear_rnn "
                     "has dense MLPs only: only checkpoints with num_experts=0 convert.")
  if hf.get("attention_bias", False):
    raise ValueError("this Qwen3-Next checkpoint has attention_bias=true, but odyssey's "
                     "attention projections have no biases.")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"this Qwen3-Next checkpoint uses hidden_act={hf['hidden_act']!r}, but "
                     "odyssey's MLP is SwiGLU (silu).")
  theta, partial = _rope(hf)
  E, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  dtype = dtype_name(hf)
  return dict(
      name="linear_rnn", mixer="gated_deltanet", vocab_size=int(hf["vocab_size"]),
      num_layers=L, d_model=E, linear_heads=int(hf["linear_num_value_heads"]),
      linear_k_heads=int(hf.get("linear_num_key_heads", 16)),
      linear_k_dim=int(hf.get("linear_key_head_dim", 128)),
      linear_v_dim=int(hf.get("linear_value_head_dim", 128)),
      conv_size=int(hf.get("linear_conv_kernel_dim", 4)), mlp_dim=int(hf["intermediate_size"]),
      attention_every=_attention_every(hf, L), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or E // heads), rope_theta=theta, rotary_fraction=partial,
      qk_norm=True, attn_output_gate=True, max_len=int(hf.get("max_position_embeddings", 32768)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype)


def model_fields(hf: dict) -> dict:
  """odyssey ``config.model`` fields for a transformers Mamba2Config or (dense) Qwen3NextConfig
  dict (``name`` included)."""
  return (_mamba2_fields if model_type(hf) == "mamba2" else _qwen3_next_fields)(hf)


def architecture(cfg) -> str:
  """"mamba2" or "qwen3_next": the Hugging Face architecture of a ``nets.linear_rnn.Config``, or a
  sentence saying why it has none."""
  if cfg.mixer == "mamba2":
    if cfg.attention_every or cfg.mlp_dim:
      raise ValueError(f"a Mamba-2 model with attention layers or MLPs (model.attention_every="
                       f"{cfg.attention_every}, model.mlp_dim={cfg.mlp_dim}) has no Hugging Face "
                       "layout: Mamba2ForCausalLM's blocks are the mixer alone.")
    if cfg.linear_heads * cfg.linear_v_dim % cfg.d_model:
      raise ValueError(f"model.linear_heads x linear_v_dim = {cfg.linear_heads * cfg.linear_v_dim}"
                       f" is not a multiple of model.d_model={cfg.d_model}, but "
                       "Mamba2ForCausalLM's inner width is an integer expand x hidden_size.")
    return "mamba2"
  if cfg.mixer == "gated_deltanet":
    if cfg.attention_every < 2 or not (cfg.qk_norm and cfg.attn_output_gate and cfg.mlp_dim):
      raise ValueError("a Gated DeltaNet model converts as Qwen3NextForCausalLM only with its "
                       "layout: model.attention_every >= 2, qk_norm=True, attn_output_gate=True "
                       f"and mlp_dim > 0 (this one has {cfg.attention_every}, {cfg.qk_norm}, "
                       f"{cfg.attn_output_gate}, {cfg.mlp_dim}).")
    return "qwen3_next"
  raise ValueError(f"model.mixer={cfg.mixer!r} has no Hugging Face layout (transformers has no "
                   "such model); only mixers 'mamba2' (Mamba2ForCausalLM) and 'gated_deltanet' "
                   "(Qwen3NextForCausalLM) convert.")


def hf_config(cfg) -> dict:
  """The config.json of the Hugging Face model with ``cfg``'s architecture."""
  arch = architecture(cfg)
  common = {
      "architectures": [ARCHITECTURES[arch]], "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "hidden_act": "silu",
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "dtype": cfg.param_dtype, "use_cache": True,
      # odyssey's vocabularies are not these models'; their default special ids would be wrong.
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  if arch == "mamba2":
    return {**common, "model_type": "mamba2", "num_heads": cfg.linear_heads,
            "head_dim": cfg.linear_v_dim, "n_groups": cfg.key_heads,
            "state_size": cfg.linear_k_dim,
            "expand": cfg.linear_heads * cfg.linear_v_dim // cfg.d_model,
            "conv_kernel": cfg.conv_size, "use_bias": False, "use_conv_bias": True,
            "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
            "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "chunk_size": cfg.chunk}
  k = cfg.attention_every
  return {**common, "model_type": "qwen3_next", "intermediate_size": cfg.mlp_dim,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_size, "max_position_embeddings": cfg.max_len,
          "rms_norm_eps": cfg.norm_eps,
          # Both layouts, so transformers 4 (top level) and 5 (rope_parameters) read them.
          "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                              "partial_rotary_factor": cfg.rotary_fraction},
          "attention_bias": False, "attention_dropout": 0.0,
          "linear_num_key_heads": cfg.key_heads, "linear_num_value_heads": cfg.linear_heads,
          "linear_key_head_dim": cfg.linear_k_dim, "linear_value_head_dim": cfg.linear_v_dim,
          "linear_conv_kernel_dim": cfg.conv_size, "full_attention_interval": k,
          "layer_types": ["full_attention" if (i + 1) % k == 0 else "linear_attention"
                          for i in range(cfg.num_layers)],
          "num_experts": 0, "mlp_only_layers": [], "decoder_sparse_step": 1}


# --- one layer each way -------------------------------------------------------------------------

def _plus_one(w):
  """Qwen3-Next's stored norm weight w -> odyssey's scale 1 + w (float64; cast by the caller)."""
  return np.asarray(w, np.float64) + 1.0


def _minus_one(scale):
  """odyssey's norm scale -> Qwen3-Next's stored 1 + w offset w, in the scale's dtype."""
  scale = np.asarray(scale)
  return (scale.astype(np.float64) - 1.0).astype(scale.dtype)


def _split(w, sizes, axis):
  return np.split(w, np.cumsum(sizes)[:-1], axis=axis)


def _mamba2_layer_from_hf(take, cfg) -> dict:
  E, H, G, N, P, C = (cfg.d_model, cfg.linear_heads, cfg.key_heads, cfg.linear_k_dim,
                      cfg.linear_v_dim, cfg.conv_size)
  I, GN = H * P, G * N
  z, x, b, c, dt = _split(take("mixer.in_proj.weight", (2 * I + 2 * GN + H, E)).T,
                          [I, I, GN, GN, H], axis=1)
  conv = take("mixer.conv1d.weight", (I + 2 * GN, 1, C))[:, 0, :].T  # [C, channels]
  conv_x, conv_b, conv_c = _split(conv, [I, GN, GN], axis=1)
  bias_x, bias_b, bias_c = _split(take("mixer.conv1d.bias", (I + 2 * GN,)), [I, GN, GN], axis=0)
  return {"norm": {"scale": take("norm.weight", (E,))}, "mixer": {
      "z": {"kernel": z.reshape(E, H, P)}, "x": {"kernel": x.reshape(E, H, P)},
      "B": {"kernel": b.reshape(E, G, N)}, "C": {"kernel": c.reshape(E, G, N)},
      "dt": {"kernel": dt},
      "conv_x": {"kernel": conv_x.reshape(C, H, P), "bias": bias_x.reshape(H, P)},
      "conv_B": {"kernel": conv_b.reshape(C, G, N), "bias": bias_b.reshape(G, N)},
      "conv_C": {"kernel": conv_c.reshape(C, G, N), "bias": bias_c.reshape(G, N)},
      "dt_bias": take("mixer.dt_bias", (H,)), "A_log": take("mixer.A_log", (H,)),
      "D": take("mixer.D", (H,)),
      "norm": {"scale": take("mixer.norm.weight", (I,)).reshape(H, P)},
      "out": {"kernel": take("mixer.out_proj.weight", (E, I)).T.reshape(H, P, E)}}}


def _mamba2_layer_to_hf(p) -> dict:
  m = p["mixer"]
  E = m["z"]["kernel"].shape[0]
  flat = lambda k: k.reshape(E, -1)  # [E, heads, width] -> [E, heads·width]
  conv = lambda name: m[name]["kernel"].reshape(m[name]["kernel"].shape[0], -1)
  return {
      "norm.weight": p["norm"]["scale"],
      "mixer.dt_bias": m["dt_bias"], "mixer.A_log": m["A_log"], "mixer.D": m["D"],
      "mixer.conv1d.weight": np.concatenate([conv("conv_x"), conv("conv_B"), conv("conv_C")],
                                            axis=1).T[:, None, :],
      "mixer.conv1d.bias": np.concatenate([m[n]["bias"].reshape(-1)
                                           for n in ("conv_x", "conv_B", "conv_C")]),
      "mixer.in_proj.weight": np.concatenate(
          [flat(m["z"]["kernel"]), flat(m["x"]["kernel"]), flat(m["B"]["kernel"]),
           flat(m["C"]["kernel"]), m["dt"]["kernel"]], axis=1).T,
      "mixer.norm.weight": m["norm"]["scale"].reshape(-1),
      "mixer.out_proj.weight": m["out"]["kernel"].reshape(-1, E).T}


def _mlp_from_hf(take, cfg) -> dict:
  E, M = cfg.d_model, cfg.mlp_dim
  return {"mlp_norm": {"scale": _plus_one(take("post_attention_layernorm.weight", (E,)))},
          "gate": {"kernel": take("mlp.gate_proj.weight", (M, E)).T},
          "up": {"kernel": take("mlp.up_proj.weight", (M, E)).T},
          "down": {"kernel": take("mlp.down_proj.weight", (E, M)).T}}


def _mlp_to_hf(p) -> dict:
  return {"post_attention_layernorm.weight": _minus_one(p["mlp_norm"]["scale"]),
          "mlp.gate_proj.weight": p["gate"]["kernel"].T, "mlp.up_proj.weight": p["up"]["kernel"].T,
          "mlp.down_proj.weight": p["down"]["kernel"].T}


def _gdn_layer_from_hf(take, cfg) -> dict:
  E, N, H, K, V, C = (cfg.d_model, cfg.key_heads, cfg.linear_heads, cfg.linear_k_dim,
                      cfg.linear_v_dim, cfg.conv_size)
  r = H // N
  qkvz = take("linear_attn.in_proj_qkvz.weight", (N * (2 * K + 2 * r * V), E)).T
  q, k, v, z = _split(qkvz.reshape(E, N, 2 * K + 2 * r * V), [K, K, r * V, r * V], axis=2)
  ba = take("linear_attn.in_proj_ba.weight", (N * 2 * r, E)).T.reshape(E, N, 2 * r)
  conv = take("linear_attn.conv1d.weight", (2 * N * K + H * V, 1, C))[:, 0, :].T
  conv_q, conv_k, conv_v = _split(conv, [N * K, N * K, H * V], axis=1)
  return {"norm": {"scale": _plus_one(take("input_layernorm.weight", (E,)))}, "mixer": {
      "q": {"kernel": q}, "k": {"kernel": k},
      # value head j·r + s is the s-th of key head j's group: [E, N, r·V] -> [E, H, V]
      "v": {"kernel": v.reshape(E, H, V)}, "z": {"kernel": z.reshape(E, H, V)},
      "b": {"kernel": ba[..., :r].reshape(E, H)}, "a": {"kernel": ba[..., r:].reshape(E, H)},
      "conv_q": {"kernel": conv_q.reshape(C, N, K)}, "conv_k": {"kernel": conv_k.reshape(C, N, K)},
      "conv_v": {"kernel": conv_v.reshape(C, H, V)},
      "A_log": take("linear_attn.A_log", (H,)), "dt_bias": take("linear_attn.dt_bias", (H,)),
      "norm": {"scale": take("linear_attn.norm.weight", (V,))},
      "out": {"kernel": take("linear_attn.out_proj.weight", (E, H * V)).T.reshape(H, V, E)}},
      **_mlp_from_hf(take, cfg)}


def _gdn_layer_to_hf(p) -> dict:
  m = p["mixer"]
  E, N, K = m["q"]["kernel"].shape
  H, V = m["v"]["kernel"].shape[1:]
  group = lambda w: w.reshape(E, N, -1)  # [E, H(, V)] -> key head j's r value heads [E, N, r(·V)]
  qkvz = np.concatenate([m["q"]["kernel"], m["k"]["kernel"], group(m["v"]["kernel"]),
                         group(m["z"]["kernel"])], axis=2)
  ba = np.concatenate([group(m["b"]["kernel"]), group(m["a"]["kernel"])], axis=2)
  conv = lambda name: m[name]["kernel"].reshape(m[name]["kernel"].shape[0], -1)
  return {
      "input_layernorm.weight": _minus_one(p["norm"]["scale"]),
      "linear_attn.dt_bias": m["dt_bias"], "linear_attn.A_log": m["A_log"],
      "linear_attn.conv1d.weight": np.concatenate([conv("conv_q"), conv("conv_k"),
                                                   conv("conv_v")], axis=1).T[:, None, :],
      "linear_attn.in_proj_qkvz.weight": qkvz.reshape(E, -1).T,
      "linear_attn.in_proj_ba.weight": ba.reshape(E, -1).T,
      "linear_attn.norm.weight": m["norm"]["scale"],
      "linear_attn.out_proj.weight": m["out"]["kernel"].reshape(H * V, E).T,
      **_mlp_to_hf(p)}


def _attention_layer_from_hf(take, cfg) -> dict:
  E, H, Kh, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  qg = take("self_attn.q_proj.weight", (H * 2 * D, E)).T.reshape(E, H, 2, D)
  return {"attn_norm": {"scale": _plus_one(take("input_layernorm.weight", (E,)))},
          "q": {"kernel": qg[:, :, 0]}, "o_gate": {"kernel": qg[:, :, 1]},
          "k": {"kernel": take("self_attn.k_proj.weight", (Kh * D, E)).T.reshape(E, Kh, D)},
          "v": {"kernel": take("self_attn.v_proj.weight", (Kh * D, E)).T.reshape(E, Kh, D)},
          "q_norm": {"scale": _plus_one(take("self_attn.q_norm.weight", (D,)))},
          "k_norm": {"scale": _plus_one(take("self_attn.k_norm.weight", (D,)))},
          "o": {"kernel": take("self_attn.o_proj.weight", (E, H * D)).T.reshape(H, D, E)},
          **_mlp_from_hf(take, cfg)}


def _attention_layer_to_hf(p) -> dict:
  E, H, D = p["q"]["kernel"].shape
  qg = np.stack([p["q"]["kernel"], p["o_gate"]["kernel"]], axis=2)  # [E, H, 2, D]
  return {"input_layernorm.weight": _minus_one(p["attn_norm"]["scale"]),
          "self_attn.q_proj.weight": qg.reshape(E, -1).T,
          "self_attn.k_proj.weight": p["k"]["kernel"].reshape(E, -1).T,
          "self_attn.v_proj.weight": p["v"]["kernel"].reshape(E, -1).T,
          "self_attn.o_proj.weight": p["o"]["kernel"].reshape(H * D, E).T,
          "self_attn.q_norm.weight": _minus_one(p["q_norm"]["scale"]),
          "self_attn.k_norm.weight": _minus_one(p["k_norm"]["scale"]),
          **_mlp_to_hf(p)}


# --- whole models -------------------------------------------------------------------------------

_NAMES = {  # architecture -> (layer prefix, embedding, final norm)
    "mamba2": ("backbone.layers.", "backbone.embeddings.weight", "backbone.norm_f.weight"),
    "qwen3_next": ("model.layers.", "model.embed_tokens.weight", "model.norm.weight")}


def _tree_map(fn, trees: list) -> dict:
  """``fn`` over the leaves of same-structured nested dicts (one per layer), leaf by leaf."""
  return {k: (_tree_map(fn, [t[k] for t in trees]) if isinstance(trees[0][k], dict)
              else fn(*[t[k] for t in trees])) for k in trees[0]}


def from_hf(tensors, cfg) -> dict:
  """The ``nets.linear_rnn.Model(cfg)`` params tree (unboxed, in ``cfg.param_dtype``) from a
  Mamba2ForCausalLM or a dense Qwen3NextForCausalLM checkpoint."""
  arch = architecture(cfg)
  prefix, embed_name, norm_name = _NAMES[arch]
  E, V, L, k = cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.attention_every
  pdt = jnp.dtype(cfg.param_dtype)
  stack = lambda *xs: np.stack(xs).astype(pdt)

  def layer(i, convert):
    return convert(lambda name, shape: tensors.take(f"{prefix}{i}.{name}", shape), cfg)

  if arch == "mamba2":
    layers = _tree_map(stack, [layer(i, _mamba2_layer_from_hf) for i in range(L)])
  else:  # units of k - 1 Gated DeltaNet layers, then one attention layer
    linear = _tree_map(stack, [layer(i, _gdn_layer_from_hf) for i in range(L) if (i + 1) % k])
    layers = {"linear": _tree_map(lambda a: a.reshape(L // k, k - 1, *a.shape[1:]), [linear]),
              "attention": _tree_map(stack, [layer(i, _attention_layer_from_hf)
                                             for i in range(k - 1, L, k)])}
  if arch == "mamba2" and embed_name not in tensors and "backbone.embedding.weight" in tensors:
    embed_name = "backbone.embedding.weight"  # checkpoints older than transformers' rename
  final = tensors.take(norm_name, (E,))
  params = {"embed": {"embedding": tensors.take(embed_name, (V, E)).astype(pdt)},
            "layers": layers,
            "final_norm": {"scale": (final if arch == "mamba2" else _plus_one(final)).astype(pdt)}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(
        tensors.take("lm_head.weight", (V, E)).T).astype(pdt)}
  elif "lm_head.weight" in tensors:  # a tied checkpoint saved with its (identical) head
    if not np.array_equal(tensors.take("lm_head.weight", (V, E)).astype(pdt),
                          params["embed"]["embedding"]):
      raise ValueError(f"{tensors.source} has an lm_head.weight that differs from the "
                       "embedding, but config.json ties them (tie_word_embeddings); set it to "
                       "false.")
  # transformers skips Qwen3-Next's multi-token-prediction head (mtp.*) on load; so does odyssey.
  tensors.check_all_used(ignore=("rotary_emb.inv_freq",), ignore_prefixes=("mtp.",))
  return params


def to_hf(params, cfg) -> dict:
  """{Hugging Face tensor name: numpy array}, layer by layer, in the params' dtype."""
  arch = architecture(cfg)
  prefix, embed_name, norm_name = _NAMES[arch]
  L, k = cfg.num_layers, cfg.attention_every
  lp = _tree_map(np.asarray, [params["layers"]])  # one host copy per stacked leaf
  out = {embed_name: np.asarray(params["embed"]["embedding"])}
  for i in range(L):
    if arch == "mamba2":
      layer = _mamba2_layer_to_hf(_tree_map(lambda a: a[i], [lp]))
    elif (i + 1) % k:
      layer = _gdn_layer_to_hf(_tree_map(lambda a: a[i // k, i % k], [lp["linear"]]))
    else:
      layer = _attention_layer_to_hf(_tree_map(lambda a: a[i // k], [lp["attention"]]))
    out.update({f"{prefix}{i}.{name}": np.ascontiguousarray(a) for name, a in layer.items()})
  final = np.asarray(params["final_norm"]["scale"])
  out[norm_name] = final if arch == "mamba2" else _minus_one(final)
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
  return out
