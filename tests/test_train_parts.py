"""Settings, schedules, phases, losses and resume files, each on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pivotal.errors import ConfigError, TrainingError
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.config_file import load_config_file
from pivotal.training.losses import add_noise, min_snr_weights, training_target
from pivotal.training.optim import GroupSpec, apply_lrs, build_optimizer, phase_of, pull_norms, schedule_factor
from pivotal.training.state import RunState, load_state, model_fingerprint, save_state


def cfg(**kw) -> TrainConfig:
    base = {"data_dir": "d", "embeddings": [EmbeddingSpec("mychar")], "steps": 100}
    base.update(kw)
    return TrainConfig(**base).validate()


# -- settings ---------------------------------------------------------------------------------
def test_embedding_spec_parse() -> None:
    assert EmbeddingSpec.parse("mychar") == EmbeddingSpec("mychar", 2, "")
    assert EmbeddingSpec.parse("mychar:3:a red dog") == EmbeddingSpec("mychar", 3, "a red dog")
    with pytest.raises(ConfigError, match="--embedding 'x:two': VECTORS must be a whole number"):
        EmbeddingSpec.parse("x:two")


@pytest.mark.parametrize("kw,message", [
    ({"embeddings": []}, "embeddings: at least one embedding is needed"),
    ({"embeddings": [EmbeddingSpec("a"), EmbeddingSpec("A")]}, "embeddings: 'A' is listed twice"),
    ({"embeddings": [EmbeddingSpec("a", vectors=0)]}, "embeddings: 'a' has 0 vectors; use 1 to 16"),
    ({"steps": 0}, "steps: must be greater than 0, got 0"),
    ({"unet_lr": -1.0}, "unet_lr: must be 0 or more"),
    ({"caption_dropout": 1.5}, "caption_dropout: must be between 0 and 1"),
    ({"phase_plan": "sideways"}, "phase_plan: 'sideways' is not one of together, embeddings_first"),
    ({"resolution": 500}, "resolution: 500 is not a multiple of bucket_step 64"),
    ({"phase_plan": "embeddings_first", "embedding_steps": 100}, "embedding_steps: 100 leaves no LoRA steps"),
    ({"data_dir": ""}, "data_dir: the folder of training images is not set"),
])
def test_bad_settings_name_the_setting(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(**kw)


def test_from_dict_refuses_unknown_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting\\(s\\): unet_rnak"):
        TrainConfig.from_dict({"unet_rnak": 4})
    with pytest.raises(ConfigError, match="steps: expected int, got '10'"):
        TrainConfig.from_dict({"steps": "10"})
    p = tmp_path / "c.toml"
    p.write_text('data_dir = "x"\nsteps = 7\nembeddings = [{name = "a", vectors = 1, init_text = "dog"}]\n')
    c = TrainConfig.from_dict(load_config_file(p)).validate()
    assert c.steps == 7 and c.embeddings == [EmbeddingSpec("a", 1, "dog")]
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="config .*bad.json is not valid json"):
        load_config_file(bad)


# -- schedules and phases ----------------------------------------------------------------------
def test_schedules() -> None:
    assert schedule_factor("constant", 50, 100, 0) == 1.0
    assert schedule_factor("constant", 0, 100, 10) == pytest.approx(0.1)
    assert schedule_factor("cosine", 10, 110, 10) == pytest.approx(1.0)
    assert schedule_factor("cosine", 60, 110, 10) == pytest.approx(0.5)
    assert schedule_factor("linear", 100, 100, 0) == 0.0


def test_phase_plans_freeze_the_right_groups() -> None:
    together = cfg(freeze_embeddings_at=0.5)
    assert [phase_of(together, s) for s in (0, 49, 50)] == ["together", "together", "lora_only"]
    first = cfg(phase_plan="embeddings_first", embedding_steps=30, embedding_lr_after=1e-4)
    assert [phase_of(first, s) for s in (0, 29, 30)] == ["embeddings", "embeddings", "lora"]
    lora_p, emb_p = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = build_optimizer(first, [GroupSpec("unet", [lora_p], 1e-4, 0.01), GroupSpec("te", [], 1e-5, 0.01),
                                  GroupSpec("embeddings", [emb_p], first.embedding_lr, 0.0)])
    lrs = apply_lrs(opt, first, 0)
    assert lrs == {"unet": 0.0, "embeddings": first.embedding_lr} and not lora_p.requires_grad and emb_p.requires_grad
    lrs = apply_lrs(opt, first, 30)
    assert lrs == {"unet": 1e-4, "embeddings": pytest.approx(1e-4)} and lora_p.requires_grad
    lrs = apply_lrs(opt, together, 60)
    assert lrs["embeddings"] == 0.0 and not emb_p.requires_grad


def test_norm_pull_moves_toward_target() -> None:
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    pull_norms([v], target_norm=1.0, strength=1.0)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    w = torch.tensor([[30.0, 40.0]])
    pull_norms([w], target_norm=1.0, strength=0.1)
    assert 1.0 < float(w.norm()) < 50.0


# -- losses -----------------------------------------------------------------------------------
def test_targets_and_min_snr() -> None:
    ac = torch.linspace(0.99, 0.01, 1000)
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([0, 999])
    xt = add_noise(x0, eps, t, ac)
    torch.testing.assert_close(xt[0], ac[0].sqrt() * x0[0] + (1 - ac[0]).sqrt() * eps[0])
    assert torch.equal(training_target("epsilon", x0, eps, t, ac), eps)
    v = training_target("v_prediction", x0, eps, t, ac)
    torch.testing.assert_close(v[1], ac[999].sqrt() * eps[1] - (1 - ac[999]).sqrt() * x0[1])
    w = min_snr_weights(t, ac, 5.0, "epsilon")
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr)
    assert torch.equal(min_snr_weights(t, ac, 0.0, "epsilon"), torch.ones(2))


# -- resume files -----------------------------------------------------------------------------
def test_resume_file_round_trip_and_refusals(tmp_path: Path) -> None:
    lin = nn.Linear(3, 3)
    params = [("a", nn.Parameter(torch.randn(3))), ("b", nn.Parameter(torch.randn(2, 2)))]
    opt = torch.optim.AdamW([{"params": [p for _, p in params], "lr": 0.1}])
    sum(p.sum() for _, p in params).backward()
    opt.step()
    gen = torch.Generator().manual_seed(3)
    gen_state = gen.get_state()
    fp = model_fingerprint("sd1", [("lora_unet_x", lin)])
    path = tmp_path / "r.resume.safetensors"
    save_state(path, RunState(5, {"rank": 4}, fp, {"avg": 0.1, "n": 5}, [1.0, 0.5]), params, opt, gen)
    fresh = [("a", nn.Parameter(torch.zeros(3))), ("b", nn.Parameter(torch.zeros(2, 2)))]
    opt2 = torch.optim.AdamW([{"params": [p for _, p in fresh], "lr": 0.1}])
    gen2 = torch.Generator()
    st = load_state(path, {"rank": 4}, fp, fresh, opt2, gen2)
    assert st.step == 5 and st.losses == [1.0, 0.5]
    assert all(torch.equal(p1, p2) for (_, p1), (_, p2) in zip(params, fresh))
    assert torch.equal(gen2.get_state(), gen_state)
    for p1, p2 in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(p1["exp_avg"], p2["exp_avg"]) and torch.equal(p1["step"], p2["step"])
    with pytest.raises(TrainingError, match="was made with other settings: rank=4 there, 8 now"):
        load_state(path, {"rank": 8}, fp, fresh, opt2, gen2)
    other = model_fingerprint("sd1", [("lora_unet_x", nn.Linear(3, 3))])
    with pytest.raises(TrainingError, match="was made for another model"):
        load_state(path, {"rank": 4}, other, fresh, opt2, gen2)
    with pytest.raises(TrainingError, match=r"its trainable tensors differ from this run's \(2 there, 1 now\)"):
        load_state(path, {"rank": 4}, fp, fresh[:1], torch.optim.AdamW([fresh[0][1]]), gen2)
    meta_less = tmp_path / "x.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(meta_less))
    with pytest.raises(TrainingError, match="not a Pivotal resume file"):
        load_state(meta_less, {}, fp, fresh, opt2, gen2)
