"""Read by mypy only (CI's type check), never run: every host class satisfies
:class:`pivotal.host_api.TrainingHost`, optional members included (a missing or mistyped member is
a type error here). A new host adds its class below."""

from __future__ import annotations

from pivotal.host_api import TrainingHost
from pivotal.hosts.a1111.host import A1111Host
from pivotal.hosts.diffusers.host import DiffusersHost
from pivotal.hosts.forge.host import ForgeHost


def hosts(a1111: A1111Host, diffusers: DiffusersHost, forge: ForgeHost) -> list[TrainingHost]:
    return [a1111, diffusers, forge]
