"""The training loop: LoRA and embeddings trained together, on any host.

``train(config, host, ...)`` runs in numbered stages:
1. validate settings and run the dataset pre-flight (nothing trains if it refuses);
2. build the trainables — LoRA on the host's modules, new embeddings initialised from their init
   text — with a forked RNG, so the host process's global random state is untouched;
3. build the optimizer; restore a resume file if given (refused if made for another model or
   other settings);
4. loop inside the host's training session (which restores the host on exit, however it ends),
   with the LoRA attached; each step: interrupt check, LRs for the step and phase, gradient
   accumulation, non-finite guard, optimizer step, norm pull, progress, the held-out validation
   loss (:mod:`pivotal.training.validation`; every ``validation_every`` steps and at the end),
   saves and previews;
5. save the bundle and a resume file (or not, per the outcome and ``on_interrupt``).

Out of GPU memory anywhere in 4-5 (a step, a preview, a save) ends the run as a TrainingError that
says where and what to change, after the host is restored and the run's own tensors (LoRA,
embeddings, optimizer state, cached latents) are dropped and the CUDA cache emptied, so the next
generation has its memory back (reliability checklist 26; :mod:`pivotal.training.faults` injects it).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from pivotal.adapters.network import LoraNetwork
from pivotal.errors import TrainingError
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.name_registry import check_new_names, taken_names_for_run
from pivotal.formats.safetensors_io import stray_temp_files
from pivotal.host_api import TrainingHost
from pivotal.text.embeddings import EmbeddingSet
from pivotal.text.inject import encode_plain
from pivotal.training.batches import Batches, BatchSource
from pivotal.training.config import TrainConfig
from pivotal.training.distributed import DataParallel, from_environment, launched_world_size
from pivotal.training.dreamartist import negative_pairs, negative_specs
from pivotal.training.faults import fault_point
from pivotal.training.optim import GroupSpec, apply_lrs, build_optimizer, phase_of, pull_norms
from pivotal.training.prior import ClassImagesReport, class_dataset, ensure_class_images
from pivotal.training.progress import EventSink, LossSmoother, ProgressEvent, TrainResult, window_means
from pivotal.training.rewards import build_rewards
from pivotal.training.run_record import training_info
from pivotal.training.state import RunState, load_state, model_fingerprint, save_state
from pivotal.training.step import StepRunner, step_random_state, training_prediction
from pivotal.training.textcraftor import RewardStepRunner, read_prompts
from pivotal.training.validation import Validator

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def train(config: TrainConfig, host: TrainingHost, on_event: EventSink | None = None,
          stop: threading.Event | None = None, resume: str | None = None,
          taken_names: Mapping[str, str] | None = None, parallel: DataParallel | None = None,
          variants: Sequence[str] = ()) -> TrainResult:
    """Run one training job to its end; see the module docstring for the stages.

    ``stop``: set it to interrupt at the next step boundary. ``taken_names``: {lower-cased name:
    where} of embedding names already in use (the host's embeddings folder, other bundles);
    a clash refuses the run before anything trains; ``variants``: output names of the other runs of
    the same queue or sweep, whose bundles may share this run's embedding names. ``parallel``: this process's place in a
    data-parallel group; by default the one ``torchrun`` / ``accelerate launch`` started this
    process into, if any (:mod:`pivotal.training.distributed`): then only rank 0 writes files and
    reports events.
    """
    if parallel is None and launched_world_size() > 1:  # a single process never touches the host here
        parallel = from_environment(host.device)
    run = _Run(config, host, on_event or (lambda e: None), stop or threading.Event(), parallel)
    try:
        return run.execute(resume, taken_names, variants)
    except torch.cuda.OutOfMemoryError as err:
        detail = (str(err).splitlines() or ["out of memory"])[0]
    # Raised outside the except block on purpose: the OOM's traceback holds the run's frames, and
    # with them every tensor the run made; leaving the block drops it, and `del run` the rest.
    where, saved = run.activity, run.saved
    del run
    release_memory()
    raise TrainingError(f"out of GPU memory {where}: {detail}. The model is restored and the run's memory freed. "
                        "Lower batch_size or resolution, turn on gradient_checkpointing, or use precision "
                        f"bf16/fp16; {'saved before it: ' + ', '.join(saved) if saved else 'nothing was saved'}.")


def release_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, so the host can use them again."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_taken_names(cfg: TrainConfig, host_taken: Mapping[str, str] | None,
                    variants: Sequence[str] = ()) -> dict[str, str]:
    """Names a new embedding must not take (checklist 18): what the host knows (``host_taken``: the
    webui's embeddings and Lora folder) plus the other bundles and LoRAs in the output folder (but
    ``variants``': the other runs of one queue or sweep)."""
    scanned, _ = taken_names_for_run(cfg.output_name, [cfg.out_dir], variants=variants)
    return {**scanned, **(host_taken or {})}


class _Run:
    def __init__(self, config: TrainConfig, host: TrainingHost, emit: EventSink, stop: threading.Event,
                 parallel: DataParallel | None = None) -> None:
        self.config = config.validate()
        self.host = host
        self.parallel = parallel
        self.writer = parallel is None or parallel.writer  # only one process writes and reports
        self.emit = emit if self.writer else (lambda e: None)
        self.stop = stop
        self.out_dir = Path(config.out_dir)
        self.smoother = LossSmoother()
        self.losses: list[float] = []
        self.warnings: list[str] = []
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.activity = "before the first step"  # for error messages: what the run was doing
        self.saved: list[str] = []
        self.validator: Validator | None = None
        self.validation_losses: list[tuple[int, float]] = []
        self.reward_mode = config.mode == "textcraftor"
        self.batches: BatchSource | None = None
        #: the embeddings this run trains: the configured ones and DreamArtist++'s negatives (none
        #: in the textcraftor mode, which trains the text encoder's LoRA only)
        self.specs = [] if self.reward_mode else list(config.embeddings) + negative_specs(config)
        self.class_report: ClassImagesReport | None = None
        self.class_batches: Batches | None = None
        self.validation_drifts: list[tuple[int, float]] = []

    # -- 1-3: set up -----------------------------------------------------------------------
    def execute(self, resume: str | None, taken_names: Mapping[str, str] | None,
                variants: Sequence[str] = ()) -> TrainResult:
        cfg = self.config
        if self.reward_mode:
            self.prediction = training_prediction(cfg, self.host)
            self._reward_preflight()
            shared: list[str] = []
        else:
            shared = check_new_names([e.name for e in self.specs], run_taken_names(cfg, taken_names, variants))
            # zero_terminal_snr needs v: refused before any work (after the names: it reads the host)
            self.prediction = training_prediction(cfg, self.host)
            self.batches = BatchSource(cfg, self.host)
            held = [item.name for item in self.batches.validation_items]
            note = (f"\nvalidation: {len(held)} image(s){' held back' if cfg.validation_count else ''}: "
                    + ", ".join(held[:10]) + (" ..." if len(held) > 10 else "")) if held else ""
            extra: dict = {}
            if cfg.class_prompt:
                report = self._prepare_class_images()
                note += "\n" + report.format()
                extra["class_images"] = report.to_dict()
            self.emit(ProgressEvent("preflight", total=cfg.steps, message=self.batches.report.format() + note,
                                    data={**self.batches.report.to_dict(), "validation_images": held, **extra}))
            self.warnings += list(self.batches.warnings)
        for msg in shared:
            self.warnings.append(msg)
            self.emit(ProgressEvent("warning", total=cfg.steps, message=msg))
        self._build_trainables()
        self.params = self._named_params()
        self.optimizer = build_optimizer(cfg, self._groups())
        self.fingerprint = model_fingerprint(self.host.base_model, self.all_targets)
        if resume:
            self._resume(resume)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.writer:  # another process's temp files may be saves in progress
            self._clean_stray_temps()
        return self._loop()

    def _prepare_class_images(self) -> ClassImagesReport:
        """Prior preservation: find the class images, generate the missing ones through the host's
        txt2img (no LoRA exists yet, no embedding is passed), and batch them
        (:mod:`pivotal.training.prior`)."""
        cfg = self.config
        self.activity = "while generating class images"

        def progress(done: int, total: int) -> None:
            self.emit(ProgressEvent("phase", total=cfg.steps, phase="class images",
                                    message=f"generated class image {done} of {total}"))

        report, images = ensure_class_images(cfg, self.host, self.stop, progress)
        self.class_report = report
        if report.missing:
            msg = f"{report.missing} class image(s) not generated (interrupted); training with {report.used}"
            self.warnings.append(msg)
            self.emit(ProgressEvent("warning", total=cfg.steps, message=msg))
        if images:
            dataset = class_dataset(cfg, images, self.host.tokenizer("clip_l"))
            self.class_batches = Batches(dataset, self.host, self.batches.cache if self.batches else None)
        return report

    def _reward_preflight(self) -> None:
        """The textcraftor mode's checks before anything trains: the prompts, the rewards (their
        weight files load now), a host that decodes differentiably."""
        cfg = self.config
        self.prompts = read_prompts(cfg)
        self.rewards = build_rewards(cfg, self.host.device)
        names = ", ".join(f"{r.name} x{w:g}" for r, w in self.rewards)
        self.emit(ProgressEvent("preflight", total=cfg.steps,
                                message=f"textcraftor: {len(self.prompts)} prompt(s), reward {names}, "
                                        f"{cfg.textcraftor_sample_steps} DDIM steps, gradient through the last "
                                        f"{cfg.textcraftor_grad_steps}",
                                data={"prompts": len(self.prompts), "rewards": [r.name for r, _ in self.rewards]}))
        if cfg.embeddings:
            msg = (f"textcraftor mode trains no embeddings: {', '.join(e.name for e in cfg.embeddings)} "
                   "left out of the run")
            self.warnings.append(msg)
            self.emit(ProgressEvent("warning", total=cfg.steps, message=msg))

    def _clean_stray_temps(self) -> None:
        """Remove temp files a killed save left behind (never a finished file: those are renamed)."""
        for path in stray_temp_files(self.out_dir):
            path.unlink(missing_ok=True)
            msg = f"removed {path.name}, left in {self.out_dir} by a save that was interrupted"
            self.warnings.append(msg)
            self.emit(ProgressEvent("warning", total=self.config.steps, message=msg))

    def _build_trainables(self) -> None:
        cfg, host = self.config, self.host
        # textcraftor: the text-encoder LoRA always, the UNet's only when asked
        with_unet = not self.reward_mode or cfg.textcraftor_unet
        unet_targets = host.lora_targets("unet", cfg.lora_preset) if with_unet else []
        te_targets = host.lora_targets("te", cfg.lora_preset) if cfg.te_lora or self.reward_mode else []
        self.all_targets = unet_targets + te_targets
        ranks = {k: cfg.te_rank for k, _ in te_targets}
        alphas = {k: cfg.te_alpha for k, _ in te_targets}
        # Fork the RNG: LoRA init draws from the global generator, which belongs to the host.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            te_spec = cfg.algorithm_spec("te")
            self.net = LoraNetwork(self.all_targets, cfg.unet_rank, cfg.unet_alpha, cfg.lora_dropout,
                                   ranks=ranks, alphas=alphas, spec=cfg.algorithm_spec("unet"),
                                   specs={k: te_spec for k, _ in te_targets}).to(host.device)
        self.embeddings = EmbeddingSet()
        init_gen = torch.Generator().manual_seed(cfg.seed + 1)
        vocabs = {k: host.vocabulary(k).detach().float().cpu() for k in host.encoder_keys()}
        for spec in self.specs:
            ids = {k: encode_plain(host.tokenizer(k), spec.init_text) for k in vocabs} if spec.init_text else None
            self.embeddings.add_new(spec.name, spec.vectors, vocabs, init_ids=ids, generator=init_gen)
        self.embeddings.to_(host.device)
        self.target_norms = {k: float(v.norm(dim=1).mean()) for k, v in vocabs.items()}

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(f"lora.{key}.{n}", p) for key, m in self.net.lora_modules.items() for n, p in m.named_parameters()]
        return named + [(f"emb.{n}", p) for n, p in self.embeddings.named_parameters()]

    def _groups(self) -> list[GroupSpec]:
        cfg = self.config
        unet = [p for m in self.net.modules_of("unet") for p in m.parameters()]
        te = [p for m in self.net.modules_of() if m.part != "unet" for p in m.parameters()]
        return [GroupSpec("unet", unet, cfg.unet_lr, cfg.weight_decay),
                GroupSpec("te", te, cfg.te_lr, cfg.weight_decay),
                # no weight decay on embeddings: it would shrink them toward zero
                GroupSpec("embeddings", self.embeddings.parameters(), cfg.embedding_lr, 0.0)]

    def _resume(self, path: str) -> None:
        state = load_state(path, self.config.fingerprint(), self.fingerprint, self.params, self.optimizer,
                           self.generator)
        if state.step >= self.config.steps:
            raise TrainingError(f"{path}: the run already reached step {state.step} of {self.config.steps}")
        self.step = state.step
        self.losses = state.losses
        self.validation_losses = [(int(s), float(v)) for s, v in state.validation if int(s) <= state.step]
        self.validation_drifts = [(int(s), float(v)) for s, v in state.drifts if int(s) <= state.step]
        if state.smoother:
            self.smoother.load_state(state.smoother)

    # -- 4: the loop -------------------------------------------------------------------------
    def _loop(self) -> TrainResult:
        cfg = self.config
        runner: StepRunner | RewardStepRunner
        if self.batches is None:  # the textcraftor mode
            runner = RewardStepRunner(cfg, self.host, self.prompts, self.rewards, self.generator)
        else:
            runner = StepRunner(cfg, self.host, self.net, self.embeddings, self.batches, self.generator,
                                self.parallel, self.class_batches)
            if self.batches.validation_items and self.writer:  # one process measures it
                self.validator = Validator(self.batches.validation_items, runner, self.batches.cache,
                                           cfg.validation_timesteps, cfg.seed, cfg.noise_offset)
        every = cfg.validation_interval()
        status, message = "completed", ""
        bad_in_a_row = 0
        last_phase = ""
        step_time: float | None = None
        # a resumed run hands on its history (losses, validation points), so charts go on from it
        history = {"history": {"losses": list(self.losses), "validation_losses": [list(v) for v in
                                                                                  self.validation_losses],
                               "validation_drifts": [list(v) for v in self.validation_drifts]}} if self.step else {}
        self.emit(ProgressEvent("start", step=self.step, total=cfg.steps, message=self.host.label, data=history))
        with self.host.training_session(cfg.gradient_checkpointing), self.net.attached():
            self.net.train()
            while self.step < cfg.steps:
                stopping = self.stop.is_set()
                if self.parallel is not None:  # all processes stop at the same step
                    stopping = self.parallel.any(stopping)
                if stopping:
                    status, message = "interrupted", f"interrupted at step {self.step}"
                    break
                started = time.perf_counter()
                phase = phase_of(cfg, self.step)
                if phase != last_phase:
                    self.emit(ProgressEvent("phase", step=self.step, total=cfg.steps, phase=phase))
                    last_phase = phase
                lrs = apply_lrs(self.optimizer, cfg, self.step)
                self.activity = f"at step {self.step + 1} of {cfg.steps}"
                fault_point("step", self.step)
                with step_random_state(cfg.seed, self.step, self.host.device, cfg.lora_dropout > 0):
                    loss = runner.run(self.step, self.optimizer)
                if loss is None:  # non-finite: no update was applied
                    bad_in_a_row += 1
                    msg = f"step {self.step + 1}: loss is NaN/inf; step skipped ({bad_in_a_row} in a row)"
                    self.warnings.append(msg)
                    self.emit(ProgressEvent("warning", step=self.step, total=cfg.steps, message=msg))
                    if bad_in_a_row >= cfg.max_bad_steps:
                        status = "stopped"
                        message = (f"stopped: {bad_in_a_row} non-finite losses in a row (learning rate too "
                                   "high, or fp16 overflow); the last good save is kept")
                        break
                    self.step += 1
                    continue
                bad_in_a_row = 0
                if lrs.get("embeddings", 0.0) > 0:
                    for key, norm in self.target_norms.items():
                        pull_norms(list(self.embeddings.vectors_for(key).values()), norm, cfg.embedding_norm_pull)
                self.step += 1
                smoothed = self.smoother.update(loss)
                self.losses.append(loss)
                elapsed = time.perf_counter() - started
                step_time = elapsed if step_time is None else 0.9 * step_time + 0.1 * elapsed
                self.emit(ProgressEvent("step", step=self.step, total=cfg.steps, loss=loss, smoothed_loss=smoothed,
                                        lrs=lrs, eta_s=step_time * (cfg.steps - self.step), phase=phase,
                                        data={} if runner.grad_norm is None else {"grad_norm": runner.grad_norm}))
                if every and self.step % every == 0 and self.step < cfg.steps:
                    self._validate()  # before a step save, which records it
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self._save(f"{cfg.output_name}-step{self.step:06d}")
                if cfg.preview_every and self.step % cfg.preview_every == 0 and self.writer:
                    self._preview()
            if self.step > 0 and (not self.validation_losses or self.validation_losses[-1][0] != self.step):
                self._validate()
            self.net.eval()
        # -- 5: outcome ---------------------------------------------------------------------
        bundle = ""
        if status == "completed" or (status == "interrupted" and cfg.on_interrupt == "save" and self.step > 0):
            bundle = self._save(cfg.output_name if status == "completed" else f"{cfg.output_name}-step{self.step:06d}")
        first, last = window_means(self.losses)
        result = TrainResult(status, self.step, cfg.steps, bundle, first, last, list(self.losses),
                             list(self.warnings), message, list(self.validation_losses), list(self.validation_drifts))
        self.emit(ProgressEvent("done", step=self.step, total=cfg.steps, path=bundle, message=message or status,
                                data=result.summary()))
        return result

    # -- saving and previews ---------------------------------------------------------------------
    def _save(self, stem: str) -> str:
        cfg = self.config
        path = self.out_dir / f"{stem}.safetensors"
        if not self.writer:
            return str(path)  # rank 0 writes it; the states of all processes are equal
        self.activity = f"while saving {path.name} after step {self.step}"
        fault_point("save", self.step)
        trained = self.embeddings.tensors()
        embs = [BundleEmbedding(s.name, trained[s.name], s.init_text) for s in self.specs if s.name in trained]
        info = training_info(cfg, self.host.label, self.prediction, self.batches, self.class_report,
                             self.validation_losses, self.validation_drifts)
        write_bundle(path, self.host.base_model, self.net.kohya_state_dict(SAVE_DTYPES[cfg.save_precision]),
                     embs, info)
        save_state(self.out_dir / f"{stem}.resume.safetensors",
                   RunState(self.step, cfg.fingerprint(), self.fingerprint, self.smoother.state(), self.losses,
                            [list(v) for v in self.validation_losses], [list(v) for v in self.validation_drifts]),
                   self.params, self.optimizer, self.generator)
        self.saved.append(str(path))
        self.emit(ProgressEvent("save", step=self.step, total=cfg.steps, path=str(path)))
        return str(path)

    def _validate(self) -> None:
        """Measure the validation loss (if this run has a validation set), record and report it."""
        if self.validator is None:
            return
        self.activity = f"while measuring the validation loss after step {self.step}"
        self.net.eval()  # no LoRA dropout: the same weights give the same number
        drift = math.nan
        try:
            fault_point("validation", self.step)
            loss = self.validator.evaluate()
            if self.config.validation_drift:
                drift = self.validator.evaluate_drift()
        finally:
            self.net.train()
        if not math.isfinite(loss):
            msg = f"step {self.step}: the validation loss is NaN/inf (not recorded)"
            self.warnings.append(msg)
            self.emit(ProgressEvent("warning", step=self.step, total=self.config.steps, message=msg))
            return
        self.validation_losses.append((self.step, loss))
        data, message = {"validation_loss": loss}, f"validation loss {loss:.4f}"
        if math.isfinite(drift):
            self.validation_drifts.append((self.step, drift))
            data["validation_drift"], message = drift, f"{message}, drift {drift:+.2f}%"
        self.emit(ProgressEvent("validation", step=self.step, total=self.config.steps, message=message, data=data))

    def _preview(self) -> None:
        cfg = self.config
        prompts = cfg.preview_prompts or ([self.prompts[0]] if self.reward_mode
                                          else [" ".join(e.name for e in cfg.embeddings)])
        negative = " ".join(negative_pairs(cfg).values())  # DreamArtist++: the negatives, as a user would
        size = cfg.preview_size or cfg.resolution
        folder = self.out_dir / "previews"
        folder.mkdir(exist_ok=True)
        self.activity = f"during the preview after step {self.step}"
        self.net.eval()
        try:
            fault_point("preview", self.step)
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    image = self.host.generate(prompt, negative, self.embeddings, cfg.preview_steps, cfg.seed,
                                               size, size, 7.0)
                    path = folder / f"{cfg.output_name}-step{self.step:06d}-{i}.png"
                    image.save(path)
                    self.emit(ProgressEvent("preview", step=self.step, total=cfg.steps, path=str(path), image=image,
                                            message=prompt))
        finally:
            self.net.train()
