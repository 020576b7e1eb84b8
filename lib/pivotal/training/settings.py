"""How a training setting is declared: help, group, limits or choices, and how it shows.

Each :class:`~pivotal.training.config.TrainConfig` field is written with :func:`setting`, which
stores a :class:`Setting` in the field's metadata. Everything that lists settings is generated from
those declarations, so a new setting is one line in ``TrainConfig``:

* validation of limits, choices and per-value checks (:func:`check_declared`),
* the config-file / API JSON Schema (:mod:`pivotal.training.schema`),
* the ``pivotal train`` flags (:mod:`pivotal.cli.train`),
* the Train form of the app and the webui tab (:mod:`pivotal.ui.train_form`),
* the webui API's request model (:mod:`pivotal.webui.api_schema`).

Nothing here imports a UI, a CLI or pydantic: the declaration is plain data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from pivotal.errors import ConfigError

#: where a setting shows in the Train form: its group's section, the "Advanced" section, or not at all
FORM_GROUP, FORM_ADVANCED, FORM_NONE = "group", "advanced", "none"
#: form widget kinds (the UI maps each to a gradio component)
WIDGETS = ("text", "number", "slider", "checkbox", "radio", "dropdown", "lines", "embeddings")
#: the value kinds a setting can have, from its field's annotation
KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "str", "list[str]": "str_list",
         "list[EmbeddingSpec]": "embeddings"}


@dataclass(frozen=True)
class Limits:
    """A numeric range; ``low_open`` / ``high_open`` exclude the end itself.

    The messages are the ones the settings always had ("must be greater than 0", "must be 0 or
    more", "must be between 0 and 1", "must be below 1")."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: float) -> Optional[str]:
        """What is wrong with ``value`` (None when it is inside)."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if not lo <= value <= hi:
                return f"must be between {_num(lo)} and {_num(hi)}, got {value}"
            if self.low_open and value <= lo:
                return f"must be above {_num(lo)}"
            if self.high_open and value >= hi:
                return f"must be below {_num(hi)}"
            return None
        if lo is not None:
            if self.low_open and value <= lo:
                return f"must be greater than {_num(lo)}, got {value}"
            if not self.low_open and value < lo:
                return f"must be {_num(lo)} or more, got {value}"
        if hi is not None:
            if self.high_open and value >= hi:
                return f"must be below {_num(hi)}, got {value}"
            if not self.high_open and value > hi:
                return f"must be {_num(hi)} or less, got {value}"
        return None

    def json_schema(self) -> dict[str, float]:
        """The JSON Schema keywords (draft 2020-12 / OpenAPI 3.1 spelling) for this range."""
        out: dict[str, float] = {}
        if self.low is not None:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return out


POSITIVE = Limits(low=0, low_open=True)
NON_NEGATIVE = Limits(low=0)
FRACTION = Limits(low=0, high=1)
BELOW_ONE = Limits(low=0, high=1, high_open=True)


@dataclass(frozen=True)
class Group:
    """A section of settings: a titled block of ``--help`` and an accordion of the form."""

    key: str
    title: str
    #: the form shows it open, outside any accordion (the settings every run needs)
    top: bool = False


#: the groups, in the order the form and ``--help`` show them
GROUPS = (
    Group("run", "Run", top=True),
    Group("lora", "LoRA and learning rates"),
    Group("optimizer", "Optimizer and precision"),
    Group("data", "Dataset and captions"),
    Group("prior", "DreamBooth prior preservation"),
    Group("dreamartist_pp", "DreamArtist++ (negative embeddings)"),
    Group("saving", "Saving and previews"),
    Group("validation", "Validation"),
    Group("textcraftor", "Reward fine-tuning (TextCraftor)"),
)
ADVANCED = Group("advanced", "Advanced")
_GROUP_KEYS = {g.key for g in GROUPS}


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting (stored in its dataclass field's metadata).

    ``flag``: the ``pivotal train`` flag without ``--`` (default: the name with ``-``);
    ``widget``: the form widget (default: from the type and choices); ``form``: FORM_GROUP,
    FORM_ADVANCED or FORM_NONE; ``check``: an extra per-value check raising a PivotalError.
    """

    help: str
    group: str
    label: str = ""
    flag: str = ""
    metavar: str = ""
    widget: str = ""
    form: str = FORM_GROUP
    limits: Optional[Limits] = None
    #: the allowed values, or a function giving them when they are known only at run time (the
    #: registered LoRA algorithms, which a plug-in may add to)
    choices: Union[tuple[str, ...], Callable[[], Sequence[str]]] = ()
    step: Optional[float] = None
    elem: str = ""
    check: Optional[Callable[[Any], Any]] = None

    def __post_init__(self) -> None:
        if self.group not in _GROUP_KEYS:
            raise ValueError(f"setting group {self.group!r} is not one of {', '.join(sorted(_GROUP_KEYS))}")
        if self.widget and self.widget not in WIDGETS:
            raise ValueError(f"widget {self.widget!r} is not one of {', '.join(WIDGETS)}")
        if self.form not in (FORM_GROUP, FORM_ADVANCED, FORM_NONE):
            raise ValueError(f"form {self.form!r} is not one of {FORM_GROUP}, {FORM_ADVANCED}, {FORM_NONE}")


