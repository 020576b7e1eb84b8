"""Which embedding names are already taken, and refusing clashes before a run starts.

The CLIP tokenizer lower-cases prompts, so ``MyChar`` and ``mychar`` are the same trigger: names
are compared case-insensitively. Sources of taken names, as the webui sees them:

* files in an embeddings folder (recursively): the file name without extension is the name;
* ``bundle_emb.<name>.*`` keys in LoRA files (read from headers only; tensors are never loaded);
* LoRA aliases (file stems): a trigger equal to a LoRA's name is confusing in prompts.

A name from the embeddings folder or a LoRA alias refuses the run. A name another *bundle* defines
does not: versions and sweep variants of one concept share their trigger, and in a prompt the
bundle whose ``<lora:…>`` tag is there owns the name (the webui bundle loader's rule), so the run
goes on with a warning naming that bundle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from pivotal.errors import EmbeddingNameError, PivotalError
from pivotal.formats.embedding_keys import embedding_names
from pivotal.formats.folder_scan import safetensors_files
from pivotal.formats.safetensors_io import read_header
from pivotal.text.names import validate_embedding_name

#: How a taken name's source starts when it is another bundle's embedding (shared, not refused).
BUNDLE_SOURCE = "the bundle "

#: Files the webui's embedding loader reads from an embeddings folder.
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp", ".jxl", ".avif")


def embedding_folder_names(folder: str | os.PathLike) -> dict[str, str]:
    """{lower-cased name: file} for every embedding file under ``folder`` (missing folder: none)."""
    root = Path(folder)
    taken: dict[str, str] = {}
    if not root.is_dir():
        return taken
    for p in sorted(root.rglob("*")):
        # ``x.preview.png`` is a card preview, not an embedding
        if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and not p.stem.endswith(".preview"):
            taken.setdefault(p.stem.lower(), str(p))
    return taken


def bundle_embedding_names(path: str | os.PathLike) -> list[str]:
    """Embedding names in a bundle, from its header alone (fast: no tensor is read)."""
    return embedding_names(read_header(path).tensors)


def lora_folder_names(folder: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """({lower-cased name: source} for every bundled embedding and LoRA alias of ``folder``,
    warnings). Unreadable files do not stop the scan; each gives one warning naming it."""
    return taken_names_for_run("", [folder])


def is_own_file(path: Path, output_name: str) -> bool:
    """Whether ``path`` is one of a run's own outputs (``NAME``, ``NAME-stepNNNNNN``, ``NAME.resume``):
    retraining a bundle must not clash with its own earlier save."""
    stem = path.stem
    return stem == output_name or stem.startswith(f"{output_name}-step") or stem.startswith(f"{output_name}.resume")


def taken_names_for_run(output_name: str, lora_dirs: Iterable[str | os.PathLike] = (),
                        embedding_dirs: Iterable[str | os.PathLike] = (),
                        variants: Iterable[str] = ()) -> tuple[dict[str, str], list[str]]:
    """({lower-cased name: where it is used}, warnings) for a run that will write ``output_name``:
    embedding files of ``embedding_dirs``, and the bundled embeddings and LoRA aliases of every file
    in ``lora_dirs`` but the run's own (checklist 18: refuse a clash before training starts).

    ``variants``: output names of the other runs of the same queue or sweep, variants of one
    concept that may share its embedding names (the prompt's ``<lora:…>`` tag says whose name it
    is, see the webui bundle loader); their files are skipped like the run's own."""
    own_names = [output_name, *variants]
    taken: dict[str, str] = {}
    warnings: list[str] = []
    for folder in embedding_dirs:
        for name, source in embedding_folder_names(folder).items():
            taken.setdefault(name, f"{source} in the embeddings folder")
    for folder in lora_dirs:
        paths, skipped = safetensors_files(folder)
        warnings += skipped
        for p in paths:
            if p.name.endswith(".resume.safetensors") or any(is_own_file(p, n) for n in own_names):
                continue
            taken.setdefault(p.stem.lower(), f"the LoRA {p}")
            try:
                for name in bundle_embedding_names(p):
                    taken.setdefault(name.lower(), f"{BUNDLE_SOURCE}{p}")
            except (PivotalError, OSError) as e:
                warnings.append(f"skipped while looking for embedding names: {e}")
    return taken, warnings


def check_new_names(names: Iterable[str], taken: Mapping[str, str]) -> list[str]:
    """Refuse invalid names, repeats, and names already used elsewhere (EmbeddingNameError); return
    a warning for each name another bundle also defines (shared: the prompt's tag decides).

    ``taken``: {lower-cased name: where it is used}, e.g. merged results of the scanners above.
    """
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for name in names:
        validate_embedding_name(name)
        low = name.lower()
        if low in seen:
            raise EmbeddingNameError(f"embedding names {seen[low]!r} and {name!r} are the same trigger "
                                     "(prompts are case-insensitive); give each embedding its own name")
        seen[low] = name
        if low in taken and taken[low].startswith(BUNDLE_SOURCE):
            warnings.append(f"embedding name {name!r} is also defined by {taken[low]}; in a prompt, the bundle "
                            "whose <lora:...> tag is there owns the name (rename it to use both without tags)")
        elif low in taken:
            raise EmbeddingNameError(f"embedding name {name!r} is already used by {taken[low]}; "
                                     "rename the new embedding (or move that file away)")
    return warnings
