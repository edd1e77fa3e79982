"""Model loading (models/loading.py): tokenizers that differ are a clear error."""

from __future__ import annotations

import pytest

from rlhf_pipeline.models.loading import assert_same_tokenizer


def test_tokenizer_mismatch_is_a_clear_error(tokenizer):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<new-token>"])
    with pytest.raises(ValueError, match="must share a tokenizer"):
        assert_same_tokenizer(tokenizer, other)
