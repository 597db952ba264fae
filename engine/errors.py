"""Errors the engine raises for bad requests, each naming the field at fault."""


class InvalidRequestError(ValueError):
    """A request the engine refuses; `field` names the offending input.

    The gateway maps this to HTTP 400 and the workers to gRPC INVALID_ARGUMENT,
    so the message must make sense to an API user on its own.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnsupportedModelError(ValueError):
    """A model folder whose architecture the engine does not implement."""
