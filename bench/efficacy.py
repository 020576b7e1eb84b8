"""Efficacy: does pivotal tuning do what its users expect? Embeddings vs LoRA vs pivotal, measured.

On the tiny pre-trained model (``pivotal.demo.tiny_world``, which follows its prompts) and four
concepts it never saw (``_efficacy_data``: a new shape, a new texture, a character, a style), each
method trains at the same step budget, batch, data and seed (with Pivotal's own trainer unless said):

* ``ti``: textual inversion only (the embedding trains; the UNet LoRA's LR is 0);
* ``lora``: UNet LoRA only, with a rare word ("zwx") as the trigger (a frozen placeholder
  embedding the captions never use satisfies the trainer);
* ``pivotal``: embeddings + UNet LoRA together, embeddings frozen half-way (the default plan);
* ``pivotal_ef``: embeddings first (30 % of the steps), then the LoRA;
* ``pivotal_te``: ``pivotal`` + a text-encoder LoRA;
* ``prior``: ``pivotal`` + DreamBooth prior preservation (``CLASS_COUNT`` class images the base
  model draws from a class prompt of the concept's world, generated once per concept and cached;
  prior_loss_weight 1);
* ``dreamartist``: ``pivotal`` + DreamArtist++ (a negative embedding per trigger, CFG 3 inside the
  loss); measured with the negative name in the negative prompt's place: the held-out loss is the
  guided prediction's, as a generation at CFG 3 would use it.
* ``pivotal_noclip``: ``pivotal`` without gradient clipping (``max_grad_norm`` 0; the default clips
  at 1.0);
* ``pivotal_loha`` / ``pivotal_lokr`` / ``pivotal_dora``: ``pivotal`` with the UNet adapter LoHa,
  LoKr, or LoRA + DoRA (same rank, alpha and LR);
* ``pivotal_masked``: ``pivotal`` with the masked loss, each picture's mask its concept's region
  (``_efficacy_data.object_mask``; ``unmasked_weight`` 0: the background is not trained);
* ``hypernetwork``: the webui's hypernetwork (MLPs 1-2-1 on the attention k/v inputs), trained
  outside Pivotal's trainer on the same objective (``_efficacy_direct``); the trigger is plain text;
* ``dreambooth``: the whole UNet fine-tuned (text encoder frozen) with prior preservation (class
  images from the base model, prior loss weight 1), DreamBooth's rare word as the trigger; its
  transfer is the fine-tune's difference added to the second base.

(No zero-terminal-SNR row: it needs v-prediction and the tiny world is an epsilon model; training
a LoRA into the other parameterisation is a different experiment. Its tests check it against
diffusers instead.)

Measured on held-out pictures of the concept in compositions training never showed
(``_efficacy_eval``; loss = epsilon MSE on fixed noise and timesteps, gain = fraction of the base
model's loss removed):

* fit: the bundle's gain on held-out pictures;
* drift: how much the bundle raises the loss on ordinary base-world prompts (no trigger), in %;
* separation: the gain kept by the embedding alone / the UNet LoRA alone / the TE LoRA alone, as
  a share of the full bundle's (the grid users make by hand);
* transfer: the gain of the full bundle and of the embedding alone on a second base model (the
  same model continued on a shifted world, ``_efficacy_shift``), held-out pictures in its style;
* size: the bundle's bytes (fp32; the hypernetwork's MLPs, DreamBooth's whole UNet); step time:
  training seconds per step (this machine, loaded or not).

A second table varies one setting of ``pivotal`` at a time (embedding LR multiple, vectors, rank,
phase plan) to choose the defaults. Means and spread are over ``--seeds`` training seeds, each
averaged over the concepts.

    .venv/bin/python bench/efficacy.py --json bench/results/efficacy.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_threads_arg, apply_threads, load_average, machine_info, print_table, write_json  # noqa: E402
from _efficacy_data import (  # noqa: E402
    CONCEPTS,
    Concept,
    base_prompt_items,
    held_out_pictures,
    write_mask_folder,
    write_training_folder,
)
from _efficacy_direct import DIRECT, applied, train_direct_method  # noqa: E402
from _efficacy_direct import trigger as direct_trigger  # noqa: E402
from _efficacy_eval import DenoiseSet, denoise_loss, denoise_set, gain, has_part, load_parts, variant  # noqa: E402
from pivotal.demo import tiny_world  # noqa: E402
from pivotal.demo.world import BASE_STYLE, SHIFTED_STYLE  # noqa: E402
from pivotal.hosts.diffusers.host import DiffusersHost  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402

#: Settings every run shares. The tiny model learns a concept in ~150 steps at these LRs; at a
#: UNet LR of 1e-3 (pilot runs) the LoRA overfits: +33-48 % loss on ordinary prompts, and the
#: embedding alone then beats the whole bundle on held-out pictures.
COMMON: dict[str, Any] = dict(steps=150, batch_size=4, resolution=64, bucket_step=64, bucketing=False,
                              lora_preset="attn-mlp", unet_rank=4, unet_alpha=4.0, unet_lr=3e-4,
                              embedding_lr=3e-3, te_lr=3e-5, te_rank=4, te_alpha=4.0,
                              save_precision="fp32", latent_cache="memory")
VECTORS = 2
METHODS: dict[str, dict[str, Any]] = {
    "ti": dict(unet_lr=0.0, freeze_embeddings_at=1.0),
    "lora": dict(freeze_embeddings_at=0.0),
    "pivotal": dict(phase_plan="together", freeze_embeddings_at=0.5),
    "pivotal_ef": dict(phase_plan="embeddings_first"),
    "pivotal_te": dict(phase_plan="together", freeze_embeddings_at=0.5, te_lora=True),
    "prior": dict(phase_plan="together", freeze_embeddings_at=0.5, prior_loss_weight=1.0),
    "dreamartist": dict(phase_plan="together", freeze_embeddings_at=0.5, dreamartist=True, dreamartist_cfg=3.0),
    "pivotal_noclip": dict(phase_plan="together", freeze_embeddings_at=0.5, max_grad_norm=0.0),
    "pivotal_masked": dict(phase_plan="together", freeze_embeddings_at=0.5, masked_loss=True),
    # the LyCORIS algorithms in place of LoRA (UNet; same rank, alpha and LR as ``pivotal``)
    "pivotal_loha": dict(phase_plan="together", freeze_embeddings_at=0.5, unet_algorithm="loha"),
    "pivotal_lokr": dict(phase_plan="together", freeze_embeddings_at=0.5, unet_algorithm="lokr"),
    "pivotal_dora": dict(phase_plan="together", freeze_embeddings_at=0.5, dora=True),
}
#: prior: class images per concept, and the class prompt (the class the concept belongs to, as the
#: base world words it: its init word, or a square for the texture)
CLASS_COUNT = 8
#: One setting of "pivotal" changed at a time: (label, overrides, vectors).
SWEEP: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("embedding LR 3x UNet", dict(embedding_lr=3.0), VECTORS),   # multiples of the UNet LR, see train_one
    ("embedding LR 30x UNet", dict(embedding_lr=30.0), VECTORS),
    ("1 vector", {}, 1),
    ("4 vectors", {}, 4),
    ("rank 8", dict(unet_rank=8, unet_alpha=8.0), VECTORS),
    ("embeddings never frozen", dict(freeze_embeddings_at=1.0), VECTORS),
    ("4 vectors + embedding LR 30x", dict(embedding_lr=30.0), 4),  # the two winners together
)
SWEEP_ONLY = {label for label, _, _ in SWEEP}
PLACEHOLDER = "pvtunused"  # the lora method's frozen, never-used embedding
#: bundle path -> median ms per training step (its step events' spacing)
STEP_MS: dict[str, float] = {}
#: the first base model's UNet (the direct methods' files are applied to others as a difference)
FIRST_UNET: list[Any] = []


@dataclass
class Stage:
    """A model with the concept's held-out set and the base prompts, each noised once."""

    host: DiffusersHost
    held_out: dict[str, tuple[DenoiseSet, list[Any]]]
    base_prompts: tuple[DenoiseSet, list[str]]


