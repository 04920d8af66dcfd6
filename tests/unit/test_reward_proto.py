"""The remote reward's wire format: the checked-in stubs match reward.proto, and Prompt / Reward
survive the trip through the messages, failures included (never read as 0)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import asyncrl
from asyncrl.reward.remote import reward_pb2 as pb
from asyncrl.reward.remote._codec import (
    prompt_from_wire,
    prompt_to_wire,
    reward_from_wire,
    reward_to_wire,
)
from asyncrl.types import Prompt, Reward, RewardStatus

ROOT = Path(asyncrl.__file__).parent.parent
PROTO = "asyncrl/reward/remote/reward.proto"
GENERATED = ("asyncrl/reward/remote/reward_pb2.py", "asyncrl/reward/remote/reward_pb2_grpc.py")


def test_checked_in_stubs_equal_a_fresh_regeneration_from_the_proto(tmp_path):
    # The command in reward.proto's header, pointed at a temp dir: a .proto edit without
    # regenerating (or a hand edit of the stubs) fails here.
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates stubs")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO],
                   cwd=ROOT, check=True, capture_output=True)
    for rel in GENERATED:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), (
            f"{rel} differs from the output of grpc_tools.protoc; regenerate it with the command "
            f"at the top of {PROTO}")


def test_the_documented_regenerate_command_is_the_one_tested():
    header = (ROOT / PROTO).read_text()
    assert ("python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \\\n"
            f"//       {PROTO}") in header


def test_a_prompt_round_trips_with_none_answer_distinct_from_empty_and_its_metadata():
    full = Prompt("p7", "sort 312", [5, 6, 7], answer="", metadata={"level": 2, "tags": ["a"]})
    bare = Prompt("p8", "x", [], answer=None)
    assert prompt_from_wire(pb.Prompt.FromString(prompt_to_wire(full).SerializeToString())) == full
    assert prompt_from_wire(pb.Prompt.FromString(prompt_to_wire(bare).SerializeToString())) == bare


def test_metadata_that_is_not_a_json_object_is_refused():
    with pytest.raises(ValueError, match="not a JSON object"):
        prompt_from_wire(pb.Prompt(prompt_id="p", metadata_json="[1, 2]"))
    with pytest.raises(TypeError):
        prompt_to_wire(Prompt("p", "x", [], metadata={"f": object()}))


@pytest.mark.parametrize("reward", [
    Reward(0.75),
    Reward(1.0, correct=True),
    Reward(0.0, correct=False),
    Reward.failed("error: ValueError: bad answer"),
    Reward.failed("timeout: no reward within 2s", RewardStatus.TIMEOUT),
], ids=["ok", "correct", "incorrect", "failed", "timeout"])
def test_a_reward_round_trips_with_its_status_reason_and_correctness(reward):
    back = reward_from_wire(pb.ScoreResult.FromString(reward_to_wire(reward).SerializeToString()),
                            "host:1")
    assert (back.status, back.error, back.correct) == (reward.status, reward.error, reward.correct)
    assert back.value == reward.value or (math.isnan(back.value) and math.isnan(reward.value))


def test_a_result_without_a_status_is_a_failure_not_a_zero():
    # An empty message decodes to value 0.0 with status UNSPECIFIED: it must not count as 0.
    reward = reward_from_wire(pb.ScoreResult(), "host:1")
    assert reward.status is RewardStatus.FAILED and math.isnan(reward.value)
    assert "no status" in reward.error
