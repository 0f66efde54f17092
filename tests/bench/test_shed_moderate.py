"""bench.shed_moderate end to end, briefly: a light priority-mix load on a launched engine
with the default latency guard is served whole (the guard holds only under load)."""

from __future__ import annotations

import json

import pytest

from bench.shed_moderate import main


@pytest.mark.timeout(300)
def test_a_light_priority_mix_is_served_whole(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--factors", "1.5", "--duration", "4", "--rate", "2"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    run = json.loads(line)
    assert run["factor"] == 1.5
    for name in ("critical", "sheddable"):
        assert run[name]["requests"] > 0
        assert run[name]["refused"] == 0
        assert run[name]["ttft_p50_ms"] > 0
