"""The ablation grid the pivotal-tuning guides ask for: one bundle, its parts one at a time.

Columns (see :data:`COLUMNS`): the whole bundle, its UNet LoRA only, its text-encoder LoRA only,
its embeddings only (no LoRA at all), and the base model with the names as plain text. Rows: the
user's prompts, then prompts placing the concept in contexts its captions never had
(:func:`novel_prompts`). Every cell of a row uses the same seed, so the only difference along a
row is the part of the bundle in use.

The cells are plain prompts with webui ``<lora:…>`` tags (``unet=0`` / ``te=0`` / strength 0), so
any host renders them with its own txt2img: :func:`render_grid` takes a ``render`` callable per
host. :func:`compose_grid` draws the labelled sheet; :func:`grid_record` is the JSON of what each
cell was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from pivotal.errors import ConfigError
from pivotal.inference.lora_tags import LoraTag

#: column id -> title on the sheet
COLUMNS: dict[str, str] = {
    "full": "full bundle",
    "unet": "UNet LoRA only",
    "te": "text-encoder LoRA only",
    "emb": "embeddings only",
    "base": "base model (names as text)",
}

#: Contexts for the rows the user did not write: places, media and times of day a concept's
#: captions rarely hold. ``{names}`` is the bundle's embedding names.
DEFAULT_CONTEXTS: tuple[str, ...] = (
    "{names} on a beach at sunset",
    "{names} in the snow",
    "a watercolor painting of {names}",
    "{names} in a city street at night",
    "a pencil sketch of {names}",
    "{names} in outer space",
)

STOP_WORDS = frozenset({"a", "an", "the", "in", "on", "of", "at", "and", "with"})

#: Cells narrower than this are enlarged (nearest neighbour, a whole factor) so labels fit.
MIN_CELL = 128


@dataclass(frozen=True)
class GridCell:
    """One picture of the grid: its row (prompt) and column (part), and what to render."""

    row: int
    column: str
    prompt: str       # the row's prompt with this column's <lora:…> tag
    negative: str
    seed: int


@dataclass
class GridPlan:
    """What a grid will render: ``rows`` × ``columns`` cells."""

    bundle: str                      # the bundle's <lora:…> name
    rows: list[str]                  # the prompts, without tags
    columns: list[str]
    seeds: list[int]                 # one per row
    negative: str = ""
    strength: float = 1.0
    notes: dict[str, str] = field(default_factory=dict)  # column -> why it looks like another
    #: a variants grid (a sweep's): row i uses bundle ``row_bundles[i]`` (empty: every row ``bundle``)
    row_bundles: list[str] = field(default_factory=list)
    #: what the sheet writes left of each row (empty: the row's prompt and seed)
    row_labels: list[str] = field(default_factory=list)

    def bundle_of(self, row: int) -> str:
        """The bundle row ``row`` compares the parts of."""
        return self.row_bundles[row] if self.row_bundles else self.bundle

    def cells(self) -> list[GridCell]:
        return [GridCell(r, c, f"{prompt} {column_tag(self.bundle_of(r), c, self.strength)}".strip(), self.negative,
                         self.seeds[r])
                for r, prompt in enumerate(self.rows) for c in self.columns]


def column_tag(bundle: str, column: str, strength: float = 1.0) -> str:
    """The ``<lora:…>`` tag of a column ('' for the base model)."""
    tags = {"full": LoraTag(bundle, strength, strength), "unet": LoraTag(bundle, 0.0, strength),
            "te": LoraTag(bundle, strength, 0.0), "emb": LoraTag(bundle, 0.0, 0.0)}
    if column == "base":
        return ""
    if column not in tags:
        raise ConfigError(f"grid column {column!r} is not one of {', '.join(COLUMNS)} (setting: columns)")
    tag = tags[column]
    return tag.text() if column != "emb" else f"<lora:{bundle}:0>"


def caption_words(tag_frequency: Mapping[str, Mapping[str, int]] | str | None) -> set[str]:
    """Lower-case words of a bundle's captions, from its ``ss_tag_frequency`` metadata (the JSON
    text or the parsed mapping); empty when absent or malformed."""
    data: Any = tag_frequency
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return set()
    words: set[str] = set()
    if isinstance(data, Mapping):
        for tags in data.values():
            if isinstance(tags, Mapping):
                for tag in tags:
                    words.update(re.findall(r"[a-z]+", str(tag).lower()))
    return words


def novel_prompts(names: Sequence[str], seen: Iterable[str], count: int,
                  contexts: Sequence[str] = DEFAULT_CONTEXTS) -> list[str]:
    """Up to ``count`` prompts placing ``names`` in contexts the captions never had: a context is
    skipped when every one of its words (but a, in, on, …) occurs in the captions."""
    seen_words = {w.lower() for w in seen}
    joined = " ".join(names)
    out = []
    for context in contexts:
        # new when some word of the context never occurs in the captions ("green" in "on a green
        # background" after captions of white and red backgrounds; not "in the snow" after "snow")
        words = set(re.findall(r"[a-z]+", context.replace("{names}", "").lower())) - STOP_WORDS
        if words <= seen_words:
            continue
        out.append(context.format(names=joined))
        if len(out) == count:
            break
    return out


def plan_grid(bundle: str, prompts: Sequence[str], columns: Sequence[str] = tuple(COLUMNS), seed: int = 0,
              negative: str = "", strength: float = 1.0, parts: Iterable[str] | None = None) -> GridPlan:
    """A plan over ``prompts`` (tags are refused in them: the columns add the bundle's).

    ``seed``: row ``i`` uses ``seed + i``. ``parts``: the bundle's LoRA parts ("unet", "te", "te1",
    "te2"; None = unknown), so a column that repeats another is noted (e.g. no text-encoder LoRA).
    """
    if not prompts:
        raise ConfigError("the grid needs at least one prompt (setting: prompts)")
    for p in prompts:
        if "<lora:" in p.lower():
            raise ConfigError(f"grid prompt {p!r} holds a <lora:…> tag; the columns add the bundle's own, "
                              "leave it out")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or not columns:
        raise ConfigError(f"grid columns {', '.join(unknown) or '(none)'}: choose from {', '.join(COLUMNS)}")
    plan = GridPlan(bundle, list(prompts), list(columns), [seed + i for i in range(len(prompts))], negative,
                    float(strength))
    if parts is not None:
        have = set(parts)
        if not have & {"te", "te1", "te2"}:
            plan.notes["te"] = "the bundle has no text-encoder LoRA: this column equals 'embeddings only'"
        if "unet" not in have:
            plan.notes["unet"] = "the bundle has no UNet LoRA: this column equals 'embeddings only'"
    return plan


Renderer = Callable[[GridCell], "tuple[Any, str]"]


@dataclass
class GridResult:
    plan: GridPlan
    images: dict[tuple[int, str], Any]   # (row, column) -> PIL image
    infotexts: dict[tuple[int, str], str]


def render_grid(plan: GridPlan, render: Renderer,
                progress: Callable[[int, int, GridCell], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> GridResult:
    """Render every cell with ``render(cell) -> (PIL image, infotext)``, row by row.

    ``progress(done, total, cell)`` before each cell; ``should_stop()`` is asked before each cell
    and ends the grid early (the cells done so far are kept).
    """
    cells = plan.cells()
    result = GridResult(plan, {}, {})
    for i, cell in enumerate(cells):
        if should_stop is not None and should_stop():
            break
        if progress is not None:
            progress(i, len(cells), cell)
        image, info = render(cell)
        result.images[(cell.row, cell.column)] = image
        result.infotexts[(cell.row, cell.column)] = info
    return result


def bundle_grid_plan(path: str, prompts: Sequence[str], auto_prompts: int = 2, columns: Sequence[str] = tuple(COLUMNS),
                     seed: int = 0, negative: str = "", strength: float = 1.0,
                     contexts: Sequence[str] = DEFAULT_CONTEXTS) -> GridPlan:
    """:func:`plan_grid` for the bundle file ``path``: its name, its LoRA parts, the user's
    ``prompts`` and ``auto_prompts`` more from :func:`novel_prompts` (contexts its captions never
    had). With no prompt at all, the rows are the embedding names alone plus the novel ones."""
    from pivotal.adapters.lora_layers import part_of_key
    from pivotal.formats.bundle import bundle_name, read_bundle

    bundle = read_bundle(path)
    names = sorted(bundle.embeddings)
    rows = list(prompts)
    if auto_prompts > 0:
        seen = caption_words(bundle.metadata.get("ss_tag_frequency"))
        # ``auto_prompts`` rows more than the user's: a context that repeats one of their prompts
        # does not count, the next new one takes its place
        novel = [p for p in novel_prompts(names, seen, len(contexts), contexts) if p not in rows]
        rows += novel[:auto_prompts]
    if not rows and names:
        rows = [" ".join(names)]
    parts = {part_of_key(key) for key in bundle.lora}
    return plan_grid(bundle_name(path), rows, columns, seed, negative, strength, parts=parts)


def host_renderer(host: Any, lora_dirs: Sequence[str], steps: int, width: int | None, height: int | None,
                  guidance: float) -> Renderer:
    """A :data:`Renderer` that draws each cell with :func:`pivotal.inference.generate.generate_image`
    on ``host`` (the standalone host: its sampler, the given steps, size and CFG)."""
    from pivotal.inference.generate import format_infotext, generate_image

    def render(cell: GridCell) -> tuple[Any, str]:
        image, info = generate_image(host, cell.prompt, cell.negative, lora_dirs, steps, cell.seed, width, height,
                                     guidance)
        return image, format_infotext(info)

    return render



def prompt_for_part(prompt: str, column: str) -> str:
    """``prompt`` with each of its ``<lora:…>`` tags rewritten to one grid column (what the X/Y/Z
    plot's "Pivotal: bundle part" axis applies): ``full`` leaves it, ``unet`` / ``te`` zero the
    other part at the tag's own strength, ``emb`` sets strength 0 (embeddings only), ``base``
    removes the tag (names as plain text)."""
    from pivotal.inference.lora_tags import LORA_TAG, parse_tag

    if column not in COLUMNS:
        raise ConfigError(f"bundle part {column!r} is not one of {', '.join(COLUMNS)}")
    if column == "full":
        return prompt

    def rewrite(match: re.Match[str]) -> str:
        tag = parse_tag(match.group(0), match.group(1))
        if column == "base":
            return ""
        if column == "emb":
            return f"<lora:{tag.name}:0>"
        return LoraTag(tag.name, 0.0 if column == "unet" else tag.te,
                       0.0 if column == "te" else tag.unet).text()

    return re.sub(r"[ \t]{2,}", " ", LORA_TAG.sub(rewrite, prompt)).strip()


def prompt_with_bundle(prompt: str, bundle: str) -> str:
    """``prompt`` using bundle ``bundle`` (what the "Pivotal: bundle" axis applies): the first
    ``<lora:…>`` tag's name is replaced, keeping its strengths; with no tag, ``<lora:NAME:1>`` is
    appended."""
    from pivotal.inference.lora_tags import LORA_TAG, parse_tag

    match = LORA_TAG.search(prompt)
    if match is None:
        return f"{prompt} <lora:{bundle}:1>".strip()
    tag = parse_tag(match.group(0), match.group(1))
    return prompt[: match.start()] + LoraTag(bundle, tag.te, tag.unet).text() + prompt[match.end():]
