"""Sweeps: one base config, one or two settings varied, one queued run per combination.

``write_sweep(base, ["te_lr=1e-6,1e-5,1e-4"], folder)`` checks every value against its setting's
declaration (kind, limits, choices) before anything is written, then writes one JSON config per
combination into ``folder``: the base's settings (its relative paths made absolute, so the folder
may live anywhere), the varied values, ``output_name`` = the base name plus the values
(``mychar-te_lr1e-05``; the file is named the same) and ``sweep`` = ``["te_lr=1e-05"]``, which the
trainer records in the bundle (``pivotal.sweep``). The folder is then an ordinary queue
(:mod:`pivotal.training.queue`: resume and skip come from it); :func:`ranked` orders its outcome by
validation loss.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from pivotal.errors import ConfigError
from pivotal.training.config import TrainConfig
from pivotal.training.config_file import load_config_file
from pivotal.training.queue import QueueRun, queue_config
from pivotal.training.settings import DeclaredSetting, declared

#: at most this many settings vary in one sweep (3 values x 3 values is already 9 runs)
MAX_VARY = 2
#: settings a sweep may not vary: they name or place the run, or are lists
NOT_VARIED = ("output_name", "out_dir", "data_dir", "validation_dir", "sweep")


def parse_vary(text: str) -> tuple[str, list[Any]]:
    """``NAME=V1,V2,...`` -> (setting name, typed values); ConfigError naming the setting and the
    value at fault (unknown setting, wrong kind, outside its limits or choices)."""
    name, sep, rest = text.partition("=")
    name = name.strip().replace("-", "_")
    settings = {s.name: s for s in declared(TrainConfig)}
    if not sep or not rest.strip():
        raise ConfigError(f"--vary {text!r}: write NAME=VALUE,VALUE (e.g. te_lr=1e-6,1e-5,1e-4)")
    if name not in settings:
        raise ConfigError(f"--vary {text!r}: {name!r} is not a setting (see pivotal train --help)")
    s = settings[name]
    if name in NOT_VARIED or s.kind not in ("int", "float", "bool", "str"):
        raise ConfigError(f"--vary {name}: this setting cannot be swept; vary a number, switch or choice")
    values = [_typed(s, v.strip()) for v in rest.split(",")]
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"--vary {name}: a value is listed twice ({rest})")
    return name, values


def _typed(s: DeclaredSetting, text: str) -> Any:
    try:
        if s.kind == "int":
            value: Any = int(text)
        elif s.kind == "float":
            value = float(text)
        elif s.kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            value = text.lower() in ("true", "1", "yes", "on")
        else:
            value = text
    except ValueError:
        raise ConfigError(f"--vary {s.name}: {text!r} is not a {s.kind}") from None
    if s.spec.limits is not None and (problem := s.spec.limits.problem(value)):
        raise ConfigError(f"--vary {s.name}: {problem}")
    if s.choices and value not in s.choices:
        raise ConfigError(f"--vary {s.name}: {value!r} is not one of {', '.join(s.choices)}")
    if s.spec.check is not None:
        s.spec.check(value)
    return value


def value_text(value: Any) -> str:
    """A value as it appears in a run's name: 1e-05, 0p5 (names allow no '.'), true, attn-mlp."""
    text = ("true" if value else "false") if isinstance(value, bool) else (
        f"{value:g}" if isinstance(value, float) else str(value))
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace(".", "p").replace("+", ""))


def write_sweep(base: str | os.PathLike, varies: list[str], folder: str | os.PathLike) -> list[Path]:
    """Write one config per combination of the ``varies`` values into ``folder`` (see the module
    docstring); returns their paths. Nothing is written when a value or the base is refused."""
    base_path = Path(base)
    axes = check_varies(varies)
    values = load_config_file(base_path)
    for key in ("data_dir", "out_dir", "validation_dir"):  # relative to the base file, wherever the sweep is
        if values.get(key) and not Path(str(values[key])).expanduser().is_absolute():
            values[key] = str((base_path.parent / str(values[key])).resolve())
    stem = str(values.get("output_name") or base_path.stem)
    return _write(sweep_configs(values, axes, stem, Path(folder)))


