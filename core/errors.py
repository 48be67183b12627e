"""Errors a user can act on: the CLI and the dashboard print their message, never a traceback."""


class UserFacingError(Exception):
    """Base class: the message alone must tell the user what went wrong and what to do."""


class ImageError(UserFacingError):
    """The file is not an image we can read (corrupt, truncated, too large, wrong type)."""


class NoFaceError(UserFacingError):
    """No face was found where one was expected."""


class ModelError(UserFacingError):
    """A checkpoint or model card is missing, unsafe or does not match its weights."""


class RegionSpecError(UserFacingError):
    """A region specification is malformed (unknown label, unknown region, cyclic anchors)."""
