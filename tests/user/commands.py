"""Every command the README and docs/*.md show, and the test that runs it.

tests/user/test_registry.py collects the commands from the docs (each fenced code block's command
lines, backslash continuations joined, and inline `code` that starts like a command) and fails
when one is missing here, when an entry here is no longer documented, or when a named test does
not exist. A documented command is written here as the docs show it (continuations joined,
spaces collapsed, a trailing `# comment` dropped); tests/user tests take the command they run
from this table through :func:`doc`, substitute the placeholders with tmp paths and append only
step-count and size overrides.

``Runs(test)``: the test runs the command (a synopsis with ``[optional]`` parts or ``a|b``
alternatives: the note says which forms). ``CannotRun(why, instead)``: the command cannot run on
this 2-core CPU machine; ``instead`` names the test that checks what can be checked here.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Runs:
  test: str  # "path/to/test_file.py::test_name", from the repository root
  note: str = ""


@dataclasses.dataclass(frozen=True)
class CannotRun:
  why: str
  instead: str  # the alternative check, "path::test_name"


U = "tests/user/"
MAKE_RUN = U + "test_make_run.py::test_make_run_trains_evaluates_checkpoints_and_samples"
RECIPE = U + "test_make_run.py::test_make_run_recipe_is_the_documented_command"
GENERATE = U + "test_make_run.py::test_generate_on_the_make_run_workdir"
ROUND_TRIP = U + "test_make_run.py::test_export_then_import_then_generate_the_same_text"
FINETUNE = U + "test_make_run.py::test_finetune_from_the_imported_workdir_as_written"
LAUNCH = U + "test_launch.py::test_launch_two_processes_trains_and_samples"
ULYSSES = U + "test_launch.py::test_ulysses_sequence_parallel_command"
LM_EXPERIMENT = U + "test_lm_experiments.py::test_lm_experiment_trains_evaluates_and_samples"
IMAGE_EXPERIMENT = U + "test_image_experiments.py::test_image_experiment_trains_evaluates_and_samples"
VISION_EXPERIMENT = U + ("test_vision_experiments.py::"
                         "test_vision_experiment_trains_evaluates_and_samples")
NATIVE = U + "test_image_experiments.py::test_native_folder_experiment_trains_and_evaluates"
SAMPLE = U + "test_image_experiments.py::test_train_sample_on_the_dit_digits_workdir"
AGREEMENT = U + "test_image_experiments.py::test_digits_agreement_bench_on_the_trained_workdirs"
ARRAYRECORD = U + "test_arrayrecord.py::test_make_arrayrecord_writes_shards"
ARRAYRECORD_TRAIN = U + "test_arrayrecord.py::test_train_on_the_arrayrecord_output_as_written"
BPE_DATA = U + "test_arrayrecord.py::test_train_a_tokenizer_then_convert_jsonl_with_it_as_written"
EVALUATE = U + "test_make_run.py::test_evaluate_on_the_make_run_workdir"
MIXTURE = U + "test_arrayrecord.py::test_train_on_a_mixture_as_written"
POD_CHECK = "tests/train/test_experiments.py::test_pod_configs_fit_the_chip_memory"
SFT_PATH = U + "test_sft.py::test_import_sft_generate_export_and_transformers_agree"
VAE = "tests/train/test_autoencoder_task.py::"
T2I = U + "test_t2i.py::"
VQ = "tests/train/test_vqvae_task.py::"

DOCUMENTED = {
    # Quick start, Results, Experiments.
    "make run": Runs(MAKE_RUN, "make run ARGS='--config.train.steps=20' WORKDIR=tmp"),
    "make run WORKDIR=DIR": Runs(MAKE_RUN),
    "make run ARGS='--config.train.steps=30'": Runs(MAKE_RUN, "with steps=20"),
    "make test": CannotRun(
        "it is the suite itself (this test runs inside it); CI runs it",
        U + "test_make_run.py::test_make_test_and_make_clean_recipes"),
    "make clean": CannotRun(
        "it deletes workdirs/ of the shared checkout, where other runs may live",
        U + "test_make_run.py::test_make_test_and_make_clean_recipes"),
    # The CLI (README) and docs/config.md, docs/workdir.md.
    "python -m train --config=FILE[:ARG] --workdir=DIR [--config.<path>=<value> ...]": Runs(
        RECIPE, "synopsis: make run's recipe and every user-tier python -m train run are forms of "
        "it"),
    "python -m train --config=... --workdir=DIR": Runs(RECIPE, "as the synopsis above"),
    "python -m train.convert --dst": Runs(ROUND_TRIP, "the flag; the refusal of an occupied "
                                          "--dst: tests/convert/test_convert_cli.py"),
    "python -m train": Runs(MAKE_RUN, "the program; make run's recipe runs it (see the recipe test)"),
    "python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR "
    "[--config.train.steps=300] [--config.mesh.data=4 ...] [--cpu_devices=8]": Runs(
        RECIPE, "synopsis: make run's recipe is this command with --cpu_devices=8 and "
        "--config.train.steps via ARGS; other --config overrides: the experiment tests"),
    "python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR --cpu_devices=8":
        Runs(RECIPE, "make run's recipe is exactly this command (asserted), run by the make-run "
             "test"),
    "python -m train.convert": Runs(ROUND_TRIP),
    "python -m train.convert --from=hf|odyssey --family=llama|vit|swin|mamba|dit|linear_rnn --src=DIR "
    "--dst=DIR": Runs(ROUND_TRIP, "synopsis: both directions with --family=llama; the other "
                      "families' import/export are tests/convert/test_{vit,swin,mamba,dit,linear_rnn}"
                      "_hf.py (library parity)"),
    "python -m train.generate": Runs(GENERATE),
    "python -m train.generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] --max_new_tokens=N":
        Runs(GENERATE, "synopsis: one prompt, then two"),
    "python -m train.sample": Runs(SAMPLE),
    "python -m train.sample --workdir=DIR --classes=0,3,7 --cfg=4 --steps=50": Runs(SAMPLE),
    # Multi-host.
    "python -m train.launch": Runs(LAUNCH),
    "python -m train.launch --num_processes=2 --devices_per_process=4 -- "
    "--config=experiments/lm_stdlib.py:size=tiny --workdir=/tmp/odyssey/lm2": Runs(LAUNCH),
    "cd odyssey && .venv/bin/python -m train --config=experiments/llama_7b_pod.py "
    "--workdir=gs://$BUCKET/llama_7b --config.data.path=/data/bytes_corpus\"": CannotRun(
        "a TPU v5p-128 pod slice (64 chips, 6.48B parameters) and a GCS bucket",
        POD_CHECK),
    "srun .venv/bin/python -m train --config=experiments/llama_7b_pod.py "
    "--workdir=/shared/ckpt/llama_7b --config.mesh.fsdp=8": CannotRun(
        "a SLURM cluster of 8 nodes x 8 H100 GPUs", POD_CHECK),
    # Sequence parallelism.
    "python -m train --config=experiments/lm_stdlib.py:size=tiny --workdir=DIR --cpu_devices=8 "
    "--config.mesh.data=2 --config.mesh.fsdp=1 --config.mesh.tensor=1 --config.mesh.seq=4 "
    "--config.parallel.seq_strategy=ulysses": Runs(ULYSSES),
    "python -m bench.seq_parallel": CannotRun(
        "a full run takes ~5 min on 2 cores, --quick 2.5-4 min, over this tier's budget, and no "
        "test_bench_* runs it; the figures in bench/results/seq_parallel.* are from a manual run",
        U + "test_registry.py::test_bench_seq_parallel_starts_and_parses_its_flags"),
    # Benchmarks: tests/train/test_bench_*.py run them in --quick mode.
    "python -m bench.mfu": Runs("tests/train/test_bench_mfu.py::"
                                "test_quick_mfu_bench_writes_sane_figures",
                                "--quick --steps=1 --cases=llama,mamba,gated_deltanet,mamba2"),
    "python -m bench.state_passing": Runs("tests/train/test_bench_state_passing.py::"
                                          "test_quick_state_passing_bench_writes_consistent_"
                                          "figures", "--quick, in process through its main()"),
    "python -m bench.moe": Runs("tests/train/test_bench_moe.py::"
                                "test_writes_json_and_markdown_with_the_machine", "--quick"),
    "python -m bench.compile": Runs("tests/train/test_bench_perf.py::"
                                    "test_writes_json_markdown_and_plot", "--quick"),
    "python -m bench.host": Runs("tests/train/test_bench_perf.py::"
                                 "test_writes_json_markdown_and_plot", "--quick"),
    "python -m bench.digits_agreement --vit_workdir=VIT_DIR --dit_workdir=DIT_DIR": Runs(
        AGREEMENT, "with --per_class and --out lowered/redirected (the default --out is "
        "bench/results, the committed figures)"),
    # Experiments (MoE, vision and diffusion, byte models).
    "python -m train --config=experiments/moe_lm_stdlib.py --workdir=DIR --cpu_devices=8":
        Runs(LM_EXPERIMENT),
    "python -m train --config=experiments/dit_moe_digits.py --workdir=DIR --cpu_devices=8":
        Runs(IMAGE_EXPERIMENT),
    "python -m train --config=experiments/vit_digits.py --workdir=DIR --cpu_devices=8":
        Runs(IMAGE_EXPERIMENT),
    "python -m train --config=experiments/digit_reader.py --workdir=DIR --cpu_devices=8":
        Runs(T2I + "test_digit_reader_experiment_trains_and_evaluates"),
    "python -m train --config=experiments/swin_digits.py --workdir=DIR --cpu_devices=8":
        Runs(VISION_EXPERIMENT),
    "python -m train --config=experiments/vit_native_folder.py --workdir=DIR --cpu_d"
    "evices=8 --config.data.path=IMAGES --config.model.num_classes=3": Runs(
        NATIVE, "IMAGES = a folder of 3 classes of random-size PNGs made by the test"),
    "python -m train --config=experiments/dit_digits.py --workdir=DIR --cpu_devices=8":
        Runs(IMAGE_EXPERIMENT),
    "python -m train --config=experiments/udit_digits.py --workdir=DIR --cpu_devices=8":
        Runs(IMAGE_EXPERIMENT),
    "python -m train --config=experiments/uvit_digits.py --workdir=DIR --cpu_devices=8":
        Runs(VISION_EXPERIMENT),
    "python -m train --config=experiments/gdn_stdlib.py --workdir=DIR --cpu_devices=8":
        Runs(LM_EXPERIMENT),
    "python -m train --config=experiments/mamba2_stdlib.py --workdir=DIR --cpu_devices=8":
        Runs(LM_EXPERIMENT),
    "python -m train --config=experiments/hybrid_stdlib.py --workdir=DIR --cpu_devices=8 "
    "--config.mesh.fsdp=1 --config.mesh.tensor=1 --config.mesh.seq=4": Runs(LM_EXPERIMENT),
    "python -m train --config=experiments/mamba_stdlib.py --workdir=DIR --cpu_devices=8":
        Runs(LM_EXPERIMENT),
    "python -m train --config=experiments/megabyte_stdlib.py[:local=mamba] --workdir=DIR "
    "--cpu_devices=8": Runs(LM_EXPERIMENT, "with :local=mamba; the form without it differs only in "
                           "its local blocks (Transformer ones: tests/parallel/"
                           "test_family_parity.py, tests/train/test_generate.py)"),
    "python -m train --config=experiments/lm_stdlib_bpe.py --workdir=DIR --cpu_devices=8":
        Runs(LM_EXPERIMENT, "with ODYSSEY_CACHE set to an empty folder, then rerun"),
    # Hugging Face weights, generation and sampling.
    "python -m train.convert --from=hf --family=llama --src=HF_DIR --dst=WORKDIR "
    "[--dtype=bfloat16]": Runs(ROUND_TRIP, "HF_DIR = the export of the make-run workdir; "
                               "--dtype: tests/convert/test_convert_cli.py"),
    "python -m train --config=experiments/lm_stdlib.py --config.init.from=WORKDIR --workdir=RUN "
    "--cpu_devices=8 --config.model.d_model=... (the imported model's fields: see WORKDIR/config.json)": Runs(
        FINETUNE, "the model fields read from WORKDIR/config.json"),
    "python -m train.convert --from=odyssey --family=llama --src=RUN --dst=HF_OUT [--step=N] "
    "[--dtype=bfloat16] [--max_shard_gb=5]": Runs(
        ROUND_TRIP, "RUN = the make-run workdir, with --step=N; --dtype and --max_shard_gb: "
        "tests/convert/test_convert_cli.py::test_export_converts_dtype_explicitly"),
    "python -m train.generate --workdir=workdirs/lm_stdlib --prompt=\"def \" "
    "--prompt=\"class Foo\" --max_new_tokens=120 --temperature=0.7 --top_k=40 --top_p=0.9 "
    "--seed=1 [--num_samples=N] [--prompt_ids=1,2,3] [--end_id=ID] [--step=N]": Runs(
        GENERATE, "workdirs/lm_stdlib = the make-run workdir; without, then with the options"),
    "python -m train.sample --workdir=workdirs/dit_digits --classes=0,3,7 --cfg=4.0 --steps=50 "
    "[--per_class=4] [--sampler=ddim|ddpm|flow] [--seed=0] [--out=grid.png]": Runs(
        SAMPLE, "workdirs/dit_digits = the dit_digits test's workdir; without, then with the "
        "options (--sampler=ddpm)"),
    # docs/evaluation.md (and the README's CLI section).
    "python -m train.evaluate --workdir=DIR --tasks=FILE.jsonl [--tasks=...] [--limit=N] "
    "[--mesh=...]": Runs(EVALUATE, "DIR = the make-run workdir, FILE.jsonl = a 3-question file, "
                         "[--tasks=...] = the built-in stdlib_next_line, --limit=8, "
                         "--mesh=fsdp=4,tensor=2"),
    # docs/decoding.md.
    "python -m train.generate --workdir=DIR --prompt=\"def \" --max_new_tokens=100": Runs(GENERATE),
    "python -m train.generate --workdir=DIR --prompt=\"def \" --mesh=fsdp=4,tensor=2": Runs(
        GENERATE),
    # Data.
    "python -m train.make_arrayrecord --src=my_texts/ --dst=/data/my_corpus --glob='**/*.txt'":
        Runs(ARRAYRECORD),
    "python -m train.tokenizer --src=my_texts/ --vocab_size=8192 --out=/data/tok/tokenizer.json":
        Runs(BPE_DATA, "my_texts/ = a few small text files, so fewer than 8192 ids are learned"),
    "python -m train.make_arrayrecord --src=my_docs.jsonl --text_field=text "
    "--tokenizer=/data/tok/tokenizer.json --dst=/data/my_bpe_corpus": Runs(BPE_DATA),
    "python -m train --config=experiments/lm_stdlib.py:size=small --workdir=DIR --cpu_devices=8 "
    "--config.data.name=arrayrecord --config.data.path=/data/my_corpus": Runs(ARRAYRECORD_TRAIN),
    "python -m train --config=experiments/lm_mixture.py --workdir=DIR --cpu_devices=8 "
    "--config.data.sources.prose.path=/data/my_corpus": Runs(
        MIXTURE, "/data/my_corpus = the make_arrayrecord command's output above"),
    # Text-to-image (docs/models.md).
    "python -m train --config=experiments/t2i_digits.py --workdir=DIR --cpu_devices=8": Runs(
        T2I + "test_t2i_digits_trains_evaluates_both_caption_splits_and_draws_prompts"),
    'python -m train.sample --workdir=DIR --prompt="a large 1 at the top left and a large 7 at '
    'the top right" --prompt="a large 3 in the center"': Runs(
        T2I + "test_train_sample_draws_prompts_and_refuses_classes"),
    "python -m bench.diffusion_quality --reader=READER --runs=t2i=DIR": Runs(
        T2I + "test_quality_bench_scores_raw_and_ema_at_each_guidance_scale"),
    # Latents of an autoencoder (docs/data.md).
    "python -m train --config=experiments/vae_digits.py --workdir=DIR --cpu_devices=8": Runs(
        VAE + "test_vae_digits_trains_evaluates_and_writes_reconstructions"),
    "python -m train.encode --workdir=DIR --out=LATENTS": Runs(
        VAE + "test_encode_writes_unit_variance_latents_the_arrayrecord_source_reads"),
    "python -m train --config=experiments/latent_dit_digits.py --workdir=DIT --cpu_devices=8 "
    "--config.data.path=LATENTS": Runs(VAE + "test_latent_dit_samples_decode_to_pngs"),
    "python -m train.sample --workdir=DIT --classes=0,3,7 --cfg=4.0 --steps=50": Runs(
        VAE + "test_latent_dit_samples_decode_to_pngs"),
    # VAR: the multi-scale VQ tokenizer, its token maps, next-scale prediction (docs/models.md).
    "python -m train --config=experiments/vqvae_digits.py --workdir=DIR --cpu_devices=8": Runs(
        VQ + "test_vqvae_digits_trains_evaluates_and_draws_reconstructions_per_scale"),
    "python -m train.encode --workdir=VQ --out=TOKENS": Runs(
        VQ + "test_encode_writes_token_maps_that_decode_as_the_model_reconstructs"),
    "python -m train --config=experiments/var_digits.py --workdir=VAR --cpu_devices=8 "
    "--config.data.path=TOKENS": Runs(
        VQ + "test_var_digits_trains_evaluates_and_draws_a_grid_per_class"),
    "python -m train.sample --workdir=VAR --classes=0,3,7 --cfg=3": Runs(
        VQ + "test_train_sample_draws_a_var_grid_and_refuses_diffusion_flags"),
    # Supervised fine-tuning of an imported model (docs/convert.md, docs/data.md).
    "python -m train.convert --from=hf --family=llama --src=HF_DIR --dst=IMPORTED": Runs(
        SFT_PATH, "HF_DIR = a tiny random Llama with a locally trained tokenizer.json"),
    "python -m train --config=experiments/sft.py:from=IMPORTED --workdir=RUN "
    "--config.data.path=chat.jsonl": Runs(SFT_PATH, "steps, batch sizes, seq_len and the "
                                          "learning rate lowered/raised for a random tiny model"),
    "python -m train.generate --workdir=RUN --prompt=\"Q: What is the capital of France? A:\" "
    "--max_new_tokens=16": Runs(SFT_PATH),
    "python -m train.convert --from=odyssey --family=llama --src=RUN --dst=HF_OUT": Runs(SFT_PATH),
}


def doc(command: str) -> str:
  """``command`` as documented; a KeyError says the docs no longer show it (update the table)."""
  if command not in DOCUMENTED:
    raise KeyError(f"{command!r} is not a documented command in tests/user/commands.py")
  return command
