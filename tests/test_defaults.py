"""One default per setting: a daemon setting that configures a library object starts
from that object's own default, so the library, the daemons and their docs cannot drift."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from daemons.node import NodeSettings
from daemons.sidecar import SidecarSettings
from daemons.tracker import TokenGate, TrackerSettings
from p2pimage.auth.tokens import DEFAULT_LEEWAY_S, TokenIssuer
from p2pimage.mirror.blobs import LayerSettings
from p2pimage.sidecar.client import JwksSource, TokenKeeper
from p2pimage.sidecar.indexer import IndexerSettings, RetryPolicy
from p2pimage.tracker import PolicyConfig


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


@pytest.mark.parametrize(
    ("model", "library", "at_least"),
    [
        (TrackerSettings, PolicyConfig, 11),
        (SidecarSettings, IndexerSettings, 5),
        (NodeSettings, LayerSettings, 3),
    ],
)
def test_daemon_settings_start_from_the_library_defaults(
    model: type[BaseModel], library: type[Any], at_least: int
) -> None:
    shared = [f.name for f in dataclasses.fields(library) if f.name in model.model_fields]
    assert len(shared) >= at_least, shared
    ours = {name: _default(model, name) for name in shared}
    assert ours == {name: getattr(library(), name) for name in shared}


def test_built_library_objects_equal_the_library_defaults() -> None:
    assert TrackerSettings().policy_config() == PolicyConfig()
    assert SidecarSettings().indexer_settings() == IndexerSettings()


def test_token_and_key_defaults_have_one_source() -> None:
    sidecar = SidecarSettings()
    retry = RetryPolicy()
    assert (sidecar.retry_initial_s, sidecar.retry_max_s) == (retry.initial_s, retry.max_s)
    issuer_defaults = TokenIssuer.__init__.__kwdefaults__ or {}
    assert sidecar.token_lifetime_s == issuer_defaults["lifetime_s"]
    keeper_defaults = TokenKeeper.__init__.__kwdefaults__ or {}
    jwks_defaults = JwksSource.__init__.__kwdefaults__ or {}
    tracker = TrackerSettings()
    assert tracker.jwks_refresh_s == keeper_defaults["jwks_refresh_s"]
    assert tracker.jwks_refresh_s == jwks_defaults["refresh_s"]
    assert tracker.jwks_min_refresh_s == jwks_defaults["min_refresh_s"]
    assert TokenGate.__dataclass_fields__["leeway_s"].default == DEFAULT_LEEWAY_S
