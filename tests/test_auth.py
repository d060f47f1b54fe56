"""API keys: the bearer check every transport shares, and the key file format.

The interceptor and mutual TLS are tested end to end against `pe-rank serve` in test_server.py.
"""
from __future__ import annotations

import pytest

from pe_rank.service.auth import ApiKeys, AuthConfigError, bearer_token, is_open


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# ops team\nk-alpha-123\n\n  k-beta-456  \n")
    return ApiKeys.from_file(path)


def test_the_right_key_of_any_listed_is_accepted(keys):
    assert len(keys) == 2
    assert keys.check_bearer("Bearer k-alpha-123")
    assert keys.check_bearer("Bearer k-beta-456")
    assert keys.check_bearer("bearer k-beta-456")  # the scheme is case-insensitive (RFC 7235)


@pytest.mark.parametrize("value", [None, "", "Bearer", "Bearer ", "k-alpha-123", "Basic k-alpha-123",
                                   "Bearer k-alpha-12", "Bearer k-alpha-1234", "Bearer K-ALPHA-123",
                                   "Bearer # ops team", "Bearer k-alpha-123 k-beta-456"])
def test_anything_else_is_refused(keys, value):
    assert not keys.check_bearer(value)


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("  BEARER   abc  ") == "abc"
    assert bearer_token("Token abc") is None


def test_health_and_reflection_are_open_the_ranker_is_not():
    assert is_open("/grpc.health.v1.Health/Check") and is_open("/grpc.health.v1.Health/Watch")
    assert is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert is_open("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not is_open("/pe_rank.v1.Ranker/Rerank") and not is_open("/pe_rank.v1.Ranker/GetModelInfo")
    assert not is_open("/grpc.health.v1.HealthX/Check")


def test_unusable_key_files_are_clear_errors(tmp_path):
    with pytest.raises(AuthConfigError, match="no such file|No such file"):
        ApiKeys.from_file(tmp_path / "missing")
    (tmp_path / "empty").write_text("# only a comment\n\n")
    with pytest.raises(AuthConfigError, match="holds no API key"):
        ApiKeys.from_file(tmp_path / "empty")
    (tmp_path / "spaces").write_text("two words\n")
    with pytest.raises(AuthConfigError, match="one non-empty word"):
        ApiKeys.from_file(tmp_path / "spaces")
