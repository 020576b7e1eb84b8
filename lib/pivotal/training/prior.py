"""DreamBooth prior preservation: the class images, found or generated, and their batches.

A run with ``class_prompt`` set trains, next to each batch of its own images, a batch of *class*
images (pictures of the class the concept belongs to, as the model draws it); their loss, times
``prior_loss_weight``, is added to the step's, so the model keeps drawing the class as before
(diffusers' ``train_dreambooth``: loss = instance loss + prior_loss_weight × prior loss).

Where the class images come from: the ``class_dir`` folder (any images; their captions are
replaced by ``class_prompt``), topped up to ``class_count`` by images the model generates **through
the host's own txt2img** (:meth:`~pivotal.host_api.TrainingHost.generate`: in the webuis the same
processing as previews, in the standalone host Pivotal's sampler), from ``class_prompt`` with no
negative prompt, no LoRA and no embeddings, before anything trains. Generated images are saved in
the folder (``OUT/class_images`` without ``class_dir``) as ``pivotal-class-<key>-<n>.png``, the key
a hash of what draws them (model label and id, base model, sampler, prompt, size, steps, guidance),
so a later run with the same key reuses them and one with another key ignores them. Image ``n`` is
drawn with seed ``n``: the cache is a pure function of its key.

Class images are bucketed like the training images (same resolution and bucket settings) and read
through the same latent cache; the batch order has its own seeded shuffle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pivotal.data.dataset import Dataset, DatasetOptions, run_preflight
from pivotal.data.images import is_image_name
from pivotal.errors import DatasetError, SaveError, TrainingError
from pivotal.host_api import TrainingHost
from pivotal.text.embeddings import EmbeddingSet
from pivotal.training.config import TrainConfig

GENERATED_PREFIX = "pivotal-class-"
#: the guidance scale of generated class images (the webuis' default CFG)
CLASS_GUIDANCE = 7.0
_GENERATED = re.compile(re.escape(GENERATED_PREFIX) + r"([0-9a-f]{16})-(\d+)\.png$")


@dataclass
class ClassImagesReport:
    """What prior preservation found and made: ``wanted`` (class_count, 0 = the folder's), the user's
    images ``found`` in the folder, generated images ``reused`` from an earlier run (same key),
    ``generated`` now, ``other_keys`` (generated for another model/prompt/size: not used),
    ``used`` (trained with), ``missing`` (not generated: the run was interrupted)."""

    folder: str
    prompt: str
    key: str
    wanted: int = 0
    found: int = 0
    reused: int = 0
    generated: int = 0
    other_keys: int = 0
    used: int = 0
    missing: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """The pre-flight report's lines."""
        head = f"Class images (prior preservation): {self.folder}, prompt {self.prompt!r}"
        body = (f"  {self.found} found, {self.reused} reused (generated earlier), {self.generated} generated now"
                f"{f', {self.missing} still missing' if self.missing else ''}; "
                f"{self.used} used of {self.wanted or 'all'} wanted")
        lines = [head, body]
        if self.other_keys:
            lines.append(f"  {self.other_keys} generated for another model, prompt or size: not used")
        return "\n".join(lines)


def class_folder(cfg: TrainConfig) -> Path:
    """Where the class images are read and generated ones cached."""
    return Path(cfg.class_dir) if cfg.class_dir else Path(cfg.out_dir) / "class_images"


def class_cache_key(host: TrainingHost, prompt: str, width: int, height: int, steps: int,
                    guidance: float = CLASS_GUIDANCE) -> str:
    """16 hex digits naming what a generated class image depends on. The host's label names the
    checkpoint (the webuis: its title; the standalone host: the file or folder), ``model_id`` its
    VAE; the UNet is not hashed (gigabytes), so two checkpoints with one name would share a key."""
    what = [host.label, host.model_id(), host.base_model, host.sampler, prompt, int(width), int(height),
            int(steps), host.generation_guidance(guidance)]  # the scale really drawn at
    return hashlib.sha256(json.dumps(what).encode("utf-8")).hexdigest()[:16]


def _scan(folder: Path, key: str) -> tuple[list[Path], dict[int, Path], int]:
    """(the user's images, {n: generated image n of ``key``}, count generated for other keys)."""
    user: list[Path] = []
    mine: dict[int, Path] = {}
    others = 0
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.startswith(".") or not is_image_name(path.name):
                continue
            m = _GENERATED.fullmatch(path.name)
            if m is None:
                user.append(path)
            elif m.group(1) == key:
                mine[int(m.group(2))] = path
            else:
                others += 1
    return user, mine, others


def _save_png(image: Any, path: Path) -> None:
    """Write a PIL image atomically (a hidden temp file, then a rename: a killed run leaves no half image)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"class image {path}: cannot write it ({e.strerror or e}); check the folder "
                        "(setting: class_dir)") from e


def _blank(image: Any) -> bool:
    """True for a picture of one colour (what a webui returns when it could not draw)."""
    extrema = image.convert("RGB").getextrema()
    return all(low == high for low, high in extrema)


def _plan(cfg: TrainConfig, host: TrainingHost) -> tuple[ClassImagesReport, list[Path], dict[int, Path]]:
    """(the report before generating, the images found to use, {n: cached generated image n})."""
    folder = class_folder(cfg)
    key = class_cache_key(host, cfg.class_prompt, cfg.resolution, cfg.resolution, cfg.class_steps)
    user, mine, others = _scan(folder, key)
    report = ClassImagesReport(str(folder), cfg.class_prompt, key, cfg.class_count, len(user), 0, 0, others)
    want = cfg.class_count or len(user) + len(mine)
    chosen = user[:want]
    reuse = [mine[n] for n in sorted(mine)][:want - len(chosen)]
    report.reused = len(reuse)
    chosen += reuse
    report.used, report.missing = len(chosen), want - len(chosen)
    return report, chosen, mine


def plan_class_images(cfg: TrainConfig, host: TrainingHost) -> ClassImagesReport:
    """What :func:`ensure_class_images` would find, without generating (``missing``: to generate)."""
    return _plan(cfg, host)[0]


def ensure_class_images(cfg: TrainConfig, host: TrainingHost, stop: threading.Event | None = None,
                        progress: Callable[[int, int], None] | None = None) -> tuple[ClassImagesReport, list[Path]]:
    """Find the class images and generate what ``class_count`` still lacks through ``host.generate``
    (call it before any LoRA is attached). Returns the report and the images to train with (the
    user's first, then generated ones by number). ``progress(done, total)`` after each generated
    image; ``stop`` set: generation ends early (what was made stays cached)."""
    report, chosen, mine = _plan(cfg, host)
    folder, key, size = Path(report.folder), report.key, cfg.resolution
    want = report.wanted or len(chosen)
    need = want - len(chosen)
    if need > 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SaveError(f"class images folder {folder}: cannot create it ({e.strerror or e}) "
                            "(setting: class_dir)") from e
        n = 0
        while report.generated < need:
            if stop is not None and stop.is_set():
                break
            if n not in mine:
                image = host.generate(cfg.class_prompt, "", EmbeddingSet(), cfg.class_steps, n, size, size,
                                      CLASS_GUIDANCE)
                if stop is not None and stop.is_set():
                    break  # a webui hands back a blank image when interrupted: never cache it
                if _blank(image):
                    raise TrainingError(f"class image {n}: the model gave a blank picture for {cfg.class_prompt!r} "
                                        "(a webui does while another checkpoint is loading); nothing cached. "
                                        "Generate one image in the webui first, or fill class_dir yourself")
                path = folder / f"{GENERATED_PREFIX}{key}-{n:05d}.png"
                _save_png(image, path)
                chosen.append(path)
                report.generated += 1
                if progress is not None:
                    progress(report.generated, need)
            n += 1
    report.missing = want - len(chosen)
    report.used = len(chosen)
    return report, chosen


def class_dataset(cfg: TrainConfig, images: list[Path], tokenizer: Any = None) -> Dataset:
    """The class images as a :class:`Dataset` bucketed like the training images, every caption
    ``class_prompt`` (no trigger). DatasetError naming class_dir for an unusable image, or when
    there is none."""
    folder = class_folder(cfg)
    if not images:
        raise DatasetError(f"class images: none in {folder} and none generated (settings: class_dir, class_count)")
    options = DatasetOptions(folder=str(folder), resolution=cfg.resolution, bucket_step=cfg.bucket_step,
                             bucketing=cfg.bucketing, batch_size=cfg.batch_size, shuffle_tags=cfg.shuffle_tags,
                             keep_tags=cfg.keep_tags, caption_dropout=cfg.caption_dropout, flip=cfg.flip,
                             skip_bad_images=cfg.skip_bad_images, seed=cfg.seed + 1)
    items, pre = run_preflight(options, {}, tokenizer)
    wanted = {str(p.resolve()) for p in images}
    items = [dataclasses.replace(it, caption=cfg.class_prompt, trigger="", caption_file=None)
             for it in items if str(Path(it.path).resolve()) in wanted]
    bad = [s for s in pre.skipped if str((folder / s.path).resolve()) in wanted]
    if bad and not cfg.skip_bad_images:
        listed = "\n".join(f"  {s.path}: {s.reason}" for s in bad[:20])
        raise DatasetError(f"class images in {folder}: {len(bad)} cannot be used:\n{listed}\nfix or remove them, "
                           "or set skip_bad_images=True (setting: class_dir)")
    if not items:
        raise DatasetError(f"class images: no usable image in {folder} (settings: class_dir, class_count)")
    return Dataset(items, options)
