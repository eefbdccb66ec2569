"""precision=bf16 (autocast, float32 master weights) and compile=true: what changes, what must not.

bf16 autocast rounds every matmul input to 8 mantissa bits (relative error 2^-9 per operand), so a
bf16 generation differs from float32 by a small fraction of the tokens' spread; within one precision
a rollout and its replay are still bit for bit the same, because both sides run the same kernels.
"""
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_policy_dirs
from marval_rl.acceleration import (PrecisionError, autocast, check_compile, check_compile_mode, check_precision,
                                    compile_generator)
from marval_rl.config import ModelSection, RewardSpec, VAESection, load_recipe
from marval_rl.models.one_step import MARVAL
from marval_rl.rl.batch import RolloutRequest
from marval_rl.rl.controller import run_training
from marval_rl.rl.rollout import RolloutWorker, WorkerSpec
from marval_rl.sampling import sample_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
REWARD_FILE = Path(__file__).parent / "fixtures" / "user_rewards" / "brightness.py"
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
         "cock", "hen", "ostrich"]
BF16_EPS = 2.0 ** -8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_tiny_policy_dirs(tmp_path_factory.mktemp("precision"))


def _generate(model, precision, **kw):
    with torch.no_grad(), autocast(precision, "cpu"):
        return sample_tokens(model, labels=[1, 4, 7], num_iter=4, generator=torch.Generator().manual_seed(3), **kw)


def test_bf16_generation_is_close_to_fp32_and_not_equal(tiny_mar):
    # catches: an autocast that is never entered (bf16 == fp32 bit for bit), and one that leaks into the
    # AR loop's state (tokens stored in bf16, errors compounding over steps: far outside the bound).
    # The one-step student: the tiny teacher's *untrained* 100-step head diverges in bf16 (its random eps
    # error is amplified ~2e4x by 1/sqrt(alphabar) at t = 999); the trained embedded teacher does not
    # (benchmarks/embedded_quality.py --precision fp32 bf16: FID-proxy 296.0 vs 296.8, same accuracy).
    student = MARVAL.from_teacher(tiny_mar).eval()
    fp32, bf16 = _generate(student, "fp32"), _generate(student, "bf16")
    assert bf16.tokens.dtype == torch.float32 and student.fake_latent.dtype == torch.float32
    assert not torch.equal(fp32.tokens, bf16.tokens)
    # bound: each matmul rounds its operands to 2^-9 relative; ~20 matmuls deep (backbone blocks, head
    # blocks) and 4 AR steps of context: well under 20 * 2^-8 of the tokens' scale
    scale = fp32.tokens.abs().max().item()
    assert (fp32.tokens - bf16.tokens).abs().max().item() < 20 * BF16_EPS * scale


def _worker(dirs, precision, **kw):
    spec = WorkerSpec(model=ModelSection(checkpoint=str(dirs / "student")), vae=VAESection(checkpoint=str(dirs / "vae")),
                      rewards=[RewardSpec(name=f"{REWARD_FILE}:Brightness")], num_iter=4, explore_std=0.1,
                      class_names=NAMES, precision=precision, **kw)
    w = RolloutWorker(spec)
    w.version = 0
    return w


def test_bf16_rollouts_keep_float32_rewards_and_log_probs(dirs):
    # catches: rewards or log-probs left in bf16 (group advantages of rewards ~0.004 apart would be
    # mostly rounding), and a worker that ignores spec.precision
    req = RolloutRequest(0, [1, 1, 2, 2], seed=5, group_size=2)
    fp32, bf16 = _worker(dirs, "fp32").rollout(req), _worker(dirs, "bf16").rollout(req)
    assert bf16.rewards.total.dtype == torch.float32 and bf16.old_logprobs.dtype == torch.float32
    assert not torch.equal(fp32.tokens, bf16.tokens)
    torch.testing.assert_close(bf16.rewards.total, fp32.rewards.total, rtol=0, atol=0.02)


