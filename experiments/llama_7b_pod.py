"""A Llama-2-7B-shaped byte-level LM for a pod: 32 layers, d_model 4096, 32 heads, SwiGLU 11008.

Data: an ArrayRecord token corpus written offline with ``python -m train.make_arrayrecord``
(not shipped; point data.path at it). Sequences of 4,096 bytes, 256 per step (1M bytes).

Meshes (validated abstractly with its per-chip memory in tests/train/test_experiments.py):
  * TPU v5p-128 (64 chips, one slice, 16 hosts): fsdp=64 over the slice's ICI; run on every worker
      gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd odyssey && \\
        python -m train --config=experiments/llama_7b_pod.py --workdir=gs://BUCKET/llama_7b \\
        --config.data.path=/data/bytes_corpus"
  * 8 nodes x 8 H100 (SLURM, one process per node): --config.mesh.fsdp=8 so FSDP stays on NVLink
    and the data axis (mesh.dcn.data=-1: the 8 nodes) is the only traffic across nodes.
bf16 compute with float32 master weights and AdamW state; selective recompute.
"""

from configs import lm


def get_config(arg: str | None = None):
  c = lm.get_config(arg or "size=base")
  c.model.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32, mlp_dim=11008,
                 vocab_size=512, max_len=4096, rope_theta=10000.0, dtype="bfloat16",
                 param_dtype="float32")
  c.data.update(name="arrayrecord", path="/data/bytes_corpus", num_threads=16, prefetch=8)
  c.mesh.update(data=-1, fsdp=64)
  c.train.update(steps=100_000, batch_size=256, seq_len=4096, remat="selective")
  c.opt.update(lr=3e-4, warmup_steps=2000, final_lr_frac=0.1, weight_decay=0.1)
  c.ckpt.update(every=1000, keep=3)
  c.log.update(every=50)
  c.eval.update(every=2000, steps=16, batch_size=256)
  c.sample.update(max_new_tokens=256, num_samples=4)
  return c
