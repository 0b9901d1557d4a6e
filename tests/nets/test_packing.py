"""Document packing (data.packing="documents"): a packed batch's loss and gradients equal those of
its documents run one by one, for Llama (dense and blockwise kernels), Mamba and MEGABYTE; the
cuDNN and Splash kernels get the packed mask on CPU (cuDNN's call through XLA, Splash in the
Pallas interpreter).

The packed batch is made as the data pipeline makes it: a stream doc0 EOS doc1 EOS ... cut into
windows, each window through ``data.document_fields``. The one-by-one reference runs every
segment of every window alone in its own row, from position 0, right-padded with PAD (causal
models never look at the padding, and PAD targets carry no loss), without segment ids; its loss
is the token-weighted mean over all segments. Run with ``-s`` to see the figures.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import llama, mamba, megabyte
from nets.decoder import Config as LlamaConfig
from parallel import attention, kernels
from train import data
from train.tasks import lm

B, S = 2, 32
# Document lengths (bytes, before their EOS): several documents per row, one crossing rows.
LENGTHS = (5, 11, 3, 17, 7, 2, 9, 6)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def packed_batch(lengths=LENGTHS, seq_len=S, rows=B, seed=0) -> dict:
  """Windows of the stream of random documents, with the pipeline's packing fields."""
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, 256, n).astype(np.uint8).tobytes() for n in lengths]
  stream = data.concat_docs(docs).astype(np.int32)
  assert len(stream) >= rows * seq_len + 1, "add documents"
  fields = [data.document_fields(stream[r * seq_len:(r + 1) * seq_len],
                                 stream[r * seq_len + 1:(r + 1) * seq_len + 1])
            for r in range(rows)]
  return {k: np.stack([f[k] for f in fields]) for k in fields[0]}


def one_by_one(batch: dict) -> dict:
  """Every segment of every row alone in a row of its own, from position 0, right-padded."""
  rows = {"inputs": [], "targets": []}
  for r in range(batch["inputs"].shape[0]):
    for seg in np.unique(batch["segment_ids"][r]):
      where = batch["segment_ids"][r] == seg
      for name in rows:
        row = np.full(batch[name].shape[1], data.PAD_ID, np.int32)
        row[:where.sum()] = batch[name][r][where]
        rows[name].append(row)
  return {k: np.stack(v) for k, v in rows.items()}


def in_place(batch: dict) -> dict:
  """Every segment of every row alone at its own offset: the rest of its row is PAD (inputs and
  targets), with the row's segment ids and positions. Equal loss means no document's logits
  depend on another document's bytes."""
  rows = {k: [] for k in batch}
  for r in range(batch["inputs"].shape[0]):
    for seg in np.unique(batch["segment_ids"][r]):
      where = batch["segment_ids"][r] == seg
      for k in rows:
        keep = k in ("segment_ids", "positions")
        rows[k].append(batch[k][r] if keep else np.where(where, batch[k][r], data.PAD_ID))
  return {k: np.stack(v) for k, v in rows.items()}


def max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_packed_equals_one_by_one(model, batch: dict, name: str, reference: dict | None = None):
  """The packed loss and gradients equal the one-by-one reference's (float32 tolerance)."""
  reference = one_by_one(batch) if reference is None else reference
  params, vg = _compiled(model, batch["inputs"].shape)
  (got, got_count), got_grads = vg(params, batch)
  (want, want_count), want_grads = vg(params, reference)
  assert got_count == want_count, (got_count, want_count)
  grad_diff = max_diff(got_grads, want_grads)
  print(f"\n{name}: packed loss {got:.6f}, one by one {want:.6f} over {int(got_count)} "
        f"targets; max |loss diff| {abs(got - want):.1e}, max |grad diff| {grad_diff:.1e} "
        f"(max |grad| {max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads)):.1e})")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)
  # The same rows as one segment each (what data.packing="none" trains on) give other gradients:
  # the comparison can tell packed from unpacked attention.
  unpacked = {**batch, "segment_ids": np.ones_like(batch["segment_ids"]),
              "positions": np.broadcast_to(np.arange(batch["inputs"].shape[1]),
                                           batch["inputs"].shape)}
  _, unpacked_grads = vg(params, unpacked)
  assert max_diff(unpacked_grads, want_grads) > 100 * max(grad_diff, 1e-7)


_COMPILED = {}


def _compiled(model, shape):
  """(params, jitted value_and_grad) per model object: tests sharing a model share compiles."""
  if id(model) not in _COMPILED:
    params = jit(model.init)(jax.random.key(0), jnp.zeros(shape, jnp.int32))["params"]
    _COMPILED[id(model)] = (model, params,
                            jit(jax.value_and_grad(_loss_fn(model), has_aux=True)))
  return _COMPILED[id(model)][1:]


def _loss_fn(model):
  def loss_fn(params, batch):
    extra = (batch["positions"], batch["segment_ids"]) if "segment_ids" in batch else ()
    logits = model.apply({"params": params}, batch["inputs"], *extra)
    total, count = lm.token_loss(logits, batch["targets"])
    return total / count, count
  return loss_fn


# ----------------------------------------------------------------------------- data fields


def test_packed_batch_has_the_pipeline_fields():
  batch = packed_batch()
  # Row 0: doc0 (5 bytes + EOS) is segment 1, doc1 (11 + EOS) segment 2, ...
  np.testing.assert_array_equal(batch["segment_ids"][0, :6], [1] * 6)
  np.testing.assert_array_equal(batch["segment_ids"][0, 6:18], [2] * 12)
  np.testing.assert_array_equal(batch["positions"][0, 4:9], [4, 5, 0, 1, 2])
  eos = batch["inputs"] == data.EOS_ID
  assert np.all(batch["targets"][eos] == data.PAD_ID)
  assert np.all(batch["targets"][~eos] != data.PAD_ID)


