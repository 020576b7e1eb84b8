"""Bundle loader cost: what a ``<lora:NAME>`` tag adds to one generation with 500 bundles on
disk, and how long scanning 1000 bundle files for their embedding names takes (headers only).

Generation (tiny demo SD1 model, 64 px, ``--gen-steps`` sampler steps, CFG): the same prompt
with and without ``<lora:bundle_250:1>``, interleaved, plus a tag whose letter case differs from
the file name (``find_bundle`` then scans the folder). The difference of the medians is the
loader's cost; the breakdown times each piece the loader runs (lookup, read + validate, build
the network, hash for the infotext, attach / detach) directly.

Scan: 1000 bundle-shaped safetensors files (two embeddings and four small LoRA modules each,
~90 KB) in a temporary folder: ``name_registry.bundle_embedding_names`` over every file, and
``lora_folder_names`` over the folder (rglob + names), against reading every file whole with
``read_bundle``. Bytes read per file (``rchar`` from /proc/self/io) show the header scan stops at
the header. Files are in the OS page cache (written just before): a cold disk adds its latency.

    .venv/bin/python bench/loader.py --json bench/results/loader.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _common import add_threads_arg, apply_threads, load_average, machine_info, print_table, quantiles, write_json  # noqa: E402
from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.demo.host import build_demo_host  # noqa: E402
from pivotal.formats.bundle import BundleEmbedding, read_bundle, write_bundle  # noqa: E402
from pivotal.formats.bundle_metadata import TrainingInfo  # noqa: E402
from pivotal.formats.name_registry import bundle_embedding_names, lora_folder_names  # noqa: E402
from pivotal.formats.safetensors_io import addnet_hash  # noqa: E402
from pivotal.inference.bundle_load import load_bundle_for_model  # noqa: E402
from pivotal.inference.generate import WIDEST_PRESET, find_bundle, generate_image  # noqa: E402


def rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def timed(fn, reps: int) -> dict:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return quantiles(times)


def make_bundle(host, path: Path) -> None:
    targets = host.lora_targets("unet", "attn-mlp") + host.lora_targets("te", "attn-mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = LoraNetwork(targets, 8, 8.0)
        for m in net.modules_of():
            torch.nn.init.normal_(m.algorithm.up, std=0.01)
    vocab = host.vocabulary("clip_l")
    embs = [BundleEmbedding("mychar", {"clip_l": vocab[[320, 1125]].clone()}, "woman"),
            BundleEmbedding("mystyle", {"clip_l": vocab[[1400, 2200]].clone()}, "painting")]
    write_bundle(path, "sd1", net.kohya_state_dict(torch.float16), embs, TrainingInfo("bundle"))


def bench_generation(lora_dir: Path, count: int, reps: int, gen_steps: int) -> dict:
    host = build_demo_host("sd1")
    src = lora_dir / "bundle_000.safetensors"
    make_bundle(host, src)
    for i in range(1, count):
        shutil.copyfile(src, lora_dir / f"bundle_{i:03d}.safetensors")
    name = f"bundle_{count // 2:03d}"
    prompts = {
        "no tag": "a photo of mychar, mystyle",
        "with <lora:NAME:1>": f"a photo of mychar, mystyle <lora:{name}:1>",
        "tag case differs (folder scan)": f"a photo of mychar, mystyle <lora:{name.upper()}:1>",
    }

    def gen(prompt: str):
        return generate_image(host, prompt, "", [lora_dir], gen_steps, 0, 64, 64, 7.0)

    for p in prompts.values():  # warm-up (imports, allocator, page cache)
        gen(p)
    times: dict[str, list[float]] = {k: [] for k in prompts}
    keys = list(prompts)
    for r in range(reps):
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            t0 = time.perf_counter()
            gen(prompts[k])
            times[k].append(time.perf_counter() - t0)
    base = times["no tag"]
    gen_q = {k: quantiles(v) for k, v in times.items()}
    added = {k: quantiles([a - b for a, b in zip(v, base)]) for k, v in times.items() if k != "no tag"}

    # The pieces generate_image runs for one tag, timed alone.
    path = find_bundle(name, [lora_dir])
    targets = host.lora_targets("unet", WIDEST_PRESET) + host.lora_targets("te", WIDEST_PRESET)
    dims = {k: int(host.vocabulary(k).shape[1]) for k in host.encoder_keys()}
    loaded = load_bundle_for_model(path, host.base_model, targets, dims)
    net = loaded.network

    def attach_detach():
        net.attach()
        net.detach()

    pieces = {
        "find_bundle (exact name)": timed(lambda: find_bundle(name, [lora_dir]), 50),
        f"find_bundle (case differs: scan {count} files)": timed(lambda: find_bundle(name.upper(), [lora_dir]), 10),
        "host LoRA targets (widest preset)": timed(
            lambda: host.lora_targets("unet", WIDEST_PRESET) + host.lora_targets("te", WIDEST_PRESET), 20),
        "read + validate bundle, build network": timed(
            lambda: load_bundle_for_model(path, host.base_model, targets, dims), 20),
        "addnet_hash (infotext)": timed(lambda: addnet_hash(path), 20),
        "attach + detach": timed(attach_detach, 50),
    }
    return {"bundles_on_disk": count, "tag": name, "gen_steps": gen_steps, "size": 64, "reps": reps,
            "generation_s": gen_q, "added_s": added, "pieces_s": pieces,
            "bundle_bytes": src.stat().st_size, "lora_modules": len(list(net.modules_of()))}


def bench_scan(folder: Path, count: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        tensors = {f"bundle_emb.emb{i:04d}a.string_to_param.*": torch.randn(2, 768, generator=gen),
                   f"bundle_emb.emb{i:04d}b.string_to_param.*": torch.randn(2, 768, generator=gen)}
        for j in range(4):
            key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{'qkvo'[j]}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(8, 320, generator=gen) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(320, 8, generator=gen) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(8.0)
        p = folder / f"lora_{i:04d}.safetensors"
        save_file(tensors, str(p), metadata={"ss_base_model_version": "sd_v1", "ss_output_name": p.stem})
        paths.append(p)
    file_bytes = statistics.mean(p.stat().st_size for p in paths)

    def names_all():
        for p in paths:
            bundle_embedding_names(p)

    before = rchar()
    names_all()
    read_per_file = (rchar() - before) / count if before >= 0 else None
    expect = {f"emb{i:04d}{s}" for i in range(count) for s in "ab"}
    taken, warnings = lora_folder_names(folder)
    assert expect <= set(taken) and not warnings, "scan missed names"
    full = timed(lambda: [read_bundle(p) for p in paths], max(1, reps // 2))
    return {"files": count, "file_bytes_mean": file_bytes, "bytes_read_per_file_header_scan": read_per_file,
            "bundle_embedding_names_s": timed(names_all, reps),
            "lora_folder_names_s": timed(lambda: lora_folder_names(folder), reps),
            "read_bundle_all_s": full}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--bundles", type=int, default=500)
    ap.add_argument("--scan-files", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--gen-steps", type=int, default=8)
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="pivotal-loader-"))
    try:
        (tmp / "loras").mkdir()
        (tmp / "scan").mkdir()
        gen = bench_generation(tmp / "loras", args.bundles, args.reps, args.gen_steps)
        scan = bench_scan(tmp / "scan", args.scan_files, 5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda q: f"{q['median'] * 1000:.2f}"  # noqa: E731
    rng = lambda q: f"{q['min'] * 1000:.2f}-{q['max'] * 1000:.2f}"  # noqa: E731
    rows = [[k, ms(q), rng(q), ms(gen["added_s"][k]) if k in gen["added_s"] else "-"]
            for k, q in gen["generation_s"].items()]
    print_table(["generation (demo SD1, 64 px, %d steps, CFG)" % gen["gen_steps"], "median ms", "range ms",
                 "added vs no tag, median ms"], rows,
                title=f"Generation with {gen['bundles_on_disk']} bundles on disk ({gen['reps']} interleaved reps)")
    print_table(["loader piece (one tag)", "median ms", "range ms"],
                [[k, ms(q), rng(q)] for k, q in gen["pieces_s"].items()])
    per = lambda q: f"{q['median'] / scan['files'] * 1e6:.0f}"  # noqa: E731
    print_table(["scan of %d bundle files" % scan["files"], "median ms", "range ms", "per file us"],
                [["bundle_embedding_names, every file (headers only)", ms(scan["bundle_embedding_names_s"]),
                  rng(scan["bundle_embedding_names_s"]), per(scan["bundle_embedding_names_s"])],
                 ["lora_folder_names(folder) (rglob + headers)", ms(scan["lora_folder_names_s"]),
                  rng(scan["lora_folder_names_s"]), per(scan["lora_folder_names_s"])],
                 ["read_bundle, every file (whole file, for comparison)", ms(scan["read_bundle_all_s"]),
                  rng(scan["read_bundle_all_s"]), per(scan["read_bundle_all_s"])]],
                title=f"Embedding-name scan (file {scan['file_bytes_mean'] / 1024:.0f} KiB; header scan read "
                      f"{(scan['bytes_read_per_file_header_scan'] or 0) / 1024:.1f} KiB per file)")
    write_json(args.json, {"benchmark": "loader", "machine": machine_info(), "generation": gen, "scan": scan,
                           "load_average_end": load_average(), "wall_s": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
