"""Remote rewards over gRPC: `RewardServer` serves any `RewardFn`; `RemoteReward` is a `RewardFn`
that scores on one (with retries, and failures as typed results).

reward.proto is the wire format. reward_pb2.py and reward_pb2_grpc.py are generated from it and
checked in (grpcio-tools is a dev dependency only); after editing the .proto, regenerate from the
repository root with

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \\
        asyncrl/reward/remote/reward.proto

tests/unit/test_reward_proto.py fails while the checked-in modules differ from that output.
The modules here import grpc, so import this package only when a config selects a remote reward.
"""

from asyncrl.reward.remote.client import RemoteReward, RemoteRewardAuthError
from asyncrl.reward.remote.server import RewardServer

__all__ = ["RemoteReward", "RemoteRewardAuthError", "RewardServer"]
