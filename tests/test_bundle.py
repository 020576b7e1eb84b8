"""Bundle format: canonical keys, metadata, validation on read, inspect / export / convert CLI."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pivotal.cli.main import main
from pivotal.errors import BundleError, EmbeddingNameError, SaveError
from pivotal.formats.bundle import BundleEmbedding, read_bundle, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.formats.export import export_embeddings, safe_output_path


def lora_tensors(prefixes: tuple[str, ...], rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for pre in prefixes:
        out[f"{pre}.lora_down.weight"] = torch.randn(rank, 16, generator=g)
        out[f"{pre}.lora_up.weight"] = torch.randn(8, rank, generator=g)
        out[f"{pre}.alpha"] = torch.tensor(alpha)
    return out


SD1_LORA = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_proj_in",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
SDXL_LORA = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_te1_text_model_encoder_layers_0_mlp_fc1",
             "lora_te2_text_model_encoder_layers_0_self_attn_v_proj")


def sd1_embs() -> list[BundleEmbedding]:
    return [BundleEmbedding("mychar", {"clip_l": torch.randn(2, 32)}, "a woman"),
            BundleEmbedding("my-style_2", {"clip_l": torch.randn(1, 32)}, "")]


def sdxl_embs() -> list[BundleEmbedding]:
    return [BundleEmbedding("mychar", {"clip_l": torch.randn(3, 32), "clip_g": torch.randn(3, 48)}, "cat")]


def write_sd1(path: Path) -> Path:
    info = TrainingInfo("mybundle", resolution=(512, 512), num_train_images=12,
                        tag_frequency={"10_mychar": {"mychar": 12, "smile": 3}}, settings={"steps": 100})
    write_bundle(path, "sd1", lora_tensors(SD1_LORA), sd1_embs(), info)
    return path


def write_sdxl(path: Path) -> Path:
    write_bundle(path, "sdxl", lora_tensors(SDXL_LORA), sdxl_embs(), TrainingInfo("xl", resolution=(1024, 1024)))
    return path


def test_sd1_bundle_has_only_canonical_keys_and_metadata(tmp_path: Path) -> None:
    p = write_sd1(tmp_path / "b.safetensors")
    with safe_open(str(p), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    emb_keys = {k for k in keys if k.startswith("bundle_emb.")}
    assert emb_keys == {"bundle_emb.mychar.string_to_param.*", "bundle_emb.my-style_2.string_to_param.*"}
    assert keys - emb_keys == {f"{m}.{s}" for m in SD1_LORA for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert meta["ss_output_name"] == "mybundle" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_num_train_images"] == "12"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_mychar": {"mychar": 12, "smile": 3}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["pivotal.embeddings"]) == [
        {"name": "mychar", "vectors": 2, "init_text": "a woman", "encoders": ["clip_l"]},
        {"name": "my-style_2", "vectors": 1, "init_text": "", "encoders": ["clip_l"]}]
    assert json.loads(meta["pivotal.training"]) == {"steps": 100}
    # sshs_model_hash is what the webui computes: sha256 of everything after the 8+N header bytes
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_sdxl_bundle_keys(tmp_path: Path) -> None:
    p = write_sdxl(tmp_path / "x.safetensors")
    sd = load_file(str(p))
    assert sd["bundle_emb.mychar.clip_l"].shape == (3, 32) and sd["bundle_emb.mychar.clip_g"].shape == (3, 48)
    assert not [k for k in sd if k.startswith("bundle_emb.") and k.split(".")[2] not in ("clip_l", "clip_g")]
    b = read_bundle(p)
    assert b.base_model == "sdxl" and b.metadata["ss_base_model_version"].startswith("sdxl_")
    assert b.embeddings["mychar"].num_vectors == 3 and not b.warnings and not b.unknown_keys


def test_round_trip_values(tmp_path: Path) -> None:
    embs = sd1_embs()
    lora = lora_tensors(SD1_LORA)
    write_bundle(tmp_path / "r.safetensors", "sd1", lora, embs, TrainingInfo("r"))
    b = read_bundle(tmp_path / "r.safetensors")
    assert set(b.embeddings) == {"mychar", "my-style_2"}
    assert torch.equal(b.embeddings["mychar"].vectors["clip_l"], embs[0].vectors["clip_l"])
    assert all(torch.equal(b.lora[k], lora[k]) for k in lora)


def test_write_refuses_bad_input_before_touching_disk(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    with pytest.raises(EmbeddingNameError, match="embedding name 'a.b' contains '.'"):
        write_bundle(p, "sd1", {}, [BundleEmbedding("a.b", {"clip_l": torch.zeros(1, 4)})], TrainingInfo("w"))
    with pytest.raises(BundleError, match=r"embedding 'e' has encoder vectors \['clip_l'\]; a sdxl bundle needs "
                                          r"exactly \['clip_l', 'clip_g'\]"):
        write_bundle(p, "sdxl", {}, [BundleEmbedding("e", {"clip_l": torch.zeros(1, 4)})], TrainingInfo("w"))
    with pytest.raises(SaveError, match="'lora_te1_x.alpha' does not belong in a sd1 LoRA"):
        write_bundle(p, "sd1", {"lora_te1_x.alpha": torch.tensor(1.0)}, [], TrainingInfo("w"))
    with pytest.raises(SaveError, match="'weird' is not a kohya LoRA key"):
        write_bundle(p, "sd1", {"weird": torch.zeros(1)}, [], TrainingInfo("w"))
    with pytest.raises(BundleError, match="80 vectors; an embedding needs 1 to 75"):
        write_bundle(p, "sd1", {}, [BundleEmbedding("e", {"clip_l": torch.zeros(80, 4)})], TrainingInfo("w"))
    bad = lora_tensors(SD1_LORA[:1])
    bad[f"{SD1_LORA[0]}.lora_down.weight"][0, 0] = float("nan")
    with pytest.raises(SaveError, match=rf"tensor {SD1_LORA[0]}.lora_down.weight holds NaN or infinite values"):
        write_bundle(p, "sd1", bad, [], TrainingInfo("w"))
    assert not p.exists()


def raw_bundle(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), meta)
    return path


def test_nan_in_file_refused_naming_tensor(tmp_path: Path) -> None:
    t = lora_tensors(SD1_LORA[:1])
    t[f"{SD1_LORA[0]}.lora_up.weight"][0, 0] = float("nan")
    p = raw_bundle(tmp_path / "nan.safetensors", t)
    with pytest.raises(BundleError, match=rf"nan.safetensors \[{SD1_LORA[0]}.lora_up.weight\]: 1 of 32 values are "
                                          "NaN or infinite"):
        read_bundle(p)
    e = {"bundle_emb.x.string_to_param.*": torch.tensor([[1.0, float("inf")]])}
    with pytest.raises(BundleError, match=r"\[bundle_emb.x.string_to_param.\*\]: 1 of 2 values"):
        read_bundle(raw_bundle(tmp_path / "inf.safetensors", e))


@pytest.mark.parametrize("name", ["../evil", "a/b", "<img src=x>", "CON", "x" * 65, "<embedding>"])
def test_bad_embedding_names_in_file_skipped_never_used(tmp_path: Path, name: str) -> None:
    # A name that could reach a path or a page unescaped is never used: alone, the file is refused
    # naming it; beside a LoRA, the LoRA loads and the embedding is skipped with a warning naming it.
    alone = raw_bundle(tmp_path / "n.safetensors", {f"bundle_emb.{name}.clip_l": torch.zeros(1, 4)})
    with pytest.raises(BundleError,
                       match=r"n.safetensors(: holds neither LoRA| \[bundle_emb\..*\]: embedding key must)"):
        read_bundle(alone)
    t = lora_tensors(SD1_LORA[:1])
    t[f"bundle_emb.{name}.clip_l"] = torch.zeros(1, 4)
    t["bundle_emb.good.clip_l"] = torch.zeros(1, 4)
    if name.startswith("../"):  # an empty name before the first dot: the key itself is malformed
        with pytest.raises(BundleError, match="embedding key must be bundle_emb"):
            read_bundle(raw_bundle(tmp_path / "w.safetensors", t))
        return
    b = read_bundle(raw_bundle(tmp_path / "w.safetensors", t))
    assert list(b.embeddings) == ["good"] and len(b.lora) == 3
    assert any(w.startswith(f"embedding {name!r} skipped: its name cannot be used in prompts") for w in b.warnings)
    if name == "<embedding>":
        assert any("OneTrainer's default placeholder" in w for w in b.warnings)


def test_other_writers_and_unknown_keys_reported(tmp_path: Path) -> None:
    t = lora_tensors(SD1_LORA[:1])
    t["bundle_emb.ot.clip_l"] = torch.randn(2, 32)          # OneTrainer SD1
    t["bundle_emb.ot.clip_l_out"] = torch.randn(2, 32)      # OneTrainer output embedding
    t["bundle_emb.ks.emb_params"] = torch.randn(1, 32)      # kohya name
    t["some_other.weight"] = torch.zeros(1)
    b = read_bundle(raw_bundle(tmp_path / "o.safetensors", t))
    assert b.base_model == "sd1" and set(b.embeddings) == {"ot", "ks"}
    assert b.unknown_keys == ["bundle_emb.ot.clip_l_out", "some_other.weight"]
    assert any("extra key 'clip_l_out' ignored" in w for w in b.warnings)
    assert "2 unknown key(s) ignored (first: bundle_emb.ot.clip_l_out, some_other.weight)" in b.warnings


def test_structural_errors(tmp_path: Path) -> None:
    t = lora_tensors(SD1_LORA[:1])
    del t[f"{SD1_LORA[0]}.lora_up.weight"]
    with pytest.raises(BundleError, match=rf"\[{SD1_LORA[0]}\]: LoRA module lacks lora_up.weight"):
        read_bundle(raw_bundle(tmp_path / "a.safetensors", t))
    t = lora_tensors(SD1_LORA[:1])
    t[f"{SD1_LORA[0]}.lora_up.weight"] = torch.zeros(8, 3)
    with pytest.raises(BundleError, match="rank mismatch: lora_down has 4 rows, lora_up 3 columns"):
        read_bundle(raw_bundle(tmp_path / "b.safetensors", t))
    x = {"bundle_emb.e.clip_l": torch.zeros(2, 4), "bundle_emb.e.clip_g": torch.zeros(3, 6)}
    with pytest.raises(BundleError, match=r"\[bundle_emb.e\]: clip_l and clip_g have different vector counts \[2, 3\]"):
        read_bundle(raw_bundle(tmp_path / "c.safetensors", x))
    with pytest.raises(BundleError, match=r"d.safetensors \[bundle_emb.e.clip_l\]: dtype I64 is not a float type"):
        read_bundle(raw_bundle(tmp_path / "d.safetensors",
                               {"bundle_emb.e.clip_l": torch.zeros(2, 4, dtype=torch.int64)}))
    with pytest.raises(BundleError, match=r"holds neither LoRA weights \(kohya, peft/diffusers\) nor usable"):
        read_bundle(raw_bundle(tmp_path / "e.safetensors", {"foo": torch.zeros(1)}))
    with pytest.raises(BundleError,
                       match=r"\[bundle_emb.e.string_to_param.\*\]: embedding 'e' has more than one clip_l"):
        read_bundle(raw_bundle(tmp_path / "f.safetensors", {"bundle_emb.e.clip_l": torch.zeros(1, 4),
                                                            "bundle_emb.e.string_to_param.*": torch.zeros(1, 4)}))


def test_base_model_conflict_and_stale_hash_warn(tmp_path: Path) -> None:
    t = lora_tensors(SDXL_LORA)
    b = read_bundle(raw_bundle(tmp_path / "m.safetensors", t, {"ss_base_model_version": "sd_v1",
                                                                "sshs_model_hash": "0" * 64}))
    assert b.base_model == "sdxl"
    assert any("metadata says sd1" in w and "look like sdxl" in w for w in b.warnings)
    assert any("sshs_model_hash in the metadata does not match" in w for w in b.warnings)


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_inspect_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_sdxl(tmp_path / "x.safetensors")
    assert main(["inspect", str(p), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["base_model"] == "sdxl"
    assert r["lora_modules"] == {"te1": 1, "te2": 1, "unet": 1}
    assert r["lora"]["unet"] == {"modules": 1, "algorithms": ["lora"], "ranks": [4], "alphas": [2.0],
                                 "format": "kohya"}
    assert r["embeddings"][0]["name"] == "mychar" and r["embeddings"][0]["vectors"] == 3
    assert set(r["embeddings"][0]["norms"]) == {"clip_l", "clip_g"} and len(r["embeddings"][0]["norms"]["clip_g"]) == 3
    assert r["embeddings"][0]["init_text"] == "cat"
    assert r["warnings"] == [] and r["hash"]["stored"] == r["hash"]["computed"]
    assert main(["inspect", str(p)]) == 0
    text = capsys.readouterr().out
    assert "base model: sdxl" in text and "<lora:x:1>" in text and "mychar" in text and "te2" in text
    assert "   lora   rank 4   alpha 2   (kohya)" in text


def test_cli_inspect_invalid_file_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "broken.safetensors"
    p.write_bytes(b"\xff" * 20)
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pivotal: error: ") and "broken.safetensors" in err
    assert "Traceback" not in err
    pt = tmp_path / "old.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    assert main(["inspect", str(pt)]) == 2
    assert "pivotal convert" in capsys.readouterr().err


def test_cli_inspect_hostile_metadata_truncated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = raw_bundle(tmp_path / "h.safetensors", lora_tensors(SD1_LORA[:1]),
                   {"ss_output_name": "<script>" + "x" * 5000, "ss_tag_frequency": "{" * 10})
    assert main(["inspect", str(p), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["metadata"]["ss_output_name"].endswith("… (5008 chars)") and len(r["metadata"]["ss_output_name"]) < 300


def test_export_embeddings_sd1_sdxl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    b1 = write_sd1(tmp_path / "b1.safetensors")
    assert main(["export-embeddings", str(b1), str(out)]) == 0
    assert sorted(Path(x).name for x in capsys.readouterr().out.split()) == ["my-style_2.safetensors",
                                                                            "mychar.safetensors"]
    sd = load_file(str(out / "mychar.safetensors"))
    assert list(sd) == ["emb_params"] and sd["emb_params"].shape == (2, 32)
    # a second export refuses to overwrite unless forced
    assert main(["export-embeddings", str(b1), str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert len(export_embeddings(b1, out, force=True)) == 2
    xl_out = tmp_path / "xl"
    xl_out.mkdir()
    export_embeddings(write_sdxl(tmp_path / "x.safetensors"), xl_out)
    sd = load_file(str(xl_out / "mychar.safetensors"))
    assert set(sd) == {"clip_l", "clip_g"} and sd["clip_g"].shape == (3, 48)


def test_export_refuses_paths_outside_folder(tmp_path: Path) -> None:
    with pytest.raises(SaveError, match="refusing to write '../x.safetensors': it would land outside"):
        safe_output_path(tmp_path, "../x.safetensors")
    with pytest.raises(SaveError, match="output folder .*missing does not exist"):
        export_embeddings(write_sd1(tmp_path / "b.safetensors"), tmp_path / "missing")


def test_convert_pickle_embedding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "old.pt"
    vec = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "old", "step": 5}, src)
    assert main(["convert", str(src), str(tmp_path / "old.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "old.safetensors"))["emb_params"], vec)
    # a pickle that would run code is refused by the weights-only unpickler
    evil = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, evil)
    assert main(["convert", str(evil), str(tmp_path / "e.safetensors")]) == 2
    assert "cannot be loaded as plain weights" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists()
