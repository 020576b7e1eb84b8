"""Settings are declared once: every TrainConfig field has a declaration, and every setting is
reachable from the ``pivotal train`` flags, a config file and its JSON Schema, and the Train form
(unless declared ``form="none"``). Each test sets every setting away from its default at once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pivotal.cli.main import build_parser
from pivotal.cli.train import build_config, flag_values
from pivotal.errors import ConfigError, EmbeddingNameError
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.config_file import load_config_file
from pivotal.training.schema import config_schema
from pivotal.training.settings import FORM_NONE, POSITIVE, Limits, declared, setting
from pivotal.ui.train_form import config_from_form, embedding_field_names, form_field_names, form_values_from_config
from setting_samples import VARIANTS, sample_config, sample_values

#: the flag names `pivotal train` had before the flags were generated: they must keep working
FLAGS_BEFORE = ("data", "out", "name", "embedding", "steps", "batch-size", "grad-accum", "seed", "resolution",
                "lora-preset", "unet-rank", "unet-alpha", "unet-lr", "te-rank", "te-lr", "embedding-lr",
                "phase-plan", "freeze-embeddings-at", "embedding-steps", "embedding-lr-after", "optimizer",
                "schedule", "warmup-steps", "precision", "min-snr-gamma", "noise-offset", "save-every",
                "on-interrupt", "preview-every", "flip", "te-lora", "gradient-checkpointing", "shuffle-tags",
                "caption-dropout")


def settings_given(cfg: TrainConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in sample_values()}


def test_every_field_is_declared() -> None:
    names = [s.name for s in declared(TrainConfig)]
    assert names == [f.name for f in dataclasses.fields(TrainConfig)]
    # between them the sample variants move every setting, so the reachability tests below do
    defaults = TrainConfig()
    moved = {n for variant in VARIANTS for n, v in sample_values(variant).items() if getattr(defaults, n) != v}
    assert moved == set(names)


def test_a_field_without_declaration_is_refused() -> None:
    @dataclasses.dataclass
    class Partial:
        steps: int = setting(1, "steps", group="run", limits=POSITIVE)
        forgotten: int = 3

    with pytest.raises(TypeError, match="Partial.forgotten has no declaration"):
        list(declared(Partial))


def cli_args(values: dict[str, Any]) -> list[str]:
    """``pivotal train`` arguments setting each value, spelt with the declared flags."""
    args = ["train"]
    for s in declared(TrainConfig):
        v, flag = values[s.name], "--" + s.flag
        if s.kind == "bool":
            args.append(flag if v else "--no-" + s.flag)
        elif s.kind == "embeddings":
            for e in v:
                args += [flag, f"{e.name}:{e.vectors}:{e.init_text}"]
        elif s.kind == "str_list":
            for item in v:
                args += [flag, item]
        else:
            args += [flag, str(v)]
    return args


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_has_a_flag(variant: int) -> None:
    parser = build_parser()
    want = sample_values(variant)
    args = parser.parse_args(cli_args(want))
    assert flag_values(args) == want
    assert settings_given(build_config(args)) == want
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    options = {o for action in train._actions for o in action.option_strings}
    assert {"--" + f for f in FLAGS_BEFORE} <= options
    assert {"--no-flip", "--no-bucketing", "--config", "--resume", "--json", "--device", "--demo"} <= options


def test_flags_override_the_file_and_the_demo_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps({"steps": 7, "flip": True, "resolution": 128, "preview_prompts": ["x"]}))
    args = build_parser().parse_args(["train", "--demo", "sd1", "--config", str(cfg), "--no-flip", "--data", "d",
                                      "--preview-prompt", "y", "--embedding", "zed"])
    got = build_config(args)
    assert (got.steps, got.flip, got.resolution, got.preview_prompts) == (7, False, 128, ["y"])
    assert got.unet_lr == 2e-3 and got.bucket_step == 16  # the demo's defaults, where nothing else spoke
    assert got.embeddings == [EmbeddingSpec("zed")]


def test_out_given_a_bundle_path_writes_the_bundle_there(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "mine.safetensors"
    args = build_parser().parse_args(["train", "--out", str(target), "--data", "d", "--embedding", "zed"])
    got = build_config(args)
    assert (Path(got.out_dir), got.output_name) == (target.parent, "mine")
    args = build_parser().parse_args(["train", "--out", str(target), "--name", "other", "--data", "d",
                                      "--embedding", "zed"])
    with pytest.raises(ConfigError, match="names the bundle 'mine' but --name says 'other'"):
        build_config(args)


def file_values(values: dict[str, Any]) -> dict[str, Any]:
    return {k: [dataclasses.asdict(e) for e in v] if k == "embeddings" else v for k, v in values.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_in_a_config_file(tmp_path: Path, variant: int) -> None:
    want = sample_values(variant)
    path = tmp_path / "all.json"
    path.write_text(json.dumps(file_values(want)))
    assert settings_given(TrainConfig.from_dict(load_config_file(path)).validate()) == want
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert settings_given(build_config(args)) == want


def _schema_problems(schema: dict[str, Any], value: Any) -> list[str]:
    """The few JSON Schema keywords the settings use, checked by hand (no jsonschema needed)."""
    kinds = {"integer": int, "number": (int, float), "boolean": bool, "string": str, "array": list, "object": dict}
    out = []
    if "type" in schema and not isinstance(value, kinds[schema["type"]]):
        out.append(f"{value!r} is not {schema['type']}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        out.append(f"{value!r} < {schema['minimum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        out.append(f"{value!r} <= {schema['exclusiveMinimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        out.append(f"{value!r} > {schema['maximum']}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        out.append(f"{value!r} >= {schema['exclusiveMaximum']}")
    return out


def test_schema_lists_every_setting_with_its_default_and_limits() -> None:
    schema = config_schema()
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    defaults = file_values(TrainConfig().to_dict())
    assert list(props) == list(defaults)
    for name, value in {**file_values(sample_values(1)), **file_values(sample_values(0))}.items():
        assert props[name]["default"] == defaults[name], name
        assert props[name]["description"], name
        assert _schema_problems(props[name], value) == [], name
    assert props["steps"]["exclusiveMinimum"] == 0 and props["caption_dropout"]["maximum"] == 1
    assert props["phase_plan"]["enum"] == ["together", "embeddings_first"]
    assert _schema_problems(props["steps"], 0) and _schema_problems(props["phase_plan"], "sideways")


def test_schema_accepts_the_samples_and_refuses_unknown_keys() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="the full schema check needs jsonschema (gradio 3 has it)")
    schema = config_schema()
    for variant in VARIANTS:
        jsonschema.validate(file_values(sample_values(variant)), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unet_rnak": 4}, schema)


def test_print_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from pivotal.cli.main import main

    assert main(["train", "--print-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_in_the_form_unless_declared_not_to_be(variant: int) -> None:
    names = form_field_names()
    assert len(names) == len(set(names)) and names[-1] == "resume"
    for s in declared(TrainConfig):
        if s.kind == "embeddings":
            assert set(embedding_field_names()) <= set(names)
        else:
            assert (s.name in names) == (s.spec.form != FORM_NONE), s.name
    want = sample_config(variant)
    base = dataclasses.replace(TrainConfig(), data_dir="d", embeddings=[EmbeddingSpec("base")])
    got, resume = config_from_form(base, form_values_from_config(want))
    shown = {s.name for s in declared(TrainConfig) if s.spec.form != FORM_NONE}
    assert {n: getattr(got, n) for n in shown} == {n: getattr(want, n) for n in shown} and resume == ""


def test_declared_limits_keep_their_messages() -> None:
    assert Limits(low=0, low_open=True).problem(0) == "must be greater than 0, got 0"
    assert Limits(low=0).problem(-1.5) == "must be 0 or more, got -1.5"
    assert Limits(low=0, high=1).problem(1.5) == "must be between 0 and 1, got 1.5"
    assert Limits(low=0, high=1, high_open=True).problem(1.0) == "must be below 1"
    assert Limits(low=0, high=1, high_open=True).problem(0.5) is None
    with pytest.raises(ConfigError, match="lora_dropout: must be below 1"):
        dataclasses.replace(sample_config(), lora_dropout=1.0).validate()
    with pytest.raises(EmbeddingNameError, match="embedding name 'a b' contains ' '"):
        dataclasses.replace(sample_config(), output_name="a b").validate()
    with pytest.raises(ConfigError, match="latent_cache: 'ram' is not one of memory, disk, off"):
        dataclasses.replace(sample_config(), latent_cache="ram").validate()
    with pytest.raises(ConfigError, match="preview_prompts: expected a list of strings, got 'a'"):
        TrainConfig.from_dict({"preview_prompts": "a"})
