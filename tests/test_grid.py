"""The ablation grid: which tag each column writes, what each cell applies on a real (tiny) model,
the sheet and its JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pivotal.errors import ConfigError
from pivotal.inference.grid import (
    COLUMNS,
    GridPlan,
    bundle_grid_plan,
    caption_words,
    column_tag,
    host_renderer,
    novel_prompts,
    plan_grid,
    render_grid,
)
from pivotal.inference.grid_sheet import compose_grid, grid_record, save_grid
from pivotal.inference.lora_tags import parse_lora_tags
from test_generate import FakeHost, fake  # noqa: F401  (the fixture: a tiny host + bundles in tmp_path)


def test_each_column_writes_the_tag_of_its_part() -> None:
    expect = {"full": (0.8, 0.8), "unet": (0.0, 0.8), "te": (0.8, 0.0), "emb": (0.0, 0.0)}
    for column, (te, unet) in expect.items():
        (tag,) = parse_lora_tags(column_tag("b", column, 0.8))[1]
        assert (tag.name, tag.te, tag.unet) == ("b", te, unet), column
    assert column_tag("b", "base") == ""
    with pytest.raises(ConfigError, match="'half' is not one of"):
        column_tag("b", "half")


def test_plan_rows_columns_and_seeds() -> None:
    plan = plan_grid("b", ["x on a beach", "x at night"], ["full", "base"], seed=7, negative="blurry")
    cells = plan.cells()
    assert [(c.row, c.column, c.seed) for c in cells] == [(0, "full", 7), (0, "base", 7), (1, "full", 8),
                                                          (1, "base", 8)]
    assert cells[0].prompt == "x on a beach <lora:b:1>" and cells[1].prompt == "x on a beach"
    assert all(c.negative == "blurry" for c in cells)
    with pytest.raises(ConfigError, match="holds a <lora:"):
        plan_grid("b", ["x <lora:other:1>"])
    with pytest.raises(ConfigError, match="at least one prompt"):
        plan_grid("b", [])
    with pytest.raises(ConfigError, match="choose from"):
        plan_grid("b", ["x"], ["full", "nope"])
    assert plan_grid("b", ["x"], parts={"unet"}).notes.keys() == {"te"}
    assert plan_grid("b", ["x"], parts={"unet", "te1", "te2"}).notes == {}


def test_novel_prompts_skip_contexts_the_captions_had() -> None:
    seen = caption_words('{"img": {"mychar on the beach": 3, "snow, mychar": 1}}')
    assert {"beach", "snow", "mychar"} <= seen
    got = novel_prompts(["mychar"], seen, 2, contexts=("{names} in the snow", "{names} on the beach at dawn",
                                                       "{names} on a beach", "a painting of {names}"))
    assert got == ["mychar on the beach at dawn", "a painting of mychar"]
    assert novel_prompts(["a", "b"], set(), 1) == ["a b on a beach at sunset"]
    assert caption_words("not json") == set() and caption_words(None) == set()


def test_auto_rows_are_added_after_the_users_prompts_without_repeating_them(
        fake: FakeHost, tmp_path: Path) -> None:  # noqa: F811
    contexts = ("{names} on a green background", "{names} on a blue background", "{names} at night")
    bundle = str(tmp_path / "mine.safetensors")
    plan = bundle_grid_plan(bundle, ["mychar on a green background"], auto_prompts=2, contexts=contexts)
    assert plan.rows == ["mychar on a green background", "mychar on a blue background", "mychar at night"]
    plan = bundle_grid_plan(bundle, ["photo of mychar"], auto_prompts=1, contexts=contexts)
    assert plan.rows == ["photo of mychar", "mychar on a green background"]


def test_cells_apply_their_part_on_the_model(fake: FakeHost, tmp_path: Path) -> None:  # noqa: F811
    plan = bundle_grid_plan(str(tmp_path / "mine.safetensors"), ["photo of mychar"], auto_prompts=0)
    assert plan.bundle == "mine" and plan.columns == list(COLUMNS) and plan.notes == {}
    result = render_grid(plan, host_renderer(fake, [str(tmp_path)], 2, 32, 32, 5.0))
    calls = {c.column: call for c, call in zip(plan.cells(), fake.calls)}

    def strengths(column: str, prefix: str) -> set[float]:
        return {v for k, v in calls[column]["attached"].items() if k.startswith(prefix)}

    assert strengths("full", "lora_unet") == {1.0} and strengths("full", "lora_te") == {1.0}
    assert strengths("unet", "lora_unet") == {1.0} and strengths("unet", "lora_te") == {0.0}
    assert strengths("te", "lora_unet") == {0.0} and strengths("te", "lora_te") == {1.0}
    assert set(calls["emb"]["attached"].values()) == {0.0}
    for column in ("full", "unet", "te", "emb"):
        assert list(calls[column]["embeddings"]) == ["mychar"], column
    assert calls["base"]["attached"] == {} and calls["base"]["embeddings"] == {}
    assert all("Lora hashes" in result.infotexts[(0, c)] for c in ("full", "unet", "te", "emb"))
    assert "Lora hashes" not in result.infotexts[(0, "base")]
    assert fake.attached() == {}


def test_sheet_boxes_hold_the_cells_and_the_record_says_what_they_are(tmp_path: Path) -> None:
    plan = GridPlan("b", ["red row", "blue row"], ["full", "base"], [3, 4])
    colours = {0: (200, 30, 30), 1: (30, 30, 200)}
    images = {(r, c): Image.new("RGB", (64, 64), colours[r]) for r in (0, 1) for c in ("full", "base")}
    from pivotal.inference.grid import GridResult

    result = GridResult(plan, images, {k: f"info {k}" for k in images})
    sheet, boxes = compose_grid(result)
    for (r, _c), (x, y, w, h) in boxes.items():
        assert (w, h) == (128, 128)  # 64 px cells are enlarged 2x so the labels fit
        assert sheet.getpixel((x + w // 2, y + h // 2)) == colours[r]
    record = grid_record(result, boxes)
    assert record["complete"] and [c["prompt"] for c in record["cells"]] == [
        "red row <lora:b:1>", "red row", "blue row <lora:b:1>", "blue row"]
    png, js = save_grid(tmp_path / "grid.png", result)
    assert json.loads(js.read_text(encoding="utf-8")) == record
    with Image.open(png) as im:
        assert im.size == sheet.size and "ablation grid of <lora:b>" in im.info["parameters"]
