"""The "Check dataset" button: the dataset pre-flight report for the form's settings, as text.

It runs the same pre-flight the trainer runs before step 1, without refusing: problems that
would stop a run are listed in the report (as ERROR lines) instead of raised, so the user sees
all of them at once and can fix the folder before pressing Start.
"""

from __future__ import annotations

from typing import Any

from pivotal.training.config import TrainConfig


def dataset_options(config: TrainConfig) -> Any:
    """The :class:`~pivotal.data.dataset.DatasetOptions` that ``config`` trains with."""
    from pivotal.data.dataset import DatasetOptions  # imports torch: only when the button is pressed

    return DatasetOptions(folder=config.data_dir, resolution=config.resolution, bucket_step=config.bucket_step,
                          bucketing=config.bucketing, batch_size=config.batch_size,
                          shuffle_tags=config.shuffle_tags, keep_tags=config.keep_tags,
                          caption_dropout=config.caption_dropout, flip=config.flip,
                          skip_bad_images=config.skip_bad_images, seed=config.seed)


def check_dataset(config: TrainConfig, host: Any) -> str:
    """The pre-flight report of ``config``'s dataset: what training would use, warnings, problems.

    ``host`` gives the tokenizer, so caption lengths are counted in real tokens. Raises
    DatasetError only when the folder cannot be checked at all (a bad setting, no images).
    """
    from pivotal.data.dataset import run_preflight

    vectors = {e.name: e.vectors for e in config.embeddings}
    tokenizer = host.tokenizer(host.encoder_keys()[0]) if host is not None else None
    _, report = run_preflight(dataset_options(config), vectors, tokenizer)
    verdict = ("Ready: training can start." if not report.errors
               else "Training would be refused: fix the ERROR lines first.")
    classes = ""
    if config.class_prompt and host is not None:  # prior preservation: what is there, what will be drawn
        from pivotal.training.prior import plan_class_images

        plan = plan_class_images(config, host)
        classes = (f"\n\nClass images (prior preservation): {plan.folder}, prompt {plan.prompt!r}\n"
                   f"  {plan.found} found, {plan.reused} generated earlier (reused), {plan.missing} to generate "
                   "before training")
    return f"{report.format()}{classes}\n\n{verdict}"
