"""Limits of the wire contract that every side enforces: the gateway before it sends,
the workers when they receive, the engine when it samples. Hand-written beside the
generated stubs (proto/generate.py leaves this file alone) so that each limit has one
source; it imports nothing, so the engine and the gateway may both read it."""

# The largest gRPC message either side sends or accepts. Big enough for the largest KV
# chunk with room to spare, and never raised further: KV always travels as a stream of
# chunks of at most DEFAULT_KV_CHUNK_BYTES.
MAX_MESSAGE_BYTES = 8 << 20
# gRPC channel and server options that apply MAX_MESSAGE_BYTES both ways.
MESSAGE_SIZE_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
# Largest KV chunk a prefill worker sends by default. gRPC's default message limit is
# 4 MiB; staying well under it lets chunks of many streams interleave.
DEFAULT_KV_CHUNK_BYTES = 1 << 20
# Most top-N alternatives a request may ask for beside each token's logprob (OpenAI's
# own limit for top_logprobs).
MAX_LOGPROBS = 20
# The largest logit bias, either sign (OpenAI's range).
MAX_LOGIT_BIAS = 100
