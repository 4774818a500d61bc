"""Helpers shared by tests, examples and benchmarks; backend-agnostic except :mod:`.cpu_hooks`.

  payloads   routing and payload builders (random, skewed, self-describing tokens, poisoned rows)
  runners    meshes, per-device sharding, and runners of dispatch / combine / round trips on per-device NumPy data
  launcher   a job of several OS processes with a deadline and shared fate (:func:`launch_ranks`)
  cpu_hooks  the cpu backend's test instrumentation: injected delays, a rank that never calls, timestamps

    buf = Buffer(ep_mesh(8), "ep", num_experts=32, max_tokens_per_rank=16, hidden=256, backend="xla")
    rng = np.random.default_rng(0)
    xs = [self_describing_tokens(rng, r, 16, 256) for r in range(8)]
    topks = [random_routing(rng, 16, 4, 32) for _ in range(8)]
    got = run_dispatch(buf, xs, topks)          # list of dicts, one per device, keyed like tests/oracle.py

The names of payloads, runners and launcher are also importable from here (``testing.random_routing``).
"""

from .launcher import LaunchResult, free_port, launch_ranks
from .payloads import (
    BF16,
    SOURCE_CHANNELS,
    decode_source,
    poison_invalid_rows,
    random_routing,
    random_tokens,
    random_weights,
    self_describing_tokens,
    skewed_routing,
)
from .runners import (
    combine_fn,
    dequantize,
    device_axes,
    device_spec,
    dispatch_fn,
    dispatch_outputs,
    ep_mesh,
    group_slices,
    num_devices,
    per_device_shard_map,
    roundtrip_fn,
    run_combine,
    run_dispatch,
    run_roundtrip,
    shard_per_device,
    split_dispatch_outputs,
    unshard_per_device,
)

__all__ = [
    "BF16",
    "SOURCE_CHANNELS",
    "LaunchResult",
    "combine_fn",
    "decode_source",
    "dequantize",
    "device_axes",
    "device_spec",
    "dispatch_fn",
    "dispatch_outputs",
    "ep_mesh",
    "free_port",
    "group_slices",
    "launch_ranks",
    "num_devices",
    "per_device_shard_map",
    "poison_invalid_rows",
    "random_routing",
    "random_tokens",
    "random_weights",
    "roundtrip_fn",
    "run_combine",
    "run_dispatch",
    "run_roundtrip",
    "self_describing_tokens",
    "shard_per_device",
    "skewed_routing",
    "split_dispatch_outputs",
    "unshard_per_device",
]