def _recipe(dirs, out, *extra):
    return load_recipe(None, [
        f"model.checkpoint={dirs / 'student'}", f"vae.checkpoint={dirs / 'vae'}", f"output_dir={out}",
        f"train.rewards=[{{name: '{REWARD_FILE}:Brightness'}}]", "train.iterations=2", "train.rollouts_per_worker=4",
        "train.group_size=2", "train.num_iter=4", "train.classes=[0,1,2,3,4,5,6,7,8,9]",
        f"train.class_names=[{','.join(NAMES)}]", "train.grid_every=0", "train.eval_per_class=0",
        "train.explore_std=0.1", "precision=bf16", *extra])


@pytest.mark.parametrize("algorithm", ["reward_gradient", "policy_gradient"])
def test_bf16_replays_are_exact(dirs, tmp_path, algorithm):
    # catches: the trainer replaying in another precision than the workers rolled out in (fp32 replay of
    # a bf16 rollout: tokens differ by ~1e-3, the on-policy ratio by ~1e-2 and the run stops)
    run_training(_recipe(dirs, tmp_path, f"train.algorithm={algorithm}", "train.num_workers=2"),
                 use_ray=False, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    key = "replay_max_abs_diff" if algorithm == "reward_gradient" else "pg/ratio_first_epoch_max_dev"
    assert len(rows) == 2 and all(r[key] == 0.0 for r in rows)


def test_compiled_generation_matches_eager(tiny_mar):
    # catches: compiled graphs specialised on the first step's token count and reused for another
    # (wrong shapes or a crash at step 2), a compiled head that drops the condition
    student = MARVAL.from_teacher(tiny_mar).eval()
    eager = _generate(student, "fp32")
    compiled = compile_generator(copy.deepcopy(student))
    again = _generate(compiled, "fp32")
    # the backbone: float32 kernels fused differently, rounding-level only (~1e-7 relative per op)
    mask, tokens, labels = torch.ones(3, student.seq_len), torch.zeros(3, student.seq_len, 16), torch.tensor([1, 4, 7])
    with torch.no_grad():
        z, z_compiled = student.condition(tokens, mask, labels), compiled.condition(tokens, mask, labels)
    torch.testing.assert_close(z_compiled, z, rtol=1e-5, atol=1e-5 * z.abs().max().item())
    # the tokens: a worst-case float32 bound. Each Linear of the head is dot products of length n, whose
    # rounding a reordering (fusion) may change by up to gamma_n = n u (u = 2^-24); along the head's path
    # at most sum(n) over its Linears. The one-step x0 = (noise - sqrt(1-ab) eps) / sqrt(ab) amplifies eps's
    # error by 1/sqrt(ab) (~13x at t = 950), and each of the K AR steps adds its own (a token drawn at
    # one step only enters later steps through the backbone, checked above to 1e-5). Measured here:
    # 1.2e-4 of the tokens' scale against a bound of 2.9e-3 for the tiny MAR; a wrong graph is off by O(1).
    u = 2.0 ** -24
    gamma = sum(m.in_features for m in student.one_step.net.modules() if isinstance(m, torch.nn.Linear)) * u
    ab = float(student.one_step.sqrt_ab) ** 2
    bound = 4 * gamma / ab ** 0.5 + 1e-5                        # K = 4 steps (_generate), + the backbone's
    scale = eager.tokens.abs().max().item()
    assert 1e-4 < bound < 0.05                                   # the bound itself is a meaningful size
    assert (again.tokens - eager.tokens).abs().max().item() < bound * scale
    assert compiled.state_dict().keys() == student.state_dict().keys()   # checkpoints are unchanged


def test_cuda_graph_modes_start_a_graph_iteration_and_copy_outputs_out(monkeypatch, tiny_mar):
    # catches: CUDA-graph modes that hand back the graph's own output buffer (the next replay of the same
    # graph, e.g. the decoder at the next AR step, overwrites tokens the loop already holds), a missing
    # new-iteration mark, and compile_generator ignoring compile_mode. The graphs themselves need a GPU
    # (benchmarks/gpu_check.sh); here torch.compile is replaced by a function with one output buffer,
    # which is how a recorded graph behaves on replay.
    import marval_rl.acceleration as acc

    marks, modes = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def fake_compile(fn, dynamic, mode):
        modes.append(mode)
        pool = {}

        def replay(*args, **kwargs):
            out = fn(*args, **kwargs)
            buf = pool.setdefault(tuple(out.shape), torch.empty_like(out))
            return buf.copy_(out)                     # every call writes the same memory
        return replay

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(acc, "check_compile", lambda mode="default": None)
    student = MARVAL.from_teacher(tiny_mar).eval()
    graphed = acc.compile_generator(copy.deepcopy(student), "reduce-overhead")
    assert modes == ["reduce-overhead"] * 3                      # encoder, decoder, one-step head
    mask, tokens = torch.ones(2, student.seq_len), torch.zeros(2, student.seq_len, 16)
    with torch.no_grad():
        first = graphed.condition(tokens, mask, torch.tensor([1, 2]))
        second = graphed.condition(tokens, mask, torch.tensor([5, 6]))      # replays the same graphs
        expected = student.condition(tokens, mask, torch.tensor([1, 2]))
        noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
        x_a = graphed.one_step(noise, first[0, :3])                         # the head's graph, twice
        x_b = graphed.one_step(noise, second[0, :3])
        x_expected = student.one_step(noise, expected[0, :3])
    assert len(marks) == 6                                       # encoder + decoder twice, head twice
    torch.testing.assert_close(first, expected, rtol=0, atol=0)  # not overwritten by the second call
    torch.testing.assert_close(x_a, x_expected, rtol=0, atol=0)
    assert not torch.equal(first, second) and not torch.equal(x_a, x_b)
    modes.clear()
    plain = acc.compile_generator(copy.deepcopy(student), "default")
    with torch.no_grad():
        plain.condition(tokens, mask, torch.tensor([1, 2]))
    assert modes == ["default"] * 3 and len(marks) == 6          # no CUDA graphs: nothing wrapped


def test_precision_and_compile_checks(monkeypatch):
    check_precision("bf16", "cpu")
    check_precision("fp32", "cuda")
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="unknown precision"):
        check_precision("float16", "cpu")
    import shutil

    with pytest.raises(PrecisionError, match="reduce-overhead records CUDA graphs"):
        check_compile_mode("reduce-overhead", "cpu")
    check_compile_mode("reduce-overhead", "cuda:0")
    check_compile_mode("default", "cpu")
    with pytest.raises(PrecisionError, match="unknown mode"):
        check_compile("fast")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(PrecisionError, match="C\\+\\+ compiler"):
        check_compile()


