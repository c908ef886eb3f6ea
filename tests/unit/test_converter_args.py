"""The converters' command lines come from their settings dataclasses (config.cli): the flags of
before map onto the same values, mistakes are reported at once naming the flag, --help shows the
field docs."""

from __future__ import annotations

import importlib.util
import typing
from pathlib import Path

import pytest

from megatron_sft.config import ConfigError, field_docs
from megatron_sft.config.cli import settings_from_args, settings_parser
from megatron_sft.conversion.convert import DTYPES, DtypeName
from megatron_sft.conversion.dist_io import LAYER_LAYOUTS
from megatron_sft.conversion.settings import HFToMegatronSettings, MegatronToHFSettings

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _settings(cls, argv):
    return settings_from_args(cls, settings_parser(cls, "test").parse_args(argv))


def test_hf_to_megatron_flags_of_before():
    s = _settings(HFToMegatronSettings, ["--hf", "Qwen/Qwen2.5-0.5B", "--out", "ckpt/q", "--tp", "2", "--pp", "4",
                                         "--dtype", "bf16", "--layer-layout", "stacked", "--no-progress"])
    assert s == HFToMegatronSettings(hf="Qwen/Qwen2.5-0.5B", out="ckpt/q", tp=2, pp=4, dtype="bf16",
                                     layer_layout="stacked", progress=False)
    assert _settings(HFToMegatronSettings, ["--hf", "m", "--out", "o"]) == HFToMegatronSettings(hf="m", out="o")


def test_megatron_to_hf_flags_of_before():
    s = _settings(MegatronToHFSettings, ["--megatron", "runs/a", "--out", "x", "--tokenizer", "org/tok",
                                         "--dtype", "fp32", "--max-shard-gb", "0.5", "--no-progress"])
    assert s == MegatronToHFSettings(megatron="runs/a", out="x", tokenizer="org/tok", dtype="fp32",
                                     max_shard_gb=0.5, progress=False)


def test_mistakes_reported_at_once_naming_the_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("hf: m\nlayers: 3\n")
    with pytest.raises(ConfigError) as err:
        _settings(HFToMegatronSettings, ["--config", str(config), "--tp", "two", "--dtype", "fp64"])
    text = str(err.value)
    assert "layers" in text and str(config) in text
    assert "--tp" in text and "'two'" in text
    assert "--dtype" in text and "fp64" in text
    assert "missing required key 'out'" in text and "pass --out" in text


def test_help_is_the_field_docs(capsys):
    for name, cls in (("convert_hf_to_megatron", HFToMegatronSettings),
                      ("convert_megatron_to_hf", MegatronToHFSettings)):
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for field, doc in field_docs(cls).items():
            assert " ".join(doc.split()) in text, field


def test_the_choices_are_the_converters_own():
    assert typing.get_args(DtypeName) == tuple(DTYPES)
    hints = typing.get_type_hints(HFToMegatronSettings)
    assert typing.get_args(hints["layer_layout"]) == LAYER_LAYOUTS
    assert typing.get_args(typing.get_args(hints["dtype"])[0]) == tuple(DTYPES)
