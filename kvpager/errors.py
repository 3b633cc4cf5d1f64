"""Typed errors. Every error kvpager raises for bad input is a KVPagerError subclass whose
message names the bad value and how to fix it."""


class KVPagerError(Exception):
    """Base class of every error kvpager raises on purpose."""


class ConfigError(KVPagerError, ValueError):
    """A configuration value is invalid (CacheConfig, SchedulerConfig, CLI options)."""


class InvalidArgument(KVPagerError, ValueError):
    """A public function got an argument of the wrong dtype, shape, device or value."""


class KernelUnavailable(KVPagerError, RuntimeError):
    """The CUDA kernel was requested explicitly but cannot run here (not built, not Hopper)."""


# --- allocator / sequences -------------------------------------------------------------------
class AllocatorError(KVPagerError):
    """Base class of allocator misuse."""


class OutOfPages(AllocatorError):
    """Not enough free pages. `requested` and `free` carry the counts."""

    def __init__(self, requested: int, free: int, message: str | None = None):
        self.requested = requested
        self.free = free
        super().__init__(
            message
            or f"requested {requested} pages but only {free} are free; free finished sequences, "
            f"preempt, or build the cache with more pages (num_pages / memory budget)"
        )


class DoubleFree(AllocatorError):
    """A page was freed while already free."""


class UnknownPage(AllocatorError):
    """A page id outside [0, num_pages)."""


class RefcountUnderflow(AllocatorError):
    """A page's reference count would go below zero."""


class PageNotAllocated(AllocatorError):
    """incref of a page that is free (only allocated pages can gain references)."""


class StaleHit(AllocatorError):
    """PrefixCache.acquire() of a hit whose pages left the cache after match(); match again."""


class InvariantViolation(AllocatorError):
    """check_invariants() found broken allocator state (a bug, never bad user input)."""


class NoSuchRow(InvalidArgument):
    """A handle that holds no row in the block tables (never joined, or already left)."""


class BatchFull(InvalidArgument):
    """BlockTables.join() with all max_batch rows taken."""


class TablesOutOfSync(KVPagerError):
    """The block tables disagree with the sequences: a grow() no reserve made, or check() found
    a missed event."""


class SequenceTooLong(KVPagerError):
    """A sequence would need more pages than its table row (max_pages) can hold."""


# --- runtime -----------------------------------------------------------------------------------
class RequestError(KVPagerError, ValueError):
    """A request is invalid (empty prompt, bad sampling parameters)."""


class RequestTooLarge(RequestError):
    """prompt + max_new_tokens can never fit in the page pool."""


class DuplicateRequest(RequestError):
    """A request id is already known to the engine."""


class QueueFull(RequestError):
    """The AsyncEngine's waiting queue is at max_waiting: retry later."""


class EngineClosed(KVPagerError, RuntimeError):
    """submit() on an AsyncEngine that is shutting down."""


class EngineDead(KVPagerError, RuntimeError):
    """The AsyncEngine's step loop stopped after an unexpected error; requests cannot run."""


class ReentrantStep(KVPagerError, RuntimeError):
    """Engine.step() (or iterating a handle) from inside a step: an on_token callback must not
    step the engine it is called by."""


class UnknownRequest(KVPagerError, KeyError):
    """A request id the engine has never seen."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
