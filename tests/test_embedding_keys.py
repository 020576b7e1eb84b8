"""The one ``bundle_emb.<name>.<rest>`` grammar every embedding reader shares."""

from __future__ import annotations

from pivotal.formats.embedding_keys import embedding_names, split_embedding_key, webui_embedding_data


def test_split_and_encoder() -> None:
    k = split_embedding_key("bundle_emb.mychar.string_to_param.*")
    assert (k.name, k.rest, k.encoder) == ("mychar", "string_to_param.*", "clip_l")
    assert split_embedding_key("bundle_emb.x.clip_g").encoder == "clip_g"
    assert split_embedding_key("bundle_emb.x.emb_params").encoder == "clip_l"
    assert split_embedding_key("bundle_emb.x.weird").encoder is None
    # a name with dots cannot exist: the first dot ends it (as in the webui's loader)
    assert split_embedding_key("bundle_emb.a.b.c").name == "a"
    for bad in ("bundle_emb.", "bundle_emb.x", "bundle_emb.x.", "bundle_emb..clip_l", "lora_unet_x.alpha",
                "bundle_embx.y.z"):
        assert split_embedding_key(bad) is None, bad


def test_names_and_webui_grouping() -> None:
    keys = ["lora_unet_a.alpha", "bundle_emb.b.clip_l", "bundle_emb.a.clip_l", "bundle_emb.b.clip_g",
            "bundle_emb.x", "bundle_emb..y"]
    assert embedding_names(keys) == ["b", "a"]
    grouped = webui_embedding_data([("bundle_emb.s.string_to_param.*", 1), ("bundle_emb.x.clip_l", 2),
                                    ("bundle_emb.x.clip_g", 3), ("bundle_emb.bad", 4)])
    assert grouped == {"s": {"string_to_param": {"*": 1}}, "x": {"clip_l": 2, "clip_g": 3}}
