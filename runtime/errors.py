"""The one exception family users see: a single clear line, never a traceback."""


class ScopsError(Exception):
    """Base of every error scops reports to a user (CLI: one line, exit code 2)."""


class BundleError(ScopsError):
    """A bundle that is missing, malformed, tampered with or inconsistent."""


class InputError(ScopsError):
    """A media input that cannot be used (corrupt, empty, too large, wrong kind)."""


class PromptTooLong(ScopsError):
    """The conversation does not fit the context window."""


class UnsupportedModality(ScopsError):
    """The request names a modality this bundle does not serve."""


class OptionError(ScopsError):
    """A request option that is unknown or out of range."""


class ExportError(ScopsError):
    """An export that cannot proceed: a missing or malformed source file, an unsupported
    model, a failed parity check. Always names the file or stage at fault."""


class SlotsBusy(ScopsError):
    """Every LLM sequence stayed busy with a reply for as long as a borrower would wait."""
