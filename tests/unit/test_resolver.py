"""``pathsafety.Resolver`` resolves many paths with one ``lstat`` each (a directory
once): it must say exactly what ``os.path.realpath`` says, for every kind of path a
targets file or an SNI table can name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailtls_tasks.core.pathsafety import Resolver, unsafe_component


def _tree(root: Path) -> list[str]:
    (root / "archive" / "a").mkdir(parents=True)
    (root / "archive" / "a" / "privkey3.pem").write_text("k")
    (root / "archive" / "a" / "cert3.pem").write_text("c")
    (root / "live" / "a").mkdir(parents=True)
    (root / "live" / "a" / "privkey.pem").symlink_to("../../archive/a/privkey3.pem")  # certbot's relative links
    (root / "live" / "a" / "cert.pem").symlink_to(root / "archive" / "a" / "cert3.pem")
    (root / "live" / "a" / "dangling.pem").symlink_to("nowhere.pem")
    (root / "linked").symlink_to("live/a")  # a directory link on the way
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "plain.pem").write_text("p")
    paths = []
    for d in ("live/a", "linked", "archive/a", ".", "archive/a/../a", "missing-dir"):
        for f in ("privkey.pem", "cert.pem", "dangling.pem", "privkey3.pem", "plain.pem", "none.pem"):
            paths.append(str(root / d / f))
    return [*paths, str(root / "loop1"), str(root / "linked"), str(root), "/", str(root / "live" / "a") + "/"]


def test_it_says_what_realpath_says(tmp_path: Path) -> None:
    paths = _tree(tmp_path)
    r = Resolver()
    for p in paths * 2:  # the second round answers from what the first learnt
        assert r.realpath(p) == os.path.realpath(p), p


def test_a_relative_path_is_taken_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path / "live")
    assert Resolver().realpath("a/privkey.pem") == str(tmp_path / "archive" / "a" / "privkey3.pem")


def test_unsafe_component_with_a_shared_resolver_finds_what_it_finds_alone(tmp_path: Path) -> None:
    paths = _tree(tmp_path)
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    paths += [str(tmp_path / "open" / "key.pem"), str(tmp_path / "open")]
    r = Resolver()
    alone = [unsafe_component(p) for p in paths]
    shared = [unsafe_component(p, resolver=r) for p in paths]
    assert shared == alone
    assert any(why and "writable by others" in why for why in alone)  # the check has something to find
