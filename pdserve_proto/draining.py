"""How a draining worker refuses new work, on the wire: UNAVAILABLE with this trailing
metadata. The gateway reads it to tell "this worker is shutting down, try another and
leave what runs there alone" from "this worker is gone", which moves every stream it
served elsewhere. Hand-written beside the generated stubs; it imports nothing."""

DRAINING_KEY = "pdserve-draining"
DRAINING_METADATA = ((DRAINING_KEY, "1"),)


def is_draining(trailing_metadata) -> bool:
    """Whether a failed call's trailing metadata says the worker was draining."""
    return any(key == DRAINING_KEY for key, _ in trailing_metadata or ())
