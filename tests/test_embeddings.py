"""Embedding names, the EmbeddingSet, prompt placeholders and injection into real tiny encoders."""

from __future__ import annotations

import pytest
import torch

from pivotal.adapters.te_names import token_embedding_of
from pivotal.errors import EmbeddingNameError, ModelLayoutError
from pivotal.text.embeddings import EmbeddingSet
from pivotal.text.inject import PromptTokenizer, encode_plain, injected_embeddings, splice_vectors
from pivotal.text.names import validate_embedding_name
from tiny_text import bpe_path, clip_tokenizer, encode_hf, encode_openclip, hf_text_model, openclip_text_tower

needs_bpe = pytest.mark.skipif(bpe_path() is None, reason="open_clip_torch (its BPE file) is not installed")
BOS, EOS = 49406, 49407

# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["mycat", "my_cat-2", "A", "x" * 64, "CONSOLE", "com10", "LPT0"])
def test_valid_names(name: str) -> None:
    assert validate_embedding_name(name) == name


@pytest.mark.parametrize(
    "name,message",
    [
        ("a.b", r"^embedding name 'a\.b' contains '\.'; only A-Z a-z 0-9 _ - are allowed$"),
        ("../x", r"^embedding name '\.\./x' contains '\./'; only A-Z a-z 0-9 _ - are allowed$"),
        ("CON", r"^embedding name 'CON' is a reserved Windows device name; pick another name$"),
        ("lpt9", r"^embedding name 'lpt9' is a reserved Windows device name; pick another name$"),
        ("", r"^embedding name '' is empty; use 1-64 characters from A-Z a-z 0-9 _ -$"),
        ("x" * 65, r"^embedding name 'x{65}' is 65 characters long; the limit is 64$"),
        ("a b", r"^embedding name 'a b' contains ' '; only A-Z a-z 0-9 _ - are allowed$"),
        ("<x>", r"^embedding name '<x>' contains '<>'; only A-Z a-z 0-9 _ - are allowed$"),
        ("a\\b", r"^embedding name 'a\\\\b' contains '\\\\'; only A-Z a-z 0-9 _ - are allowed$"),
        ("C:x", r"^embedding name 'C:x' contains ':'; only A-Z a-z 0-9 _ - are allowed$"),
        ("a\x00b", r"^embedding name 'a\\x00b' contains '\\x00'; only A-Z a-z 0-9 _ - are allowed$"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(EmbeddingNameError, match=message):
        validate_embedding_name(name)


# ---------------------------------------------------------------- EmbeddingSet


def _vocab(n: int = 50, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_init_from_ids_spreads_like_a1111() -> None:
    vocab_l, vocab_g = _vocab(dim=8), _vocab(dim=12, seed=1)
    s = EmbeddingSet()
    s.add_new("mycat", 5, {"clip_l": vocab_l, "clip_g": vocab_g}, {"clip_l": [3, 7], "clip_g": [1, 2, 4, 6, 8, 9, 10]})
    t = s.tensors()["mycat"]
    # vec[i] = vocab[ids[i * T // N]]
    assert torch.equal(t["clip_l"], vocab_l[[3, 3, 3, 7, 7]])
    assert torch.equal(t["clip_g"], vocab_g[[1, 2, 4, 8, 9]])
    assert s.num_vectors("mycat") == 5 and s.dim("clip_g") == 12 and s.encoder_keys() == ("clip_l", "clip_g")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in s.parameters())


def test_random_init_uses_vocabulary_std() -> None:
    vocab = _vocab(n=4000, dim=64) * 3.0
    s = EmbeddingSet()
    s.add_new("rnd", 200, {"clip_l": vocab}, None, generator=torch.Generator().manual_seed(1))
    v = s.tensors()["rnd"]["clip_l"]
    assert v.shape == (200, 64)
    assert abs(v.std().item() - vocab.std().item()) < 0.05 * vocab.std().item()


def test_duplicates_and_shapes_refused() -> None:
    s = EmbeddingSet()
    s.add("mycat", {"clip_l": torch.zeros(2, 8)})
    with pytest.raises(EmbeddingNameError, match=r"^embedding name 'mycat' clashes with 'mycat' already in the set"):
        s.add("mycat", {"clip_l": torch.zeros(2, 8)})
    with pytest.raises(EmbeddingNameError, match=r"^embedding name 'MyCat' clashes with 'mycat'"):
        s.add("MyCat", {"clip_l": torch.zeros(2, 8)})
    with pytest.raises(EmbeddingNameError, match=r"^embedding name 'a\.b' contains"):
        s.add("a.b", {"clip_l": torch.zeros(2, 8)})
    with pytest.raises(ModelLayoutError, match=r"^embedding 'dog' \[clip_l\]: width 4 != 8 of the set$"):
        s.add("dog", {"clip_l": torch.zeros(2, 4)})
    with pytest.raises(ModelLayoutError,
                       match=r"^embedding 'dog': covers encoders \['clip_g', 'clip_l'\], the set uses \['clip_l'\]$"):
        s.add("dog", {"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(2, 4)})
    with pytest.raises(ModelLayoutError,
                       match=r"^embedding 'x': vector counts differ between encoders \(clip_l=2, clip_g=3\)$"):
        EmbeddingSet().add("x", {"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 4)})
    with pytest.raises(ModelLayoutError, match=r"^embedding 'x' \[clip_l\]: expected a \(N, dim\) tensor, got \(8,\)$"):
        EmbeddingSet().add("x", {"clip_l": torch.zeros(8)})
    assert s.names() == ["mycat"]


def test_tensors_round_trip() -> None:
    s = EmbeddingSet()
    s.add("a", {"clip_l": torch.randn(2, 8), "clip_g": torch.randn(2, 12)})
    s.add("b", {"clip_l": torch.randn(1, 8, dtype=torch.float16), "clip_g": torch.randn(1, 12)})
    t = s.tensors()
    back = EmbeddingSet.from_tensors(t)
    assert back.names() == ["a", "b"]
    for name in t:
        for key in t[name]:
            assert torch.equal(back.tensors()[name][key], t[name][key])
    t["a"]["clip_l"].add_(1.0)  # copies: editing them leaves the set alone
    assert not torch.equal(s.tensors()["a"]["clip_l"], t["a"]["clip_l"])
    assert [n for n, _ in s.named_parameters()] == ["a.clip_l", "a.clip_g", "b.clip_l", "b.clip_g"]


# ---------------------------------------------------------------- prompt ids


@needs_bpe
def test_prompt_ids_with_placeholders() -> None:
    tok = clip_tokenizer()
    pt = PromptTokenizer(tok, {"mycat": 3}, pad_id=EOS)
    out = pt.build_prompt_ids("a photo of mycat")
    assert out.ids.shape == (77,) and out.ids.dtype == torch.long
    assert out.ids[:9].tolist() == [BOS, 320, 1125, 539, 0, 0, 0, EOS, EOS]
    assert out.fixes == [(4, "mycat")] and out.truncated is False
    assert pt.warnings == []
    og = PromptTokenizer(tok, {"mycat": 3}, pad_id=0).build_prompt_ids("a photo of mycat")
    assert og.ids[:9].tolist() == [BOS, 320, 1125, 539, 0, 0, 0, EOS, 0] and og.ids[8:].eq(0).all()

    # a second call is answered from memory, with copies: changing one result changes no other
    again = pt.build_prompt_ids("a photo of mycat")
    again.ids[0] = -1
    again.fixes.clear()
    third = pt.build_prompt_ids("a photo of mycat")
    assert torch.equal(third.ids, out.ids) and third.fixes == [(4, "mycat")]


@needs_bpe
def test_multi_vector_embedding_used_twice_expands_both_times() -> None:
    # diffusers #3588: the second use of a multi-vector token was left with one vector.
    pt = PromptTokenizer(clip_tokenizer(), {"mycat": 3}, pad_id=EOS)
    out = pt.build_prompt_ids("mycat and mycat, mycat")
    assert out.fixes == [(1, "mycat"), (5, "mycat"), (9, "mycat")]
    assert out.ids[:14].tolist() == [BOS, 0, 0, 0, 537, 0, 0, 0, 267, 0, 0, 0, EOS, EOS]


@needs_bpe
def test_multi_token_names_longest_first_and_single_token_warning() -> None:
    tok = clip_tokenizer()
    assert len(encode_plain(tok, "my_cat")) == 3 and len(encode_plain(tok, "my_cat_2")) == 5
    pt = PromptTokenizer(tok, {"my_cat": 1, "my_cat_2": 2, "cat": 1}, pad_id=EOS)
    out = pt.build_prompt_ids("my_cat_2 with my_cat and a cat")
    assert out.fixes == [(1, "my_cat_2"), (4, "my_cat"), (7, "cat")]
    assert pt.warnings == [
        "embedding name 'cat' is the single vocabulary token 'cat</w>' (id 2368); "
        "every 'cat' in a prompt will mean the embedding, not the word"
    ]


@needs_bpe
def test_truncation_and_straddling_embedding() -> None:
    pt = PromptTokenizer(clip_tokenizer(), {"mycat": 4}, pad_id=EOS)
    long = pt.build_prompt_ids(" ".join(["dog"] * 80))
    assert long.truncated and long.ids.shape == (77,) and long.ids[-1].item() == EOS
    fits = pt.build_prompt_ids(" ".join(["dog"] * 71) + " mycat")  # 71 + 4 = 75: exactly full
    assert not fits.truncated and fits.fixes == [(72, "mycat")] and fits.ids[76].item() == EOS
    straddle = pt.build_prompt_ids(" ".join(["dog"] * 73) + " mycat dog")
    assert straddle.truncated and straddle.fixes == []
    assert straddle.ids[74].item() == EOS and straddle.ids[1:74].eq(1929).all()


@needs_bpe
def test_prompt_tokenizer_refusals() -> None:
    tok = clip_tokenizer()
    with pytest.raises(EmbeddingNameError, match=r"^embedding names 'MyCat' and 'mycat' tokenize to the same tokens"):
        PromptTokenizer(tok, {"MyCat": 1, "mycat": 1}, pad_id=EOS)
    with pytest.raises(ValueError, match=r"^placeholder id 49407 must differ from BOS 49406 and EOS 49407$"):
        PromptTokenizer(tok, {"mycat": 1}, pad_id=EOS, placeholder_id=EOS)
    with pytest.raises(EmbeddingNameError, match=r"^embedding name '<x>' contains"):
        PromptTokenizer(tok, {"<x>": 1}, pad_id=EOS)


# ---------------------------------------------------------------- injection


def _encoders() -> list[tuple[str, object, object, int]]:
    """(key, model, encode function, pad id) for the HF clip_l-like and open_clip clip_g-like encoders."""
    return [("clip_l", hf_text_model("clip_l"), encode_hf, EOS),
            ("clip_g", openclip_text_tower("clip_g"), encode_openclip, 0)]


def _rows(tok: object, words: str) -> list[int]:
    return encode_plain(tok, words)


@needs_bpe
@pytest.mark.parametrize("which", [0, 1])
def test_injection_equals_the_words_it_copies(which: int) -> None:
    key, model, encode, pad = _encoders()[which]
    tok = clip_tokenizer()
    emb = token_embedding_of(model)
    s = EmbeddingSet()
    s.add_new("mycat", 2, {key: emb.weight}, {key: _rows(tok, "fluffy cat")})
    pt = PromptTokenizer(tok, {"mycat": 2}, pad_id=pad)
    plain = PromptTokenizer(tok, {}, pad_id=pad)
    prompts = ["a photo of mycat", "mycat and mycat on a sofa"]
    batch = pt.build_batch(prompts)
    reference = plain.build_batch(["a photo of fluffy cat", "fluffy cat and fluffy cat on a sofa"])
    weight_before = emb.weight.detach().clone()
    with torch.no_grad():
        before = encode(model, batch.ids)
        with injected_embeddings(emb, s.vectors_for(key), batch.fixes):
            injected = encode(model, batch.ids)
        after = encode(model, batch.ids)
        expected = encode(model, reference.ids)
    # The EOS pooling position and everything else line up, so the outputs must match.
    torch.testing.assert_close(injected, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(before, after)  # bit-identical once the hook is gone
    assert torch.equal(emb.weight, weight_before)
    assert not emb._forward_hooks
    # Causal attention: positions before the first placeholder are untouched by it.
    assert torch.equal(injected[0, :4], before[0, :4]) and not torch.equal(injected[0, 4:], before[0, 4:])


@needs_bpe
@pytest.mark.parametrize("which", [0, 1])
def test_gradients_reach_vectors_not_vocabulary(which: int) -> None:
    key, model, encode, pad = _encoders()[which]
    tok = clip_tokenizer()
    emb = token_embedding_of(model)
    s = EmbeddingSet()
    s.add_new("mycat", 3, {key: emb.weight}, None, generator=torch.Generator().manual_seed(0))
    # Placeholder 1, not the default 0: open_clip also pads with 0, and padding rows get gradient.
    pt = PromptTokenizer(tok, {"mycat": 3}, pad_id=pad, placeholder_id=1)
    batch = pt.build_batch(["a photo of mycat", "a dog"])
    model.requires_grad_(False)
    with injected_embeddings(emb, s.vectors_for(key), batch.fixes):
        encode(model, batch.ids).square().mean().backward()
    (vec,) = s.parameters()
    assert vec.grad is not None and vec.grad.abs().sum(dim=1).gt(0).all()
    assert emb.weight.grad is None
    # With a trainable vocabulary, the placeholder row still gets nothing: its output was replaced.
    s.parameters()[0].grad = None
    emb.weight.requires_grad_(True)
    with injected_embeddings(emb, s.vectors_for(key), batch.fixes):
        encode(model, batch.ids).square().mean().backward()
    assert emb.weight.grad[1].abs().sum().item() == 0.0
    assert emb.weight.grad[320].abs().sum().item() > 0.0  # "a" was really used
    assert not emb._forward_hooks


@needs_bpe
def test_hook_removed_on_exception_and_batch_mismatch_refused() -> None:
    model = hf_text_model("clip_l")
    emb = token_embedding_of(model)
    s = EmbeddingSet()
    s.add("mycat", {"clip_l": torch.zeros(1, 32)})
    batch = PromptTokenizer(clip_tokenizer(), {"mycat": 1}, pad_id=EOS).build_batch(["mycat", "mycat"])
    with pytest.raises(ModelLayoutError, match=r"^token embedding output \(1, 77, 32\) does not match 2 fix lists"):
        with injected_embeddings(emb, s.vectors_for("clip_l"), batch.fixes):
            encode_hf(model, batch.ids[:1])
    assert not emb._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with injected_embeddings(emb, s.vectors_for("clip_l"), batch.fixes):
            raise RuntimeError("boom")
    assert not emb._forward_hooks


def test_splice_casts_and_checks() -> None:
    out = torch.zeros(2, 6, 4, dtype=torch.bfloat16)
    vec = torch.ones(2, 4, requires_grad=True)
    spliced = splice_vectors(out, [[(1, "a"), (4, "a")], []], {"a": vec})
    assert spliced.dtype == torch.bfloat16
    assert spliced[0, :, 0].tolist() == [0, 1, 1, 0, 1, 1] and spliced[1].eq(0).all()
    spliced.float().sum().backward()
    assert vec.grad is not None and vec.grad.eq(2).all()
    with pytest.raises(ModelLayoutError, match=r"^embedding 'a': positions 5\.\.6 outside 1\.\.5$"):
        splice_vectors(out, [[(5, "a")], []], {"a": vec})
    with pytest.raises(ModelLayoutError, match=r"^embedding 'a': vectors \(2, 3\) do not fit encoder width 4$"):
        splice_vectors(out, [[(1, "a")], []], {"a": torch.ones(2, 3)})
    with pytest.raises(EmbeddingNameError, match=r"^embedding 'b' in the prompt fixes has no vectors"):
        splice_vectors(out, [[(1, "b")], []], {"a": vec})


def test_encode_plain_accepts_open_clip_style_tokenizer() -> None:
    class SimpleStyle:
        """Shape of open_clip's SimpleTokenizer: encode(text) without specials, decoder dict."""

        decoder = {5: "my", 6: "cat</w>"}

        def encode(self, text: str) -> list[int]:
            return [5, 6] if text == "mycat" else [7, 5, 6]

    tok = SimpleStyle()
    assert encode_plain(tok, "mycat") == [5, 6]
    pt = PromptTokenizer(tok, {"mycat": 2}, pad_id=0)
    out = pt.build_prompt_ids("x mycat")
    assert out.ids[:6].tolist() == [BOS, 7, 0, 0, EOS, 0] and out.fixes == [(2, "mycat")]