def test_bf16_distillation_is_close_to_fp32_exact_within_bf16_and_keeps_fp32_weights(tmp_path):
    # catches: a distiller that ignores `precision` (bf16 numbers equal to fp32), one whose bf16 path
    # changes the computation (a loss formed from other draws, guidance lost: O(1) apart), non-deterministic
    # bf16 kernels (two bf16 runs apart), and weights or optimiser state cast to bf16 (saved dtype)
    from marval_rl.cli import main
    from marval_rl.models.checkpoints import load_pretrained

    rows = {}
    for name, precision in [("fp32", "fp32"), ("bf16", "bf16"), ("bf16_again", "bf16")]:
        out = tmp_path / name
        assert main(["distill", str(Path(__file__).parents[1] / "recipes" / "distill_embedded.yaml"), f"output_dir={out}", f"precision={precision}",
                     "distill.generator_optim.steps=2", "distill.generator_optim.batch_size=8",
                     "distill.fake_optim.batch_size=8", "distill.log_every=1", "distill.sample_every=0",
                     "distill.checkpoint_every=0", "data.per_class=1"]) == 0
        rows[name] = [json.loads(x) for x in (out / "distill_metrics.jsonl").read_text().splitlines()]
    assert rows["bf16"] == [{**r, "seconds": a["seconds"]} for r, a in zip(rows["bf16_again"], rows["bf16"])]
    first32, first16 = rows["fp32"][0], rows["bf16"][0]
    # step 1 runs on the same weights and draws: the difference is bf16 rounding only, at most ~depth x u
    # relative (about ten matmul layers between the inputs and each loss, u = 2^-8): measured 0.1-0.3%
    for key in ("gsim_loss", "fake_loss", "x_std"):
        assert first16[key] != first32[key], key
        assert abs(first16[key] - first32[key]) <= 10 * BF16_EPS * abs(first32[key]), key
    student = load_pretrained(tmp_path / "bf16" / "student")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
