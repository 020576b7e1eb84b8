"""The checks of a :class:`~pivotal.training.config.TrainConfig` across its settings (each
setting's own limits and choices are declared with it and checked by
:func:`~pivotal.training.settings.check_declared`). Every bad value raises ConfigError naming the
setting and the fix. ``cfg`` is a TrainConfig (typed ``Any`` here: this module is imported by
the one that defines it)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pivotal.adapters.algorithms import algorithm_class
from pivotal.errors import ConfigError, EmbeddingNameError
from pivotal.text.names import validate_embedding_name
from pivotal.training.settings import check_declared


def check_config(cfg: Any) -> None:
    """Check every value of ``cfg``. Raises ConfigError naming the setting."""
    reward_mode = cfg.mode == "textcraftor"
    if not cfg.embeddings and not reward_mode:
        raise ConfigError("embeddings: at least one embedding is needed (e.g. --embedding mychar:2:woman)")
    seen = set()
    for e in cfg.embeddings:
        validate_embedding_name(e.name)
        if e.name.lower() in seen:
            raise ConfigError(f"embeddings: {e.name!r} is listed twice (names are case-insensitive)")
        seen.add(e.name.lower())
        if not 1 <= e.vectors <= 16:
            raise ConfigError(f"embeddings: {e.name!r} has {e.vectors} vectors; use 1 to 16")
    check_declared(cfg)  # limits, choices and per-value checks, as each setting declares them
    if cfg.resolution % cfg.bucket_step:
        raise ConfigError(f"resolution: {cfg.resolution} is not a multiple of bucket_step {cfg.bucket_step}")
    if cfg.phase_plan == "embeddings_first" and cfg.embedding_steps >= cfg.steps:
        raise ConfigError(f"embedding_steps: {cfg.embedding_steps} leaves no LoRA steps out of "
                          f"steps={cfg.steps}")
    _check_algorithms(cfg)
    if cfg.zero_terminal_snr and cfg.prediction_type == "epsilon":
        raise ConfigError("zero_terminal_snr: needs prediction_type v_prediction (at SNR 0 the noisy latent is "
                          "pure noise, so predicting the noise teaches nothing); set prediction_type to "
                          "v_prediction or zero_terminal_snr to false")
    if cfg.mask_dir and not cfg.masked_loss:
        raise ConfigError(f"mask_dir: {cfg.mask_dir!r} is set but masked_loss is off; set masked_loss to true "
                          "or mask_dir to empty")
    if cfg.validation_dir and cfg.validation_count:
        raise ConfigError(f"validation_dir and validation_count: both are set ({cfg.validation_dir!r}, "
                          f"{cfg.validation_count}); use a validation folder or held-back images, not both "
                          "(set validation_count to 0 or validation_dir to empty)")
    if reward_mode:
        _check_textcraftor(cfg)
    elif not cfg.data_dir:
        raise ConfigError("data_dir: the folder of training images is not set (--data)")
    _check_prior_and_dreamartist(cfg)

def _check_prior_and_dreamartist(cfg: Any) -> None:
    if not cfg.class_prompt.strip() and (cfg.class_dir or cfg.class_count):
        which = "class_dir" if cfg.class_dir else "class_count"
        raise ConfigError(f"class_prompt: {which} is set but class_prompt is empty; give the class text "
                          "(e.g. 'a photo of a woman') or clear class_dir and class_count")
    if cfg.class_prompt.strip() and not cfg.class_dir and not cfg.class_count:
        raise ConfigError("class_count: prior preservation (class_prompt is set) needs class images: set "
                          "class_count (they are generated) or class_dir (a folder of class images)")
    if cfg.dreamartist:
        if cfg.dreamartist_vectors > 16:
            raise ConfigError(f"dreamartist_vectors: {cfg.dreamartist_vectors}; use 0 (as the positive) to 16")
        positives = {e.name.lower() for e in cfg.embeddings}
        for e in cfg.embeddings:
            neg = e.name + cfg.dreamartist_suffix
            try:
                validate_embedding_name(neg)
            except EmbeddingNameError as err:
                raise ConfigError(f"dreamartist_suffix: {err}") from None
            if not cfg.dreamartist_suffix or neg.lower() in positives:
                raise ConfigError(f"dreamartist_suffix: {cfg.dreamartist_suffix!r} makes the negative of "
                                  f"{e.name!r} a name already taken ({neg!r}); use e.g. '-neg'")

def _check_textcraftor(cfg: Any) -> None:
    if not cfg.reward:
        raise ConfigError("reward: the textcraftor mode needs a reward (e.g. --reward clip)")
    if not cfg.reward_prompts and not cfg.reward_prompts_file:
        raise ConfigError("reward_prompts: the textcraftor mode needs training prompts (--reward-prompt, or "
                          "reward_prompts_file)")
    if cfg.textcraftor_grad_steps > cfg.textcraftor_sample_steps:
        raise ConfigError(f"textcraftor_grad_steps: {cfg.textcraftor_grad_steps} is more than "
                          f"textcraftor_sample_steps ({cfg.textcraftor_sample_steps})")

def _check_algorithms(cfg: Any) -> None:
    if cfg.lokr_factor == 0 or cfg.lokr_factor < -1:
        raise ConfigError(f"lokr_factor: {cfg.lokr_factor} is not -1 (automatic) or a positive size")
    if cfg.lora_dropout:
        used = [cfg.unet_algorithm] + ([cfg.te_algorithm] if cfg.te_lora else [])
        no_dropout = [a for a in used if not algorithm_class(a).supports_dropout]
        if no_dropout or cfg.dora:
            which = "dora" if cfg.dora else f"the {no_dropout[0]} algorithm"
            raise ConfigError(f"lora_dropout: {which} has no activation dropout (it works on the weight); "
                              "set lora_dropout to 0")


_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def check_field_type(f: dataclasses.Field, value: Any) -> None:
    """A value read from JSON/TOML has its field's type (an int is a float; a bool is no number)."""
    if str(f.type) == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{f.name}: expected a list of strings, got {value!r}")
        return
    t = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
    if t is None:
        return
    ok = isinstance(value, _TYPES[t]) and not (t in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{f.name}: expected {t.__name__}, got {value!r}")
