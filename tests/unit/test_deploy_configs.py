"""The example configs in deploy/ are valid Cotune configs and take the secure path (TLS files, no plaintext)."""

from pathlib import Path

import pytest

from cotune.config import AlignmentConfig, CoordinatorConfig, PartyConfig, from_dict, load_yaml, validate_security

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVICES = {"coordinator.yaml": CoordinatorConfig, "llm.yaml": PartyConfig, "client.yaml": PartyConfig,
            "alignment.yaml": AlignmentConfig}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_example_service_configs_parse_and_require_tls(name):
    cfg = from_dict(SERVICES[name], load_yaml(DEPLOY / name), name)
    validate_security(cfg, name)
    assert cfg.tls.ca and cfg.tls.cert and cfg.tls.key and not cfg.insecure


def test_a_config_without_tls_or_insecure_is_refused_with_the_remedy():
    from cotune.config import ConfigError

    cfg = from_dict(AlignmentConfig, {"workdir": "/tmp/x"})
    with pytest.raises(ConfigError, match="cotune certs.*insecure: true"):
        validate_security(cfg, "alignment")
    cfg.tls.ca = "ca.crt"
    with pytest.raises(ConfigError, match="ca, cert and key together"):
        validate_security(cfg, "alignment")