def make_stage(host: DiffusersHost, shifted: bool) -> Stage:
    style = SHIFTED_STYLE if shifted else BASE_STYLE
    held: dict[str, tuple[DenoiseSet, list[Any]]] = {}
    for i, (key, concept) in enumerate(CONCEPTS.items()):
        pics = held_out_pictures(concept, style)
        held[key] = (denoise_set(host, [p.image for p in pics], seed=100 + i), pics)
    items = base_prompt_items(style)
    base = (denoise_set(host, [im for im, _ in items], seed=99), [c for _, c in items])
    return Stage(host, held, base)


def trigger_of(method: str, concept: Concept) -> str:
    if method in DIRECT:
        return direct_trigger(method, concept)
    return concept.rare if method == "lora" else concept.trigger


def train_one(host: DiffusersHost, concept: Concept, method: str, seed: int, work: Path,
              overrides: dict[str, Any] | None = None, vectors: int = VECTORS) -> str:
    """The bundle's path (its median ms per step goes to ``STEP_MS``)."""
    if method in DIRECT:
        path, ms = train_direct_method(host, concept, method, seed, work, COMMON["steps"], COMMON["batch_size"])
        STEP_MS[path] = ms
        return path
    trigger = trigger_of(method, concept)
    data = write_training_folder(work / f"data-{concept.key}-{trigger}", concept, trigger)
    masks = {}
    if METHODS[method].get("masked_loss"):
        masks = {"mask_dir": str(write_mask_folder(work / f"masks-{concept.key}", concept))}
    if method == "lora":
        embeddings = [EmbeddingSpec(PLACEHOLDER, 1, "")]
    else:
        embeddings = [EmbeddingSpec(concept.trigger, vectors, concept.init)]
    overrides = dict(overrides or {})
    if "embedding_lr" in overrides:  # the sweep gives it as a multiple of the UNet LR
        overrides["embedding_lr"] *= COMMON["unet_lr"]
    kw = {**COMMON, **METHODS[method], **overrides}
    if method == "prior":
        kw.update(class_prompt=f"a red {concept.init or 'square'} on a white background", class_count=CLASS_COUNT,
                  class_dir=str(work / f"classes-{concept.key}"), class_steps=20)
    tag = "-".join(f"{k}{v}" for k, v in sorted((overrides or {}).items())) or "default"
    out = work / f"out-{concept.key}-{method}-{tag}-v{vectors}-s{seed}"
    cfg = TrainConfig(data_dir=str(data), out_dir=str(out), output_name="bundle", seed=seed,
                      embeddings=embeddings, **kw, **masks).validate()
    stamps: list[float] = []
    result = train(cfg, host, on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None)
    if result.status != "completed":
        raise RuntimeError(f"{concept.key}/{method}: training ended {result.status}: {result.message}")
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    STEP_MS[str(result.bundle_path)] = 1000 * gaps[len(gaps) // 2] if gaps else float("nan")
    return str(result.bundle_path)


def dreamartist_negatives(concept: Concept, embs: EmbeddingSet) -> dict[str, str] | None:
    negative = concept.trigger + "-neg"
    return {concept.trigger: negative} if negative in embs else None


def measure(stage: Stage, bundle: str, concept: Concept, method: str, base_cache: dict) -> dict[str, float]:
    """Losses and gains of every variant of ``bundle`` on ``stage``."""
    if method in DIRECT:
        return measure_direct(stage, bundle, concept, method, base_cache)
    host = stage.host
    data, pics = stage.held_out[concept.key]
    captions = [p.caption(concept, trigger_of(method, concept)) for p in pics]
    parts = load_parts(host, bundle)
    key = (id(stage), concept.key, trigger_of(method, concept))
    if key not in base_cache:
        with variant(parts, "base") as embs:
            base_cache[key] = denoise_loss(host, data, captions, embs)
    base = base_cache[key]
    out = {"base": base}
    for which in ("full", "emb", "unet", "te"):
        if which != "full" and (not has_part(parts, which) or (which == "emb" and method == "lora")):
            continue  # nothing trained there (the lora method's placeholder embedding is never used)
        with variant(parts, which) as embs:
            # DreamArtist++ is used with its negative in the negative prompt (where its embeddings are)
            neg = dreamartist_negatives(concept, embs) if method == "dreamartist" else None
            out[which] = denoise_loss(host, data, captions, embs, neg, METHODS["dreamartist"]["dreamartist_cfg"])
        out[f"gain_{which}"] = gain(out[which], base)
    for which in ("emb", "unet", "te"):
        if f"gain_{which}" in out and abs(out["gain_full"]) > 1e-9:
            out[f"share_{which}"] = out[f"gain_{which}"] / out["gain_full"]
    bdata, bcaps = stage.base_prompts
    bkey = (id(stage), "base-prompts")
    if bkey not in base_cache:
        base_cache[bkey] = denoise_loss(host, bdata, bcaps, EmbeddingSet())
    with variant(parts, "full") as embs:
        out["drift_pct"] = 100.0 * (denoise_loss(host, bdata, bcaps, embs) / base_cache[bkey] - 1.0)
    out["size_kb"] = Path(bundle).stat().st_size / 1024
    out["ms_per_step"] = STEP_MS.get(bundle, float("nan"))
    return out


def measure_direct(stage: Stage, path: str, concept: Concept, method: str, base_cache: dict) -> dict[str, float]:
    """``measure`` for a hypernetwork or DreamBooth file: the full model only (it has no parts)."""
    host = stage.host
    data, pics = stage.held_out[concept.key]
    captions = [p.caption(concept, trigger_of(method, concept)) for p in pics]
    key = (id(stage), concept.key, trigger_of(method, concept))
    if key not in base_cache:
        base_cache[key] = denoise_loss(host, data, captions, EmbeddingSet())
    bdata, bcaps = stage.base_prompts
    bkey = (id(stage), "base-prompts")
    if bkey not in base_cache:
        base_cache[bkey] = denoise_loss(host, bdata, bcaps, EmbeddingSet())
    with applied(host, method, path, FIRST_UNET[0]):
        full = denoise_loss(host, data, captions, EmbeddingSet())
        drift = denoise_loss(host, bdata, bcaps, EmbeddingSet())
    return {"base": base_cache[key], "full": full, "gain_full": gain(full, base_cache[key]),
            "drift_pct": 100.0 * (drift / base_cache[bkey] - 1.0), "size_kb": Path(path).stat().st_size / 1024,
            "ms_per_step": STEP_MS.get(path, float("nan"))}


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def seed_means(rows: list[dict], field: str, seeds: list[int]) -> list[float]:
    """Per seed, the mean of ``field`` over the concepts (rows without it are skipped)."""
    out = []
    for s in seeds:
        vals = [r[field] for r in rows if r["seed"] == s and field in r]
        if vals:
            out.append(statistics.mean(vals))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--sweep-seeds", type=int, default=1, help="seeds of the defaults sweep (time: ~20 s a run)")
    ap.add_argument("--steps", type=int, default=COMMON["steps"])
    ap.add_argument("--unet-lr", type=float, default=COMMON["unet_lr"],
                    help="UNet LoRA LR of every method (the embedding LR stays 10x it, the TE LoRA's 0.1x)")
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS) + list(DIRECT), choices=list(METHODS) + list(DIRECT),
                    help="only these methods (the pivotal row is the baseline of the others)")
    ap.add_argument("--hyper-lr", type=float, default=DIRECT["hypernetwork"]["lr"], help="the hypernetwork's LR")
    ap.add_argument("--hyper-targets", choices=("all", "cross"), default=DIRECT["hypernetwork"]["targets"],
                    help="hypernetwork on every attention (the webui's default sizes) or cross-attention only")
    ap.add_argument("--hyper-layer-norm", action="store_true", help="hypernetwork with layer norm")
    ap.add_argument("--dreambooth-lr", type=float, default=DIRECT["dreambooth"]["lr"], help="DreamBooth's UNet LR")
    ap.add_argument("--no-sweep", action="store_true", help="skip the defaults sweep")
    ap.add_argument("--sweep", nargs="+", choices=sorted(SWEEP_ONLY), help="only these sweep settings")
    ap.add_argument("--no-transfer", action="store_true", help="skip the second base model")
    ap.add_argument("--base", default=str(tiny_world.WEIGHTS_FILE), help="the tiny-world weight file")
    ap.add_argument("--shift-steps", type=int, default=200, help="steps continuing the base on the shifted world")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    COMMON["steps"] = args.steps
    COMMON.update(unet_lr=args.unet_lr, embedding_lr=10 * args.unet_lr, te_lr=0.1 * args.unet_lr)
    DIRECT["hypernetwork"].update(lr=args.hyper_lr, targets=args.hyper_targets, layer_norm=args.hyper_layer_norm)
    DIRECT["dreambooth"]["lr"] = args.dreambooth_lr
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pivotal-efficacy-"))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    host = DiffusersHost(tiny_world.load_parts(args.base), label="tiny-world sd1")
    FIRST_UNET[:] = [host.unet]
    stage = make_stage(host, shifted=False)
    stage2 = shift_note = None
    if not args.no_transfer:
        from _efficacy_shift import shifted_parts

        t0 = time.perf_counter()
        parts2, shift_note = shifted_parts(args.base, steps=args.shift_steps)
        shift_note["seconds"] = time.perf_counter() - t0
        stage2 = make_stage(DiffusersHost(parts2, label="tiny-world shifted"), shifted=True)
    cache: dict = {}
    rows: list[dict] = []
    for method in args.methods:
        for key in args.concepts:
            concept = CONCEPTS[key]
            for seed in seeds:
                t0 = time.perf_counter()
                bundle = train_one(host, concept, method, seed, work)
                row = {"method": method, "concept": key, "seed": seed, **measure(stage, bundle, concept, method, cache)}
                if stage2 is not None:
                    second = measure(stage2, bundle, concept, method, cache)
                    row.update({f"transfer_{k}": v for k, v in second.items() if k.startswith("gain_")})
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(f"[efficacy] {method} {key} seed {seed}: fit {row['gain_full']:.3f} drift "
                      f"{row['drift_pct']:+.2f}% ({row['seconds']:.0f}s)", flush=True)
                gc.collect()

    sweep_rows: list[dict] = []
    if not args.no_sweep:
        for label, overrides, vectors in SWEEP:
            if args.sweep and label not in args.sweep:
                continue
            for key in args.concepts:
                for seed in seeds[:args.sweep_seeds]:
                    bundle = train_one(host, CONCEPTS[key], "pivotal", seed, work, overrides, vectors)
                    sweep_rows.append({"setting": label, "concept": key, "seed": seed,
                                       **measure(stage, bundle, CONCEPTS[key], "pivotal", cache)})
            fits = seed_means([r for r in sweep_rows if r["setting"] == label], "gain_full", seeds)
            print(f"[efficacy] sweep {label}: fit {mean_sd(fits)}", flush=True)

    report(rows, sweep_rows, seeds, args)
    write_json(args.json, {"benchmark": "efficacy", "machine": machine_info(), "common": COMMON, "methods": METHODS,
                           "direct": DIRECT,
                           "vectors": VECTORS, "seeds": seeds,
                           "concepts": {k: vars(CONCEPTS[k]) for k in args.concepts},
                           "rows": rows, "sweep": sweep_rows, "shifted_model": shift_note,
                           "load_average_end": load_average(), "wall_s": time.perf_counter() - started})
    return 0


