"""Results resume across code changes that cannot change their outcome, and only those (eval/code_identity.py,
eval/fingerprint.py): a change to the code of a strategy, backbone or env in use is refused by name; any other
code change resumes with a warning and run.json keeps every build the results were made under."""

import importlib
import json
import sys

import pytest
from test_cli import vlacache_in_process
from test_runner import lines

from vlacache.eval.code_identity import code_build, module_digest, room_closure
from vlacache.registry import BACKBONES, ENVS, STRATEGIES

QUICK = ["max_steps=2", "--quiet"]


def test_a_backbone_counts_the_modules_of_its_room_it_builds_on_and_nothing_else():
    oft = room_closure(BACKBONES.get("openvla-oft").__module__)
    assert "vlacache.backbones.openvla_oft.backbone" in oft and "vlacache.backbones.openvla_oft.heads" in oft
    assert "vlacache.backbones.common.vlm" in oft  # OFT builds on the shared VLM: it decides OFT's outcomes
    assert not any(m.startswith(("vlacache.backbones.cogact", "vlacache.backbones.openvla.")) for m in oft)
    assert all(m.startswith("vlacache.backbones.") for m in oft) and "vlacache.backbones" not in oft
    assert room_closure(STRATEGIES["selector"].get("pixel-cosine").__module__) == ["vlacache.strategies.selectors"]
    assert room_closure(ENVS.get("libero").__module__) == ["vlacache.envs.libero"]
    # the learned selector builds on the selectors module
    assert room_closure(STRATEGIES["selector"].get("learned").__module__) == ["vlacache.strategies.learned",
                                                                        "vlacache.strategies.selectors"]


def test_the_digest_ignores_comments_docstrings_and_layout_but_not_code(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = tmp_path / "digestpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def f(x):\n    return x + 1\n")
    (pkg / "main.py").write_text("from .helper import f\n\nclass A:\n    def g(self):\n        return f(2)\n")
    importlib.invalidate_caches()
    assert room_closure("digestpkg.main", "digestpkg") == ["digestpkg.helper", "digestpkg.main"]
    before = module_digest(room_closure("digestpkg.main", "digestpkg"))
    (pkg / "main.py").write_text('"""Docs."""\n# a comment\nfrom .helper import f\n\n\nclass A:\n    """More."""\n\n'
                                 '    def g(self):  # why\n        return f(  2 )\n')
    assert module_digest(room_closure("digestpkg.main", "digestpkg")) == before
    (pkg / "helper.py").write_text("def f(x):\n    return x + 2\n")  # an imported module's code counts
    assert module_digest(room_closure("digestpkg.main", "digestpkg")) != before


USER_SELECTOR = '''
from vlacache import register_strategy
from vlacache.strategies.selectors import PixelCosineSelector


@register_strategy("selector", "test-user-static")
class UserStatic(PixelCosineSelector):
    """A user's selector, defined outside the package."""
'''
USER_POLICY = ("policies=[{label: mine, selector: {name: test-user-static, tau: 0.99}, relevance: {name: none}, "
               "scheduler: {name: constant, fraction: 1.0}}]")


def test_a_change_to_the_code_of_a_strategy_in_use_is_refused_and_a_docstring_is_not(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "user_static_selector.py"
    source.write_text(USER_SELECTOR)
    importlib.invalidate_caches()
    module = importlib.import_module("user_static_selector")
    out = tmp_path / "run"
    try:
        first = vlacache_in_process(capsys, "run", "tiny_replay", USER_POLICY, *QUICK, f"output_dir={out}")
        assert first.returncode == 0, first.stderr
        recorded = lines(out / "episodes.jsonl")

        source.write_text(USER_SELECTOR.replace("outside the package.", "outside the package, documented."))
        importlib.reload(module)
        same = vlacache_in_process(capsys, "run", "tiny_replay", USER_POLICY, *QUICK, f"output_dir={out}")
        assert same.returncode == 0 and "warning" not in same.stderr, same.stderr

        source.write_text(USER_SELECTOR + "\n    def select(self, ctx):\n        return super().select(ctx)\n")
        importlib.reload(module)
        changed = vlacache_in_process(capsys, "run", "tiny_replay", USER_POLICY, *QUICK, f"output_dir={out}")
        assert changed.returncode == 2
        assert "policy 'mine' changed code.strategies" in changed.stderr and "--restart" in changed.stderr
        assert lines(out / "episodes.jsonl") == recorded  # nothing touched
    finally:
        sys.modules.pop("user_static_selector", None)


def _rewrite(path, edit):
    manifest = json.loads(path.read_text())
    for entry in manifest["policies"].values():
        edit(entry)
    path.write_text(json.dumps(manifest))


def test_other_code_resumes_with_a_warning_and_run_json_keeps_both_builds(tmp_path, capsys):
    out = tmp_path / "run"
    first = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache,static_reuse]", *QUICK, f"output_dir={out}")
    assert first.returncode == 0, first.stderr
    recorded = lines(out / "episodes.jsonl")
    entry = json.loads((out / "run.json").read_text())["policies"]["static-reuse"]
    build = code_build()
    assert [{k: b[k] for k in build} for b in entry["builds"]] == [build]
    assert entry["fingerprint"]["code"]["strategies"] and entry["fingerprint"]["code"]["backbone"]

    # the same results, recorded by another build: another commit whose engine or runner differed
    older = {"vlacache": "0.0.9", "source_sha256": "0" * 64, "commit": "a" * 40, "dirty": False, "since": "2026-01-01 00:00:00"}
    _rewrite(out / "run.json", lambda e: e.__setitem__("builds", [older]))
    resumed = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache,static_reuse,vla_cache]", *QUICK,
                                  f"output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    warning = [x for x in resumed.stderr.splitlines() if "warning: resuming" in x]
    assert len(warning) == 1 and "aaaaaaaaaaaa ->" in warning[0] and "no-cache, static-reuse" in warning[0]
    after = lines(out / "episodes.jsonl")
    assert after[: len(recorded)] == recorded and {r["policy"] for r in after[len(recorded):]} == {"vla-cache"}
    policies = json.loads((out / "run.json").read_text())["policies"]
    assert [b["commit"] for b in policies["static-reuse"]["builds"]] == ["a" * 40, build["commit"]]
    assert len(policies["vla-cache"]["builds"]) == 1  # a new row: only the build that made it

    # the recorded backbone code differs: what decides outcomes changed, refused by name
    _rewrite(out / "run.json", lambda e: e["fingerprint"]["code"].__setitem__("backbone", "f" * 64))
    refused = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache]", *QUICK, f"output_dir={out}")
    assert refused.returncode == 2 and "policy 'no-cache' changed code.backbone" in refused.stderr


