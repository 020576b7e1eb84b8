"""Resume files: everything needed to continue a run exactly, in safetensors (never pickle).

A ``<name>-step<N>.resume.safetensors`` holds the trainable tensors in fp32, the optimizer's
tensor state, the noise generator's state, and a JSON record (step, settings fingerprint, model
fingerprint, loss smoother, optimizer scalars). Loading refuses a file made for another model or
with other settings, and says which.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from pivotal.errors import TrainingError
from pivotal.formats.safetensors_io import atomic_save, load_tensors, read_header

META_KEY = "pivotal.resume"
FORMAT = 1


@dataclass
class RunState:
    """The non-tensor part of a run's state."""

    step: int
    config: dict[str, Any]
    model: str
    smoother: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    #: [step, validation loss] and [step, drift %] of the evaluations so far (a resumed run keeps
    #: them, so its history and chart go on instead of restarting; empty in older files)
    validation: list[list[float]] = field(default_factory=list)
    drifts: list[list[float]] = field(default_factory=list)


def model_fingerprint(base_model: str, targets: Sequence[tuple[str, nn.Module]]) -> str:
    """A hash of the model the LoRA targets: module names, weight shapes and a sample of values.

    Different checkpoints of one architecture differ in values, so a sample of each target's
    weights is hashed too (cheap: 16 values per module).
    """
    h = hashlib.sha256(base_model.encode())
    for key, module in sorted(targets, key=lambda kv: kv[0]):
        w = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
        if not isinstance(w, torch.Tensor):  # a LoRA target always has one: the finders check it
            raise TrainingError(f"{key}: the LoRA target has no weight tensor")
        h.update(f"{key}:{tuple(w.shape)}".encode())
        sample = w.detach().flatten()[:16].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def save_state(path: str | os.PathLike, state: RunState, params: Sequence[tuple[str, nn.Parameter]],
               optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Write a resume file atomically. ``params``: (name, tensor) in optimizer order."""
    tensors: dict[str, torch.Tensor] = {}
    index = {id(p): i for i, (_, p) in enumerate(params)}
    for name, p in params:
        tensors[f"param.{name}"] = p.detach().float().cpu()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    order = [index[id(p)] for g in optimizer.param_groups for p in g["params"]]
    for slot, st in opt["state"].items():
        i = order[slot]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu()
            else:
                scalars.setdefault(str(i), {})[k] = v
    tensors["rng.noise"] = generator.get_state()
    record = {"format": FORMAT, "step": state.step, "config": state.config, "model": state.model,
              "smoother": state.smoother, "losses": state.losses,
              "validation": [[int(s), float(v)] for s, v in state.validation],
              "drifts": [[int(s), float(v)] for s, v in state.drifts],
              "params": [n for n, _ in params], "opt_scalars": scalars,
              "opt_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]}
    atomic_save(path, tensors, {META_KEY: json.dumps(record, default=float)})


def load_state(path: str | os.PathLike, expect_config: dict[str, Any], expect_model: str,
               params: Sequence[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
               generator: torch.Generator) -> RunState:
    """Restore a resume file into ``params``, ``optimizer`` and ``generator``; return its RunState.

    TrainingError (naming the file) when it was made for another model, with other settings, or
    for other trainable tensors.
    """
    header = read_header(path)
    raw = header.metadata.get(META_KEY)
    if raw is None:
        raise TrainingError(f"{path}: not a Pivotal resume file (no {META_KEY} record); "
                            "resume from a *.resume.safetensors file")
    rec = json.loads(raw)
    if rec.get("format") != FORMAT:
        raise TrainingError(f"{path}: resume format {rec.get('format')} is not supported (expected {FORMAT})")
    if rec["model"] != expect_model:
        raise TrainingError(f"{path}: was made for another model (the loaded model's weights differ); "
                            "load the model it was trained on, or start a new run")
    diffs = [f"{k}={rec['config'].get(k)!r} there, {v!r} now" for k, v in expect_config.items()
             if rec["config"].get(k) != v]
    if diffs:
        raise TrainingError(f"{path}: was made with other settings: {'; '.join(diffs[:5])}"
                            f"{' …' if len(diffs) > 5 else ''}")
    names = [n for n, _ in params]
    if rec["params"] != names:
        raise TrainingError(f"{path}: its trainable tensors differ from this run's "
                            f"({len(rec['params'])} there, {len(names)} now)")
    tensors = load_tensors(header)
    with torch.no_grad():
        for name, p in params:
            p.copy_(tensors[f"param.{name}"].to(p.dtype))
    index_of_slot = {}
    slot = 0
    index = {id(p): i for i, (_, p) in enumerate(params)}
    for g in optimizer.param_groups:
        for p in g["params"]:
            index_of_slot[slot] = index[id(p)]
            slot += 1
    state: dict[int, dict[str, Any]] = {}
    for s, i in index_of_slot.items():
        entry = {k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"opt.{i}.")}
        entry.update(rec["opt_scalars"].get(str(i), {}))
        if entry:
            state[s] = entry
    groups = []
    for saved, live in zip(rec["opt_groups"], optimizer.state_dict()["param_groups"]):
        groups.append({**saved, "params": live["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    generator.set_state(tensors["rng.noise"])
    return RunState(step=int(rec["step"]), config=rec["config"], model=rec["model"], smoother=rec["smoother"],
                    losses=list(rec["losses"]), validation=list(rec.get("validation", [])),
                    drifts=list(rec.get("drifts", [])))
