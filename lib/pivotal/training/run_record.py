"""What a finished (or step-saved) run records in its bundle's metadata: the
:class:`~pivotal.formats.bundle_metadata.TrainingInfo` built from the run's settings, its dataset
and what it measured."""

from __future__ import annotations

from typing import Sequence

from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.training.batches import BatchSource
from pivotal.training.config import TrainConfig
from pivotal.training.dreamartist import negative_pairs
from pivotal.training.prior import ClassImagesReport


def training_info(cfg: TrainConfig, base_checkpoint: str, prediction: str, batches: BatchSource | None,
                  class_report: ClassImagesReport | None, validation_losses: Sequence[tuple[int, float]],
                  validation_drifts: Sequence[tuple[int, float]]) -> TrainingInfo:
    """The bundle's record of the run. ``batches``: None in the textcraftor mode (no dataset);
    ``prediction``: the objective's target ("epsilon" / "v_prediction").

    ``num_train_images`` counts an image once per repeat (a ``3_name`` folder's picture three
    times) and ``num_reg_images`` the class images trained with, as kohya counts them for
    ``ss_num_train_images`` / ``ss_num_reg_images``."""
    items = batches.dataset.items if batches is not None else []
    info = TrainingInfo(cfg.output_name, resolution=(cfg.resolution, cfg.resolution),
                        num_train_images=sum(item.repeats for item in items),
                        tag_frequency=batches.tag_frequency() if batches is not None else {},
                        settings=cfg.to_dict(), base_checkpoint=base_checkpoint)
    info.sweep = dict(entry.partition("=")[::2] for entry in cfg.sweep)
    if class_report is not None:
        info.prior = {**class_report.to_dict(), "prior_loss_weight": cfg.prior_loss_weight}
        info.num_reg_images = class_report.used
    if cfg.dreamartist:
        info.dreamartist = {"cfg": cfg.dreamartist_cfg, "negatives": negative_pairs(cfg)}
    info.zero_terminal_snr, info.max_grad_norm = cfg.zero_terminal_snr, cfg.max_grad_norm
    info.masked_loss, info.v_prediction = cfg.masked_loss, prediction == "v_prediction"
    report = batches.report if batches is not None else None
    if report is not None:
        info.dataset = {k: v for k, v in (("repeats", report.repeats), ("loss_scales", report.loss_scales)) if v}
        if cfg.masked_loss:
            info.dataset["masks"] = {"source": "alpha" if not cfg.mask_dir else "folder", "found": report.masks_found,
                                     "missing": len(report.masks_missing), "unmasked_weight": cfg.unmasked_weight}
    if validation_losses:
        info.validation_step, info.validation_loss = validation_losses[-1]
        info.validation_drift = dict(validation_drifts).get(info.validation_step)
    return info
