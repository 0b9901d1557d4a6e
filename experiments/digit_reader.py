"""The cell reader of train/quality.py: a tiny ViT that classifies 16x16 cells of digit canvases
into 11 classes (digits 0-9, small or large, and empty; data "digit_cells", train/caption_data.py).

Launch (8 simulated CPU devices, data=8):
  python -m train --config=experiments/digit_reader.py --workdir=/tmp/odyssey/digit_reader \
      --cpu_devices=8
Expect: 97.6% val accuracy on the 792 val cells (the test digits small, large, and empty) after
1,500 steps, 84 s on a shared 2-core CPU (94.1% at step 500, 97.0% at 1,000).
"""

from configs import vit


def get_config(arg: str | None = None):
  c = vit.get_config(arg)
  c.model.update(image_size=16, patch_size=4, num_classes=11)  # 16 tokens of 4x4 pixels
  c.data.update(name="digit_cells", image_size=0)
  c.train.steps = 1500
  c.ckpt.update(every=500, keep=2)
  c.mesh.update(data=8)
  c.eval.update(every=500, steps=11, batch_size=72)  # 11 x 72 = the 792 val cells
  return c
