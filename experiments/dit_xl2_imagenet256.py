"""DiT-XL/2 on ImageNet 256x256 via Stable Diffusion VAE latents (32x32x4): the paper's model.

Data: a latent ArrayRecord dataset in the train.image_data "arrayrecord" layout (int32 label +
float16 [32, 32, 4] latent per record, metadata.json), made offline by encoding ImageNet with the
SD VAE (latents scaled by 0.18215) and writing them with train.image_data.write_arrayrecord. It is
not shipped: point data.path at it.

Launch (the same command on every host of a TPU pod slice or GPU cluster):
  python -m train --config=experiments/dit_xl2_imagenet256.py --workdir=/ckpt/dit_xl2 \
      --config.data.path=/data/imagenet256_latents
Reference (Peebles & Xie): 675M parameters, ~119 GFLOPs per forward, FID-50K 2.27 with guidance
1.5 after 7M steps at batch 256 (with an EMA of the weights, which odyssey does not keep yet).
The model is built and sharded abstractly in tests/train/test_experiments.py.
"""

from configs import diffusion


def get_config(arg: str | None = None):
  c = diffusion.get_config(arg or "model=dit,variant=XL/2")
  c.model.update(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 dtype="bfloat16", param_dtype="float32")
  c.data.update(name="arrayrecord", path="/data/imagenet256_latents", image_size=0,
                num_threads=16, prefetch=64)
  c.diffusion.update(objective="ddpm", schedule="linear", sampler="ddpm", sample_steps=250,
                     cfg_scale=1.5, samples_per_class=4, sample_classes=16)
  # The paper: AdamW, constant lr 1e-4, no weight decay, batch 256.
  c.train.update(steps=400_000, batch_size=256)
  c.opt.update(lr=1e-4, warmup_steps=0, final_lr_frac=1.0, weight_decay=0.0, b2=0.999)
  c.mesh.update(data=-1, fsdp=4)  # parameters and optimizer state over 4-way FSDP groups
  c.ckpt.update(every=5000, keep=5)
  c.eval.update(every=10000, steps=4, batch_size=256)
  c.log.update(every=100)
  return c
