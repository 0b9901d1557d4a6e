"""ViT on a folder of images at their native sizes and aspect ratios (NaViT-style packing).

Images keep their size (the longer side downscaled to data.max_size=32 pixels when larger, sides
rounded to multiples of the 4-pixel patch) and are packed, up to 8 per row, into rows of 128
patch tokens; attention stays within each image, positions are factorised row + column tables,
and each image is classified from the mean of its own tokens. A batch is 16 rows.

Launch (8 simulated CPU devices, data=8) on a folder DIR/<class name>/*.png|jpg with 3 classes
(model.num_classes must equal the number of class subfolders):
  python -m train --config=experiments/vit_native_folder.py --workdir=/tmp/odyssey/vit_native \
      --cpu_devices=8 --config.data.path=DIR --config.model.num_classes=3
Expect: the train and val loss fall below ln(classes) within a few hundred steps on an easy
folder; the startup check names any setting the folder cannot pack (docs/data.md).
"""

from configs import vit


def get_config(arg: str | None = None):
  c = vit.get_config(arg)
  c.model.update(variant="digits", image_size=32, channels=3, patch_size=4, posemb="factorized",
                 pool="gap", num_classes=3)
  c.data.update(name="folder", path="", native_size=True, max_size=32, seq_len=128,
                max_images=8, val_fraction=0.2)
  c.train.update(steps=300, batch_size=16)
  c.opt.update(warmup_steps=20)
  c.eval.update(every=100, steps=2, batch_size=8)
  c.ckpt.update(every=100)
  c.mesh.update(data=8)
  return c
