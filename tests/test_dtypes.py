"""bf16 and float64 models: the AR loop, the teacher's head samplers and the one-step student follow
the parameters' dtype; they sample, replay exactly and save / load bit for bit."""
import copy

import pytest
import torch

from marval_rl.models import load_pretrained, save_pretrained
from marval_rl.models.one_step import MARVAL
from marval_rl.sampling import DiffusionSampler, sample_tokens
from marval_rl.models.head import timestep_features
from numerics import assert_within, timestep_feature_sigma

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on 2 shared cores


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float64], ids=["bf16", "float64"])
def teacher(request, tiny_mar):
    return copy.deepcopy(tiny_mar).to(request.param)


def _generate(model, **kw):
    with torch.no_grad():
        return sample_tokens(model, labels=[1, 4], num_iter=4, generator=torch.Generator().manual_seed(5), **kw)


def _check_replay_and_reload(model, arch, first, tmp_path):
    with torch.no_grad():
        again = sample_tokens(model, replay=first.record)
    assert torch.equal(first.tokens, again.tokens)
    save_pretrained(model, tmp_path / arch)
    loaded = load_pretrained(tmp_path / arch, expected=arch, dtype=model.dtype)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(sample_tokens(loaded, replay=first.record).tokens, first.tokens)
    # Without dtype, load_pretrained builds float32 as before (a float16-stored CLIP relies on it).
    assert load_pretrained(tmp_path / arch, expected=arch).dtype == torch.float32


def test_teacher_samples_replays_and_loads(teacher, tmp_path):
    # Catches: float32 tokens / timestep features in a bf16 or float64 model (dtype mismatch errors),
    # a replay that drifts, or load_pretrained casting the weights away from their dtype.
    first = _generate(teacher, cfg=2.0)  # the CFG path of the 100-step chain
    assert first.tokens.dtype == teacher.dtype and torch.isfinite(first.tokens.float()).all()
    if teacher.dtype == torch.float64:
        # The (float32) draws must enter a float64 chain exactly, not pull its first step into
        # float32: the same draws handed over as float64 give the same tokens to float64 rounding
        # (this computation's float32 bound, ~1e-2 at cfg 2, times eps64 / eps32 = 2**-29: ~2e-11).
        rec = copy.copy(first.record)
        rec.noise = [[d.double() for d in step] for step in first.record.noise]
        with torch.no_grad():
            torch.testing.assert_close(sample_tokens(teacher, replay=rec).tokens, first.tokens, rtol=0, atol=1e-9)
    _check_replay_and_reload(teacher, "mar", first, tmp_path)
    one = _generate(teacher, cfg=1.5, token_sampler=DiffusionSampler(teacher.diffloss, num_steps=1))
    assert one.tokens.dtype == teacher.dtype and torch.isfinite(one.tokens.float()).all()


def test_student_samples_replays_and_loads(teacher, tmp_path):
    # Catches: a student built in float32 from a bf16 / float64 teacher (weights rounded through
    # float32), or a one-step head that mixes dtypes.
    student = MARVAL.from_teacher(teacher)
    assert {p.dtype for p in student.parameters()} == {teacher.dtype}
    assert torch.equal(student.one_step.net.final_layer.linear.weight, teacher.diffloss.net.final_layer.linear.weight)
    assert torch.equal(student.fake_latent, teacher.fake_latent)
    first = _generate(student)
    assert first.tokens.dtype == teacher.dtype and torch.isfinite(first.tokens.float()).all()
    _check_replay_and_reload(student, "marval", first, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_timestep_features(dtype):
    # Catches: features computed in bf16 / fp16 (angles t f up to 999 rad keep no phase in 8-11 bits):
    # they must be the float32 features rounded once to the dtype.
    t = torch.arange(0, 1000, 7)
    exact = timestep_features(t, dtype=torch.float64)
    feats = timestep_features(t, dtype=dtype)
    assert feats.dtype == dtype
    # float32's own bound (numerics.timestep_feature_sigma), then one rounding of |value| <= 1.
    assert_within(feats, exact, timestep_feature_sigma(t) + torch.finfo(dtype).eps, str(dtype))
