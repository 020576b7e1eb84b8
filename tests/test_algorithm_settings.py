"""The algorithm settings of ``TrainConfig``: checked, and turned into the spec the network builds."""

from __future__ import annotations

import pytest

from pivotal.adapters.algorithms import AlgorithmSpec
from pivotal.errors import ConfigError
from pivotal.training.config import EmbeddingSpec, TrainConfig


def cfg(**kw) -> TrainConfig:
    return TrainConfig(data_dir="d", embeddings=[EmbeddingSpec("mychar")], **kw)


def test_defaults_are_plain_lora_and_specs_carry_the_options() -> None:
    c = cfg().validate()
    assert c.algorithm_spec("unet") == AlgorithmSpec("lora", False, {"tucker": False, "factor": -1})
    c = cfg(unet_algorithm="lokr", te_algorithm="loha", dora=True, conv_tucker=True, lokr_factor=8).validate()
    assert c.algorithm_spec("unet") == AlgorithmSpec("lokr", True, {"tucker": True, "factor": 8})
    assert c.algorithm_spec("te").name == "loha"
    assert TrainConfig.from_dict({"unet_algorithm": "loha", "dora": True}).unet_algorithm == "loha"


@pytest.mark.parametrize("kw, message", [
    ({"unet_algorithm": "glora"}, "unet_algorithm: 'glora' is not one of "),
    ({"te_algorithm": "x"}, "te_algorithm: 'x' is not one of "),
    ({"lokr_factor": 0}, "lokr_factor: 0 is not -1 \\(automatic\\) or a positive size"),
    ({"unet_algorithm": "loha", "lora_dropout": 0.1},
     "lora_dropout: the loha algorithm has no activation dropout"),
    ({"dora": True, "lora_dropout": 0.1}, "lora_dropout: dora has no activation dropout"),
    ({"te_lora": True, "te_algorithm": "lokr", "lora_dropout": 0.1}, "lora_dropout: the lokr algorithm"),
])
def test_bad_algorithm_settings_are_refused_by_name(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(**kw).validate()


def test_dropout_with_plain_lora_and_an_unused_te_algorithm_is_fine() -> None:
    cfg(lora_dropout=0.1, te_algorithm="loha").validate()  # te_lora is off: the TE algorithm is unused