def report(rows: list[dict], sweep_rows: list[dict], seeds: list[int], args: argparse.Namespace) -> None:
    def pick(method: str) -> list[dict]:
        return [r for r in rows if r["method"] == method]

    methods = [m for m in [*METHODS, *DIRECT] if pick(m)]
    print_table(["method", "fit (held-out gain)", "drift %", "emb alone share", "UNet LoRA alone share",
                 "TE LoRA alone share", "transfer: full gain", "transfer: emb alone gain", "size KB", "ms/step"],
                [[m, mean_sd(seed_means(pick(m), "gain_full", seeds)), mean_sd(seed_means(pick(m), "drift_pct", seeds)),
                  mean_sd(seed_means(pick(m), "share_emb", seeds)), mean_sd(seed_means(pick(m), "share_unet", seeds)),
                  mean_sd(seed_means(pick(m), "share_te", seeds)),
                  mean_sd(seed_means(pick(m), "transfer_gain_full", seeds)),
                  mean_sd(seed_means(pick(m), "transfer_gain_emb", seeds)),
                  f"{statistics.mean(r['size_kb'] for r in pick(m)):.0f}",
                  f"{statistics.median(r['ms_per_step'] for r in pick(m)):.0f}"] for m in methods],
                title=f"Efficacy ({args.steps} steps, mean ± sd over {len(seeds)} seeds of the concept mean)")
    print_table(["method"] + [f"fit: {k}" for k in args.concepts],
                [[m] + [mean_sd([r["gain_full"] for r in pick(m) if r["concept"] == k]) for k in args.concepts]
                 for m in methods], title="Fit per concept (held-out gain, mean ± sd over seeds)")
    if sweep_rows:
        labels = ["pivotal (default)"] + [s[0] for s in SWEEP]

        sweep_seeds = sorted({r["seed"] for r in sweep_rows})

        def of(label: str) -> list[dict]:
            rows_ = (pick("pivotal") if label == "pivotal (default)"
                     else [r for r in sweep_rows if r["setting"] == label])
            return [r for r in rows_ if r["seed"] in sweep_seeds]  # the same seeds on every line

        print_table(["setting", "fit", "drift %", "emb alone share"],
                    [[lab, mean_sd(seed_means(of(lab), "gain_full", sweep_seeds)),
                      mean_sd(seed_means(of(lab), "drift_pct", sweep_seeds)),
                      mean_sd(seed_means(of(lab), "share_emb", sweep_seeds))] for lab in labels],
                    title="Choosing the defaults: pivotal with one setting changed "
                          f"(seeds {sweep_seeds}, concept mean)")


if __name__ == "__main__":
    raise SystemExit(main())
