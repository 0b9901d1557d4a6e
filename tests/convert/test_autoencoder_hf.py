"""nets/convert/autoencoder.py against diffusers' AutoencoderKL: posterior moments and decoded
images match after import, and an export loads back into diffusers with the same tensors."""

import jax
import ml_collections
import numpy as np
import pytest

from nets import autoencoder, convert
from nets.convert import autoencoder as convert_ae
from tests.convert import parity_import

torch = parity_import("torch")
diffusers = parity_import("diffusers")

TOL = 1e-5
B = 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random fp32 AutoencoderKL (two blocks, so one down- and one upsampler, channels that
  change: shortcut convs) saved as safetensors."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
      latent_channels=4, norm_num_groups=8, sample_size=16).eval()
  with torch.no_grad():  # random norms and biases too, so no parameter hides behind its init
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("vae_hf")
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def test_import_matches_diffusers_and_export_round_trips(hf_dir, tmp_path):
  path, hf = hf_dir
  hf_config, tensors = convert.read_hf(str(path), convert_ae.WEIGHTS)
  cfg = autoencoder.Config.from_config(ml_collections.ConfigDict(
      convert_ae.model_fields(hf_config)))
  assert (cfg.block_out_channels, cfg.image_size, cfg.scaling_factor) == ((16, 32), 16, 0.18215)
  params = convert_ae.from_hf(tensors, cfg)
  x = np.random.default_rng(0).uniform(-1, 1, (B, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((B, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    dist = hf.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    hf_mean, hf_logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (dist.mean, dist.logvar))
    hf_dec = hf.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
  model = autoencoder.Model(cfg)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
      params, x)
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, z)
  for name, got, want in (("mean", mean, hf_mean), ("logvar", logvar, hf_logvar),
                          ("decode", dec, hf_dec.transpose(0, 2, 3, 1))):
    diff = np.max(np.abs(np.asarray(got) - want))
    print(f"AutoencoderKL {name}: max |odyssey - diffusers| = {diff:.2e}")
    assert diff < TOL, name

  exported = tmp_path / "export"
  convert.write_hf(str(exported), convert_ae.hf_config(cfg), convert_ae.to_hf(params, cfg),
                   convert_ae.WEIGHTS)
  reloaded = diffusers.AutoencoderKL.from_pretrained(exported).eval()
  want = hf.state_dict()
  got = reloaded.state_dict()
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


def test_missing_tensor_and_unsupported_configs_are_named(hf_dir):
  path = hf_dir[0]
  hf_config, tensors = convert.read_hf(str(path), convert_ae.WEIGHTS)
  cfg = autoencoder.Config.from_config(ml_collections.ConfigDict(
      convert_ae.model_fields(hf_config)))
  name = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
  kept = {n: np.array(tensors._tensors[n]) for n in tensors.names() if n != name}
  with pytest.raises(convert.MissingTensorError, match=name.replace(".", r"\.")):
    convert_ae.from_hf(convert.Tensors(kept, tensors.source), cfg)
  with pytest.raises(ValueError, match="shift_factor"):
    convert_ae.model_fields({**hf_config, "shift_factor": 0.1159})
  with pytest.raises(ValueError, match="reconstructs its input"):
    convert_ae.model_fields({**hf_config, "out_channels": 1})
