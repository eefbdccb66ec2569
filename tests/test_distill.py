"""`marval-rl distill` and the MARVAL one-step student: real training steps, resume, replay, bad input."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY_MAR, tiny_constructor
from marval_rl.cli import main
from marval_rl.config import DistillSection, ModelSection, RecipeError, load_recipe
from marval_rl.loading import load_generator
from marval_rl.models import AutoencoderKL, VAEConfig, load_official_mar, load_pretrained, save_pretrained
from marval_rl.models.one_step import MARVAL, OneStepSampler
from marval_rl.sampling import sample_tokens

RECIPE = Path(__file__).parents[1] / "recipes" / "distill_embedded.yaml"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The reference tiny teacher (64 px, stride 16) and a small stride-16 VAE, as marval-rl dirs."""
    root = tmp_path_factory.mktemp("pair")
    teacher = load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor())
    save_pretrained(teacher, root / "teacher")
    torch.manual_seed(0)
    save_pretrained(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1, 1, 1), num_groups=8, attn_resolutions=(),
                                            resolution=64)), root / "vae")
    return root


def args(pair, out, *extra):
    return ["distill", str(RECIPE), f"model.checkpoint={pair / 'teacher'}", f"vae.checkpoint={pair / 'vae'}",
            "data.image_size=64", "data.per_class=1", "data.classes=[0,1,2,3,4,5,6,7,8,9]", f"output_dir={out}",
            "distill.generator_optim.batch_size=4", "distill.fake_optim.batch_size=4", "distill.log_every=1",
            "distill.sample_every=0", *extra]


def test_student_starts_as_teacher_x0_prediction():
    teacher = load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor())
    student = MARVAL.from_teacher(teacher, init_timestep=900)
    z, noise = torch.randn(5, 64), torch.randn(5, 16)
    t = torch.full((5,), 900)
    ab = float(teacher.diffloss.train_diffusion.alphas_cumprod[900])
    eps = teacher.diffloss.net(noise, t, z)[:, :16]
    # catches: a wrong eps -> x0 conversion, t* off by one or ignored, the head not copied from the teacher
    torch.testing.assert_close(student.one_step(noise, z), (noise - (1 - ab) ** 0.5 * eps) / ab ** 0.5)
    for k, v in teacher.state_dict().items():  # backbone copied under the official key names
        if not k.startswith("diffloss."):
            assert torch.equal(student.state_dict()[k], v)
    assert not hasattr(student, "diffloss")


def test_student_replay_is_exact_and_roundtrips(tmp_path):
    teacher = load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor())
    student = MARVAL.from_teacher(teacher)
    with torch.no_grad():
        a = sample_tokens(student, labels=[1, 2], num_iter=4, generator=torch.Generator().manual_seed(0))
        b = sample_tokens(student, replay=a.record)
    # catches: one-step draws that the replay record misses (RL's log-probs would be of other samples)
    assert torch.equal(a.tokens, b.tokens)
    assert [len(d) for d in a.record.noise] == [1, 1, 1, 1]  # one draw per AR step
    with pytest.raises(ValueError, match="guidance distilled in"):
        sample_tokens(student, labels=[1], num_iter=2, cfg=2.0)
    save_pretrained(student, tmp_path / "s")
    again = load_pretrained(tmp_path / "s", expected="marval")
    with torch.no_grad():
        c = sample_tokens(again, replay=a.record)
    # catches: save/load dropping or renaming the one-step head's weights or t*
    assert torch.equal(a.tokens, c.tokens)


def test_distill_few_steps_and_exact_resume(pair, tmp_path, capsys):
    straight, split = tmp_path / "a", tmp_path / "b"
    common = ["distill.checkpoint_every=1"]
    assert main(args(pair, straight, *common, "distill.generator_optim.steps=4")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and Path(summary["student"]).is_dir()
    assert main(args(pair, split, *common, "distill.generator_optim.steps=2")) == 0
    assert main(args(pair, split, *common, "distill.generator_optim.steps=4")) == 0
    sa = load_pretrained(straight / "student").state_dict()
    sb = load_pretrained(split / "student").state_dict()
    # catches: a resume that loses S_phi, an optimiser, the EMA or the RNG state (weights or losses drift)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la = [json.loads(x)["gsim_loss"] for x in (straight / "distill_metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["gsim_loss"] for x in (split / "distill_metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4
    # only the head trained: the backbone is still the teacher's (catches: train_backbone=false ignored,
    # or the student's head never updated)
    teacher = load_pretrained(pair / "teacher").state_dict()
    assert torch.equal(sa["encoder_blocks.0.attn.qkv.weight"], teacher["encoder_blocks.0.attn.qkv.weight"])
    assert not torch.equal(sa["one_step.net.input_proj.weight"], teacher["diffloss.net.input_proj.weight"])


def test_distill_bad_input(pair, tmp_path, capsys):
    assert main(args(pair, tmp_path, "distill.cfg=0.5")) == 2
    assert "distill.cfg must be >= 1 (MAR's guidance scale, 1 = no guidance), got 0.5" in capsys.readouterr().err
    assert main(args(pair, tmp_path, "distill.huber_r=0")) == 2
    assert "huber_r must be > 0" in capsys.readouterr().err
    # teacher/VAE pair of different latent sizes (a stride-4 VAE for a stride-16 teacher)
    save_pretrained(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1), num_groups=8, attn_resolutions=())),
                    tmp_path / "vae4")
    assert main(args(pair, tmp_path, f"vae.checkpoint={tmp_path / 'vae4'}")) == 2
    assert "stride 16" in capsys.readouterr().err
    assert main(args(pair, tmp_path, "data.per_class=0")) == 2
    assert "empty" in capsys.readouterr().err
    # a student given where a teacher is expected, and a teacher where a student is expected
    student = MARVAL.from_teacher(load_pretrained(pair / "teacher"))
    save_pretrained(student, tmp_path / "student")
    assert main(args(pair, tmp_path, f"model.checkpoint={tmp_path / 'student'}")) == 2
    assert "'marval' checkpoint, but a 'mar' is expected" in capsys.readouterr().err
    from marval_rl.models.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="'mar' checkpoint, but a 'marval' is expected"):
        load_generator(ModelSection(checkpoint=str(pair / "teacher")), expected="marval")


def test_guidance_key_is_mars_cfg(tmp_path, capsys):
    """distill.cfg is MAR's scale (1 = none); the paper's 1.2 for B/L/H, 2.2 for the shipped embedded student."""
    recipes = Path(__file__).parents[1] / "recipes"
    assert DistillSection().cfg == 1.2
    for name in ("distill_b", "distill_l", "distill_h"):
        assert load_recipe(recipes / f"{name}.yaml").distill.cfg == 1.2, name
    assert load_recipe(RECIPE).distill.cfg == 2.2   # what marval_rl/assets/embedded/student was distilled at
    # the old key, (1 + w) eps(c) - w eps(null), fails naming what it became, from a file and an override
    old = tmp_path / "old.yaml"
    old.write_text(RECIPE.read_text().replace("distill:\n", "distill:\n  guidance_w: 1.2\n"))
    msg = "recipe key 'distill.guidance_w' is now 'distill.cfg' (distill.guidance_w=1.2 is distill.cfg=2.2)"
    with pytest.raises(RecipeError, match=re.escape(msg)):
        load_recipe(old)
    assert main(["validate", str(RECIPE), "distill.guidance_w=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(distill.guidance_w=0.5 is distill.cfg=1.5)" in err, err
    assert "cfg = 1 + guidance_w" in err
