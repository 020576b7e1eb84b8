"""The training loop on the tiny demo host: bundle, host restored, reproducible, exact resume,
interrupt, non-finite guard (checklist 24, 28, 30, 33's refusal lives in test_job)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.demo.host import build_demo_host  # noqa: E402
from pivotal.errors import DatasetError, EmbeddingNameError, TrainingError  # noqa: E402
from pivotal.formats.bundle import read_bundle  # noqa: E402
from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from pivotal.training.batches import BatchSource  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.progress import ProgressEvent  # noqa: E402
from pivotal.training.step import StepRunner  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402

# The fixtures ``host`` (the demo sd1 host) and ``data_dir`` (its dataset) are in conftest.py.


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), output_name="t", steps=6, resolution=64,
                bucket_step=16, embeddings=[EmbeddingSpec("mychar", 2, "person")], unet_lr=1e-3,
                embedding_lr=1e-2, save_precision="fp32", seed=7)
    base.update(kw)
    return TrainConfig(**base)


def host_state(h) -> tuple[str, list[bool], list[bool]]:
    digest = hashlib.sha256()
    mods = [h.unet, h.vae, *h._encoders.values()]
    for m in mods:
        for k, v in sorted(m.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    flags = [p.requires_grad for m in mods for p in m.parameters()]
    training = [x.training for m in mods for x in m.modules()]
    return digest.hexdigest(), flags, training


def trained(path: str) -> dict[str, torch.Tensor]:
    b = read_bundle(path)
    out = dict(b.lora)
    for name, e in b.embeddings.items():
        for k, t in e.vectors.items():
            out[f"{name}.{k}"] = t
    return out


def test_run_writes_bundle_and_leaves_host_exactly_as_before(host, data_dir: Path, tmp_path: Path) -> None:
    before = host_state(host)
    vocab = host.vocabulary("clip_l").clone()
    events: list[ProgressEvent] = []
    result = train(config(data_dir, tmp_path), host, events.append)
    assert result.status == "completed" and result.steps_done == 6
    assert [e.kind for e in events][:2] == ["preflight", "start"] and events[-1].kind == "done"
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4, 5, 6]
    b = read_bundle(result.bundle_path)
    assert b.base_model == "sd1" and set(b.embeddings) == {"mychar"} and b.embeddings["mychar"].num_vectors == 2
    assert b.metadata["ss_output_name"] == "t" and b.lora
    # the embeddings and the LoRA moved away from their initial values
    assert any(float(t.abs().max()) > 0 for k, t in b.lora.items() if k.endswith("lora_up.weight"))
    assert host_state(host) == before
    assert torch.equal(host.vocabulary("clip_l"), vocab)  # untrained vocabulary rows bit-identical
    assert (tmp_path / "t.resume.safetensors").is_file()


def test_same_seed_same_result(host, data_dir: Path, tmp_path: Path) -> None:
    a = train(config(data_dir, tmp_path / "a"), host)
    b = train(config(data_dir, tmp_path / "b"), host)
    ta, tb = trained(a.bundle_path), trained(b.bundle_path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.losses == b.losses


def test_interrupted_then_resumed_equals_uninterrupted(host, data_dir: Path, tmp_path: Path) -> None:
    full = train(config(data_dir, tmp_path / "full", save_every=0), host)
    stop = threading.Event()

    def stop_after_3(e: ProgressEvent) -> None:
        if e.kind == "step" and e.step == 3:
            stop.set()

    part = train(config(data_dir, tmp_path / "part"), host, stop_after_3, stop)
    assert part.status == "interrupted" and part.steps_done == 3
    assert Path(part.bundle_path).name == "t-step000003.safetensors"
    resume_file = tmp_path / "part" / "t-step000003.resume.safetensors"
    rest = train(config(data_dir, tmp_path / "part"), host, resume=str(resume_file))
    assert rest.status == "completed" and rest.steps_done == 6
    assert rest.losses == full.losses  # the same batches, noise and timesteps after the resume
    ta, tb = trained(full.bundle_path), trained(rest.bundle_path)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6)


def test_interrupt_discard_saves_nothing(host, data_dir: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    r = train(config(data_dir, tmp_path, on_interrupt="discard"), host, stop=stop)
    assert r.status == "interrupted" and r.steps_done == 0 and r.bundle_path == ""
    assert not list(tmp_path.glob("*.safetensors"))


def test_resume_refuses_other_settings(host, data_dir: Path, tmp_path: Path) -> None:
    train(config(data_dir, tmp_path, steps=2), host)
    with pytest.raises(TrainingError, match=r"t.resume.safetensors: was made with other settings: "
                                             r"steps=2 there, 4 now; unet_rank=4 there, 2 now"):
        train(config(data_dir, tmp_path, steps=4, unet_rank=2), host, resume=str(tmp_path / "t.resume.safetensors"))
    with pytest.raises(TrainingError, match="the run already reached step 2 of 2"):
        train(config(data_dir, tmp_path, steps=2), host, resume=str(tmp_path / "t.resume.safetensors"))


class NanAfter:
    """Fault injection: the real demo host, whose UNet output turns NaN from a given call on."""

    def __init__(self, host, after: int) -> None:
        self._host, self._after, self.calls = host, after, 0

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, *args, **kwargs):
        self.calls += 1
        out = self._host.predict(*args, **kwargs)
        return out * float("nan") if self.calls > self._after else out


def test_non_finite_losses_skip_then_stop_keeping_last_good_save(host, data_dir: Path, tmp_path: Path) -> None:
    before = host_state(host)
    faulty = NanAfter(host, after=2)
    r = train(config(data_dir, tmp_path, steps=20, save_every=2, max_bad_steps=3), faulty)
    assert r.status == "stopped" and "3 non-finite losses in a row" in r.message
    assert r.bundle_path == ""  # nothing saved after the divergence
    saved = sorted(p.name for p in tmp_path.glob("t-step*.safetensors") if "resume" not in p.name)
    assert saved == ["t-step000002.safetensors"]  # the last good save is kept
    assert len([w for w in r.warnings if "loss is NaN/inf; step skipped" in w]) == 3
    assert all(torch.isfinite(t).all() for t in trained(str(tmp_path / saved[0])).values())
    assert host_state(host) == before


def test_refusals_before_training(host, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbeddingNameError, match="embedding name 'mychar' is already used by /x/mychar.pt"):
        train(config(data_dir, tmp_path), host, taken_names={"mychar": "/x/mychar.pt"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        train(config(empty, tmp_path), host)
    assert not list(tmp_path.glob("*.safetensors"))


def test_stray_temp_files_of_a_killed_save_are_cleaned(host, data_dir: Path, tmp_path: Path) -> None:
    stray = tmp_path / ".t.safetensors.pivotal-tmp-999-deadbeef"
    stray.write_bytes(b"half a file")
    r = train(config(data_dir, tmp_path, steps=1), host)
    assert not stray.exists()
    assert any("left in" in w and stray.name in w for w in r.warnings)


class CountingEncodes:
    """Wraps a host's ``encode_prompts`` (the real one runs) to record each call's captions."""

    def __init__(self, host) -> None:
        self.host, self.calls = host, []
        self._real = host.encode_prompts

    def __enter__(self) -> "CountingEncodes":
        def encode(captions, embeddings, sizes):
            self.calls.append((list(captions), torch.is_grad_enabled()))
            return self._real(captions, embeddings, sizes)
        self.host.encode_prompts = encode
        return self

    def __exit__(self, *exc) -> None:
        del self.host.encode_prompts  # back to the class's method


def test_text_conditioning_is_reused_only_while_the_text_side_is_frozen(host, data_dir: Path,
                                                                         tmp_path: Path) -> None:
    # embeddings_first: 3 steps where the embeddings train (each step must encode afresh, with
    # gradients), then 5 LoRA-only steps where the 4 captions' conditioning cannot change.
    cfg = config(data_dir, tmp_path / "c", phase_plan="embeddings_first", embedding_steps=3, steps=8,
                 batch_size=2, save_every=0)
    with CountingEncodes(host) as counting:
        cached = train(cfg, host)
    first, later = counting.calls[:3], counting.calls[3:]
    assert all(grad and 1 <= len(caps) <= 2 for caps, grad in first)  # batches of up to 2 (buckets)
    # LoRA-only phase: each caption encoded once, alone, without gradients; never again
    assert all(not grad and len(caps) == 1 for caps, grad in later)
    assert sorted(c for caps, _ in later for c in caps) == sorted({c for caps, _ in later for c in caps})
    assert 1 <= len(later) <= 4
    # and the reuse changes nothing: the same run with the cache switched off gives the same losses
    import pivotal.training.step as ts
    original = ts.StepRunner._text_frozen
    ts.StepRunner._text_frozen = lambda self: False
    try:
        with CountingEncodes(host) as uncached_calls:
            uncached = train(config(data_dir, tmp_path / "u", phase_plan="embeddings_first", embedding_steps=3,
                                    steps=8, batch_size=2, save_every=0), host)
    finally:
        ts.StepRunner._text_frozen = original
    assert len(uncached_calls.calls) == 8 and all(grad for _, grad in uncached_calls.calls)
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(uncached.losses), rtol=1e-4, atol=1e-6)


def test_a_host_setting_changed_mid_run_is_encoded_afresh(host, data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The webui's clip skip (say) changed while the LoRA-only phase reuses conditioning: every
    caption is encoded again once, with the new setting (``text_encoding_key``), then reused."""
    setting = {"clip_skip": 1}
    monkeypatch.setattr(host, "text_encoding_key", lambda: setting["clip_skip"], raising=False)
    cfg = config(data_dir, tmp_path, phase_plan="embeddings_first", embedding_steps=2, steps=12, batch_size=4,
                 save_every=0)

    def change_at_step_7(event: ProgressEvent) -> None:
        if event.kind == "step" and event.step == 7:
            setting["clip_skip"] = 2

    with CountingEncodes(host) as counting:
        train(cfg, host, change_at_step_7)
    later = [c for caps, grad in counting.calls[2:] for c in caps]
    assert all(not grad for _, grad in counting.calls[2:])
    # 4 captions, each encoded once before the change and once after it: never stale, never more
    assert sorted(later) == sorted(2 * sorted(set(later))) and len(set(later)) == 4, later


