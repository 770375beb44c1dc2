"""Fixtures the model-runtime unit tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok(request):
    """The real tokenizer a tiny-model test module builds on: the module's TOKENIZER path, else
    tests.unit.lm_fixtures.TOKENIZER (modules using it carry the needs_tokenizer mark)."""
    from cotune.align.tokenizers import load_tokenizer
    from tests.unit import lm_fixtures

    return load_tokenizer(getattr(request.module, "TOKENIZER", lm_fixtures.TOKENIZER))
