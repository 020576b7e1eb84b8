"""The X/Y/Z plot axes: how each value rewrites the prompt, and how they join the webui's script
(a stand-in for its ``xyz_grid`` module: only ``AxisOption`` and ``axis_options`` are used)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pivotal.errors import ConfigError
from pivotal.inference.grid import prompt_for_part, prompt_with_bundle
from pivotal.webui.xyz_axes import BUNDLE_AXIS, PART_AXIS, add_axes, find_xyz_module, lora_bundle_names


@pytest.mark.parametrize("part, expect", [
    ("full", "mychar <lora:b:0.8> on a beach"),
    ("unet", "mychar <lora:b:te=0:unet=0.8> on a beach"),
    ("te", "mychar <lora:b:te=0.8:unet=0> on a beach"),
    ("emb", "mychar <lora:b:0> on a beach"),
    ("base", "mychar on a beach"),
])
def test_part_values_rewrite_the_tag(part: str, expect: str) -> None:
    assert prompt_for_part("mychar <lora:b:0.8> on a beach", part) == expect


def test_part_keeps_each_strength_of_a_split_tag() -> None:
    assert prompt_for_part("x <lora:b:te=0.5:unet=1.5>", "unet") == "x <lora:b:te=0:unet=1.5>"
    assert prompt_for_part("x <lora:b:te=0.5:unet=1.5>", "te") == "x <lora:b:te=0.5:unet=0>"
    with pytest.raises(ConfigError, match="'half' is not one of"):
        prompt_for_part("x", "half")


def test_bundle_values_name_the_tag() -> None:
    assert prompt_with_bundle("x <lora:a:0.7> <lora:c:1>", "b") == "x <lora:b:0.7> <lora:c:1>"
    assert prompt_with_bundle("x", "b") == "x <lora:b:1>"


class _AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value, self.choices = label, type, apply, format_value, choices


def test_axes_join_the_script_once_and_apply(tmp_path: Path) -> None:
    xyz = SimpleNamespace(AxisOption=_AxisOption, axis_options=[_AxisOption("Seed", int, None)])
    scripts = SimpleNamespace(scripts_data=[SimpleNamespace(path="/w/scripts/other.py", module=object()),
                                            SimpleNamespace(path="/w/scripts/xyz_grid.py", module=xyz)])
    assert find_xyz_module(scripts) is xyz and find_xyz_module(SimpleNamespace()) is None
    assert add_axes(xyz, lambda: ["b1", "b2"]) == [PART_AXIS, BUNDLE_AXIS]
    assert add_axes(xyz, lambda: []) == []  # a second UI build adds nothing twice
    part, bundle = xyz.axis_options[1:]
    assert part.choices() == ["full", "unet", "te", "emb", "base"] and bundle.choices() == ["b1", "b2"]
    p = SimpleNamespace(prompt="mychar <lora:b1:1>", hr_prompt="")
    part.apply(p, "te", None)
    assert p.prompt == "mychar <lora:b1:te=1:unet=0>" and p.hr_prompt == ""
    bundle.apply(p, "b2", None)
    assert p.prompt == "mychar <lora:b2:te=1:unet=0>"


def test_bundle_choices_are_the_folders_bundles(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from test_generate import FakeHost, write_test_bundle

    host = FakeHost()
    (tmp_path / "sub").mkdir()
    write_test_bundle(tmp_path / "sub" / "Zed.safetensors", host.lora_targets("unet", "attn"),
                      {"clip_l": host.vocabulary("clip_l")})
    write_test_bundle(tmp_path / "alpha.safetensors", host.lora_targets("unet", "attn"),
                      {"clip_l": host.vocabulary("clip_l")}, emb_name="other")
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(tmp_path / "plain_lora.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)
    assert lora_bundle_names(str(tmp_path)) == ["alpha", "Zed"]
    assert lora_bundle_names(str(tmp_path / "absent")) == []
