"""Checklist 18: a new embedding name already used by another bundle's embedding, a LoRA's name or
an embeddings-folder file is refused before training starts, in the CLI/app (trainer: the output
folder) and in the webui (runner: Lora folder, embeddings folder, the webui's database)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pivotal.errors import EmbeddingNameError
from pivotal.formats.name_registry import check_new_names, taken_names_for_run
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.trainer import train
from pivotal.webui import runner


def _bundle(path: Path, *names: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"bundle_emb.{n}.string_to_param.*": torch.zeros(1, 8) for n in names}
              | {"lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    return path


def _config(out: Path, *names: str, output_name: str = "newrun") -> TrainConfig:
    return TrainConfig(out_dir=str(out), output_name=output_name, data_dir=str(out),
                       embeddings=[EmbeddingSpec(n) for n in names])


def test_scan_names_other_bundles_loras_and_embedding_files_not_own_saves(tmp_path: Path) -> None:
    loras, embs = tmp_path / "Lora", tmp_path / "embeddings"
    other = _bundle(loras / "sub" / "otherbundle.safetensors", "theirchar")
    _bundle(loras / "newrun.safetensors", "mychar")  # this run's earlier save
    _bundle(loras / "newrun-step000100.safetensors", "mychar")
    _bundle(loras / "newrun.resume.safetensors", "mychar")
    embs.mkdir()
    (embs / "folderchar.pt").write_bytes(b"x")
    taken, warnings = taken_names_for_run("newrun", [loras], [embs])
    assert taken == {"otherbundle": f"the LoRA {other}", "theirchar": f"the bundle {other}",
                     "folderchar": f"{embs / 'folderchar.pt'} in the embeddings folder"}
    assert warnings == []


def test_variants_of_one_queue_share_names_others_still_clash(tmp_path: Path) -> None:
    """A queue's (sweep's) runs are variants of one concept: run-lr1's files are not even named to
    run-lr2 (no warning, no alias clash), a bundle outside the queue is."""
    _bundle(tmp_path / "run-lr1.safetensors", "mychar")
    _bundle(tmp_path / "run-lr1-step000002.safetensors", "mychar")
    stranger = _bundle(tmp_path / "stranger.safetensors", "theirchar")
    taken, _ = taken_names_for_run("run-lr2", [tmp_path], variants=["run-lr1", "run-lr3"])
    assert taken == {"stranger": f"the LoRA {stranger}", "theirchar": f"the bundle {stranger}"}
    taken, _ = taken_names_for_run("run-lr2", [tmp_path])  # outside a queue: named (a warning, or a refusal)
    assert "mychar" in taken and "run-lr1" in taken


def test_trainer_refuses_a_lora_alias_in_the_output_folder_before_anything_runs(tmp_path: Path) -> None:
    _bundle(tmp_path / "otherbundle.safetensors", "theirchar")
    host = object()  # never reached: the refusal comes first
    with pytest.raises(EmbeddingNameError,
                       match=r"embedding name 'otherbundle' is already used by the LoRA .*otherbundle"):
        train(_config(tmp_path, "otherbundle"), host)  # type: ignore[arg-type]


def test_another_bundles_name_is_shared_with_a_warning_not_refused(tmp_path: Path) -> None:
    """Versions of one concept share their trigger: the prompt's <lora:...> tag says whose it is."""
    other = _bundle(tmp_path / "mychar-v1.safetensors", "MyChar")
    taken, _ = taken_names_for_run("mychar-v2", [tmp_path])
    warnings = check_new_names(["mychar"], taken)
    assert warnings == [f"embedding name 'mychar' is also defined by the bundle {other}; in a prompt, the bundle "
                        "whose <lora:...> tag is there owns the name (rename it to use both without tags)"]
    with pytest.raises(EmbeddingNameError, match="already used by the LoRA"):
        check_new_names(["mychar-v1"], taken)


def test_webui_runner_names_lora_folder_embeddings_folder_and_database(tmp_path: Path) -> None:
    loras, embs = tmp_path / "Lora", tmp_path / "embeddings"
    _bundle(loras / "otherbundle.safetensors", "theirchar")
    _bundle(loras / "newrun.safetensors", "mychar")
    embs.mkdir()
    (embs / "folderchar.safetensors").write_bytes(b"x")
    own = types.SimpleNamespace(filename=str(loras / "newrun.safetensors") + "/mychar")
    loaded = types.SimpleNamespace(filename="/x/dbchar.pt")
    lent = types.SimpleNamespace(filename="/y/Lora/lent.safetensors/lentchar")  # a webui loader's bundle embedding

    class BundledTIHash(str):  # as A1111 1.10.1's built-in Lora marks a bundle's embeddings
        def __init__(self, hash_str: str) -> None:
            self.hash = hash_str

    # ... which it registers with no filename (create_embedding_from_data ignores ``filename=``)
    builtin = types.SimpleNamespace(filename=None, shorthash=BundledTIHash("lentagain"))
    db = types.SimpleNamespace(word_embeddings={"mychar": own, "dbchar": loaded, "lentchar": lent,
                                                "builtinchar": builtin}, skipped_embeddings={})
    webui = types.SimpleNamespace(embedding_db=db, shared=types.SimpleNamespace(
        cmd_opts=types.SimpleNamespace(embeddings_dir=str(embs))))
    taken = runner.taken_names(webui, _config(tmp_path, "mychar"), str(loras))
    assert set(taken) == {"otherbundle", "theirchar", "folderchar", "dbchar", "lentchar", "builtinchar"}  # mychar: fine
    # other bundles' names are shared with a warning, not refused
    assert (taken["theirchar"], taken["lentchar"]) == (f"the bundle {loras / 'otherbundle.safetensors'}",
                                                       "the bundle /y/Lora/lent.safetensors")
    assert taken["dbchar"] == "/x/dbchar.pt"
    assert taken["builtinchar"] == "the bundle lentagain (loaded by the webui's Lora)"
    assert check_new_names(["builtinchar"], taken)  # a warning, not a refusal