@dataclass(frozen=True)
class DeclaredSetting:
    """A setting as the generators see it: field name, value kind, default and declaration."""

    name: str
    kind: str
    default: Any
    spec: Setting

    @property
    def flag(self) -> str:
        return self.spec.flag or self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed values now (empty: any value of the kind)."""
        c = self.spec.choices
        return tuple(c() if callable(c) else c)

    @property
    def label(self) -> str:
        return self.spec.label or self.name.replace("_", " ")

    @property
    def widget(self) -> str:
        if self.spec.widget:
            return self.spec.widget
        if self.kind == "bool":
            return "checkbox"
        if self.spec.choices:
            return "dropdown"
        return {"int": "number", "float": "number", "str_list": "lines", "embeddings": "embeddings"}.get(
            self.kind, "text")

    @property
    def group(self) -> str:
        """The form section it shows in ("advanced" for advanced-only settings)."""
        return ADVANCED.key if self.spec.form == FORM_ADVANCED else self.spec.group

    @property
    def in_form(self) -> bool:
        return self.spec.form != FORM_NONE


def setting(default: Any, help: str, *, group: str, **how: Any) -> Any:
    """A dataclass field with its declaration: ``steps: int = setting(1000, "…", group="run",
    limits=POSITIVE)``. A list default is given as a list and copied per instance."""
    meta = {"setting": Setting(help=help, group=group, **how)}
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls: type) -> Iterator[DeclaredSetting]:
    """Every declared field of dataclass ``cls`` in field order. A field without a declaration
    raises TypeError: a setting no flag, file or form can reach is a bug (declare it with
    :func:`setting`)."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if not isinstance(spec, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} has no declaration: write it with settings.setting(...)")
        kind = KINDS.get(str(f.type).replace(" ", ""))
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: type {f.type} has no setting kind ({', '.join(KINDS)})")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield DeclaredSetting(f.name, kind, default, spec)


def check_declared(obj: Any) -> None:
    """Check each value of ``obj`` against its declaration: limits, choices, extra check.
    ConfigError naming the setting."""
    for s in declared(type(obj)):
        value = getattr(obj, s.name)
        if s.spec.limits is not None:
            problem = s.spec.limits.problem(value)
            if problem:
                raise ConfigError(f"{s.name}: {problem}")
        choices = s.choices
        if choices and value not in choices:
            raise ConfigError(f"{s.name}: {value!r} is not one of {', '.join(choices)}")
        if s.spec.check is not None:
            s.spec.check(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
