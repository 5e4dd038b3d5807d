"""The error every QMP command raises: one QEMU error class and a human message."""


class QMPError(Exception):
    """An error reply: ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_reply(self) -> dict:
        return {"class": self.error_class, "desc": self.desc}
