"""The buffer registry: collective allocation outside jit, integer handles inside it.

A :class:`Buffer` owns one process's share of the symmetric memory of one expert-parallel exchange. Traced code
carries only ``buffer.handle`` (a small int, baked into the HLO as an attribute); the native side resolves it in its
own registry. Buffers are context managers; ``close()`` is collective, idempotent, and also runs at interpreter exit
(in reverse creation order).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import operator
import threading
from collections.abc import Iterable

from jax.sharding import Mesh

from .backends import Backend, open_backend
from .config import BufferConfig, CudaOptions
from .errors import BufferClosedError
from .types import DroppedPairs

log = logging.getLogger("jax_ll_ep")

_lock = threading.Lock()
_open: dict[int, Buffer] = {}  # by handle: what close-at-exit closes
_next_handle = itertools.count(1)


class Buffer:
    """Symmetric communication memory for dispatch/combine over one mesh axis.

    Collective: every process that owns devices of ``mesh`` must construct it, in the same order as its other
    buffers, outside jit. Use it inside ``jax.shard_map`` over ``mesh`` with ``axis_name`` manual.

    Args:
      mesh: the device mesh; ``axis_name`` is its expert-parallel axis. Every slice of the mesh along the other axes
        is an independent group of ``mesh.shape[axis_name]`` ranks.
      axis_name: the expert-parallel mesh axis.
      num_experts: E, divisible by the axis size R.
      max_tokens_per_rank: T, the most tokens any rank passes to one call.
      hidden: H, a multiple of 8 (of 128 for fp8 dispatch).
      backend: ``"auto"`` (cuda on GPUs when the CUDA module and NVSHMEM are installed, cpu on CPUs, else xla),
        ``"cuda"``, ``"cpu"`` or ``"xla"``.
      timeout_s: bound on every wait for peers; a call that runs past it raises ProtocolTimeoutError naming the
        (rank, local expert) pairs whose signals never came.
      on_timeout: ``"raise"`` (a wait past ``timeout_s`` fails the call and leaves the buffer refusing later sends
        until :meth:`mask_ranks`) or ``"mask"`` (the silent ranks are masked and the call completes without them; the
        buffer stays usable, :attr:`masked_ranks` lists them and :meth:`check` raises RanksMaskedError once to
        report it). Native backends only; the xla backend never waits on peers.
      cuda: options of the ``cuda`` backend (:class:`CudaOptions`; other backends ignore them). Default:
        ``CudaOptions()``, whose fields default to the environment (read once per process).

    ``buf.backend`` is the buffer's backend object (``buf.backend.name``: "xla", "cpu" or "cuda"); the ops call it.
    """

    def __init__(
        self,
        mesh: Mesh,
        axis_name: str,
        *,
        num_experts: int,
        max_tokens_per_rank: int,
        hidden: int,
        backend: str = "auto",
        timeout_s: float = 100.0,
        on_timeout: str = "raise",
        cuda: CudaOptions | None = None,
    ):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
        if cuda is not None and not isinstance(cuda, CudaOptions):
            raise TypeError(f"cuda must be None or jax_ll_ep.CudaOptions, got {cuda!r}")
        self.mesh = mesh
        self.config = BufferConfig(
            axis_name=axis_name,
            num_ranks=mesh.shape[axis_name],
            num_experts=num_experts,
            max_tokens_per_rank=max_tokens_per_rank,
            hidden=hidden,
            backend=backend,
            timeout_s=float(timeout_s),
            on_timeout=on_timeout,
        )
        with _lock:
            self.handle = next(_next_handle)
        self._closed = False
        cuda = cuda if cuda is not None else CudaOptions()
        self.backend: Backend = open_backend(self.config, mesh, self.handle, cuda)
        with _lock:
            _open[self.handle] = self
        log.info("jax_ll_ep: %r", self)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def axis_name(self) -> str:
        return self.config.axis_name

    @property
    def num_ranks(self) -> int:
        return self.config.num_ranks

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def max_tokens_per_rank(self) -> int:
        return self.config.max_tokens_per_rank

    @property
    def hidden(self) -> int:
        return self.config.hidden

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nbytes_per_rank(self) -> int:
        """Symmetric memory held per rank (0 for the xla backend)."""
        return self.backend.region_bytes

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Buffer(handle={self.handle}, backend={self.backend.name!r}, axis={c.axis_name!r}, ranks={c.num_ranks}, "
            f"experts={c.num_experts}, max_tokens_per_rank={c.max_tokens_per_rank}, hidden={c.hidden}, "
            f"bytes_per_rank={self.nbytes_per_rank}{', closed' if self._closed else ''})"
        )

    def ensure_open(self) -> None:
        if self._closed:
            raise BufferClosedError(f"{self!r} is closed; create a new Buffer")

    def check(self) -> None:
        """Raises the first error the protocol recorded since the last check (timeouts, routing errors,
        mismatched call sequences, ranks masked by ``on_timeout="mask"``), then clears it."""
        self.ensure_open()
        self.backend.check()

    # ----------------------------------------------------------------------------------------------------------
    # Masking: leaving ranks out of the exchange (docs/reliability.md)
    # ----------------------------------------------------------------------------------------------------------
    def mask_ranks(self, ranks: Iterable[int]) -> None:
        """Masks ``ranks`` (positions on the buffer's axis, in every group of the mesh); ``[]`` restores every rank.

        Call it outside jit, on every live process, with the same list; it first waits for the buffer's calls to
        finish. While a rank is masked, no live rank sends to it or waits on it, and a (token, expert) pair routed to
        one of its experts is dropped exactly as if its id were -1 (dispatch delivers nothing for it; combine sums
        the live pairs only; :meth:`dropped_pairs` counts them). A masked rank that still runs gets its calls back at
        once, with nothing sent or awaited and unspecified outputs. The mask is device state: compiled programs pick
        it up without recompiling (on the xla backend, where it is only the dropped-pair rule, programs are traced
        again).

        It is also how survivors go on after a rank dies: the live processes (every process holding a rank left
        unmasked must take part) agree on the list and on the next call's sequence number, which clears a timed-out
        buffer's refusal of further sends. Unmask a rank only when its process takes part again: a rank whose slots
        are read again must not have writes of an old call still on their way.
        """
        self.ensure_open()
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
            raise TypeError(f"mask_ranks: ranks must be an iterable of ints, got {ranks!r}")
        try:
            listed = [operator.index(r) for r in ranks]
        except TypeError:
            raise TypeError(f"mask_ranks: ranks must be ints, got {ranks!r}") from None
        bad = [r for r in listed if not 0 <= r < self.num_ranks]
        if bad:
            raise ValueError(
                f"mask_ranks: ranks {bad} are outside [0, {self.num_ranks}) (positions on axis {self.axis_name!r})"
            )
        if len(set(listed)) == self.num_ranks:
            raise ValueError(f"mask_ranks: {sorted(set(listed))} would mask every rank of the buffer; leave one live")
        self.backend.mask_ranks(tuple(sorted(set(listed))))

    @property
    def masked_ranks(self) -> tuple[int, ...]:
        """The ranks this process's ranks treat as masked (their union; after :meth:`mask_ranks` every rank holds the
        same list, after an ``on_timeout="mask"`` timeout the ranks that timed out hold the silent ones). Waits for the
        buffer's calls to finish."""
        self.ensure_open()
        return self.backend.masked_ranks()

    def dropped_pairs(self) -> dict[tuple[int, int], DroppedPairs]:
        """{(group, rank): DroppedPairs(last_call, total)} for this process's ranks: the (token, expert) pairs each
        dropped because their expert's rank was masked, in its most recent call and since the buffer was created (a
        dispatch counts them when it sends, a combine when it reduces). Waits for the buffer's calls to finish.
        cpu and cuda backends."""
        self.ensure_open()
        return self.backend.dropped_pairs()

    def close(self) -> None:
        """Frees the buffer. Collective; idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        with _lock:
            _open.pop(self.handle, None)
        self.backend.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all_at_exit() -> None:
    with _lock:
        buffers = sorted(_open.values(), key=lambda b: -b.handle)
    for buf in buffers:
        try:
            buf.close()
        except Exception as exc:  # noqa: BLE001 - teardown at exit must not mask the real exit status
            log.warning("jax_ll_ep: closing %r at exit failed: %s", buf, exc)
