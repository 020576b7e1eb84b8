"""TextCraftor on the tiny world: does reward fine-tuning of the text encoder raise prompt following,
do ``te=`` weights between 0 and 1 interpolate it, does a UNet LoRA add to it, and what does a step
cost against a normal (pivotal) step.

Model: the shipped tiny-world sd1 model (``--weights`` to measure another, e.g. the v2 base). Runs:

* ``te``: the textcraftor mode, text-encoder LoRA only, reward ``tiny_world``
  (:mod:`pivotal.demo.reward`) on the demo's training prompts (:func:`pivotal.demo.reward.demo_prompts`);
* ``te+unet``: the same with ``textcraftor_unet`` (a UNet LoRA trained by the same reward, one bundle).

Measure: prompt-following accuracy (background, object colour, place, shape, all four) read back by
:func:`pivotal.demo.world_read.read_picture` from pictures sampled for the checks' prompts
(:func:`pivotal.demo.pretrain.check.check_prompts`, none of them a training prompt) in one batch
(DDIM 20 steps, guidance 4: batched, so 200 pictures take seconds where the one-at-a-time preview
path takes minutes on a busy CPU; the same starting noise for every row), at te weights
0 / 0.5 / 1 (``te+unet``: UNet weight 1 throughout). The reader is not the reward: the reward is a
learnt classifier on renders, the reader hand rules. Cost: seconds per optimizer step and peak
resident memory (VmHWM, in a subprocess per case) of the textcraftor step and of a pivotal step
(the demo dataset, UNet LoRA + 1 embedding) at the same batch size and resolution.

    nice -n 15 .venv/bin/python bench/textcraftor.py --json bench/results/textcraftor.json
    nice -n 15 .venv/bin/python bench/textcraftor.py --weights NEW.safetensors --json /tmp/v2.json   # on v2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "lib"))

import torch  # noqa: E402

#: the textcraftor run measured (tiny model, 1 CPU thread: minutes)
RUN = {"steps": 150, "batch_size": 4, "te_lr": 1e-3, "unet_lr": 5e-4, "textcraftor_sample_steps": 10,
       "textcraftor_grad_steps": 3, "textcraftor_guidance": 4.0, "resolution": 64, "bucket_step": 16, "seed": 0}
TE_WEIGHTS = (0.0, 0.5, 1.0)
#: the evaluation noise's seed
EVAL_SEED = 2024


def host_for(weights: str | None) -> Any:
    from pivotal.demo.host import build_demo_host
    from pivotal.demo.reward import register

    register()
    if not weights:
        return build_demo_host("sd1")
    from pivotal.demo.tiny_world import load_parts
    from pivotal.hosts.diffusers.host import DiffusersHost

    return DiffusersHost(load_parts(weights), label=f"tiny-world {Path(weights).name}")


#: the reward trained on, and whether prompts (training and checks) say the object's colour in words
#: the model never saw (pivotal.demo.reward.NEW_COLOUR_WORDS); set by --reward / --new-words
OPTIONS: dict[str, Any] = {"reward": "tiny_world", "new_words": False}


def textcraftor_config(out: Path, unet: bool, steps: int) -> Any:
    from pivotal.demo.reward import DEMO_PROMPT_COUNT, demo_prompts
    from pivotal.training.config import TrainConfig

    # new words: the CLI demo's 256 prompts (64 overfit them: bench/RESULTS.md, "From the A1111 tab")
    count = DEMO_PROMPT_COUNT if OPTIONS["new_words"] else 64
    return TrainConfig(mode="textcraftor", out_dir=str(out), output_name="tc-unet" if unet else "tc",
                       reward=[OPTIONS["reward"]], reward_prompts=demo_prompts(count, new_words=OPTIONS["new_words"]),
                       textcraftor_unet=unet, **{**RUN, "steps": steps}).validate()


def read_back(host: Any, count: int, steps: int = 20, guidance: float = 4.0) -> dict[str, float]:
    """Prompt-following accuracy over the checks' first ``count`` prompts: one picture each, sampled
    in one batch with DDIM (``steps``, ``guidance``) from noise fixed by :data:`EVAL_SEED` (the
    same noise for every row, so rows differ only by the weights), read back by the reader."""
    from pivotal.demo.pretrain.check import ATTRIBUTES, check_prompts
    from pivotal.demo.world_read import read_picture
    from pivotal.hosts.diffusers.sampling import to_pil
    from pivotal.training.config import TrainConfig
    from pivotal.training.textcraftor import RewardStepRunner

    pairs = check_prompts(count)
    cfg = TrainConfig(mode="textcraftor", reward=["tiny_world"], reward_prompts=["x"], resolution=64,
                      bucket_step=16, textcraftor_sample_steps=steps, textcraftor_grad_steps=1,
                      textcraftor_guidance=guidance).validate()
    runner = RewardStepRunner(cfg, host, ["x"], [], torch.Generator())
    noise = torch.randn((count, *runner.latent_shape), generator=torch.Generator().manual_seed(EVAL_SEED))
    from pivotal.demo.reward import in_new_words

    said = [in_new_words(p) if OPTIONS["new_words"] else p for p, _ in pairs]
    with torch.no_grad():
        pictures = runner.images(said, noise)
    hits = {a: 0 for a in ATTRIBUTES}
    all4 = 0
    for picture, (_, scene) in zip(pictures, pairs):
        r = read_picture(to_pil(picture * 2 - 1))
        obj = scene.objects[0]
        ok = {"background": r.background == scene.background, "colour": r.colour == obj.colour,
              "place": r.place == obj.place, "shape": r.shape == obj.shape}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        all4 += all(ok.values())
    return {**{a: hits[a] / count for a in ATTRIBUTES}, "all4": all4 / count}


def accuracy(host: Any, bundle: str | None, te: float, unet: float, count: int) -> dict[str, float]:
    """:func:`read_back` with ``bundle`` attached at those weights (None: the base model)."""
    from pivotal.inference.bundle_load import load_bundle_for_model

    if bundle is None:
        return read_back(host, count)
    targets = host.lora_targets("unet", "attn-mlp-conv") + host.lora_targets("te", "attn-mlp-conv")
    net = load_bundle_for_model(Path(bundle), "sd1", targets, {"clip_l": 64}).network
    for part in net.parts:
        net.set_multiplier(part, unet if part == "unet" else te)
    with net.attached():
        return read_back(host, count)


def cost_child(case: str, weights: str | None, steps: int) -> dict[str, float]:
    """Seconds per step (after one warm-up step) and peak RSS (MB) of ``steps`` steps of ``case``."""
    sys.path.insert(0, str(HERE))
    from _report import cuda_peak_mib, cuda_peak_reset, rss_mib
    from memory import reset_peak
    from pivotal.training.trainer import train

    torch.set_num_threads(1)
    host = host_for(weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for m in (host.unet, host.vae, *host._encoders.values()):
        m.to(device)
    host.device = device
    work = Path(tempfile.mkdtemp(prefix=f"tc-cost-{case}-"))
    if case == "pivotal":
        from pivotal.demo.data import make_demo_dataset
        from pivotal.demo.settings import DEMO_SETTINGS
        from pivotal.training.config import EmbeddingSpec, TrainConfig

        make_demo_dataset(work / "data", ["mychar"], count=8, size=64, seed=0)
        cfg = TrainConfig(**{**DEMO_SETTINGS, "data_dir": str(work / "data"), "out_dir": str(work / "out"),
                             "embeddings": [EmbeddingSpec("mychar", 2, "star")], "steps": steps + 1,
                             "batch_size": RUN["batch_size"]}).validate()
    else:
        cfg = textcraftor_config(work / "out", case == "te+unet", steps + 1)
    times: list[float] = []
    last = [0.0]

    def on_event(e: Any) -> None:
        if e.kind == "step":
            now = time.perf_counter()
            if e.step >= 2:
                times.append(now - last[0])
            last[0] = now
        elif e.kind == "start":
            last[0] = time.perf_counter()

    loaded = rss_mib()["VmRSS"]
    peak_reset = reset_peak()
    cuda_peak_reset()
    train(cfg, host, on_event=on_event)
    return {"s_per_step": sorted(times)[len(times) // 2], "device": str(device),
            "added_peak_rss_mib": rss_mib()["VmHWM"] - loaded if peak_reset else None,
            "cuda_peak_mib": cuda_peak_mib()}


def cost(case: str, weights: str | None, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--cost-child", case, "--steps", str(steps)] + (["--weights", weights] if weights
                                                                                        else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="a tiny-world weight file (default: the shipped model)")
    parser.add_argument("--count", type=int, default=200, help="prompts per accuracy measurement")
    parser.add_argument("--steps", type=int, default=RUN["steps"], help="textcraftor steps per run")
    parser.add_argument("--te-lr", type=float, default=RUN["te_lr"], help="the text-encoder LoRA's learning rate")
    parser.add_argument("--unet-lr", type=float, default=RUN["unet_lr"], help="the UNet LoRA's (te+unet runs)")
    parser.add_argument("--batch-size", type=int, default=RUN["batch_size"], help="prompts per step")
    parser.add_argument("--sample-steps", type=int, default=RUN["textcraftor_sample_steps"],
                        help="DDIM steps of each training picture")
    parser.add_argument("--grad-steps", type=int, default=RUN["textcraftor_grad_steps"],
                        help="of those, how many (the last) carry the gradient")
    parser.add_argument("--cost-steps", type=int, default=10, help="steps timed per cost case")
    parser.add_argument("--runs", default="te,te+unet", help="which runs (comma-separated: te, te+unet; empty: none)")
    parser.add_argument("--reward", default="tiny_world", help="the reward trained on (tiny_world, tiny_world_rules)")
    parser.add_argument("--new-words", action="store_true",
                        help="prompts say the object's colour in words the model never saw (crimson, navy, ...)")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's row")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cost-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cost_child:
        print(json.dumps(cost_child(args.cost_child, args.weights, args.steps)))
        return 0
    torch.set_num_threads(1)
    from pivotal.training.trainer import train

    OPTIONS.update(reward=args.reward, new_words=args.new_words)
    RUN.update(te_lr=args.te_lr, unet_lr=args.unet_lr, batch_size=args.batch_size,
               textcraftor_sample_steps=args.sample_steps, textcraftor_grad_steps=args.grad_steps)
    host = host_for(args.weights)
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": {**RUN, **OPTIONS, "steps": args.steps}, "count": args.count,
                               "model": args.weights or "shipped tiny-world sd1", "rows": []}
    if not args.no_base:
        results["rows"].append({"run": "base", "te": None, "unet": None,
                                "accuracy": accuracy(host, None, 0, 0, args.count)})
        print(json.dumps(results["rows"][-1]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="tc-bench-"))
    for name in [r for r in args.runs.split(",") if r]:
        unet = name == "te+unet"
        t0 = time.perf_counter()
        res = train(textcraftor_config(work / name, unet, args.steps), host)
        results[f"train_{name}"] = {"seconds": round(time.perf_counter() - t0, 1),
                                    "first_loss": res.first_smoothed_loss, "last_loss": res.last_smoothed_loss}
        print(json.dumps(results[f"train_{name}"]), flush=True)
        for te in TE_WEIGHTS:
            row = {"run": name, "te": te, "unet": 1.0 if unet else None,
                   "accuracy": accuracy(host, res.bundle_path, te, 1.0, args.count)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if not args.no_cost:
        results["cost"] = {case: cost(case, args.weights, args.cost_steps) for case in ("pivotal", "te", "te+unet")}
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def table(results: dict[str, Any]) -> str:
    """The Markdown tables of ``results`` (for bench/RESULTS.md)."""
    lines = ["| run | te weight | unet weight | background | colour | place | shape | all four |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        a = r["accuracy"]
        te = "-" if r["te"] is None else f"{r['te']:g}"
        unet = "-" if r["unet"] is None else f"{r['unet']:g}"
        lines.append(f"| {r['run']} | {te} | {unet} | " + " | ".join(f"{100 * a[k]:.0f} %" for k in
                                                                        ("background", "colour", "place", "shape",
                                                                         "all4")) + " |")
    if "cost" not in results:
        return "\n".join(lines)
    lines += ["", "| step | device | s / step (median) | peak RSS added by training (MiB) | CUDA peak (MiB) |",
              "|---|---|---|---|---|"]
    for case, c in results["cost"].items():
        rss = "-" if c["added_peak_rss_mib"] is None else f"{c['added_peak_rss_mib']:.0f}"
        gpu = "-" if c["cuda_peak_mib"] is None else f"{c['cuda_peak_mib']:.0f}"
        lines.append(f"| {case} | {c['device']} | {c['s_per_step']:.3f} | {rss} | {gpu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
