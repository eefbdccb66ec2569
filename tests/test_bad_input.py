"""Bad input, table-driven: every ordinary mistake is one line on stderr, exit code 2, nothing left behind.

Each CLI case runs ``marval_rl.cli.main(argv)`` in-process and asserts: exit code 2; stderr is exactly one
line, starting with ``error:`` (a CheckpointError listing missing / unexpected keys is multi-line by
design: none of these cases produce one); the key or file named in it (the case's regex); no traceback;
and the output folder does not exist afterwards (unless the case made it). Most cases fail at validation,
before any model loads. The ``id`` of each case says what bug it catches. A few cases run the real
``marval-rl`` entry point in a subprocess, a few call the Python API, and two check the classification
itself (Ray task errors unwrapped to their cause; an internal bug still shows its traceback).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MAR, make_tiny_policy_dirs, tiny_constructor
from marval_rl.cli import main
from marval_rl.config import recipe_to_yaml, load_recipe

ROOT = Path(__file__).parents[1]
TINY = ROOT / "recipes" / "sample_reference_tiny.yaml"
REWARD_FILE = Path(__file__).parent / "fixtures" / "user_rewards" / "brightness.py"
NAMES = "[tench,goldfish,great white shark,tiger shark,hammerhead,electric ray,stingray,cock,hen,ostrich]"
HAS_CUDA = torch.cuda.is_available()
NO_SYS = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's /sys (no new folders there)")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Tiny student / teacher / VAE directories, broken checkpoint files and recipes of every command."""
    root = make_tiny_policy_dirs(tmp_path_factory.mktemp("bad"))
    (root / "empty.pth").write_bytes(b"")
    (root / "garbage.pth").write_bytes(bytes(range(256)) * 8)
    data = (TINY_MAR / "checkpoint.pth").read_bytes()
    (root / "half.pth").write_bytes(data[: len(data) // 2])
    torch.save({"model": {}}, root / "noema.pth")
    (root / "text.pth").write_text("hello world, this is not a checkpoint\n" * 4)
    import pickle

    with open(root / "plain_pickle.pth", "wb") as f:
        pickle.dump({"model_ema": 1}, f, protocol=4)
    with open(root / "evil.pth", "wb") as f:
        torch.save({"model_ema": {}, "x": _Payload(str(root / "pwned"))}, f)
    (root / "nocfg").mkdir()
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text("{")
    (root / "garbage_st").mkdir()
    (root / "garbage_st" / "config.json").write_text((root / "student" / "config.json").read_text())
    (root / "garbage_st" / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "list.yaml").write_text("- sample\n- cfg\n")
    (root / "scalar.yaml").write_text("42\n")
    (root / "broken.yaml").write_text("sample: {cfg: [\n")
    (root / "two_braces.json").write_text("{")
    # FID inputs: an Inception state dict of another layout, reference statistics of another feature size
    torch.save({"fc.weight": torch.zeros(10, 2048), "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                "extra.weight": torch.zeros(1)}, root / "not_inception.pth")
    import numpy as np

    np.savez(root / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(root / "stats_nokeys.npz", mean=np.zeros(2048))
    base = [f"model.checkpoint={root / 'student'}", f"vae.checkpoint={root / 'vae'}",
            f"train.rewards=[{{name: '{REWARD_FILE}:Brightness'}}]", "train.iterations=1",
            "train.rollouts_per_worker=4", "train.group_size=2", "train.num_iter=4", "train.classes=[0,1,2,3]",
            f"train.class_names={NAMES}", "train.grid_every=0", "train.eval_per_class=0",
            "train.checkpoint_every=0", "train.num_workers=1"]
    (root / "train.yaml").write_text(recipe_to_yaml(load_recipe(None, base)))
    (root / "distill.yaml").write_text(recipe_to_yaml(load_recipe(None, [
        f"model.checkpoint={root / 'teacher'}", f"vae.checkpoint={root / 'vae'}", "data.image_size=64",
        "data.per_class=1", "data.augment=none", "distill.generator_optim.steps=1", "distill.fake_optim.steps=1",
        "distill.generator_optim.batch_size=2", "distill.sample_every=0", "distill.checkpoint_every=0"])))
    (root / "evaluate.yaml").write_text(recipe_to_yaml(load_recipe(None, [
        f"model.checkpoint={root / 'student'}", f"vae.checkpoint={root / 'vae'}", "evaluate.per_class=1",
        "evaluate.classes=[0]", "sample.num_iter=2"])))
    return root


class _Payload:
    """A pickle that would run a shell command when loaded (must be refused, never executed)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


S, T, D, E, P = "sample {tiny}", "train --no-ray {R}/train.yaml", "distill {R}/distill.yaml", \
    "evaluate {R}/evaluate.yaml", "pretrain pretrain_embedded"

# (id: the bug it catches, command line, regex the one error line must match)
CASES = [
    # ------------------------------------------------------------------ recipe files and keys
    ("recipe_not_found", "sample {R}/nope.yaml", r"recipe not found: .*nope\.yaml"),
    ("recipe_is_a_directory", "sample {R}/nocfg", r"nocfg.*is a directory"),
    ("recipe_top_level_list_traceback", "sample {R}/list.yaml", r"list\.yaml.*top level.*mapping"),
    ("recipe_top_level_scalar_traceback", "sample {R}/scalar.yaml", r"scalar\.yaml.*top level.*mapping"),
    ("recipe_invalid_yaml", "sample {R}/broken.yaml", r"broken\.yaml is not valid YAML"),
    ("unknown_key_suggests", S + " sample.cgf=3", r"did you mean 'sample\.cfg'"),
    ("wrong_type_names_key", S + " sample.num_iter=many", r"sample\.num_iter"),
    ("float_for_int_key", S + " sample.num_iter=2.5", r"sample\.num_iter"),
    ("override_without_equals", S + " sample.cfg", r"key=value"),
    # before: "Incompatible value 'None'", naming neither the override nor what is missing
    ("override_with_empty_value", S + " sample.num_iter=", r"override 'sample.num_iter=' has no value after '='"),
    ("section_given_a_scalar", S + " sample=3", r"'sample' is a section"),
    ("empty_override_value", S + " sample.cfg=", r"sample\.cfg"),
    ("validate_checks_values_too", "validate {tiny} sample.cfg=nan", r"sample\.cfg.*finite"),
    ("seed_overflow_named_no_key", S + " sample.seed=18446744073709551616", r"sample\.seed"),
    # ------------------------------------------------------------------ numeric values (sample / API)
    ("nan_cfg_silently_all_nan_latents", S + " sample.cfg=nan", r"sample\.cfg.*finite"),
    ("inf_cfg_clipped_tokens", S + " sample.cfg=inf", r"sample\.cfg.*finite"),
    ("cfg_below_one", S + " sample.cfg=0.5", r"sample\.cfg.*values below 1 are not meaningful"),
    ("nan_temperature_silently_nan", S + " sample.temperature=nan", r"sample\.temperature.*finite"),
    ("negative_temperature", S + " sample.temperature=-1", r"sample\.temperature"),
    ("float_label_truncated_to_class_1", S + " sample.labels=[1.7]", r"sample\.labels.*1\.7"),
    ("bool_label_taken_as_class_1", S + " sample.labels=[true]", r"sample\.labels.*True"),
    ("string_label", S + " sample.labels=[lion]", r"sample\.labels.*lion"),
    ("label_out_of_range", S + " sample.labels=[10]", r"sample\.labels.*labels must lie in \[0, 10\)"),
    ("negative_label", S + " sample.labels=[-1]", r"sample\.labels.*\[0, 10\)"),
    ("batch_size_zero_range_arg_3", S + " sample.batch_size=0", r"sample\.batch_size must be >= 1"),
    ("num_per_label_zero_torch_cat", S + " sample.num_per_label=0", r"sample\.num_per_label must be >= 1"),
    ("num_iter_zero", S + " sample.num_iter=0", r"sample\.num_iter must be in \[1, 16\]"),
    ("num_iter_above_tokens", S + " sample.num_iter=17", r"sample\.num_iter must be in \[1, 16\]"),
    ("head_steps_zero_names_no_key", S + " sample.head_steps=0", r"sample\.head_steps must be >= 1"),
    ("head_steps_on_a_student", "sample {R}/evaluate.yaml sample.head_steps=4", r"sample\.head_steps applies"),
    ("bad_cfg_schedule", S + " sample.cfg_schedule=cosine", r"sample\.cfg_schedule"),
    ("grid_nrow_zero", S + " sample.grid_nrow=0", r"sample\.grid_nrow must be >= 1"),
    # ------------------------------------------------------------------ devices
    ("device_tpu_traceback", S + " device=tpu", r"device.*'tpu'.*cpu.*cuda"),
    ("device_garbage", S + " device=gpu0", r"device.*'gpu0'"),
    pytest.param("device_cuda_without_gpu_said_corrupt", "sample {R}/evaluate.yaml device=cuda",
                 r"device=cuda.*no CUDA", marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU"),
                 id="device_cuda_without_gpu_said_corrupt"),
    pytest.param("train_device_cuda_without_gpu", T + " device=cuda", r"device=cuda.*no CUDA",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU"), id="train_device_cuda_without_gpu"),
    ("cuda_index_out_of_range", S + " device=cuda:99", r"device.*cuda:99"),
    # ------------------------------------------------------------------ precision (issue 14)
    ("fp16_on_cpu_ran_emulated", S + " precision=fp16", r"precision=fp16 needs a CUDA GPU.*bf16"),
    ("train_fp16_on_cpu", T + " precision=fp16", r"precision=fp16 needs a CUDA GPU"),
    ("distill_fp16_on_cpu", D + " precision=fp16", r"precision=fp16 needs a CUDA GPU"),
    ("unknown_precision_fp8", S + " precision=fp8", r"precision='fp8'.*unknown precision.*bf16"),
    ("precision_given_as_dtype_name", T + " precision=bfloat16", r"precision='bfloat16'.*unknown"),
    # compile_mode: CUDA graphs on a CPU would be silently skipped by torch; a mode without compile=true
    # would be silently ignored; a typo would reach torch.compile at the first rollout, deep in a worker
    ("cuda_graphs_on_cpu", S + " compile=true compile_mode=reduce-overhead", r"compile_mode=reduce-overhead.*device=cuda"),
    ("train_cuda_graphs_on_cpu", T + " compile=true compile_mode=max-autotune", r"compile_mode=max-autotune.*CUDA graphs"),
    ("compile_mode_without_compile", T + " compile_mode=max-autotune-no-cudagraphs", r"compile_mode=.*compile=false"),
    ("unknown_compile_mode", S + " compile=true compile_mode=fast", r"compile_mode='fast'.*unknown mode"),
    # ------------------------------------------------------------------ checkpoints
    ("checkpoint_missing", S + " model.checkpoint=/no/such.pth", r"checkpoint not found: /no/such\.pth"),
    ("zero_byte_checkpoint_indexerror", S + " model.checkpoint={R}/empty.pth", r"empty\.pth.*empty"),
    ("random_bytes_said_to_run_code", S + " model.checkpoint={R}/garbage.pth",
     r"garbage\.pth.*not a PyTorch checkpoint"),
    ("pickle_with_code_refused", S + " model.checkpoint={R}/evil.pth", r"refusing to load .*evil\.pth"),
    ("truncated_checkpoint", S + " model.checkpoint={R}/half.pth", r"half\.pth.*truncated"),
    ("text_file_checkpoint_keyerror", S + " model.checkpoint={R}/text.pth", r"text\.pth.*not a PyTorch checkpoint"),
    ("plain_pickle_warning_on_stderr", S + " model.checkpoint={R}/plain_pickle.pth",
     r"plain_pickle\.pth.*not a PyTorch checkpoint"),
    ("checkpoint_without_ema", S + " model.checkpoint={R}/noema.pth", r"noema\.pth has no 'model_ema'"),
    ("unknown_factory_keyerror", S + " model.arch=mar_bogus", r"model\.arch.*mar_bogus.*mar_base"),
    ("official_file_without_arch", S + " \"model.arch=''\"", r"model\.arch \(mar_base.*is needed"),
    ("arch_json_missing", S + " model.arch=/no/such.json", r"model\.arch.*/no/such\.json"),
    ("arch_json_invalid", S + " model.arch={R}/two_braces.json", r"model\.arch.*two_braces\.json"),
    ("unknown_model_config_key", S + " 'model.config={{bogus_key: 1}}'", r"model\.config.*bogus_key"),
    ("dir_without_config_json", S + " model.checkpoint={R}/nocfg", r"nocfg is not a marval-rl checkpoint"),
    ("config_json_invalid", S + " model.checkpoint={R}/badjson", r"badjson/config\.json is not valid JSON"),
    ("corrupt_safetensors", S + " model.checkpoint={R}/garbage_st", r"garbage_st/model\.safetensors.*corrupt"),
    ("vae_given_as_generator", S + " model.checkpoint={R}/vae", r"holds a 'vae'"),
    ("vae_checkpoint_missing", "sample {R}/evaluate.yaml vae.checkpoint=/no/vae", r"/no/vae"),
    ("student_given_as_vae", "sample {R}/evaluate.yaml vae.checkpoint={R}/student", r"'marval'.*'vae' is expected"),
    # ------------------------------------------------------------------ output folders
    ("output_dir_is_a_file", S + " output_dir={R}/afile", r"output_dir.*afile.*is a file"),
    ("output_dir_under_a_file", S + " output_dir={R}/afile/run", r"output_dir.*afile.*is a file"),
    pytest.param("output_dir_unwritable", S + " output_dir=/sys/marval_rl_test/run", r"output_dir.*/sys",
                 marks=NO_SYS, id="output_dir_unwritable"),   # /sys refuses new folders, also to root
    ("train_output_dir_is_a_file", T + " output_dir={R}/afile", r"output_dir.*afile.*is a file"),
    pytest.param("train_output_dir_unwritable", T + " output_dir=/sys/marval_rl_test",
                 r"output_dir.*cannot create a folder in /sys", marks=NO_SYS, id="train_output_dir_unwritable"),
    ("distill_output_dir_under_a_file", D + " output_dir={R}/afile/x", r"output_dir.*afile.*is a file"),
    ("pretrain_output_dir_is_a_file", P + " output_dir={R}/afile", r"output_dir.*afile.*is a file"),
    # ------------------------------------------------------------------ train
    ("group_size_zero_zerodivision", T + " train.group_size=0", r"train\.group_size must be >= 1"),
    ("grad_last_k_zero", T + " train.grad_last_k=0", r"train\.grad_last_k must be in \[1"),
    ("class_out_of_range_indexerror", T + " train.classes=[56]", r"train\.classes.*\[0, 10\)"),
    ("float_class_truncated", T + " train.classes=[1.5]", r"train\.classes.*1\.5"),
    ("bool_class", T + " train.classes=[true]", r"train\.classes.*True"),
    ("prompt_template_two_braces", T + " 'train.prompt_template=\"{{}} and {{}}\"'", r"train\.prompt_template"),
    ("override_value_invalid_yaml", T + " 'train.prompt_template={{}} and {{}}'",
     r"override .*train\.prompt_template.*not valid YAML"),
    ("prompt_template_unknown", T + " train.prompt_template=nosuch", r"train\.prompt_template.*nosuch"),
    ("dashboard_port_70000", T + " train.dashboard_port=70000", r"train\.dashboard_port.*70000"),
    ("wandb_mode_unknown", T + " train.wandb=maybe", r"train\.wandb.*maybe"),
    ("lr_nan", T + " train.optim.lr=nan", r"train\.optim\.lr.*finite"),
    ("lr_negative", T + " train.optim.lr=-1", r"train\.optim\.lr must be > 0"),
    ("betas_nan_string", T + " train.optim.betas=[0.9,nan]", r"train\.optim\.betas"),
    ("betas_one_value", T + " train.optim.betas=[0.9]", r"train\.optim\.betas"),
    ("reward_weight_nan", T + " \"train.rewards=[{{name: '" + str(REWARD_FILE) + ":Brightness', weight: .nan}}]\"",
     r"train\.rewards\[0\]\.weight.*finite"),
    ("reward_unknown", T + " 'train.rewards=[{{name: no_such_reward}}]'", r"unknown reward 'no_such_reward'"),
    ("reward_typo_suggests", T + " 'train.rewards=[{{name: clip_scor}}]'", r"did you mean 'clip_score'"),
    ("gold_reward_file_missing", T + " \"train.gold=[{{name: '/no/gold.py:G'}}]\"", r"reward file not found: /no/gold\.py"),
    ("reward_file_missing", T + " \"train.rewards=[{{name: '/no/such.py:R'}}]\"", r"reward file not found: /no/such\.py"),
    ("no_rewards", T + " train.rewards=[]", r"train\.rewards"),
    ("reg_weight_inf", T + " train.reg_weight=inf", r"train\.reg_weight.*finite"),
    ("explore_std_nan", T + " train.explore_std=nan", r"train\.explore_std.*finite"),
    ("explore_steps_bool", T + " train.explore_steps=[true]", r"train\.explore_steps"),
    ("class_names_too_few", T + " train.class_names=[a,b]", r"train\.class_names.*2.*10"),
    ("class_names_unknown_for_10_classes", T + " train.class_names=[]", r"train\.class_names.*10-class"),
    ("optim_ema_one", T + " train.optim.ema=1.0", r"train\.optim\.ema must be in \[0, 1\)"),
    ("num_workers_zero", T + " train.num_workers=0", r"train\.num_workers must be >= 1"),
    ("eval_every_negative", T + " train.eval_every=-1", r"train\.eval_every must be >= 0"),
    ("teacher_as_policy", T + " model.checkpoint={R}/teacher", r"'mar' checkpoint, but a 'marval' is expected"),
    ("train_without_vae", T + " \"vae.checkpoint=''\"", r"train needs vae\.checkpoint"),
    ("update_rule_typo", T + " train.algorithm=policy_gradeint", r"did you mean 'policy_gradient'"),
    ("lora_rank_zero", T + " train.trainable=[class_embedding] train.lora.targets=[head] train.lora.rank=0",
     r"train\.lora\.rank must be an integer >= 1, got 0"),
    ("lora_alpha_negative", T + " train.trainable=[] train.lora.targets=[head] train.lora.alpha=-1",
     r"train\.lora\.alpha"),
    # a typo in a module name: the closest Linear names (difflib), before any weights load
    ("lora_target_typo", T + " train.trainable=[] train.lora.targets=[decoder_blocks.0.mlp.fc3]",
     r"train\.lora\.targets: no Linear layer .* 'decoder_blocks\.0\.mlp\.fc3' \(closest: decoder_blocks\.0\.mlp\.fc2"),
    ("lora_target_group_typo", T + " train.trainable=[] train.lora.targets=[heads]", r"'heads' \(closest: head"),
    ("lora_and_full_training_of_one_layer", T + " train.trainable=[head] train.lora.targets=[head]",
     r"train\.lora\.targets and train\.trainable both train one_step\."),
    ("lora_dropout_breaks_replay", T + " train.trainable=[] train.lora.targets=[head] train.lora.dropout=0.1",
     r"train\.lora\.dropout must be 0 in RL"),
    ("lora_group_lr_unknown", T + " train.trainable=[] train.lora.targets=[head] 'train.group_lr={{loras: 1e-3}}'",
     r"train\.group_lr .*loras"),
    ("nothing_trains", T + " train.trainable=[]", r"train\.trainable must name some of"),
    # ------------------------------------------------------------------ distill
    ("steps_zero_wrote_undistilled_student", D + " distill.generator_optim.steps=0",
     r"distill\.generator_optim\.steps must be >= 1"),
    ("distill_cfg_nan", D + " distill.cfg=nan", r"distill\.cfg.*finite"),
    ("distill_cfg_inf", D + " distill.cfg=inf", r"distill\.cfg.*finite"),
    ("distill_log_every_zero", D + " distill.log_every=0", r"distill\.log_every must be >= 1"),
    ("distill_lr_inf", D + " distill.generator_optim.lr=inf", r"distill\.generator_optim\.lr.*finite"),
    ("distill_init_timestep", D + " distill.init_timestep=1000", r"distill\.init_timestep"),
    ("distill_mask_ratio", D + " distill.mask_ratio_min=1.5", r"distill\.mask_ratio_min"),
    ("distill_from_a_student", D + " model.checkpoint={R}/student", r"'marval' checkpoint, but a 'mar' is expected"),
    ("distill_without_vae", D + " \"vae.checkpoint=''\"", r"distill needs vae\.checkpoint"),
    ("data_source_unknown", D + " data.source=bogus", r"data\.source.*bogus"),
    ("data_float_class", D + " data.classes=[1.5]", r"data\.classes.*1\.5"),
    ("data_root_missing", D + " data.source=imagefolder data.root=/no/images", r"data\.root.*/no/images"),
    # ------------------------------------------------------------------ pretrain
    ("pretrain_unknown_stage", P + " pretrain.stages=[bogus]", r"pretrain\.stages.*bogus"),
    ("pretrain_vae_steps_zero_left_folder", P + " pretrain.vae.optim.steps=0", r"pretrain\.vae\.optim\.steps must be >= 1"),
    ("pretrain_log_every_zero", P + " pretrain.log_every=0", r"pretrain\.log_every must be >= 1"),
    ("pretrain_lr_nan", P + " pretrain.mar.optim.lr=nan", r"pretrain\.mar\.optim\.lr.*finite"),
    ("pretrain_kl_weight_nan", P + " pretrain.vae.kl_weight=nan", r"pretrain\.vae\.kl_weight.*finite"),
    ("pretrain_mar_without_vae", P + " pretrain.stages=[mar]", r"needs a VAE"),
    ("pretrain_image_size_zero", P + " data.image_size=0", r"data\.image_size must be >= 1"),
    # ------------------------------------------------------------------ evaluate
    ("evaluate_per_class_zero_torch_cat", E + " evaluate.per_class=0", r"evaluate\.per_class must be >= 1"),
    ("evaluate_class_out_of_range", E + " evaluate.classes=[99]", r"evaluate\.classes.*\[0, 10\)"),
    ("evaluate_batch_size_zero", E + " evaluate.batch_size=0", r"evaluate\.batch_size must be >= 1"),
    ("evaluate_classifier_missing", E + " evaluate.classifier=/no/clf", r"evaluate\.classifier.*/no/clf"),
    ("evaluate_without_vae", E + " \"vae.checkpoint=''\"", r"evaluate needs vae\.checkpoint"),
    ("evaluate_fid_without_reference_stats", E + " evaluate.metrics=[fid]",
     r"evaluate\.reference_stats is empty.*adm_in256_stats\.npz in github\.com/LTH14/mar"),
    ("evaluate_reference_stats_wrong_shape", E + " evaluate.metrics=[fid] evaluate.reference_stats={R}/stats64.npz",
     r"reference_stats: .*stats64\.npz has mu \(64,\).*mu \(2048,\)"),
    ("evaluate_reference_stats_without_mu_sigma",
     E + " evaluate.metrics=[fid] evaluate.reference_stats={R}/stats_nokeys.npz", r"stats_nokeys\.npz has keys \['mean'\]"),
    ("evaluate_reference_stats_missing", E + " evaluate.metrics=[fid] evaluate.reference_stats=/no/stats.npz",
     r"evaluate\.reference_stats: /no/stats\.npz is not a file"),
    ("evaluate_inception_weights_missing", E + " evaluate.metrics=[inception_score] evaluate.is_splits=1 "
     "evaluate.inception_weights=/no/inception.pth", r"evaluate\.inception_weights: /no/inception\.pth is not a file"),
    ("evaluate_inception_weights_wrong_layout_traceback", E + " evaluate.metrics=[inception_score] evaluate.is_splits=1 "
     "evaluate.inception_weights={R}/not_inception.pth",
     r"inception_weights: .*not_inception\.pth is not the 2015-12-05 TF Inception.*missing keys \(e\.g\. Conv2d_1a_3x3"
     r"\.bn\.weight\); 1 unexpected keys \(e\.g\. extra\.weight\); 1 shape mismatches \(e\.g\. fc\.weight \(10, 2048\)"),
    ("evaluate_inception_weights_unsafe_pickle", E + " evaluate.metrics=[inception_score] evaluate.is_splits=1 "
     "evaluate.inception_weights={R}/evil.pth", r"inception_weights: refusing to load .*evil\.pth"),
    ("evaluate_is_splits_above_images", E + " evaluate.metrics=[inception_score]", r"evaluate\.is_splits=10 needs"),
    ("evaluate_num_images_not_class_balanced", E + " evaluate.classes=[0,1] evaluate.num_images=3",
     r"evaluate\.num_images must be .* multiple of the 2 classes"),
    ("evaluate_unknown_metric", E + " evaluate.metrics=[fid50k]", r"evaluate\.metrics: 'fid50k' is none of"),
    ("evaluate_save_every_zero", E + " evaluate.save_every=0", r"evaluate\.save_every must be >= 1"),
]


def _argv(line: str, root: Path, out: Path) -> list[str]:
    import shlex

    argv = shlex.split(line.format(R=root, tiny=TINY))
    if not any(a.startswith("output_dir=") for a in argv) and argv[0] not in ("validate",):
        argv.append(f"output_dir={out}")
    return argv


def _check_one_error_line(err: str, pattern: str):
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case,line,pattern", [c if hasattr(c, "marks") else pytest.param(*c, id=c[0])
                                               for c in CASES])
def test_cli_bad_input(bad, tmp_path, capsys, case, line, pattern):
    out = tmp_path / "out"
    argv = _argv(line, bad, out)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    _check_one_error_line(err, pattern)
    assert not out.exists(), f"{case}: left {out} behind ({sorted(p.name for p in out.iterdir())})"
    assert not (bad / "pwned").exists()        # the evil pickle never ran


def test_missing_optional_dependency(bad, tmp_path, capsys, monkeypatch):
    # catches: train.wandb with wandb not installed, a traceback after the models had loaded
    monkeypatch.setitem(sys.modules, "wandb", None)      # `import wandb` raises ImportError
    out = tmp_path / "out"
    assert main(_argv(T + " train.wandb=offline", bad, out)) == 2
    _check_one_error_line(capsys.readouterr().err, r"train\.wandb=offline needs wandb.*pip install")
    assert not out.exists()


def test_fid_without_torch_fidelity(bad, tmp_path, capsys, monkeypatch):
    # catches: evaluate.metrics=[fid] without the fid extra ending in an ImportError traceback
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    out = tmp_path / "out"
    assert main(_argv(E + " evaluate.metrics=[inception_score] evaluate.is_splits=1", bad, out)) == 2
    _check_one_error_line(capsys.readouterr().err, r"need torch-fidelity: pip install 'marval-rl\[fid\]'")


def test_missing_peft_for_lora(bad, tmp_path, capsys, monkeypatch):
    # catches: train.lora without peft installed as a traceback instead of the extra to install
    monkeypatch.setitem(sys.modules, "peft", None)       # `import peft` raises ImportError
    out = tmp_path / "out"
    assert main(_argv(T + " train.trainable=[] train.lora.targets=[head]", bad, out)) == 2
    _check_one_error_line(capsys.readouterr().err, r"LoRA \(train\.lora\) needs peft.*pip install 'marval-rl\[lora\]'")
    assert not out.exists()


def test_ray_task_error_is_unwrapped_to_its_cause(bad, tmp_path, capsys, monkeypatch):
    # catches: a NaN reward under Ray printing 26 lines of remote traceback before the clear line
    from ray.exceptions import RayTaskError

    from marval_rl.rewards import RewardError
    import marval_rl.rl.controller as controller

    cause = RewardError("reward 'broken' returned NaN for 4 of 4 images")
    remote = "\n".join([f"  File \"worker.py\", line {i}, in f" for i in range(26)] + [f"RewardError: {cause}"])
    err_obj = RayTaskError("RolloutWorker.rollout", remote, cause).as_instanceof_cause()

    def fail(*a, **k):
        raise err_obj
    monkeypatch.setattr(controller, "run_training", fail)
    assert main(_argv(T, bad, tmp_path / "out")) == 2
    _check_one_error_line(capsys.readouterr().err, r"^error: reward 'broken' returned NaN for 4 of 4 images$")


def test_ray_worker_that_fails_to_start_is_one_line():
    # catches: an actor whose constructor raised: RuntimeError with the remote traceback, then a traceback
    from ray.exceptions import ActorDiedError, RayTaskError

    from marval_rl.models.checkpoints import CheckpointError
    from marval_rl.rl.ray_executor import RayExecutor

    remote = ("\x1b[36mray::RolloutWorker.__init__()\x1b[39m (pid=1, ip=1.2.3.4)\n  File \"rollout.py\", line 70, "
              "in __init__\n    self.policy = load_generator(...)\nmarval_rl.models.checkpoints.CheckpointError: "
              "could not read /x/model.safetensors: truncated or corrupt")
    died = ActorDiedError(RayTaskError("RolloutWorker.__init__", remote, CheckpointError("x")))

    class Handle:
        class pid:
            @staticmethod
            def remote():
                return "ref"

    ex = RayExecutor.__new__(RayExecutor)
    ex.workers, ex.startup_timeout_s = [Handle()], 1.0
    import marval_rl.rl.ray_executor as rx

    orig = rx.ray.get
    rx.ray.get = lambda *a, **k: (_ for _ in ()).throw(died)
    try:
        with pytest.raises(RuntimeError) as info:
            ex._wait_ready([0])
    finally:
        rx.ray.get = orig
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and "truncated or corrupt" in msg and "Traceback" not in msg, msg
    assert "\x1b" not in msg


def test_internal_bug_still_shows_its_traceback(bad, tmp_path, capsys, monkeypatch):
    # catches: a blanket `except Exception` that hides real bugs behind one line
    import marval_rl.cli as cli

    def bug(args):
        return {}["no such key"]
    monkeypatch.setattr(cli, "cmd_validate", bug)
    code = main(["validate", str(TINY)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last)" in err and "KeyError" in err
    assert "bug" in err.strip().splitlines()[-1] and "report" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------- the Python API
def _api_cases():
    from marval_rl.sampling import DiffusionSampler, sample_tokens

    return [
        ("orders_not_a_permutation", lambda m: sample_tokens(m, labels=[0, 1], num_iter=2,
                                                             orders=torch.zeros(2, 16, dtype=torch.long)),
         r"orders.*permutation"),
        ("orders_float", lambda m: sample_tokens(m, labels=[0], num_iter=2,
                                                 orders=torch.arange(16.0)[None] + 0.5), r"orders.*integer"),
        ("labels_float_tensor", lambda m: sample_tokens(m, labels=torch.tensor([1.7]), num_iter=2), r"labels.*int"),
        ("labels_float_list", lambda m: sample_tokens(m, labels=[1.7], num_iter=2), r"labels.*int"),
        ("labels_bool", lambda m: sample_tokens(m, labels=[True], num_iter=2), r"labels.*int"),
        ("labels_out_of_range", lambda m: sample_tokens(m, labels=[10], num_iter=2), r"labels must lie in \[0, 10\)"),
        ("cfg_nan", lambda m: sample_tokens(m, labels=[0], num_iter=2, cfg=float("nan")), r"cfg.*finite"),
        ("cfg_inf", lambda m: sample_tokens(m, labels=[0], num_iter=2, cfg=float("inf")), r"cfg.*finite"),
        ("temperature_nan", lambda m: sample_tokens(m, labels=[0], num_iter=2, temperature=float("nan")),
         r"temperature.*finite"),
        ("num_iter_float", lambda m: sample_tokens(m, labels=[0], num_iter=2.5), r"num_iter.*int"),
        ("grad_last_k_zero", lambda m: sample_tokens(m, labels=[0], num_iter=2, grad_last_k=0), r"grad_last_k"),
        ("head_steps_zero", lambda m: DiffusionSampler(m.diffloss, 0), r"num_steps.*>= 1"),
    ]


@pytest.mark.parametrize("i", range(12), ids=lambda i: _api_cases()[i][0])
def test_api_bad_arguments(tiny_mar, i):
    _, call, pattern = _api_cases()[i]
    with pytest.raises(ValueError, match=pattern):
        call(tiny_mar)


def test_api_loaders(bad):
    from marval_rl.models import load_official_mar
    from marval_rl.models.checkpoints import CheckpointError
    from marval_rl.models.mar import MARConfig

    # catches: a directory reported as "not found"
    with pytest.raises(CheckpointError, match="is a directory"):
        load_official_mar(bad / "student", tiny_constructor())
    # catches: KeyError from indexing the factory table before the name check
    with pytest.raises(ValueError, match="unknown MAR factory 'mar_bogus'"):
        MARConfig.from_dict({"factory": "mar_bogus"})
    # catches: a CUDA target on a CPU-only machine reported as a "truncated or corrupt" file
    if not HAS_CUDA:
        from marval_rl.models.checkpoints import load_pretrained

        with pytest.raises(CheckpointError, match="no CUDA GPU"):
            load_pretrained(bad / "student", map_location="cuda")
        with pytest.raises(CheckpointError, match="no CUDA GPU"):
            load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor(), map_location="cuda")


# ---------------------------------------------------------------------------------------- the real entry point
@pytest.mark.parametrize("line,pattern", [
    (S + " sample.cfg=nan", r"sample\.cfg.*finite"),
    (S + " output_dir={R}/afile/run", r"output_dir.*afile.*is a file"),
    (T + " train.group_size=0", r"train\.group_size must be >= 1"),
], ids=["nan_cfg", "output_under_file", "group_size_zero"])
def test_entry_point(bad, tmp_path, line, pattern):
    exe = Path(sys.executable).with_name("marval-rl")
    out = tmp_path / "out"
    r = subprocess.run([str(exe), *_argv(line, bad, out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    _check_one_error_line(r.stderr, pattern)
    assert not out.exists()
