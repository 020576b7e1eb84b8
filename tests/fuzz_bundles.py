"""Hypothesis strategies that know the safetensors / bundle format: mutated real bundles.

Byte-level fuzzing (2 M inputs) found none of the reader's crashes: a random byte almost always
breaks the JSON or the size field, which the reader refuses first. These strategies instead take a
real bundle apart (size field, header JSON, tensor entries, metadata, data section) and change one
to three parts the way a broken writer, a truncated download or an attacker would, then put the
file back together, so the mutation reaches the checks behind the first ones.
"""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors.torch import save

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".dora_scale",
            ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".lokr_w1", ".lokr_w2",
            ".lokr_w1_a", ".lokr_w2_b", ".lora_A.weight", ".lora_B.weight", ".weight", ".diff", ".on_input")
PREFIXES = ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_1_1_proj_in",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
            "lora_te2_text_model_encoder_layers_1_self_attn_out_proj", "unet.down_blocks.0.attentions.0.proj_in",
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "lycoris_x", "")
EMB_RESTS = ("string_to_param.*", "clip_l", "clip_g", "emb_params", "x", "string_to_param.", "")
DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64", "f32", "")


def _tensor_sd1() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    c = "lora_unet_down_blocks_0_resnets_0_conv1"
    t = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    return {f"{m}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{m}.lora_up.weight": torch.randn(8, 2, generator=g),
            f"{m}.alpha": torch.tensor(2.0), f"{c}.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
            f"{c}.lora_up.weight": torch.randn(4, 2, 1, 1, generator=g), f"{c}.alpha": torch.tensor(1.0),
            f"{t}.lora_down.weight": torch.randn(1, 16, generator=g).half(),
            f"{t}.lora_up.weight": torch.randn(16, 1, generator=g).half(),
            "bundle_emb.pvtchar.string_to_param.*": torch.randn(2, 16, generator=g)}


def _tensor_sdxl() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    t = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    return {f"{m}.lora_down.weight": torch.randn(2, 24, generator=g).bfloat16(),
            f"{m}.lora_up.weight": torch.randn(8, 2, generator=g).bfloat16(), f"{m}.alpha": torch.tensor(2.0),
            f"{t}.lora_down.weight": torch.randn(2, 32, generator=g),
            f"{t}.lora_up.weight": torch.randn(64, 2, generator=g),
            "bundle_emb.xlchar.clip_l": torch.randn(1, 16, generator=g),
            "bundle_emb.xlchar.clip_g": torch.randn(1, 32, generator=g)}


def _meta(base: str) -> dict[str, str]:
    return {"ss_base_model_version": "sd_v1" if base == "sd1" else "sdxl_base_v1-0", "ss_network_dim": "2",
            "pivotal.format": "1", "ss_tag_frequency": '{"x": {"a": 1}}',
            "pivotal.embeddings": json.dumps([{"name": "pvtchar", "vectors": 2, "init_text": "person"}])}


@lru_cache(maxsize=None)
def seeds() -> tuple[bytes, ...]:
    """Real files: an SD1 bundle (conv, TE fp16, embedding), an SDXL bundle (bf16, clip_l + clip_g),
    a plain LoRA without metadata, embeddings alone."""
    sd1, sdxl = _tensor_sd1(), _tensor_sdxl()
    plain = {k: v for k, v in sd1.items() if not k.startswith("bundle_emb.")}
    emb = {k: v for k, v in sdxl.items() if k.startswith("bundle_emb.")}
    return (save(sd1, _meta("sd1")), save(sdxl, _meta("sdxl")), save(plain), save(emb, {"modelspec.title": "e"}))


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict[str, Any] | str | bytes, data: bytes, size: int | None = None) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(header) if size is None else size % 2**64) + header + data


# -- values a broken writer or an attacker puts where the format wants something else ------------
def deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=6)
dims = st.one_of(st.integers(0, 9), st.integers(-3, 2**64 + 3), st.sampled_from([True, 1.0, "2", None]))
shapes = st.one_of(st.lists(dims, max_size=4), st.lists(st.just(1), min_size=60, max_size=70), json_junk)
names = st.one_of(st.builds(lambda p, s: p + s, st.sampled_from(PREFIXES), st.sampled_from(SUFFIXES)),
                  st.builds(lambda n, r: f"bundle_emb.{n}.{r}", st.text(max_size=6), st.sampled_from(EMB_RESTS)),
                  st.text(max_size=12))


@st.composite
def mutated_bundle(draw: st.DrawFn) -> bytes:
    """A seed bundle with one to three structure-aware mutations."""
    header, data = split(draw(st.sampled_from(seeds())))  # a fresh dict each time: mutations edit it
    size: int | None = None
    text: str | None = None
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(MUTATIONS))
        header, data, size, text = op(draw, header, data, size, text)
    return join(text if text is not None else header, data, size)


def _tensor_names(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _pick_entry(draw: st.DrawFn, header: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    keys = [k for k in _tensor_names(header) if isinstance(header[k], dict)]
    if not keys:
        return None
    k = draw(st.sampled_from(keys))
    return k, header[k]


def m_size(draw, header, data, size, text):  # the 8-byte header length
    n = len(json.dumps(header).encode()) if text is None else len(text.encode("utf-8", "surrogatepass"))
    size = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(-16, 16).map(lambda d: max(0, n + d))))
    return header, data, size, text