def check_varies(varies: list[str]) -> list[tuple[str, list[Any]]]:
    """The (setting, values) of each ``NAME=V1,V2`` entry (:func:`parse_vary`); ConfigError for
    none or more than :data:`MAX_VARY`, or a setting given twice."""
    if not 1 <= len(varies) <= MAX_VARY:
        raise ConfigError(f"--vary: give 1 to {MAX_VARY} settings to sweep (got {len(varies)})")
    axes = [parse_vary(v) for v in varies]
    names = [n for n, _ in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"--vary {names[0]}: the same setting is varied twice; list all its values in one --vary")
    return axes


def sweep_configs(values: dict[str, Any], axes: list[tuple[str, list[Any]]], stem: str, out: Path,
                  complete: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """(path, settings) of each combination, every one built as a TrainConfig (types, unknown
    keys) before any is written; ``complete``: also validated whole (a form's or a request's
    settings, which must be runnable as they are: a config file may leave data_dir to the queue)."""
    names = [n for n, _ in axes]
    configs: list[tuple[Path, dict[str, Any]]] = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        run = dict(values)
        run.update(zip(names, combo))
        run["output_name"] = "-".join([stem] + [f"{n}{value_text(v)}" for n, v in zip(names, combo)])
        run["sweep"] = [f"{n}={v!r}" if isinstance(v, float) else f"{n}={v}" for n, v in zip(names, combo)]
        cfg = TrainConfig.from_dict(run)
        if complete:
            cfg.validate()
        configs.append((out / f"{run['output_name']}.json", run))
    return configs


def _write(configs: list[tuple[Path, dict[str, Any]]]) -> list[Path]:
    for path, run in configs:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(run, indent=2, default=_json_default) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return [p for p, _ in configs]


def sweep_folder(outputs: str | os.PathLike, base: TrainConfig, varies: list[str]) -> Path:
    """``<outputs>/sweeps/<output_name>-<settings>-<hash>``: the folder of the sweep of ``base``
    over ``varies`` (a form's or a request's). The same base and values give the same folder, so
    starting the same sweep again finds its finished runs there (and skips them); any other base
    or value list gets a folder of its own, whose runs are not mixed with this one's."""
    axes = check_varies(varies)
    key = json.dumps({"base": base.to_dict(), "vary": [[n, [repr(v) for v in vals]] for n, vals in axes]},
                     sort_keys=True, default=_json_default)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    names = "-".join(n for n, _ in axes)
    return Path(outputs) / "sweeps" / f"{base.output_name}-{names}-{digest}"


def write_sweep_from(base: TrainConfig, varies: list[str], outputs: str | os.PathLike) -> Path:
    """Write the sweep of the settings ``base`` (a form's, a request's) over ``varies`` into its
    :func:`sweep_folder` and return the folder. The runs write their bundles into ``output/``
    there. Every value is checked before anything is written (ConfigError naming the setting)."""
    axes = check_varies(varies)
    folder = sweep_folder(outputs, base, varies)
    values = base.to_dict()
    for key in ("data_dir", "validation_dir"):  # as the run would read them now, not from the sweep folder
        if values.get(key):
            values[key] = str(Path(str(values[key])).expanduser().resolve())
    values["out_dir"] = str(folder / "output")
    values["sweep"] = []
    _write(sweep_configs(values, axes, base.output_name, folder, complete=True))
    return folder


def _json_default(value: Any) -> Any:
    return vars(value)  # EmbeddingSpec from a config file's table


def ranked(runs: list[QueueRun]) -> list[QueueRun]:
    """``runs`` best first by validation loss (runs without one after, in their order); as they
    are when no run has one."""
    if not any(r.validation_loss is not None for r in runs):
        return list(runs)
    return sorted(runs, key=lambda r: (r.validation_loss is None, r.validation_loss or 0.0))


def start_sweep(job: Any, base: TrainConfig, varies: list[str], outputs: str | os.PathLike,
                host_provider: Callable[[], Any]) -> tuple[int, Path]:
    """Write the sweep of ``base`` over ``varies`` (:func:`write_sweep_from`) and start it on
    ``job`` (a :class:`pivotal.training.job.TrainingJob`) as one queue; (run id, sweep folder).
    ConfigError (naming the setting) before anything is written; JobBusyError while a run is
    going (checked first, so a refused sweep writes nothing)."""
    from pivotal.training.job import JobBusyError

    if job.running:
        raise JobBusyError("a training run is going; start the sweep when it ends (or interrupt it)")
    base.validate()
    folder = write_sweep_from(base, varies, outputs)
    run_id = job.start_queue(folder, queue_config, host_provider=host_provider, kind="sweep",
                             name=folder.name, base=base)
    return run_id, folder
