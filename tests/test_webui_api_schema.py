"""``POST /pivotal/v1/train``'s body model, generated from the settings' declarations: /docs list
every setting, every setting reaches the run, and bad values keep Pivotal's own messages. Runs on
the real FastAPI app with whatever pydantic is installed (1.10 with the webui pins, 2 otherwise),
and with no pydantic model at all (the plain-dict fallback)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest

from setting_samples import VARIANTS, sample_values

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from pivotal.training.config import TrainConfig  # noqa: E402
from pivotal.training.job import TrainingJob  # noqa: E402
from pivotal.training.progress import TrainResult  # noqa: E402
from pivotal.training.settings import declared  # noqa: E402
from pivotal.webui import api_schema  # noqa: E402
from pivotal.webui.api import add_routes  # noqa: E402


class Api:
    """The routes on a FastAPI app, called in-process (httpx's ASGI transport; no server)."""

    def __init__(self) -> None:
        self.configs: list[TrainConfig] = []

        def trainer(cfg: TrainConfig, host: Any, on_event: Any, stop: threading.Event, resume: Any = None) -> Any:
            self.configs.append(cfg)
            return TrainResult("completed", cfg.steps, cfg.steps)

        self.job = TrainingJob(trainer=trainer)
        self.app = fastapi.FastAPI()
        add_routes(self.app, self.job, lambda **kw: object(), lambda: {"outputs": "/outputs", "lora_dir": "/lora"})

    def post(self, body: Any) -> tuple[int, Any]:
        async def go() -> Any:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pivotal.test") as client:
                return await client.post("/pivotal/v1/train", json=body)

        r = asyncio.run(go())
        return r.status_code, r.json()


def body_of(values: dict[str, Any]) -> dict[str, Any]:
    config = {k: [dataclasses.asdict(e) if dataclasses.is_dataclass(e) else e for e in v] if k == "embeddings" else v
              for k, v in values.items()}
    return {"config": config}


def test_docs_list_every_setting() -> None:
    spec = Api().app.openapi()
    schemas = spec["components"]["schemas"]
    props = schemas[api_schema.CONFIG_MODEL]["properties"]
    assert list(props) == [s.name for s in declared(TrainConfig)]
    defaults = TrainConfig()
    for s in declared(TrainConfig):
        assert props[s.name]["description"] == s.spec.help, s.name
        if s.kind not in ("embeddings", "str_list"):
            assert props[s.name]["default"] == getattr(defaults, s.name), s.name
    assert props["steps"]["type"] == "integer" and props["steps"]["exclusiveMinimum"] == 0
    assert props["optimizer"]["enum"] == ["adamw", "adamw8bit", "prodigy"]
    content = spec["paths"]["/pivotal/v1/train"]["post"]["requestBody"]["content"]["application/json"]
    assert content["schema"]["$ref"].endswith(api_schema.REQUEST_MODEL)
    assert "mychar" in str(content.get("example") or content.get("examples"))  # the request example
    assert set(schemas[api_schema.REQUEST_MODEL]["properties"]) == {"config", "resume", "preview_sampler",
                                                                    "preview_scheduler", "preview_cfg"}


def run_with(api: Api, values: dict[str, Any]) -> TrainConfig:
    code, body = api.post(body_of(values))
    assert code == 200, body
    assert api.job.wait(10)
    return api.configs[-1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_reaches_the_run(variant: int) -> None:
    want = sample_values(variant)
    got = run_with(Api(), want)
    assert {n: getattr(got, n) for n in want} == want


def test_bad_values_keep_pivotal_messages() -> None:
    api = Api()
    ok = {"data_dir": "d", "embeddings": [{"name": "zed"}]}
    assert api.post({"config": {**ok, "steps": 0}}) == (422, {"detail": "steps: must be greater than 0, got 0"})
    assert api.post({"config": {**ok, "steps": "10"}}) == (422, {"detail": "steps: expected int, got '10'"})
    assert api.post({"config": {**ok, "unet_rnak": 4}}) == (422, {"detail": "unknown setting(s): unet_rnak"})
    code, body = api.post({"steps": 3})
    assert code == 422 and 'needs a "config" object' in body["detail"]
    code, body = api.post({"config": ok, "preview_cfg": "x"})
    assert code == 422 and body["detail"] == "preview_cfg must be a number, got 'x'"
    # out_dir defaults to the webui's outputs/<output_name>
    assert run_with(api, {**ok, "output_name": "mine"}).out_dir.replace("\\", "/") == "/outputs/mine"


def test_plain_dict_body_without_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_schema, "_pydantic", lambda: None)
    assert api_schema.train_request_model() is None
    api = Api()
    assert api_schema.CONFIG_MODEL not in api.app.openapi().get("components", {}).get("schemas", {})
    want = sample_values()
    got = run_with(api, want)
    assert {n: getattr(got, n) for n in want} == want
