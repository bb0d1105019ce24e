"""The planning code gives exactly the plans recorded before it was rewritten (vectorised, fewer host syncs): every
shipped reuse policy, on the embedded LIBERO episode, one episode alone and two as one batch."""

import json

import pytest

from tests.plan_fixture import CASES, FIXTURE, record

RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("backbone,policy", [(b, p) for b, policies in CASES.items() for p in policies])
def test_plans_equal_the_recorded_ones(backbone, policy):
    for batch in (1, 2):
        key = f"{backbone}/{policy}/batch{batch}"
        now, before = record(backbone, policy, batch), RECORDED[key]
        assert len(now) == len(before)
        for step, (a, b) in enumerate(zip(now, before)):
            assert a == b, (f"{key}: the plan of step {step} differs from the recorded one (if that change is "
                            "intended, rewrite the fixture: python -m tests.plan_fixture)")
        assert sum(len(r[0]) for s in now for r in s["reused"]) > 0  # the case reuses something
