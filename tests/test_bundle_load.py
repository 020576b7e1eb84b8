"""Loading a bundle onto a model (checklist 21, 22) and name clashes (checklist 18)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pivotal.adapters.network import LoraNetwork
from pivotal.errors import BundleError, EmbeddingNameError, LoraTargetError
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.formats.name_registry import (
    bundle_embedding_names,
    check_new_names,
    embedding_folder_names,
    taken_names_for_run,
)
from pivotal.inference.bundle_load import load_bundle_for_model


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)


def targets(m: TwoLayer) -> list[tuple[str, nn.Module]]:
    return [("lora_unet_a", m.a), ("lora_te_b", m.b)]


def make_bundle(path: Path, model: TwoLayer, dim: int = 16, keys: list[str] | None = None) -> Path:
    net = LoraNetwork(targets(model), rank=2, alpha=1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    lora = {k: v for k, v in net.kohya_state_dict().items() if keys is None or k.split(".")[0] in keys}
    embs = [BundleEmbedding("good", {"clip_l": torch.randn(2, dim)}),
            BundleEmbedding("taken", {"clip_l": torch.randn(1, dim)})]
    write_bundle(path, "sd1", lora, embs, TrainingInfo(path.stem))
    return path


def test_matching_bundle_loads_fully(tmp_path: Path) -> None:
    m = TwoLayer()
    p = make_bundle(tmp_path / "b.safetensors", m)
    loaded = load_bundle_for_model(p, "sd1", targets(m), {"clip_l": 16})
    assert set(loaded.embeddings) == {"good", "taken"} and not loaded.skipped and not loaded.warnings
    assert loaded.network is not None and loaded.report is not None
    assert loaded.report.matched == 6 and not loaded.report.unmatched


def test_embedding_of_wrong_size_skipped_lora_still_loads(tmp_path: Path) -> None:
    m = TwoLayer()
    p = make_bundle(tmp_path / "b.safetensors", m, dim=16)
    loaded = load_bundle_for_model(p, "sd1", targets(m), {"clip_l": 768})
    assert loaded.embeddings == {} and set(loaded.skipped) == {"good", "taken"}
    assert (f"{p} [bundle_emb.good.string_to_param.*]: vectors are 16-dimensional but this model's clip_l "
            "encoder needs 768; embedding skipped") in loaded.warnings
    assert loaded.network is not None and loaded.report.matched == 6


def test_folder_embedding_wins_and_both_files_named(tmp_path: Path) -> None:
    m = TwoLayer()
    p = make_bundle(tmp_path / "b.safetensors", m)
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.zeros(1, 16)}, str(folder / "sub" / "Taken.safetensors"))
    (folder / "Taken.preview.png").write_bytes(b"")
    names = embedding_folder_names(folder)
    assert names == {"taken": str(folder / "sub" / "Taken.safetensors")}
    loaded = load_bundle_for_model(p, "sd1", targets(m), {"clip_l": 16}, names)
    assert set(loaded.embeddings) == {"good"}
    assert loaded.skipped["taken"] == (f"embedding 'taken' from {p} skipped: {folder / 'sub' / 'Taken.safetensors'} "
                                       "in the embeddings folder has the same name and wins")


def test_unmatched_lora_keys_reported_zero_match_is_error(tmp_path: Path) -> None:
    m = TwoLayer()
    p = make_bundle(tmp_path / "b.safetensors", m)
    only_a = load_bundle_for_model(p, "sd1", [("lora_unet_a", m.a)], {"clip_l": 16})
    assert only_a.report.unmatched == ["lora_te_b.alpha", "lora_te_b.lora_down.weight", "lora_te_b.lora_up.weight"]
    assert any("3 LoRA tensor(s) match no module of this model and were ignored (first: lora_te_b.alpha" in w
               for w in only_a.warnings)
    other = TwoLayer()
    with pytest.raises(LoraTargetError, match="none of the file's LoRA modules matches this model"):
        load_bundle_for_model(p, "sd1", [("lora_unet_zzz", other.a)], {"clip_l": 16})


def test_base_model_mismatch_refused(tmp_path: Path) -> None:
    m = TwoLayer()
    p = make_bundle(tmp_path / "b.safetensors", m)
    with pytest.raises(BundleError, match="b.safetensors: is a sd1 bundle; the loaded model is sdxl"):
        load_bundle_for_model(p, "sdxl", targets(m), {"clip_l": 16, "clip_g": 16})


def test_name_clashes_named_before_training(tmp_path: Path) -> None:
    m = TwoLayer()
    loras = tmp_path / "Lora"
    loras.mkdir()
    make_bundle(loras / "mybundle.safetensors", m)
    (loras / "broken.safetensors").write_bytes(b"junk")
    assert bundle_embedding_names(loras / "mybundle.safetensors") == ["good", "taken"]
    taken, warnings = taken_names_for_run("newrun", [loras])
    assert taken["good"] == f"the bundle {loras / 'mybundle.safetensors'}"
    assert taken["mybundle"] == f"the LoRA {loras / 'mybundle.safetensors'}"
    assert len(warnings) == 1 and "broken.safetensors" in warnings[0]
    # another bundle's name is shared (the prompt's tag decides), with a warning
    assert check_new_names(["fresh", "GOOD"], taken) == [
        f"embedding name 'GOOD' is also defined by the bundle {loras / 'mybundle.safetensors'}; in a prompt, the "
        "bundle whose <lora:...> tag is there owns the name (rename it to use both without tags)"]
    with pytest.raises(EmbeddingNameError, match="embedding name 'MyBundle' is already used by the LoRA"):
        check_new_names(["MyBundle"], taken)
    with pytest.raises(EmbeddingNameError, match="embedding names 'abc' and 'ABC' are the same trigger"):
        check_new_names(["abc", "ABC"], {})
    with pytest.raises(EmbeddingNameError, match="contains '/'"):
        check_new_names(["a/b"], {})
    assert check_new_names(["fresh", "other"], taken) == []  # no clash: no error, no warning
