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


class LoraError(InvalidRequestError):
    """A LoRA adapter folder pdserve cannot serve: missing, unreadable, corrupt or of a
    kind it does not support. The message names the file (and field) at fault."""

    def __init__(self, message: str):
        super().__init__("lora", message)


class UnknownLoraError(InvalidRequestError):
    """A request or an unload names a LoRA adapter that is not registered (the workers
    answer NOT_FOUND, the gateway 404)."""

    def __init__(self, name: str, known=()):
        listed = ", ".join(sorted(known)) or "none"
        super().__init__("lora", f"no LoRA adapter named {name!r} (registered: {listed})")
        self.name = name
