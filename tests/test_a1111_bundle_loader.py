"""Glue tests of the generation-time bundle-embedding loader with fakes of the webui's database,
processing object and Lora extension (the real webui is exercised in tests/integration)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.webui import bundle_loader
from pivotal.webui.bundle_loader import (
    INFOTEXT_KEY,
    BundleRegistrar,
    builtin_registers_bundles,
    parse_bundle_embeddings,
)
from test_a1111_host import FakeDb, FakeEmbedding

LORA = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_x.alpha": torch.tensor(2.0)}


def _write(path: Path, base: str, names: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = {"clip_l": 32, "clip_g": 64} if base == "sdxl" else {"clip_l": 32}
    embs = [BundleEmbedding(n, {k: torch.randn(2, d) for k, d in dims.items()}) for n in names]
    write_bundle(path, base, LORA, embs, TrainingInfo(path.stem))
    return path


def _create(data: dict, name: str, filename: str = "") -> FakeEmbedding:
    vec: Any = next(iter(data["string_to_param"].values())) if "string_to_param" in data else data
    emb = FakeEmbedding(vec, name)
    emb.shape = vec.shape[-1] if isinstance(vec, torch.Tensor) else sum(v.shape[-1] for v in vec.values())
    emb.filename = filename
    return emb


class Cond:
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[sum(map(ord, t)) % 1000 + 1] for t in texts]


def _webui(networks: Any = None) -> Any:
    cache = type("P", (), {"cached_c": ["key", "value"], "cached_uc": ["key", "value"]})
    return types.SimpleNamespace(embedding_db=FakeDb(), networks=networks,
                                 textual_inversion=types.SimpleNamespace(create_embedding_from_data=_create),
                                 processing=types.SimpleNamespace(StableDiffusionProcessing=cache))


def _p(prompt: str, loras: list[str] = ()) -> Any:
    data = {"lora": [types.SimpleNamespace(items=[n, "1"]) for n in loras]} if loras else {}
    return types.SimpleNamespace(all_prompts=[prompt], all_negative_prompts=[""], extra_generation_params={},
                                 sd_model=types.SimpleNamespace(cond_stage_model=Cond()), extra_network_data=data)


def test_bundle_embeddings_are_grouped_as_the_webui_reads_them(tmp_path: Path) -> None:
    sd1 = parse_bundle_embeddings(str(_write(tmp_path / "a.safetensors", "sd1", ["one", "two"])))
    assert [(e.name, e.bundle) for e in sd1] == [("one", "a"), ("two", "a")]
    assert list(sd1[0].data) == ["string_to_param"] and sd1[0].data["string_to_param"]["*"].shape == (2, 32)
    xl = parse_bundle_embeddings(str(_write(tmp_path / "b.safetensors", "sdxl", ["three"])))
    assert sorted(xl[0].data) == ["clip_g", "clip_l"]


def test_option_lends_mentioned_names_and_takes_them_back(tmp_path: Path) -> None:
    _write(tmp_path / "mine.safetensors", "sd1", ["pvtchar", "other"])
    webui, reg = _webui(), BundleRegistrar()
    p = _p("a photo of pvtchar")
    assert reg.register(webui, p, str(tmp_path), always=True) == ["pvtchar"]
    assert p.extra_generation_params[INFOTEXT_KEY] == "pvtchar: mine"
    assert webui.embedding_db.word_embeddings["pvtchar"].shorthash == "mine"
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]  # new set: stale conds dropped
    reg.register(webui, p, str(tmp_path), always=True)  # a second batch of the same generation
    reg.unregister(webui, p)
    assert webui.embedding_db.word_embeddings == {} and webui.embedding_db.ids_lookup == {}
    assert reg.register(webui, _p("no names here"), str(tmp_path), always=True) == []


def test_a_folder_embedding_wins_and_is_named_once(tmp_path: Path, capsys: Any) -> None:
    _write(tmp_path / "mine.safetensors", "sd1", ["pvtchar"])
    webui, reg = _webui(), BundleRegistrar()
    folder = FakeEmbedding(torch.ones(1, 32), "pvtchar")
    folder.filename = "embeddings/pvtchar.pt"
    webui.embedding_db.register_embedding_by_name(folder, _p("").sd_model, "pvtchar")
    for _ in range(2):
        p = _p("pvtchar")
        assert reg.register(webui, p, str(tmp_path), always=True) == []
        reg.unregister(webui, p)
    assert webui.embedding_db.word_embeddings["pvtchar"] is folder
    out = capsys.readouterr().out
    assert out.count("embeddings/pvtchar.pt") == 1 and "mine.safetensors" in out


def test_without_builtin_support_the_tagged_bundles_register(tmp_path: Path) -> None:
    _write(tmp_path / "tagged.safetensors", "sd1", ["pvtchar"])

    def load_network(name: str, on_disk: Any) -> None:
        """A loader that knows nothing of bundled embeddings."""

    networks = types.SimpleNamespace(load_network=load_network)
    assert not builtin_registers_bundles(networks)
    reg, webui = BundleRegistrar(), _webui(networks)
    assert reg.register(webui, _p("pvtchar", loras=["tagged"]), str(tmp_path), always=False) == ["pvtchar"]
    assert reg.register(_webui(networks), _p("pvtchar"), str(tmp_path), always=False) == []
    assert builtin_registers_bundles(bundle_loader) is False  # a module without load_network


def test_a_broken_file_is_reported_not_fatal(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01")
    _write(tmp_path / "ok.safetensors", "sd1", ["pvtchar"])
    assert BundleRegistrar().register(_webui(), _p("pvtchar"), str(tmp_path), always=True) == ["pvtchar"]
    assert "broken.safetensors" in capsys.readouterr().out


def _plain_loader() -> Any:
    def load_network(name: str, on_disk: Any) -> None:
        """A loader that knows nothing of bundled embeddings (Forge, reForge)."""

    return types.SimpleNamespace(load_network=load_network)


def test_the_bundle_named_in_the_prompt_owns_its_names(tmp_path: Path, capsys: Any) -> None:
    """Two bundles define 'pvtchar': the tagged one is used, whichever sorts first."""
    _write(tmp_path / "aaa.safetensors", "sd1", ["pvtchar"])
    _write(tmp_path / "zzz.safetensors", "sd1", ["pvtchar"])
    webui, reg = _webui(_plain_loader()), BundleRegistrar()
    p = _p("pvtchar", loras=["zzz"])
    assert reg.register(webui, p, str(tmp_path), always=False) == ["pvtchar"]
    assert p.extra_generation_params[INFOTEXT_KEY] == "pvtchar: zzz"
    assert webui.embedding_db.word_embeddings["pvtchar"].filename.startswith(str(tmp_path / "zzz.safetensors"))
    reg.unregister(webui, p)
    assert "Pivotal:" not in capsys.readouterr().out  # no clash within the prompt: nothing to say


def test_two_tagged_bundles_with_one_name_first_tag_wins_with_a_message(tmp_path: Path, capsys: Any) -> None:
    _write(tmp_path / "aaa.safetensors", "sd1", ["pvtchar"])
    _write(tmp_path / "zzz.safetensors", "sd1", ["pvtchar", "other"])
    for order, owner in ((["zzz", "aaa"], "zzz"), (["aaa", "zzz"], "aaa")):
        webui, reg = _webui(_plain_loader()), BundleRegistrar()
        p = _p("pvtchar other", loras=order)
        assert reg.register(webui, p, str(tmp_path), always=False) == ["other", "pvtchar"]
        assert p.extra_generation_params[INFOTEXT_KEY] == f"other: zzz, pvtchar: {owner}"
        loser = "aaa" if owner == "zzz" else "zzz"
        out = capsys.readouterr().out
        assert f"'pvtchar' is in bundles {owner} and {loser} of this prompt; {owner}'s is used" in out, out


def test_the_option_picks_the_first_file_for_an_untagged_name_and_says_so(tmp_path: Path, capsys: Any) -> None:
    _write(tmp_path / "aaa.safetensors", "sd1", ["pvtchar"])
    _write(tmp_path / "zzz.safetensors", "sd1", ["pvtchar"])
    webui, reg = _webui(), BundleRegistrar()
    p = _p("pvtchar")
    assert reg.register(webui, p, str(tmp_path), always=True) == ["pvtchar"]
    assert p.extra_generation_params[INFOTEXT_KEY] == "pvtchar: aaa"
    assert "add the wanted bundle's <lora:…> tag to choose" in capsys.readouterr().out


def test_what_a_failed_generation_left_registered_is_taken_back(tmp_path: Path) -> None:
    """Forge never reloads its databases per generation: a generation that failed between register
    and postprocess must not leave its embeddings behind."""
    _write(tmp_path / "tagged.safetensors", "sd1", ["pvtchar"])
    webui, reg = _webui(_plain_loader()), BundleRegistrar()
    assert reg.register(webui, _p("pvtchar", loras=["tagged"]), str(tmp_path), always=False) == ["pvtchar"]
    # ... that generation failed: no postprocess. The next one has no tag:
    p = _p("pvtchar")
    assert reg.register(webui, p, str(tmp_path), always=False) == []
    assert "pvtchar" not in webui.embedding_db.word_embeddings


def test_forge_engine_databases_register_in_every_engine() -> None:
    from pivotal.hosts.forge.webui import EngineDatabases

    class ForgeDb:
        """Forge's per-engine database: register_embedding_by_name(embedding, name), no model."""

        def __init__(self) -> None:
            self.word_embeddings: dict = {}
            self.skipped_embeddings: dict = {}
            self.ids_lookup: dict = {}
            self.expected_shape = 2048

        def register_embedding_by_name(self, embedding: Any, name: str) -> None:
            if embedding is None:
                self.word_embeddings.pop(name, None)
            else:
                self.word_embeddings[name] = embedding

    dbs = [ForgeDb(), ForgeDb()]
    both = EngineDatabases(dbs)
    emb = FakeEmbedding({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "x")
    both.register_embedding_by_name(emb, None, "x")
    assert all(db.word_embeddings["x"] is emb for db in dbs) and both.word_embeddings["x"] is emb
    assert both.expected_shape == 2048
    both.register_embedding_by_name(None, None, "x")
    assert all(db.word_embeddings == {} for db in dbs)


def test_provenance_names_only_what_the_prompt_uses(tmp_path: Path) -> None:
    _write(tmp_path / "many.safetensors", "sd1", [f"pvtmany{i}" for i in range(13)])
    webui, reg = _webui(_plain_loader()), BundleRegistrar()
    p = _p("a photo of pvtmany7", loras=["many"])
    assert len(reg.register(webui, p, str(tmp_path), always=False)) == 13  # all usable while tagged
    assert p.extra_generation_params[INFOTEXT_KEY] == "pvtmany7: many"
