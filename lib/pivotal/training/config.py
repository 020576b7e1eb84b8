"""Training settings: one dataclass, its defaults (with the reason for each), validation, and
conversion from the JSON / TOML the CLI, the app and the webui API share.

Every bad value raises ConfigError naming the setting and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pivotal.adapters.algorithms import AlgorithmSpec, algorithm_class, algorithm_names
from pivotal.errors import ConfigError
from pivotal.text.names import validate_embedding_name

PHASE_PLANS = ("together", "embeddings_first")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
ON_INTERRUPT = ("save", "discard")
LORA_PRESETS = ("attn", "attn-mlp", "attn-mlp-conv")


#: Settings of the built-in demo (tiny random model, 64 px synthetic data). Nothing to preserve and
#: few steps, so LRs well above the real defaults (and conv layers too) make the loss visibly fall
#: within a minute on a CPU. Shared by ``pivotal train --demo`` and ``pivotal app --demo``.
DEMO_SETTINGS: dict[str, Any] = {"resolution": 64, "bucket_step": 16, "steps": 150, "unet_lr": 2e-3,
                                 "embedding_lr": 1e-2, "lora_preset": "attn-mlp-conv"}
DEMO_EMBEDDING = "mychar:2:person"


@dataclass
class EmbeddingSpec:
    """One new embedding: its trigger name, vectors per encoder, and the init text."""

    name: str
    vectors: int = 2          # 2 vectors: the diffusers/cog pivotal recipe; 1-4 is the usual range
    init_text: str = ""       # a class word ("woman", "dog"); empty = random at the vocabulary's std

    @classmethod
    def parse(cls, text: str) -> "EmbeddingSpec":
        """``NAME[:VECTORS[:INIT TEXT]]`` as given on the command line."""
        name, _, rest = text.partition(":")
        vec_text, _, init = rest.partition(":")
        try:
            vectors = int(vec_text) if vec_text else 2
        except ValueError:
            raise ConfigError(f"--embedding {text!r}: VECTORS must be a whole number "
                              "(format NAME[:VECTORS[:INIT TEXT]])") from None
        return cls(name=name, vectors=vectors, init_text=init)


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the consensus of the best trainers
    (see README "Defaults"); each comment says why."""

    data_dir: str = ""
    out_dir: str = "output"
    output_name: str = "pivotal"
    embeddings: list[EmbeddingSpec] = field(default_factory=list)

    steps: int = 1000                 # ~1000 steps at batch 4 is the common SD1.5 pivotal budget
    batch_size: int = 1               # fits any GPU; raise with the memory you have
    grad_accum: int = 1
    seed: int = 0

    resolution: int = 512             # SD1.5's native size (use 1024 for SDXL)
    bucket_step: int = 64
    bucketing: bool = True            # keeps non-square images uncropped
    flip: bool = False                # off: flipping breaks asymmetric characters
    shuffle_tags: bool = False
    keep_tags: int = 1
    caption_dropout: float = 0.0
    skip_bad_images: bool = False
    latent_cache: str = "memory"      # "memory", "disk" or "off"

    lora_preset: str = "attn-mlp"     # attention + feed-forward: the kohya / OneTrainer default coverage
    unet_rank: int = 4                # bench/efficacy.py: rank 8 fits no better and drifts ~1.6x more
    unet_alpha: float = 4.0           # alpha = rank (scale 1): the scale the 1e-4 LR recipes assume
    unet_lr: float = 1e-4             # the consensus AdamW LR for UNet LoRA
    te_lora: bool = False             # off: the embeddings carry the concept, the TE stays intact
    te_rank: int = 4
    te_alpha: float = 4.0
    te_lr: float = 1e-5               # kept low: training the text encoder drifts the language model
    embedding_lr: float = 3e-3        # 30x the UNet LR (recipes: 10-30x): less drift than 10x (efficacy)
    lora_dropout: float = 0.0

    phase_plan: str = "together"      # diffusers/cog recipe: train together, freeze embeddings part-way
    freeze_embeddings_at: float = 0.5 # "together": fraction of steps after which embeddings freeze
    embedding_steps: int = 0          # "embeddings_first": steps of embeddings only (0 = 30% of steps)
    embedding_lr_after: float = 0.0   # "embeddings_first": embedding LR after phase 1 (0 = frozen)
    embedding_norm_pull: float = 0.1  # per step, pull each new vector's norm toward the vocabulary's

    optimizer: str = "adamw"
    weight_decay: float = 1e-2        # LoRA only; embeddings get none (decay would shrink them to 0)
    schedule: str = "constant"
    warmup_steps: int = 0
    precision: str = "fp32"           # "bf16"/"fp16" autocast on GPU; trainable tensors stay fp32
    gradient_checkpointing: bool = False
    prediction_type: str = "auto"     # "auto": what the model says
    min_snr_gamma: float = 5.0        # min-SNR weighting, gamma 5 (HF pivotal recipe); 0 = off
    noise_offset: float = 0.0
    max_bad_steps: int = 5            # consecutive non-finite losses before the run stops

    save_every: int = 0               # 0 = only at the end
    save_precision: str = "fp16"      # LoRA weights in the bundle (embeddings: fp32): half the size, no visible loss
    on_interrupt: str = "save"
    preview_every: int = 0
    preview_prompts: list[str] = field(default_factory=list)
    preview_steps: int = 20
    preview_size: int = 0             # 0 = the training resolution

    # -- the adapter algorithm (pivotal.adapters.algorithms); the webuis' built-in loaders read all
    unet_algorithm: str = "lora"      # "lora" (kohya LoRA; LoCon on convs), "loha", "lokr" (LyCORIS)
    te_algorithm: str = "lora"        # the same for the text encoder(s), when te_lora is on
    dora: bool = False                # DoRA (weight-decomposed: a magnitude per input column) on top
    conv_tucker: bool = False         # k x k convs: a Tucker core (lora_mid / hada_t1,t2 / lokr_t2)
    lokr_factor: int = -1             # LoKr: the small Kronecker factor's size (-1: as square as possible)

    def __post_init__(self) -> None:
        _out_dir_naming_a_bundle(self)  # before anything (the CLI's demo data) writes under out_dir

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every value; return self. Raises ConfigError naming the setting."""
        _out_dir_naming_a_bundle(self)
        if not self.embeddings:
            raise ConfigError("embeddings: at least one embedding is needed (e.g. --embedding mychar:2:woman)")
        seen = set()
        for e in self.embeddings:
            validate_embedding_name(e.name)
            if e.name.lower() in seen:
                raise ConfigError(f"embeddings: {e.name!r} is listed twice (names are case-insensitive)")
            seen.add(e.name.lower())
            if not 1 <= e.vectors <= 16:
                raise ConfigError(f"embeddings: {e.name!r} has {e.vectors} vectors; use 1 to 16")
        validate_embedding_name(self.output_name) if self.output_name else None
        _positive(self, "steps", "batch_size", "grad_accum", "resolution", "bucket_step",
                  "unet_rank", "te_rank", "preview_steps")
        _non_negative(self, "keep_tags", "embedding_steps", "warmup_steps", "save_every",
                      "preview_every", "preview_size", "max_bad_steps")
        _non_negative(self, "unet_lr", "te_lr", "embedding_lr", "embedding_lr_after", "weight_decay",
                      "min_snr_gamma", "noise_offset", "embedding_norm_pull", "unet_alpha", "te_alpha")
        _fraction(self, "caption_dropout", "freeze_embeddings_at", "lora_dropout")
        _choice(self, "phase_plan", PHASE_PLANS)
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "prediction_type", PREDICTIONS)
        _choice(self, "on_interrupt", ON_INTERRUPT)
        _choice(self, "lora_preset", LORA_PRESETS)
        _choice(self, "latent_cache", ("memory", "disk", "off"))
        _choice(self, "save_precision", ("fp16", "bf16", "fp32"))
        if self.resolution % self.bucket_step:
            raise ConfigError(f"resolution: {self.resolution} is not a multiple of bucket_step {self.bucket_step}")
        if self.lora_dropout >= 1.0:
            raise ConfigError("lora_dropout: must be below 1")
        if self.phase_plan == "embeddings_first" and self.embedding_steps >= self.steps:
            raise ConfigError(f"embedding_steps: {self.embedding_steps} leaves no LoRA steps out of "
                              f"steps={self.steps}")
        self._validate_algorithms()
        if not self.data_dir:
            raise ConfigError("data_dir: the folder of training images is not set (--data)")
        return self

    def _validate_algorithms(self) -> None:
        known = algorithm_names()
        for name in ("unet_algorithm", "te_algorithm"):
            _choice(self, name, known)
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor: {self.lokr_factor} is not -1 (automatic) or a positive size")
        if self.lora_dropout:
            used = [self.unet_algorithm] + ([self.te_algorithm] if self.te_lora else [])
            no_dropout = [a for a in used if not algorithm_class(a).supports_dropout]
            if no_dropout or self.dora:
                which = "dora" if self.dora else f"the {no_dropout[0]} algorithm"
                raise ConfigError(f"lora_dropout: {which} has no activation dropout (it works on the weight); "
                                  "set lora_dropout to 0")

    def algorithm_spec(self, part: str) -> AlgorithmSpec:
        """The algorithm to train on ``part`` ("unet" or "te"), with its options."""
        name = self.unet_algorithm if part == "unet" else self.te_algorithm
        return AlgorithmSpec(name, self.dora, {"tucker": self.conv_tucker, "factor": self.lokr_factor})

    def phase1_steps(self) -> int:
        """Steps of the embeddings-only phase ("embeddings_first"), or of joint training before
        the embeddings freeze ("together")."""
        if self.phase_plan == "embeddings_first":
            return self.embedding_steps or max(1, round(self.steps * 0.3))
        return round(self.steps * self.freeze_embeddings_at)

    # -- conversion ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original (paths and schedules of
        saving/previews may change between the two)."""
        d = self.to_dict()
        for k in ("data_dir", "out_dir", "save_every", "on_interrupt", "preview_every", "preview_prompts",
                  "preview_steps", "preview_size", "latent_cache", "save_precision", "output_name",
                  "max_bad_steps"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a JSON/TOML mapping; unknown keys are refused (a typo must not pass)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        values = dict(data)
        embs = values.get("embeddings", [])
        if not isinstance(embs, list):
            raise ConfigError("embeddings: must be a list of {name, vectors, init_text}")
        parsed = []
        for e in embs:
            if isinstance(e, EmbeddingSpec):
                parsed.append(e)
            elif isinstance(e, str):
                parsed.append(EmbeddingSpec.parse(e))
            elif isinstance(e, Mapping):
                extra = set(e) - {"name", "vectors", "init_text"}
                if extra:
                    raise ConfigError(f"embeddings: unknown field(s) {', '.join(sorted(extra))}")
                parsed.append(EmbeddingSpec(**e))
            else:
                raise ConfigError(f"embeddings: {e!r} is neither a string nor a table")
        values["embeddings"] = parsed
        cfg = cls(**values)
        for f in dataclasses.fields(cls):
            _check_type(f, getattr(cfg, f.name))
        return cfg


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` settings file into a dict (ConfigError naming the file)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from e
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8-sig"))
        else:
            try:
                import tomllib  # Python 3.11+
            except ModuleNotFoundError:  # Python 3.10 (the webui's): the tomli backport
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise ConfigError(f"reading {p} needs Python 3.11 or the 'tomli' package; "
                                      "use a .json config instead") from None
            data = tomllib.loads(raw.decode("utf-8-sig"))
    except ConfigError:
        raise
    except Exception as e:  # json/toml decode errors of either module
        raise ConfigError(f"config {p} is not valid {p.suffix.lstrip('.') or 'TOML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must hold a table of settings")
    return data


# -- small validators ------------------------------------------------------------------------
_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _check_type(f: dataclasses.Field, value: Any) -> None:
    t = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
    if t is None:
        return
    ok = isinstance(value, _TYPES[t]) and not (t in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{f.name}: expected {t.__name__}, got {value!r}")


def _positive(cfg: TrainConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ConfigError(f"{n}: must be greater than 0, got {getattr(cfg, n)}")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise ConfigError(f"{n}: must be 0 or more, got {getattr(cfg, n)}")


def _fraction(cfg: TrainConfig, *names: str) -> None:
    for n in names:
        if not 0.0 <= getattr(cfg, n) <= 1.0:
            raise ConfigError(f"{n}: must be between 0 and 1, got {getattr(cfg, n)}")


def _choice(cfg: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{name}: {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")


def _out_dir_naming_a_bundle(cfg: TrainConfig) -> None:
    """``out_dir`` given as ``DIR/NAME.safetensors`` (``pivotal train --out X.safetensors``) means
    the bundle's path: out_dir becomes DIR and output_name NAME (an existing folder of that name
    stays a folder). Refused when output_name was also set to another name."""
    path = Path(cfg.out_dir)
    if path.suffix.lower() != ".safetensors" or path.is_dir():
        return
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "output_name")
    if cfg.output_name not in (default, path.stem):
        raise ConfigError(f"out_dir {cfg.out_dir!r} names the bundle file {path.name} but output_name is "
                          f"{cfg.output_name!r}; give a folder as out_dir, or leave output_name out")
    cfg.out_dir, cfg.output_name = str(path.parent), path.stem
