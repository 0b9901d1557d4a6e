"""Next-token prediction on tokenized text (train/data.py, train/tokenizer.py): loss, bits per
token and per UTF-8 byte of the text (comparable across tokenizers), multiple-choice tasks
(``eval.tasks``, train/multiple_choice.py), text samples."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nets import moe, registry
from train import data, decoding
from train import multiple_choice as mc
from train import tokenizer as tokenizer_lib


def token_loss(logits_BxSxV, targets_BxS, pad_id: int | None = data.PAD_ID, token_bytes_V=None):
  """Summed float32 cross-entropy over non-padding targets (``pad_id``: the tokenizer's; None:
  every target counts), and their count; given ``token_bytes_V`` (the tokenizer's
  ``token_bytes()``), also the UTF-8 bytes of the text those targets spell, a third value."""
  pad_id = -1 if pad_id is None else pad_id
  weights_BxS = (targets_BxS != pad_id).astype(jnp.float32)
  counted = (weights_BxS,)
  if token_bytes_V is not None:
    counted += (weights_BxS * jnp.asarray(token_bytes_V, jnp.float32)[targets_BxS],)
  # The count depends on the targets alone, so its all-reduce over the batch axes would be
  # independent of the model's layer scan, and XLA:CPU may then run the two in a different order
  # on different devices, each waiting for the other (seen: the expert=4 x data=2 MoE step, one
  # device in the scan's all-gather, seven in this all-reduce; docs/decoding.md). Tied to the
  # logits, it is reduced after the scan on every device (the byte count likewise).
  logits_BxSxV, counted = jax.lax.optimization_barrier((logits_BxSxV, counted))
  losses_BxS = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxSxV.astype(jnp.float32), targets_BxS)
  return (jnp.sum(losses_BxS * counted[0]), *(jnp.sum(c) for c in counted))


def reorder(batch: dict, permutation):
  """Applies the attention plan's sequence order to the batch, with true positions.

  Every op but attention is position-wise and the loss is a sum over tokens, so running the model
  on a permuted sequence (with its original positions for RoPE and causal masking) changes
  nothing but which device holds which tokens. Packed batches carry per-document positions and
  segment ids, which travel with their tokens; the causal mask then compares per-document
  positions within a segment, which orders tokens as their sequence indices do.
  Returns (inputs, targets, positions or None, segment ids or None).
  """
  inputs, targets = batch["inputs"], batch["targets"]
  positions, segment_ids = batch.get("positions"), batch.get("segment_ids")
  if permutation is None:
    return inputs, targets, positions, segment_ids
  if positions is None:
    positions = jnp.broadcast_to(jnp.asarray(permutation, jnp.int32), inputs.shape)
  else:
    positions = positions[:, permutation]
  if segment_ids is not None:
    segment_ids = segment_ids[:, permutation]
  return inputs[:, permutation], targets[:, permutation], positions, segment_ids


_SEQ_AXES = ("act_batch", "act_seq")


class LMTask:
  """``data.packing="documents"`` adds "segment_ids" and "positions" to every batch (train/data.py
  ``document_fields``): attention stays within a document, RoPE counts from each document's start
  and Mamba's state restarts there."""

  def __init__(self, config):
    self.config = config
    self._tokenizer = None
    self._mc_tasks = None  # {task name: (questions, encoded rows)} of eval.tasks, read by check()
    packed = data.packing_of(config.data) == "documents"
    fields = ("inputs", "targets") + (("segment_ids", "positions") if packed else ())
    self.batch_axes = {name: _SEQ_AXES for name in fields}

  @property
  def tokenizer(self):
    """config.data.tokenizer, loaded once (check() reports a bad one in a sentence first)."""
    if self._tokenizer is None:
      self._tokenizer = tokenizer_lib.from_config(self.config)
    return self._tokenizer

  def check(self, model_cfg):
    data.check_data_config(self.config.data)
    if not isinstance(self.config.train.seq_len, int) or self.config.train.seq_len < 1:
      raise ValueError(f"config.train.seq_len={self.config.train.seq_len!r} must be a positive "
                       "integer.")
    tok = self.tokenizer
    if model_cfg.vocab_size < tok.vocab_size:
      where = f"in {tok.path}" if tok.path else "of the byte tokenizer"
      raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                       f"vocabulary ({tok.vocab_size} ids {where}); set --config.model.vocab_size="
                       f"{tok.vocab_size} or larger.")
    multiple = registry.get(self.config.model.name).length_multiple(model_cfg)
    if self.config.train.seq_len % multiple:
      raise ValueError(f"train.seq_len={self.config.train.seq_len} is not a multiple of "
                       f"{multiple}, the bytes in one global patch (model.patch_sizes).")
    if self.config.train.seq_len > model_cfg.max_len:
      raise ValueError(f"train.seq_len={self.config.train.seq_len} exceeds "
                       f"model.max_len={model_cfg.max_len}.")
    s = self.config.get("sample")
    if s is not None and s.max_new_tokens > 0:  # checked now, not after the training run
      try:
        decoding.check_knobs(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                             top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0))
      except ValueError as e:
        raise ValueError(f"config.sample: {e}") from None
    self._mc_tasks = self._read_mc_tasks(self.config.train.seq_len)  # the trained length
    # Last: the data files themselves (shards open, each split fills a batch), before the workdir.
    data.check_splits(self.config.data, seq_len=self.config.train.seq_len, batch_sizes={
        "train": (self.config.train.batch_size, "train.batch_size"),
        "val": (self.config.eval.batch_size, "eval.batch_size")})

  def datasets(self):
    """(train, val); with data.sources the train side mixes the sources and the val side is
    {source name: that source's own val split}, which the loop reports one by one and pooled."""
    c = self.config
    make = lambda data_cfg, split, batch, shuffle, epochs: data.make_dataset(
        data_cfg, split=split, seq_len=c.train.seq_len, global_batch_size=batch, seed=c.seed,
        shuffle=shuffle, num_epochs=epochs)
    train = make(c.data, "train", c.train.batch_size, True, None)
    keys = data.source_keys(c.data)
    if not keys:
      return train, make(c.data, "val", c.eval.batch_size, False, 1)
    return train, {key: make(data.source_config(c.data, key), "val", c.eval.batch_size, False, 1)
                   for key in keys}

  def example_batch(self, batch_size: int) -> dict:
    shape = (batch_size, self.config.train.seq_len)
    batch = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32)}
    if "segment_ids" in self.batch_axes:
      batch["segment_ids"] = np.ones(shape, np.int32)
      batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    return batch

  def model_example_batch(self, batch_size: int, model_cfg) -> dict:
    """Zeros shaped as the model's input: the LM's is the data's."""
    del model_cfg
    return self.example_batch(batch_size)

  def init_args(self, batch):
    return (batch["inputs"],)

  def loss_fn(self, model, permutation=None):
    def loss_fn(params, batch, rng):
      inputs, targets, positions, segment_ids = reorder(batch, permutation)
      logits, aux_loss, aux_metrics = moe.apply_with_aux(
          model, {"params": params}, inputs, positions, segment_ids, rngs={"dropout": rng})
      loss_sum, count = token_loss(logits, targets, self.tokenizer.pad_id)
      ce = loss_sum / jnp.maximum(count, 1.0)
      # "loss" is what is minimised (cross-entropy + MoE auxiliary terms); "ce_loss" alone.
      return ce + aux_loss, {"tokens": count, "ce_loss": ce, **aux_metrics}
    return loss_fn

  def eval_fn(self, model, permutation=None):
    token_bytes_V = self.tokenizer.token_bytes()

    def eval_fn(params, batch):
      inputs, targets, positions, segment_ids = reorder(batch, permutation)
      loss_sum, count, nbytes = token_loss(
          model.apply({"params": params}, inputs, positions, segment_ids), targets,
          self.tokenizer.pad_id, token_bytes_V)
      return {"loss_sum": loss_sum, "tokens": count, "bytes": nbytes}
    return eval_fn

  def summarize(self, sums: dict) -> dict:
    """Per token (``loss``, ``bits_per_token``) and per UTF-8 byte of the evaluated text
    (``bits_per_byte``: the loss summed over tokens / ln 2 / their bytes, so a tokenizer that
    packs more text into a token is not flattered; EOS, BOS and PAD spell no bytes)."""
    loss_sum, tokens, nbytes = (float(sums[k]) for k in ("loss_sum", "tokens", "bytes"))
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "bits_per_token": loss / math.log(2),
            "bits_per_byte": loss_sum / math.log(2) / max(nbytes, 1.0), "tokens": tokens,
            "bytes": nbytes}

  def _read_mc_tasks(self, max_inputs: int) -> dict:
    """eval.tasks' questions, encoded for inputs of at most ``max_inputs`` tokens; one sentence
    for a task that cannot be read or a name given twice."""
    tasks = {}
    for spec in mc.tasks_of(self.config.eval):
      name = mc.task_name(spec)
      try:
        questions = mc.load_task(spec, self.config.data)
        if name in tasks:
          raise ValueError(f"two tasks are named {name!r}; their metrics would collide.")
        tasks[name] = (questions, mc.encode(questions, self.tokenizer, max_len=max_inputs,
                                            where=f"{spec}: "))
      except ValueError as e:
        raise ValueError(f"config.eval.tasks: {e}") from None
    return tasks

  def extra_metrics(self, model, params, *, sharding) -> dict:
    """``mc/<task>/acc`` and ``mc/<task>/acc_norm`` of each eval.tasks task, scored by ``model``
    (the sampling model: any length) in eval.batch_size rows split as ``sharding``'s batch."""
    out = {}
    tok = self.tokenizer
    for name, (questions, rows) in (self._mc_tasks or {}).items():
      values = mc.loglikelihoods(model, params, rows, batch_size=self.config.eval.batch_size,
                                 pad_id=tok.pad_id if tok.pad_id is not None else 0,
                                 sharding=sharding["inputs"])
      result = mc.score(questions, mc.per_question(rows, values))
      out[f"mc/{name}/acc"], out[f"mc/{name}/acc_norm"] = result["acc"], result["acc_norm"]
    return out

  def headline(self, metrics: dict) -> str:
    tasks = "".join(f", {k[len('mc/'):-len('/acc')]} acc {v:.3f}" for k, v in metrics.items()
                    if k.startswith("mc/") and k.endswith("/acc"))
    return f"val loss {metrics['loss']:.4f}, {metrics['bits_per_byte']:.3f} bits/byte{tasks}"

  def source_headline(self, by_source: dict[str, dict]) -> str:
    """Each source's validation bits/byte, briefly, for the line after ``headline``."""
    return ", ".join(f"{key} {m['bits_per_byte']:.3f}" for key, m in by_source.items()) + (
        " bits/byte")

  def throughput_unit(self) -> tuple[str, int]:
    return "tokens", self.config.train.batch_size * self.config.train.seq_len

  def samples(self, model, params, *, step: int, final: bool, workdir: str, data_parallel: int,
              sharding) -> list[str] | None:
    """Text continuing ``sample.prompt`` at the end of the run, appended to samples.txt."""
    s = self.config.sample
    if not final or s.max_new_tokens <= 0:
      return None
    n = -(-s.num_samples // data_parallel) * data_parallel  # the batch must split over the data axes
    tok = self.tokenizer
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    tokens = decoding.sample(model, params, tok.encode(s.prompt), num_samples=n,
                             max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                             seed=self.config.seed, valid_vocab=tok.sample_vocab, pad_id=pad_id,
                             sharding=sharding["inputs"], top_k=s.get("top_k", 0),
                             top_p=s.get("top_p", 1.0))
    texts = [tok.decode(row) for row in tokens[:s.num_samples]]
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "samples.txt"), "a") as f:
        for i, text in enumerate(texts):
          f.write(f"=== sample {i} (step {step}, temperature {s.temperature}) ===\n{text}\n")
    return texts
