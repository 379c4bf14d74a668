"""Error classes. Every error a user can cause names its cause and its fix in one line."""


class KVCommError(Exception):
    """Base class of every error kvcomm raises on purpose (the CLI prints these without a traceback)."""


class ModelLoadError(KVCommError):
    """A model could not be found or loaded."""


class MessageError(KVCommError):
    """A KV message was refused. Subclasses say why."""


class CorruptMessageError(MessageError):
    """Truncated, malformed or otherwise unreadable message file."""


class UnsupportedVersionError(MessageError):
    """The message was written in a format version this kvcomm does not read."""


class IncompatibleModelError(MessageError):
    """The message was produced by a model whose KV cannot be mixed into the receiver's."""


class ShapeMismatchError(MessageError):
    """Tensor shapes or dtypes disagree with the message's own metadata or the receiver model."""


class NonFiniteError(MessageError):
    """The message holds NaN or Inf values."""


class OversizeMessageError(MessageError):
    """The message is larger than the receiver accepts."""


class DataError(KVCommError):
    """A user data file (JSONL, template, ranking) is malformed."""