@pytest.mark.parametrize("same_code", [True, False])
def test_results_fingerprinted_with_the_whole_source_resume_only_under_that_source(tmp_path, capsys, same_code):
    out = tmp_path / "run"
    assert vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache]", *QUICK, f"output_dir={out}").returncode == 0
    whole = code_build()["source_sha256"] if same_code else "1" * 64

    def legacy(entry):  # run.json as vlacache wrote it before the code was told apart
        entry["fingerprint"]["code"] = {"vlacache": "0.1.0", "source_sha256": whole}
        del entry["builds"]

    _rewrite(out / "run.json", legacy)
    again = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache]", *QUICK, f"output_dir={out}")
    if same_code:
        assert again.returncode == 0, again.stderr
        entry = json.loads((out / "run.json").read_text())["policies"]["no-cache"]
        assert set(entry["fingerprint"]["code"]) == {"backbone", "env", "strategies"}  # upgraded in place
        assert entry["builds"][0]["source_sha256"] == whole
    else:
        assert again.returncode == 2 and "fingerprinted as a whole" in again.stderr



def test_a_code_change_that_reproduces_a_recorded_episode_may_resume(tmp_path, capsys):
    """`--verify-code-change`: the changed rows' first episodes run again under the new code, with their recorded
    thread count; the run resumes only when they come out the same, and run.json keeps the evidence."""
    out = tmp_path / "run"
    policies = "policies=[no_cache,static_reuse]"
    assert vlacache_in_process(capsys, "run", "tiny_replay", policies, *QUICK, f"output_dir={out}").returncode == 0
    recorded = lines(out / "episodes.jsonl")
    refactored = lambda e: e["fingerprint"]["code"].__setitem__("backbone", "f" * 64)  # noqa: E731
    _rewrite(out / "run.json", refactored)  # the results were made before a backbone refactor

    refused = vlacache_in_process(capsys, "run", "tiny_replay", policies, *QUICK, f"output_dir={out}")
    assert refused.returncode == 2 and "code.backbone" in refused.stderr and "--verify-code-change" in refused.stderr

    verified = vlacache_in_process(capsys, "run", "tiny_replay", policies, *QUICK, "--verify-code-change",
                                   f"output_dir={out}")
    assert verified.returncode == 0, verified.stderr
    assert "reproduced" in verified.stderr and lines(out / "episodes.jsonl") == recorded  # nothing re-recorded
    for entry in json.loads((out / "run.json").read_text())["policies"].values():
        evidence = entry["builds"][-1]["verified"]
        assert evidence["differ"] == {} and evidence["episode"] and evidence["torch_threads"] >= 1
        assert entry["fingerprint"]["code"]["backbone"] != "f" * 64  # the new code's identity is recorded

    # a refactor that changed what the policy does: its episode comes out otherwise, and the resume is refused
    _rewrite(out / "run.json", refactored)
    tampered = [dict(r, reuse_ratio=0.5) if r["policy"] == "static-reuse" else r for r in recorded]
    (out / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tampered))
    changed = vlacache_in_process(capsys, "run", "tiny_replay", policies, *QUICK, "--verify-code-change",
                                  f"output_dir={out}")
    assert changed.returncode == 2
    assert "'static-reuse'" in changed.stderr and "reuse_ratio" in changed.stderr and "'no-cache'" not in changed.stderr
