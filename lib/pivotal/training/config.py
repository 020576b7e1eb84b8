"""Training settings: one dataclass, its defaults (with the reason for each), and conversion from
the JSON / TOML the CLI, the app and the webui API share (the checks across settings:
:mod:`pivotal.training.config_checks`; reading a settings file: :mod:`pivotal.training.config_file`).

Each field is declared once, with :func:`~pivotal.training.settings.setting`: its help, group,
limits or choices and how it shows (flag name, form widget, advanced-only). A new setting is one
such line; its flag, form input, schema entry and checks follow from it. Every bad value raises
ConfigError naming the setting and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from pivotal.adapters.algorithms import AlgorithmSpec, algorithm_names
from pivotal.errors import ConfigError
from pivotal.text.names import validate_embedding_name
from pivotal.training.config_checks import check_config, check_field_type
from pivotal.training.rewards import parse_reward_entries
from pivotal.training.settings import (
    BELOW_ONE,
    FORM_ADVANCED,
    FORM_NONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Limits,
    setting,
)

PHASE_PLANS = ("together", "embeddings_first")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
ON_INTERRUPT = ("save", "discard")
LORA_PRESETS = ("attn", "attn-mlp", "attn-mlp-conv")
MODES = ("pivotal", "textcraftor")


#: Settings added after resume files were first written, at their defaults: a resume file that
#: does not record them matches a run that leaves them there.
NEWER_SETTINGS = ("max_grad_norm", "zero_terminal_snr", "folder_repeats", "masked_loss", "unmasked_weight",
                  "class_prompt", "class_count", "prior_loss_weight", "class_steps", "dreamartist",
                  "dreamartist_cfg", "dreamartist_suffix", "dreamartist_vectors", "mode", "reward", "reward_prompts",
                  "reward_prompts_file", "textcraftor_sample_steps", "textcraftor_grad_steps", "textcraftor_guidance",
                  "textcraftor_unet", "reward_clip_model", "reward_aesthetic_file")


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
    (see README "Defaults"); each comment says why. Each field is declared with
    :func:`~pivotal.training.settings.setting` (help, group, limits, how it shows): the CLI flags,
    the config schema, the Train form and the API model are generated from these declarations."""

    data_dir: str = setting("", "the folder of training images, with captions in IMAGE.txt or IMAGE.caption",
                            group="run", flag="data", metavar="DIR", label="Dataset folder (images + .txt captions)")
    out_dir: str = setting("output", "the folder for the bundle, its resume file and step saves (the --out flag "
                           "also takes the bundle's own path, X.safetensors)", group="run",
                           flag="out", metavar="DIR", label="Output folder")
    output_name: str = setting("pivotal", "the bundle's name: OUT/NAME.safetensors, <lora:NAME:1> in prompts",
                               group="run", flag="name", metavar="NAME", label="Bundle name",
                               check=lambda v: validate_embedding_name(v) if v else None)
    embeddings: list[EmbeddingSpec] = setting(
        [], "a new embedding (repeatable): NAME[:VECTORS[:INIT TEXT]], e.g. mychar:2:woman; in a file a list "
        "of {name, vectors, init_text} tables (or of such strings)", group="run", flag="embedding",
        metavar="NAME[:VECTORS[:INIT TEXT]]", label="Embeddings")

    mode: str = setting("pivotal", "pivotal: LoRA + embeddings learnt from a dataset; textcraftor: a text-encoder "
                        "LoRA fine-tuned by a reward on sampled pictures, from prompts only (no dataset)",
                        group="run", choices=MODES, widget="radio", label="training mode")
    # ~1000 steps at batch 4 is the common SD1.5 pivotal budget
    steps: int = setting(1000, "training steps", group="run", limits=POSITIVE)
    # fits any GPU; raise with the memory you have
    batch_size: int = setting(1, "images per step", group="run", limits=POSITIVE, label="batch size")
    grad_accum: int = setting(1, "steps whose gradients add up before each optimizer update", group="optimizer",
                              limits=POSITIVE, label="gradient accumulation")
    seed: int = setting(0, "the seed of every random choice (same seed, data and settings: same run)", group="run")

    # SD1.5's native size (use 1024 for SDXL)
    resolution: int = setting(512, "training size in pixels (the bucket area for non-square images)", group="run",
                              limits=POSITIVE)
    bucket_step: int = setting(64, "bucket sides are multiples of this (resolution must be one too)", group="data",
                               limits=POSITIVE, form=FORM_ADVANCED, label="bucket step")
    # keeps non-square images uncropped
    bucketing: bool = setting(True, "group images by aspect ratio instead of cropping them square", group="data",
                              label="aspect-ratio buckets")
    # off: flipping breaks asymmetric characters
    flip: bool = setting(False, "also train on mirrored images (not for asymmetric characters)", group="data",
                         label="flip images (not for asymmetric characters)")
    shuffle_tags: bool = setting(False, "shuffle comma-separated caption tags each step (after keep_tags)",
                                 group="data", label="shuffle tags")
    keep_tags: int = setting(1, "leading caption tags that stay in place when tags are shuffled", group="data",
                             limits=NON_NEGATIVE, label="keep tags")
    caption_dropout: float = setting(0.0, "fraction of steps that train an image with an empty caption",
                                     group="data", limits=FRACTION, label="caption dropout")
    skip_bad_images: bool = setting(False, "leave out unreadable images instead of refusing the dataset",
                                    group="data", label="skip unreadable images")
    # kohya's folder convention: 10_name/ = every image in it ten times per epoch
    folder_repeats: bool = setting(True, "read a sub-folder named N_name (kohya) as N repeats of its images per "
                                   "epoch; a loss_scale.txt (EveryDream2) in a folder weights its images' loss",
                                   group="data", label="N_name folder repeats and loss_scale.txt")
    masked_loss: bool = setting(False, "weight the loss by a mask per image: mask_dir/IMAGE-STEM.png, else the "
                                "image's alpha channel (white = trained, black = unmasked_weight)", group="data",
                                label="masked loss")
    mask_dir: str = setting("", "the folder of masks, one per image with the image's relative path and stem "
                            "(empty: the images' alpha channels)", group="data", metavar="DIR",
                            label="mask folder (empty = alpha channel)")
    unmasked_weight: float = setting(0.0, "masked loss: the loss weight of the area outside the mask (0 = ignored)",
                                     group="data", limits=FRACTION, label="masked loss: weight outside the mask")
    latent_cache: str = setting("memory", "where encoded latents are kept between epochs", group="data",
                                choices=("memory", "disk", "off"), form=FORM_ADVANCED, label="latent cache")

    # attention + feed-forward: the kohya / OneTrainer default coverage
    lora_preset: str = setting("attn-mlp", "the UNet modules a LoRA is trained on", group="lora",
                               choices=LORA_PRESETS, label="LoRA preset (modules trained)")
    # bench/efficacy.py: rank 8 fits no better and drifts ~1.6x more
    unet_rank: int = setting(4, "UNet LoRA rank", group="lora", limits=POSITIVE, label="UNet rank")
    # alpha = rank (scale 1): the scale the 1e-4 LR recipes assume
    unet_alpha: float = setting(4.0, "UNet LoRA alpha (scale = alpha / rank)", group="lora", limits=NON_NEGATIVE,
                                label="UNet alpha")
    # the consensus AdamW LR for UNet LoRA
    unet_lr: float = setting(1e-4, "UNet LoRA learning rate", group="lora", limits=NON_NEGATIVE, label="UNet LR")
    # off: the embeddings carry the concept, the TE stays intact
    te_lora: bool = setting(False, "also train a text-encoder LoRA", group="lora", label="text-encoder LoRA")
    te_rank: int = setting(4, "text-encoder LoRA rank", group="lora", limits=POSITIVE, label="TE rank")
    te_alpha: float = setting(4.0, "text-encoder LoRA alpha", group="lora", limits=NON_NEGATIVE, label="TE alpha")
    # kept low: training the text encoder drifts the language model
    te_lr: float = setting(1e-5, "text-encoder LoRA learning rate", group="lora", limits=NON_NEGATIVE,
                           label="TE LR")
    # 30x the UNet LR (recipes: 10-30x): less drift than 10x (efficacy)
    embedding_lr: float = setting(3e-3, "learning rate of the new embeddings", group="lora", limits=NON_NEGATIVE,
                                  label="embedding LR")
    lora_dropout: float = setting(0.0, "dropout on the LoRA path while training", group="lora", limits=BELOW_ONE,
                                  form=FORM_ADVANCED, label="LoRA dropout")

    # diffusers/cog recipe: train together, freeze embeddings part-way
    phase_plan: str = setting("together", "together: embeddings and LoRA train at once, the embeddings freeze at "
                              "freeze_embeddings_at; embeddings_first: embeddings alone, then the LoRA",
                              group="lora", choices=PHASE_PLANS, widget="radio", label="phase plan")
    freeze_embeddings_at: float = setting(0.5, "together: the fraction of steps after which the embeddings freeze",
                                          group="lora", limits=FRACTION, widget="slider", step=0.05,
                                          label="together: freeze embeddings after (fraction)")
    embedding_steps: int = setting(0, "embeddings_first: steps of embeddings alone (0 = 30% of steps)",
                                   group="lora", limits=NON_NEGATIVE, label="embeddings first: steps (0 = 30%)")
    embedding_lr_after: float = setting(0.0, "embeddings_first: the embedding LR once the LoRA trains (0 = frozen)",
                                        group="lora", limits=NON_NEGATIVE,
                                        label="embeddings first: embedding LR after (0 = frozen)")
    # per step, pull each new vector's norm toward the vocabulary's
    embedding_norm_pull: float = setting(0.1, "per step, pull each new vector's norm toward the vocabulary's mean "
                                         "norm by this fraction (0 = off)", group="lora", limits=NON_NEGATIVE,
                                         form=FORM_ADVANCED, label="embedding norm pull")

    optimizer: str = setting("adamw", "adamw8bit needs bitsandbytes, prodigy the prodigyopt package",
                             group="optimizer", choices=OPTIMIZERS, elem="optimizer-name", label="optimizer")
    # LoRA only; embeddings get none (decay would shrink them to 0)
    weight_decay: float = setting(1e-2, "weight decay of the LoRA weights (embeddings get none)", group="optimizer",
                                  limits=NON_NEGATIVE, label="weight decay (LoRA)")
    schedule: str = setting("constant", "learning-rate schedule after the warmup", group="optimizer",
                            choices=SCHEDULES, label="LR schedule")
    warmup_steps: int = setting(0, "steps of linear LR warmup", group="optimizer", limits=NON_NEGATIVE,
                                label="warmup steps")
    # "bf16"/"fp16" autocast on GPU; trainable tensors stay fp32
    precision: str = setting("fp32", "compute precision (bf16/fp16: autocast on a GPU; trained tensors stay "
                             "fp32)", group="optimizer", choices=PRECISIONS,
                             label="precision (bf16/fp16: autocast on a GPU)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                           "slower steps", group="optimizer",
                                           label="gradient checkpointing (less memory)")
    # "auto": what the model says
    prediction_type: str = setting("auto", "what the UNet predicts (auto: what the model says)", group="optimizer",
                                   choices=PREDICTIONS, form=FORM_ADVANCED, label="prediction type")
    # min-SNR weighting, gamma 5 (HF pivotal recipe); 0 = off
    min_snr_gamma: float = setting(5.0, "min-SNR loss weighting gamma (0 = off)", group="optimizer",
                                   limits=NON_NEGATIVE, label="min-SNR gamma (0 = off)")
    noise_offset: float = setting(0.0, "noise offset (brighter brights, darker darks)", group="optimizer",
                                  limits=NON_NEGATIVE, label="noise offset")
    # kohya / diffusers default; 0 = off
    max_grad_norm: float = setting(1.0, "clip the norm of all trained gradients to this before each update "
                                   "(0 = off)", group="optimizer", limits=NON_NEGATIVE,
                                   label="max gradient norm (0 = off)")
    # Lin et al. 2023: the last timestep is pure noise, as sampling starts; needs v-prediction
    zero_terminal_snr: bool = setting(False, "rescale the noise schedule so its last timestep has SNR 0 (Lin et al. "
                                      "2023; needs prediction_type v_prediction)", group="optimizer",
                                      form=FORM_ADVANCED, label="zero terminal SNR (needs v-prediction)")
    # consecutive non-finite losses before the run stops
    max_bad_steps: int = setting(5, "consecutive steps with a NaN/inf loss (each skipped) before the run stops",
                                 group="optimizer", limits=NON_NEGATIVE, form=FORM_ADVANCED,
                                 label="bad steps before stopping")

    save_every: int = setting(0, "also save NAME-stepNNNNNN.* every N steps (0 = only at the end)", group="saving",
                              limits=NON_NEGATIVE, label="save every (steps, 0 = end only)")
    # LoRA weights in the bundle (embeddings always fp32): half the size, no visible loss
    save_precision: str = setting("fp16", "precision of the LoRA weights in the bundle (embeddings are always "
                                  "fp32)", group="saving", choices=("fp16", "bf16", "fp32"), label="save precision")
    on_interrupt: str = setting("save", "what an interrupted run does with what it trained", group="saving",
                                choices=ON_INTERRUPT, widget="radio", label="on interrupt")
    preview_every: int = setting(0, "render preview images every N steps (0 = off)", group="saving",
                                 limits=NON_NEGATIVE, label="preview every (steps, 0 = off)")
    preview_prompts: list[str] = setting([], "a preview prompt (repeatable; none = the embedding names)",
                                         group="saving", flag="preview-prompt", metavar="PROMPT",
                                         label="preview prompts (one per line; empty = the embedding names)")
    preview_steps: int = setting(20, "sampling steps of each preview", group="saving", limits=POSITIVE,
                                 label="preview sampling steps")
    # 0 = the training resolution
    preview_size: int = setting(0, "preview size in pixels (0 = the training resolution)", group="saving",
                                limits=NON_NEGATIVE, label="preview size (0 = resolution)")

    # -- the adapter algorithm (pivotal.adapters.algorithms); the webuis' built-in loaders read all
    unet_algorithm: str = setting("lora", "the UNet adapter: lora (kohya LoRA; LoCon on convs), loha or lokr "
                                  "(LyCORIS)", group="lora", choices=algorithm_names, label="UNet algorithm")
    te_algorithm: str = setting("lora", "the text-encoder adapter, when te_lora is on (same choices)", group="lora",
                                choices=algorithm_names, label="TE algorithm")
    dora: bool = setting(False, "DoRA on top of the algorithm: a learned magnitude per input column "
                         "(weight-decomposed)", group="lora", label="DoRA (weight-decomposed)")
    conv_tucker: bool = setting(False, "k x k convs get a Tucker core (lora_mid / hada_t1,t2 / lokr_t2)",
                                group="lora", form=FORM_ADVANCED, label="Tucker core on k x k convs")
    lokr_factor: int = setting(-1, "LoKr: the size of the small Kronecker factor (-1: as square as possible)",
                               group="lora", form=FORM_ADVANCED, label="LoKr factor (-1 = automatic)")

    # -- DreamBooth prior preservation (pivotal.training.prior): on while class_prompt is set
    class_prompt: str = setting("", "DreamBooth prior preservation: the class text (e.g. 'a photo of a woman'); "
                                "class images train with it as their caption and their loss, times "
                                "prior_loss_weight, is added to each step's (empty = off)", group="prior",
                                label="class prompt (empty = off)")
    class_dir: str = setting("", "a folder of class images (their own captions are not used); the images "
                             "generated to reach class_count are cached there (empty: OUT/class_images)",
                             group="prior", flag="class-data", metavar="DIR", label="class images folder")
    # diffusers' train_dreambooth generates 100 when the folder has fewer
    class_count: int = setting(0, "class images to train with: what class_dir lacks is generated by the model's "
                               "own txt2img from class_prompt, before training, and reused by later runs "
                               "(0 = the images class_dir has)", group="prior", limits=NON_NEGATIVE,
                               label="class images (generated when missing)")
    # kohya and diffusers: 1.0
    prior_loss_weight: float = setting(1.0, "weight of the class images' loss", group="prior", limits=NON_NEGATIVE,
                                       label="prior loss weight")
    class_steps: int = setting(20, "sampling steps of each generated class image", group="prior", limits=POSITIVE,
                               form=FORM_ADVANCED, label="class image sampling steps")

    # -- DreamArtist++ (pivotal.training.dreamartist)
    dreamartist: bool = setting(False, "DreamArtist++: each embedding gets a negative partner (NAME-neg) trained "
                                "with it; the loss sees the classifier-free-guided prediction uncond(caption with "
                                "NAME-neg) + dreamartist_cfg x (cond(caption) - uncond). Use NAME-neg in the "
                                "negative prompt", group="dreamartist_pp", label="DreamArtist++ (negative embeddings)")
    # HCP-Diffusion's DreamArtist++ example: cfg_scale 3.0
    dreamartist_cfg: float = setting(3.0, "the guidance scale inside the training loss", group="dreamartist_pp",
                                     limits=Limits(low=1, low_open=True), label="DreamArtist++ CFG scale")
    dreamartist_suffix: str = setting("-neg", "the negative embedding's name is the positive's plus this",
                                      group="dreamartist_pp", form=FORM_ADVANCED, label="negative name suffix")
    dreamartist_vectors: int = setting(0, "vectors of each negative embedding (0 = as many as its positive)",
                                       group="dreamartist_pp", limits=NON_NEGATIVE, form=FORM_ADVANCED,
                                       label="negative vectors (0 = as the positive)")

    # -- held-out validation (pivotal.training.validation); none of it changes what trains but
    # validation_count, which takes images out of the training set
    validation_dir: str = setting("", "a folder of captioned images (like data_dir) whose loss is measured, never "
                                  "trained on", group="validation", flag="validation-data", metavar="DIR",
                                  label="validation folder (images + captions)")
    validation_count: int = setting(0, "hold this many training images back (chosen by seed) as the validation set "
                                    "(0 = none)", group="validation", limits=NON_NEGATIVE,
                                    label="hold back images for validation")
    validation_every: int = setting(-1, "measure the validation loss every N steps and at the end (-1: every "
                                    "tenth of the run, 0: at the end only)", group="validation",
                                    limits=Limits(low=-1), label="validate every (steps, -1 = auto, 0 = end)")
    validation_timesteps: int = setting(4, "fixed timesteps, spread over the schedule, each validation image is "
                                        "noised at", group="validation", limits=POSITIVE, form=FORM_ADVANCED,
                                        label="validation timesteps")
    validation_drift: bool = setting(False, "also measure drift: the validation loss on the captions without the "
                                     "embedding names, of the trained model against the base model (LoRA off), "
                                     "in % (positive: the bundle changed what the model already drew)",
                                     group="validation", label="measure drift (plain prompts vs the base model)")

    # -- the textcraftor mode (pivotal.training.textcraftor): TextCraftor's defaults (25 DDIM steps,
    # gradient through the last 5, guidance 7.5)
    reward: list[str] = setting([], "textcraftor: a reward NAME[:WEIGHT] (repeatable; clip, aesthetic, tiny_world "
                                "on the demo model, or a plug-in's)", group="textcraftor", metavar="NAME[:WEIGHT]",
                                label="rewards (NAME[:WEIGHT], one per line)", check=parse_reward_entries)
    reward_prompts: list[str] = setting([], "textcraftor: a training prompt (repeatable)", group="textcraftor",
                                        flag="reward-prompt", metavar="PROMPT",
                                        label="training prompts (one per line)")
    reward_prompts_file: str = setting("", "textcraftor: a text file of more training prompts, one per line",
                                       group="textcraftor", metavar="FILE", label="training prompts file")
    textcraftor_sample_steps: int = setting(25, "textcraftor: DDIM steps of each sampled picture", group="textcraftor",
                                            limits=POSITIVE, label="sampling steps")
    textcraftor_grad_steps: int = setting(5, "textcraftor: the last K sampling steps the gradient flows through "
                                          "(the earlier ones run without grad)", group="textcraftor", limits=POSITIVE,
                                          label="gradient steps K")
    textcraftor_guidance: float = setting(7.5, "textcraftor: classifier-free guidance scale of the sampling",
                                          group="textcraftor", limits=NON_NEGATIVE, label="guidance scale")
    textcraftor_unet: bool = setting(False, "textcraftor: also train a UNet LoRA by the same reward (one bundle)",
                                     group="textcraftor", label="also fine-tune a UNet LoRA")
    reward_clip_model: str = setting("", "a local transformers CLIP model folder, for the clip and aesthetic "
                                     "rewards (nothing is downloaded)", group="textcraftor", metavar="DIR",
                                     label="CLIP model folder")
    reward_aesthetic_file: str = setting("", "a local .safetensors aesthetic head on CLIP image embeddings, for the "
                                         "aesthetic reward", group="textcraftor", metavar="FILE",
                                         label="aesthetic head file")

    # written by ``pivotal sweep`` (pivotal.training.sweep), recorded in the bundle as pivotal.sweep
    sweep: list[str] = setting([], "the settings a sweep varied for this run, NAME=VALUE (written by pivotal sweep; "
                               "recorded in the bundle)", group="run", flag="sweep-value", metavar="NAME=VALUE",
                               form=FORM_NONE, check=lambda v: _check_sweep_entries(v))

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every value; return self. Raises ConfigError naming the setting
        (:func:`pivotal.training.config_checks.check_config`)."""
        check_config(self)
        return self

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

    def validation_interval(self) -> int:
        """Steps between validation losses (0: at the end only); meaningful with a validation set."""
        return max(1, self.steps // 10) if self.validation_every < 0 else self.validation_every

    # -- conversion ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original (paths and schedules of
        saving/previews may change between the two)."""
        d = self.to_dict()
        for k in ("data_dir", "mask_dir", "out_dir", "save_every", "on_interrupt", "preview_every", "preview_prompts",
                  "preview_steps", "preview_size", "latent_cache", "save_precision", "output_name",
                  "max_bad_steps", "sweep", "validation_dir", "validation_every", "validation_timesteps",
                  "class_dir", "validation_drift"):
            d.pop(k)
        if not d["validation_count"]:  # resume files from before validation existed stay usable
            d.pop("validation_count")
        defaults = TrainConfig()
        for key in NEWER_SETTINGS:  # so do those from before these settings existed
            if d[key] == getattr(defaults, key):
                d.pop(key)
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
            check_field_type(f, getattr(cfg, f.name))
        return cfg


def _check_sweep_entries(entries: list[str]) -> None:
    """The ``sweep`` setting's entries: NAME=VALUE with NAME a setting."""
    for entry in entries:
        name, sep, _ = entry.partition("=")
        if not sep or name not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(f"sweep: {entry!r} is not NAME=VALUE with NAME a setting (pivotal sweep writes these)")
