"""The smallest use of jax_ll_ep: dispatch, identity experts, combine, on 4 simulated CPU devices.

python examples/shard_map_minimal.py
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)  # before any JAX backend starts

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ll_ep as ep  # noqa: E402

R, T, H, E, K = 4, 8, 128, 8, 2  # ranks, tokens per rank, hidden, experts, top-k
mesh = jax.make_mesh((R,), ("ep",))
buf = ep.Buffer(mesh, "ep", num_experts=E, max_tokens_per_rank=T, hidden=H)


def layer(x, topk_idx, topk_weights):  # runs once per device, on its [T, ...] shard
    recv_x, recv_count, handle = ep.dispatch(buf, x, topk_idx)  # recv_x: [E/R, R*T, H]
    y = recv_x  # your experts go here; rows past recv_count[e] are not tokens
    return ep.combine(buf, y, topk_idx, topk_weights, handle)  # [T, H]


rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16)
topk_idx = jnp.asarray(np.argsort(rng.random((R * T, E)), axis=1)[:, :K], jnp.int32)  # K distinct experts
topk_weights = jnp.full((R * T, K), 1.0 / K, jnp.float32)
x, topk_idx, topk_weights = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, topk_idx, topk_weights))

out = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(x, topk_idx, topk_weights)
# Identity experts and weights summing to 1 give back x (1/2 + 1/2 is exact).
print(buf.backend.name, "round trip exact:", bool(jnp.all(out == x)))
buf.close()