# ----------------------------------------------------------------------------- Llama


def llama_cfg():
  return LlamaConfig(vocab_size=288, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                     mlp_dim=64, max_len=64)


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_llama_packed_equals_one_by_one(kernel):
  plan = attention.Plan("local", kernel, 1, 1, 1, block_size=8)
  model = llama.Model(llama_cfg(), attention_fn=attention.attention_fn(plan, None))
  check_packed_equals_one_by_one(model, packed_batch(), f"llama/{kernel}")


# ----------------------------------------------------------------------------- Mamba


def test_mamba_packed_equals_one_by_one():
  """The state and the conv window restart at each document (the sequential and associative
  scans apply the restart alike: tests/nets/test_mamba.py)."""
  cfg = mamba.Config(vocab_size=288, num_layers=1, d_model=16, d_state=4, scan="sequential")
  check_packed_equals_one_by_one(mamba.Model(cfg), packed_batch(), "mamba")


# ----------------------------------------------------------------------------- MEGABYTE


@functools.lru_cache(maxsize=None)
def megabyte_model():
  """Three stages (4-byte global tokens of two 2-byte tokens), the middle one Mamba."""
  cfg = megabyte.Config(vocab_size=288, patch_sizes=(2, 2), d_model=(32, 16, 16),
                        num_layers=(1, 1, 1), num_heads=(2, 2, 2), mlp_dim=(64, 32, 32),
                        blocks=("transformer", "mamba", "transformer"), max_len=64, d_state=4,
                        scan="sequential")
  return megabyte.Model(cfg)


def test_megabyte_packed_equals_one_by_one_when_documents_start_at_global_tokens():
  """Documents of 4k bytes with their EOS start at global-token boundaries: each gets exactly
  the logits it gets alone."""
  batch = packed_batch((3, 7, 11, 3, 15, 7, 3, 11), S, B)
  assert np.all(np.nonzero(batch["positions"] == 0)[1] % 4 == 0)
  check_packed_equals_one_by_one(megabyte_model(), batch, "megabyte/aligned")


def test_megabyte_documents_inside_global_tokens_see_only_themselves():
  """Documents starting inside a global token (or inside a 2-byte token): the packed loss equals
  that of every document alone at its offset, the rest of its row PAD."""
  batch = packed_batch()
  starts = np.nonzero(batch["positions"] == 0)[1]
  assert np.any(starts % 4 == 2) and np.any(starts % 2 == 1)
  check_packed_equals_one_by_one(megabyte_model(), batch, "megabyte/unaligned",
                                 reference=in_place(batch))


# ----------------------------------------------------------------------------- cuDNN and Splash


def packed_mask(seq_len: int, lengths, rows: int = 2):
  """A kernels.Mask of packed documents: per-document positions and segment ids."""
  batch = packed_batch(lengths, seq_len, rows)
  return kernels.make_mask(seq_len, batch=rows, q_positions=jnp.asarray(batch["positions"]),
                           q_segments=jnp.asarray(batch["segment_ids"]))


def qkvw(rows, seq_len, dtype, H=4, K=2, D=16):
  rng = np.random.default_rng(1)
  shapes = [(rows, seq_len, H, D), (rows, seq_len, K, D), (rows, seq_len, K, D),
            (rows, seq_len, H, D)]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def value_and_grads(kernel, q, k, v, w, mask):
  f = lambda q, k, v: jnp.sum(kernel(q, k, v, causal=True, mask=mask).astype(jnp.float32) * w)
  return jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def test_cudnn_gets_the_documents_as_its_mask(monkeypatch):
  """bf16 with segment ids reaches jax.nn.dot_product_attention(implementation="cudnn") with the
  "same segment" mask and its index-causal flag; the same call through XLA equals the dense
  kernel with per-document positions. (cuDNN itself needs an NVIDIA GPU: not run here.)"""
  mask = packed_mask(32, (5, 11, 3, 17, 7, 2, 9, 6))
  q, k, v, w = qkvw(2, 32, jnp.bfloat16)
  calls = []
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **kw: calls.append(kw) or jnp.zeros_like(a[0]))
  kernels.cudnn_attention(q, k, v, causal=True, mask=mask)
  assert calls[0]["implementation"] == "cudnn" and calls[0]["is_causal"]
  np.testing.assert_array_equal(calls[0]["mask"][:, 0], mask.block(causal=False))
  monkeypatch.undo()
  xla = functools.partial(kernels.cudnn_attention, implementation="xla")
  got = value_and_grads(xla, q, k, v, w, mask)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = value_and_grads(kernels.dense_attention, *f32, w, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=0.1, rtol=0.05)


def test_splash_matches_dense_on_packed_documents():
  """Splash (Pallas interpreter) masks causally by index and by its SegmentIds; with contiguous
  documents that equals the dense kernel's per-document positions (two 128-blocks per axis)."""
  mask = packed_mask(256, (40, 100, 7, 60, 30, 80, 200))
  q, k, v, w = qkvw(2, 256, jnp.float32)
  splash = functools.partial(kernels.splash_attention, block_q=128, block_kv=128, interpret=True)
  assert "pallas_call" in str(jax.make_jaxpr(
      lambda q, k, v: splash(q, k, v, causal=True, mask=mask))(q, k, v))
  got = value_and_grads(splash, q, k, v, w, mask)
  want = value_and_grads(kernels.dense_attention, q, k, v, w, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)
