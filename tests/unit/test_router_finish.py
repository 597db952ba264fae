"""A request whose decode worker failed after sending its last token but before the
finish is finished at the gateway, not migrated (a resumed worker would refuse it)."""

import pytest

from pdserve_proto.v1 import common_pb2
from server.router import finished_by

PARAMS = common_pb2.SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[2])


@pytest.mark.parametrize("sent,max_seq_len,expected", [
    ([7, 8, 9, 10, 11], None, "length"),     # max_tokens reached
    ([7, 8, 2], None, "stop"),               # a stop token after min_tokens
    ([2], None, None),                       # a stop token before min_tokens: not a stop
    ([7, 8], None, None),                    # more to come
    ([7, 8], 12, "length"),                  # prompt 10 + 2 fills the context
    ([7, 8], 13, None),
])
def test_finished_by(sent, max_seq_len, expected):
    assert finished_by(sent, PARAMS, 10, max_seq_len) == expected
