import pytest

from cotune.config import ConfigError, CoordinatorConfig, PartyConfig, from_dict, load_config


def test_unknown_keys_and_wrong_types_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*modle"):
        from_dict(PartyConfig, {"modle": {}})
    with pytest.raises(ConfigError, match="lora.r: expected int"):
        from_dict(PartyConfig, {"lora": {"r": "eight"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CoordinatorConfig, bad)


def test_party_validation_points_at_missing_files(tmp_path):
    cfg = from_dict(PartyConfig, {"party_id": "c1", "workdir": str(tmp_path), "model": {"path": str(tmp_path)},
                                  "data": {"public": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(ConfigError, match="data.public: file not found"):
        cfg.validate("llm")
    with pytest.raises(ConfigError, match="data.private is required"):
        cfg.validate("slm")
