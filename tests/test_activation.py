"""Pure checks of the activation pipeline: which external delegate libraries a bundle may name."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_agent.activation import check_delegates
from edge_agent.errors import BundleError


def manifest(*delegates: str) -> SimpleNamespace:
    return SimpleNamespace(runtime={"engine": "litert", "delegates": list(delegates)})


def test_installed_libraries_and_builtin_delegates_pass(tmp_path: Path) -> None:
    check_delegates(manifest("xnnpack", "edgetpu", "external:/usr/lib/libmydelegate.so"), [tmp_path / "state"])
    check_delegates(SimpleNamespace(runtime={}), [tmp_path])


@pytest.mark.parametrize("where", ["state", "inbox"])
def test_a_library_where_bundles_are_written_is_refused(tmp_path: Path, where: str) -> None:
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    lib = (state if where == "state" else inbox) / "models" / "evil-1.0.0" / "payload.so"
    with pytest.raises(BundleError) as e:
        check_delegates(manifest(f"external:{lib}"), [state, inbox])
    assert e.value.reason == "unsafe_delegate" and str(lib) in e.value.message


def test_links_and_relative_paths_do_not_get_round_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "x.so").write_bytes(b"\x7fELF")
    link = tmp_path / "usr-lib-looking.so"
    os.symlink(state / "models" / "x.so", link)
    for spec in (f"external:{link}", "external:models/x.so", "external:../state/models/x.so"):
        with pytest.raises(BundleError) as e:
            check_delegates(manifest(spec), [state])
        assert e.value.reason == "unsafe_delegate", spec