def m_dtype(draw, header, data, size, text):
    e = _pick_entry(draw, header)
    if e:
        e[1]["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), json_junk))
    return header, data, size, text


def m_shape(draw, header, data, size, text):
    e = _pick_entry(draw, header)
    if e:
        e[1]["shape"] = draw(shapes)
    return header, data, size, text


def m_offsets(draw, header, data, size, text):
    e = _pick_entry(draw, header)
    if e:
        offs = e[1].get("data_offsets")
        a, b = offs if isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) else (0, 0)
        e[1]["data_offsets"] = draw(st.one_of(
            st.tuples(st.integers(-2, len(data) + 8), st.integers(-2, len(data) + 8)).map(list),
            st.just([b, a]), st.just([a, b + 1]), st.just([a + 1, b]), json_junk))
    return header, data, size, text


def m_entry(draw, header, data, size, text):  # entries removed, added, renamed, made junk
    names_now = _tensor_names(header)
    kind = draw(st.sampled_from(["drop", "rename", "junk", "extra_key", "add"]))
    if kind == "add" or not names_now:
        n = draw(names)
        k = len(data)
        header[n] = {"dtype": "F32", "shape": draw(st.lists(st.integers(0, 4), max_size=4)), "data_offsets": [k, k]}
        numel = 1
        for d in header[n]["shape"]:
            numel *= d
        header[n]["data_offsets"][1] += 4 * numel
        data += draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x3f", b"\x00\x00\x80\x7f"])) * numel
        return header, data, size, text
    k = draw(st.sampled_from(names_now))
    if kind == "drop":
        del header[k]
    elif kind == "rename":
        header[draw(names)] = header.pop(k)
    elif kind == "junk":
        header[k] = draw(json_junk)
    elif isinstance(header[k], dict):
        header[k][draw(st.text(max_size=5))] = draw(json_junk)
    return header, data, size, text


def m_metadata(draw, header, data, size, text):
    meta = header.get("__metadata__")
    kind = draw(st.sampled_from(["junk", "value", "embeddings", "version", "drop"]))
    if kind == "junk":
        header["__metadata__"] = draw(json_junk)
    elif kind == "drop":
        header.pop("__metadata__", None)
    else:
        meta = dict(meta) if isinstance(meta, dict) else {}
        if kind == "value":
            meta[draw(st.text(max_size=6))] = draw(st.one_of(st.text(max_size=8), json_junk))
        elif kind == "version":
            meta["ss_base_model_version"] = draw(st.sampled_from(["sd_v1", "sdxl_base_v1-0", "sd_v2", "", "x"]))
            meta["ss_v2"] = draw(st.sampled_from(["True", "False"]))
        else:
            meta["pivotal.embeddings"] = draw(st.one_of(
                st.builds(json.dumps, json_junk), st.builds(deep, st.integers(1, 6000)),
                st.just('[{"name": "pvtchar", "vectors": ' + "9" * 4400 + "}]"),
                st.just('[{"name": ' + deep(3000, '"x"') + ', "init_text": 1}]'), st.text(max_size=10)))
        header["__metadata__"] = meta
    return header, data, size, text


def m_json_text(draw, header, data, size, text):  # what json.dumps would never write
    body = text if text is not None else json.dumps(header)
    kind = draw(st.sampled_from(["deep", "bigint", "truncate", "dup", "surrogate", "char", "bigfloat"]))
    if kind == "deep":
        body = body[:-1] + ', "z": ' + deep(draw(st.integers(50, 20000))) + "}"
    elif kind == "bigint":
        body = body.replace('"data_offsets": [0,', '"data_offsets": [' + "0" * draw(st.integers(30, 5000)) + ",", 1)
        body = body.replace('"shape": [', '"shape": [' + "1" * draw(st.integers(20, 4400)) + ", ", 1)
    elif kind == "bigfloat":
        body = body.replace('"shape": [', '"shape": [1.' + "5" * draw(st.integers(20, 400)) + "e999, ", 1)
    elif kind == "truncate":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    elif kind == "dup":
        first = next(iter(_tensor_names(header)), "w")
        body = body[:-1] + f', "{first}": {{"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}}}'
    elif kind == "surrogate":
        body = body.replace('"lora', '"\\ud800lora', 1).replace('"bundle_emb', '"\\udfffbundle_emb', 1)
    else:
        i = draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:i] + draw(st.sampled_from(["\x00", "\n", "\x1b[2J", "\\", '"', "{", "]", "NaN", "é"])) + body[i:]
    return header, data, size, body


def m_data(draw, header, data, size, text):  # truncation, trailing bytes, NaN/inf values
    kind = draw(st.sampled_from(["cut", "append", "flip", "nan"]))
    if kind == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    elif data:
        i = draw(st.integers(0, len(data) - 1))
        patch = bytes([draw(st.integers(0, 255))]) if kind == "flip" else b"\x00\x00\xc0\x7f"
        data = (data[:i] + patch + data[i + len(patch):])[:len(data)]
    return header, data, size, text


MUTATIONS = (m_size, m_dtype, m_shape, m_offsets, m_entry, m_metadata, m_json_text, m_data)
