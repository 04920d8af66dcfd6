"""Conversions between asyncrl's `Prompt`/`Reward` and the wire messages of reward.proto.

Kept apart from the server and the client so that both read and write the same format. A result
without a status (a default message) decodes as a failure: a missing field is never a reward of 0.
A reward's own failure keeps its status and reason unchanged, so remote scoring equals local.
"""

from __future__ import annotations

import json
import math

from asyncrl.reward.remote import reward_pb2 as pb
from asyncrl.types import Prompt, Reward, RewardStatus

_TO_WIRE = {
    RewardStatus.OK: pb.REWARD_STATUS_OK,
    RewardStatus.FAILED: pb.REWARD_STATUS_FAILED,
    RewardStatus.TIMEOUT: pb.REWARD_STATUS_TIMEOUT,
}
_FROM_WIRE = {wire: status for status, wire in _TO_WIRE.items()}


def prompt_to_wire(prompt: Prompt) -> pb.Prompt:
    """Raises TypeError when the metadata is not JSON-serialisable."""
    msg = pb.Prompt(prompt_id=prompt.prompt_id, text=prompt.text, input_ids=prompt.input_ids,
                    metadata_json=json.dumps(prompt.metadata) if prompt.metadata else "")
    if prompt.answer is not None:
        msg.answer = prompt.answer
    return msg


def prompt_from_wire(msg: pb.Prompt) -> Prompt:
    """Raises ValueError when `metadata_json` is not a JSON object."""
    metadata = json.loads(msg.metadata_json) if msg.metadata_json else {}
    if not isinstance(metadata, dict):
        raise ValueError(f"prompt {msg.prompt_id!r}: metadata_json is not a JSON object")
    return Prompt(prompt_id=msg.prompt_id, text=msg.text, input_ids=list(msg.input_ids),
                  answer=msg.answer if msg.HasField("answer") else None, metadata=metadata)


def reward_to_wire(reward: Reward) -> pb.ScoreResult:
    msg = pb.ScoreResult(value=reward.value, status=_TO_WIRE[reward.status],
                         error=reward.error or "")
    if reward.correct is not None:
        msg.correct = reward.correct
    return msg


def reward_from_wire(msg: pb.ScoreResult, address: str) -> Reward:
    status = _FROM_WIRE.get(msg.status)
    if status is None:
        return Reward.failed(f"remote {address}: result carries no status (status={msg.status})")
    if status is not RewardStatus.OK:  # the reward's own failure, passed on as it was reported
        return Reward.failed(msg.error or f"remote {address}: failed without a reason", status)
    if not math.isfinite(msg.value):
        return Reward.failed(f"remote {address}: OK result with a non-finite value {msg.value}")
    return Reward(value=msg.value, correct=msg.correct if msg.HasField("correct") else None)
