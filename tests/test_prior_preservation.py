"""DreamBooth prior preservation (pivotal.training.prior): class images are generated through the
host's own txt2img (no LoRA, no embeddings), cached under a key and reused by the next run, shown
in the pre-flight report and recorded in the bundle; the class loss, times prior_loss_weight, is
part of every step's loss."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.errors import ConfigError  # noqa: E402
from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.progress import ProgressEvent  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402
from pivotal.ui.dataset_check import check_dataset  # noqa: E402

# ``host`` (the demo sd1 host) and ``data_dir`` (its dataset) are fixtures in conftest.py.
CLASS_PROMPT = "a red circle on a blue background"


def config(data_dir: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), output_name="pp", steps=1, resolution=64,
                bucket_step=16, embeddings=[EmbeddingSpec("mychar", 2, "person")], unet_lr=1e-3,
                embedding_lr=1e-2, save_precision="fp32", seed=5, class_prompt=CLASS_PROMPT, class_count=2,
                class_steps=2)
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    """Records the host's generate calls (the real host draws each image) and whether a LoRA
    was attached to the UNet then."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.calls: list[tuple[str, str, int, int]] = []
        self.original = host.generate

    def __enter__(self) -> "Recorder":
        def generate(prompt: str, negative: str, embeddings: EmbeddingSet, steps: int, seed: int, *rest: Any) -> Any:
            assert len(embeddings) == 0  # no embedding takes part in a class image
            assert not any("lora" in type(m).__name__.lower() for m in self.host.unet.modules())
            self.calls.append((prompt, negative, steps, seed))
            return self.original(prompt, negative, embeddings, steps, seed, *rest)

        self.host.generate = generate
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.host.generate  # the class's method again


def unet_digest(host: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(host.unet.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_class_images_are_generated_through_the_host_cached_and_reused(host, data_dir: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes"
    before = unet_digest(host)
    events: list[ProgressEvent] = []
    # the form's "Check dataset" says what will be drawn, and draws nothing
    assert "0 generated earlier (reused), 2 to generate" in check_dataset(config(data_dir, tmp_path / "a",
                                                                                 class_dir=str(classes)), host)
    assert not classes.exists()
    with Recorder(host) as rec:
        first = train(config(data_dir, tmp_path / "a", class_dir=str(classes)), host, on_event=events.append)
    assert first.status == "completed"
    assert rec.calls == [(CLASS_PROMPT, "", 2, 0), (CLASS_PROMPT, "", 2, 1)]
    made = sorted(p.name for p in classes.iterdir())
    assert len(made) == 2 and all(n.startswith("pivotal-class-") and n.endswith(".png") for n in made)
    pre = next(e for e in events if e.kind == "preflight")
    assert pre.data["class_images"]["generated"] == 2 and pre.data["class_images"]["reused"] == 0
    assert "2 generated now" in pre.message
    prior = json.loads(read_header(first.bundle_path).metadata["pivotal.prior"])
    assert (prior["generated"], prior["used"], prior["prompt"], prior["prior_loss_weight"]) == (2, 2, CLASS_PROMPT, 1.0)
    assert unet_digest(host) == before  # the host is as before the run (generation and training)

    # the next run (another output folder) generates nothing: the same key finds both images
    events.clear()
    with Recorder(host) as rec:
        second = train(config(data_dir, tmp_path / "b", class_dir=str(classes)), host, on_event=events.append)
    assert second.status == "completed" and rec.calls == []
    pre = next(e for e in events if e.kind == "preflight")
    assert (pre.data["class_images"]["reused"], pre.data["class_images"]["generated"]) == (2, 0)
    assert "2 reused" in pre.message
    assert "2 generated earlier (reused), 0 to generate" in check_dataset(
        config(data_dir, tmp_path / "b", class_dir=str(classes)), host)

    # another size is another key: those images are not used, one new one is made
    with Recorder(host) as rec:
        third = train(config(data_dir, tmp_path / "c", class_dir=str(classes), class_count=1, resolution=48), host,
                      on_event=events.append)
    assert third.status == "completed" and len(rec.calls) == 1
    assert events[-1].kind == "done"
    pre = [e for e in events if e.kind == "preflight"][-1]
    assert pre.data["class_images"]["other_keys"] == 2


def test_user_class_images_are_used_before_generating(host, data_dir: Path, tmp_path: Path) -> None:
    classes = tmp_path / "mine"
    classes.mkdir()
    for p in sorted(data_dir.glob("*.png"))[:2]:
        (classes / p.name).write_bytes(p.read_bytes())
    with Recorder(host) as rec:
        result = train(config(data_dir, tmp_path / "o", class_dir=str(classes), class_count=3), host)
    assert result.status == "completed" and len(rec.calls) == 1
    prior = json.loads(read_header(result.bundle_path).metadata["pivotal.prior"])
    assert (prior["found"], prior["generated"], prior["used"]) == (2, 1, 3)
    assert read_header(result.bundle_path).metadata["ss_num_reg_images"] == "3"  # kohya's count of them


def test_the_class_loss_is_part_of_the_step_loss(host, data_dir: Path, tmp_path: Path) -> None:
    """The first step's loss is drawn before any update: with the same random draws it must be
    instance loss + w × class loss, linear in w, and larger than the instance loss alone."""
    classes = tmp_path / "classes"
    classes.mkdir()
    for p in sorted(data_dir.glob("*.png"))[2:]:
        (classes / p.name).write_bytes(p.read_bytes())
    losses = {}
    for w in (0.0, 1.0, 2.0):
        result = train(config(data_dir, tmp_path / f"w{w}", class_dir=str(classes), class_count=0,
                              prior_loss_weight=w), host)
        losses[w] = result.losses[0]
    class_loss = losses[1.0] - losses[0.0]
    assert class_loss > 1e-4
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * class_loss, rel=1e-4)


def test_prior_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="class_prompt: class_dir is set"):
        TrainConfig(data_dir="d", embeddings=[EmbeddingSpec("a")], class_dir="c").validate()
    with pytest.raises(ConfigError, match="class_count: prior preservation"):
        TrainConfig(data_dir="d", embeddings=[EmbeddingSpec("a")], class_prompt="a dog").validate()


def test_a_blank_class_image_is_refused_not_cached(host, data_dir: Path, tmp_path: Path) -> None:
    """A webui hands back a blank picture when it cannot draw (Forge while a checkpoint waits to
    load): the run stops before training instead of caching it as a class image."""
    from PIL import Image

    from pivotal.errors import TrainingError

    classes = tmp_path / "classes"
    host.generate = lambda prompt, negative, embeddings, steps, seed, w, h, g: Image.new("RGB", (w, h))
    try:
        with pytest.raises(TrainingError, match="blank picture"):
            train(config(data_dir, tmp_path / "o", class_dir=str(classes)), host)
    finally:
        del host.generate
    assert not any(classes.glob("*.png"))
