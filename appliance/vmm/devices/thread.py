"""A device's thread (the console's, the NIC's): it serves its device in guest RAM only
while the vCPU thread is out of its park, so a paused, saving or checkpointing VM sees no
host write into its RAM.

    vCPU thread                               device thread
    -----------                               -------------
    start(), before KVM_RUN  ---------------> leaves its park, calls serve()
    stop(), after KVM_RUN    -- control_fd -> serve() finishes its pending work,
      returns once parked    <---------------   sees stopping(), returns; parked
    close()                  ---------------> quits; joined, control_fd closed

serve() raising parks the thread until the next start() and stops the VM through
on_fault(reason): a ValueError is the guest's fault ("bad NIC ring: ..."), anything else
the VMM's ("VMM error in the NIC thread: ...").  Parked, the thread cannot spin on a ring
the guest broke while the vCPU thread is on its way to stop().
"""

import logging
import os
import threading

_log = logging.getLogger(__name__)


def clear_eventfd(fd: int):
    """Consume an eventfd's count, if any (they are all non-blocking)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class DeviceThread:
    """The park/run/quit life cycle of one device's thread; the device supplies serve()."""

    def __init__(self, name: str, device: str, serve, on_fault):
        self._device = device  # "NIC", "console": names it in fault reasons
        self._serve = serve  # serve(), from this thread: returns once stopping() says so
        self._on_fault = on_fault  # on_fault(reason), from this thread
        self.control_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # stop() or close()
        self._cond = threading.Condition()
        self._run = False
        self._active = False
        self._faulted = False
        self._quit = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # --- from the vCPU thread ------------------------------------------------------------

    def start(self):
        """Let the thread run (the vCPU is about to enter the guest), a faulted one too."""
        with self._cond:
            self._run, self._faulted = True, False
            self._cond.notify_all()

    def stop(self):
        """Ask serve() to return; returns once the thread is parked."""
        with self._cond:
            self._run = False
            os.eventfd_write(self.control_fd, 1)
            while self._active:
                self._cond.wait()

    def close(self):
        with self._cond:
            self._quit, self._run = True, False
            os.eventfd_write(self.control_fd, 1)
            self._cond.notify_all()
        self._thread.join()
        os.close(self.control_fd)

    # --- the device thread ---------------------------------------------------------------

    def stopping(self) -> bool:
        """For serve(): stop() or close() asked it to return (consumes control_fd's wake-up)."""
        clear_eventfd(self.control_fd)
        with self._cond:
            return not self._run

    def _main(self):
        while True:
            with self._cond:
                self._active = False
                self._cond.notify_all()
                while not self._quit and (not self._run or self._faulted):
                    self._cond.wait()
                if self._quit:
                    return
                self._active = True
            try:
                self._serve()
            except ValueError as exc:  # the device's word for a guest error
                self._fault(f"bad {self._device} ring: {exc}")
            except Exception as exc:
                _log.exception("%s thread failed", self._device)
                self._fault(f"VMM error in the {self._device} thread: {exc!r}")

    def _fault(self, reason: str):
        with self._cond:
            self._faulted = True
        self._on_fault(reason)