def test_latent_disk_cache_only_for_a_host_that_names_its_vae(host, data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A host's ``model_id`` keys the disk cache; a host that cannot name its VAE (None) gets a
    cache for the run only, never one on disk that another model could read."""
    train(config(data_dir, tmp_path / "named", steps=4, latent_cache="disk"), host)
    files = list((tmp_path / "named" / "latent_cache").glob("*.safetensors"))
    assert len(files) == 4  # one epoch of the 4 demo pictures (batch 1, no flips): one latent each
    assert {read_header(f).metadata["model_id"] for f in files} == {host.model_id()}
    monkeypatch.setattr(host, "model_id", lambda: None)
    r = train(config(data_dir, tmp_path / "anon", steps=1, latent_cache="disk"), host)
    assert r.status == "completed" and not (tmp_path / "anon" / "latent_cache").exists()
    assert any("no stable id" in w and "this run only" in w for w in r.warnings)


class DeviceCrossings(TorchDispatchMode):
    """Counts copies of latent-shaped tensors from one device to another (torch's own dispatcher
    reports each op; nothing is replaced)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[1] if func is torch.ops.aten.copy_.default else args[0] if args else None
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and isinstance(src, torch.Tensor) \
                and isinstance(out, torch.Tensor) and src.device != out.device and tuple(src.shape[1:]) == self.shape:
            self.count += 1
        return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (latents crossing to it)")
@pytest.mark.parametrize("latent_cache", ["memory", "off"])
def test_latents_cross_to_the_device_once_per_step_at_most(data_dir: Path, tmp_path: Path, latent_cache: str) -> None:
    """Cached latents live in CPU memory and cross once per step; encoded on the device they stay
    there. The noise (drawn from the CPU generator, for exact resume on any device) crosses too."""

    gpu = build_demo_host("sd1", device="cuda")
    cfg = config(data_dir, tmp_path, steps=12, latent_cache=latent_cache).validate()
    batches = BatchSource(cfg, gpu)
    for i in range(4):  # the first epoch fills the cache
        batches.get(i)
    latents, _, _ = batches.get(4)
    assert latents.device.type == "cuda" and latents.dtype == torch.float32
    net = LoraNetwork(gpu.lora_targets("unet", "attn"), rank=2, alpha=2.0).to(gpu.device)
    runner = StepRunner(cfg, gpu, net, EmbeddingSet(), batches, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    with gpu.training_session(False), net.attached():
        runner.run(4, optimizer)  # warm-up (lazy state)
        with DeviceCrossings(tuple(latents.shape[1:])) as crossings:
            for step in range(5, 9):
                runner.run(step, optimizer)
    per_step = crossings.count / 4
    assert per_step <= (2 if latent_cache == "memory" else 1), per_step  # latents (cached) + noise


def test_lora_dropout_is_reproducible_resumable_and_leaves_the_global_generator_alone(
        host, data_dir: Path, tmp_path: Path) -> None:
    # Dropout draws from torch's global generator, which belongs to the host (a webui seeds its
    # generations from it): each step gets its own state from (seed, step), restored afterwards.
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    full = train(config(data_dir, tmp_path / "full", lora_dropout=0.5, save_every=0), host)
    assert torch.equal(torch.random.get_rng_state(), before)
    stop = threading.Event()

    def stop_after_3(e: ProgressEvent) -> None:
        if e.kind == "step" and e.step == 3:
            stop.set()

    train(config(data_dir, tmp_path / "part", lora_dropout=0.5), host, stop_after_3, stop)
    torch.manual_seed(99)  # whatever the host did in between must not matter
    rest = train(config(data_dir, tmp_path / "part", lora_dropout=0.5), host,
                 resume=str(tmp_path / "part" / "t-step000003.resume.safetensors"))
    assert rest.losses == full.losses
