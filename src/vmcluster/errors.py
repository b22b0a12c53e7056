"""The exception tree of vmcluster.

Every error a user may see derives from :class:`VmclusterError`; its message is one line that names
the thing and the problem (and, where there is one, the fix). Root causes are chained with ``from``.

    VmclusterError
    +-- InvalidInput        bad names, sizes, specs: the user can correct the command
    +-- NotFound            an unknown VM, image or other named thing
    +-- AlreadyExists       a name that is taken
    +-- InvalidState        the thing exists but cannot do that now (start a running VM, ...)
    +-- MissingDependency   a program or image that must be installed or built first
    +-- HypervisorError     QEMU failed to start, answer or stop
    +-- ImageBuildError     the guest image could not be built
    +-- ArrayUnavailable    an array's service answers on none of its paths (retryable)
        +-- NotReachedHere  no answer from it here, and nothing done: another node may reach it

Programmer errors are not in this tree: they are assertions and crash.
"""


class VmclusterError(Exception):
    """Root of every error vmcluster reports to a user."""

    exit_code = 1


class InvalidInput(VmclusterError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    exit_code = 2


class NotFound(VmclusterError):
    """A named thing does not exist."""

    exit_code = 3


class AlreadyExists(VmclusterError):
    """A name is already in use."""

    exit_code = 4


class InvalidState(VmclusterError):
    """The thing exists but is in a state that does not allow the request."""

    exit_code = 5


class MissingDependency(VmclusterError):
    """A program, package or image that vmcluster needs is not there."""

    exit_code = 6


class HypervisorError(VmclusterError):
    """QEMU failed: it did not start, did not answer, or did not stop."""


class ImageBuildError(VmclusterError):
    """The guest image could not be built."""


class ArrayUnavailable(VmclusterError):
    """An array did not answer: its service on none of its paths, or its daemon to the service.

    Retryable: the same request may succeed later. Whether a request that timed out was carried
    out is unknown; every array operation is safe to repeat (vmcluster.arrays.driver).
    """

    exit_code = 7


class NotReachedHere(ArrayUnavailable):
    """This node got no answer from an array, so it did not carry out a request that needs that
    array, and changed nothing: another node may reach it (the API answers 421 and the client
    asks the next agent)."""


class NoCoordinator(VmclusterError):
    """No coordinator took a shared volume's operation in time: nothing was done; it may be
    tried again later (when a node that reaches the volume's array is up)."""

    exit_code = 7
